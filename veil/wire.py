"""Versioned binary envelopes for everything that crosses a process or trust boundary.

Layout: ``b"VEIL"`` | format version (1 byte) | header length (4 bytes, big endian) |
header (UTF-8 JSON) | parts, concatenated. The header names the envelope kind, the
library versions, and each part's size and SHA-256. Nothing is ever unpickled.

The digests detect corruption and naive tampering before bytes reach a native
deserializer; they are not a MAC (the sender is untrusted and could recompute them),
so the receiving side still validates what it deserializes.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from typing import Any

from .errors import SerializationError

MAGIC = b"VEIL"
FORMAT_VERSION = 1
MAX_HEADER = 1 << 16
_PREFIX = struct.Struct(">4sBI")


_CHUNK = 1 << 24


class FilePart:
    """A part that stays in a file until it is written (a bootstrapped model's
    evaluation keys: GiB each), hashed and copied in chunks, never held in memory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.nbytes = os.path.getsize(self.path)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def copy_to(self, file) -> None:
        with open(self.path, "rb") as f:
            shutil.copyfileobj(f, file, _CHUNK)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


def release_pages(part) -> None:
    """Drop the pages of a mapped file that a view reads from this process's memory
    (the kernel's page cache keeps them, so a later read is a page-cache hit): checking
    a mapped key file of many GiB must not leave all of it counted against the
    process. No-op for anything but a view of an ``mmap``."""
    base = part.obj if isinstance(part, memoryview) else None
    if isinstance(base, mmap.mmap) and not base.closed:
        base.madvise(mmap.MADV_DONTNEED)


def part_size(part) -> int:
    """Bytes of a part: bytes-like or :class:`FilePart`."""
    return part.nbytes if isinstance(part, FilePart) else memoryview(part).nbytes


def _digest(part) -> str:
    return part.sha256() if isinstance(part, FilePart) else hashlib.sha256(part).hexdigest()


def _head(kind: str, parts: dict[str, bytes], meta: dict[str, Any] | None) -> bytes:
    header = dict(meta or {})
    header["kind"] = kind
    header["parts"] = [{"name": n, "size": part_size(b), "sha256": _digest(b)}
                       for n, b in parts.items()]
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw


def pack(kind: str, parts: dict[str, bytes], meta: dict[str, Any] | None = None) -> bytes:
    """Wrap named binary ``parts`` in an envelope of ``kind`` with extra ``meta`` fields."""
    return b"".join([_head(kind, parts, meta), *(
        p.read() if isinstance(p, FilePart) else p for p in parts.values())])


def write(file, kind: str, parts: dict[str, bytes], meta: dict[str, Any] | None = None
          ) -> int:
    """:func:`pack` written to a binary ``file`` part by part, never joined in memory
    (evaluation keys of a bootstrapped model are several GiB); returns the bytes."""
    head = _head(kind, parts, meta)
    file.write(head)
    for part in parts.values():
        if isinstance(part, FilePart):
            part.copy_to(file)
        else:
            file.write(part)
    return len(head) + sum(part_size(p) for p in parts.values())


def unpack(blob: bytes, kind: str, *, max_size: int = 1 << 34, copy: bool = True
           ) -> tuple[dict, dict[str, bytes]]:
    """Check and open an envelope of the expected ``kind``; returns (header, parts).

    With ``copy=False`` the parts are memoryviews into ``blob`` (for example a mapped
    key file) instead of copies.

    Raises:
        SerializationError: wrong magic, version or kind, bad sizes, or a digest mismatch.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SerializationError(f"expected bytes for a {kind}, got {type(blob).__name__}")
    blob = bytes(blob) if copy else memoryview(blob).cast("B")
    if len(blob) > max_size:
        raise SerializationError(f"{kind} of {len(blob)} bytes exceeds the {max_size} limit")
    if len(blob) < _PREFIX.size:
        raise SerializationError(f"{kind} is truncated")
    magic, version, hlen = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise SerializationError(f"not a veil {kind} (bad magic)")
    if version != FORMAT_VERSION:
        raise SerializationError(f"{kind} uses wire format {version}; this veil reads "
                                 f"{FORMAT_VERSION}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(blob):
        raise SerializationError(f"{kind} header is malformed")
    try:
        header = json.loads(bytes(blob[_PREFIX.size:_PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"{kind} header is not valid JSON") from exc
    if not isinstance(header, dict) or header.get("kind") != kind:
        got = header.get("kind") if isinstance(header, dict) else None
        raise SerializationError(f"expected a {kind}, got a {got or 'unknown envelope'}")
    return header, _split_parts(blob, _PREFIX.size + hlen, header, kind)


def peek_kind(blob) -> str | None:
    """The kind an envelope claims, unverified; None for anything that is not one.

    Only for choosing a better error message before :func:`unpack` checks everything.
    """
    try:
        magic, _, hlen = _PREFIX.unpack_from(bytes(blob[:_PREFIX.size]))
        if magic != MAGIC or hlen > MAX_HEADER:
            return None
        header = json.loads(bytes(blob[_PREFIX.size:_PREFIX.size + hlen]))
        return header.get("kind") if isinstance(header, dict) else None
    except (struct.error, TypeError, ValueError):
        return None


def _split_parts(blob: bytes, offset: int, header: dict, kind: str) -> dict[str, bytes]:
    parts: dict[str, bytes] = {}
    specs = header.get("parts")
    if not isinstance(specs, list):
        raise SerializationError(f"{kind} header lists no parts")
    for spec in specs:
        try:
            name, size, digest = spec["name"], int(spec["size"]), str(spec["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"{kind} part entry is malformed") from exc
        if size < 0 or offset + size > len(blob):
            raise SerializationError(f"{kind} is truncated")
        data = blob[offset:offset + size]
        ok = hashlib.sha256(data).hexdigest() == digest
        release_pages(data)
        if not ok:
            raise SerializationError(f"{kind} failed its integrity check (corrupted or "
                                     "tampered bytes)")
        parts[name] = data
        offset += size
    if offset != len(blob):
        raise SerializationError(f"{kind} has {len(blob) - offset} unexpected trailing bytes")
    return parts


def fingerprint(obj: Any) -> str:
    """A short stable digest of a JSON-able object (e.g. CKKS parameters)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]

"""Checks OpenFHE payloads from clients before any OpenFHE deserializer sees them.

OpenFHE's binary deserializers (cereal portable binary) trust their input: a flipped
byte in a length or a modulus makes them allocate gigabytes, divide by zero or corrupt
the heap. Nothing a client sends reaches them unchecked; this module does the checking
and needs no OpenFHE itself (the fuzz target exercises it without native code).

The check is a *template with holes*. The server builds a payload of each kind itself,
from the session's :class:`~veil.compiler.plan.CKKSParams` and the manifest's exact
rotation set (a fresh level-0 ciphertext, the relinearization key, the rotation key
map), with the same code an honest client runs. An honest client's bytes are identical
to that template except in two kinds of places:

* the coefficient words of every ``NativeVector``, framed as a u64 count equal to the
  ring dimension, that many u64 words, then the u64 modulus of its tower; and
* the key tag strings (the template's own tag, 32 hex characters).

:func:`compile_checker` finds those holes by that framing (and by the template's own
tag) and keeps only the structure bytes between them and a descriptor per hole, not
the template itself. :meth:`BlobChecker.check` then refuses, in this order, a payload
whose total length differs (so no length field can make OpenFHE allocate more than the
template's sizes), whose structure bytes differ in any place (ring dimension, moduli,
element and tower counts, level, scale, encoding, rotation indices), whose tags are not
the expected tag, or whose coefficient words reach their tower's modulus.
"""
from __future__ import annotations

import hmac
import mmap
import re
import struct
from dataclasses import dataclass, replace

import numpy as np

from ...errors import KeyMismatchError, MissingKeyError, SerializationError
from .keyparts import BOOTSTRAP, copy_part, readable, rotation_part

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEX_TAG = re.compile(rb"[0-9a-f]+")


class TemplateError(Exception):
    """The server's own template does not have the expected layout (an OpenFHE version
    this module does not know). Raised while compiling, never for client bytes."""


@dataclass(frozen=True)
class BlobChecker:
    """Compiled template of one payload kind: exact length, structure segments, tag
    offsets and coefficient holes (offset of the first word, tower modulus)."""

    what: str
    length: int
    segments: tuple[tuple[int, bytes], ...]
    tag_offsets: tuple[int, ...]
    tag_length: int
    hole_offsets: np.ndarray
    hole_moduli: np.ndarray
    ring_dim: int
    # Other framed key tags (the sparse secret's, in bootstrapping keys): any lowercase
    # hex string of the tag length is accepted there; OpenFHE only stores it.
    aux_tag_offsets: tuple[int, ...] = ()

    def check(self, data: bytes, tag: str) -> None:
        """Raise SerializationError (KeyMismatchError for a foreign tag) unless ``data``
        is structurally the template with valid coefficients and ``tag`` in every tag
        place. Reads only; allocates at most one tower's comparison at a time."""
        if not isinstance(data, (bytes, bytearray, memoryview, mmap.mmap)):
            raise SerializationError(f"the {self.what} must be bytes")
        view = memoryview(data)
        if view.nbytes != self.length:
            raise SerializationError(
                f"the {self.what} has {view.nbytes} bytes; this model's parameters give "
                f"exactly {self.length}: it was made for other parameters or is corrupt")
        for offset, expected in self.segments:
            if view[offset:offset + len(expected)] != expected:
                raise SerializationError(
                    f"the {self.what} does not match this model's parameters (byte "
                    f"{offset + _first_difference(view, offset, expected)}): ring "
                    "dimension, moduli, level, sizes or encoding differ, or it is corrupt")
        want = tag.encode("ascii", "replace") if isinstance(tag, str) else b""
        if len(want) != self.tag_length:
            raise KeyMismatchError(f"the key tag {tag!r} is not an OpenFHE key tag")
        for offset in self.tag_offsets:
            if not hmac.compare_digest(bytes(view[offset:offset + self.tag_length]), want):
                raise KeyMismatchError(f"the {self.what} was made under other keys than "
                                       "this session's evaluation keys")
        for offset in self.aux_tag_offsets:
            if not _HEX_TAG.fullmatch(bytes(view[offset:offset + self.tag_length])):
                raise SerializationError(f"the {self.what} has a malformed key tag")
        n = self.ring_dim
        for offset, modulus in zip(self.hole_offsets.tolist(), self.hole_moduli.tolist()):
            words = np.frombuffer(view, dtype="<u8", count=n, offset=offset)
            if int(words.max()) >= modulus:
                raise SerializationError(f"the {self.what} has a coefficient at or above "
                                         "its modulus: it is corrupt")


    def with_bytes(self, offset: int, data: bytes) -> "BlobChecker":
        """This checker expecting ``data`` at ``offset`` (inside a structure segment):
        the template of one rotation key serves every rotation index."""
        segments, hit = [], False
        for start, expected in self.segments:
            if start <= offset and offset + len(data) <= start + len(expected):
                at = offset - start
                expected, hit = expected[:at] + data + expected[at + len(data):], True
            segments.append((start, expected))
        if not hit:
            raise TemplateError(f"offset {offset} is not structure in the {self.what}")
        return replace(self, segments=tuple(segments))


def _first_difference(view: memoryview, offset: int, expected: bytes) -> int:
    got = bytes(view[offset:offset + len(expected)])
    return next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)


def ntt_prime_shape(ring_dim: int):
    """Whether a u64 can be a CKKS tower modulus for ``ring_dim``: odd, 2^20..2^62 and
    1 mod 2*ring_dim (NTT-friendly), as every Q and P tower OpenFHE picks."""
    return lambda m: (1 << 20) < m < (1 << 62) and m % (2 * ring_dim) == 1


def find_holes(template: bytes, ring_dim: int, is_modulus) -> list[tuple[int, int]]:
    """(offset of the first coefficient word, modulus) of every NativeVector in
    ``template``: a u64 count equal to ``ring_dim``, ``ring_dim`` words all below the
    u64 that follows them, for which ``is_modulus`` holds."""
    holes, offset, size = [], 0, len(template)
    count = _U64.pack(ring_dim)
    span = 8 * ring_dim
    while True:
        offset = template.find(count, offset)
        if offset < 0 or offset + 8 + span + 8 > size:
            return holes
        start = offset + 8
        (modulus,) = _U64.unpack_from(template, start + span)
        if is_modulus(modulus) and int(np.frombuffer(template, "<u8", ring_dim, start).max()) \
                < modulus:
            holes.append((start, modulus))
            offset = start + span + 8
        else:
            offset += 1


def compile_checker(what: str, template: bytes, tag: str, ring_dim: int) -> BlobChecker:
    """Compile the checker of one payload kind from the server's own ``template``
    (made under key tag ``tag``); see the module docstring."""
    holes = find_holes(template, ring_dim, ntt_prime_shape(ring_dim))
    if not holes:
        raise TemplateError(f"no coefficient vectors found in the {what} template")
    raw_tag = tag.encode("ascii")
    # framed strings of the tag's length and alphabet: the tag itself, or another key's
    framed = re.compile(re.escape(_U64.pack(len(raw_tag))) + rb"[0-9a-f]{%d}" % len(raw_tag))
    tag_offsets, aux_offsets, spans, start = [], [], [], 0
    for hole, _ in holes:
        spans.append((start, hole))
        start = hole + 8 * ring_dim
    spans.append((start, len(template)))
    segments = []
    for lo, hi in spans:
        part = template[lo:hi]
        cut = own = 0
        for match in framed.finditer(part):
            found = match.start() + 8
            if found > cut:
                segments.append((lo + cut, part[cut:found]))
            mine = part[found:match.end()] == raw_tag
            (tag_offsets if mine else aux_offsets).append(lo + found)
            own += mine
            cut = match.end()
        if part.count(raw_tag) != own:
            raise TemplateError(f"the key tag in the {what} template is not framed "
                                "as a string")
        if cut < len(part):
            segments.append((lo + cut, part[cut:]))
    if not tag_offsets:
        raise TemplateError(f"the {what} template does not carry its key tag")
    return BlobChecker(what, len(template), tuple(segments), tuple(tag_offsets),
                       len(raw_tag), np.array([h for h, _ in holes], dtype=np.int64),
                       np.array([m for _, m in holes], dtype=np.uint64), ring_dim,
                       tuple(aux_offsets))


@dataclass(frozen=True)
class RotationLayout:
    """Where the automorphism indices sit in a rotation key map with any number of
    entries (all entries after the first have one length): used only to name missing
    rotation keys in an error message, never to accept bytes."""

    count_offset: int
    first_entry: int
    first_length: int
    other_length: int | None

    def present(self, data: bytes) -> list[int] | None:
        """The automorphism indices of a map laid out like the template, or None."""
        if len(data) < self.first_entry + 4:
            return None
        (count,) = _U64.unpack_from(data, self.count_offset)
        if self.other_length is None:
            if count != 1 or len(data) != self.first_entry + self.first_length:
                return None
        elif not 1 <= count <= 1 << 20 or len(data) != (
                self.first_entry + self.first_length + (count - 1) * self.other_length):
            return None
        return [_U32.unpack_from(data, self._entry(j))[0] for j in range(count)]

    def _entry(self, j: int) -> int:
        if j == 0:
            return self.first_entry
        return self.first_entry + self.first_length + (j - 1) * (self.other_length or 0)


def rotation_layout(template: bytes, indices: list[int], holes_per_entry: int,
                    checker: BlobChecker) -> RotationLayout:
    """Entry offsets of the server's rotation key map template (sorted ``indices``)."""
    count = len(indices)
    head = _U64.pack(count) + _U32.pack(indices[0])
    first = template.find(head)
    if first < 0 or len(checker.hole_offsets) != holes_per_entry * count:
        raise TemplateError("unexpected rotation key map layout")
    first += 8
    tail = checker.length - (int(checker.hole_offsets[-1]) + 8 * checker.ring_dim)
    starts = [first] + [int(checker.hole_offsets[holes_per_entry * j - 1])
                        + 8 * checker.ring_dim + tail for j in range(1, count)]
    for start, index in zip(starts, indices):
        if _U32.unpack_from(template, start)[0] != index:
            raise TemplateError("unexpected rotation key map layout")
    ends = starts[1:] + [checker.length]
    lengths = [e - s for s, e in zip(starts, ends)]
    if len(set(lengths[1:])) > 1:
        raise TemplateError("unexpected rotation key map layout")
    return RotationLayout(first - 8, first, lengths[0], lengths[1] if count > 1 else None)


@dataclass(frozen=True)
class PayloadValidator:
    """Checkers for one parameter set and rotation set: a fresh ciphertext (client
    inputs and the model owner's encrypted weights), the relinearization key and the
    rotation key map. Built by :func:`veil.backends.he.openfhe_engine.payload_validator`
    from the server's own template payloads; immutable, safe to share between threads."""

    params_key: tuple
    ciphertexts: tuple[BlobChecker, ...]    # each honest layout of a fresh ciphertext
    mult: BlobChecker
    rotations: BlobChecker | None
    rotation_index: dict[int, int]      # rotation -> automorphism index
    rotation_layout: RotationLayout | None
    bootstrap_indices: tuple[int, ...] = ()   # automorphism indices of bootstrap keys
    # bootstrapped models: keys one part per rotation (see .keyparts), checked against
    # one rotation key's template with its automorphism index (a u32 at rotation_at)
    # replaced, and the bootstrapping keys' own template
    rotation_key: BlobChecker | None = None
    rotation_at: int = 0
    boot: BlobChecker | None = None

    @property
    def per_key(self) -> bool:
        return self.boot is not None

    def check_rotation(self, k: int, data: bytes, tag: str) -> None:
        """Refuse ``data`` unless it is exactly the rotation key for slot rotation
        ``k`` of these parameters under ``tag`` (a map with that one key)."""
        index = self.rotation_index.get(int(k))
        if index is None or self.rotation_key is None:
            raise SerializationError(f"this model uses no rotation key {k}")
        self.rotation_key.with_bytes(self.rotation_at, _U32.pack(index)).check(data, tag)

    def check_ciphertext(self, data: bytes, tag: str) -> None:
        """Refuse a ciphertext that is not a fresh level-0 one of these parameters
        under key tag ``tag``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SerializationError("the ciphertext must be bytes")
        size = memoryview(data).nbytes
        layouts = [c for c in self.ciphertexts if c.length == size] or self.ciphertexts[:1]
        for checker in layouts[1:]:
            try:
                checker.check(data, tag)
                return
            except SerializationError:
                continue
        layouts[0].check(data, tag)

    def check_eval_keys(self, parts: dict, tag: str) -> None:
        """Refuse evaluation keys that are not exactly a relinearization key and the
        manifest's rotation keys of these parameters under key tag ``tag``. Missing
        rotation keys raise MissingKeyError naming them."""
        if self.per_key:
            self._check_per_key(parts, tag)
            return
        if not isinstance(parts, dict) or set(parts) - {"mult", "rotations"} \
                or "mult" not in parts:
            raise SerializationError("evaluation keys need exactly the parts 'mult' and "
                                     "'rotations'")
        self.mult.check(parts["mult"], tag)
        blob = parts.get("rotations") or b""
        if self.rotations is None:
            if blob:
                raise SerializationError("this model needs no rotation keys, but "
                                         "evaluation keys came with some")
            return
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise SerializationError("the rotation keys must be bytes")
        if memoryview(blob).nbytes != self.rotations.length:
            self._explain_missing(bytes(blob))
        self.rotations.check(blob, tag)

    def check_key_layout(self, parts: dict, tag: str) -> None:
        """For keys one part per rotation key: exactly the manifest's parts (missing
        ones named: MissingKeyError) and the relinearization key; the other parts'
        contents are :meth:`check_rotation`'s and ``boot``'s (a session checks its own
        private copies of them)."""
        if not isinstance(parts, dict) or "mult" not in parts:
            raise SerializationError("evaluation keys need a 'mult' part")
        if BOOTSTRAP not in parts:
            raise MissingKeyError("the evaluation keys lack the bootstrapping keys; "
                                  "regenerate them from this model's client bundle")
        wanted = {rotation_part(k) for k in self.rotation_index}
        missing = sorted(k for k in self.rotation_index if rotation_part(k) not in parts)
        if missing:
            raise MissingKeyError(f"the evaluation keys lack rotation keys for {missing}; "
                                  "regenerate them from this model's client bundle")
        extra = sorted(set(parts) - wanted - {"mult", BOOTSTRAP})
        if extra:
            raise SerializationError(f"the evaluation keys have parts this model does not "
                                     f"use: {extra[:5]}")
        self.mult.check(parts["mult"], tag)

    def _check_per_key(self, parts: dict, tag: str) -> None:
        self.check_key_layout(parts, tag)
        for k in self.rotation_index:
            self.check_rotation(k, copy_part(parts[rotation_part(k)]), tag)
        with readable(parts[BOOTSTRAP]) as view:
            self.boot.check(view, tag)

    def _explain_missing(self, blob: bytes) -> None:
        present = set(self.rotation_layout.present(blob) or []) if blob \
            and self.rotation_layout is not None else set()
        if blob and not present:
            return          # not a map we can read: the structure check says why
        missing = sorted(r for r, index in self.rotation_index.items()
                         if index not in present)
        if missing:
            raise MissingKeyError(f"the evaluation keys lack rotation keys for {missing}; "
                                  "regenerate them from this model's client bundle")
        if not set(self.bootstrap_indices) <= present:
            raise MissingKeyError("the evaluation keys lack the bootstrapping keys; "
                                  "regenerate them from this model's client bundle")

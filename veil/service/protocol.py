"""Wire formats shared by the service and the SDK (no web framework imported here).

* client-bundle archive: the files of a client-bundle folder in one ``veil.wire``
  envelope (kind ``veil-client-bundle-archive``), parts named by file name;
* ciphertext batch: ``veil-ciphertext-batch``, parts ``"0"``, ``"1"``, ... in order.

Nothing is unpickled; names are checked, so an archive cannot write outside its folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import SerializationError
from ..wire import pack, unpack

BUNDLE_ARCHIVE_KIND = "veil-client-bundle-archive"
BATCH_KIND = "veil-ciphertext-batch"
OCTETS = "application/octet-stream"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def pack_client_bundle(directory: str | Path, meta: dict) -> bytes:
    """A client-bundle folder as one envelope: its plain files, by name."""
    files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
             if p.is_file() and _FILE.match(p.name)}
    return pack(BUNDLE_ARCHIVE_KIND, files, meta)


def unpack_client_bundle(blob: bytes, directory: str | Path) -> dict:
    """Write an archive's files into ``directory`` (each atomically); returns its header."""
    header, files = unpack(blob, BUNDLE_ARCHIVE_KIND)
    bad = [n for n in files if not _FILE.match(n)]
    if bad or not files:
        raise SerializationError(f"client bundle archive has bad file names {bad!r}"
                                 if bad else "client bundle archive is empty")
    d = Path(directory)
    for name, data in files.items():
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(d / name)
    return header


def pack_batch(items: list[bytes]) -> bytes:
    return pack(BATCH_KIND, {str(i): b for i, b in enumerate(items)})


def unpack_batch(blob: bytes, *, max_items: int, max_size: int) -> list[bytes]:
    """The items of a batch envelope, in order; SerializationError if malformed."""
    _, parts = unpack(blob, BATCH_KIND, max_size=max_size)
    items = [parts.get(str(i)) for i in range(len(parts))]
    if not items or None in items or len(items) > max_items:
        raise SerializationError(f"a batch holds 1 to {max_items} items named 0, 1, ...")
    return items

"""Evaluation keys kept one part per rotation key, outside memory until used.

A bootstrapped model's evaluation keys are GiB (see :mod:`.keycache`): the client
writes the bootstrapping keys and each rotation key to its own file part (parts
``bootstrap`` and ``rotation/<k>``), and the server maps the key file and copies one
part at a time out of it. These helpers need no OpenFHE.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil

from ...errors import SerializationError
from ...wire import FilePart, release_pages

BOOTSTRAP = "bootstrap"
_CHUNK = 1 << 24


def rotation_part(k: int) -> str:
    """Part name of the rotation key for slot rotation ``k``."""
    return f"rotation/{int(k)}"


def rotation_parts(rotations) -> set[str]:
    return {rotation_part(k) for k in rotations}


def is_per_key(parts: dict) -> bool:
    """Whether evaluation keys come one part per rotation key (bootstrapped models)."""
    return BOOTSTRAP in parts


def copy_part(part) -> bytes:
    """A private copy of one part (the bytes that are checked are the bytes that are
    decoded, even if the mapped file changes underneath)."""
    if isinstance(part, FilePart):      # the client's own files, in one process
        return part.read()
    if not isinstance(part, (bytes, bytearray, memoryview)):
        raise SerializationError("evaluation key parts must be bytes")
    data = bytes(part)
    release_pages(part)
    return data


@contextlib.contextmanager
def readable(part):
    """A buffer over one part for checking (a file part is mapped, then released)."""
    if isinstance(part, FilePart):
        with mapped(part.path) as view:
            yield view
    else:
        yield part
        release_pages(part)


def spool(part, path: str | os.PathLike) -> None:
    """Write one part to a new private file in chunks (OpenFHE then reads the file:
    decoding several GiB from bytes would hold them three times)."""
    if isinstance(part, FilePart):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            part.copy_to(f)
        return
    if not isinstance(part, (bytes, bytearray, memoryview)):
        raise SerializationError("evaluation key parts must be bytes")
    view = memoryview(part).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        for at in range(0, view.nbytes, _CHUNK):
            f.write(view[at:at + _CHUNK])
            if at % (64 * _CHUNK) == 0:
                release_pages(part)
    release_pages(part)


@contextlib.contextmanager
def mapped(path: str | os.PathLike):
    """A read-only view of a file for the duration of a check: its pages leave this
    process's memory when the block ends."""
    with open(path, "rb") as f:
        region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield region
    finally:
        region.close()


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)

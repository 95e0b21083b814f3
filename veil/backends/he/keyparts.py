"""Evaluation keys kept one part per rotation key, outside memory until used.

A bootstrapped model's evaluation keys are GiB (see :mod:`.keycache`): the client
writes the bootstrapping keys and each rotation key to its own file part (parts
``bootstrap`` and ``rotation/<k>``). The server copies each part once, when the session
opens, to a :class:`SpooledPart` (a file of its own that has no name), checks that copy
and later lets OpenFHE read it by path: the bytes checked are the bytes decoded, a
decode holds only the decoded keys (from bytes, OpenFHE's binding would hold them three
times), and nothing is left on disk when the session closes or its process dies. These
helpers need no OpenFHE.
"""
from __future__ import annotations

import contextlib
import mmap
import os

from ..._files import unnamed_file
from ...errors import SerializationError
from ...wire import FilePart, release_pages

BOOTSTRAP = "bootstrap"
_CHUNK = 1 << 24


def rotation_part(k: int) -> str:
    """Part name of the rotation key for slot rotation ``k``."""
    return f"rotation/{int(k)}"


def is_per_key(parts: dict) -> bool:
    """Whether evaluation keys come one part per rotation key (bootstrapped models)."""
    return BOOTSTRAP in parts


def copy_part(part) -> bytes:
    """The bytes of one part (a file part is read; a mapped one's pages are released)."""
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
        with open(part.path, "rb") as f, _mapped(f.fileno()) as view:
            yield view
    else:
        yield part
        release_pages(part)


@contextlib.contextmanager
def _mapped(fd: int):
    region = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    try:
        yield region
    finally:
        try:
            region.close()      # its pages leave this process's memory
        except BufferError:
            # a check that raised keeps views of the map in its traceback: the map is
            # closed when they are collected
            pass


class SpooledPart:
    """A private copy of one key part in a file without a name (see the module
    docstring); :attr:`path` names it for OpenFHE while this object is open."""

    def __init__(self, part) -> None:
        if not isinstance(part, (bytes, bytearray, memoryview, FilePart)):
            raise SerializationError("evaluation key parts must be bytes")
        self.fd = unnamed_file()
        try:
            with open(self.fd, "wb", closefd=False) as f:
                if isinstance(part, FilePart):
                    part.copy_to(f)
                else:
                    view = memoryview(part).cast("B")
                    for at in range(0, view.nbytes, _CHUNK):
                        f.write(view[at:at + _CHUNK])
                        if at % (64 * _CHUNK) == 0:
                            release_pages(part)
                    release_pages(part)
            self.nbytes = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def view(self):
        """The copy mapped read-only for a check (released when the block ends)."""
        if self.nbytes == 0:
            raise SerializationError("an evaluation key part is empty")
        return _mapped(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

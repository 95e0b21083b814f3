"""Process-level care of a native library that keeps global state, without importing it.

:class:`KeyMapLock` guards OpenFHE's process-wide evaluation-key maps (see
``openfhe_engine``); :func:`release_native_memory` hands the heap native code freed back
to the operating system.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class KeyMapLock:
    """Readers-writer lock over OpenFHE's key maps. Writers are preferred (a waiting
    key load is not starved by a stream of evaluations) and may re-enter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = self._waiting = self._depth = 0
        self._writer: int | None = None

    @contextmanager
    def read(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:          # a writer may evaluate inside its own write
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            if self._writer != me:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_MALLOC_TRIM = _load_libc()


def release_native_memory() -> None:
    """Hand the heap OpenFHE freed back to the OS (glibc's ``malloc_trim``; nothing
    elsewhere). Key generation at 2^16 peaks at three copies of the keys (OpenFHE's,
    its serialization, Python's bytes) and glibc keeps the freed pages: a client that
    generated 4 GiB of bootstrapping keys would otherwise hold 13 GiB while the server
    beside it loads them."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

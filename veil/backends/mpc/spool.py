"""The offline phase on disk: whole material sets of a large model, fetched from the
dealer while a party is idle and read back layer by layer when a request uses them.

A party keeps a few whole sets in memory when they are small (``wire.POOL_LIMIT``);
a 224x224 model's set is a gigabyte or more, so without a spool its material streams
from the dealer during the request, and the dealer's generation, the transfer and
party 0's seed expansion all share the machine with the online phase. With a spool
directory (``veil mpc-node --spool DIR``) the party writes each set's chunks, exactly
as the dealer sent them (party 0's already expanded), to one file, and the run reads
them back as it reaches each layer: the same material, the same order, the same
memory bound (a layer over the streaming threshold is read a chunk at a time).

The file never has a name (``O_TMPFILE``; where the file system lacks it, it is
unlinked as soon as it is created), so only this process's open handle refers to it: a set is never read twice, nothing is left on disk when the process
ends or the set is dropped (session reset, a set party 0 skipped), and no other
process finds it by name. It holds this party's shares, which the party also holds
in memory while it computes; the directory should be on the party's own disk
(0700, created by the party).
"""
from __future__ import annotations

import mmap
import os
import shutil
import threading
from pathlib import Path

from ..._files import private_dir, unnamed_file
from ...errors import ResourceError
from .. import sockets as so
from . import protocols as pr
from .evaluator import Chunked


class SpoolSet:
    """One material set on disk: ``add`` appends chunk (layer, step, chunk) in order
    while it is fetched (a layer read whole: one record per step, its chunks joined);
    calling it with a layer index gives that layer's material as
    :func:`~veil.backends.mpc.evaluator.evaluate` consumes it."""

    def __init__(self, directory: str | os.PathLike, plan: list[list[tuple[int, ...]]],
                 chunked: list[bool]) -> None:
        """``plan[i][j]``: the value counts of step j's chunks in layer i;
        ``chunked[i]``: whether layer i is read a chunk at a time while it runs."""
        self._file = os.fdopen(unnamed_file(directory), "w+b")
        self._map: mmap.mmap | None = None
        self._released = 0          # pages before this offset are given back
        self._lock = threading.Lock()
        self.plan, self.chunked = plan, chunked
        self._index: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.bytes = 0
        self.took_s = 0.0

    def add(self, layer: int, step: int, chunk: int, body: bytes) -> None:
        """Chunk ``chunk`` of a step (of a layer not read by chunks: the whole step,
        chunk 0)."""
        with self._lock:
            at = self._file.seek(0, os.SEEK_END)
            self._file.write(body)
            self._index[(layer, step, chunk)] = (at, len(body))
            self.bytes += len(body)

    def sync(self) -> None:
        """Write the set to disk now, while the party is idle: otherwise the kernel's
        writeback of the dirty pages runs later, during a request."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _read(self, layer: int, step: int, chunk: int) -> dict:
        """The chunk's arrays as copy-on-write views of the file's pages (mapped once
        the set is complete): no copy, and no fresh memory to fault in."""
        at, size = self._index[(layer, step, chunk)]
        with self._lock:
            if self._map is None:
                self._file.flush()
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            if at + size > len(self._map):
                raise ResourceError("the material spool file was truncated")
            return so.unpack_arrays(memoryview(self._map)[at:at + size])

    def _release(self, layer: int, step: int = 0, chunk: int = 0) -> None:
        """Unmap what the run has consumed (every record before this one: records are
        in run order), so the set's pages do not add up in this process's memory."""
        at = self._index[(layer, step, chunk)][0] // mmap.PAGESIZE * mmap.PAGESIZE
        with self._lock:
            if self._map is not None and at > self._released:
                self._map.madvise(mmap.MADV_DONTNEED, self._released,
                                  at - self._released)
                self._released = at

    def _chunk(self, layer: int, step: int):
        def load(c: int):
            self._release(layer, step, c)
            (item,) = pr.material_from_arrays(self._read(layer, step, c))
            return item
        return load

    def __call__(self, layer: int) -> list:
        steps = self.plan[layer]
        self._release(layer)
        if self.chunked[layer]:
            return [Chunked(sizes, self._chunk(layer, j)) for j, sizes in enumerate(steps)]
        items: list = []
        for j in range(len(steps)):
            items += pr.material_from_arrays(self._read(layer, j, 0))
        return items

    def close(self) -> None:
        """Closes the file; the mapping goes when the last array read from it does."""
        self._file.close()

    def __del__(self) -> None:
        try:
            self._file.close()
        except Exception:
            pass


def check_space(directory: str | os.PathLike, need: int) -> Path:
    """The spool directory (created 0700 if missing), after checking that ``need``
    bytes fit on its file system; ResourceError otherwise."""
    d = Path(directory)
    probe = d
    while not probe.exists():           # nothing is created before the check passes
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ResourceError(
            f"the material spool needs an estimated {need / 2**30:.1f} GiB in {d}, which "
            f"has {free / 2**30:.1f} GiB free; spool fewer sets (--spool-sets) or use "
            "another directory")
    return Path(private_dir(d))

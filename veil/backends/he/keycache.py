"""Which rotation keys a server holds in memory when they do not all fit.

A bootstrapped model's rotation keys are 136 MiB each at ring 2^16 (ResNet-20: 70 of
them, 9.3 GiB, next to 6.8 GiB of bootstrapping keys and 4.3 GiB of OpenFHE's
bootstrap precomputations). The server keeps each key in a checked file copy
(:class:`~veil.backends.he.keyparts.SpooledPart`) and decodes it when a layer needs it
(:class:`~veil.backends.he.openfhe_engine.EvaluationSession`); this module only decides
what to load and what to drop, so it needs no OpenFHE.

Policy: Belady's farthest-next-use rule (Belady 1966, optimal for a known reference
string) at layer granularity. The evaluator announces the key set of every layer in
evaluation order once (:meth:`KeyCache.schedule`) and the layer it enters
(:meth:`KeyCache.enter`); a key still to be used in the current layer counts as needed
now, one already used there by the distance in layers to the next layer that uses it
(inferences repeat, so the schedule wraps around). Without a schedule the rule falls
back to least recently used. The capacity is a soft bound: keys one step needs at once
are loaded even when they alone exceed it (the engine asks for one key per rotation,
hoisted baby steps included, so only a budget below one key is exceeded).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable


class KeyCache:
    """Loaded keys under a byte budget; ``load(k)`` and ``drop(k)`` do the work."""

    def __init__(self, capacity: int, size: Callable[[int], int],
                 load: Callable[[int], None], drop: Callable[[int], None]) -> None:
        self.capacity = int(capacity)
        self._size, self._load, self._drop = size, load, drop
        self._loaded: OrderedDict[int, int] = OrderedDict()     # key -> bytes, LRU order
        self._layers: list[frozenset[int]] = []
        self._uses: dict[int, list[int]] = {}
        self._at = 0
        self._used_here: set[int] = set()
        self.loads = 0              # keys loaded since creation (a reload counts again)
        self.peak = 0               # most bytes held at once

    @property
    def held(self) -> int:
        return sum(self._loaded.values())

    def loaded(self) -> set[int]:
        return set(self._loaded)

    def schedule(self, layers: Iterable[Iterable[int]]) -> None:
        """The key sets of the layers in evaluation order (one inference)."""
        self._layers = [frozenset(int(k) for k in ks) for ks in layers]
        self._uses = {}
        for i, ks in enumerate(self._layers):
            for k in ks:
                self._uses.setdefault(k, []).append(i)
        self._at, self._used_here = 0, set()

    def enter(self, layer: int) -> None:
        """The evaluator starts layer ``layer`` of the schedule."""
        self._at, self._used_here = int(layer), set()

    def require(self, keys: Iterable[int]) -> None:
        """Make ``keys`` loaded (together), dropping others if over capacity."""
        keys = [int(k) for k in keys]
        pinned = set(keys)
        for k in keys:
            if k in self._loaded:
                self._loaded.move_to_end(k)
                continue
            need = self._size(k)
            self._make_room(need, pinned)
            self._load(k)
            self._loaded[k] = need
            self.loads += 1
            self.peak = max(self.peak, self.held)
        self._used_here.update(keys)

    def clear(self) -> None:
        for k in list(self._loaded):
            self._drop(k)
            del self._loaded[k]

    def _make_room(self, need: int, pinned: set[int]) -> None:
        while self._loaded and self.held + need > self.capacity:
            # LRU order: earlier = less recently used = the larger tie-break
            order = {k: -i for i, k in enumerate(self._loaded)}
            victims = [k for k in self._loaded if k not in pinned]
            if not victims:
                return          # one step needs more than the budget: soft bound
            k = max(victims, key=lambda v: (self._distance(v), order[v]))
            self._drop(k)
            del self._loaded[k]

    def _distance(self, k: int) -> float:
        """Layers until ``k``'s next use (larger is a better victim; 0 without a
        schedule, so least recently used decides)."""
        if not self._layers:
            return 0.0
        n = len(self._layers)
        if k in self._layers[self._at % n] and k not in self._used_here:
            return 0.0
        uses = self._uses.get(k)
        if not uses:
            return math.inf
        return float(min((u - self._at) % n or n for u in uses))

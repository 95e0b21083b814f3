"""A numpy stand-in for a CKKS engine: slot vectors, exact arithmetic, real rotations.

Used to test layouts, rotation sets and the evaluator without native cryptography.
It records every rotation so tests can check the manifest lists exactly those keys.
"""
from __future__ import annotations

import numpy as np

from ...errors import MissingKeyError
from ...ir import cheb_eval


class NumpySlotEngine:
    def __init__(self, slots: int, rotation_keys: set[int] | None = None) -> None:
        self.slots = slots
        self.rotation_keys = rotation_keys
        self.used_rotations: set[int] = set()
        self.bootstraps = 0
        self.largest_bootstrap_input = 0.0

    def _check(self, k: int) -> None:
        self.used_rotations.add(k)
        if self.rotation_keys is not None and k not in self.rotation_keys:
            raise MissingKeyError(f"no rotation key for index {k}")

    def add(self, a, b):
        return a + b

    def add_plain(self, a, values, cache_key=None):
        return a + values

    def mul_plain(self, a, values, cache_key=None):
        return a * values

    def settle(self, a):
        return a

    def rotate(self, a, k):
        self._check(k)
        return np.roll(a, -k)

    def rotate_hoisted(self, a, ks):
        return {k: self.rotate(a, k) for k in ks}

    def square(self, a):
        return a * a

    def mul(self, a, b):
        return a * b

    def mul_scalar(self, a, value):
        return a * value

    def bootstrap(self, a):
        """Exact here; counts calls and records the largest input magnitude (OpenFHE's
        bootstrap is accurate only on [-1, 1])."""
        self.largest_bootstrap_input = max(self.largest_bootstrap_input,
                                           float(np.max(np.abs(a), initial=0.0)))
        self.bootstraps += 1
        return a.copy()

    def linear_sum(self, cts, weights):
        return sum(w * c for w, c in zip(weights, cts))

    def add_scalar(self, a, value):
        return a + value

    def chebyshev(self, a, coeffs, lo, hi):
        return cheb_eval(a, coeffs, lo, hi)

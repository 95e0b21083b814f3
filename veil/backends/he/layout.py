"""Where values sit in ciphertext slots. Shared by the client (encoding its input) and
the evaluator (which relies on the same layout); see ``veil.compiler.plan``."""
from __future__ import annotations

import numpy as np


def tile(values: np.ndarray, period: int, slots: int) -> np.ndarray:
    """Zero-pad ``values`` to ``period`` and repeat it across all ``slots``."""
    flat = np.zeros(period)
    flat[: np.size(values)] = np.ravel(values)
    return np.tile(flat, slots // period)


def expanded(values: np.ndarray, period: int, block: int, shifts: list[int],
             blocks: int, slots: int) -> np.ndarray:
    """Block ``t`` holds the input rotated by ``shifts[t]`` (the first layer's diagonals).

    The client has the input in the clear, so it performs the first layer's rotations
    itself at no cost; the server then needs one product and ``log2(blocks)`` folds.
    The pattern of ``blocks * block`` slots repeats across the ciphertext.
    """
    base = tile(values, period, block)
    pattern = np.zeros(blocks * block)
    for t, shift in enumerate(shifts):
        pattern[t * block:(t + 1) * block] = np.roll(base, -shift)
    return np.tile(pattern, slots // pattern.size)


def encode_input(values: np.ndarray, spec: dict, slots: int) -> np.ndarray:
    """Slot vector for one input according to the manifest's ``input`` entry."""
    if spec.get("layout", "replicated") == "expanded":
        return expanded(values, spec["period"], spec["block"], spec["shifts"],
                        spec["blocks"], slots)
    return tile(values, spec["period"], slots)

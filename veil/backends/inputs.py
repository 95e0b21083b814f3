"""The one check of a batch of plaintext inputs before a backend client shares, seals or
sends it (MPC and TEE clients, the enclave on arrival)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def check_batch(xs, input_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """A float64 batch of shape (n, *input_shape), 1 <= n <= max_batch, all finite."""
    try:
        xs = np.asarray(xs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"inputs are not numeric: {exc}") from None
    if xs.ndim < 1 or xs.shape[1:] != tuple(input_shape):
        raise InputError(f"inputs have shape {xs.shape}; this model takes a batch of "
                         f"shape (n, {', '.join(map(str, input_shape))})")
    if not 1 <= xs.shape[0] <= max_batch:
        raise InputError(f"batches hold 1 to {max_batch} inputs, not {xs.shape[0]}")
    if not np.isfinite(xs).all():
        raise InputError("inputs contain NaN or infinity")
    return xs

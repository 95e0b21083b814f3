"""Fixed-point numbers in the ring Z_(2^64), held as numpy uint64 (wrapping arithmetic).

A real x is encoded as round(x * 2^f) in two's complement; products carry 2f fractional
bits and are truncated back to f (``protocols.truncate_shares``: faithfully, within one
unit, with circuit material; exactly with DCFs). With the default f = 20, every value,
products included, must stay below 2^(63 - 2f) = 2^23 in magnitude (so a product at 2f
bits does not wrap; the faithful truncation needs 2^22); inputs are checked at
encoding.
f is configurable (parties and clients must agree); 20 is the default because at 16 the
digits CNN's logits drift up to 1.1e-3 from float (the rounding of 512 second-layer
weights to 2^-17 adds up), above the 1e-3 we hold to.
"""
from __future__ import annotations

import numpy as np

from ...errors import InputError

FRAC_BITS = 20
RING_BITS = 64
# Largest magnitude accepted at encoding: leaves 2^(63 - 2f) for products.
MAX_ABS = float(2 ** (RING_BITS - 1 - 2 * FRAC_BITS))


def encode(x, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Reals -> ring elements; NaN, infinity and out-of-range values are an InputError."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise InputError("MPC inputs must be finite (NaN or infinity found)")
    limit = float(2 ** (RING_BITS - 1 - 2 * frac_bits))
    if x.size and np.abs(x).max() >= limit:
        raise InputError(f"MPC inputs must stay below {limit:g} in magnitude with "
                         f"{frac_bits} fractional bits")
    return np.round(x * float(1 << frac_bits)).astype(np.int64).view(np.uint64)


def decode(u: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Ring elements -> reals (two's complement, ``frac_bits`` fractional bits)."""
    return np.asarray(u, dtype=np.uint64).view(np.int64).astype(np.float64) / float(
        1 << frac_bits)

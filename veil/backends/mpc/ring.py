"""The ring Z_(2^64) as the parties open it: the channel one round goes through,
openings of values on a narrower ring (the low w bits), and the faithful truncation's
opening on a w-bit ring (``protocols`` and ``chains`` use them)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

ZERO = np.uint64(0)


class Channel(Protocol):
    """One round with the other party: send ``data``, receive theirs (same shape)."""

    def exchange(self, data: np.ndarray) -> np.ndarray: ...


def open_value(ch: Channel, x: np.ndarray, width: int = 64) -> np.ndarray:
    """x from both shares; with ``width`` < 64, x mod 2^width from ceil(width / 8) bytes
    per value (each party sends the low bytes of its masked share): the narrow openings
    of values whose range is known (narrow comparisons, chains' truncations)."""
    if width >= 64:
        return x + ch.exchange(x)
    if width > 56:                       # 8 bytes: the whole word, masked
        return (x + ch.exchange(x)) & np.uint64((1 << width) - 1)
    flat = np.ascontiguousarray(x, dtype=np.uint64).reshape(-1)
    n, nb = flat.size, (width + 7) // 8
    # each value's low nb bytes, packed: 4-, 2- and 1-byte words written at stride nb (no
    # two writes overlap). The bits above width are masked by the fresh 64-bit r (or a)
    # of every opened value, so they are uniform; the sum drops them
    buf = np.zeros(n * nb + 8, np.uint8)
    at = 0
    for size, dtype in ((4, "<u4"), (2, "<u2"), (1, "u1")):
        if nb - at >= size:
            np.ndarray((n,), dtype, buf, at, (nb,))[:] = flat >> np.uint64(8 * at) \
                if at else flat
            at += size
    theirs = ch.exchange(buf[:n * nb])
    buf[:n * nb] = theirs
    # read back 8 bytes at stride nb (the next value's low bytes on top, masked off)
    out = np.ndarray((n,), "<u8", buf, 0, (nb,)) + flat
    out &= np.uint64((1 << width) - 1)
    return out.reshape(np.shape(x))


def ring_mask(r: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(r mod 2^width, msb_width of it): the mask on a ``width``-bit ring."""
    low = r if width == 64 else r & np.uint64((1 << width) - 1)
    return low, low >> np.uint64(width - 1)


def offset_w(width: int) -> np.uint64:
    """2^(w-2): added to a truncation's input |y| < 2^(w-2) on a w-bit ring, it makes
    u = y + 2^(w-2) lie in [0, 2^(w-1)), where u + r wraps exactly when msb_w(u^) = 0
    and msb_w(r) = 1."""
    return np.uint64(1) << np.uint64(width - 2)


def open_truncation(ch: Channel, party: int, y: np.ndarray, r: np.ndarray, width: int,
                    shift: int) -> tuple[np.ndarray, np.ndarray]:
    """The public parts of a faithful truncation of |y| < 2^(w-2) by ``shift`` on a
    w-bit ring: open u^ = y + 2^(w-2) + r mod 2^w, return P = (u^ >> shift) -
    (2^(w-2) >> shift) and s = 1 - msb_w(u^). With h = r' >> shift and
    w' = msb_w(r') 2^(w-shift) (r' = r mod 2^w, dealt), floor(y / 2^shift) + c =
    P + s w' - h over the integers, c in {0, 1} the dropped low carry: u + r' wraps
    2^w exactly when msb_w(u^) = 0 and msb_w(r') = 1."""
    off = offset_w(width)
    uhat = open_value(ch, (y + off if party == 0 else y) + r, width)
    s = uhat >> np.uint64(width - 1)
    np.subtract(np.uint64(1), s, out=s)
    sh = np.uint64(shift)
    p = uhat >> sh
    p -= off >> sh
    return p, s

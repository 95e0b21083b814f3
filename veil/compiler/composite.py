"""ReLU to a stated precision: a composite minimax approximation of sign.

One polynomial cannot follow ReLU's kink closely at low degree (and a high degree costs
the levels of ``chebyshev_depth``). Following Lee, Lee, Kim and No ("Minimax
approximate sign function by composite polynomial for homomorphic comparison", IEEE
TDSC 2021; used for ReLU in Lee et al., ICML 2022), sign is approximated by a
composition p_k(...p_1(x)) of odd polynomials of small degree, each the minimax
approximation of sign on the values the previous one produces, and

    ReLU(x) = x * (1 + sign(x / B)) / 2

with B a bound of |x| (twice the calibrated range: ``approx.COMPOSITE_HEADROOM``, as an
input past B diverges through the stages): one product of two ciphertexts after the
sign.

Construction (ours, not the paper's code): stage i takes inputs whose magnitude lies in
[a_i, 1] (a_1 = 2^-bits) and solves a linear program for the odd Chebyshev series of
degree d minimising max |p(x) - 1| = t over a dense grid of [a_i, 1], subject to
0 <= p(x) <= 1 + t on [0, a_i] (the uncertain band keeps its sign and stays bounded);
dividing by 1 + t maps [a_i, 1] into [a_{i+1}, 1] with a_{i+1} = (1 - t) / (1 + t),
and stages are added until the composition is within 2^-bits of sign on
[2^-bits, 1], checked on a grid of 400,001 points. The last stage is folded into
(1 + p) / 2. The degree per stage is the one of 7, 15, 31 with the least total depth.

Error of the ReLU: at most B * 2^-bits everywhere on [-B, B] (below 2^-bits * B the
step is within [0, 1], so the error is at most |x|; above it the step is within
2^-(bits+1) of the true step). Measured fits: 8 bits, three stages of degree 15
(depth 12); 10 bits, three of degree 31 (depth 15).
"""
from __future__ import annotations

import functools

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import CompileError

STAGE_DEGREES = (7, 15, 31)
MAX_STAGES = 8
MIN_BITS, MAX_BITS = 4, 14
_GRID = 3000


def _stage(a: float, degree: int) -> tuple[np.ndarray, float]:
    """Odd Chebyshev series of ``degree``, minimax for sign on [a, 1] (see the module
    docstring), divided by 1 + t; returns (coefficients, t)."""
    from scipy.optimize import linprog

    odd = np.arange(1, degree + 1, 2)
    near = a + (1 - a) * (1 - np.cos(np.linspace(0, np.pi, _GRID))) / 2
    x1 = np.unique(np.concatenate([np.linspace(a, 1, _GRID), near]))
    x0 = np.linspace(0, a, _GRID // 3)
    basis = np.eye(degree + 1)[odd]
    t1 = np.stack([chebyshev.chebval(x1, b) for b in basis], 1)
    t0 = np.stack([chebyshev.chebval(x0, b) for b in basis], 1)
    one1, one0 = np.ones((len(x1), 1)), np.ones((len(x0), 1))
    a_ub = np.block([[t1, -one1], [-t1, -one1], [t0, -one0], [-t0, 0 * one0]])
    b_ub = np.concatenate([np.ones(len(x1)), -np.ones(len(x1)), np.ones(len(x0)),
                           np.zeros(len(x0))])
    cost = np.zeros(len(odd) + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, method="highs",
                  bounds=[(None, None)] * len(odd) + [(0, None)])
    if res.status != 0:
        raise CompileError(f"the minimax fit of sign on [{a:.3g}, 1] failed: {res.message}")
    coeffs = np.zeros(degree + 1)
    coeffs[odd] = res.x[:-1]
    t = float(res.x[-1])
    return coeffs / (1 + t), t


def _sign_error(stages: list[np.ndarray], bits: int) -> float:
    x = np.linspace(-1, 1, 400001)
    y = x
    for c in stages:
        y = chebyshev.chebval(y, c)
    far = np.abs(x) >= 2.0 ** -bits
    return float(np.max(np.abs(y[far] - np.sign(x[far]))))


def _stages(bits: int, degree: int) -> tuple[list[np.ndarray], float]:
    a, stages, err = 2.0 ** -bits, [], 1.0
    while len(stages) < MAX_STAGES:
        c, t = _stage(a, degree)
        stages.append(c)
        a = (1 - t) / (1 + t)
        err = _sign_error(stages, bits)
        if err <= 2.0 ** -bits:
            return stages, err
    return stages, err


@functools.lru_cache(maxsize=16)
def sign_stages(bits: int) -> tuple[tuple[tuple[float, ...], ...], float]:
    """Chebyshev coefficients (on [-1, 1]) of the stages of sign to ``bits`` bits, the
    last folded into a step (1 + p) / 2, and the measured max sign error."""
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise CompileError(f"relu_bits must be between {MIN_BITS} and {MAX_BITS}, "
                           f"got {bits}")
    best = None
    for degree in STAGE_DEGREES:
        stages, err = _stages(int(bits), degree)
        if err > 2.0 ** -bits:
            continue
        depth = len(stages) * int(np.ceil(np.log2(degree + 1)))
        if best is None or depth < best[0]:
            best = (depth, stages, err)
    if best is None:
        raise CompileError(f"no composite of up to {MAX_STAGES} stages reaches {bits} bits")
    stages = [np.array(c) for c in best[1]]
    stages[-1] = stages[-1] / 2
    stages[-1][0] += 0.5
    return tuple(tuple(float(v) for v in c) for c in stages), best[2]

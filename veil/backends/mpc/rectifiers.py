"""Leaky rectifiers on shares: the MPC kernels of LEAKYRELU, PRELU and ELU, registered in
:data:`veil.backends.mpc.evaluator.KERNELS` like every other op.

Each is built from protocols the evaluator already has: the ReLU (exact, but for the
comparison's band: it says ``x >= 0`` for x in [-2^-17, 0) real at f = 20, see
``protocols.CMP_DROP``), a truncation (faithful: off by less than 2^-f) and, for ELU,
the exponential chain of softmax (``nonlinear._exp_nonpositive``). The weights (slopes,
alpha) are public, as every weight is in this mode. Constructions and error bounds
against the reference kernels (``tests/test_onedim.py`` measures them over a range
wider than any calibrated one, fixed point included):

- LEAKYRELU(x) = a x + (1 - a) ReLU(x) (the identity max(x, 0) + a min(x, 0) with
  min(x, 0) = x - ReLU(x)): one ReLU, then A x + (2^f - A) ReLU(x) at 2f bits, A the
  slope rounded to f bits (the two coefficients add up to 2^f exactly, so x >= 0 comes
  out as x), and one truncation. Error at most 2^-f (the truncation)
  + 2^-(f+1) |min(x, 0)| (the slope's rounding) + (1 - a) 2^-17 (the band):
  :func:`leaky_bound`, 1.6e-5 at |x| <= 16 and a = 0.01.
- PRELU: the same with the public slope of each channel (or the one slope).
- ELU(x) = ReLU(x) + alpha (exp(min(x, 0)) - 1), min(x, 0) = x - ReLU(x) <= 0: one
  ReLU, then ``_exp_nonpositive`` (a coarse clamp at -16, letting d down to -17
  through, where exp is below 1.2e-7, and ``chains.exp_chain``, p(z)^2 for a
  degree-12 fit p of exp(d/2): within 1.2e-6 of exp(d) as a float formula and, for
  d <= 0, within 17 2^-f of that formula in fixed point, ``tests/test_mpc_core.py``),
  then alpha times exp - 1 (one truncation unless alpha = 1). Error at most
  alpha (1.3e-6 + 1.6e-5 + 2^-(f+1)) + 2^-f + (1 + alpha) 2^-17 (the band, where d
  comes out 0 instead of x): :func:`elu_bound`, 3.4e-5 at alpha = 1.
"""
from __future__ import annotations

import numpy as np

from ...ir import Op
from .evaluator import Kernel, Run, Step, _scaled
from .chains import EXP_FIT_ERROR
from .nonlinear import EXP_CLAMP, _exp_nonpositive, exp_steps

#: the comparisons' band (``protocols.CMP_DROP`` at f = 20): ReLU(x) = x there
BAND = 2.0 ** -17
#: the exponential's error as a float formula over d <= 0 (the fit, and exp(-16) where
#: the clamp holds d) and in fixed point (``chains.exp_chain``'s bound at e <= 1)
EXP_FORMULA_ERROR = EXP_FIT_ERROR + float(np.exp(-EXP_CLAMP))
EXP_CHAIN_ERROR = 17 * 2.0 ** -20


def leaky_bound(slope: float, x_max: float, frac_bits: int = 20) -> float:
    """The largest error of LEAKYRELU / PRELU on shares for |x| <= ``x_max``."""
    return 2.0 ** -frac_bits + 2.0 ** -(frac_bits + 1) * x_max + abs(1.0 - slope) * BAND


def elu_bound(alpha: float, frac_bits: int = 20) -> float:
    """The largest error of ELU on shares, over every x the comparisons take."""
    alpha = abs(alpha)
    return alpha * (EXP_FORMULA_ERROR + EXP_CHAIN_ERROR + 2.0 ** -(frac_bits + 1)) \
        + 2.0 ** -frac_bits + (1.0 + alpha) * BAND


def _slopes(run: Run, node, rank: int) -> np.ndarray:
    """The slope(s) in fixed point, shaped to broadcast against batched values."""
    if node.op is Op.LEAKYRELU:
        return _scaled(float(node.attrs["alpha"]), run.f)
    a = run.prog.param(node, "slope", run.f)
    return a.reshape((1, -1) + (1,) * (rank - 2)) if a.size > 1 else a.reshape(())


def _leaky_steps(prog, node):
    n = prog.size(node)
    return [Step("relu", n), Step("trunc", n)]


def _leaky(run: Run, node, args):
    """a x + (1 - a) ReLU(x): one ReLU and one truncation (the module docstring)."""
    x = args[0]
    r = run.relu(x)
    a = _slopes(run, node, x.ndim)
    one = np.uint64(1) << np.uint64(run.f)
    rest = np.subtract(one, a, dtype=np.uint64)    # mod 2^64 (a < 0 wraps, as meant)
    return run.trunc(np.ascontiguousarray(x * a + r * rest))


def _elu_alpha(node) -> float:
    return float(node.attrs["alpha"])


def _elu_steps(prog, node):
    n, f = prog.size(node), prog.frac_bits
    steps = [Step("relu", n)] + exp_steps(n, f)
    return steps + ([] if _elu_alpha(node) == 1.0 else [Step("trunc", n)])


def _elu(run: Run, node, args):
    """ReLU(x) + alpha (exp(x - ReLU(x)) - 1) (the module docstring)."""
    x = args[0]
    r = run.relu(x)
    e = _exp_nonpositive(run, x - r)
    em1 = e - run.public(np.uint64(1) << np.uint64(run.f))
    alpha = _elu_alpha(node)
    if alpha == 1.0:
        return r + em1
    return r + run.trunc(np.ascontiguousarray(em1 * _scaled(alpha, run.f)))


KERNELS = {
    Op.LEAKYRELU: Kernel(_leaky_steps, _leaky),
    Op.PRELU: Kernel(_leaky_steps, _leaky),
    Op.ELU: Kernel(_elu_steps, _elu),
}

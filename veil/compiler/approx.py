"""Activation approximation: Chebyshev fits on ranges measured on calibration data.

Each activation's input range is measured on the calibration batch *after* the
activations before it have been replaced, so every fit sees the values the
encrypted model will actually feed it. The range is widened by a safety margin
and always contains 0 (padding slots of a ciphertext hold zeros; see
``veil.compiler.plan``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import CompileError
from ..ir import ACTIVATIONS, Graph, Node, Op, activation_fn, cheb_eval, eval_node
from ..ir.interpreter import ELEMENTWISE
from .composite import sign_stages
from .passes import PassNote

DEFAULT_DEGREE = 27       # the largest degree at OpenFHE's depth 5 (Paterson-Stockmeyer)
DEFAULT_MARGIN = 0.1      # widen the measured range by 10% of its width on each side
# A composite ReLU's sign stages multiply their degrees (15^3 for 8 bits): an input past
# its bound leaves [-1, 1] after the first stage and the later ones blow it up, so the
# bound is this many times the calibrated range (test images of ResNet-20 reach past the
# range 64 calibration images give); the stated error is relative to the bound.
COMPOSITE_HEADROOM = 2.0
# SQUARE is a degree-2 polynomial: fitting it is exact, so it never needs a higher degree.
EXACT_DEGREE = {Op.SQUARE: 2}


@dataclass(frozen=True)
class ActivationReport:
    """How one activation was approximated."""

    node: str
    function: str
    degree: int
    lo: float
    hi: float
    observed_lo: float
    observed_hi: float
    max_abs_error: float      # |poly - f| max over the calibration inputs
    max_abs_error_range: float  # |poly - f| max over a dense grid of [lo, hi]
    stages: tuple[int, ...] = ()  # composite ReLU: the degree of each sign stage


def fit_chebyshev(op, lo: float, hi: float, degree: int) -> np.ndarray:
    """Chebyshev coefficients (numpy convention, on [-1, 1]) over [lo, hi] of ``op``:
    an activation Op (default attributes), a Node, or a function of x."""
    fn = (activation_fn(op) if isinstance(op, Node)
          else op if callable(op) and not isinstance(op, Op) else ELEMENTWISE[Op(op)])
    mid, half = (hi + lo) / 2.0, (hi - lo) / 2.0
    coeffs = chebyshev.chebinterpolate(lambda t: fn(mid + half * t), degree)
    return np.asarray(coeffs, dtype=np.float64)


def _range(values: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    obs_lo, obs_hi = float(values.min()), float(values.max())
    lo, hi = min(obs_lo, 0.0), max(obs_hi, 0.0)
    width = max(hi - lo, 1e-3)
    return lo - margin * width, hi + margin * width, obs_lo, obs_hi


def approximate_activations(graph: Graph, calibration: np.ndarray, *,
                            degree: int | dict[str, int] = DEFAULT_DEGREE,
                            margin: float = DEFAULT_MARGIN, relu_bits: int | None = None,
                            ) -> tuple[Graph, list[ActivationReport]]:
    """Replace every activation by a POLY node fitted on the calibration data.

    Args:
        graph: a graph without MAXPOOL2D (run ``replace_maxpool`` first).
        calibration: batch (B, *input_shape) representative of real inputs.
        degree: one degree for all activations, or a dict node name -> degree.
        margin: fraction of the measured range added on both sides.
        relu_bits: approximate each ReLU to this many bits of its calibrated bound by
            a composite minimax sign and one product (:mod:`.composite`) instead of
            one Chebyshev fit of ``degree``.

    Returns:
        The new graph and one report per replaced activation.
    """
    g, reports, _ = _approximate(graph, calibration, degree, margin, relu_bits)
    return g, reports


def _approximate(graph: Graph, calibration: np.ndarray, degree, margin, relu_bits=None):
    """The fit, plus (min, max) of every value of the new graph on the calibration
    batch. One forward pass; each value is dropped after its last reader."""
    if margin < 0:
        raise CompileError("margin must be >= 0")
    values = {graph.input.name: np.asarray(calibration, dtype=np.float64)}
    last = {s: i for i, n in enumerate(graph.nodes) for s in n.inputs}
    extents = {graph.input.name: (float(calibration.min()), float(calibration.max()))}
    out: list[Node] = [graph.input]
    reports: list[ActivationReport] = []
    for i, node in enumerate(graph.nodes[1:], start=1):
        args = [values[s] for s in node.inputs]
        if node.op is Op.RELU and relu_bits is not None:
            chain, report, stage_values, value = _composite_relu(node, args[0],
                                                                 int(relu_bits), margin)
            reports.append(report)
            out.extend(chain[:-1])
            for step, v in zip(chain, stage_values):
                extents[step.name] = (float(v.min()), float(v.max()))
            node = chain[-1]
        elif node.op in ACTIVATIONS:
            node, report, value = _fit(node, args[0], degree, margin)
            reports.append(report)
        else:
            value = eval_node(node, args)
        values[node.name] = value
        extents[node.name] = (float(value.min()), float(value.max()))
        out.append(node)
        for s in node.inputs:
            if last.get(s) == i and s != graph.output:
                values.pop(s, None)
    return graph.with_nodes(out), reports, extents


def _fit(node: Node, x: np.ndarray, degree, margin):
    """(POLY node, its report, its value on ``x``) for one activation node."""
    deg = degree.get(node.name, DEFAULT_DEGREE) if isinstance(degree, dict) else degree
    deg = EXACT_DEGREE.get(node.op, int(deg))
    if deg < 1:
        raise CompileError(f"polynomial degree for {node.name!r} must be >= 1")
    lo, hi, obs_lo, obs_hi = _range(x, margin)
    fn = activation_fn(node)
    coeffs = fit_chebyshev(fn, lo, hi, deg)
    poly = node.replace(op=Op.POLY, attrs={"coeffs": tuple(coeffs.tolist()),
                                           "lo": lo, "hi": hi, "source": node.op.value})
    # The POLY node's value on x, computed once: the report's error and the next fit's
    # input both read it.
    approx = cheb_eval(x, poly.attrs["coeffs"], lo, hi)
    grid = np.linspace(lo, hi, 4001)
    report = ActivationReport(
        node.name, node.op.value, deg, lo, hi, obs_lo, obs_hi,
        float(np.max(np.abs(approx - fn(x)))),
        float(np.max(np.abs(cheb_eval(grid, coeffs, lo, hi) - fn(grid)))))
    return poly, report, approx


def _composite_relu(node: Node, x: np.ndarray, bits: int, margin: float):
    """(the chain of nodes replacing ReLU ``node``: sign stages then one product, its
    report, the stages' values on ``x``, the chain's value on ``x``); see
    :mod:`.composite`. The product keeps the node's name, so every reader of the ReLU
    reads it."""
    lo, hi, obs_lo, obs_hi = _range(x, margin)
    bound = COMPOSITE_HEADROOM * max(abs(lo), abs(hi))
    stages, _ = sign_stages(bits)
    signs, src = [], node.inputs[0]
    for i, coeffs in enumerate(stages):
        lo_i, hi_i = (-bound, bound) if i == 0 else (-1.0, 1.0)
        signs.append(Node(f"{node.name}/sign{i}", Op.POLY, (src,), node.shape,
                          {"coeffs": coeffs, "lo": lo_i, "hi": hi_i, "source": "sign"}))
        src = signs[-1].name

    def through(v: np.ndarray) -> list[np.ndarray]:     # each stage's value on v
        out = []
        for step in signs:
            v = cheb_eval(v, step.attrs["coeffs"], step.attrs["lo"], step.attrs["hi"])
            out.append(v)
        return out

    stage_values = through(x)
    chain = signs + [Node(node.name, Op.MUL, (node.inputs[0], src), node.shape)]
    approx = x * stage_values[-1]
    grid = np.linspace(-bound, bound, 4001)
    g = through(grid)[-1]
    relu = activation_fn(node)
    report = ActivationReport(
        node.name, node.op.value, max(len(c) - 1 for c in stages), -bound, bound, obs_lo,
        obs_hi, float(np.max(np.abs(approx - relu(x)))),
        float(np.max(np.abs(grid * g - relu(grid)))), tuple(len(c) - 1 for c in stages))
    return chain, report, stage_values, approx


def approximate(graph: Graph, *, calibration: np.ndarray,
                degree: int | dict[str, int] = DEFAULT_DEGREE,
                margin: float = DEFAULT_MARGIN,
                relu_bits: int | None = None) -> tuple[Graph, PassNote]:
    """:func:`approximate_activations` as a target pass. The note's ``data`` holds the
    fit reports (``reports``) and every value's calibrated (min, max) (``extents``)."""
    g, reports, extents = _approximate(graph, calibration, degree, margin, relu_bits)
    return g, PassNote("approximate_activations", data={"reports": reports,
                                                         "extents": extents})

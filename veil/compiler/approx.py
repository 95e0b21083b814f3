"""Activation approximation: Chebyshev fits on ranges measured on calibration data.

Each activation's input range is measured on the calibration batch *after* the
activations before it have been replaced, so every fit sees the values the
encrypted model will actually feed it. The range is widened by a safety margin
and always contains 0 (padding slots of a ciphertext hold zeros; see
``veil.compiler.plan``).

Each activation gets its own degree: the smallest of the degrees that use a Chebyshev
depth fully (:data:`~.params.FULL_DEPTH_DEGREES`: 1, 2, 5, 13, 27) whose fit stays within
2^-``activation_bits`` of the activation's output span over the widened range, at most
:data:`DEFAULT_DEGREE` (what every activation got before, so no model gets deeper). A
sigmoid on [-3, 3] needs degree 5 (3 levels) where 27 cost 5; a ReLU's kink keeps it at
27 (its interpolant's error falls only as 1/degree: 1.8 % of its span at 27). An
approximation still worse than :data:`WARN_ERROR_FRACTION` of its span is reported with
an :class:`~veil.errors.ApproximationWarning` that the caller emits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import ApproximationWarning, CompileError
from ..ir import ACTIVATIONS, Graph, Node, Op, activation_fn, cheb_eval, eval_node
from ..ir.interpreter import ELEMENTWISE
from .composite import sign_stages
from .params import FULL_DEPTH_DEGREES
from .passes import PassNote

# The largest degree at OpenFHE's depth 5 (Paterson-Stockmeyer), and the cap of the
# per-activation choice: the one degree every activation had before that choice existed.
DEFAULT_DEGREE = 27
# Default target of the choice: max error within 2^-8 of the activation's output span
# over its widened range, i.e. below an 8-bit quantisation step of that output, which
# trained networks tolerate without measurable accuracy loss (int8 inference), and far
# above CKKS's own noise (2^-15 or less relative to the output, params.py), so the fit,
# not the encryption, sets the accuracy; the same 8 bits as ``relu_bits``' usual choice.
DEFAULT_ACTIVATION_BITS = 8
# A fit whose max error over its range exceeds this fraction of the activation's output
# span gets an ApproximationWarning (a degree-27 ReLU on a symmetric range: 1.8 %; a
# sigmoid on [-44, 41]: 15 %).
WARN_ERROR_FRACTION = 0.05
GRID_POINTS = 4001        # the dense grid of [lo, hi] every error over a range is taken on
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
    output_span: float = 0.0      # max - min of f over the grid of [lo, hi]
    # the max error over [lo, hi] the degree was chosen for (activation_bits, or
    # relu_bits for a composite ReLU); None where the caller gave the degree
    target: float | None = None

    @property
    def relative_error(self) -> float:
        """``max_abs_error_range`` as a fraction of ``output_span``."""
        if self.output_span > 0:
            return self.max_abs_error_range / self.output_span
        return 0.0 if self.max_abs_error_range <= _noise(0.0) else float("inf")


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


def _noise(magnitude: float) -> float:
    """An error this small is float64 rounding of values of ``magnitude``, not a fit's."""
    return 64 * np.finfo(np.float64).eps * max(1.0, magnitude)


def approximate_activations(graph: Graph, calibration: np.ndarray, *,
                            degree: int | dict[str, int] | None = None,
                            activation_bits: int | None = DEFAULT_ACTIVATION_BITS,
                            margin: float = DEFAULT_MARGIN, relu_bits: int | None = None,
                            ) -> tuple[Graph, list[ActivationReport]]:
    """Replace every activation by a POLY node fitted on the calibration data.

    Args:
        graph: a graph without MAXPOOL2D (run ``replace_maxpool`` first).
        calibration: batch (B, *input_shape) representative of real inputs.
        degree: one degree for all activations, or a dict node name -> degree for some
            of them; the others get the smallest degree that meets ``activation_bits``.
        activation_bits: the degree of an activation ``degree`` does not set is the
            smallest of :data:`~.params.FULL_DEPTH_DEGREES`, up to
            :data:`DEFAULT_DEGREE`, whose max error over the widened range is within
            2^-activation_bits of the activation's output span there; None: always
            :data:`DEFAULT_DEGREE`.
        margin: fraction of the measured range added on both sides.
        relu_bits: approximate each ReLU to this many bits of its calibrated bound by
            a composite minimax sign and one product (:mod:`.composite`) instead of
            one Chebyshev fit.

    Returns:
        The new graph and one report per replaced activation.

    Raises:
        CompileError: a degree below 1, ``activation_bits`` below 1, a negative margin,
            or a ``degree`` dict naming a node that is not an activation.
    """
    g, reports, _ = _approximate(graph, calibration, degree, margin, relu_bits,
                                 activation_bits)
    return g, reports


def _check_options(graph: Graph, degree, activation_bits, margin) -> None:
    if margin < 0:
        raise CompileError("margin must be >= 0")
    if activation_bits is not None and int(activation_bits) < 1:
        raise CompileError(f"activation_bits must be >= 1, got {activation_bits}")
    if isinstance(degree, dict):
        names = {n.name for n in graph.nodes if n.op in ACTIVATIONS}
        odd = sorted(set(degree) - names)
        if odd:
            raise CompileError(f"degree names {odd}, which are not activations of this "
                               f"model; its activations: {sorted(names)}")


def _approximate(graph: Graph, calibration: np.ndarray, degree, margin, relu_bits=None,
                 activation_bits=DEFAULT_ACTIVATION_BITS):
    """The fit, plus (min, max) of every value of the new graph on the calibration
    batch. One forward pass; each value is dropped after its last reader."""
    _check_options(graph, degree, activation_bits, margin)
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
            node, report, value = _fit(node, args[0], _given_degree(node, degree),
                                       activation_bits, margin)
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


def _given_degree(node: Node, degree) -> int | None:
    """The degree the caller set for ``node`` (None: choose it)."""
    if node.op in EXACT_DEGREE:
        return EXACT_DEGREE[node.op]
    given = degree.get(node.name) if isinstance(degree, dict) else degree
    if given is None:
        return None
    if int(given) < 1:
        raise CompileError(f"polynomial degree for {node.name!r} must be >= 1")
    return int(given)


def smallest_degree(fn, lo: float, hi: float, target: float,
                    cap: int = DEFAULT_DEGREE) -> int:
    """The smallest degree of :data:`~.params.FULL_DEPTH_DEGREES` below ``cap``, or
    ``cap``, whose Chebyshev interpolant of ``fn`` on [lo, hi] has a max error over
    the range of at most ``target``; ``cap`` when none has. The candidates rise one
    Chebyshev depth at a time, so the first that meets the target is the cheapest in
    levels that does."""
    grid = np.linspace(lo, hi, GRID_POINTS)
    exact = fn(grid)
    tol = max(float(target), _noise(float(np.max(np.abs(exact)))))
    for deg in [d for d in FULL_DEPTH_DEGREES if d < cap]:
        coeffs = fit_chebyshev(fn, lo, hi, deg)
        if np.max(np.abs(cheb_eval(grid, coeffs, lo, hi) - exact)) <= tol:
            return deg
    return cap


def _fit(node: Node, x: np.ndarray, given: int | None, bits: int | None, margin):
    """(POLY node, its report, its value on ``x``) for one activation node, of degree
    ``given``, or the one :func:`smallest_degree` chooses for 2^-bits of its span."""
    lo, hi, obs_lo, obs_hi = _range(x, margin)
    fn = activation_fn(node)
    grid = np.linspace(lo, hi, GRID_POINTS)
    exact = fn(grid)
    span = float(np.max(exact) - np.min(exact))
    target = None if given is not None or bits is None else span * 2.0 ** -int(bits)
    deg = (given if given is not None else DEFAULT_DEGREE if target is None
           else smallest_degree(fn, lo, hi, target))
    coeffs = fit_chebyshev(fn, lo, hi, deg)
    if target is not None:
        # a chosen degree 2 of an odd function (tanh on a symmetric range) has a zero
        # top coefficient: dropping it keeps every value and costs one level, not two
        while len(coeffs) > 2 and abs(coeffs[-1]) <= _noise(float(np.max(np.abs(exact)))):
            coeffs = coeffs[:-1]
        deg = len(coeffs) - 1
    poly = node.replace(op=Op.POLY, attrs={"coeffs": tuple(coeffs.tolist()),
                                           "lo": lo, "hi": hi, "source": node.op.value})
    # The POLY node's value on x, computed once: the report's error and the next fit's
    # input both read it.
    approx = cheb_eval(x, poly.attrs["coeffs"], lo, hi)
    report = ActivationReport(
        node.name, node.op.value, deg, lo, hi, obs_lo, obs_hi,
        float(np.max(np.abs(approx - fn(x)))),
        float(np.max(np.abs(cheb_eval(grid, coeffs, lo, hi) - exact))),
        output_span=span, target=target)
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
        float(np.max(np.abs(grid * g - relu(grid)))), tuple(len(c) - 1 for c in stages),
        output_span=bound, target=bound * 2.0 ** -bits)
    return chain, report, stage_values, approx


def approximate(graph: Graph, *, calibration: np.ndarray,
                degree: int | dict[str, int] | None = None,
                activation_bits: int | None = DEFAULT_ACTIVATION_BITS,
                margin: float = DEFAULT_MARGIN,
                relu_bits: int | None = None) -> tuple[Graph, PassNote]:
    """:func:`approximate_activations` as a target pass. The note's ``data`` holds the
    fit reports (``reports``), every value's calibrated (min, max) (``extents``) and an
    :class:`~veil.errors.ApproximationWarning` per fit worse than
    :data:`WARN_ERROR_FRACTION` of its span (``warnings``; their text is in the
    messages too, after a summary of the chosen degrees)."""
    g, reports, extents = _approximate(graph, calibration, degree, margin, relu_bits,
                                       activation_bits)
    found = [ApproximationWarning(_warning_text(r)) for r in reports
             if r.relative_error > WARN_ERROR_FRACTION]
    return g, PassNote("approximate_activations",
                       _degree_summary(reports, activation_bits) + [str(w) for w in found],
                       data={"reports": reports, "extents": extents, "warnings": found})


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _degree_summary(reports: list[ActivationReport], bits: int | None) -> list[str]:
    """One line: which activations got which chosen degree (none when none was chosen)."""
    chosen = [r for r in reports if r.target is not None and not r.stages]
    if not chosen or bits is None:
        return []
    by_degree: dict[int, list[str]] = {}
    for r in chosen:
        by_degree.setdefault(r.degree, []).append(r.node)
    parts = [f"degree {d}: {_names(names)}" for d, names in sorted(by_degree.items())]
    capped = [r.node for r in chosen if r.max_abs_error_range > r.target]
    line = (f"activation degrees chosen for a max error within 2^-{int(bits)} of each "
            f"output span (at most {DEFAULT_DEGREE}): " + "; ".join(parts))
    if capped:
        line += f"; above that target at degree {DEFAULT_DEGREE}: {_names(capped)}"
    return [line]


def _warning_text(r: ActivationReport) -> str:
    what = (f"a composite ReLU ({len(r.stages)} sign stages of degree {r.degree})"
            if r.stages else f"its degree-{r.degree} polynomial")
    advice = ("a narrower calibration range (clip or normalise the values that reach "
              "it), " + ("more relu_bits, " if r.stages else
                         "relu_bits=8 (a composite ReLU), " if r.function == "relu"
                         else "")
              + "fine-tuning with polynomial activations (veil.finetune), or running "
              "this model in mpc or tee mode, which compute activations exactly")
    return (f"activation {r.node!r} ({r.function}) on [{r.lo:.4g}, {r.hi:.4g}]: {what} "
            f"is off by up to {r.max_abs_error_range:.3g}, {100 * r.relative_error:.1f} % "
            f"of its output span {r.output_span:.3g}; HE and simulate will differ from "
            f"plain by about that much. Consider {advice}")

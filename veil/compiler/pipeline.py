"""The HE compile: the HE target's passes, run once, with a report of what each did.

The passes are :data:`veil.compiler.targets.HE`'s list. Its front stage (batch-norm
folding, max-pool replacement, calibrated polynomial fits) runs on every model and
gives the graph ``simulate`` runs and :func:`~veil.compiler.estimate.estimate_he`
prices. Its back stage (im2col, linearize, domain and quadratic folds) and the slot
plan run only when the model fits CKKS without bootstrapping and every dense matrix
is cheap to probe; otherwise the result keeps the structured graph and records why HE
cannot run it, which :meth:`CompileResult.he_plan` raises when HE is asked for. A model
deeper than a 128-bit ring holds gets bootstraps from the levels pass
(:mod:`veil.compiler.levels`), the back stage's last.

A model with ops that only the share-based modes run (a transformer: softmax, layer
norm, products of two activations, ...) still compiles: the front stage runs (GELU and
TANH get their calibrated fits), the estimate prices the transformer ops on the
calibrated ranges :func:`~veil.compiler.estimate.transformer_stats` measures, and the
back stage is skipped; ``he`` and ``simulate`` refuse it by name (``he_refusal``), while
``plain``, ``tee`` and ``mpc`` run the source graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import (BootstrapRequiredError, CompileError, DepthWarning,
                      UnsupportedOperation, VeilWarning)
from ..ir import Graph, Op, opdef, ops_for
from .approx import DEFAULT_ACTIVATION_BITS, DEFAULT_MARGIN, ActivationReport
from .estimate import HEEstimate, estimate_he, transformer_stats
from .levels import SLOT_OPS, critical_path, node_levels
from .passes import MAX_DENSE_ENTRIES, MAX_NONZEROS, PassNote, dense_chains, probe_entries
from .sparse import BUILDERS, nonzero_bound
from .plan import LAYOUTS, HEPlan, plan_he
from .targets import HE, run_passes

PASSES = HE.pass_names + ("plan_he",)
# what HE's refusal of a transformer names first (the ops that make it one)
_NAMED_FIRST = frozenset({Op.SOFTMAX, Op.MATMUL, Op.LAYERNORM})


@dataclass
class CompileResult:
    """Every graph the pipeline produced, and what it decided."""

    source: Graph            # as the frontend produced it: the `plain` reference
    polynomial: Graph        # activations replaced by polynomials
    lowered: Graph           # what `simulate` runs: the slot evaluator's graph when HE
    #                          can run the model, else the polynomial graph itself (which
    #                          simulate refuses when it holds an op HE has no kernel for)
    plan: HEPlan | None      # None when HE cannot run the model (see he_refusal)
    activations: list[ActivationReport] = field(default_factory=list)
    notes: list[PassNote] = field(default_factory=list)
    # (min, max) of every value of ``polynomial`` on the calibration batch
    extents: dict[str, tuple[float, float]] = field(default_factory=dict)
    estimate: HEEstimate | None = None
    he_refusal: tuple[type, str, dict] | None = None   # (error type, message, fields)
    # what the caller should hear about (veil.compile emits them with warnings.warn);
    # each one's text is also among the notes' messages
    warnings: list[VeilWarning] = field(default_factory=list)

    def he_plan(self) -> HEPlan:
        """The slot plan, or the typed error that says why HE cannot run this model."""
        if self.plan is None:
            kind, message, extra = self.he_refusal or (CompileError, "no HE plan", {})
            raise kind(message, **extra)
        return self.plan


def _check_calibration(graph: Graph, calibration: np.ndarray) -> None:
    if calibration.ndim < 1 or calibration.shape[1:] != graph.input_shape:
        raise CompileError(f"calibration data has per-sample shape {calibration.shape[1:]}; "
                           f"the model expects {graph.input_shape}")
    if calibration.shape[0] < 1 or not np.all(np.isfinite(calibration)):
        raise CompileError("calibration data must hold at least one finite sample")


def _refusal(poly: Graph, est: HEEstimate) -> tuple[type, str, dict] | None:
    """Why the back stage must not run on ``poly``, checked before any matrix is built:
    a chain too large to probe must be one the sparse lowering writes from its kernels,
    with no more non-zeros than it takes."""
    shapes = {n.name: n.shape for n in poly.nodes}
    for name, n_in, n_out, nodes in dense_chains(poly):
        if probe_entries(n_in, n_out) <= MAX_DENSE_ENTRIES:
            continue
        odd = next((n for n in nodes if n.op not in BUILDERS), None)
        if odd is not None:
            return (CompileError,
                    f"layer {name!r} maps {n_in} to {n_out} values through "
                    f"{odd.op.value} {odd.name!r}, which has no sparse lowering: only "
                    "convolutions, pooling, batch norms, reshapes and linear layers lower "
                    "at this size; 'simulate' and compiled.report() still work", {})
        bound = max(nonzero_bound(n, shapes[n.inputs[0]]) for n in nodes)
        if bound > MAX_NONZEROS:
            return (CompileError,
                    f"layer {name!r} maps {n_in} to {n_out} values through about {bound} "
                    f"weights, above the {MAX_NONZEROS} the HE lowering takes; 'simulate' "
                    "and compiled.report() still work", {})
    return None


RING_WARN = 4      # warn when depth sets a ring this many times what the slots need


def _depth_warning(lowered: Graph, plan: HEPlan) -> DepthWarning | None:
    """A warning when the depth, not the slots, sets the ring (or needs bootstraps);
    None under test parameters, whose ring the slots alone set."""
    params = plan.params
    # a ring up to twice what the values need is the price of any network (depth 4+
    # needs 2^14): only four times or more, or bootstrapping, is worth a warning
    if params.insecure_test_params or (params.ring_dim < RING_WARN * plan.slot_ring
                                       and not params.bootstraps):
        return None
    path = critical_path(lowered)
    acts = sorted((n for n in path if n.op in (Op.POLY, Op.SQUARE, Op.MUL)),
                  key=lambda n: -node_levels(n))
    dense = sum(node_levels(n) for n in path if n.op is Op.DENSE)

    def act(n) -> str:
        kind = n.attrs.get("source", n.op.value)
        deg = f", degree {len(n.attrs['coeffs']) - 1}" if n.op is Op.POLY else ""
        return f"{n.name!r} ({kind}{deg}: {node_levels(n)})"

    shown = ", ".join(act(n) for n in acts[:4])
    if len(acts) > 4:
        shown += (f" and {len(acts) - 4} more "
                  f"({sum(node_levels(n) for n in acts[4:])} levels)")
    boots = sum(n.op is Op.BOOTSTRAP for n in lowered.nodes)
    ring = (f"bootstrapping ({boots} bootstraps) at ring 2^{params.ring_dim.bit_length() - 1}"
            if params.bootstraps else f"ring 2^{params.ring_dim.bit_length() - 1}")
    return DepthWarning(
        f"HE depth {plan.depth} needs {ring}, where ring "
        f"2^{plan.slot_ring.bit_length() - 1} holds this model's values: every "
        f"ciphertext and key is {params.ring_dim // plan.slot_ring}x larger and slower. "
        f"The longest path spends {dense} levels in linear layers and the rest in "
        f"activations (levels each): {shown or 'none'}. To lower it: smaller activation "
        "degrees (activation_bits=, degree=), a narrower calibration range, fine-tuning "
        "to degree-2 activations (veil.finetune: 1 level each), or mpc or tee mode")


def _warned(result: CompileResult) -> CompileResult:
    """``result`` with its warnings: the passes' and the depth's (also as a note)."""
    result.warnings = [w for n in result.notes for w in n.data.get("warnings", ())]
    if result.plan is not None:
        found = _depth_warning(result.lowered, result.plan)
        if found is not None:
            result.warnings.append(found)
            result.notes.append(PassNote("plan_he", [str(found)]))
    return result


def compile_graph(graph: Graph, calibration: np.ndarray, *,
                  degree: int | dict[str, int] | None = None,
                  activation_bits: int | None = DEFAULT_ACTIVATION_BITS,
                  margin: float = DEFAULT_MARGIN,
                  insecure_test_params: bool = False, layout: str = "latency",
                  precision_bits: int | None = None,
                  relu_bits: int | None = None,
                  max_slots: int | None = None) -> CompileResult:
    """Run the HE target's passes on ``graph`` with ``calibration`` data.

    Always returns the polynomial graph and the HE cost estimate; the slot plan only
    when HE can run the model (see :class:`CompileResult`). ``degree``,
    ``activation_bits``, ``margin`` and ``relu_bits`` set the activation fits
    (:func:`~veil.compiler.approx.approximate_activations`); what the caller should be
    warned about is in the result's ``warnings`` (nothing is emitted here). A graph with ops the
    ``simulate`` target does not accept (transformers) gets the front stage and the
    estimate only, and an ``UnsupportedOperation`` refusal naming its first softmax,
    matmul or layer norm (else its first such op).

    Raises:
        CompileError: unusable calibration data or options.
    """
    calibration = np.asarray(calibration, dtype=np.float64)
    _check_calibration(graph, calibration)
    if layout not in LAYOUTS:
        raise CompileError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if max_slots is not None and (not isinstance(max_slots, int) or max_slots < 2
                                  or max_slots & (max_slots - 1)):
        raise CompileError(f"max_slots must be a power of two, got {max_slots!r}")
    # What HE's slot evaluator cannot run is refused by name when mode "he" asks for the
    # plan (``he_refusal``); the estimate prices it. Ops that simulate cannot run either
    # (transformers) skip the back stage.
    odd = [n for n in graph.nodes if n.op not in ops_for("simulate")]
    odd = next((n for n in odd if opdef(n.op).refusal), None) or next(
        (n for n in odd if n.op in _NAMED_FIRST), odd[0] if odd else None)
    options = {"calibration": calibration, "degree": degree, "margin": margin,
               "layout": layout, "relu_bits": relu_bits,
               "activation_bits": activation_bits}
    poly, front_notes = run_passes(graph, HE.front, options)
    reports = [r for n in front_notes for r in n.data.get("reports", ())]
    extents = {k: v for n in front_notes for k, v in n.data.get("extents", {}).items()}
    if odd is not None and opdef(odd.op).refusal:
        # an op HE cannot even price (a tree ensemble's exact comparisons): no estimate
        refusal = (UnsupportedOperation, f"{odd.op.value} node {odd.name!r} has no HE "
                   f"kernel: {opdef(odd.op).refusal}", {})
        note = PassNote("plan_he", [f"HE cannot run this model: {refusal[1]}"])
        return _warned(CompileResult(graph, poly, poly, None, reports,
                                     front_notes + [note], extents, None, refusal))
    if odd is not None:
        stats = transformer_stats(poly, calibration, margin=margin)
        est = estimate_he(poly, precision_bits=precision_bits, stats=stats)
        refusal = (UnsupportedOperation,
                   f"{odd.op.value} node {odd.name!r} has no HE kernel (transformer ops "
                   "run in tee and mpc); compiled.report() prices HE", {})
        note = PassNote("plan_he", [f"HE cannot run this model: {refusal[1]}"])
        return _warned(CompileResult(graph, poly, poly, None, reports,
                                     front_notes + [note], extents, est, refusal))
    est = estimate_he(poly, precision_bits=precision_bits)
    refusal = _refusal(poly, est)
    if refusal is None:
        try:
            lowered, back_notes = run_passes(poly, HE.back, {
                **options, "insecure_test_params": insecure_test_params,
                "precision_bits": precision_bits})
        except BootstrapRequiredError as exc:
            refusal = (BootstrapRequiredError, str(exc), {
                "depth": exc.depth, "max_depth": exc.max_depth,
                "bootstraps": exc.bootstraps})
        except CompileError as exc:     # a lowering past HE's limits (e.g. a chain that
            # grew past MAX_NONZEROS once a broadcast was expanded): HE refuses by name,
            # simulate and the report still work
            refusal = (type(exc), str(exc), {})
    if refusal is None:
        odd = next((n for n in lowered.nodes if n.op not in SLOT_OPS), None)
        if odd is not None:
            refusal = (CompileError, f"{odd.op.value} node {odd.name!r} has no HE kernel "
                       "yet; 'simulate' and compiled.report() still work", {})
    if refusal is not None:
        note = PassNote("plan_he", [f"HE cannot run this model: {refusal[1]}"])
        return _warned(CompileResult(graph, poly, poly, None, reports,
                                     front_notes + [note], extents, est, refusal))
    try:
        plan = plan_he(lowered, insecure_test_params=insecure_test_params, layout=layout,
                       precision_bits=precision_bits, max_slots=max_slots)
    except CompileError as exc:      # e.g. a value wider than one ciphertext
        refusal = (type(exc), str(exc), {})
        note = PassNote("plan_he", [f"HE cannot run this model: {exc}"])
        return _warned(CompileResult(graph, poly, poly, None, reports,
                                     front_notes + [note], extents, est, refusal))
    return _warned(CompileResult(graph, poly, lowered, plan, reports,
                                 front_notes + back_notes, extents, est))

"""The compiler: the ordered list of passes, run once, with a report of what each did."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CompileError
from ..ir import Graph
from .approx import DEFAULT_DEGREE, DEFAULT_MARGIN, ActivationReport, approximate_activations
from .passes import (PassNote, fold_batchnorm, fold_poly_domain, fold_quadratic,
                     im2col_first_conv, linearize, replace_maxpool)
from .plan import HEPlan, plan_he

# The order is the contract: structural rewrites, then the calibrated approximation,
# then lowering, then planning. Each step is a pure function of its inputs.
PASSES = ("fold_batchnorm", "replace_maxpool", "approximate_activations",
          "im2col_first_conv", "linearize", "fold_poly_domain", "fold_quadratic", "plan_he")


@dataclass
class CompileResult:
    """Every graph the pipeline produced, and what it decided."""

    source: Graph            # as the frontend produced it: the `plain` reference
    polynomial: Graph        # activations replaced by polynomials: what `simulate` runs
    lowered: Graph           # INPUT / GATHER / DENSE / POLY / SQUARE / ADD: what HE runs
    plan: HEPlan
    activations: list[ActivationReport] = field(default_factory=list)
    notes: list[PassNote] = field(default_factory=list)


def compile_graph(graph: Graph, calibration: np.ndarray, *,
                  degree: int | dict[str, int] = DEFAULT_DEGREE,
                  margin: float = DEFAULT_MARGIN,
                  insecure_test_params: bool = False, layout: str = "latency",
                  precision_bits: int | None = None) -> CompileResult:
    """Run :data:`PASSES` in order on ``graph`` with ``calibration`` data."""
    calibration = np.asarray(calibration, dtype=np.float64)
    if calibration.ndim < 1 or calibration.shape[1:] != graph.input_shape:
        raise CompileError(f"calibration data has per-sample shape {calibration.shape[1:]}; "
                           f"the model expects {graph.input_shape}")
    if calibration.shape[0] < 1 or not np.all(np.isfinite(calibration)):
        raise CompileError("calibration data must hold at least one finite sample")
    g, bn_note = fold_batchnorm(graph)
    g, pool_note = replace_maxpool(g)
    poly, reports = approximate_activations(g, calibration, degree=degree, margin=margin)
    # im2col spends slots on patches; the throughput layout keeps them for lanes.
    patched, col_note = (im2col_first_conv(poly) if layout == "latency"
                         else (poly, PassNote("im2col_first_conv")))
    lowered, lin_note = linearize(patched)
    lowered, dom_note = fold_poly_domain(lowered)
    lowered, quad_note = fold_quadratic(lowered)
    plan = plan_he(lowered, insecure_test_params=insecure_test_params, layout=layout,
                   precision_bits=precision_bits)
    return CompileResult(graph, poly, lowered, plan, reports,
                         [bn_note, pool_note, col_note, lin_note, dom_note, quad_note])

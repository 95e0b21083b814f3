"""Compile targets: one explicit list of passes per backend, and the ops each accepts.

A target's passes are pure ``graph -> (graph, PassNote)`` functions run in order by
:func:`lower`; a pass that needs options (calibration data, a degree, a layout) names
them as keyword-only parameters and receives exactly those from the caller's
options. What the target accepts comes from the op registry
(:func:`veil.ir.ops_for`), checked before any pass runs so a refusal names the first
offending node. The HE target is driven by :func:`veil.compiler.pipeline.compile_graph`,
which runs its two stages with a size and depth check between them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CompileError, UnsupportedOperation
from ..ir import Graph, Op, opdef, ops_for
from .approx import approximate
from .levels import place_bootstraps
from .passes import (PassNote, expand_broadcasts, fold_batchnorm, fold_poly_domain,
                     fold_matmul_scale, fold_quadratic, im2col_first_conv, linearize,
                     onehot_embeddings, replace_maxpool)

Pass = Callable[[Graph], "tuple[Graph, PassNote]"]


@dataclass(frozen=True)
class Target:
    """A backend's lowering: the passes in order, and the ops it accepts."""

    name: str
    passes: tuple[Pass, ...]
    # Where a target's graph is worth keeping mid-way: HE's first ``split`` passes give
    # the polynomial graph that ``simulate`` runs and the cost estimate reads.
    split: int | None = None

    @property
    def accepts(self) -> frozenset[Op]:
        return ops_for(self.name)

    @property
    def pass_names(self) -> tuple[str, ...]:
        return tuple(p.__name__ for p in self.passes)

    @property
    def front(self) -> tuple[Pass, ...]:
        return self.passes[:self.split]

    @property
    def back(self) -> tuple[Pass, ...]:
        return self.passes[self.split:] if self.split is not None else ()


def check_ops(graph: Graph, target: str) -> None:
    """Raise UnsupportedOperation naming the first node ``target`` cannot run."""
    accepts = ops_for(target)
    for node in graph.nodes:
        if node.op not in accepts:
            supported = sorted(t for t in opdef(node.op).targets if t != "plain")
            why = opdef(node.op).refusal
            raise UnsupportedOperation(
                f"{node.op.value} node {node.name!r} cannot run in {target!r} mode; "
                f"it runs in: {', '.join(supported) or 'plain only'}"
                + (f" ({why})" if why else ""))


# The enclave runs the plaintext model at native speed: only exact, cheap rewrites.
TEE = Target("tee", (fold_batchnorm,))
# Two parties on additive shares with public weights: affine ops stay structured (a
# convolution on shares is a local convolution), batch norms fold into them; token
# embeddings become products with the client's one-hot encoding of its ids; an
# attention's score scale moves onto its query projection.
MPC = Target("mpc", (fold_batchnorm, fold_matmul_scale, onehot_embeddings))

# CKKS: structural rewrites and the calibrated polynomial fits (the graph `simulate`
# runs), then the lowering to DENSE / POLY / SQUARE and ADD / MUL of equal shapes for
# the slot evaluator, and the levels pass.
HE = Target("he", (fold_batchnorm, replace_maxpool, approximate, im2col_first_conv,
                   expand_broadcasts, linearize, fold_poly_domain, fold_quadratic,
                   place_bootstraps), split=3)

TARGETS: dict[str, Target] = {t.name: t for t in (TEE, MPC, HE)}


def run_passes(graph: Graph, passes, options: dict[str, Any] | None = None
               ) -> tuple[Graph, list[PassNote]]:
    """Run ``passes`` in order; each gets the keyword options its signature names."""
    options = options or {}
    notes = []
    for p in passes:
        params = inspect.signature(p).parameters
        missing = [k for k, v in params.items() if v.kind is v.KEYWORD_ONLY
                   and v.default is v.empty and k not in options]
        if missing:
            raise CompileError(f"pass {p.__name__} needs {', '.join(missing)}=...")
        graph, note = p(graph, **{k: v for k, v in options.items() if k in params})
        notes.append(note)
    return graph, notes


def lower(graph: Graph, target: str, **options: Any) -> tuple[Graph, list[PassNote]]:
    """Check ``graph`` against ``target``'s ops, then run its passes in order (HE needs
    ``calibration=``; see :func:`veil.compiler.pipeline.compile_graph`)."""
    if target not in TARGETS:
        raise UnsupportedOperation(f"no lowering for target {target!r}; "
                                   f"targets: {', '.join(sorted(TARGETS))}")
    check_ops(graph, target)
    return run_passes(graph, TARGETS[target].passes, options)

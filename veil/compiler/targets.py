"""Compile targets: one explicit list of passes per backend, and the ops each accepts.

A target's passes are pure ``graph -> (graph, PassNote)`` functions run in order by
:func:`lower`; what the target accepts comes from the op registry
(:func:`veil.ir.ops_for`), checked before any pass runs so a refusal names the first
offending node. The HE target needs calibration data and has its own driver
(:mod:`veil.compiler.pipeline`), whose pass list is :data:`veil.compiler.pipeline.PASSES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedOperation
from ..ir import Graph, Op, opdef, ops_for
from .passes import PassNote, fold_batchnorm

Pass = Callable[[Graph], "tuple[Graph, PassNote]"]


@dataclass(frozen=True)
class Target:
    """A backend's lowering: the passes in order, and the ops it accepts."""

    name: str
    passes: tuple[Pass, ...]

    @property
    def accepts(self) -> frozenset[Op]:
        return ops_for(self.name)

    @property
    def pass_names(self) -> tuple[str, ...]:
        return tuple(p.__name__ for p in self.passes)


def check_ops(graph: Graph, target: str) -> None:
    """Raise UnsupportedOperation naming the first node ``target`` cannot run."""
    accepts = ops_for(target)
    for node in graph.nodes:
        if node.op not in accepts:
            supported = sorted(t for t in opdef(node.op).targets if t != "plain")
            raise UnsupportedOperation(
                f"{node.op.value} node {node.name!r} cannot run in {target!r} mode; "
                f"it runs in: {', '.join(supported) or 'plain only'}")


# The enclave runs the plaintext model at native speed: only exact, cheap rewrites.
TEE = Target("tee", (fold_batchnorm,))
# Two parties on additive shares with public weights: affine ops stay structured (a
# convolution on shares is a local convolution), batch norms fold into them.
MPC = Target("mpc", (fold_batchnorm,))

TARGETS: dict[str, Target] = {t.name: t for t in (TEE, MPC)}


def lower(graph: Graph, target: str) -> tuple[Graph, list[PassNote]]:
    """Check ``graph`` against ``target``'s ops, then run its passes in order."""
    if target not in TARGETS:
        raise UnsupportedOperation(f"no lowering for target {target!r}; "
                                   f"targets: {', '.join(sorted(TARGETS))}")
    check_ops(graph, target)
    notes = []
    for p in TARGETS[target].passes:
        graph, note = p(graph)
        notes.append(note)
    return graph, notes

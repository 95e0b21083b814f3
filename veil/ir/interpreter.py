"""The plaintext interpreter: runs a graph with the registry's reference kernels.

Every backend is tested against :func:`run`. Inputs and outputs carry a leading
batch dimension; node shapes are per sample. The semantics of each op is its
reference kernel in :mod:`veil.ir.kernels`, declared in :mod:`veil.ir.ops`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import GraphError
from .graph import Graph, Node
from .kernels import cheb_eval, gelu_fn as gelu, sigmoid_fn as sigmoid  # noqa: F401
from .ops import REGISTRY, Op, ops_with


def _unary(op: Op) -> Callable[[np.ndarray], np.ndarray]:
    kernel, defaults = REGISTRY[op].kernel, REGISTRY[op].defaults
    return lambda x: kernel([x], defaults, {})


# The activation functions with their default attributes, for fitting polynomials.
ELEMENTWISE: dict[Op, Callable[[np.ndarray], np.ndarray]] = {
    op: _unary(op) for op in ops_with("activation") | {Op.SQUARE}}


def activation_fn(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    """The elementwise function a unary activation node computes (its attrs applied)."""
    kernel = REGISTRY[node.op].kernel
    return lambda x: kernel([x], node.attrs, node.params)


def eval_node(node: Node, args: list[np.ndarray]) -> np.ndarray:
    """Apply one node to batched inputs. This is the reference semantics of ``node.op``."""
    d = REGISTRY.get(node.op)
    if d is None:
        raise GraphError(f"the interpreter has no rule for {node.op}")
    return d.kernel(args, node.attrs, node.params)


def run(graph: Graph, x: np.ndarray, *, trace: bool = False,
        observe: Callable[[str, np.ndarray], None] | None = None):
    """Run ``graph`` on a batch ``x`` of shape (B, *graph.input_shape).

    Returns the output batch, or with ``trace=True`` a dict of every node's value.
    Without ``trace``, each value is dropped after its last reader; ``observe(name,
    value)`` sees every value (the input's first) before that.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1:] != graph.input_shape:
        raise GraphError(f"interpreter input has per-sample shape {x.shape[1:]}, "
                         f"graph expects {graph.input_shape}")
    last = {}
    for i, node in enumerate(graph.nodes):
        for s in node.inputs:
            last[s] = i
    values: dict[str, np.ndarray] = {graph.input.name: x}
    if observe is not None:
        observe(graph.input.name, x)
    for i, node in enumerate(graph.nodes[1:], start=1):
        values[node.name] = eval_node(node, [values[s] for s in node.inputs])
        if observe is not None:
            observe(node.name, values[node.name])
        if not trace:
            for s in set(node.inputs):       # a node may read one value twice
                if last[s] == i and s != graph.output:
                    del values[s]
    return values if trace else values[graph.output]

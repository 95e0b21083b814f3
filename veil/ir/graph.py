"""veil's intermediate representation: frozen nodes, graphs and their verifier.

Shapes are per sample (no batch dimension). A graph is a tuple of nodes in
topological order with one input and one output. The executable definition of
every op lives in the registry (:mod:`veil.ir.ops`), its kernels in
:mod:`veil.ir.kernels`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse as sp

from ..errors import GraphError
from .ops import REGISTRY, Op, opdef, ops_with, with_defaults


# Derived from the registry's traits; kept for the passes that ask by name.
ACTIVATIONS = ops_with("activation") | {Op.SQUARE}
AFFINE_OPS = ops_with("affine")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class Node:
    """One operation. ``shape`` is the per-sample output shape."""

    name: str
    op: Op
    inputs: tuple[str, ...]
    shape: tuple[int, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", opdef(self.op).op)
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "attrs", MappingProxyType(
            {k: _freeze(v) for k, v in with_defaults(self.op, dict(self.attrs)).items()}))
        frozen = {}
        for key, arr in dict(self.params).items():
            if sp.issparse(arr):
                frozen[key] = _frozen_sparse(arr)
                continue
            # an owned, read-only float64 array (another node's, or one handed over
            # frozen by a loader) is shared as it is: copying it would only double a
            # big model's weights in memory (node.replace, loading VGG-16's 1.1 GB)
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64
                    and arr.flags.owndata and not arr.flags.writeable):
                arr = np.array(arr, dtype=np.float64, copy=True)
                arr.setflags(write=False)
            frozen[key] = arr
        object.__setattr__(self, "params", MappingProxyType(frozen))

    def replace(self, **changes: Any) -> "Node":
        data = dict(name=self.name, op=self.op, inputs=self.inputs, shape=self.shape,
                    attrs=dict(self.attrs), params=dict(self.params))
        data.update(changes)
        return Node(**data)


def _frozen_sparse(m) -> "sp.csr_array":
    """A CSR float64 matrix with sorted indices and read-only arrays (shared as it is
    when it already is one: a large layer's matrix is hundreds of MiB)."""
    if not (isinstance(m, sp.csr_array) and m.dtype == np.float64
            and not m.data.flags.writeable):
        m = sp.csr_array(m, dtype=np.float64, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        for part in (m.data, m.indices, m.indptr):
            part.setflags(write=False)
    return m


@dataclass(frozen=True)
class Graph:
    """A verified DAG of nodes in topological order.

    ``head`` (:class:`veil.ir.head.Head`) is what the client computes from the output
    (a classifier's final softmax, its labels); the interpreter and every backend run
    the graph up to :attr:`output` only. None: the output is the model's output.
    """

    nodes: tuple[Node, ...]
    output: str
    head: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        verify(self)
        if self.head is not None:
            from .head import Head, check_head

            if not isinstance(self.head, Head):
                raise GraphError(f"a graph's head is a Head, not {type(self.head).__name__}")
            check_head(self.head, self.output_shape)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.node(self.output).shape

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"no node named {name!r}")

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def with_nodes(self, nodes: Iterable[Node], output: str | None = None) -> "Graph":
        """The same model with other nodes (a pass's result, which computes the same
        output): the head stays."""
        return Graph(tuple(nodes), output or self.output, self.head)

    def ops(self) -> list[Op]:
        return [n.op for n in self.nodes]


def infer_shape(op: Op, in_shapes: list[tuple[int, ...]], attrs: Mapping[str, Any],
                params: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Output shape of ``op`` applied to inputs of ``in_shapes``; raises GraphError."""
    d = opdef(op)
    try:
        return tuple(int(s) for s in d.shape(list(in_shapes), with_defaults(d.op, attrs),
                                               params))
    except (KeyError, TypeError, IndexError) as exc:
        raise GraphError(f"{d.op.value}: malformed attributes or parameters ({exc!r})") \
            from None


def verify(graph: Graph) -> None:
    """Check names, arity, topological order, parameters and shapes; raise GraphError."""
    if not graph.nodes or graph.nodes[0].op is not Op.INPUT:
        raise GraphError("a graph starts with exactly one INPUT node")
    seen: dict[str, Node] = {}
    for node in graph.nodes:
        if node.name in seen:
            raise GraphError(f"duplicate node name {node.name!r}")
        if node.op is Op.INPUT and seen:
            raise GraphError("only one INPUT node is supported")
        d = REGISTRY[node.op]
        if (len(node.inputs) != d.arity) if d.arity is not None else not node.inputs:
            raise GraphError(f"{node.op.value} node {node.name!r} takes "
                             f"{d.arity if d.arity is not None else 'one or more'} inputs, "
                             f"has {len(node.inputs)}")
        for src in node.inputs:
            if src not in seen:
                raise GraphError(f"node {node.name!r} reads {src!r} before it is defined")
        for key in d.params:
            if key not in node.params:
                raise GraphError(f"{node.op.value} node {node.name!r} lacks parameter {key!r}")
        for key, arr in node.params.items():
            if not np.all(np.isfinite(arr.data if sp.issparse(arr) else arr)):
                raise GraphError(f"parameter {key!r} of node {node.name!r} is not finite")
        shape = infer_shape(node.op, [seen[s].shape for s in node.inputs], node.attrs,
                            node.params)
        if shape != node.shape:
            raise GraphError(f"node {node.name!r} declares shape {node.shape}, "
                             f"its inputs give {shape}")
        seen[node.name] = node
    if graph.output not in seen:
        raise GraphError(f"graph output {graph.output!r} is not a node")


def make_node(name: str, op: Op, inputs: Iterable[str], in_shapes: list[tuple[int, ...]],
              attrs: Mapping[str, Any] | None = None,
              params: Mapping[str, np.ndarray] | None = None) -> Node:
    """Build a node, inferring its output shape from its input shapes."""
    attrs = {k: _freeze(v) for k, v in dict(attrs or {}).items()}
    # No float64 conversion here: Node makes its own float64 copy, and converting first
    # would hold two copies of a large weight at once (VGG-16's fc6: 2 x 0.8 GB).
    params = {k: v if sp.issparse(v) else np.asarray(v)
              for k, v in dict(params or {}).items()}
    shape = infer_shape(Op(op), in_shapes, attrs, params)
    return Node(name, Op(op), tuple(inputs), shape, attrs, params)

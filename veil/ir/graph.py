"""veil's intermediate representation: one op enum, frozen nodes, a verifier.

Shapes are per sample (no batch dimension). A graph is a tuple of nodes in
topological order with one input and one output. The executable definition of
every op lives in :mod:`veil.ir.interpreter`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import GraphError


class Op(str, enum.Enum):
    INPUT = "input"
    LINEAR = "linear"          # y = W x + b, x of shape (in,)
    CONV2D = "conv2d"          # (Ci,H,W) -> (Co,H',W'); attrs stride, padding
    BATCHNORM = "batchnorm"    # per-channel affine y = x*scale[c] + shift[c]
    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SQUARE = "square"
    AVGPOOL2D = "avgpool2d"    # attrs kernel, stride, padding (zero padding counted)
    MAXPOOL2D = "maxpool2d"    # attrs kernel, stride, padding
    GLOBALAVGPOOL = "globalavgpool"  # (C,H,W) -> (C,1,1)
    RESHAPE = "reshape"        # attrs shape
    ADD = "add"                # elementwise sum of two inputs of equal shape
    DENSE = "dense"            # lowered linear map: y = M @ x.ravel() + b, attrs shape
    POLY = "poly"              # Chebyshev series on [lo, hi]; attrs coeffs, lo, hi, source
    GATHER = "gather"          # y[i] = x.ravel()[indices[i]] (0 where index < 0)


ACTIVATIONS = frozenset({Op.RELU, Op.GELU, Op.SILU, Op.SIGMOID, Op.TANH, Op.SQUARE})
# Ops that are affine in their (single) input; the compiler lowers them to DENSE.
AFFINE_OPS = frozenset({Op.LINEAR, Op.CONV2D, Op.BATCHNORM, Op.AVGPOOL2D,
                        Op.GLOBALAVGPOOL, Op.RESHAPE, Op.DENSE})

_ARITY = {Op.INPUT: 0, Op.ADD: 2}
_PARAMS = {
    Op.LINEAR: ("weight", "bias"),
    Op.CONV2D: ("weight", "bias"),
    Op.BATCHNORM: ("scale", "shift"),
    Op.DENSE: ("matrix", "bias"),
}


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
        object.__setattr__(self, "op", Op(self.op))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "attrs", MappingProxyType(
            {k: _freeze(v) for k, v in dict(self.attrs).items()}))
        frozen = {}
        for key, arr in dict(self.params).items():
            arr = np.array(arr, dtype=np.float64, copy=True)
            arr.setflags(write=False)
            frozen[key] = arr
        object.__setattr__(self, "params", MappingProxyType(frozen))

    def replace(self, **changes: Any) -> "Node":
        data = dict(name=self.name, op=self.op, inputs=self.inputs, shape=self.shape,
                    attrs=dict(self.attrs), params=dict(self.params))
        data.update(changes)
        return Node(**data)


@dataclass(frozen=True)
class Graph:
    """A verified DAG of nodes in topological order."""

    nodes: tuple[Node, ...]
    output: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        verify(self)

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
        return Graph(tuple(nodes), output or self.output)

    def ops(self) -> list[Op]:
        return [n.op for n in self.nodes]


def infer_shape(op: Op, in_shapes: list[tuple[int, ...]], attrs: Mapping[str, Any],
                params: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    """Output shape of ``op`` applied to inputs of ``in_shapes``; raises GraphError."""
    if op is Op.INPUT:
        return tuple(attrs["shape"])
    x = in_shapes[0]
    if op is Op.LINEAR:
        w = params["weight"]
        if len(x) != 1 or x[0] != w.shape[1]:
            raise GraphError(f"linear expects input ({w.shape[1]},), got {x}")
        return (w.shape[0],)
    if op is Op.CONV2D:
        w = params["weight"]
        if len(x) != 3 or x[0] != w.shape[1]:
            raise GraphError(f"conv2d expects input ({w.shape[1]}, H, W), got {x}")
        (sh, sw), (ph, pw) = attrs["stride"], attrs["padding"]
        return (w.shape[0], (x[1] + 2 * ph - w.shape[2]) // sh + 1,
                (x[2] + 2 * pw - w.shape[3]) // sw + 1)
    if op in (Op.AVGPOOL2D, Op.MAXPOOL2D):
        if len(x) != 3:
            raise GraphError(f"{op.value} expects (C, H, W), got {x}")
        (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs["padding"]
        return (x[0], (x[1] + 2 * ph - kh) // sh + 1, (x[2] + 2 * pw - kw) // sw + 1)
    if op is Op.GLOBALAVGPOOL:
        if len(x) != 3:
            raise GraphError(f"global average pool expects (C, H, W), got {x}")
        return (x[0], 1, 1)
    if op is Op.BATCHNORM:
        if params["scale"].shape != (x[0],):
            raise GraphError(f"batchnorm has {params['scale'].shape[0]} channels, input {x}")
        return x
    if op is Op.RESHAPE:
        shape = tuple(attrs["shape"])
        if int(np.prod(shape)) != int(np.prod(x)):
            raise GraphError(f"cannot reshape {x} to {shape}")
        return shape
    if op is Op.ADD:
        if in_shapes[0] != in_shapes[1]:
            raise GraphError(f"add of mismatched shapes {in_shapes[0]} and {in_shapes[1]}")
        return x
    if op is Op.GATHER:
        idx = attrs["indices"]
        if any(i >= int(np.prod(x)) for i in idx):
            raise GraphError(f"gather index out of range for input {x}")
        return (len(idx),)
    if op is Op.DENSE:
        m = params["matrix"]
        if m.shape[1] != int(np.prod(x)) or int(np.prod(attrs["shape"])) != m.shape[0]:
            raise GraphError(f"dense {m.shape} does not map {x} to {attrs['shape']}")
        return tuple(attrs["shape"])
    if op in ACTIVATIONS or op is Op.POLY:
        return x
    raise GraphError(f"unknown op {op}")


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
        arity = _ARITY.get(node.op, 1)
        if len(node.inputs) != arity:
            raise GraphError(f"{node.op.value} node {node.name!r} takes {arity} inputs, "
                             f"has {len(node.inputs)}")
        for src in node.inputs:
            if src not in seen:
                raise GraphError(f"node {node.name!r} reads {src!r} before it is defined")
        for key in _PARAMS.get(node.op, ()):
            if key not in node.params:
                raise GraphError(f"{node.op.value} node {node.name!r} lacks parameter {key!r}")
        for key, arr in node.params.items():
            if not np.all(np.isfinite(arr)):
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
    params = {k: np.asarray(v, dtype=np.float64) for k, v in dict(params or {}).items()}
    shape = infer_shape(Op(op), in_shapes, attrs, params)
    return Node(name, Op(op), tuple(inputs), shape, attrs, params)

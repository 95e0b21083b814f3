"""Machinery shared by the frontends: a graph builder and per-sample shape helpers.

Frontends see batched tensors; the IR speaks per-sample shapes. The helpers here
translate batched shape arithmetic (flatten, reshape, reductions) into per-sample
terms and refuse anything that would mix samples of a batch.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import GraphError, UnsupportedOperation
from ..ir import Graph, Node, Op, make_node

logger = logging.getLogger(__name__)


class _Batch:
    """Type of :data:`BATCH`, the symbolic batch dimension in shape computations."""

    def __repr__(self) -> str:
        return "BATCH"


#: The (unknown) batch size, as it appears in ``x.size(0)`` or an ONNX ``Shape`` output.
BATCH = _Batch()


def unsupported(what: str, kind: str, node: str, reason: str = "") -> UnsupportedOperation:
    """An :class:`UnsupportedOperation` naming the operation ``what`` and the ``node``."""
    msg = f"unsupported operation {what} ({kind}) at node {node!r}"
    return UnsupportedOperation(f"{msg}: {reason}" if reason else msg)


@dataclass(frozen=True)
class Site:
    """Where an operation comes from: its name, its kind and the model's node name."""

    what: str
    kind: str
    node: str

    def error(self, reason: str = "") -> UnsupportedOperation:
        """An UnsupportedOperation for this site, with an optional reason."""
        return unsupported(self.what, self.kind, self.node, reason)


def pair(value: Any) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(2, 3) -> (2, 3)``, ``[4] -> (4, 4)``; raises ValueError."""
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"expected one or two integers, got {value!r}")
    return (values[0], values[1])


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dimension {dim} out of range for a tensor of rank {ndim}")
    return dim % ndim


def flatten_shape(shape: tuple[int, ...], start_dim: int, end_dim: int) -> tuple[int, ...]:
    """Per-sample shape after flattening batched dims ``start_dim..end_dim``.

    Raises ValueError when the batch dimension would be flattened.
    """
    ndim = len(shape) + 1
    start, end = _normalize_dim(start_dim, ndim), _normalize_dim(end_dim, ndim)
    if start == 0:
        raise ValueError("flattening the batch dimension mixes samples; use start_dim=1")
    if end < start:
        raise ValueError(f"end_dim {end_dim} comes before start_dim {start_dim}")
    merged = int(np.prod(shape[start - 1:end], dtype=np.int64))
    return tuple(shape[:start - 1]) + (merged,) + tuple(shape[end:])


def batch_reduce_dims(dims: Any, shape: tuple[int, ...]) -> frozenset[int]:
    """Normalize reduction dims given for the batched tensor (int or sequence)."""
    if isinstance(dims, (int, np.integer)):
        dims = (dims,)
    return frozenset(_normalize_dim(int(d), len(shape) + 1) for d in dims)


def _fill_minus_one(rest: list[int], total: int, in_shape: tuple[int, ...]) -> list[int]:
    if rest.count(-1) > 1:
        raise ValueError("more than one -1 in the target shape")
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            raise ValueError(f"cannot reshape per-sample {in_shape} to {tuple(rest)}")
        rest[rest.index(-1)] = total // known
    return rest


def per_sample_reshape(spec: Sequence[Any], in_shape: tuple[int, ...],
                       batch_aliases: Iterable[int] = ()) -> tuple[int, ...]:
    """Per-sample target of a batched reshape ``spec`` (entries int or :data:`BATCH`).

    The first entry must stand for the batch: :data:`BATCH`, one of ``batch_aliases``
    (a static batch size), or ``-1`` when the other entries already cover a whole
    sample. Raises ValueError (with the reason) otherwise.
    """
    spec = list(spec)
    if not spec:
        raise ValueError("reshaping to a scalar drops the batch dimension")
    first, rest = spec[0], spec[1:]
    if any(d is BATCH for d in rest):
        raise ValueError("the batch size may only appear as the first dimension")
    rest = [int(d) for d in rest]
    if any(d < -1 or d == 0 for d in rest):
        raise ValueError(f"invalid target dimensions {tuple(rest)}")
    total = int(np.prod(in_shape, dtype=np.int64))
    aliases = {int(a) for a in batch_aliases}
    if first is BATCH or (not isinstance(first, _Batch) and int(first) in aliases):
        rest = _fill_minus_one(rest, total, in_shape)
    elif int(first) == -1:
        if -1 in rest:
            raise ValueError("more than one -1 in the target shape")
    else:
        raise ValueError(f"the first dimension {first} hard-codes the batch size; "
                         "use x.size(0) or -1 there")
    if int(np.prod(rest, dtype=np.int64)) != total:
        raise ValueError(f"reshaping per-sample {in_shape} to {tuple(rest)} would mix "
                         "samples of a batch")
    return tuple(rest)


def per_channel(const: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The per-channel vector of a constant broadcast against a batched tensor.

    ``shape`` is the per-sample shape (channel first). Raises ValueError when the
    constant does not broadcast or varies within a channel.
    """
    c = np.asarray(const, dtype=np.float64)
    if not shape:
        raise ValueError("the value has no channel dimension")
    if c.ndim > len(shape) + 1 or (c.ndim == len(shape) + 1 and c.shape[0] != 1):
        raise ValueError(f"constant of shape {c.shape} would change the batch dimension")
    if c.ndim == len(shape) + 1:
        c = c[0]
    try:
        full = np.broadcast_to(c, shape)
    except ValueError as exc:
        raise ValueError(f"constant of shape {c.shape} does not broadcast to {shape}") from exc
    mat = full.reshape(shape[0], -1)
    if not np.all(mat == mat[:, :1]):
        raise ValueError(f"constant of shape {c.shape} varies within a channel")
    return mat[:, 0].copy()


class GraphBuilder:
    """Collects IR nodes in topological order; names are sanitized and unique."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self._nodes: list[Node] = []
        self._by_name: dict[str, Node] = {}
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input = self._append(make_node("input", Op.INPUT, (), [],
                                            {"shape": self.input_shape}))

    def _append(self, node: Node) -> str:
        self._nodes.append(node)
        self._by_name[node.name] = node
        return node.name

    def unique_name(self, raw: str) -> str:
        """A fresh node name derived from ``raw`` (non-identifier characters -> ``_``)."""
        base = re.sub(r"[^A-Za-z0-9_]+", "_", raw)
        if base != raw:  # e.g. ONNX "/conv1/Conv" -> "conv1_Conv"
            base = base.strip("_")
        base = base or "node"
        name, k = base, 1
        while name in self._by_name:
            k += 1
            name = f"{base}_{k}"
        return name

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        return self._by_name[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-sample shape of the value ``name``."""
        return self._by_name[name].shape

    def add(self, raw_name: str, op: Op, inputs: Sequence[str],
            attrs: Mapping[str, Any] | None = None,
            params: Mapping[str, np.ndarray] | None = None) -> str:
        """Append a node (shape inferred); returns its name. Raises GraphError."""
        name = self.unique_name(raw_name)
        try:
            node = make_node(name, op, inputs, [self.shape(i) for i in inputs], attrs, params)
        except GraphError as exc:
            raise GraphError(f"cannot build the {op.value} node for {raw_name!r}: {exc} "
                             f"(is input_shape {self.input_shape} the one the model "
                             "expects, without the batch dimension?)") from exc
        return self._append(node)

    def from_input(self, name: str) -> bool:
        """Whether ``name`` is the model input, or only moved out of it (slices,
        reshapes): values the client chose, such as token ids."""
        node = self.node(name)
        while node.op in (Op.SLICE, Op.RESHAPE, Op.TRANSPOSE):
            node = self.node(node.inputs[0])
        return node.op is Op.INPUT

    def affine(self, raw_name: str, x: str, scale: np.ndarray, shift: np.ndarray) -> str:
        """``x * scale[c] + shift[c]`` per channel, folded into a preceding affine node.

        A LINEAR, CONV2D or BATCHNORM producer is rebuilt under a new name with the
        constants folded in (the original stays for other consumers; unused nodes are
        pruned by :meth:`finish`). Otherwise a BATCHNORM node is added.
        """
        scale = np.asarray(scale, dtype=np.float64)
        shift = np.asarray(shift, dtype=np.float64)
        prod = self.node(x)
        # (a LINEAR over (tokens, features) has tokens as channels: no fold)
        if prod.op is Op.CONV2D or (prod.op is Op.LINEAR and len(prod.shape) == 1):
            weight = prod.params["weight"]
            w = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            b = prod.params["bias"] * scale + shift
            return self.add(raw_name, prod.op, prod.inputs, prod.attrs, {"weight": w, "bias": b})
        if prod.op is Op.BATCHNORM:
            s, t = prod.params["scale"] * scale, prod.params["shift"] * scale + shift
            return self.add(raw_name, Op.BATCHNORM, prod.inputs, {}, {"scale": s, "shift": t})
        return self.add(raw_name, Op.BATCHNORM, [x], {}, {"scale": scale, "shift": shift})

    def finish(self, output: str) -> Graph:
        """The verified graph computing ``output``, without nodes it does not need."""
        needed, stack = {self.input}, [output]
        while stack:
            name = stack.pop()
            if name not in needed:
                needed.add(name)
                stack.extend(self._by_name[name].inputs)
        dropped = len(self._nodes) - len(needed)
        if dropped:
            logger.debug("pruned %d node(s) that do not reach the output", dropped)
        return Graph(tuple(n for n in self._nodes if n.name in needed), output)

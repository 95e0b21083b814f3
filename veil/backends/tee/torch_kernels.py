"""IR -> torch: one kernel per :class:`~veil.ir.Op`, run eagerly under inference mode.

Each entry of :data:`KERNELS` takes a node and the tensor dtype and returns a function
of the node's batched input tensors; parameters are converted once, when the graph is
built. The semantics are the reference kernels' (:mod:`veil.ir.kernels`); the tests
compare every op with them. torch is imported only when an executor is built (``import
veil`` and the HTTP service never load it).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import InputError, TEEError
from ...ir import Graph, Node, Op
from .executor import build_plan

Fn = Callable[[list], object]


def import_torch():
    try:
        import torch
    except ImportError:
        raise TEEError("the 'torch' TEE runtime needs torch: pip install 'veil[torch]'") \
            from None
    return torch


def _t(torch, node: Node, name: str, dtype):
    # a writable copy: node parameters are read-only arrays, which torch warns about
    return torch.from_numpy(np.array(node.params[name], dtype=np.float64)).to(dtype)


def _conv2d(torch, node, dtype) -> Fn:
    F, a = torch.nn.functional, node.attrs
    w, b = _t(torch, node, "weight", dtype), _t(torch, node, "bias", dtype)
    kw = dict(stride=tuple(a["stride"]), padding=tuple(a["padding"]),
              dilation=tuple(a["dilation"]), groups=int(a["groups"]))
    return lambda xs: F.conv2d(xs[0], w, b, **kw)


def _linear(torch, node, dtype) -> Fn:
    w, b = _t(torch, node, "weight", dtype), _t(torch, node, "bias", dtype)
    return lambda xs: torch.nn.functional.linear(xs[0], w, b)


def _batchnorm(torch, node, dtype) -> Fn:
    shape = (1, -1) + (1,) * (len(node.shape) - 1)
    scale = _t(torch, node, "scale", dtype).reshape(shape)
    shift = _t(torch, node, "shift", dtype).reshape(shape)
    return lambda xs: torch.addcmul(shift, xs[0], scale)


def _pool(torch, node, dtype) -> Fn:
    F, a = torch.nn.functional, node.attrs
    kw = dict(kernel_size=tuple(a["kernel"]), stride=tuple(a["stride"]),
              padding=tuple(a["padding"]), ceil_mode=bool(a["ceil_mode"]))
    if node.op is Op.MAXPOOL2D:
        return lambda xs: F.max_pool2d(xs[0], **kw)
    cip = bool(a["count_include_pad"])
    return lambda xs: F.avg_pool2d(xs[0], count_include_pad=cip, **kw)


def _aligned(xs: list) -> list:
    """Per-sample ranks aligned after the batch axis (numpy broadcasting per sample)."""
    rank = max(x.dim() for x in xs)
    return [x.reshape(x.shape[:1] + (1,) * (rank - x.dim()) + x.shape[1:]) for x in xs]


def _binary(fn_name: str):
    def build(torch, node, dtype) -> Fn:
        fn = getattr(torch, fn_name)
        return lambda xs: fn(*_aligned(xs))
    return build


def _dense(torch, node, dtype) -> Fn:
    m, b = _t(torch, node, "matrix", dtype), _t(torch, node, "bias", dtype)
    shape = tuple(node.shape)
    return lambda xs: torch.nn.functional.linear(
        xs[0].reshape(xs[0].shape[0], -1), m, b).reshape((xs[0].shape[0],) + shape)


def _poly(torch, node, dtype) -> Fn:
    """Clenshaw's recurrence for the Chebyshev series on [lo, hi]."""
    a = node.attrs
    coeffs = [float(c) for c in a["coeffs"]]
    lo, hi = float(a["lo"]), float(a["hi"])

    def run(xs):
        t = (2.0 * xs[0] - (lo + hi)) / (hi - lo)
        if len(coeffs) == 1:
            return torch.full_like(t, coeffs[0])
        b1, b2 = torch.zeros_like(t), torch.zeros_like(t)
        for c in coeffs[:0:-1]:
            b1, b2 = 2.0 * t * b1 - b2 + c, b1
        return t * b1 - b2 + coeffs[0]
    return run


def _gather(torch, node, dtype) -> Fn:
    idx = np.asarray(node.attrs["indices"], dtype=np.int64)
    index = torch.from_numpy(np.where(idx < 0, 0, idx))
    keep = torch.from_numpy(idx >= 0)

    def run(xs):
        flat = xs[0].reshape(xs[0].shape[0], -1)
        return torch.where(keep, flat[:, index], torch.zeros((), dtype=flat.dtype))
    return run


def _embed(torch, node, dtype) -> Fn:
    """Rows of the table; ids that are not integers in [0, vocab) raise InputError, as
    the reference kernel (torch would fail on some and wrap negative ones)."""
    table = _t(torch, node, "table", dtype)
    vocab = table.shape[0]

    def run(xs):
        ids = xs[0]
        idx = torch.round(ids)
        # NaN and infinities fail the first test (inf - inf is NaN)
        bad = ~((ids - idx).abs() <= 1e-6) | (idx < 0) | (idx >= vocab)
        if bool(bad.any()):
            raise InputError(f"token ids must be integers in [0, {vocab})")
        return torch.nn.functional.embedding(idx.long(), table)
    return run


def _axes(x, axes) -> list[int]:
    """Per-sample axes (negative from the end) as axes of the batched tensor ``x``."""
    return sorted({int(i) % (x.dim() - 1) + 1 for i in axes})


def _slice(torch, node, dtype) -> Fn:
    a = node.attrs
    start, stop = int(a["start"]), int(a["stop"])
    return lambda xs: xs[0].narrow(_axes(xs[0], [a["axis"]])[0], start, stop - start)


def _affine(torch, node, dtype) -> Fn:
    scale = _t(torch, node, "scale", dtype)[None]
    shift = _t(torch, node, "shift", dtype)[None]
    return lambda xs: torch.addcmul(shift, xs[0], scale)


def _layernorm(torch, node, dtype) -> Fn:
    w, b = _t(torch, node, "weight", dtype), _t(torch, node, "bias", dtype)
    eps = float(node.attrs["eps"])
    return lambda xs: torch.nn.functional.layer_norm(xs[0], w.shape, w, b, eps)


def _reducesum(torch, node, dtype) -> Fn:
    axes, keep = node.attrs["axes"], bool(node.attrs["keepdims"])
    return lambda xs: xs[0].sum(dim=_axes(xs[0], axes), keepdim=keep)


def _tree_ensemble(torch, node, dtype) -> Fn:
    """The reference's path products (``kernels.tree_ensemble``) in torch: every node's
    test, each leaf's product of literals, the weighted sum."""
    p = node.params
    feature = torch.from_numpy(p["feature"].astype(np.int64))
    mode = torch.from_numpy(p["mode"].astype(np.int64))
    thr = _t(torch, node, "threshold", dtype)
    paths = p["paths"].astype(np.int64)
    index = torch.from_numpy(np.maximum(np.abs(paths) - 1, 0))
    sign = torch.from_numpy(np.sign(paths))
    w, base = _t(torch, node, "weights", dtype), _t(torch, node, "base", dtype)

    def run(xs):
        v = xs[0].reshape(xs[0].shape[0], -1)[:, feature]
        bits = torch.where(mode == 0, v <= thr, torch.where(
            mode == 1, v < thr, torch.where(mode == 2, v >= thr, v > thr))).to(w.dtype)
        b = bits[:, index]
        lit = torch.where(sign > 0, b, torch.where(sign < 0, 1 - b, torch.ones_like(b)))
        return lit.prod(dim=2) @ w + base
    return run


def _unary(expr: Callable) -> Callable:
    return lambda torch, node, dtype: (lambda xs: expr(torch, node, xs[0]))


KERNELS: dict[Op, Callable] = {
    Op.INPUT: _unary(lambda torch, n, x: x),
    Op.LINEAR: _linear,
    Op.CONV2D: _conv2d,
    Op.BATCHNORM: _batchnorm,
    Op.RELU: _unary(lambda torch, n, x: torch.relu(x)),
    Op.CLIP: _unary(lambda torch, n, x: torch.clamp(x, float(n.attrs["lo"]),
                                                    float(n.attrs["hi"]))),
    Op.GELU: _unary(lambda torch, n, x: torch.nn.functional.gelu(x)),
    Op.SILU: _unary(lambda torch, n, x: torch.nn.functional.silu(x)),
    Op.SIGMOID: _unary(lambda torch, n, x: torch.sigmoid(x)),
    Op.TANH: _unary(lambda torch, n, x: torch.tanh(x)),
    Op.HARDSIGMOID: _unary(lambda torch, n, x: torch.nn.functional.hardsigmoid(x)),
    Op.HARDSWISH: _unary(lambda torch, n, x: torch.nn.functional.hardswish(x)),
    Op.SQUARE: _unary(lambda torch, n, x: x * x),
    Op.AVGPOOL2D: _pool,
    Op.MAXPOOL2D: _pool,
    Op.GLOBALAVGPOOL: _unary(lambda torch, n, x: x.mean(dim=(2, 3), keepdim=True)),
    Op.RESHAPE: _unary(lambda torch, n, x: x.reshape((x.shape[0],) + tuple(n.attrs["shape"]))),
    Op.CONCAT: lambda torch, node, dtype: (
        lambda xs: torch.cat(xs, dim=int(node.attrs["axis"]) + 1)),
    Op.ADD: _binary("add"),
    Op.SUB: _binary("sub"),
    Op.MUL: _binary("mul"),
    Op.DENSE: _dense,
    Op.POLY: _poly,
    Op.GATHER: _gather,
    Op.EMBED: _embed,
    Op.SLICE: _slice,
    Op.TRANSPOSE: _unary(lambda torch, n, x: x.permute(0, *(int(i) + 1
                                                          for i in n.attrs["perm"]))),
    Op.AFFINE: _affine,
    Op.MATMUL: _binary("matmul"),
    Op.SOFTMAX: _unary(lambda torch, n, x: torch.softmax(x, dim=-1)),
    Op.LAYERNORM: _layernorm,
    Op.REDUCESUM: _reducesum,
    Op.RECIPROCAL: _unary(lambda torch, n, x: torch.reciprocal(x)),
    Op.TREE_ENSEMBLE: _tree_ensemble,
}


class TorchExecutor:
    """Runs ``graph`` with torch kernels in ``dtype`` ("float32" or "float64") on
    ``threads`` intra-op threads (torch's setting is per process: the enclave and the
    baseline are processes of their own)."""

    name = "torch"

    def __init__(self, graph: Graph, dtype: str = "float32", threads: int | None = None):
        torch = import_torch()
        self._torch, self.dtype = torch, dtype
        self._dt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if threads:
            torch.set_num_threads(int(threads))
        self._plan = build_plan(graph, lambda node: KERNELS[node.op](torch, node, self._dt),
                                KERNELS, "torch")

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(xs)).to(self._dt)
            y = self._plan.run(x)
            return y.to(torch.float64).numpy()

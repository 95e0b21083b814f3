"""Lowering of individual layers to IR nodes, shared by the torch and ONNX frontends.

Nothing here imports torch at module level (only :func:`module_handlers` and
:func:`to_numpy` touch torch objects). Every function takes the :class:`GraphBuilder`, the :class:`Site` it converts (for
node names and error messages) and the IR name of its tensor input, and returns
the IR name of its result. Parameters are copied out as float64 numpy arrays.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from ..ir import Op
from ._builder import GraphBuilder, Site, batch_reduce_dims, flatten_shape, pair

logger = logging.getLogger(__name__)

ModuleHandler = Callable[[GraphBuilder, Site, Any, str], str]


def to_numpy(tensor: Any) -> np.ndarray:
    """A float64 numpy copy of a torch tensor (any dtype or device)."""
    import torch

    # exactly one copy: VGG-16's first classifier layer is 0.8 GB in float64
    return tensor.detach().cpu().to(torch.float64, copy=True).numpy()


def weight_view(tensor: Any) -> np.ndarray:
    """A read-only numpy view of a float32/float64 weight (other dtypes: a float64 copy).

    Conv and linear weights go straight into IR nodes, which make their own float64
    copy; converting first would hold two float64 copies of each layer at once (1.6 GB
    for VGG-16's first classifier layer). Arithmetic on weights uses :func:`to_numpy`.
    """
    import torch

    t = tensor.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        return to_numpy(t)
    view = t.numpy()
    view.flags.writeable = False
    return view


def _float_array(site: Site, value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise site.error(f"{what} has dtype {arr.dtype}; expected numbers")
    return arr


def _pairs(site: Site, **values: Any) -> dict[str, tuple[int, int]]:
    try:
        return {key: pair(value) for key, value in values.items()}
    except (TypeError, ValueError) as exc:
        raise site.error(f"expects integer pairs, got {values}") from exc


def linear(b: GraphBuilder, site: Site, x: str, weight: np.ndarray,
           bias: np.ndarray | None) -> str:
    """``y = W x + b`` over the last axis (flat inputs, or (tokens, features))."""
    shape = b.shape(x)
    if len(shape) < 1:
        raise site.error(f"the input has per-sample shape {shape}; {site.what} needs an "
                         "axis of features")
    weight = _float_array(site, weight, "weight")  # the IR node copies it to float64
    if weight.ndim != 2:
        raise site.error(f"weight has shape {weight.shape}, expected (out, in)")
    bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return b.add(site.node, Op.LINEAR, [x], {}, {"weight": weight, "bias": bias})


def _conv_padding(site: Site, padding: Any, kernel: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        # stride is 1 here (torch enforces it); total padding k - 1 must split evenly.
        if any(k % 2 == 0 for k in kernel):
            raise site.error(f"padding='same' with kernel {kernel} pads asymmetrically; "
                             "use an odd kernel or explicit padding")
        return ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    return _pairs(site, padding=padding)["padding"]


def conv2d_module(b: GraphBuilder, site: Site, mod: Any, x: str) -> str:
    """nn.Conv2d with any groups, stride and dilation, and zero padding."""
    if mod.padding_mode != "zeros":
        raise site.error(f"padding_mode={mod.padding_mode!r}; only 'zeros' is supported")
    weight = weight_view(mod.weight)
    bias = to_numpy(mod.bias) if mod.bias is not None else None
    return conv2d(b, site, x, weight, bias, stride=mod.stride, padding=mod.padding,
                  dilation=mod.dilation, groups=mod.groups)


def conv2d(b: GraphBuilder, site: Site, x: str, weight: np.ndarray, bias: np.ndarray | None,
           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> str:
    """A 2-D cross-correlation (torch semantics): weight (Co, Ci/groups, kh, kw)."""
    weight = _float_array(site, weight, "weight")  # the IR node copies it to float64
    if weight.ndim != 4:
        raise site.error(f"weight of shape {weight.shape}; only 2-D convolution is supported")
    # an input of the wrong rank is a wrong input_shape: the shape rule's GraphError says so
    dilation = _pairs(site, dilation=dilation)["dilation"]
    kernel = tuple(weight.shape[2:])
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
    attrs = {"stride": _pairs(site, stride=stride)["stride"],
             "padding": _conv_padding(site, padding, span), "dilation": dilation,
             "groups": int(groups)}
    bias = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return b.add(site.node, Op.CONV2D, [x], attrs, {"weight": weight, "bias": bias})


def batchnorm_module(b: GraphBuilder, site: Site, mod: Any, x: str,
                     ranks: tuple[int, ...]) -> str:
    """Eval-mode batch norm folded to ``x * scale + shift`` per channel.

    ``ranks`` lists the per-sample input ranks the layer accepts.
    """
    if mod.running_mean is None or mod.running_var is None:
        raise site.error("track_running_stats=False uses batch statistics at inference; "
                         "veil needs running statistics")
    if len(b.shape(x)) not in ranks:
        raise site.error(f"input has per-sample shape {b.shape(x)}")
    mean, var = to_numpy(mod.running_mean), to_numpy(mod.running_var)
    n = mean.shape[0]
    gamma = to_numpy(mod.weight) if mod.weight is not None else np.ones(n)
    beta = to_numpy(mod.bias) if mod.bias is not None else np.zeros(n)
    scale = gamma / np.sqrt(var + float(mod.eps))
    shift = beta - mean * scale
    return b.add(site.node, Op.BATCHNORM, [x], {}, {"scale": scale, "shift": shift})


def activation(b: GraphBuilder, site: Site, x: str, op: Op) -> str:
    """An elementwise activation."""
    return b.add(site.node, op, [x])


def clip(b: GraphBuilder, site: Site, x: str, lo: Any, hi: Any) -> str:
    """Clamp to [lo, hi]; either bound may be None (open).

    Both bounds -> CLIP; only ``lo`` -> RELU (shifted by an affine when lo != 0);
    only ``hi`` -> ``hi - relu(hi - x)``. Bounds must be numbers.
    """
    try:
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
    except (TypeError, ValueError) as exc:
        raise site.error(f"clamp bounds must be constant numbers, got {lo!r}, {hi!r}") from exc
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None:
        if not lo < hi:
            raise site.error(f"clamp needs min < max, got [{lo}, {hi}]")
        return b.add(site.node, Op.CLIP, [x], {"lo": lo, "hi": hi})
    shape = b.shape(x)
    if not shape:
        raise site.error("clamping a value without a channel dimension")
    ones = np.ones(shape[0])
    if lo is not None:
        if lo == 0.0:
            return b.add(site.node, Op.RELU, [x])
        shifted = b.affine(site.node + "_shift", x, ones, -lo * ones)
        return b.affine(site.node + "_unshift", b.add(site.node, Op.RELU, [shifted]),
                        ones, lo * ones)
    flipped = b.affine(site.node + "_flip", x, -ones, hi * ones)
    return b.affine(site.node + "_unflip", b.add(site.node, Op.RELU, [flipped]),
                    -ones, hi * ones)


def hardsigmoid(b: GraphBuilder, site: Site, x: str, alpha: float, beta: float) -> str:
    """``clip(alpha * x + beta, 0, 1)``: torch's (1/6, 1/2) -> HARDSIGMOID, else affine + CLIP."""
    if math.isclose(alpha, 1.0 / 6.0, rel_tol=1e-6) and math.isclose(beta, 0.5, rel_tol=1e-6):
        return b.add(site.node, Op.HARDSIGMOID, [x])
    shape = b.shape(x)
    if not shape:
        raise site.error("hard sigmoid of a value without a channel dimension")
    ones = np.ones(shape[0])
    scaled = b.affine(site.node + "_affine", x, alpha * ones, beta * ones)
    return b.add(site.node, Op.CLIP, [scaled], {"lo": 0.0, "hi": 1.0})


def binary(b: GraphBuilder, site: Site, op: Op, x: str, y: str) -> str:
    """ADD / SUB / MUL of two values; per-sample shapes broadcast as numpy does.

    The per-sample ranks must match: with a leading batch axis, broadcasting values of
    different rank would align the batch axis of one with a feature axis of the other.
    """
    sx, sy = b.shape(x), b.shape(y)
    if len(sx) != len(sy):
        raise site.error(f"operands of per-sample shapes {sx} and {sy} have different "
                         "ranks; broadcasting them would mix samples of a batch")
    if op is Op.MUL and x == y:
        return b.add(site.node, Op.SQUARE, [x])
    return b.add(site.node, op, [x, y])


def concat(b: GraphBuilder, site: Site, xs: list[str], batch_axis: int) -> str:
    """Concatenation along the batched axis ``batch_axis`` (not the batch axis itself)."""
    if not xs:
        raise site.error("nothing to concatenate")
    rank = len(b.shape(xs[0])) + 1
    if not -rank <= int(batch_axis) < rank or int(batch_axis) % rank == 0:
        raise site.error(f"axis {batch_axis}: only feature axes (1..{rank - 1}) can be "
                         "concatenated; axis 0 joins samples of a batch")
    if len(xs) == 1:
        return xs[0]
    return b.add(site.node, Op.CONCAT, list(xs), {"axis": int(batch_axis) % rank - 1})


def gelu(b: GraphBuilder, site: Site, x: str, approximate: str) -> str:
    """GELU; the tanh approximation is mapped to exact GELU (logged)."""
    if approximate == "tanh":
        logger.info("node %r: GELU(approximate='tanh') is mapped to exact GELU "
                    "(differences are below 1e-3)", site.node)
    elif approximate != "none":
        raise site.error(f"approximate={approximate!r}")
    return b.add(site.node, Op.GELU, [x])


def _rank3(b: GraphBuilder, site: Site, x: str) -> None:
    if len(b.shape(x)) != 3:
        raise site.error(f"expects per-sample (C, H, W) input, got {b.shape(x)}")


def _window_attrs(b: GraphBuilder, site: Site, x: str, kernel: Any, stride: Any,
                  padding: Any, ceil_mode: bool) -> dict[str, Any]:
    _rank3(b, site, x)
    stride = kernel if stride is None or stride == [] or stride == () else stride
    attrs: dict[str, Any] = _pairs(site, kernel=kernel, stride=stride, padding=padding)
    attrs["ceil_mode"] = bool(ceil_mode)
    return attrs


def avgpool(b: GraphBuilder, site: Site, x: str, kernel: Any, stride: Any, padding: Any,
            ceil_mode: bool = False, count_include_pad: bool = True,
            divisor_override: Any = None) -> str:
    """Average pooling; ``count_include_pad`` and ``ceil_mode`` as in torch."""
    if divisor_override is not None:
        raise site.error("divisor_override is not supported")
    attrs = _window_attrs(b, site, x, kernel, stride, padding, ceil_mode)
    attrs["count_include_pad"] = bool(count_include_pad)
    return b.add(site.node, Op.AVGPOOL2D, [x], attrs)


def maxpool(b: GraphBuilder, site: Site, x: str, kernel: Any, stride: Any, padding: Any,
            dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> str:
    """Max pooling (padding with -inf, as torch does); ``ceil_mode`` as in torch."""
    if pair(dilation) != (1, 1):
        raise site.error(f"dilation={dilation}; only dilation 1 is supported")
    if return_indices:
        raise site.error("return_indices=True is not supported")
    attrs = _window_attrs(b, site, x, kernel, stride, padding, ceil_mode)
    return b.add(site.node, Op.MAXPOOL2D, [x], attrs)


def adaptive_avgpool(b: GraphBuilder, site: Site, x: str, output_size: Any) -> str:
    """Output size 1 -> GLOBALAVGPOOL; the input size -> nothing (identity); sizes
    dividing the input -> AVGPOOL2D (exactly torch's adaptive windows in that case);
    any other size -> the pooling matrix applied per channel (RESHAPE, LINEAR, RESHAPE),
    e.g. VGG's 7x7 pool on a smaller input."""
    _rank3(b, site, x)
    _, h, w = b.shape(x)
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != 2:
        raise site.error(f"output_size={output_size!r}")
    oh, ow = (h if sizes[0] is None else int(sizes[0]), w if sizes[1] is None else int(sizes[1]))
    if (oh, ow) == (1, 1):
        return b.add(site.node, Op.GLOBALAVGPOOL, [x])
    if (oh, ow) == (h, w):
        return x
    if oh <= 0 or ow <= 0:
        raise site.error(f"output size {(oh, ow)} must be positive")
    if h % oh or w % ow:
        return _adaptive_matrix(b, site, x, (oh, ow))
    kernel = (h // oh, w // ow)
    attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0)}
    return b.add(site.node, Op.AVGPOOL2D, [x], attrs)


def _adaptive_windows(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix of torch's adaptive pooling along one axis: output
    i averages input cells floor(i * size / out) .. ceil((i + 1) * size / out) - 1."""
    mat = np.zeros((out, size))
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def _adaptive_matrix(b: GraphBuilder, site: Site, x: str, out: tuple[int, int]) -> str:
    c, h, w = b.shape(x)
    weight = np.kron(_adaptive_windows(h, out[0]), _adaptive_windows(w, out[1]))
    flat = b.add(site.node + "_flat", Op.RESHAPE, [x], {"shape": (c, h * w)})
    pooled = b.add(site.node, Op.LINEAR, [flat], {},
                   {"weight": weight, "bias": np.zeros(weight.shape[0])})
    return b.add(site.node + "_grid", Op.RESHAPE, [pooled], {"shape": (c,) + out})


def flatten(b: GraphBuilder, site: Site, x: str, start_dim: int, end_dim: int) -> str:
    """Flatten batched dims ``start_dim..end_dim`` (start_dim >= 1)."""
    try:
        shape = flatten_shape(b.shape(x), int(start_dim), int(end_dim))
    except ValueError as exc:
        raise site.error(str(exc)) from exc
    return b.add(site.node, Op.RESHAPE, [x], {"shape": shape})


def mean(b: GraphBuilder, site: Site, x: str, dim: Any, keepdim: bool) -> str:
    """Mean over the spatial dims (2, 3) -> GLOBALAVGPOOL (+ RESHAPE without keepdim)."""
    shape = b.shape(x)
    if dim is None:
        raise site.error("a mean over all dimensions mixes samples of a batch")
    try:
        dims = batch_reduce_dims(dim, shape)
    except (TypeError, ValueError) as exc:
        raise site.error(str(exc)) from exc
    if len(shape) != 3 or dims != {2, 3}:
        raise site.error(f"only the spatial mean over dims (2, 3) of (C, H, W) values is "
                         f"supported; got dims {tuple(sorted(dims))} of per-sample {shape}")
    pooled = b.add(site.node, Op.GLOBALAVGPOOL, [x])
    if keepdim:
        return pooled
    return b.add(site.node + "_reshape", Op.RESHAPE, [pooled], {"shape": (shape[0],)})


def _linear_module(b: GraphBuilder, site: Site, mod: Any, x: str) -> str:
    bias = to_numpy(mod.bias) if mod.bias is not None else None
    return linear(b, site, x, weight_view(mod.weight), bias)


def module_handlers(nn: Any) -> list[tuple[type, ModuleHandler]]:
    """``(module class, handler)`` pairs, checked in order with ``isinstance``."""
    from torch.nn.modules.dropout import _DropoutNd

    def act(op: Op) -> ModuleHandler:
        return lambda b, site, mod, x: activation(b, site, x, op)

    return [
        (nn.Hardtanh, lambda b, site, m, x: clip(b, site, x, m.min_val, m.max_val)),  # ReLU6
        (nn.Hardswish, act(Op.HARDSWISH)),
        (nn.Hardsigmoid, act(Op.HARDSIGMOID)),
        (nn.Linear, _linear_module),
        (nn.Conv2d, conv2d_module),
        (nn.BatchNorm1d, lambda b, site, m, x: batchnorm_module(b, site, m, x, (1, 2))),
        (nn.BatchNorm2d, lambda b, site, m, x: batchnorm_module(b, site, m, x, (3,))),
        (nn.ReLU, act(Op.RELU)),
        (nn.GELU, lambda b, site, mod, x: gelu(b, site, x, mod.approximate)),
        (nn.SiLU, act(Op.SILU)),
        (nn.Sigmoid, act(Op.SIGMOID)),
        (nn.Tanh, act(Op.TANH)),
        (nn.AvgPool2d, lambda b, site, m, x: avgpool(
            b, site, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
            m.count_include_pad, m.divisor_override)),
        (nn.MaxPool2d, lambda b, site, m, x: maxpool(
            b, site, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
            m.return_indices)),
        (nn.AdaptiveAvgPool2d, lambda b, site, m, x: adaptive_avgpool(
            b, site, x, m.output_size)),
        (nn.Flatten, lambda b, site, m, x: flatten(b, site, x, m.start_dim, m.end_dim)),
        (_DropoutNd, lambda b, site, m, x: x),
        (nn.Identity, lambda b, site, m, x: x),
    ]


SUPPORTED_MODULES = ("Linear, Conv2d, BatchNorm1d, BatchNorm2d, ReLU, ReLU6, Hardtanh, "
                     "Hardswish, Hardsigmoid, GELU, SiLU, Sigmoid, Tanh, AvgPool2d, "
                     "MaxPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Identity, "
                     "torchvision StochasticDepth")


# -- transformers ------------------------------------------------------------------------

def embed(b: GraphBuilder, site: Site, ids: str, table: np.ndarray) -> str:
    """Token embedding: rows of ``table`` for the token ids in ``ids``."""
    table = _float_array(site, table, "embedding table")
    return b.add(site.node, Op.EMBED, [ids], {}, {"table": table})


def _per_sample_axis(site: Site, axis: int, rank: int) -> int:
    """A batched axis (0 = batch) as a per-sample one; refuses the batch axis."""
    full = rank + 1
    if not -full <= axis < full or axis % full == 0:
        raise site.error(f"axis {axis} is the batch axis or outside rank {full}")
    return axis % full - 1


def select(b: GraphBuilder, site: Site, x: str, axis: int, index: int) -> str:
    """``x[:, ..., index, ...]``: a one-wide SLICE, the axis then dropped."""
    shape = b.shape(x)
    ax = _per_sample_axis(site, axis, len(shape))
    index = index % shape[ax] if -shape[ax] <= index < shape[ax] else index
    sliced = b.add(site.node, Op.SLICE, [x], {"axis": ax, "start": index, "stop": index + 1})
    return b.add(site.node, Op.RESHAPE, [sliced],
                 {"shape": shape[:ax] + shape[ax + 1:]})


def unsqueeze(b: GraphBuilder, site: Site, x: str, axes: list[int]) -> str:
    shape = list(b.shape(x))
    rank = len(shape) + 1 + len(axes)
    for axis in sorted(a % rank for a in axes):
        if axis == 0:
            raise site.error("unsqueezing before the batch axis mixes samples")
        shape.insert(axis - 1, 1)
    return b.add(site.node, Op.RESHAPE, [x], {"shape": tuple(shape)})


def squeeze(b: GraphBuilder, site: Site, x: str, axes: list[int]) -> str:
    shape = b.shape(x)
    drop = {_per_sample_axis(site, a, len(shape)) for a in axes} if axes else \
        {i for i, d in enumerate(shape) if d == 1}
    if any(shape[i] != 1 for i in drop):
        raise site.error(f"cannot squeeze axes {sorted(drop)} of {shape}")
    return b.add(site.node, Op.RESHAPE, [x],
                 {"shape": tuple(d for i, d in enumerate(shape) if i not in drop)})


def transpose(b: GraphBuilder, site: Site, x: str, perm: list[int]) -> str:
    if list(perm) == list(range(len(perm))):
        return x
    return b.add(site.node, Op.TRANSPOSE, [x], {"perm": tuple(int(p) for p in perm)})


def matmul(b: GraphBuilder, site: Site, x: str, y: str) -> str:
    """A product of two activations (attention scores, attention times values)."""
    sx, sy = b.shape(x), b.shape(y)
    if len(sx) != len(sy):
        raise site.error(f"matmul operands of per-sample ranks {len(sx)} and {len(sy)}; "
                         "broadcasting them would mix samples of a batch")
    return b.add(site.node, Op.MATMUL, [x, y])


def softmax(b: GraphBuilder, site: Site, x: str, axis: int) -> str:
    rank = len(b.shape(x))
    if _per_sample_axis(site, axis, rank) != rank - 1:
        raise site.error(f"softmax over axis {axis}; only the last axis is supported")
    return b.add(site.node, Op.SOFTMAX, [x])


def layernorm(b: GraphBuilder, site: Site, x: str, axis: int, weight: np.ndarray,
              bias: np.ndarray | None, eps: float) -> str:
    shape = b.shape(x)
    if _per_sample_axis(site, axis, len(shape)) != len(shape) - 1:
        raise site.error(f"layer norm over axis {axis}; only the last axis is supported")
    weight = np.broadcast_to(_float_array(site, weight, "scale"), shape[-1:])
    bias = np.zeros(shape[-1]) if bias is None else \
        np.broadcast_to(_float_array(site, bias, "bias"), shape[-1:])
    return b.add(site.node, Op.LAYERNORM, [x], {"eps": float(eps)},
                 {"weight": np.array(weight), "bias": np.array(bias)})


def reduce_sum(b: GraphBuilder, site: Site, x: str, axes: list[int], keepdims: bool) -> str:
    rank = len(b.shape(x))
    per = tuple(sorted({_per_sample_axis(site, a, rank) for a in axes}))
    return b.add(site.node, Op.REDUCESUM, [x], {"axes": per, "keepdims": bool(keepdims)})


def divide(b: GraphBuilder, site: Site, x: str, y: str) -> str:
    """x / y for two activations: x times RECIPROCAL(y). The reciprocal's default range
    [2^-8, 2^14] is what MPC assumes for y (a mean pooling's token count, a softmax's
    sum); plain and TEE compute it exactly."""
    return binary(b, site, Op.MUL, x, b.add(site.node, Op.RECIPROCAL, [y]))


def const_affine(b: GraphBuilder, site: Site, x: str, scale, shift) -> str:
    """``x * scale + shift`` for constants that vary within a channel. A bias over the
    last axis of a LINEAR's output folds into the LINEAR; anything else is an AFFINE
    node (position embeddings)."""
    shape = b.shape(x)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    for c in (scale, shift):
        if c.ndim == len(shape) + 1:
            if c.shape[0] != 1:
                raise site.error(f"constant of shape {c.shape} would change the batch axis")
    scale = scale[0] if scale.ndim == len(shape) + 1 else scale
    shift = shift[0] if shift.ndim == len(shape) + 1 else shift
    try:
        full = np.broadcast_shapes(scale.shape, shift.shape, shape)
    except ValueError:
        raise site.error(f"constants of shapes {scale.shape}, {shift.shape} do not "
                         f"broadcast to {shape}") from None
    if tuple(full) != tuple(shape):
        raise site.error(f"constants would broadcast {shape} to {tuple(full)}")
    prod = b.node(x)
    last_only = all(c.ndim <= 1 or all(d == 1 for d in c.shape[:-1]) for c in (scale, shift))
    if prod.op is Op.LINEAR and last_only:
        s = np.broadcast_to(scale.reshape(-1), shape[-1:])
        t = np.broadcast_to(shift.reshape(-1), shape[-1:])
        w = prod.params["weight"] * s[:, None]
        return b.add(site.node, Op.LINEAR, prod.inputs, {},
                     {"weight": w, "bias": prod.params["bias"] * s + t})
    return b.add(site.node, Op.AFFINE, [x], {}, {"scale": scale, "shift": shift})

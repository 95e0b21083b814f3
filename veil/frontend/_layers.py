"""Lowering of individual layers to IR nodes, shared by the torch and ONNX frontends.

Nothing here imports torch at module level (only :func:`module_handlers` and
:func:`to_numpy` touch torch objects). Every function takes the :class:`GraphBuilder`, the :class:`Site` it converts (for
node names and error messages) and the IR name of its tensor input, and returns
the IR name of its result. Parameters are copied out as float64 numpy arrays.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from ..ir import Op
from ._builder import GraphBuilder, Site, batch_reduce_dims, flatten_shape, pair

logger = logging.getLogger(__name__)

ModuleHandler = Callable[[GraphBuilder, Site, Any, str], str]


def to_numpy(tensor: Any) -> np.ndarray:
    """A float64 numpy copy of a torch tensor (any dtype or device)."""
    return tensor.detach().cpu().double().numpy().copy()


def _pairs(site: Site, **values: Any) -> dict[str, tuple[int, int]]:
    try:
        return {key: pair(value) for key, value in values.items()}
    except (TypeError, ValueError) as exc:
        raise site.error(f"expects integer pairs, got {values}") from exc


def linear(b: GraphBuilder, site: Site, x: str, weight: np.ndarray,
           bias: np.ndarray | None) -> str:
    """``y = W x + b`` on flat per-sample inputs."""
    shape = b.shape(x)
    if len(shape) != 1:
        raise site.error(f"the input has per-sample shape {shape}; veil applies "
                         f"{site.what} to flat (features,) inputs only, flatten first")
    weight = np.asarray(weight, dtype=np.float64)
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
    """nn.Conv2d with groups=1, dilation 1 and zero padding."""
    if mod.groups != 1:
        raise site.error(f"groups={mod.groups}; only groups=1 is supported")
    if tuple(mod.dilation) != (1, 1):
        raise site.error(f"dilation={tuple(mod.dilation)}; only dilation 1 is supported")
    if mod.padding_mode != "zeros":
        raise site.error(f"padding_mode={mod.padding_mode!r}; only 'zeros' is supported")
    kernel = tuple(mod.kernel_size)
    padding = _conv_padding(site, mod.padding, kernel)
    weight = to_numpy(mod.weight)
    bias = to_numpy(mod.bias) if mod.bias is not None else np.zeros(weight.shape[0])
    attrs = {"stride": _pairs(site, stride=mod.stride)["stride"], "padding": padding}
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


def avgpool(b: GraphBuilder, site: Site, x: str, kernel: Any, stride: Any, padding: Any,
            ceil_mode: bool = False, count_include_pad: bool = True,
            divisor_override: Any = None) -> str:
    """Average pooling that counts zero padding (torch's default)."""
    if ceil_mode:
        raise site.error("ceil_mode=True is not supported")
    if not count_include_pad:
        raise site.error("count_include_pad=False is not supported")
    if divisor_override is not None:
        raise site.error("divisor_override is not supported")
    _rank3(b, site, x)
    stride = kernel if stride is None or stride == [] or stride == () else stride
    attrs = _pairs(site, kernel=kernel, stride=stride, padding=padding)
    return b.add(site.node, Op.AVGPOOL2D, [x], attrs)


def maxpool(b: GraphBuilder, site: Site, x: str, kernel: Any, stride: Any, padding: Any,
            dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> str:
    """Max pooling (padding with -inf, as torch does)."""
    if pair(dilation) != (1, 1):
        raise site.error(f"dilation={dilation}; only dilation 1 is supported")
    if ceil_mode:
        raise site.error("ceil_mode=True is not supported")
    if return_indices:
        raise site.error("return_indices=True is not supported")
    _rank3(b, site, x)
    stride = kernel if stride is None or stride == [] or stride == () else stride
    attrs = _pairs(site, kernel=kernel, stride=stride, padding=padding)
    return b.add(site.node, Op.MAXPOOL2D, [x], attrs)


def adaptive_avgpool(b: GraphBuilder, site: Site, x: str, output_size: Any) -> str:
    """Output size 1 -> GLOBALAVGPOOL; sizes dividing the input -> AVGPOOL2D."""
    _rank3(b, site, x)
    _, h, w = b.shape(x)
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != 2:
        raise site.error(f"output_size={output_size!r}")
    oh, ow = (h if sizes[0] is None else int(sizes[0]), w if sizes[1] is None else int(sizes[1]))
    if (oh, ow) == (1, 1):
        return b.add(site.node, Op.GLOBALAVGPOOL, [x])
    if oh <= 0 or ow <= 0 or h % oh or w % ow:
        raise site.error(f"output size {(oh, ow)} does not divide the input size {(h, w)}")
    kernel = (h // oh, w // ow)
    attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0)}
    return b.add(site.node, Op.AVGPOOL2D, [x], attrs)


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
    return linear(b, site, x, to_numpy(mod.weight), bias)


def module_handlers(nn: Any) -> list[tuple[type, ModuleHandler]]:
    """``(module class, handler)`` pairs, checked in order with ``isinstance``."""
    from torch.nn.modules.dropout import _DropoutNd

    def act(op: Op) -> ModuleHandler:
        return lambda b, site, mod, x: activation(b, site, x, op)

    return [
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


SUPPORTED_MODULES = ("Linear, Conv2d, BatchNorm1d, BatchNorm2d, ReLU, GELU, SiLU, Sigmoid, "
                     "Tanh, AvgPool2d, MaxPool2d, AdaptiveAvgPool2d, Flatten, Dropout, "
                     "Identity")

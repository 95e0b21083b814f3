"""1-D layers (signals, sequences of feature vectors) and leaky rectifiers, shared by the
torch and ONNX frontends.

A 1-D convolution or pooling over a (C, L) value is the 2-D one over its (C, 1, L)
view with a (1, k) window, which is how torch computes conv1d itself: so the IR needs
no 1-D ops, and every backend's convolution and pooling kernels (HE's sparse builders
and slot layouts, MPC's ring convolution, the enclave's ONNX emitters) serve both. Each
layer reads the view through a RESHAPE and gives back a (C, L') value through another,
so users pass and receive the shapes torch has; consecutive 1-D layers share one view
(the RESHAPE back is looked through), and a batch norm over channels goes onto the view
as well, so the backends' batch-norm folding into a convolution still applies.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..ir import Op
from . import _layers
from ._builder import GraphBuilder, Site, per_channel


def _single(site: Site, **values: Any) -> dict[str, int]:
    """``3``, ``(3,)`` or ``[3]`` -> 3 for each value; anything else is refused."""
    out = {}
    for key, value in values.items():
        v = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(v) != 1 or not isinstance(v[0], (int, np.integer)):
            raise site.error(f"{key}={value!r}; a 1-D layer takes one integer")
        out[key] = int(v[0])
    return out


def view_source(b: GraphBuilder, x: str) -> str | None:
    """The (C, 1, L) value that ``x`` (C, L) is a RESHAPE of, if it is one."""
    node = b.node(x)
    if node.op is not Op.RESHAPE or len(node.shape) != 2:
        return None
    src = b.shape(node.inputs[0])
    return node.inputs[0] if src == (node.shape[0], 1, node.shape[1]) else None


def to_view(b: GraphBuilder, site: Site, x: str) -> str:
    """The (C, 1, L) view of a (C, L) value (refused for any other rank)."""
    shape = b.shape(x)
    if len(shape) != 2:
        raise site.error(f"expects per-sample (C, L) input, got {shape}")
    src = view_source(b, x)
    if src is not None:
        return src
    return b.add(site.node + "_view", Op.RESHAPE, [x], {"shape": (shape[0], 1, shape[1])})


def from_view(b: GraphBuilder, site: Site, y: str) -> str:
    """The (C, L) value of a (C, 1, L) view."""
    c, _, n = b.shape(y)
    return b.add(site.node + "_flat", Op.RESHAPE, [y], {"shape": (c, n)})


def conv1d(b: GraphBuilder, site: Site, x: str, weight: np.ndarray, bias: np.ndarray | None,
           stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> str:
    """A 1-D cross-correlation (torch semantics): weight (Co, Ci/groups, k), x (Ci, L).

    ``padding`` is a number, a 1-tuple, "valid" or "same" (odd spans only)."""
    weight = np.asarray(weight)
    if weight.ndim != 3:
        raise site.error(f"weight of shape {weight.shape}; a 1-D convolution has "
                         "(out, in / groups, k)")
    geo = _single(site, stride=stride, dilation=dilation)
    if padding not in ("valid", "same"):
        padding = (0, _single(site, padding=padding)["padding"])
    y = _layers.conv2d(b, site, to_view(b, site, x), weight[:, :, None, :], bias,
                       stride=(1, geo["stride"]), padding=padding,
                       dilation=(1, geo["dilation"]), groups=groups)
    return from_view(b, site, y)


def conv1d_module(b: GraphBuilder, site: Site, mod: Any, x: str) -> str:
    """nn.Conv1d with any groups, stride and dilation, and zero padding."""
    if mod.padding_mode != "zeros":
        raise site.error(f"padding_mode={mod.padding_mode!r}; only 'zeros' is supported")
    bias = _layers.to_numpy(mod.bias) if mod.bias is not None else None
    return conv1d(b, site, x, _layers.weight_view(mod.weight), bias, mod.stride,
                  mod.padding, mod.dilation, mod.groups)


def pool1d(b: GraphBuilder, site: Site, op: Op, x: str, kernel: Any, stride: Any,
           padding: Any, ceil_mode: bool = False, count_include_pad: bool = True,
           dilation: Any = 1) -> str:
    """Max (``op`` MAXPOOL2D) or average (AVGPOOL2D) pooling over L of a (C, L) value,
    with torch's padding, ``ceil_mode`` and ``count_include_pad``."""
    stride = kernel if stride is None or stride == [] or stride == () else stride
    geo = _single(site, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    if geo["dilation"] != 1:
        raise site.error(f"dilation={dilation}; only dilation 1 is supported")
    view = to_view(b, site, x)
    window = ((1, geo["kernel"]), (1, geo["stride"]), (0, geo["padding"]))
    if op is Op.MAXPOOL2D:
        y = _layers.maxpool(b, site, view, *window, 1, ceil_mode)
    else:
        y = _layers.avgpool(b, site, view, *window, ceil_mode, count_include_pad)
    return from_view(b, site, y)


def adaptive_avgpool1d(b: GraphBuilder, site: Site, x: str, output_size: Any) -> str:
    """AdaptiveAvgPool1d over L of a (C, L) value (the 2-D rules on the view)."""
    size = _single(site, output_size=output_size)["output_size"]
    view = to_view(b, site, x)
    y = _layers.adaptive_avgpool(b, site, view, (1, size))
    return x if y == view else from_view(b, site, y)


def batchnorm(b: GraphBuilder, site: Site, x: str, scale: np.ndarray,
              shift: np.ndarray) -> str:
    """A per-channel ``x * scale + shift``; on a (C, L) value that a 1-D layer left, it
    goes onto that layer's (C, 1, L) view (where it folds into a convolution)."""
    src = view_source(b, x)
    y = b.add(site.node, Op.BATCHNORM, [src or x], {}, {"scale": scale, "shift": shift})
    return from_view(b, site, y) if src is not None else y


def batchnorm_module(b: GraphBuilder, site: Site, mod: Any, x: str) -> str:
    """nn.BatchNorm1d over the channels of (C, L) or the features of (F,)."""
    src = view_source(b, x)
    if src is None:
        return _layers.batchnorm_module(b, site, mod, x, (1, 2))
    return from_view(b, site, _layers.batchnorm_module(b, site, mod, src, (3,)))


def leaky_relu(b: GraphBuilder, site: Site, x: str, slope: Any) -> str:
    """LeakyReLU with a constant ``slope`` (torch's negative_slope, ONNX's alpha)."""
    return b.add(site.node, Op.LEAKYRELU, [x], {"alpha": _number(site, slope, "slope")})


def elu(b: GraphBuilder, site: Site, x: str, alpha: Any) -> str:
    return b.add(site.node, Op.ELU, [x], {"alpha": _number(site, alpha, "alpha")})


def prelu(b: GraphBuilder, site: Site, x: str, slope: np.ndarray,
          numpy_broadcast: bool = False) -> str:
    """PReLU with learned slopes: one, or one per channel (per-sample axis 0). torch's
    weight is (C,) for channel axis 1 of the batched input; ONNX's slope broadcasts
    against the batched input as numpy does (``numpy_broadcast``: (C, 1) over (N, C, L),
    (F,) over (N, F))."""
    shape = b.shape(x)
    s = np.asarray(slope, dtype=np.float64)
    if s.size == 1:
        return b.add(site.node, Op.PRELU, [x], {}, {"slope": s.reshape(1)})
    if not numpy_broadcast and s.ndim == 1:
        s = s.reshape((-1,) + (1,) * (len(shape) - 1))
    try:
        per = per_channel(s, shape)
    except ValueError as exc:
        raise site.error(f"slope of shape {np.shape(slope)}: {exc}") from exc
    return b.add(site.node, Op.PRELU, [x], {}, {"slope": per})


def _number(site: Site, value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise site.error(f"{what} must be a constant number, got {value!r}") from exc
    if not np.isfinite(out):
        raise site.error(f"{what} must be finite, got {out}")
    return out


def module_handlers(nn: Any) -> list[tuple[type, Any]]:
    """``(module class, handler)`` pairs for the torch frontend's module table."""
    return [
        (nn.Conv1d, conv1d_module),
        (nn.BatchNorm1d, batchnorm_module),
        (nn.MaxPool1d, _maxpool1d_module),
        (nn.AvgPool1d, lambda b, site, m, x: pool1d(
            b, site, Op.AVGPOOL2D, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
            m.count_include_pad)),
        (nn.AdaptiveAvgPool1d, lambda b, site, m, x: adaptive_avgpool1d(
            b, site, x, m.output_size)),
        (nn.LeakyReLU, lambda b, site, m, x: leaky_relu(b, site, x, m.negative_slope)),
        (nn.ELU, lambda b, site, m, x: elu(b, site, x, m.alpha)),
        (nn.PReLU, lambda b, site, m, x: prelu(b, site, x, _layers.to_numpy(m.weight))),
    ]


def _maxpool1d_module(b: GraphBuilder, site: Site, mod: Any, x: str) -> str:
    if mod.return_indices:
        raise site.error("return_indices=True is not supported")
    return pool1d(b, site, Op.MAXPOOL2D, x, mod.kernel_size, mod.stride, mod.padding,
                  mod.ceil_mode, dilation=mod.dilation)


SUPPORTED_MODULES = ("Conv1d, BatchNorm1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d, "
                     "LeakyReLU, PReLU, ELU")

"""The plaintext interpreter: the executable definition of every IR op.

Every backend is tested against :func:`run`. Inputs and outputs carry a leading
batch dimension; node shapes are per sample.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.polynomial import chebyshev
from scipy.special import erf

from ..errors import GraphError
from .graph import Graph, Node, Op


def _pad_hw(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x


def _windows(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """(B,C,H,W) -> (B,C,H',W',kh,kw) sliding windows after zero padding."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    x = _pad_hw(x, ph, pw)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, ::sh, ::sw]


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride, padding) -> np.ndarray:
    """Cross-correlation as in torch.nn.Conv2d (groups=1)."""
    win = _windows(x, weight.shape[2:], stride, padding)  # B,Ci,H',W',kh,kw
    out = np.einsum("bchwij,ocij->bohw", win, weight, optimize=True)
    return out + bias[None, :, None, None]


def cheb_eval(x: np.ndarray, coeffs, lo: float, hi: float) -> np.ndarray:
    """Chebyshev series (numpy convention) of x mapped from [lo, hi] to [-1, 1]."""
    t = (2.0 * x - (lo + hi)) / (hi - lo)
    return chebyshev.chebval(t, np.asarray(coeffs, dtype=np.float64))


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


ELEMENTWISE: dict[Op, Callable[[np.ndarray], np.ndarray]] = {
    Op.RELU: lambda x: np.maximum(x, 0.0),
    Op.GELU: gelu,
    Op.SILU: lambda x: x * sigmoid(x),
    Op.SIGMOID: sigmoid,
    Op.TANH: np.tanh,
    Op.SQUARE: np.square,
}


def eval_node(node: Node, args: list[np.ndarray]) -> np.ndarray:
    """Apply one node to batched inputs. This is the reference semantics of ``node.op``."""
    op, a, p = node.op, node.attrs, node.params
    x = args[0] if args else None
    batch = x.shape[0] if x is not None else 0
    if op is Op.LINEAR:
        return x @ p["weight"].T + p["bias"]
    if op is Op.CONV2D:
        return conv2d(x, p["weight"], p["bias"], a["stride"], a["padding"])
    if op is Op.BATCHNORM:
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        return x * p["scale"].reshape(bshape) + p["shift"].reshape(bshape)
    if op in ELEMENTWISE:
        return ELEMENTWISE[op](x)
    if op is Op.AVGPOOL2D:
        return _windows(x, a["kernel"], a["stride"], a["padding"]).mean(axis=(-1, -2))
    if op is Op.MAXPOOL2D:
        (ph, pw) = a["padding"]
        if ph or pw:  # torch pads max-pool with -inf, not zero
            x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
        return _windows(x, a["kernel"], a["stride"], (0, 0)).max(axis=(-1, -2))
    if op is Op.GLOBALAVGPOOL:
        return x.mean(axis=(2, 3), keepdims=True)
    if op is Op.RESHAPE:
        return x.reshape((batch,) + tuple(a["shape"]))
    if op is Op.ADD:
        return args[0] + args[1]
    if op is Op.DENSE:
        y = x.reshape(batch, -1) @ p["matrix"].T + p["bias"]
        return y.reshape((batch,) + tuple(a["shape"]))
    if op is Op.POLY:
        return cheb_eval(x, a["coeffs"], a["lo"], a["hi"])
    if op is Op.GATHER:
        idx = np.asarray(a["indices"], dtype=np.int64)
        flat = np.concatenate([x.reshape(batch, -1), np.zeros((batch, 1))], axis=1)
        return flat[:, np.where(idx < 0, flat.shape[1] - 1, idx)]
    raise GraphError(f"the interpreter has no rule for {op}")


def run(graph: Graph, x: np.ndarray, *, trace: bool = False):
    """Run ``graph`` on a batch ``x`` of shape (B, *graph.input_shape).

    Returns the output batch, or with ``trace=True`` a dict of every node's value.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[1:] != graph.input_shape:
        raise GraphError(f"interpreter input has per-sample shape {x.shape[1:]}, "
                         f"graph expects {graph.input_shape}")
    values: dict[str, np.ndarray] = {graph.input.name: x}
    for node in graph.nodes[1:]:
        values[node.name] = eval_node(node, [values[s] for s in node.inputs])
    return values if trace else values[graph.output]

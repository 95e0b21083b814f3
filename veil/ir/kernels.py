"""Reference kernels: the executable definition of every IR op, in numpy float64.

Every kernel takes the batched inputs (leading batch axis; node shapes are per
sample), the node's attributes and its parameters. Every backend is tested against
these (``tests/test_ops.py``); they favour clarity, then speed.
"""
from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev
from scipy.special import erf


def identity(args, a, p):
    return args[0]


def _pad_hw(x: np.ndarray, ph: int, pw: int, value: float = 0.0, extra=(0, 0)) -> np.ndarray:
    if not (ph or pw or any(extra)):
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph + extra[0]), (pw, pw + extra[1])),
                  constant_values=value)


def windows(x: np.ndarray, kernel, stride, dilation=(1, 1)) -> np.ndarray:
    """(B,C,H,W) -> (B,C,H',W',kh,kw) sliding windows of an already padded input."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def conv2d(args, a, p):
    """Cross-correlation as torch.nn.Conv2d: stride, zero padding, dilation, groups."""
    x, w, b = args[0], p["weight"], p["bias"]
    groups = int(a["groups"])
    (ph, pw) = a["padding"]
    if groups == 1 and w.shape[2:] == (1, 1):
        # Pointwise (ResNet bottlenecks, MobileNet): one matrix product over channels,
        # ~10x faster than the einsum over windows at 56x56 and the same sums.
        (sh, sw) = a["stride"]
        xs = _pad_hw(x, ph, pw)[:, :, ::sh, ::sw]
        out = np.moveaxis(np.tensordot(xs, w[:, :, 0, 0], axes=([1], [1])), -1, 1)
        return out + b[None, :, None, None]
    win = windows(_pad_hw(x, ph, pw), w.shape[2:], a["stride"], a["dilation"])
    if groups == 1:
        out = np.einsum("bchwij,ocij->bohw", win, w, optimize=True)
    else:
        bsz, ci, ho, wo, kh, kw = win.shape
        cg, og = ci // groups, w.shape[0] // groups
        win = win.reshape(bsz, groups, cg, ho, wo, kh, kw)
        wg = w.reshape(groups, og, cg, kh, kw)
        out = np.einsum("bgchwij,gocij->bgohw", win, wg,
                        optimize=True).reshape(bsz, groups * og, ho, wo)
    return out + b[None, :, None, None]


def linear(args, a, p):
    return args[0] @ p["weight"].T + p["bias"]


def batchnorm(args, a, p):
    x = args[0]
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    return x * p["scale"].reshape(bshape) + p["shift"].reshape(bshape)


def relu(args, a, p):
    return np.maximum(args[0], 0.0)


def clip(args, a, p):
    return np.clip(args[0], float(a["lo"]), float(a["hi"]))


def gelu_fn(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def sigmoid_fn(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def gelu(args, a, p):
    return gelu_fn(args[0])


def sigmoid(args, a, p):
    return sigmoid_fn(args[0])


def silu(args, a, p):
    return args[0] * sigmoid_fn(args[0])


def tanh(args, a, p):
    return np.tanh(args[0])


def hardsigmoid(args, a, p):
    return np.clip(args[0] / 6.0 + 0.5, 0.0, 1.0)


def hardswish(args, a, p):
    return args[0] * np.clip(args[0] / 6.0 + 0.5, 0.0, 1.0)


def square(args, a, p):
    return np.square(args[0])


def window_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1,
               ceil_mode: bool = False) -> int:
    """Output length of a sliding window, with torch's rule for ``ceil_mode``: the last
    window must start inside the input or its left padding. Raises ValueError when the
    window does not fit (the shape rules turn that into a GraphError)."""
    span = dilation * (kernel - 1) + 1
    if size + 2 * pad < span or stride < 1:
        raise ValueError(f"window of {span} (stride {stride}) does not fit input {size} "
                         f"padded by {pad}")
    n = size + 2 * pad - span
    out = (-(-n // stride) if ceil_mode else n // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _ceil_extra(size: int, kernel: int, stride: int, pad: int, out: int) -> int:
    """Right padding a ceil-mode pool needs beyond its symmetric padding."""
    return max(0, (out - 1) * stride + kernel - (size + 2 * pad))


def _pool_geometry(x: np.ndarray, a):
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    h, w = x.shape[2:]
    ho = window_out(h, kh, sh, ph, 1, bool(a["ceil_mode"]))
    wo = window_out(w, kw, sw, pw, 1, bool(a["ceil_mode"]))
    return (kh, kw), (sh, sw), (ph, pw), (_ceil_extra(h, kh, sh, ph, ho),
                                          _ceil_extra(w, kw, sw, pw, wo)), (ho, wo)


def avgpool2d(args, a, p):
    """Average over each window. ``count_include_pad``: divide by the window's cells
    inside the zero-padded input (torch's default), else by its cells in the input;
    cells a ceil-mode window adds beyond the padding never count."""
    x = args[0]
    kernel, stride, (ph, pw), extra, (ho, wo) = _pool_geometry(x, a)
    total = windows(_pad_hw(x, ph, pw, 0.0, extra), kernel, stride).sum(axis=(-1, -2))
    h, w = x.shape[2:]
    ones = np.ones((1, 1, h + 2 * ph, w + 2 * pw)) if a["count_include_pad"] else \
        _pad_hw(np.ones((1, 1, h, w)), ph, pw)
    ones = np.pad(ones, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])))
    count = windows(ones, kernel, stride).sum(axis=(-1, -2))
    return (total / count)[:, :, :ho, :wo]


def maxpool2d(args, a, p):
    """Max over each window; padding (and ceil-mode overhang) is -inf, as in torch."""
    x = args[0]
    kernel, stride, (ph, pw), extra, (ho, wo) = _pool_geometry(x, a)
    win = windows(_pad_hw(x, ph, pw, -np.inf, extra), kernel, stride)
    return win.max(axis=(-1, -2))[:, :, :ho, :wo]


def global_avgpool(args, a, p):
    return args[0].mean(axis=(2, 3), keepdims=True)


def reshape(args, a, p):
    return args[0].reshape((args[0].shape[0],) + tuple(a["shape"]))


def _aligned(args):
    """Batched operands with per-sample ranks aligned (numpy broadcasting per sample)."""
    rank = max(x.ndim for x in args)
    return [x.reshape((x.shape[0],) + (1,) * (rank - x.ndim) + x.shape[1:]) for x in args]


def add(args, a, p):
    x, y = _aligned(args)
    return x + y


def sub(args, a, p):
    x, y = _aligned(args)
    return x - y


def mul(args, a, p):
    x, y = _aligned(args)
    return x * y


def concat(args, a, p):
    return np.concatenate(args, axis=int(a["axis"]) + 1)


def dense(args, a, p):
    x = args[0]
    y = x.reshape(x.shape[0], -1) @ p["matrix"].T + p["bias"]
    return y.reshape((x.shape[0],) + tuple(a["shape"]))


def cheb_eval(x: np.ndarray, coeffs, lo: float, hi: float) -> np.ndarray:
    """Chebyshev series (numpy convention) of x mapped from [lo, hi] to [-1, 1]."""
    t = (2.0 * x - (lo + hi)) / (hi - lo)
    return chebyshev.chebval(t, np.asarray(coeffs, dtype=np.float64))


def poly(args, a, p):
    return cheb_eval(args[0], a["coeffs"], a["lo"], a["hi"])


def gather(args, a, p):
    x = args[0]
    batch = x.shape[0]
    idx = np.asarray(a["indices"], dtype=np.int64)
    flat = np.concatenate([x.reshape(batch, -1), np.zeros((batch, 1))], axis=1)
    return flat[:, np.where(idx < 0, flat.shape[1] - 1, idx)]


# -- transformer ops ----------------------------------------------------------------------

def token_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Float token ids as int64 indices; InputError unless every one is an integer in
    [0, vocab) (the reference EMBED and the MPC client's one-hot encoding check alike)."""
    from ..errors import InputError

    idx = np.rint(ids)
    if not np.all(np.isfinite(ids)) or np.any(np.abs(ids - idx) > 1e-6) \
            or np.any(idx < 0) or np.any(idx >= vocab):
        raise InputError(f"token ids must be integers in [0, {vocab})")
    return idx.astype(np.int64)


def embed(args, a, p):
    """Token embedding: row ``ids[...]`` of ``table`` (bad ids: :func:`token_ids`)."""
    return p["table"][token_ids(args[0], p["table"].shape[0])]


def slice_(args, a, p):
    axis = int(a["axis"]) % (args[0].ndim - 1) + 1
    index = [slice(None)] * args[0].ndim
    index[axis] = slice(int(a["start"]), int(a["stop"]))
    return args[0][tuple(index)]


def transpose(args, a, p):
    return np.transpose(args[0], (0,) + tuple(int(i) + 1 for i in a["perm"]))


def affine(args, a, p):
    """x * scale + shift, the constants broadcast against the per-sample shape."""
    return args[0] * p["scale"][None] + p["shift"][None]


def matmul(args, a, p):
    """A product of two activations over their last two axes (leading axes batch and
    broadcast as numpy's matmul does, per sample)."""
    x, y = _aligned(args)
    return np.matmul(x, y)


def softmax(args, a, p):
    x = args[0]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logsoftmax(args, a, p):
    x = args[0]
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def normalize(args, a, p):
    """ONNX-ML Normalizer over the last axis: X / max(X), X / sum|X| or X / ||X||_2
    (a zero norm leaves the row as it is, as onnxruntime does)."""
    x = args[0]
    norm = {"l1": lambda v: np.abs(v).sum(axis=-1, keepdims=True),
            "l2": lambda v: np.sqrt(np.square(v).sum(axis=-1, keepdims=True)),
            "max": lambda v: v.max(axis=-1, keepdims=True)}[a["norm"]](x)
    return x / np.where(norm == 0, 1.0, norm)


def layernorm(args, a, p):
    x = args[0]
    mu = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mu).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + float(a["eps"])) * p["weight"] + p["bias"]


def reducesum(args, a, p):
    rank = args[0].ndim - 1
    return args[0].sum(axis=tuple(int(i) % rank + 1 for i in a["axes"]),
                       keepdims=bool(a["keepdims"]))


def reciprocal(args, a, p):
    return 1.0 / args[0]


# -- tree ensembles -----------------------------------------------------------------------

#: TREE_ENSEMBLE's node tests by ``mode`` code: x <= t, x < t, x >= t, x > t (ONNX's
#: BRANCH_LEQ, BRANCH_LT, BRANCH_GTE, BRANCH_GT)
TREE_MODES = ("leq", "lt", "gte", "gt")


def tree_tests(x: np.ndarray, feature, threshold, mode) -> np.ndarray:
    """(B, N) 0/1: each branch node's test of its feature of the flat batch x (B, F)."""
    v = x[:, np.asarray(feature, dtype=np.int64)]
    t = np.asarray(threshold, dtype=np.float64)[None]
    m = np.asarray(mode, dtype=np.int64)[None]
    return np.select([m == 0, m == 1, m == 2], [v <= t, v < t, v >= t], v > t)


def tree_leaves(bits: np.ndarray, paths) -> np.ndarray:
    """(B, L) 0/1: whether each leaf is reached, the product of its path's literals:
    path entry +(n + 1) takes node n's true branch (bit), -(n + 1) its false branch
    (1 - bit), 0 pads (1)."""
    paths = np.asarray(paths, dtype=np.int64)
    node = np.abs(paths) - 1
    picked = bits[:, np.maximum(node, 0)]
    lit = np.where(paths > 0, picked, 1.0 - picked)
    return np.where(paths == 0, 1.0, lit).prod(axis=2)


def tree_ensemble(args, a, p):
    """A tree ensemble's raw scores (ONNX's aggregation before its post transform): per
    target, the sum over the leaves every tree reaches of their weights, plus ``base``.
    Each leaf carries its whole path (``tree_leaves``), so the sum runs over all leaves
    with their 0/1 reach; a proper tree reaches exactly one."""
    x = args[0].reshape(args[0].shape[0], -1)
    bits = tree_tests(x, p["feature"], p["threshold"], p["mode"]).astype(np.float64)
    return tree_leaves(bits, p["paths"]) @ p["weights"] + p["base"]

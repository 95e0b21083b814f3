"""The op registry: every IR op declared once.

An :class:`OpDef` holds everything the rest of veil needs to know about an op: how
many inputs it reads, which parameters it carries, its attribute defaults, its
traits, its shape rule, its reference kernel (the executable spec, in
:mod:`veil.ir.kernels`) and the compile targets that accept it. Backends keep one
kernel table each, keyed by :class:`Op`; ``tests/test_ops.py`` checks that every
target an op declares has a kernel and agrees with the reference kernel.

Adding an op: add it to :class:`Op`, write its shape rule and reference kernel, add
one :class:`OpDef` to :data:`REGISTRY`, then one kernel per target it declares (and a
frontend mapping). Nothing else dispatches on op names.

Traits (what passes ask about instead of listing ops):

- ``affine``: affine in its single input (HE lowers chains of them to DENSE);
- ``activation``: unary, elementwise, non-polynomial (HE replaces it by a fitted POLY);
- ``elementwise``: output element i depends on input element i only;
- ``binary``: two activation inputs, numpy broadcasting of per-sample shapes;
- ``pool``: a windowed reduction over (H, W);
- ``shape``: only moves values (reshape, concat, gather);
- ``lowered``: produced by the compiler, not by frontends.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import GraphError
from ..modes import MODES
from . import kernels as k


class Op(str, enum.Enum):
    INPUT = "input"
    LINEAR = "linear"          # y = x W^T + b over the last axis, x of shape (..., in)
    CONV2D = "conv2d"          # (Ci,H,W) -> (Co,H',W'); stride, padding, dilation, groups
    BATCHNORM = "batchnorm"    # per-channel affine y = x*scale[c] + shift[c]
    RELU = "relu"
    CLIP = "clip"              # clamp to [lo, hi]: ReLU6, Hardtanh
    GELU = "gelu"
    SILU = "silu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    HARDSIGMOID = "hardsigmoid"  # clip(x / 6 + 1/2, 0, 1), as torch
    HARDSWISH = "hardswish"    # x * hardsigmoid(x)
    SQUARE = "square"
    AVGPOOL2D = "avgpool2d"    # kernel, stride, padding, ceil_mode, count_include_pad
    MAXPOOL2D = "maxpool2d"    # kernel, stride, padding (-inf), ceil_mode
    GLOBALAVGPOOL = "globalavgpool"  # (C,H,W) -> (C,1,1)
    RESHAPE = "reshape"        # attrs shape
    CONCAT = "concat"          # n inputs joined on per-sample ``axis``
    ADD = "add"                # elementwise, broadcasting per-sample shapes
    SUB = "sub"
    MUL = "mul"                # product of two activations (squeeze-excite, gating)
    DENSE = "dense"            # lowered linear map: y = M @ x.ravel() + b, attrs shape
    POLY = "poly"              # Chebyshev series on [lo, hi]; attrs coeffs, lo, hi, source
    GATHER = "gather"          # y[i] = x.ravel()[indices[i]] (0 where index < 0)
    BOOTSTRAP = "bootstrap"    # lowered: y = x with its CKKS levels refreshed; attrs bound
    # transformers (issue 17)
    EMBED = "embed"            # token embedding: ids (...) -> table[ids] (..., D)
    SLICE = "slice"            # x[start:stop] on per-sample ``axis``
    TRANSPOSE = "transpose"    # per-sample axes permuted by ``perm``
    AFFINE = "affine"          # x * scale + shift, constants broadcast per sample
    MATMUL = "matmul"          # product of two activations over their last two axes
    SOFTMAX = "softmax"        # over the last axis
    LAYERNORM = "layernorm"    # over the last axis; params weight, bias; attr eps
    REDUCESUM = "reducesum"    # sum over per-sample ``axes`` (keepdims)
    RECIPROCAL = "reciprocal"  # 1 / x for x in the calibrated range [lo, hi] (lo > 0)
    # output heads (issue 18): computed by the client (veil.ir.head), never by a server
    LOGSOFTMAX = "logsoftmax"  # log(softmax(x)) over the last axis
    NORMALIZE = "normalize"    # x / norm(x) over the last axis; attr norm: l1, l2 or max
    # tree ensembles (issue 18)
    TREE_ENSEMBLE = "tree_ensemble"  # (F,) -> (T,): summed leaf weights of every tree + base


# Compile targets: the execution modes (:mod:`veil.modes`). ``plain`` is the interpreter
# itself; ``simulate`` runs what the HE target runs, in floats, so it accepts exactly
# what ``he`` accepts.
TARGETS = MODES
ALL = frozenset(TARGETS)
NO_HE = ALL - {"he"}     # simulate (floats) runs it; the slot evaluator does not yet
# transformer ops: HE prices them (``compiler.estimate``) but neither runs them nor
# simulates its polynomial form of them
SHARES = frozenset({"plain", "tee", "mpc"})
# a model's output head: the client computes it (veil.ir.head) with the interpreter
CLIENT = frozenset({"plain"})

Shape = tuple[int, ...]
ShapeRule = Callable[[list[Shape], Mapping[str, Any], Mapping[str, np.ndarray]], Shape]
Kernel = Callable[[list[np.ndarray], Mapping[str, Any], Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class OpDef:
    """One op, declared once. ``arity`` None means one or more inputs."""

    op: Op
    arity: int | None
    shape: ShapeRule
    kernel: Kernel
    traits: frozenset[str] = frozenset()
    params: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    targets: frozenset[str] = ALL
    doc: str = ""
    #: why the targets it does not declare refuse it (appended to their refusal)
    refusal: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "traits", frozenset(self.traits))
        object.__setattr__(self, "targets", frozenset(self.targets))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def has(self, trait: str) -> bool:
        return trait in self.traits


# -- shape rules ------------------------------------------------------------------------

def _same(ins, a, p) -> Shape:
    return ins[0]


def _input(ins, a, p) -> Shape:
    return tuple(a["shape"])


def _linear(ins, a, p) -> Shape:
    x, w = ins[0], p["weight"]
    if len(x) < 1 or x[-1] != w.shape[1]:
        raise GraphError(f"linear expects input (..., {w.shape[1]}), got {x}")
    if p["bias"].shape != (w.shape[0],):
        raise GraphError(f"linear bias has shape {p['bias'].shape}, weight {w.shape}")
    return x[:-1] + (w.shape[0],)


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1,
                ceil_mode: bool = False) -> int:
    try:
        return k.window_out(size, kernel, stride, pad, dilation, ceil_mode)
    except ValueError as exc:
        raise GraphError(str(exc)) from None


def _conv2d(ins, a, p) -> Shape:
    x, w = ins[0], p["weight"]
    groups = int(a["groups"])
    if len(x) != 3 or w.ndim != 4 or x[0] != w.shape[1] * groups:
        raise GraphError(f"conv2d with weight {w.shape} and {groups} groups expects input "
                         f"({w.shape[1] * groups}, H, W), got {x}")
    if w.shape[0] % groups:
        raise GraphError(f"conv2d: {w.shape[0]} output channels do not split into "
                         f"{groups} groups")
    if p["bias"].shape != (w.shape[0],):
        raise GraphError(f"conv2d bias has shape {p['bias'].shape}, weight {w.shape}")
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    return (w.shape[0], _window_out(x[1], w.shape[2], sh, ph, dh),
            _window_out(x[2], w.shape[3], sw, pw, dw))


def _pool(ins, a, p) -> Shape:
    x = ins[0]
    if len(x) != 3:
        raise GraphError(f"pooling expects (C, H, W), got {x}")
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    if 2 * ph > kh or 2 * pw > kw:
        raise GraphError(f"pool padding {(ph, pw)} is more than half its kernel {(kh, kw)}")
    ceil = bool(a["ceil_mode"])
    return (x[0], _window_out(x[1], kh, sh, ph, 1, ceil), _window_out(x[2], kw, sw, pw, 1, ceil))


def _global_pool(ins, a, p) -> Shape:
    if len(ins[0]) != 3:
        raise GraphError(f"global average pool expects (C, H, W), got {ins[0]}")
    return (ins[0][0], 1, 1)


def _batchnorm(ins, a, p) -> Shape:
    x = ins[0]
    if not x or p["scale"].shape != (x[0],) or p["shift"].shape != (x[0],):
        raise GraphError(f"batchnorm has {p['scale'].shape} channels, input {x}")
    return x


def _reshape(ins, a, p) -> Shape:
    shape = tuple(a["shape"])
    if int(np.prod(shape)) != int(np.prod(ins[0])):
        raise GraphError(f"cannot reshape {ins[0]} to {shape}")
    return shape


def _broadcast(ins, a, p) -> Shape:
    try:
        return tuple(np.broadcast_shapes(*ins))
    except ValueError:
        raise GraphError(f"shapes {ins[0]} and {ins[1]} do not broadcast") from None


def _concat(ins, a, p) -> Shape:
    axis, first = int(a["axis"]), ins[0]
    if not 0 <= axis < len(first):
        raise GraphError(f"concat axis {axis} is outside per-sample rank {len(first)}")
    for s in ins[1:]:
        if len(s) != len(first) or any(u != v for i, (u, v) in enumerate(zip(s, first))
                                       if i != axis):
            raise GraphError(f"concat of {first} and {s} on axis {axis}")
    return first[:axis] + (sum(s[axis] for s in ins),) + first[axis + 1:]


def _dense(ins, a, p) -> Shape:
    m = p["matrix"]
    if m.shape[1] != int(np.prod(ins[0])) or int(np.prod(a["shape"])) != m.shape[0]:
        raise GraphError(f"dense {m.shape} does not map {ins[0]} to {a['shape']}")
    return tuple(a["shape"])


def _gather(ins, a, p) -> Shape:
    idx = a["indices"]
    if any(i >= int(np.prod(ins[0])) for i in idx):
        raise GraphError(f"gather index out of range for input {ins[0]}")
    return (len(idx),)


def _clip_shape(ins, a, p) -> Shape:
    if not float(a["lo"]) < float(a["hi"]):
        raise GraphError(f"clip needs lo < hi, got [{a['lo']}, {a['hi']}]")
    return ins[0]


def _embed(ins, a, p) -> Shape:
    t = p["table"]
    if t.ndim != 2:
        raise GraphError(f"embedding table has shape {t.shape}, expected (vocab, dim)")
    return ins[0] + (t.shape[1],)


def _axis(rank: int, axis: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise GraphError(f"{what} axis {axis} is outside per-sample rank {rank}")
    return axis % rank


def _slice(ins, a, p) -> Shape:
    x = ins[0]
    axis = _axis(len(x), int(a["axis"]), "slice")
    start, stop = int(a["start"]), int(a["stop"])
    if not 0 <= start < stop <= x[axis]:
        raise GraphError(f"slice [{start}:{stop}] outside axis {axis} of {x}")
    return x[:axis] + (stop - start,) + x[axis + 1:]


def _transpose(ins, a, p) -> Shape:
    perm = tuple(int(i) for i in a["perm"])
    if sorted(perm) != list(range(len(ins[0]))):
        raise GraphError(f"transpose perm {perm} is not a permutation of {len(ins[0])} axes")
    return tuple(ins[0][i] for i in perm)


def _affine(ins, a, p) -> Shape:
    x = ins[0]
    for name in ("scale", "shift"):
        c = p[name]
        if c.ndim > len(x) or tuple(np.broadcast_shapes(c.shape, x)) != tuple(x):
            raise GraphError(f"affine {name} of shape {c.shape} does not broadcast to {x}")
    return x


def _matmul(ins, a, p) -> Shape:
    x, y = ins
    if len(x) < 2 or len(y) < 2 or x[-1] != y[-2]:
        raise GraphError(f"matmul of {x} and {y}: expected (..., m, k) and (..., k, n)")
    try:
        lead = tuple(np.broadcast_shapes(x[:-2], y[:-2]))
    except ValueError:
        raise GraphError(f"matmul leading axes of {x} and {y} do not broadcast") from None
    return lead + (x[-2], y[-1])


def _last_axis(ins, a, p) -> Shape:
    x = ins[0]
    if not x or _axis(len(x), int(a.get("axis", -1)), "softmax") != len(x) - 1:
        raise GraphError(f"only the last axis is supported, got axis {a.get('axis')} of {x}")
    return x


def _layernorm(ins, a, p) -> Shape:
    x = ins[0]
    if not x or p["weight"].shape != (x[-1],) or p["bias"].shape != (x[-1],):
        raise GraphError(f"layernorm over {x} with weight {p['weight'].shape}")
    if not float(a["eps"]) >= 0:
        raise GraphError(f"layernorm eps {a['eps']} is negative")
    return x


def _reducesum(ins, a, p) -> Shape:
    x = ins[0]
    axes = sorted({_axis(len(x), int(i), "reducesum") for i in a["axes"]})
    if not axes:
        raise GraphError("reducesum needs at least one axis")
    if a["keepdims"]:
        return tuple(1 if i in axes else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _normalize(ins, a, p) -> Shape:
    if a["norm"] not in ("l1", "l2", "max"):
        raise GraphError(f"normalize norm {a['norm']!r}; one of l1, l2, max")
    return _last_axis(ins, {}, p)


def _integral(arr: np.ndarray, lo: int, hi: int, what: str) -> np.ndarray:
    """An integer-valued parameter (stored as float64) with entries in [lo, hi]."""
    if arr.size and (np.any(arr != np.round(arr)) or arr.min() < lo or arr.max() > hi):
        raise GraphError(f"tree_ensemble {what} must be integers in [{lo}, {hi}]")
    return arr.astype(np.int64)


def _tree_ensemble(ins, a, p) -> Shape:
    """Branch nodes (``feature``, ``threshold``, ``mode`` (N,)), leaf paths (L, D) and
    leaf weights (L, T) against a flat input (F,); see ``kernels.tree_ensemble``."""
    x = ins[0]
    feature, threshold, mode = p["feature"], p["threshold"], p["mode"]
    paths, weights, base = p["paths"], p["weights"], p["base"]
    n = feature.shape[0] if feature.ndim == 1 else -1
    if len(x) != 1 or n < 0 or threshold.shape != (n,) or mode.shape != (n,):
        raise GraphError(f"tree_ensemble over input {x} needs a flat input and feature, "
                         f"threshold and mode of one shape (N,), got {feature.shape}, "
                         f"{threshold.shape}, {mode.shape}")
    if paths.ndim != 2 or weights.ndim != 2 or weights.shape[0] != paths.shape[0] \
            or base.shape != (weights.shape[1],):
        raise GraphError(f"tree_ensemble paths {paths.shape}, weights {weights.shape} and "
                         f"base {base.shape} do not fit (leaves, depth), (leaves, targets), "
                         "(targets,)")
    _integral(feature, 0, x[0] - 1, "feature indices")
    _integral(mode, 0, len(k.TREE_MODES) - 1, "mode codes")
    _integral(paths, -n, n, "path entries")
    return (weights.shape[1],)


def _reciprocal(ins, a, p) -> Shape:
    if not 0 < float(a["lo"]) < float(a["hi"]):
        raise GraphError(f"reciprocal needs 0 < lo < hi, got [{a['lo']}, {a['hi']}]")
    return ins[0]


# -- the registry -----------------------------------------------------------------------

_ACT = frozenset({"activation", "elementwise"})
_POOL = {"kernel": (1, 1), "stride": (1, 1), "padding": (0, 0), "ceil_mode": False}


def _defs() -> dict[Op, OpDef]:
    d = [
        OpDef(Op.INPUT, 0, _input, k.identity, {"shape"}, doc="the model input"),
        OpDef(Op.LINEAR, 1, _linear, k.linear, {"affine"}, ("weight", "bias")),
        OpDef(Op.CONV2D, 1, _conv2d, k.conv2d, {"affine"}, ("weight", "bias"),
              {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}),
        OpDef(Op.BATCHNORM, 1, _batchnorm, k.batchnorm, {"affine", "elementwise"},
              ("scale", "shift")),
        OpDef(Op.RELU, 1, _same, k.relu, _ACT),
        OpDef(Op.CLIP, 1, _clip_shape, k.clip, _ACT, defaults={"lo": 0.0, "hi": 6.0}),
        OpDef(Op.GELU, 1, _same, k.gelu, _ACT),
        OpDef(Op.SILU, 1, _same, k.silu, _ACT),
        OpDef(Op.SIGMOID, 1, _same, k.sigmoid, _ACT),
        OpDef(Op.TANH, 1, _same, k.tanh, _ACT),
        OpDef(Op.HARDSIGMOID, 1, _same, k.hardsigmoid, _ACT),
        OpDef(Op.HARDSWISH, 1, _same, k.hardswish, _ACT),
        OpDef(Op.SQUARE, 1, _same, k.square, {"elementwise"}),
        OpDef(Op.AVGPOOL2D, 1, _pool, k.avgpool2d, {"affine", "pool"},
              defaults={**_POOL, "count_include_pad": True}),
        OpDef(Op.MAXPOOL2D, 1, _pool, k.maxpool2d, {"pool"}, defaults=_POOL),
        OpDef(Op.GLOBALAVGPOOL, 1, _global_pool, k.global_avgpool, {"affine", "pool"}),
        OpDef(Op.RESHAPE, 1, _reshape, k.reshape, {"affine", "shape"}),
        # HE packs each value in its own slot layout: joining two layouts, or a product of
        # two ciphertexts, is not planned yet. The HE estimate prices them, simulate runs
        # them, and mode "he" refuses them by name.
        OpDef(Op.CONCAT, None, _concat, k.concat, {"shape"}, defaults={"axis": 0},
              targets=NO_HE),
        OpDef(Op.ADD, 2, _broadcast, k.add, {"binary", "elementwise"}),
        OpDef(Op.SUB, 2, _broadcast, k.sub, {"binary", "elementwise"}, targets=NO_HE),
        OpDef(Op.MUL, 2, _broadcast, k.mul, {"binary", "elementwise"}),
        OpDef(Op.DENSE, 1, _dense, k.dense, {"affine", "lowered"}, ("matrix", "bias")),
        OpDef(Op.POLY, 1, _same, k.poly, {"elementwise", "lowered"}),
        OpDef(Op.GATHER, 1, _gather, k.gather, {"shape", "lowered"}),
        # the identity on values; under CKKS a bootstrap on inputs scaled into [-1, 1]
        # by 1 / bound (placed by compiler/levels.py)
        OpDef(Op.BOOTSTRAP, 1, _same, k.identity, {"elementwise", "lowered"},
              defaults={"bound": 1.0}, targets=frozenset({"plain", "simulate", "he"})),
        # transformers: the HE estimate prices them; mode "he" does not run them
        OpDef(Op.EMBED, 1, _embed, k.embed, (), ("table",), targets=SHARES,
              doc="token ids in, rows of the table out (MPC: the client one-hot "
                  "encodes the ids and the lookup is a local product)"),
        OpDef(Op.SLICE, 1, _slice, k.slice_, {"affine", "shape"}, targets=SHARES),
        OpDef(Op.TRANSPOSE, 1, _transpose, k.transpose, {"affine", "shape"}, targets=SHARES),
        OpDef(Op.AFFINE, 1, _affine, k.affine, {"affine", "elementwise"}, ("scale", "shift"),
              targets=SHARES),
        OpDef(Op.MATMUL, 2, _matmul, k.matmul, {"binary"}, targets=SHARES),
        OpDef(Op.SOFTMAX, 1, _last_axis, k.softmax, (), defaults={"axis": -1},
              targets=SHARES),
        OpDef(Op.LAYERNORM, 1, _layernorm, k.layernorm, (), ("weight", "bias"),
              {"eps": 1e-5}, targets=SHARES),
        OpDef(Op.REDUCESUM, 1, _reducesum, k.reducesum, {"affine"},
              defaults={"keepdims": False}, targets=SHARES),
        OpDef(Op.RECIPROCAL, 1, _reciprocal, k.reciprocal, {"elementwise"},
              defaults={"lo": 2.0 ** -8, "hi": 2.0 ** 14}, targets=SHARES),
        # output heads: split off at compile time and computed by the client; a model
        # that uses them before its output is refused by every server mode
        OpDef(Op.LOGSOFTMAX, 1, _last_axis, k.logsoftmax, (), defaults={"axis": -1},
              targets=CLIENT, doc="a classifier's log-probabilities (client side)"),
        OpDef(Op.NORMALIZE, 1, _normalize, k.normalize, (), defaults={"norm": "l1"},
              targets=CLIENT, doc="scikit-learn's Normalizer (client side)"),
        # tree ensembles: exact comparisons on shares or in the enclave
        OpDef(Op.TREE_ENSEMBLE, 1, _tree_ensemble, k.tree_ensemble, (),
              ("feature", "threshold", "mode", "paths", "weights", "base"), targets=SHARES,
              doc="random forests and gradient boosting (ONNX TreeEnsemble*): the raw "
                  "scores before the post transform",
              refusal="CKKS has no exact comparison, and a tree ensemble's splits need "
                      "one; use mode mpc or tee"),
    ]
    return {o.op: o for o in d}


REGISTRY: Mapping[Op, OpDef] = MappingProxyType(_defs())


def opdef(op: Op | str) -> OpDef:
    try:
        return REGISTRY[Op(op)]
    except (KeyError, ValueError):
        raise GraphError(f"unknown op {op!r}") from None


def ops_with(trait: str) -> frozenset[Op]:
    return frozenset(o for o, d in REGISTRY.items() if trait in d.traits)


def ops_for(target: str) -> frozenset[Op]:
    """The ops a compile target accepts from a frontend (before its own lowering)."""
    if target not in TARGETS:
        raise GraphError(f"unknown target {target!r}; targets are {TARGETS}")
    return frozenset(o for o, d in REGISTRY.items() if target in d.targets)


def with_defaults(op: Op, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` completed with the op's defaults (serialized graphs may omit them)."""
    return {**REGISTRY[op].defaults, **attrs}

"""IR -> ONNX, run by onnxruntime: one emitter per :class:`~veil.ir.Op`.

The enclave builds the ONNX model in memory from the measured IR bundle (the bundle
format stays the IR's JSON + npz; this translation is code, covered by the
measurement). Each entry of :data:`KERNELS` appends the ONNX nodes of one IR node,
batch axis first, in opset :data:`OPSET`, with parameters as initializers in the
executor's dtype. Semantics are the reference kernels' (:mod:`veil.ir.kernels`); the
tests compare every op with them. onnx and onnxruntime are imported only here, when an
executor is built.

EMBED is the one op that can refuse its input (token ids that are not integers in the
vocabulary; onnxruntime's Gather would fail or wrap negative ids instead): its emitter
looks a bad id up as row 0 and adds a boolean graph output marking the bad ids, which
the executor checks after each run to raise the reference's InputError.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import InputError, TEEError
from ...ir import Graph, Node, Op
from .executor import check_kernels

OPSET = 17
ML_OPSET = 3        # ai.onnx.ml: TreeEnsembleRegressor (TREE_ENSEMBLE)
_INT64 = 7          # onnx.TensorProto.INT64 (onnx is imported only in to_onnx)


class _Builder:
    """Collects ONNX nodes and initializers; values are named ``v<slot>``/``c<n>``."""

    def __init__(self, helper, numpy_helper, dtype: np.dtype) -> None:
        self.helper, self.numpy_helper, self.dtype = helper, numpy_helper, dtype
        self.nodes, self.inits, self._n = [], [], 0
        self.checks: list[tuple[str, tuple]] = []  # EMBED's bad-id flags, per-sample shape

    def fresh(self) -> str:
        self._n += 1
        return f"t{self._n}"

    def const(self, value, dtype=None) -> str:
        name = f"c{len(self.inits)}"
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype or self.dtype))
        self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.fresh()
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _conv2d(b: _Builder, node: Node, ins, out) -> None:
    a = node.attrs
    ph, pw = a["padding"]
    b.op("Conv", [ins[0], b.const(node.params["weight"]), b.const(node.params["bias"])], out,
         strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a["dilation"]),
         group=int(a["groups"]), kernel_shape=list(node.params["weight"].shape[2:]))


def _linear(b, node, ins, out) -> None:
    y = b.op("MatMul", [ins[0], b.const(node.params["weight"].T)])
    b.op("Add", [y, b.const(node.params["bias"])], out)


def _batchnorm(b, node, ins, out) -> None:
    shape = (-1,) + (1,) * (len(node.shape) - 1)
    y = b.op("Mul", [ins[0], b.const(node.params["scale"].reshape(shape))])
    b.op("Add", [y, b.const(node.params["shift"].reshape(shape))], out)


def _pool(b, node, ins, out) -> None:
    a = node.attrs
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    kwargs = dict(kernel_shape=[kh, kw], strides=[sh, sw])
    if node.op is Op.MAXPOOL2D:
        b.op("MaxPool", ins, out, pads=[ph, pw, ph, pw], ceil_mode=int(bool(a["ceil_mode"])),
             **kwargs)
    elif a["count_include_pad"] and a["ceil_mode"]:
        # onnxruntime counts a ceil-mode window's overhang past the padding in the
        # divisor; torch and the reference do not. So: pad with zeros explicitly, and
        # reach the last windows with pads that are not counted.
        (_, h, w), (_, ho, wo) = node.meta_in[0], node.shape
        eh, ew = ((o - 1) * s + k - (n + 2 * p) for o, s, k, n, p in
                  ((ho, sh, kh, h, ph), (wo, sw, kw, w, pw)))
        padded = b.op("Pad", [ins[0], b.const([0, 0, ph, pw, 0, 0, ph, pw], np.int64)])
        b.op("AveragePool", [padded], out, pads=[0, 0, max(eh, 0), max(ew, 0)],
             count_include_pad=0, **kwargs)
    else:
        b.op("AveragePool", ins, out, pads=[ph, pw, ph, pw],
             ceil_mode=int(bool(a["ceil_mode"])),
             count_include_pad=int(bool(a["count_include_pad"])), **kwargs)


def _clip(b, node, ins, out) -> None:
    b.op("Clip", [ins[0], b.const(node.attrs["lo"]), b.const(node.attrs["hi"])], out)


def _gelu(b, node, ins, out) -> None:     # 0.5 x (1 + erf(x / sqrt 2)), exact (not tanh)
    # Div, not Mul by 1/sqrt 2: onnxruntime fuses this form (with a preceding bias Add)
    # into one BiasGelu node, and not the other
    e = b.op("Erf", [b.op("Div", [ins[0], b.const(np.sqrt(2.0))])])
    half = b.op("Mul", [ins[0], b.const(0.5)])
    b.op("Mul", [half, b.op("Add", [e, b.const(1.0)])], out)


def _silu(b, node, ins, out) -> None:
    b.op("Mul", [ins[0], b.op("Sigmoid", ins)], out)


def _reshape(b, node, ins, out) -> None:
    b.op("Reshape", [ins[0], b.const([-1, *node.attrs["shape"]], np.int64)], out)


def _aligned(b, node, ins) -> list[str]:
    """Per-sample ranks aligned after the batch axis (ONNX broadcasts from the right, so
    a lower-rank operand gets unit axes after its batch axis, as the reference)."""
    shapes = node.meta_in
    rank = max(len(s) for s in shapes)
    out = []
    for name, s in zip(ins, shapes):
        if len(s) < rank:
            axes = b.const(list(range(1, 1 + rank - len(s))), np.int64)
            name = b.op("Unsqueeze", [name, axes])
        out.append(name)
    return out


def _binary(op_type: str) -> Callable:
    return lambda b, node, ins, out: b.op(op_type, _aligned(b, node, ins), out)


def _dense(b, node, ins, out) -> None:
    flat = b.op("Flatten", ins, axis=1)
    y = b.op("Gemm", [flat, b.const(node.params["matrix"]), b.const(node.params["bias"])],
             transB=1)
    b.op("Reshape", [y, b.const([-1, *node.shape], np.int64)], out)


def _poly(b, node, ins, out) -> None:
    """Clenshaw's recurrence for the Chebyshev series on [lo, hi]."""
    a = node.attrs
    coeffs = [float(c) for c in a["coeffs"]]
    lo, hi = float(a["lo"]), float(a["hi"])
    t = b.op("Mul", [b.op("Sub", [ins[0], b.const((lo + hi) / 2)]), b.const(2.0 / (hi - lo))])
    if len(coeffs) == 1:
        b.op("Add", [b.op("Mul", [t, b.const(0.0)]), b.const(coeffs[0])], out)
        return
    two_t = b.op("Mul", [t, b.const(2.0)])
    b1, b2 = b.op("Mul", [t, b.const(0.0)]), None
    b1 = b.op("Add", [b1, b.const(coeffs[-1])])   # first step: b1 = c_n, b2 = 0
    for c in coeffs[-2:0:-1]:
        nxt = b.op("Mul", [two_t, b1])
        if b2 is not None:
            nxt = b.op("Sub", [nxt, b2])
        b1, b2 = b.op("Add", [nxt, b.const(c)]), b1
    y = b.op("Mul", [t, b1])
    if b2 is not None:
        y = b.op("Sub", [y, b2])
    b.op("Add", [y, b.const(coeffs[0])], out)


def _gather(b, node, ins, out) -> None:
    idx = np.asarray(node.attrs["indices"], dtype=np.int64)
    flat = b.op("Flatten", ins, axis=1)
    picked = b.op("Gather", [flat, b.const(np.where(idx < 0, 0, idx), np.int64)], axis=1)
    b.op("Where", [b.const(idx >= 0, np.bool_), picked, b.const(0.0)], out)


def _axis(node, axis: int) -> int:
    """A per-sample axis (negative from the end) as an axis of the batched tensor."""
    return int(axis) % len(node.meta_in[0]) + 1


def _embed(b, node, ins, out) -> None:
    """Rows of the table; ids that are not integers in [0, vocab) are looked up as row 0
    and marked in an extra boolean output (see the module docstring)."""
    table = node.params["table"]
    ids = ins[0]
    rounded = b.op("Round", [ids])
    off = b.op("Greater", [b.op("Abs", [b.op("Sub", [ids, rounded])]), b.const(1e-6)])
    # NaN and +inf fail "< vocab"; -inf is "< 0"
    outside = b.op("Or", [b.op("Less", [rounded, b.const(0.0)]),
                          b.op("Not", [b.op("Less", [rounded, b.const(table.shape[0])])])])
    bad = b.op("Or", [off, outside])
    idx = b.op("Cast", [b.op("Where", [bad, b.const(0.0), rounded])], to=_INT64)
    b.op("Gather", [b.const(table), idx], out, axis=0)
    b.checks.append((bad, tuple(node.meta_in[0])))


def _slice(b, node, ins, out) -> None:
    a = node.attrs
    b.op("Slice", [ins[0], b.const([int(a["start"])], np.int64),
                   b.const([int(a["stop"])], np.int64),
                   b.const([_axis(node, a["axis"])], np.int64)], out)


def _transpose(b, node, ins, out) -> None:
    b.op("Transpose", ins, out, perm=[0, *(int(i) + 1 for i in node.attrs["perm"])])


def _affine(b, node, ins, out) -> None:
    """x * scale + shift, the constants given a leading batch axis of 1 (as the
    reference; ONNX broadcasts from the right)."""
    scale, shift = node.params["scale"][None], node.params["shift"][None]
    b.op("Add", [b.op("Mul", [ins[0], b.const(scale)]), b.const(shift)], out)


def _layernorm(b, node, ins, out) -> None:
    b.op("LayerNormalization",
         [ins[0], b.const(node.params["weight"]), b.const(node.params["bias"])], out,
         axis=-1, epsilon=float(node.attrs["eps"]))


def _reducesum(b, node, ins, out) -> None:
    axes = sorted({_axis(node, i) for i in node.attrs["axes"]})
    b.op("ReduceSum", [ins[0], b.const(axes, np.int64)], out,
         keepdims=int(bool(node.attrs["keepdims"])))


_BRANCH = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT")   # kernels.TREE_MODES


def _tree_children(paths: np.ndarray) -> tuple[dict, list]:
    """From each leaf's path (``kernels.tree_leaves``): every branch node's child on
    each side (("n", node) or ("l", leaf)) and each tree's root, in first-seen order."""
    child, roots = {}, []
    for j, row in enumerate(paths.astype(np.int64)):
        row = row[row != 0]
        root = ("n", int(abs(row[0])) - 1) if row.size else ("l", j)
        if root not in roots:
            roots.append(root)
        for at, nxt in zip(row, list(row[1:]) + [None]):
            child[(int(abs(at)) - 1, bool(at > 0))] = \
                ("l", j) if nxt is None else ("n", int(abs(nxt)) - 1)
    return child, roots


def _tree_ensemble(b, node, ins, out) -> None:
    """An ai.onnx.ml TreeEnsembleRegressor (opset 3) with the trees rebuilt from the
    leaves' paths: aggregation SUM, post transform NONE, so its output is the raw
    scores; thresholds and weights in float32, as the executor's dtype."""
    p = node.params
    child, roots = _tree_children(p["paths"])
    cols = {k: [] for k in ("treeids", "nodeids", "featureids", "modes", "values",
                            "truenodeids", "falsenodeids")}
    targets = {k: [] for k in ("treeids", "nodeids", "ids", "weights")}
    for tree, root in enumerate(roots):
        ids, order = {root: 0}, [root]
        for key in order:                  # breadth first: ids in order of discovery
            if key[0] == "n":
                for side in (True, False):
                    nxt = child[(key[1], side)]
                    ids[nxt] = len(order)
                    order.append(nxt)
        for key in order:
            kind, i = key
            branch = kind == "n"
            for name, value in (("treeids", tree), ("nodeids", ids[key]),
                                ("featureids", int(p["feature"][i]) if branch else 0),
                                ("modes", _BRANCH[int(p["mode"][i])] if branch else "LEAF"),
                                ("values", float(p["threshold"][i]) if branch else 0.0),
                                ("truenodeids", ids[child[(i, True)]] if branch else 0),
                                ("falsenodeids", ids[child[(i, False)]] if branch else 0)):
                cols[name].append(value)
            if not branch:
                for t, w in enumerate(p["weights"][i]):
                    for name, value in (("treeids", tree), ("nodeids", ids[key]),
                                        ("ids", t), ("weights", float(w))):
                        targets[name].append(value)
    b.op("TreeEnsembleRegressor", ins, out, domain="ai.onnx.ml",
         n_targets=int(p["weights"].shape[1]), aggregate_function="SUM",
         post_transform="NONE", base_values=[float(v) for v in p["base"]],
         **{f"nodes_{k}": v for k, v in cols.items()},
         **{f"target_{k}": v for k, v in targets.items()})


def _simple(op_type: str, **attrs) -> Callable:
    return lambda b, node, ins, out: b.op(op_type, ins, out, **attrs)


KERNELS: dict[Op, Callable] = {
    Op.INPUT: None,                      # the graph input itself
    Op.LINEAR: _linear,
    Op.CONV2D: _conv2d,
    Op.BATCHNORM: _batchnorm,
    Op.RELU: _simple("Relu"),
    Op.CLIP: _clip,
    Op.GELU: _gelu,
    Op.SILU: _silu,
    Op.SIGMOID: _simple("Sigmoid"),
    Op.TANH: _simple("Tanh"),
    Op.HARDSIGMOID: _simple("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
    Op.HARDSWISH: _simple("HardSwish"),
    Op.SQUARE: lambda b, node, ins, out: b.op("Mul", [ins[0], ins[0]], out),
    Op.AVGPOOL2D: _pool,
    Op.MAXPOOL2D: _pool,
    Op.GLOBALAVGPOOL: _simple("GlobalAveragePool"),
    Op.RESHAPE: _reshape,
    Op.CONCAT: lambda b, node, ins, out: b.op("Concat", ins, out,
                                              axis=int(node.attrs["axis"]) + 1),
    Op.ADD: _binary("Add"),
    Op.SUB: _binary("Sub"),
    Op.MUL: _binary("Mul"),
    Op.DENSE: _dense,
    Op.POLY: _poly,
    Op.GATHER: _gather,
    Op.EMBED: _embed,
    Op.SLICE: _slice,
    Op.TRANSPOSE: _transpose,
    Op.AFFINE: _affine,
    Op.MATMUL: _binary("MatMul"),
    Op.SOFTMAX: _simple("Softmax", axis=-1),
    Op.LAYERNORM: _layernorm,
    Op.REDUCESUM: _reducesum,
    Op.RECIPROCAL: _simple("Reciprocal"),
    Op.TREE_ENSEMBLE: _tree_ensemble,
}


class _NodeView:
    """A node with its inputs' per-sample shapes (the binary emitters need them)."""

    def __init__(self, node: Node, meta_in: list[tuple[int, ...]]) -> None:
        self._node, self.meta_in = node, meta_in

    def __getattr__(self, name):
        return getattr(self._node, name)


def to_onnx(graph: Graph, dtype: str = "float32"):
    """The ONNX ``ModelProto`` of ``graph`` (batch axis ``"batch"``), in ``dtype``. Its
    first output is the graph's; then one boolean output per EMBED node, in graph order,
    true where that node's token id is bad.

    Raises:
        UnsupportedOperation: an op without an emitter.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_kernels(graph, KERNELS, "onnxruntime")
    np_dtype = np.dtype(dtype)
    elem = {np.dtype(np.float32): TensorProto.FLOAT,
            np.dtype(np.float64): TensorProto.DOUBLE}[np_dtype]
    b = _Builder(helper, numpy_helper, np_dtype)
    names = {n.name: f"v{i}" for i, n in enumerate(graph.nodes)}
    shapes = {n.name: n.shape for n in graph.nodes}
    for node in graph.nodes[1:]:
        view = _NodeView(node, [shapes[s] for s in node.inputs])
        KERNELS[node.op](b, view, [names[s] for s in node.inputs], names[node.name])
    inp = helper.make_tensor_value_info(names[graph.input.name], elem,
                                        ["batch", *graph.input_shape])
    outp = helper.make_tensor_value_info(names[graph.output], elem,
                                         ["batch", *graph.output_shape])
    flags = [helper.make_tensor_value_info(name, TensorProto.BOOL, ["batch", *shape])
             for name, shape in b.checks]
    g = helper.make_graph(b.nodes, "veil_tee", [inp], [outp, *flags], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
                              producer_name="veil")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class OnnxRuntimeExecutor:
    """Runs ``graph`` in onnxruntime's CPU provider with ``threads`` intra-op threads
    (None: onnxruntime's default, one per physical core)."""

    name = "onnxruntime"

    def __init__(self, graph: Graph, dtype: str = "float32", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise TEEError("the 'onnxruntime' TEE runtime is not installed: "
                           "pip install 'veil[tee]'") from None
        self.dtype = dtype
        model = to_onnx(graph, dtype)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3         # no per-session chatter on the host's log
        self._session = ort.InferenceSession(model.SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._vocab = [n.params["table"].shape[0] for n in graph.nodes if n.op is Op.EMBED]

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """Raises:
            InputError: an EMBED node read a token id that is not an integer in its
                vocabulary (as the reference kernel)."""
        x = np.ascontiguousarray(xs, dtype=self.dtype)
        y, *bad = self._session.run(None, {self._input: x})
        for flags, vocab in zip(bad, self._vocab):
            if flags.any():
                raise InputError(f"token ids must be integers in [0, {vocab})")
        return y.astype(np.float64)

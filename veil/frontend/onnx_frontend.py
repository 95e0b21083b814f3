"""ONNX frontend: map an ONNX model (proto or file) onto veil's IR.

onnx is imported lazily. The ONNX graph input carries a batch dimension (static or
symbolic); the IR is per sample. Initializers and ``Constant`` outputs are constants;
shape computations (``Shape``/``Gather``/``Unsqueeze``/``Concat``) are evaluated on
numpy object arrays in which :data:`BATCH` stands for the batch size.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

from ..errors import GraphError, InputError, UnsupportedOperation
from ..ir import Graph, Op
from ..ir.head import split_head
from . import _layers as layers
from . import _onnx_ml as ml
from ._builder import BATCH, GraphBuilder, Site, flatten_shape, per_channel, per_sample_reshape
from ._onnx_patterns import FUSED_DOMAIN, fuse_activations, live_nodes

logger = logging.getLogger(__name__)

_DOMAINS = ("", "ai.onnx", FUSED_DOMAIN)
_FLOAT_TYPES = (1, 10, 11, 16)       # float, float16, double, bfloat16
# ops that pass a label (an argmax, cast or reshaped) through unchanged
_LABEL_PASS = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
_UNARY = {"Relu": Op.RELU, "Sigmoid": Op.SIGMOID, "Tanh": Op.TANH, "SiLU": Op.SILU}


def onnx_to_graph(model: Any, input_shape: tuple[int, ...], output: str | None = None
                  ) -> Graph:
    """Convert an ``onnx.ModelProto`` or ``.onnx`` path to a verified :class:`Graph`.

    A graph with several outputs (a scikit-learn classifier's label and probabilities)
    is converted for one: ``output`` names it; by default the first that holds scores
    (not labels). A label output is computed by the client from the scores
    (``graph.head``, :mod:`veil.ir.head`), as is a final softmax or sigmoid.

    Raises:
        InputError: the file is missing, ``input_shape`` contradicts the model's
            static input shape, or ``output`` is not one of the graph's outputs.
        GraphError: the model is not valid ONNX or does not fit ``input_shape``.
        UnsupportedOperation: an operation has no IR equivalent (names op and node).
    """
    import onnx

    proto = _load(onnx, model)
    try:
        # A path is checked from the file: checking a proto serializes a copy of it
        # (0.5 GB for VGG-16).
        onnx.checker.check_model(os.fspath(model) if proto is not model else proto)
    except onnx.checker.ValidationError as exc:
        raise GraphError(f"invalid ONNX model: {exc}") from exc
    graph = proto.graph
    consts = _constants(onnx, graph)
    if proto is not model:  # loaded here: drop the weights' second copy early
        graph.ClearField("initializer")
    x_name, batch = _graph_input(graph, consts, input_shape)
    out_name = _pick_output(graph, output)
    fused = fuse_activations(list(graph.node), consts)
    needed = live_nodes(fused, out_name)
    # the other outputs' nodes too, where they convert: a label output names the
    # classes of the scores the chosen output holds
    live = {id(n) for o in graph.output for n in live_nodes(fused, o.name)}
    nodes = [n for n in fused if id(n) in live]
    logger.debug("converting %d live ONNX nodes of %d", len(needed), len(graph.node))
    converter = _Converter(GraphBuilder(input_shape), consts, batch, nodes, out_name)
    converter.tensors[x_name] = converter.b.input
    required = {id(n) for n in needed}
    for node in nodes:
        try:
            converter.convert(node)
        except UnsupportedOperation:
            if id(node) in required:
                raise
            logger.debug("skipped %s (not needed for output %r)", node.op_type, out_name)
    return converter.finish(out_name)


def _pick_output(graph: Any, output: str | None) -> str:
    names = [o.name for o in graph.output]
    if output is not None:
        if output not in names:
            raise InputError(f"the ONNX graph has no output {output!r}; its outputs are "
                             f"{names}")
        return output
    if len(names) == 1:
        return names[0]
    for o in graph.output:          # scores: a float tensor, or ZipMap's maps of them
        kind = o.type.WhichOneof("value")
        if kind == "sequence_type" or (kind == "tensor_type"
                                       and o.type.tensor_type.elem_type in _FLOAT_TYPES):
            logger.info("the ONNX graph has outputs %s; converting %r (pass output= to "
                        "choose)", names, o.name)
            return o.name
    return names[0]


def _load(onnx: Any, model: Any) -> Any:
    if not isinstance(model, (str, os.PathLike)):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InputError(f"no ONNX file at {path!r}")
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(path)
    except (DecodeError, ValueError, OSError) as exc:
        raise GraphError(f"cannot read ONNX model {path!r}: {exc}") from exc


def _constants(onnx: Any, graph: Any) -> dict[str, np.ndarray]:
    """Initializers and the outputs of ``Constant`` nodes, as numpy arrays."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        value = helper.get_attribute_value(attr) if attr is not None else None
        if attr is not None and attr.name == "value":
            consts[node.output[0]] = numpy_helper.to_array(value)
        elif attr is not None and attr.name in ("value_float", "value_floats",
                                                "value_int", "value_ints"):
            consts[node.output[0]] = np.asarray(value)
        else:
            raise UnsupportedOperation(f"unsupported operation Constant (ONNX op) at node "
                                       f"{node.name!r}: only tensor and numeric values")
    return consts


def _graph_input(graph: Any, consts: dict, input_shape: tuple[int, ...]) -> tuple[str, Any]:
    """The graph's one data input and its static batch size (None if symbolic)."""
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise UnsupportedOperation(f"the ONNX graph has {len(inputs)} data inputs "
                                   f"{[i.name for i in inputs]}; veil supports exactly one")
    x = inputs[0]
    ttype = x.type.tensor_type
    if not ttype.HasField("shape"):
        return x.name, None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
    shown = tuple("N" if d is None else d for d in dims)
    wanted = (len(input_shape) + 1 == len(dims)
              and all(d is None or d == s for d, s in zip(dims[1:], input_shape)))
    if not wanted:
        raise InputError(f"input_shape {tuple(input_shape)} does not match the ONNX model's "
                         f"input {x.name!r} of shape {shown} (batch first); pass the "
                         f"per-sample shape {shown[1:]}")
    return x.name, dims[0]


class _Converter:
    """Converts ONNX nodes one by one; ``tensors`` maps ONNX names to IR names."""

    def __init__(self, builder: GraphBuilder, consts: dict, batch: Any, nodes: list,
                 output: str) -> None:
        self.b = builder
        self.values: dict[str, np.ndarray] = dict(consts)
        self.tensors: dict[str, str] = {}
        self.labels: dict[str, ml.Label] = {}     # ONNX name -> a classifier's label
        self.classes: dict[str, tuple | None] = {}  # IR scores -> their class labels
        self.batch = batch
        self.used = {i for n in nodes for i in n.input} | {output}
        self.table: dict[str, Callable[[Site, Any, dict], Any]] = {
            "Gemm": self._gemm, "MatMul": self._matmul, "Conv": self._conv,
            "BatchNormalization": self._batchnorm, "Gelu": self._gelu,
            "AveragePool": self._avgpool, "MaxPool": self._maxpool,
            "GlobalAveragePool": self._global_pool, "ReduceMean": self._reduce_mean,
            "Flatten": self._flatten, "Reshape": self._reshape, "Dropout": self._alias,
            "Identity": self._alias, "Add": self._arith, "Sub": self._arith,
            "Mul": self._arith, "Div": self._arith, "Pow": self._pow,
            "Constant": self._constant, "Shape": self._shape, "Gather": self._gather,
            "Unsqueeze": self._unsqueeze, "Squeeze": self._squeeze, "Concat": self._concat,
            "Cast": self._cast, "Clip": self._clip, "HardSwish": self._hardswish,
            "HardSigmoid": self._hardsigmoid, "Transpose": self._transpose,
            "Softmax": self._softmax, "LayerNormalization": self._layernorm,
            "ReduceSum": self._reduce_sum, "ArgMax": self._argmax,
        }
        for op_type in _UNARY:
            self.table[op_type] = self._unary

    def convert(self, node: Any) -> None:
        """Convert one node and record its outputs."""
        from onnx import helper

        site = Site(node.op_type, "ONNX op", node.name or node.output[0])
        if node.op_type in _LABEL_PASS and node.input and node.input[0] in self.labels:
            self.labels[node.output[0]] = self.labels[node.input[0]]
            return
        if node.domain == ml.ML_DOMAIN:
            handler = ml.HANDLERS.get(node.op_type)
            handler = handler and (lambda s, n, a, h=handler: h(self, s, n, a))
        else:
            handler = self.table.get(node.op_type) if node.domain in _DOMAINS else None
        if handler is None:
            raise site.error("" if node.domain in _DOMAINS + (ml.ML_DOMAIN,)
                             else f"domain {node.domain!r}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        result = handler(site, node, attrs)
        if not isinstance(result, dict):
            extra = [o for o in node.output[1:] if o in self.used]
            if extra:
                raise site.error(f"its secondary outputs {extra} are not supported")
            result = {node.output[0]: result}
        for name, value in result.items():
            if isinstance(value, ml.Label):
                self.labels[name] = value
            elif isinstance(value, str):
                self.tensors[name] = value
            else:
                self.values[name] = np.asarray(value)

    def finish(self, out_name: str) -> Graph:
        """The graph for ONNX output ``out_name``, its output head split off."""
        returns = "scores"
        if out_name in self.labels:
            label, returns = self.labels[out_name], "labels"
            out, classes = label.scores, label.classes
        elif out_name in self.tensors:
            out = self.tensors[out_name]
            classes = self._classes_of(out)
        else:
            raise UnsupportedOperation(f"the ONNX graph output {out_name!r} does not depend "
                                       "on the input")
        return split_head(self.b.finish(out), labels=classes, returns=returns)

    def _classes_of(self, scores: str) -> tuple | None:
        """The class labels of ``scores``: its own (a ZipMap's), else those of a label
        computed from it or from a value it is computed from (a normalized softmax)."""
        lineage, todo = [], [scores]
        while todo:
            name = todo.pop(0)
            if name not in lineage:
                lineage.append(name)
                todo.extend(self.b.node(name).inputs)
        for name in lineage:
            if self.classes.get(name) is not None:
                return self.classes[name]
            for label in self.labels.values():
                if label.scores == name and label.classes is not None:
                    return label.classes
        return None

    # ---- operand access ------------------------------------------------------------

    def _tensor(self, site: Site, name: str) -> str:
        if name not in self.tensors:
            raise site.error(f"operand {name!r} must be computed from the model input, "
                             "not a constant")
        return self.tensors[name]

    def _const(self, site: Site, name: str, what: str) -> np.ndarray:
        value = self.values.get(name)
        if value is None or value.dtype == object:
            raise site.error(f"{what} ({name!r}) must be a constant (initializer)")
        return value

    def _opt_const(self, site: Site, node: Any, index: int, what: str) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return self._const(site, node.input[index], what)

    # ---- affine layers -------------------------------------------------------------

    def _gemm(self, site: Site, node: Any, attrs: dict) -> str:
        if attrs.get("transA", 0):
            raise site.error("transA=1 is not supported")
        x = self._tensor(site, node.input[0])
        mat = self._const(site, node.input[1], "B")
        weight = mat if attrs.get("transB", 0) else mat.T
        alpha = float(attrs.get("alpha", 1.0))
        if alpha != 1.0:  # (no float32 copy of the weight when there is nothing to scale)
            weight = alpha * weight.astype(np.float64)
        c = self._opt_const(site, node, 2, "C")
        bias = None
        if c is not None:
            c = c[0] if c.ndim == 2 and c.shape[0] == 1 else c
            try:
                bias = float(attrs.get("beta", 1.0)) * np.broadcast_to(c, weight.shape[:1])
            except ValueError as exc:
                raise site.error(f"C of shape {c.shape} is not a per-output bias") from exc
        return layers.linear(self.b, site, x, weight, bias)

    def _matmul(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        if node.input[1] in self.tensors:
            return layers.matmul(self.b, site, x, self.tensors[node.input[1]])
        mat = self._const(site, node.input[1], "the second operand")
        if mat.ndim != 2:
            raise site.error(f"the second operand has shape {mat.shape}; expected a matrix")
        return layers.linear(self.b, site, x, mat.T, None)

    def _conv(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        weight = self._const(site, node.input[1], "W")
        if weight.ndim != 4:
            raise site.error(f"weight of shape {weight.shape}; only 2-D convolution is supported")
        dilation = tuple(attrs.get("dilations", [1, 1]))
        geometry = self._window(site, x, tuple(weight.shape[2:]), attrs, dilation)
        bias = self._opt_const(site, node, 2, "B")
        return layers.conv2d(self.b, site, x, weight, bias, geometry["stride"],
                             geometry["padding"], dilation, int(attrs.get("group", 1)))

    def _window(self, site: Site, x: str, kernel: tuple[int, ...], attrs: dict,
                dilation: tuple[int, ...] = (1, 1)) -> dict:
        """kernel / stride / symmetric padding of a 2-D conv or pooling window."""
        if len(self.b.shape(x)) != 3 or len(kernel) != 2 or len(dilation) != 2:
            raise site.error(f"only 2-D windows on (C, H, W) values; input {self.b.shape(x)}")
        if "dilations" in attrs and tuple(attrs["dilations"]) != tuple(dilation):
            raise site.error(f"dilations={attrs['dilations']}; only 1 is supported here")
        stride = tuple(attrs.get("strides", [1, 1]))
        span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            padding = tuple(self._same_pad(site, n, k, s)
                            for n, k, s in zip(self.b.shape(x)[1:], span, stride))
        elif auto_pad == "VALID":
            padding = (0, 0)
        else:
            t, l, b, r = attrs.get("pads", [0, 0, 0, 0])
            if (t, l) != (b, r):
                raise site.error(f"asymmetric pads {attrs['pads']} are not supported")
            padding = (t, l)
        return {"kernel": kernel, "stride": stride, "padding": padding}

    @staticmethod
    def _same_pad(site: Site, size: int, kernel: int, stride: int) -> int:
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        if total % 2:
            raise site.error("auto_pad SAME pads asymmetrically here; not supported")
        return total // 2

    def _batchnorm(self, site: Site, node: Any, attrs: dict) -> str:
        if attrs.get("training_mode", 0):
            raise site.error("training_mode=1 is not supported")
        x = self._tensor(site, node.input[0])
        gamma, beta, mean, var = (self._const(site, name, what) for name, what in zip(
            node.input[1:5], ("scale", "B", "input_mean", "input_var")))
        scale = gamma / np.sqrt(var.astype(np.float64) + float(attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        return self.b.add(site.node, Op.BATCHNORM, [x], {}, {"scale": scale, "shift": shift})

    # ---- activations and pooling ----------------------------------------------------

    def _unary(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.activation(self.b, site, x, _UNARY[node.op_type])

    def _clip(self, site: Site, node: Any, attrs: dict) -> str:
        """Bounds are inputs 1 and 2 from opset 11, attributes min/max before."""
        x = self._tensor(site, node.input[0])
        lo, hi = attrs.get("min"), attrs.get("max")
        for index, what in ((1, "min"), (2, "max")):
            bound = self._opt_const(site, node, index, what)
            if bound is not None:
                if bound.size != 1:
                    raise site.error(f"{what} must be a scalar, got shape {bound.shape}")
                value = float(bound.ravel()[0])
                lo, hi = (value, hi) if what == "min" else (lo, value)
        return layers.clip(self.b, site, x, lo, hi)

    def _hardswish(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.activation(self.b, site, x, Op.HARDSWISH)

    def _hardsigmoid(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.hardsigmoid(self.b, site, x, float(attrs.get("alpha", 0.2)),
                                  float(attrs.get("beta", 0.5)))

    def _gelu(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.gelu(self.b, site, x, attrs.get("approximate", "none"))

    def _avgpool(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        w = self._window(site, x, tuple(attrs.get("kernel_shape", ())), attrs)
        # ONNX defaults to count_include_pad=0 (torch to 1); without padding and without
        # ceil-mode overhang both count the same cells, so keep torch's default there.
        counts_pad = bool(attrs.get("count_include_pad", 0)) or (
            w["padding"] == (0, 0) and not attrs.get("ceil_mode", 0))
        return layers.avgpool(self.b, site, x, w["kernel"], w["stride"], w["padding"],
                              bool(attrs.get("ceil_mode", 0)), counts_pad)

    def _maxpool(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        w = self._window(site, x, tuple(attrs.get("kernel_shape", ())), attrs)
        return layers.maxpool(self.b, site, x, w["kernel"], w["stride"], w["padding"],
                              1, bool(attrs.get("ceil_mode", 0)))

    def _global_pool(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.adaptive_avgpool(self.b, site, x, 1)

    def _reduce_mean(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(site, node.input[1], "axes").tolist()
        return layers.mean(self.b, site, x, axes, bool(attrs.get("keepdims", 1)))

    # ---- shape handling --------------------------------------------------------------

    def _transpose(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        rank = len(self.b.shape(x)) + 1
        perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
        if perm[0] != 0:
            raise site.error(f"perm {perm} moves the batch axis")
        return layers.transpose(self.b, site, x, [p - 1 for p in perm[1:]])

    def _softmax(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        return layers.softmax(self.b, site, x, int(attrs.get("axis", -1)))

    def _argmax(self, site: Site, node: Any, attrs: dict) -> Any:
        return ml.argmax(self, site, node, attrs)

    def _layernorm(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        weight = self._const(site, node.input[1], "scale")
        bias = self._opt_const(site, node, 2, "B")
        return layers.layernorm(self.b, site, x, int(attrs.get("axis", -1)), weight, bias,
                                float(attrs.get("epsilon", 1e-5)))

    def _reduce_sum(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._const(site, node.input[1], "axes").tolist()
        if not axes:
            raise site.error("a sum over all axes mixes samples of a batch")
        return layers.reduce_sum(self.b, site, x, list(axes), bool(attrs.get("keepdims", 1)))

    def _flatten(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        axis = int(attrs.get("axis", 1))
        rank = len(self.b.shape(x)) + 1
        if axis % rank != 1 or not -rank <= axis < rank:
            raise site.error(f"axis={axis}; only axis=1 keeps samples apart")
        shape = flatten_shape(self.b.shape(x), 1, -1)
        return self.b.add(site.node, Op.RESHAPE, [x], {"shape": shape})

    def _reshape(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        spec = self.values.get(node.input[1])
        if spec is None or spec.ndim != 1:
            raise site.error("the target shape must be a constant (or computed from shapes)")
        in_shape = self.b.shape(x)
        full = (BATCH,) + in_shape
        entries = [full[i] if (d is not BATCH and int(d) == 0 and not attrs.get("allowzero", 0)
                               and i < len(full)) else d for i, d in enumerate(spec.tolist())]
        aliases = () if self.batch is None else (self.batch,)
        try:
            shape = per_sample_reshape(entries, in_shape, aliases)
        except ValueError as exc:
            raise site.error(str(exc)) from exc
        return self.b.add(site.node, Op.RESHAPE, [x], {"shape": shape})

    def _alias(self, site: Site, node: Any, attrs: dict) -> Any:
        name = node.input[0]
        return self.tensors[name] if name in self.tensors else self._value(site, name)

    def _value(self, site: Site, name: str) -> np.ndarray:
        if name not in self.values:
            raise site.error(f"operand {name!r} must be a constant or a shape computation")
        return self.values[name]

    def _constant(self, site: Site, node: Any, attrs: dict) -> np.ndarray:
        return self.values[node.output[0]]

    def _shape(self, site: Site, node: Any, attrs: dict) -> np.ndarray:
        name = node.input[0]
        if name in self.tensors:
            dims = np.array((BATCH,) + self.b.shape(self.tensors[name]), dtype=object)
        else:
            dims = np.array(self._value(site, name).shape, dtype=np.int64)
        return dims[attrs.get("start", 0):attrs.get("end", len(dims))]

    def _gather(self, site: Site, node: Any, attrs: dict) -> Any:
        data, idx = node.input[0], node.input[1]
        axis = int(attrs.get("axis", 0))
        if idx in self.tensors:                      # a token embedding lookup
            table = self._const(site, data, "the embedding table")
            if axis != 0 or table.ndim != 2:
                raise site.error("only a lookup of rows (axis 0) of a 2-D table is supported")
            return layers.embed(self.b, site, self.tensors[idx], table)
        index = self._const(site, idx, "indices")
        if data in self.tensors:                     # x[:, i] on a per-sample axis
            if index.ndim != 0:
                raise site.error("gathering a tensor supports one scalar index")
            return layers.select(self.b, site, self.tensors[data], axis, int(index))
        return np.take(self._value(site, data), index, axis=axis)

    def _axes(self, site: Site, node: Any, attrs: dict) -> list[int]:
        if "axes" in attrs:
            return list(attrs["axes"])
        if len(node.input) > 1 and node.input[1]:
            return self._const(site, node.input[1], "axes").tolist()
        return []

    def _unsqueeze(self, site: Site, node: Any, attrs: dict) -> Any:
        axes = self._axes(site, node, attrs)
        if node.input[0] in self.tensors:
            return layers.unsqueeze(self.b, site, self.tensors[node.input[0]], axes)
        data = self._value(site, node.input[0])
        rank = data.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            data = np.expand_dims(data, axis)
        return data

    def _squeeze(self, site: Site, node: Any, attrs: dict) -> Any:
        axes = self._axes(site, node, attrs)
        if node.input[0] in self.tensors:
            return layers.squeeze(self.b, site, self.tensors[node.input[0]], axes)
        data = self._value(site, node.input[0])
        return np.squeeze(data, axis=tuple(axes) if axes else None)

    def _concat(self, site: Site, node: Any, attrs: dict) -> Any:
        if any(name in self.tensors for name in node.input):
            xs = [self._tensor(site, name) for name in node.input]
            return layers.concat(self.b, site, xs, int(attrs["axis"]))
        parts = [np.atleast_1d(self._value(site, name)) for name in node.input]
        return np.concatenate(parts, axis=int(attrs.get("axis", 0)))

    def _cast(self, site: Site, node: Any, attrs: dict) -> Any:
        from onnx import helper

        target = np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        name = node.input[0]
        if name in self.tensors:
            if target.kind != "f" and not self.b.from_input(self.tensors[name]):
                raise site.error(f"casting a computed tensor to {target} is not supported "
                                 "(only the model input's token ids may be cast to integers)")
            return self.tensors[name]
        value = self._value(site, name)
        return value if value.dtype == object else value.astype(target)

    # ---- elementwise arithmetic ------------------------------------------------------

    def _pow(self, site: Site, node: Any, attrs: dict) -> str:
        x = self._tensor(site, node.input[0])
        exponent = self._const(site, node.input[1], "the exponent")
        if exponent.size != 1 or float(exponent.ravel()[0]) not in (1.0, 2.0):
            raise site.error(f"exponent {exponent.ravel().tolist()}; only 2 is supported")
        if float(exponent.ravel()[0]) == 1.0:
            return x
        return self.b.add(site.node, Op.SQUARE, [x])

    def _arith(self, site: Site, node: Any, attrs: dict) -> Any:
        a, b = node.input
        op = node.op_type
        if a in self.tensors and b in self.tensors:
            return self._arith_tensors(site, op, self.tensors[a], self.tensors[b])
        if a not in self.tensors and b not in self.tensors:
            x, y = self._const(site, a, "A"), self._const(site, b, "B")
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                    "Div": np.divide}[op](x, y)
        first = a in self.tensors
        x = self.tensors[a if first else b]
        c = self._const(site, b if first else a, "the constant operand").astype(np.float64)
        if op == "Div" and not first:
            raise site.error("dividing a constant by a tensor is not supported")
        if op == "Div" and np.any(c == 0):
            raise site.error("division by zero")
        if op in ("Mul", "Div"):
            scale, shift = (c if op == "Mul" else 1.0 / c), 0.0
        else:
            scale, shift = (1.0, c) if op == "Add" else ((1.0, -c) if first else (-1.0, c))
        shape = self.b.shape(x)
        try:
            pc_scale, pc_shift = per_channel(scale, shape), per_channel(shift, shape)
        except ValueError:
            # a constant varying within a channel: position embeddings, a bias over
            # the last axis of a (tokens, features) value
            return layers.const_affine(self.b, site, x, scale, shift)
        return self.b.affine(site.node, x, pc_scale, pc_shift)

    def _arith_tensors(self, site: Site, op: str, x: str, y: str) -> str:
        if op == "Div":
            return layers.divide(self.b, site, x, y)
        ir_op = {"Add": Op.ADD, "Sub": Op.SUB, "Mul": Op.MUL}.get(op)
        if ir_op is None:
            raise site.error(f"{op} of two tensors is not supported")
        return layers.binary(self.b, site, ir_op, x, y)

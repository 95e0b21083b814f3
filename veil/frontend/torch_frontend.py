"""PyTorch frontend: trace an ``nn.Module`` with torch.fx and map it onto veil's IR.

torch is imported lazily, inside the functions, so that ``import veil`` stays light.
Values flowing through the traced graph are either tensors computed from the model
input (:class:`_Tensor`, an IR node name), python numbers and tuples (sizes), the
symbolic batch size :data:`BATCH` (from ``x.size(0)``), or constant numpy arrays
(buffers and parameters read with ``get_attr``).
"""
from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import GraphError, TrainingModeWarning, UnsupportedOperation, warn
from ..ir import Graph, Op
from . import _layers as ops
from . import _onedim as onedim
from . import _poly
from ._builder import BATCH, GraphBuilder, Site, per_channel, per_sample_reshape

logger = logging.getLogger(__name__)

_KIND = {"call_module": "torch module", "call_function": "torch function",
         "call_method": "tensor method"}
Handler = Callable[[Site, tuple, dict], Any]


@dataclass(frozen=True)
class _Tensor:
    """A tensor computed from the model input; ``name`` is its IR node."""

    name: str


def torch_to_graph(model: Any, input_shape: tuple[int, ...]) -> Graph:
    """Trace ``model`` (in eval mode) and convert it to a verified :class:`Graph`.

    torch.fx first; a model fx cannot trace or map (Hugging Face transformers: their
    attention and layer norms are calls fx does not see through) goes through
    torch.onnx's exporter instead (:func:`_via_onnx`), refused when the exporter warns
    that the model's control flow depends on its input. The module's train/eval flags
    are restored afterwards; nothing else is changed.

    Raises:
        UnsupportedOperation: tracing fails or an operation has no IR equivalent.
        GraphError: the model does not fit ``input_shape``.

    Warns:
        TrainingModeWarning: a module of ``model`` is in training mode (it is read as
            in eval mode all the same).
    """
    found = training_mode_warning(model)
    if found is not None:
        warn(found)
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            gm = _trace(model)
            return _Converter(gm, input_shape).convert()
        except UnsupportedOperation as fx_error:
            try:
                graph = _via_onnx(model, input_shape)
            except (UnsupportedOperation, GraphError) as onnx_error:
                raise UnsupportedOperation(
                    f"{fx_error} (through torch.onnx instead: {onnx_error})") from fx_error
            logger.info("%s: torch.fx could not convert it (%s); converted through "
                        "torch.onnx (opset %d)", type(model).__name__, fx_error, ONNX_OPSET)
            return graph
    finally:
        for module, training in states:
            module.training = training


def _mode_dependent(module: Any) -> bool:
    """A module whose output depends on its training flag: batch / instance norms,
    dropout, torchvision's stochastic depth (a Linear or a ReLU computes the same in
    either mode, and a fresh ``nn.Module`` starts in training mode)."""
    from torch import nn

    return (isinstance(module, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd))
            or type(module).__name__ == "StochasticDepth")


def training_mode_warning(model: Any) -> TrainingModeWarning | None:
    """The warning for a module tree with a module in training mode, or None.

    veil always reads a model as in eval mode (:func:`torch_to_graph` traces it so):
    batch norms use their running statistics, dropout and stochastic depth are the
    identity, and ``if self.training`` branches take their eval side, which is what a
    trained model serves. A model left in ``train()`` mode would compute otherwise in
    torch, so the caller is told instead of silently getting a different function."""
    names = [repr(name) if name else "the model itself"
             for name, m in model.named_modules() if m.training and _mode_dependent(m)]
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4
                                    else "")
    return TrainingModeWarning(
        f"{type(model).__name__} is in training mode ({len(names)} modules: {shown}); "
        "veil compiles it as in "
        "eval mode (batch norms use their running statistics, dropout is the identity), "
        "so it will not match this module's training-mode outputs. Call model.eval() "
        "before compiling; veil leaves the model itself unchanged")


#: opset of the fallback export: 20 has Gelu and LayerNormalization as single ops
ONNX_OPSET = 20


def _via_onnx(model: Any, input_shape: tuple[int, ...]) -> Graph:
    """``model`` exported by torch.onnx (the TorchScript tracer, opset
    :data:`ONNX_OPSET`, in memory) and read by the ONNX frontend. The tracer records
    one path through Python control flow; it warns (TracerWarning) when that path
    depends on the input's values, and such a model is refused."""
    import io
    import warnings

    import torch

    from .onnx_frontend import onnx_to_graph

    buf = io.BytesIO()
    x = torch.zeros((1,) + tuple(input_shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            with torch.no_grad():
                torch.onnx.export(model, (x,), buf, opset_version=ONNX_OPSET, dynamo=False,
                                  input_names=["x"], output_names=["y"])
    except torch.jit.TracerWarning as exc:
        raise UnsupportedOperation(f"its control flow depends on the input ({exc})") from exc
    except Exception as exc:  # the exporter raises many kinds
        raise UnsupportedOperation(f"torch.onnx.export failed: {exc}") from exc
    import onnx

    proto = onnx.load_from_string(buf.getvalue())
    if len(proto.graph.output) != 1:
        raise UnsupportedOperation(f"the model returns {len(proto.graph.output)} tensors; "
                                   "veil supports models that return a single tensor")
    graph = onnx_to_graph(proto, tuple(input_shape))
    _check_export(model, graph, tuple(input_shape))
    return graph


def _check_export(model: Any, graph: Graph, input_shape: tuple[int, ...]) -> None:
    """The exporter can drop what ONNX cannot say (AvgPool2d's ``divisor_override``
    comes out as a plain average): the converted graph must compute what the module
    does on a probe input. Probes: normal noise, then all ones (token ids and a full
    attention mask), then zeros; the first that the module runs to a finite output and
    the graph accepts decides."""
    import torch

    from ..errors import InputError
    from ..ir import run

    rng = np.random.default_rng(0)
    for probe in (rng.normal(size=(2,) + input_shape), np.ones((2,) + input_shape),
                  np.zeros((2,) + input_shape)):
        try:
            with torch.no_grad():
                want = model(torch.as_tensor(probe, dtype=torch.float32)).double().numpy()
        except Exception:            # noise where token ids belong: an embedding's
            continue                 # IndexError; the next probe may suit the model
        if not np.all(np.isfinite(want)):
            continue
        try:
            got = run(graph, probe)
            got = graph.head.finish(got) if graph.head is not None else got
        except InputError:           # e.g. noise where token ids belong
            continue
        scale = 1.0 + float(np.abs(want).max())
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
        if diff > 1e-3 * scale:
            raise UnsupportedOperation(
                "the graph torch.onnx exported computes something else than the module "
                f"(largest difference {diff:.3g} on a probe input): the exporter dropped "
                "an attribute ONNX cannot express")
        return
    logger.warning("%s: no probe input gave a finite output; the torch.onnx export is "
                   "not checked against the module", type(model).__name__)


def _trace(model: Any) -> Any:
    try:
        return _poly.symbolic_trace(model)  # keeps veil_chebyshev() modules as leaves
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise UnsupportedOperation(
            f"torch.fx cannot trace {type(model).__name__}: {exc}. Hint: veil needs a "
            "forward() whose control flow does not depend on tensor values (no "
            "`if x.sum() > 0`, no loops over tensor data); move such logic out of the "
            "model") from exc


def _fetch_attr(gm: Any, target: str) -> Any:
    import torch

    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return ops.to_numpy(value) if isinstance(value, torch.Tensor) else value


def _fn_name(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], **defaults: Any) -> dict:
    """Bind positional and keyword arguments of a call to ``names``."""
    if len(args) > len(names):
        raise TypeError(f"too many arguments: {args}")
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool)


class _Converter:
    """Walks a traced ``GraphModule`` node by node, building IR nodes."""

    def __init__(self, gm: Any, input_shape: tuple[int, ...]) -> None:
        import torch.nn as nn

        self.gm = gm
        self.b = GraphBuilder(input_shape)
        self.env: dict[str, Any] = {}
        # (the 1-D layers first: their BatchNorm1d handler replaces the general one)
        self.module_table = onedim.module_handlers(nn) + ops.module_handlers(nn)
        self.function_table = self._function_table()
        self.method_table = self._method_table()
        # Functions of optional packages, matched by qualified name so that veil never
        # imports them: torchvision's stochastic depth (EfficientNet) is the identity
        # at inference, like dropout.
        self.named_table: dict[str, Handler] = {
            "torchvision.ops.stochastic_depth.stochastic_depth": self._stochastic_depth,
        }

    def convert(self) -> Graph:
        """Convert every node; return the verified graph."""
        placeholders = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOperation(
                f"forward() takes {len(placeholders)} inputs {placeholders}; veil supports "
                "models with exactly one tensor input")
        for node in self.gm.graph.nodes:
            if node.op == "output":
                return self.b.finish(self._output(node))
            self.env[node.name] = self._value(node)
        raise GraphError("the traced graph has no output node")

    def _output(self, node: Any) -> str:
        value = self.env[node.args[0].name] if hasattr(node.args[0], "name") else node.args[0]
        if not isinstance(value, _Tensor):
            raise UnsupportedOperation(
                f"the model returns {type(value).__name__} at node {node.name!r}; veil "
                "supports models that return a single tensor")
        return value.name

    def _value(self, node: Any) -> Any:
        import torch.fx

        if node.op == "placeholder":
            return _Tensor(self.b.input)
        if node.op == "get_attr":
            return _fetch_attr(self.gm, node.target)
        args = torch.fx.node.map_arg(node.args, lambda n: self.env[n.name])
        kwargs = dict(torch.fx.node.map_arg(node.kwargs, lambda n: self.env[n.name]))
        if node.op == "call_module":
            return self._call_module(node, self.gm.get_submodule(node.target), args, kwargs)
        if node.op == "call_function":
            site = Site(_fn_name(node.target), _KIND[node.op], node.name)
            handler = self.function_table.get(node.target) or self.named_table.get(site.what)
        else:
            site = Site(f"Tensor.{node.target}", _KIND[node.op], node.name)
            handler = self.method_table.get(node.target)
        if handler is None:
            raise site.error()
        try:
            return handler(site, tuple(args), kwargs)
        except TypeError as exc:  # a call signature veil does not understand
            raise site.error(f"cannot interpret arguments: {exc}") from exc

    def _call_module(self, node: Any, mod: Any, args: tuple, kwargs: dict) -> Any:
        site = Site(type(mod).__name__, _KIND[node.op], node.name)
        handler = _poly.handler(mod) or next(
            (h for cls, h in self.module_table if isinstance(mod, cls)), None)
        if handler is None:
            raise site.error(f"veil supports {ops.SUPPORTED_MODULES}, "
                             f"{onedim.SUPPORTED_MODULES}")
        if len(args) != 1 or kwargs:
            raise site.error("expects exactly one tensor argument")
        return _Tensor(handler(self.b, site, mod, self._tensor(site, args[0])))

    @staticmethod
    def _tensor(site: Site, value: Any) -> str:
        if not isinstance(value, _Tensor):
            raise site.error(f"expects a tensor computed from the model input, got "
                             f"{type(value).__name__}")
        return value.name

    # ---- tables -------------------------------------------------------------------

    def _function_table(self) -> dict[Any, Handler]:
        import torch
        import torch.nn.functional as F

        act = functools.partial
        table: dict[Any, Handler] = {
            F.relu: act(self._act, Op.RELU), torch.relu: act(self._act, Op.RELU),
            torch.relu_: act(self._act, Op.RELU), F.silu: act(self._act, Op.SILU),
            torch.sigmoid: act(self._act, Op.SIGMOID), F.sigmoid: act(self._act, Op.SIGMOID),
            torch.tanh: act(self._act, Op.TANH), F.tanh: act(self._act, Op.TANH),
            torch.square: act(self._act, Op.SQUARE), F.gelu: self._gelu,
            operator.add: self._add, torch.add: self._add, operator.sub: self._sub,
            torch.sub: self._sub, operator.mul: self._mul, torch.mul: self._mul,
            operator.truediv: self._div, torch.div: self._div, operator.pow: self._pow,
            torch.pow: self._pow, operator.floordiv: self._floordiv,
            torch.flatten: self._flatten, torch.reshape: self._reshape,
            torch.mean: self._mean, F.avg_pool2d: self._avgpool, F.max_pool2d: self._maxpool,
            F.adaptive_avg_pool2d: self._adaptive, F.linear: self._linear,
            getattr: self._getattr, operator.getitem: self._getitem,
            F.relu6: self._relu6, F.hardtanh: self._hardtanh, torch.clamp: self._clamp,
            torch.clip: self._clamp, F.hardswish: act(self._act, Op.HARDSWISH),
            F.hardsigmoid: act(self._act, Op.HARDSIGMOID), torch.cat: self._cat,
            torch.concat: self._cat, operator.iadd: self._add, operator.isub: self._sub,
            operator.imul: self._mul, F.conv2d: self._conv2d,
        }
        for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                     "feature_alpha_dropout"):
            if hasattr(F, name):
                table[getattr(F, name)] = self._dropout
        table.update({F.leaky_relu: self._leaky_relu, F.elu: self._elu, F.prelu: self._prelu,
                      F.conv1d: self._conv1d, F.max_pool1d: self._maxpool1d,
                      F.avg_pool1d: self._avgpool1d,
                      F.adaptive_avg_pool1d: self._adaptive1d})
        return table

    def _method_table(self) -> dict[str, Handler]:
        act = functools.partial
        return {
            "relu": act(self._act, Op.RELU), "relu_": act(self._act, Op.RELU),
            "sigmoid": act(self._act, Op.SIGMOID), "tanh": act(self._act, Op.TANH),
            "square": act(self._act, Op.SQUARE), "add": self._add, "sub": self._sub,
            "mul": self._mul, "div": self._div, "pow": self._pow, "view": self._reshape,
            "reshape": self._reshape, "flatten": self._flatten, "mean": self._mean,
            "size": self._size, "dim": self._dim, "contiguous": self._alias,
            "clone": self._alias, "clamp": self._clamp, "clip": self._clamp,
            "clamp_": self._clamp, "clip_": self._clamp, "add_": self._add,
            "mul_": self._mul, "sub_": self._sub, "relu6": self._relu6,
        }

    # ---- handlers: (site, args, kwargs) -> value ----------------------------------------

    def _emit(self, site: Site, op: Op, inputs: list[str], attrs: dict | None = None) -> _Tensor:
        return _Tensor(self.b.add(site.node, op, inputs, attrs))

    def _act(self, op: Op, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        return self._emit(site, op, [self._tensor(site, args[0])])

    def _gelu(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "approximate"), approximate="none")
        return _Tensor(ops.gelu(self.b, site, self._tensor(site, a["input"]), a["approximate"]))

    def _alias(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        return _Tensor(self._tensor(site, args[0]))

    def _dropout(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "p", "training", "inplace"), training=True)
        if a["training"] is True:
            warn(TrainingModeWarning(
                f"node {site.node!r}: {site.what} is called with training=True; veil "
                "treats it as the identity, as in eval mode"))
        return _Tensor(self._tensor(site, a["input"]))

    def _stochastic_depth(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "p", "mode", "training"), training=True)
        return self._dropout(site, (a["input"], a["p"], a["training"]), {})

    def _relu6(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "inplace"))
        return _Tensor(ops.clip(self.b, site, self._tensor(site, a["input"]), 0.0, 6.0))

    def _hardtanh(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "min_val", "max_val", "inplace"),
                  min_val=-1.0, max_val=1.0)
        x = self._tensor(site, a["input"])
        return _Tensor(ops.clip(self.b, site, x, a["min_val"], a["max_val"]))

    def _clamp(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "min", "max"), min=None, max=None)
        for bound in (a["min"], a["max"]):
            if bound is not None and not _is_number(bound):
                raise site.error("only constant number bounds are supported, got "
                                 f"{type(bound).__name__}")
        x = self._tensor(site, a["input"])
        return _Tensor(ops.clip(self.b, site, x, a["min"], a["max"]))

    def _cat(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("tensors", "dim"), dim=0)
        if not isinstance(a["tensors"], (tuple, list)):
            raise site.error("expects a sequence of tensors")
        xs = [self._tensor(site, t) for t in a["tensors"]]
        return _Tensor(ops.concat(self.b, site, xs, int(a["dim"])))

    def _conv_args(self, site: Site, args: tuple, kwargs: dict) -> tuple:
        """F.conv1d / F.conv2d's arguments: (input, weight, bias, stride, padding,
        dilation, groups), the weight and bias checked to be constants."""
        a = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation",
                                 "groups"), bias=None, stride=1, padding=0, dilation=1,
                  groups=1)
        weight, bias = a["weight"], a["bias"]
        if not isinstance(weight, np.ndarray) or not (bias is None
                                                      or isinstance(bias, np.ndarray)):
            raise site.error("weight and bias must be constant parameters of the model")
        return (self._tensor(site, a["input"]), weight, bias, a["stride"], a["padding"],
                a["dilation"], int(a["groups"]))

    def _conv2d(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        return _Tensor(ops.conv2d(self.b, site, *self._conv_args(site, args, kwargs)))

    def _affine_const(self, site: Site, x: _Tensor, scale: Any, shift: Any) -> _Tensor:
        shape = self.b.shape(x.name)
        try:
            scale_v = per_channel(np.asarray(scale, np.float64), shape)
            shift_v = per_channel(np.asarray(shift, np.float64), shape)
        except ValueError as exc:
            raise site.error(f"only scalar or per-channel constants are supported: {exc}") from exc
        return _Tensor(self.b.affine(site.node, x.name, scale_v, shift_v))

    def _check_const(self, site: Site, value: Any) -> None:
        if value is BATCH:
            raise site.error("arithmetic with the batch size is not supported")
        if not (_is_number(value) or isinstance(value, np.ndarray)):
            raise site.error(f"operand of type {type(value).__name__} is not supported")

    def _add(self, site: Site, args: tuple, kwargs: dict, sign: float = 1.0) -> Any:
        a = _bind(args, kwargs, ("input", "other"), alpha=1)
        x, y, alpha = a["input"], a["other"], a["alpha"]
        if alpha != 1:
            raise site.error(f"alpha={alpha} is not supported")
        if isinstance(x, _Tensor) and isinstance(y, _Tensor):
            op = Op.ADD if sign > 0 else Op.SUB
            return _Tensor(ops.binary(self.b, site, op, x.name, y.name))
        for value in (x, y):
            if not isinstance(value, _Tensor):
                self._check_const(site, value)
        if isinstance(x, _Tensor):
            return self._affine_const(site, x, 1.0, sign * np.asarray(y))
        if isinstance(y, _Tensor):
            return self._affine_const(site, y, sign, np.asarray(x))
        return x + sign * y

    def _sub(self, site: Site, args: tuple, kwargs: dict) -> Any:
        return self._add(site, args, kwargs, sign=-1.0)

    def _mul(self, site: Site, args: tuple, kwargs: dict) -> Any:
        a = _bind(args, kwargs, ("input", "other"))
        x, y = a["input"], a["other"]
        if isinstance(x, _Tensor) and isinstance(y, _Tensor):
            return _Tensor(ops.binary(self.b, site, Op.MUL, x.name, y.name))
        for value in (x, y):
            if not isinstance(value, _Tensor):
                self._check_const(site, value)
        if isinstance(y, _Tensor):
            x, y = y, x
        if isinstance(x, _Tensor):
            return self._affine_const(site, x, np.asarray(y), 0.0)
        return x * y

    def _div(self, site: Site, args: tuple, kwargs: dict) -> Any:
        a = _bind(args, kwargs, ("input", "other"), rounding_mode=None)
        x, y = a["input"], a["other"]
        if a["rounding_mode"] is not None or isinstance(y, _Tensor):
            raise site.error("only division of a tensor by a constant is supported")
        self._check_const(site, y)
        if np.any(np.asarray(y) == 0):
            raise site.error("division by zero")
        if isinstance(x, _Tensor):
            return self._affine_const(site, x, 1.0 / np.asarray(y, np.float64), 0.0)
        self._check_const(site, x)
        return x / y

    def _floordiv(self, site: Site, args: tuple, kwargs: dict) -> Any:
        for value in args:
            self._check_const(site, value)
        return args[0] // args[1]

    def _pow(self, site: Site, args: tuple, kwargs: dict) -> Any:
        a = _bind(args, kwargs, ("input", "exponent"))
        x, e = a["input"], a["exponent"]
        if not isinstance(x, _Tensor):
            self._check_const(site, x)
            self._check_const(site, e)
            return x ** e
        if not _is_number(e) or float(e) not in (1.0, 2.0):
            raise site.error(f"exponent {e!r}; only x**2 (and x**1) are supported")
        return x if float(e) == 1.0 else self._emit(site, Op.SQUARE, [x.name])

    def _flatten(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
        x = self._tensor(site, a["input"])
        return _Tensor(ops.flatten(self.b, site, x, a["start_dim"], a["end_dim"]))

    def _reshape(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        x = self._tensor(site, args[0])
        spec = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size"),)
        if len(spec) == 1 and isinstance(spec[0], (tuple, list)):
            spec = tuple(spec[0])
        if not all(d is BATCH or (_is_number(d) and int(d) == d) for d in spec):
            raise site.error(f"target shape {spec} must be built from integers and x.size(0)")
        try:
            shape = per_sample_reshape(spec, self.b.shape(x))
        except ValueError as exc:
            raise site.error(str(exc)) from exc
        return self._emit(site, Op.RESHAPE, [x], {"shape": shape})

    def _mean(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "dim", "keepdim"), dim=None, keepdim=False)
        if a.get("dtype") is not None:
            raise site.error("mean with a dtype is not supported")
        x = self._tensor(site, a["input"])
        return _Tensor(ops.mean(self.b, site, x, a["dim"], bool(a["keepdim"])))

    def _avgpool(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad", "divisor_override"),
                  stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                  divisor_override=None)
        x = self._tensor(site, a.pop("input"))
        return _Tensor(ops.avgpool(self.b, site, x, a["kernel_size"], a["stride"],
                                   a["padding"], a["ceil_mode"], a["count_include_pad"],
                                   a["divisor_override"]))

    def _maxpool(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "dilation",
                                 "ceil_mode", "return_indices"),
                  stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
        x = self._tensor(site, a["input"])
        return _Tensor(ops.maxpool(self.b, site, x, a["kernel_size"], a["stride"],
                                   a["padding"], a["dilation"], a["ceil_mode"],
                                   a["return_indices"]))

    def _adaptive(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "output_size"))
        x = self._tensor(site, a["input"])
        return _Tensor(ops.adaptive_avgpool(self.b, site, x, a["output_size"]))

    def _linear(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "weight", "bias"), bias=None)
        weight, bias = a["weight"], a["bias"]
        if not isinstance(weight, np.ndarray) or not (bias is None
                                                      or isinstance(bias, np.ndarray)):
            raise site.error("weight and bias must be constant parameters of the model")
        return _Tensor(ops.linear(self.b, site, self._tensor(site, a["input"]), weight, bias))

    # ---- shape arithmetic ---------------------------------------------------------

    def _shape_of(self, site: Site, value: Any) -> tuple:
        return (BATCH,) + self.b.shape(self._tensor(site, value))

    def _getattr(self, site: Site, args: tuple, kwargs: dict) -> Any:
        obj, attr = args[0], args[1]
        if isinstance(obj, _Tensor) and attr == "shape":
            return self._shape_of(site, obj)
        raise site.error(f"attribute {attr!r} is not supported")

    def _getitem(self, site: Site, args: tuple, kwargs: dict) -> Any:
        obj, index = args
        if isinstance(obj, _Tensor):
            raise site.error("indexing or slicing tensors is not supported")
        if isinstance(obj, (tuple, list)) and isinstance(index, (int, slice)):
            return obj[index]
        raise site.error(f"indexing a {type(obj).__name__} is not supported")

    def _size(self, site: Site, args: tuple, kwargs: dict) -> Any:
        a = _bind(args, kwargs, ("input", "dim"), dim=None)
        shape = self._shape_of(site, a["input"])
        return shape if a["dim"] is None else shape[int(a["dim"])]

    def _dim(self, site: Site, args: tuple, kwargs: dict) -> int:
        return len(self._shape_of(site, args[0]))

    # ---- 1-D layers and leaky rectifiers (``_onedim``) ----------------------------------

    def _leaky_relu(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "negative_slope", "inplace"), negative_slope=0.01)
        x = self._tensor(site, a["input"])
        return _Tensor(onedim.leaky_relu(self.b, site, x, a["negative_slope"]))

    def _elu(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "alpha", "inplace"), alpha=1.0)
        return _Tensor(onedim.elu(self.b, site, self._tensor(site, a["input"]), a["alpha"]))

    def _prelu(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "weight"))
        if not isinstance(a["weight"], np.ndarray):
            raise site.error("the slope must be a constant parameter of the model")
        x = self._tensor(site, a["input"])
        return _Tensor(onedim.prelu(self.b, site, x, a["weight"]))

    def _conv1d(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        return _Tensor(onedim.conv1d(self.b, site, *self._conv_args(site, args, kwargs)))

    def _maxpool1d(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "dilation",
                                 "ceil_mode", "return_indices"),
                  stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
        if a["return_indices"]:
            raise site.error("return_indices=True is not supported")
        x = self._tensor(site, a["input"])
        return _Tensor(onedim.pool1d(self.b, site, Op.MAXPOOL2D, x, a["kernel_size"],
                                     a["stride"], a["padding"], bool(a["ceil_mode"]),
                                     dilation=a["dilation"]))

    def _avgpool1d(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad"),
                  stride=None, padding=0, ceil_mode=False, count_include_pad=True)
        x = self._tensor(site, a["input"])
        return _Tensor(onedim.pool1d(self.b, site, Op.AVGPOOL2D, x, a["kernel_size"],
                                     a["stride"], a["padding"], bool(a["ceil_mode"]),
                                     bool(a["count_include_pad"])))

    def _adaptive1d(self, site: Site, args: tuple, kwargs: dict) -> _Tensor:
        a = _bind(args, kwargs, ("input", "output_size"))
        x = self._tensor(site, a["input"])
        return _Tensor(onedim.adaptive_avgpool1d(self.b, site, x, a["output_size"]))

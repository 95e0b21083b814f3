"""Polynomial-aware fine-tuning: train the network with the polynomials HE will run.

A low-degree Chebyshev fit of ReLU is a poor activation for a network trained with
ReLU, so compiling at degree 2 (two levels per activation instead of five) loses
accuracy. :func:`finetune` replaces every activation by a trainable polynomial
(:class:`PolyAct`), initialises it with a least-squares fit of the original function
on the values it sees, and fine-tunes the whole network so that the weights adapt to
the polynomial. The compiler then uses those coefficients as they are (one ``POLY``
node each, see ``veil.frontend._poly``), so ``simulate`` computes exactly the
fine-tuned model and its depth is set by the chosen degree.

torch is imported only when fine-tuning runs or :class:`PolyAct` is first accessed,
so importing this module (and ``veil``) stays light.
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import numpy as np
from numpy.polynomial import chebyshev

from .errors import CompileError, InputError
from .ir import Op
from .ir.interpreter import ELEMENTWISE

logger = logging.getLogger(__name__)

__all__ = ["PolyAct", "finetune", "replace_activations"]

DEFAULT_MARGIN = 0.1          # widen observed ranges by 10% per side, as the compiler does
CALIBRATION_SAMPLES = 1024    # training samples used for ranges when no calibration is given
_MAX_FIT_VALUES = 50_000      # activation inputs kept per module for the initial fit
_GRID_WEIGHT = 0.1            # share of the fit's weight spread uniformly over [lo, hi]
_CLIP_NORM = 10.0             # gradient-norm clip: a polynomial can turn a bad step into inf
_SOURCES = {"relu": Op.RELU, "gelu": Op.GELU, "silu": Op.SILU, "sigmoid": Op.SIGMOID,
            "tanh": Op.TANH}


def __getattr__(name: str) -> Any:
    # PolyAct subclasses torch.nn.Module: build it on first access, not at import.
    if name == "PolyAct":
        return _poly_act_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _poly_act_class() -> type:
    import torch
    from torch import nn

    class PolyAct(nn.Module):
        """A trainable polynomial ``sum_k coeffs[k] * T_k(t)``, t = (2x - lo - hi) / (hi - lo).

        ``coeffs`` (a parameter) are Chebyshev coefficients on the domain ``[lo, hi]``
        (a buffer); together they parametrise every polynomial of the given degree,
        with a well-conditioned basis when inputs stay near the domain. veil compiles
        the module to one POLY node with these exact coefficients (``veil_chebyshev``).

        Args:
            degree: polynomial degree (>= 1); sets the HE depth (degree 2: 2 levels).
            lo, hi: the domain the coefficients refer to.
            source: name of the activation it replaces ("relu", "gelu", ...).
        """

        def __init__(self, degree: int = 2, lo: float = -1.0, hi: float = 1.0,
                     source: str = "relu") -> None:
            super().__init__()
            if int(degree) < 1:
                raise InputError(f"PolyAct degree must be >= 1, got {degree}")
            if source not in _SOURCES:
                raise InputError(f"unknown source activation {source!r}; one of "
                                 f"{sorted(_SOURCES)}")
            self.source = source
            self.coeffs = nn.Parameter(torch.zeros(int(degree) + 1))
            self.register_buffer("domain", torch.tensor([float(lo), float(hi)]))
            self._record: list | None = None   # calibration: [min, max, samples]
            self._exact = False                 # calibration: compute the source function

        @property
        def degree(self) -> int:
            return self.coeffs.numel() - 1

        @property
        def veil_source(self) -> str:
            return f"poly({self.source})"

        def forward(self, x):
            if self._record is not None:
                _record_values(self._record, x)
            if self._exact:
                return _torch_source(self.source)(x)
            lo, hi = self.domain[0], self.domain[1]
            t = (2.0 * x - (lo + hi)) / (hi - lo)
            c = self.coeffs.to(x.dtype)
            out, prev, cur = c[0] + c[1] * t, torch.ones_like(t), t
            for k in range(2, c.numel()):
                prev, cur = cur, 2.0 * t * cur - prev
                out = out + c[k] * cur
            return out

        def veil_chebyshev(self) -> tuple[np.ndarray, float, float]:
            """(coefficients, lo, hi) as float64: the polynomial veil compiles."""
            lo, hi = self.domain.detach().cpu().double().tolist()
            return self.coeffs.detach().cpu().double().numpy().copy(), lo, hi

        def extra_repr(self) -> str:
            lo, hi = self.domain.tolist()
            return f"degree={self.degree}, domain=[{lo:.4g}, {hi:.4g}], source={self.source}"

    PolyAct.__module__, PolyAct.__qualname__ = __name__, "PolyAct"
    return PolyAct


def _torch_source(name: str):
    import torch
    import torch.nn.functional as F

    return {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh}[name]


def _record_values(record: list, x) -> None:
    values = x.detach().reshape(-1).double().cpu().numpy()
    if values.size == 0:
        return
    record[0] = min(record[0], float(values.min()))
    record[1] = max(record[1], float(values.max()))
    if values.size > _MAX_FIT_VALUES:  # a deterministic stride keeps the spread of values
        values = values[:: values.size // _MAX_FIT_VALUES + 1]
    record[2].append(values)


# ---- structure: which modules and calls become PolyAct ----------------------------------

def _activation_modules() -> dict[type, str]:
    from torch import nn

    return {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
            nn.Tanh: "tanh"}


def _activation_calls() -> tuple[dict[Any, str], dict[str, str]]:
    import torch
    import torch.nn.functional as F

    functions = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.gelu: "gelu",
                 F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                 torch.tanh: "tanh", F.tanh: "tanh"}
    methods = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
    return functions, methods


def _replace_modules(model: Any, degree: int) -> int:
    """Swap activation modules for PolyAct in place (shared modules stay shared)."""
    PolyAct = _poly_act_class()
    kinds = _activation_modules()
    made: dict[int, Any] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            source = next((s for cls, s in kinds.items() if type(child) is cls), None)
            if source is None:
                continue
            if id(child) not in made:
                made[id(child)] = PolyAct(degree, source=source)
            setattr(parent, name, made[id(child)])
    return len(made)


def _replace_calls(model: Any, degree: int) -> Any:
    """Turn functional activations (F.relu, x.tanh(), ...) into PolyAct submodules.

    Returns a ``torch.fx.GraphModule`` when there were any, otherwise ``model``.
    """
    from .frontend._poly import symbolic_trace

    try:
        gm = symbolic_trace(model)
    except Exception as exc:  # an untraceable model: veil cannot compile it either
        logger.warning("cannot trace %s to find functional activations (%s); only "
                       "activation modules were replaced", type(model).__name__, exc)
        return model
    functions, methods = _activation_calls()
    PolyAct = _poly_act_class()
    count = 0
    for node in list(gm.graph.nodes):
        table = {"call_function": functions, "call_method": methods}.get(node.op, {})
        source = table.get(node.target)
        if source is None:
            continue
        target = f"veil_act{count}"
        gm.add_submodule(target, PolyAct(degree, source=source))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if not count:
        return model
    gm.graph.lint()
    gm.recompile()
    return gm


def replace_activations(model: Any, *, degree: int = 2) -> Any:
    """A copy of ``model`` with every supported activation replaced by a :class:`PolyAct`.

    The coefficients are zero and every domain is [-1, 1]: use this to rebuild the
    structure of a fine-tuned model before loading its saved state dict.

    Args:
        model: a ``torch.nn.Module``; it is not modified.
        degree: polynomial degree of every PolyAct.

    Returns:
        The new module (a ``torch.fx.GraphModule`` when ``model`` calls activations as
        functions, otherwise a deep copy of ``model``'s own class).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if int(degree) < 1:
        raise InputError(f"degree must be >= 1, got {degree}")
    net = copy.deepcopy(model)
    _replace_modules(net, int(degree))
    net = _replace_calls(net, int(degree))
    if not _poly_modules(net):
        logger.info("%s has no supported activation to replace", type(model).__name__)
    return net


def _poly_modules(net: Any) -> list:
    PolyAct = _poly_act_class()
    return [m for m in net.modules() if isinstance(m, PolyAct)]


# ---- initialisation and domains ----------------------------------------------------------

def _widened(lo: float, hi: float, margin: float) -> tuple[float, float]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    width = max(hi - lo, 1e-3)
    return lo - margin * width, hi + margin * width


def _fit(source: str, values: np.ndarray, lo: float, hi: float, degree: int) -> np.ndarray:
    """Least-squares Chebyshev fit of ``source`` weighted by the observed values.

    A uniform grid over [lo, hi] carries a small share of the weight so the polynomial
    stays sensible where the calibration data is sparse.
    """
    fn = ELEMENTWISE[_SOURCES[source]]
    grid = np.linspace(lo, hi, 257)
    x = np.concatenate([values, grid])
    w = np.concatenate([np.full(values.size, (1 - _GRID_WEIGHT) / max(values.size, 1)),
                        np.full(grid.size, _GRID_WEIGHT / grid.size)])
    t = (2.0 * x - (lo + hi)) / (hi - lo)
    return chebyshev.chebfit(t, fn(x), degree, w=np.sqrt(w))


def _run(net: Any, x: np.ndarray, batch_size: int) -> None:
    import torch

    with torch.no_grad():
        for start in range(0, len(x), max(batch_size, 256)):
            net(torch.as_tensor(x[start:start + max(batch_size, 256)]))


def _initialise(net: Any, calibration: np.ndarray, margin: float, batch_size: int) -> None:
    """Fit each PolyAct to its source function, in execution order.

    Like the compiler, each fit sees the values produced with the earlier activations
    already replaced by their polynomials, which is what the network will compute.
    """
    import torch

    acts = _poly_modules(net)
    for act in acts:
        act._exact = True
    pending = list(acts)
    while pending:
        order: list = []
        handles = [a.register_forward_pre_hook(lambda m, _args: order.append(m))
                   for a in pending]
        for a in pending:
            a._record = [np.inf, -np.inf, []]
        _run(net, calibration, batch_size)
        for handle in handles:
            handle.remove()
        called = [a for a in order if a in pending]
        act = called[0] if called else pending[0]
        lo, hi = _widened(*(act._record[:2] if called else (-1.0, 1.0)), margin)
        values = np.concatenate(act._record[2]) if called else np.zeros(0)
        coeffs = _fit(act.source, values, lo, hi, act.degree)
        with torch.no_grad():
            act.coeffs.copy_(torch.as_tensor(coeffs))
            act.domain.copy_(torch.tensor([lo, hi]))
        act._exact = False
        for other in pending:
            other._record = None
        pending.remove(act)
        if not called:
            logger.warning("activation %s never ran on the calibration data; "
                           "fitted on [-1, 1]", act)


def _rebase(net: Any, calibration: np.ndarray, margin: float, batch_size: int) -> None:
    """Re-express each polynomial on the range it now sees (the same function).

    Training moves activation inputs; keeping |t| <= 1 on real data keeps the HE
    evaluation of higher-degree series numerically tame.
    """
    import torch

    acts = _poly_modules(net)
    for act in acts:
        act._record = [np.inf, -np.inf, []]
    _run(net, calibration, batch_size)
    for act in acts:
        rec, act._record = act._record, None
        if not np.isfinite(rec[0]):
            continue
        coeffs, lo, hi = act.veil_chebyshev()
        new_lo, new_hi = _widened(rec[0], rec[1], margin)
        series = chebyshev.Chebyshev(coeffs, domain=[lo, hi]).convert(
            domain=[new_lo, new_hi], kind=chebyshev.Chebyshev)
        padded = np.zeros(coeffs.size)
        padded[:series.coef.size] = series.coef
        with torch.no_grad():
            act.coeffs.copy_(torch.as_tensor(padded))
            act.domain.copy_(torch.tensor([new_lo, new_hi]))


# ---- the verb ---------------------------------------------------------------------------

def _check_data(model: Any, train_data: Any, calibration: Any,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        x, y = train_data
    except (TypeError, ValueError) as exc:
        raise InputError("train_data must be a pair (x, y) of arrays") from exc
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or y.shape != (len(x),) or len(x) == 0:
        raise InputError(f"train_data has x of shape {x.shape} and y of shape {y.shape}; "
                         "expected x (N, *input_shape) and integer labels y (N,)")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels have dtype {y.dtype}; pass integer class indices")
    calib = x[:CALIBRATION_SAMPLES] if calibration is None else np.asarray(calibration)
    if calib.shape[1:] != x.shape[1:] or len(calib) == 0:
        raise InputError(f"calibration has shape {calib.shape}; expected (B, "
                         f"{', '.join(map(str, x.shape[1:]))}) like the training inputs")
    for name, arr in (("training inputs", x), ("calibration", calib)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} contain NaN or infinity")
    dtype = _param_dtype(model)
    return x.astype(dtype), y.astype(np.int64), calib.astype(dtype)


def _param_dtype(model: Any) -> np.dtype:
    import torch

    p = next(iter(model.parameters()), None)
    return np.float64 if p is not None and p.dtype == torch.float64 else np.float32


def _accuracy(net: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    net.eval()
    with torch.no_grad():
        return float((net(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


def _train(net: Any, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
           batch_size: int, seed: int, validation=None, teacher=None,
           distill: float = 0.0, temperature: float = 4.0) -> list[float]:
    """Adam on cross-entropy; returns the mean loss of each epoch.

    With ``validation=(x, y)``, the weights of the epoch with the best validation
    accuracy are kept (early stopping without looking at test data). With a
    ``teacher`` and ``distill`` = a in (0, 1], the loss is (1 - a) * cross-entropy + a *
    T^2 * KL(teacher || student) on logits softened by ``temperature`` T: knowledge
    distillation (Hinton, Vinyals and Dean, 2015), the original network teaching its
    polynomial copy.
    """
    import copy

    import torch
    import torch.nn.functional as F

    best = (-1.0, None)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    net.train()
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            logits = net(xt[idx])
            loss = F.cross_entropy(logits, yt[idx])
            if distill > 0.0:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(xt[idx]) / temperature, dim=1)
                kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft,
                              reduction="batchmean", log_target=True)
                loss = (1.0 - distill) * loss + distill * temperature ** 2 * kl
            if not torch.isfinite(loss):
                raise CompileError(
                    f"fine-tuning diverged at epoch {epoch + 1} (loss {loss.item()}); "
                    "lower lr or degree, or pass calibration data that covers the inputs")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), _CLIP_NORM)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
        logger.info("finetune epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
        if validation is not None:
            acc = _accuracy(net, *validation)
            if acc > best[0]:
                best = (acc, copy.deepcopy(net.state_dict()))
            net.train()
    if best[1] is not None:
        net.load_state_dict(best[1])
    return losses


def finetune(model: Any, train_data: tuple[Any, Any], *, epochs: int = 3, degree: int = 2,
             lr: float = 1e-3, batch_size: int = 128, calibration: Any = None,
             seed: int = 0, validation: tuple[Any, Any] | None = None,
             distill: float = 0.0, temperature: float = 4.0) -> Any:
    """Replace activations by trainable polynomials and fine-tune the network.

    1. Copy ``model`` and swap every ReLU / GELU / SiLU / Sigmoid / Tanh (modules, and
       functional calls when the model can be traced with torch.fx) for a
       :class:`PolyAct` of ``degree``.
    2. Fit each polynomial, in execution order, by weighted least squares to the
       original function on the inputs it receives on ``calibration``.
    3. Train all parameters (weights and coefficients) with Adam on cross-entropy.
    4. Re-express each polynomial on the range it now sees (the same function).

    ``veil.compile`` turns each PolyAct into one POLY node with its own coefficients,
    so the ``degree`` argument of compile does not change them.

    Args:
        model: a trained classifier (``torch.nn.Module``) returning logits; not modified.
        train_data: ``(x, y)``: inputs (N, *input_shape) and integer labels (N,).
        epochs: passes over ``train_data``.
        degree: polynomial degree (2: one HE level per activation between linear
            layers, see ``fold_quadratic``; 3-5: three).
        lr: Adam learning rate.
        batch_size: minibatch size.
        calibration: inputs for measuring activation ranges; default: the first
            1024 training inputs.
        seed: seeds the batch order and torch's RNG (dropout) inside this call; the
            caller's global RNG state is restored afterwards.
        validation: optional held-out ``(x, y)``; the epoch with the best accuracy on it
            is kept. Never pass test data here.
        distill: weight in [0, 1] of knowledge distillation from ``model`` itself (the
            original activations) against cross-entropy on the labels; 0 turns it off.
        temperature: softening of both networks' logits for distillation.

    Returns:
        A new module in eval mode (see :func:`replace_activations` for its type).

    Raises:
        InputError: malformed training or calibration data, or degree < 1.
        CompileError: training diverged.
        TypeError: ``model`` is not a torch module.
    """
    import torch

    if int(epochs) < 0 or int(batch_size) < 1 or not lr > 0:
        raise InputError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}")
    if not 0.0 <= float(distill) <= 1.0 or not float(temperature) > 0.0:
        raise InputError(f"need 0 <= distill <= 1 and temperature > 0; got distill={distill}, "
                         f"temperature={temperature}")
    net = replace_activations(model, degree=degree)
    x, y, calib = _check_data(model, train_data, calibration)
    if validation is not None:
        vx, vy, _ = _check_data(model, validation, None)
        if vx.shape[1:] != x.shape[1:]:
            raise InputError(f"validation inputs have shape {vx.shape[1:]}; the training "
                             f"inputs have {x.shape[1:]}")
        validation = (vx, vy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.eval()
        _initialise(net, calib, DEFAULT_MARGIN, int(batch_size))
        teacher = None
        if distill > 0.0:
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        _train(net, x, y, epochs=int(epochs), lr=float(lr), batch_size=int(batch_size),
               seed=seed, validation=validation, teacher=teacher, distill=float(distill),
               temperature=float(temperature))
        net.eval()
        _rebase(net, calib, DEFAULT_MARGIN, int(batch_size))
    return net

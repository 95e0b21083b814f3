"""Frontends: turn user models (PyTorch modules, ONNX models) into a :class:`veil.ir.Graph`.

Neither torch nor onnx is imported here; each is imported only when a model of its
kind is converted.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import InputError, VeilWarning
from ..ir import Graph
from ..ir.head import split_head

__all__ = ["model_warnings", "to_graph"]


def _is_torch_module(model: Any) -> bool:
    """True for ``torch.nn.Module`` instances, without importing torch for other objects."""
    if not any(cls.__module__.startswith("torch") for cls in type(model).__mro__):
        return False
    import torch

    return isinstance(model, torch.nn.Module)


def _is_onnx_model(model: Any) -> bool:
    cls = type(model)
    return cls.__name__ == "ModelProto" and cls.__module__.startswith("onnx")


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input_shape must be a tuple of ints, got {input_shape!r}") from exc
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"input_shape {shape} must be non-empty with positive dimensions "
                         "(per sample, without the batch dimension), e.g. (1, 8, 8)")
    return shape


def to_graph(model: Any, input_shape: tuple[int, ...], *, output: str | None = None,
             client_head: bool = True) -> Graph:
    """Convert a model to veil's IR.

    Args:
        model: a ``torch.nn.Module``, an ``onnx.ModelProto``, or the path of an
            ``.onnx`` file (``str`` or ``os.PathLike``).
        input_shape: the per-sample input shape, without the batch dimension,
            e.g. ``(1, 8, 8)`` for an image or ``(30,)`` for a feature vector.
        output: an ONNX graph's output to convert (default: its scores, not labels).
        client_head: move the model's output head (a final softmax, sigmoid or
            log-softmax and what follows it, a classifier's labels) to the client
            (``graph.head``, :mod:`veil.ir.head`): exact and free there. False keeps a
            final activation on the server (its HE polynomial, its MPC protocol).

    Returns:
        A verified :class:`veil.ir.Graph` whose INPUT node is named ``"input"``.

    Raises:
        UnsupportedOperation: the model uses an operation veil cannot express; the
            message names the operation and the model's node.
        InputError: ``input_shape`` is malformed or contradicts the model's input.
        GraphError: the model is malformed or does not fit ``input_shape``.
        TypeError: ``model`` is of none of the accepted kinds.
    """
    shape = _check_input_shape(input_shape)
    if isinstance(model, (str, os.PathLike)) or _is_onnx_model(model):
        from .onnx_frontend import onnx_to_graph

        graph = onnx_to_graph(model, shape, output)
    elif _is_torch_module(model):
        from .torch_frontend import torch_to_graph

        if output is not None:
            raise InputError("output= picks one of an ONNX graph's outputs; a torch "
                             "module has one")
        graph = split_head(torch_to_graph(model, shape))
    else:
        raise TypeError(f"cannot convert a {type(model).__name__}; pass a torch.nn.Module, "
                        "an onnx.ModelProto or the path of an .onnx file")
    return graph if client_head else server_head(graph)


def server_head(graph: Graph) -> Graph:
    """``graph`` with its head's ops back on the server (labels stay with the client)."""
    from ..ir.head import Head, merge_head

    head = graph.head
    if head is None or head.graph is None:
        return graph
    return merge_head(graph, Head(None, head.labels, head.returns))


def model_warnings(model: Any) -> list[VeilWarning]:
    """What :func:`to_graph` warns about when it reads ``model`` (a torch module in
    training mode, read as in eval mode), for a caller that reports it too."""
    if _is_torch_module(model):
        from .torch_frontend import training_mode_warning

        found = training_mode_warning(model)
        return [found] if found is not None else []
    return []


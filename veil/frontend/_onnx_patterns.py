"""Rewrites of ONNX node lists before conversion: activation fusion and dead-node removal.

Exporters spell some activations as small subgraphs. SiLU is ``Mul(x, Sigmoid(x))``;
GELU before opset 20 is ``0.5 * x * (1 + Erf(x / sqrt(2)))``. :func:`fuse_activations`
replaces the final node of each such subgraph by one fused node with the same output;
:func:`live_nodes` then drops the intermediate nodes nothing else reads.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

FUSED_DOMAIN = "veil.fused"


def _scalar(consts: Mapping[str, np.ndarray], name: str) -> float | None:
    value = consts.get(name)
    if value is None or np.size(value) != 1 or value.dtype == object:
        return None
    return float(np.asarray(value, dtype=np.float64).ravel()[0])


def _close(value: float | None, target: float) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=1e-5)


def _make(helper: Any, op_type: str, x: str, node: Any, domain: str = "") -> Any:
    return helper.make_node(op_type, [x], list(node.output), name=node.name, domain=domain)


def _match_silu(node: Any, producer: Mapping[str, Any]) -> str | None:
    """``Mul(x, Sigmoid(x))`` (either order) -> x."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for a, b in (node.input, node.input[::-1]):
        p = producer.get(b)
        if p is not None and p.op_type == "Sigmoid" and p.input[0] == a:
            return a
    return None


def _erf_argument(e: str, producer: Mapping[str, Any],
                  consts: Mapping[str, np.ndarray]) -> str | None:
    """For ``e = Erf(x / sqrt 2)`` or ``Erf(x * (1 / sqrt 2))`` return x."""
    erf = producer.get(e)
    if erf is None or erf.op_type != "Erf":
        return None
    d = producer.get(erf.input[0])
    if d is None or len(d.input) != 2:
        return None
    if d.op_type == "Div" and _close(_scalar(consts, d.input[1]), math.sqrt(2.0)):
        return d.input[0]
    if d.op_type == "Mul":
        for x, c in (d.input, d.input[::-1]):
            if _close(_scalar(consts, c), 1.0 / math.sqrt(2.0)):
                return x
    return None


def _gelu_input(a: str, producer: Mapping[str, Any],
                consts: Mapping[str, np.ndarray]) -> str | None:
    """For ``a = 1 + Erf(x / sqrt 2)`` return x."""
    add = producer.get(a)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    for e, one in (add.input, add.input[::-1]):
        if _close(_scalar(consts, one), 1.0):
            x = _erf_argument(e, producer, consts)
            if x is not None:
                return x
    return None


def _factor_sets(node: Any, producer: Mapping[str, Any]) -> list[list[str]]:
    """The three-factor products ``node`` computes with one nested Mul."""
    sets = []
    for i in (0, 1):
        inner = producer.get(node.input[i])
        if inner is not None and inner.op_type == "Mul" and len(inner.input) == 2:
            sets.append([node.input[1 - i], inner.input[0], inner.input[1]])
    return sets


def _match_gelu(node: Any, producer: Mapping[str, Any],
                consts: Mapping[str, np.ndarray]) -> str | None:
    """``0.5 * x * (1 + Erf(x / sqrt 2))``, multiplied in any order -> x."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for factors in _factor_sets(node, producer):
        halves = [f for f in factors if _close(_scalar(consts, f), 0.5)]
        if len(halves) != 1:
            continue
        rest = list(factors)
        rest.remove(halves[0])
        for x, a in (rest, rest[::-1]):
            if _gelu_input(a, producer, consts) == x:
                return x
    return None


def fuse_activations(nodes: list[Any], consts: Mapping[str, np.ndarray]) -> list[Any]:
    """Replace SiLU and erf-GELU subgraphs by single fused nodes (same outputs)."""
    from onnx import helper

    producer = {out: n for n in nodes for out in n.output if out}
    fused = []
    for node in nodes:
        x = _match_gelu(node, producer, consts)
        if x is not None:
            fused.append(_make(helper, "Gelu", x, node))
            continue
        x = _match_silu(node, producer)
        fused.append(node if x is None else _make(helper, "SiLU", x, node, FUSED_DOMAIN))
    return fused


def live_nodes(nodes: list[Any], output: str) -> list[Any]:
    """The nodes ``output`` depends on, in their original (topological) order."""
    producer = {out: n for n in nodes for out in n.output if out}
    live: set[int] = set()
    stack = [output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        live.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n for n in nodes if id(n) in live]

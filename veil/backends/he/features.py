"""The throughput layout: one ciphertext per feature, one slot per input (CryptoNets,
Gilad-Bachrach et al., ICML 2016).

Each slot is an independent input, so a dense layer is a scalar-weighted sum of feature
ciphertexts and needs no rotation at all (only the relinearization key); a batch of up
to ``slots`` inputs costs the same as one. The client chooses this layout for large
batches when the compiler's cost estimate says it is cheaper per input.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ...errors import CompileError
from ...ir import Graph, Op


class FeatureEngine(Protocol):
    def linear_sum(self, cts: list[Any], weights: list[float]) -> Any: ...
    def add_scalar(self, a: Any, value: float) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def square(self, a: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def chebyshev(self, a: Any, coeffs: np.ndarray, lo: float, hi: float) -> Any: ...


class FeatureEvaluator:
    """Runs a lowered graph on lists of feature ciphertexts."""

    def __init__(self, graph: Graph) -> None:
        for node in graph.nodes:
            if node.op not in (Op.INPUT, Op.GATHER, Op.DENSE, Op.POLY, Op.SQUARE, Op.ADD,
                               Op.MUL):
                raise CompileError(f"{node.op.value} node {node.name!r} cannot run in the "
                                   "feature layout")
        self.graph = graph

    def _dense(self, engine: FeatureEngine, node, cts: list[Any]) -> list[Any]:
        m, b = node.params["matrix"], node.params["bias"]
        out = []
        for row, bias in zip(m, b):
            cols = np.flatnonzero(row)
            if cols.size == 0:  # a constant output: 0 * x + bias
                cols = np.array([0])
            acc = engine.linear_sum([cts[j] for j in cols], [float(row[j]) for j in cols])
            out.append(engine.add_scalar(acc, float(bias)) if bias else acc)
        return out

    def run(self, engine: FeatureEngine, cts: list[Any]) -> list[Any]:
        values: dict[str, list[Any]] = {self.graph.input.name: cts}
        for node in self.graph.nodes[1:]:
            args = [values[s] for s in node.inputs]
            if node.op is Op.GATHER:
                out = args[0]  # the client encrypted the gathered features
            elif node.op is Op.DENSE:
                out = self._dense(engine, node, args[0])
            elif node.op is Op.SQUARE:
                out = [engine.square(c) for c in args[0]]
            elif node.op is Op.MUL:
                out = [engine.mul(a, b) for a, b in zip(*args)]
            elif node.op is Op.POLY:
                coeffs = np.asarray(node.attrs["coeffs"])
                out = [engine.chebyshev(c, coeffs, node.attrs["lo"], node.attrs["hi"])
                       for c in args[0]]
            else:
                out = [engine.add(a, b) for a, b in zip(*args)]
            values[node.name] = out
        return values[self.graph.output]

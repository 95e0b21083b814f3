"""Runs a planned, linearized graph on any engine that implements :class:`SlotEngine`.

The evaluator holds no keys and imports no native library: the same code runs on
OpenFHE ciphertexts (``openfhe_engine``) and on numpy slot vectors (``slot_engine``),
which lets the layout logic be tested without cryptography.
"""
from __future__ import annotations

import contextlib
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from ...compiler.levels import SLOT_OPS
from ...compiler.plan import DensePlan, HEPlan, normalize_rotation, slot_diagonals
from ...errors import CompileError
from ...ir import Graph, Op
from .layout import spread, tile


class SlotEngine(Protocol):
    """The narrow interface the evaluator needs from a CKKS implementation.

    Optional: ``schedule_keys(layers)`` (the rotation keys of every layer in evaluation
    order) and ``enter_layer(i)``, for an engine that loads rotation keys per layer
    (``openfhe_engine.EvaluationSession`` for a bootstrapped model).
    """

    slots: int

    def add(self, a: Any, b: Any) -> Any: ...
    def add_plain(self, a: Any, values: np.ndarray, cache_key: tuple | None) -> Any: ...
    def mul_plain(self, a: Any, values: np.ndarray, cache_key: tuple | None) -> Any: ...
    def rotate(self, a: Any, k: int) -> Any: ...
    def rotate_hoisted(self, a: Any, ks: list[int]) -> dict[int, Any]: ...
    def settle(self, a: Any) -> Any: ...
    def chebyshev(self, a: Any, coeffs: np.ndarray, lo: float, hi: float) -> Any: ...
    def square(self, a: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def mul_scalar(self, a: Any, value: float) -> Any: ...
    def bootstrap(self, a: Any) -> Any: ...


class PreparedDense:
    """Diagonals of one dense layer, pre-rotated for baby-step/giant-step evaluation."""

    def __init__(self, name: str, matrix, bias: np.ndarray, plan: DensePlan,
                 slots: int, lanes: int = 1) -> None:
        self.name, self.plan, self.slots, self.lanes = name, plan, slots, lanes
        self.babies = sorted({plan.split(d)[1] for d in plan.diagonals} - {0})
        # A layer lowered from its kernels (a sparse matrix) keeps only that matrix and
        # lays out its diagonals each time it runs: a deep network's diagonals would
        # otherwise all be held at once (hundreds per layer, one slot vector each).
        self._source = (matrix, bias) if sp.issparse(matrix) else None
        if self._source is None:
            self._prepare(matrix, bias)

    def _prepare(self, matrix, bias: np.ndarray) -> None:
        plan, slots, lanes = self.plan, self.slots, self.lanes
        positions = slots // lanes
        length = max(plan.in_period, plan.out_period)
        m, n = matrix.shape
        ids, vecs = slot_diagonals(matrix, plan.in_period, plan.out_period,
                                   plan.positions("in", n), plan.positions("out", m))
        diags = dict(zip(ids.tolist(), vecs))
        self.bias = spread(tile(bias, plan.out_period, positions,
                                plan.positions("out", m)), lanes)
        if plan.input_blocks:
            # Client-expanded input: block t already holds rot(x, diagonals[t]).
            pattern = np.zeros(plan.input_blocks * length)
            for t, d in enumerate(plan.diagonals):
                # a weightless host bundle (encrypted weights) has no non-zero diagonal
                pattern[t * length:(t + 1) * length] = diags.get(d % plan.in_period, 0.0)
            self.expanded = spread(np.tile(pattern, positions // pattern.size), lanes)
            return
        b, outer = plan.baby_step, plan.giant2 * plan.baby_step
        # groups[g2][g] = [(r, vector)], d == g2 * outer + g * b + r
        self.groups: dict[int, dict[int, list[tuple[int, np.ndarray]]]] = {}
        for d in plan.diagonals:
            g2, g, r = plan.split3(d)
            vec = diags.get(d % plan.in_period)
            if vec is None:   # the all-zero layer keeps one (zero) diagonal
                vec = np.zeros(length)
            # rot(rot(diag, -s) * rot(x, r), s) == diag * rot(x, d) for s = d - r
            vec = np.roll(vec, g2 * outer + g * b)  # period `length` block
            self.groups.setdefault(g2, {}).setdefault(g, []).append(
                (r, spread(tile(vec, length, positions), lanes)))

    @contextlib.contextmanager
    def _laid_out(self):
        """The layer's vectors for the duration of a use: built and dropped around it
        for a layer kept as its sparse matrix, always there for the others."""
        if self._source is None:
            yield
            return
        self._prepare(*self._source)
        try:
            yield
        finally:
            for name in ("groups", "expanded", "bias"):
                self.__dict__.pop(name, None)

    def weight_vectors(self):
        """Every plaintext vector this layer multiplies or adds, with its cache key."""
        with self._laid_out():
            yield from self._vectors()

    def _vectors(self):
        if self.plan.input_blocks:
            yield (self.name, "expanded"), self.expanded
        else:
            for g2, inner in self.groups.items():
                for g, terms in inner.items():
                    for r, vec in terms:
                        yield self._key(g2, g, r), vec
        yield (self.name, "bias"), self.bias

    def __call__(self, engine: SlotEngine, ct: Any) -> Any:
        with self._laid_out():
            return self._apply(engine, ct)

    def _apply(self, engine: SlotEngine, ct: Any) -> Any:
        if self.plan.input_blocks:
            total = engine.mul_plain(ct, self.expanded, (self.name, "expanded"))
            return self._finish(engine, total, self.plan.expanded_fold_steps())
        ct = engine.settle(ct)
        rots = {0: ct}
        if self.babies:
            keys = [self._rot(r) for r in self.babies]
            hoisted = engine.rotate_hoisted(ct, keys)
            rots.update({r: hoisted[k] for r, k in zip(self.babies, keys)})
        b, outer = self.plan.baby_step, self.plan.giant2 * self.plan.baby_step
        total = None
        for g2, inner in sorted(self.groups.items()):
            part = None
            for g, terms in sorted(inner.items()):
                acc = None
                for r, vec in terms:
                    prod = engine.mul_plain(rots[r], vec, self._key(g2, g, r))
                    acc = prod if acc is None else engine.add(acc, prod)
                if g:
                    acc = engine.rotate(acc, self._rot(g * b))
                part = acc if part is None else engine.add(part, acc)
            if g2:
                part = engine.rotate(part, self._rot(g2 * outer))
            total = part if total is None else engine.add(total, part)
        return self._finish(engine, total, self.plan.fold_steps)

    def keys(self) -> set[int]:
        """The slot rotations (rotation keys) one evaluation of this layer uses."""
        return {self._rot(r) for r in self.plan.rotations()} - {0}

    def _key(self, g2: int, g: int, r: int) -> tuple:
        """Cache key of one diagonal (the two-level form kept for two-level plans)."""
        return (self.name, g, r) if not self.plan.giant2 else (self.name, g2, g, r)

    def _finish(self, engine: SlotEngine, total: Any, folds) -> Any:
        for step in folds:
            total = engine.add(total, engine.rotate(total, self._rot(step)))
        return engine.add_plain(total, self.bias, (self.name, "bias"))

    def _rot(self, positions: int) -> int:
        """Slot rotation that moves every lane by ``positions``."""
        return normalize_rotation(positions * self.lanes, self.slots)


class Evaluator:
    """Evaluates a linearized graph under a plan; holds prepared weights, never keys."""

    def __init__(self, graph: Graph, plan: HEPlan) -> None:
        self.graph, self.plan = graph, plan
        slots = plan.params.slots
        self.dense = {}
        for node in graph.nodes:
            if node.op is Op.DENSE:
                self.dense[node.name] = PreparedDense(
                    node.name, node.params["matrix"], node.params["bias"],
                    plan.dense[node.name], slots, plan.lanes)
            elif node.op not in SLOT_OPS:
                raise CompileError(f"{node.op.value} node {node.name!r} cannot run under HE")
        self._last_use = {src: n.name for n in graph.nodes for src in n.inputs
                          if src != graph.output}
        # the rotation keys of each layer, in evaluation order
        self.key_sets = [layer.keys() for layer in self.dense.values()]

    def weight_vectors(self):
        """(cache key, slot vector) of every weight the evaluation uses, in graph order."""
        for layer in self.dense.values():
            yield from layer.weight_vectors()

    def run(self, engine: SlotEngine, ct: Any) -> Any:
        values = {self.graph.input.name: ct}
        schedule = getattr(engine, "schedule_keys", None)
        enter = getattr(engine, "enter_layer", None)
        if schedule is not None:
            schedule(self.key_sets)
        layer = 0
        for node in self.graph.nodes[1:]:
            args = [values[s] for s in node.inputs]
            if node.op is Op.GATHER:
                out = args[0]  # the client encrypted the gathered vector (plan_he checks)
            elif node.op is Op.DENSE:
                if enter is not None:
                    enter(layer)
                layer += 1
                out = self.dense[node.name](engine, args[0])
            elif node.op is Op.SQUARE:
                out = engine.square(args[0])
            elif node.op is Op.MUL:
                out = engine.mul(args[0], args[1])
            elif node.op is Op.BOOTSTRAP:
                out = _bootstrap(engine, args[0], float(node.attrs["bound"]))
            elif node.op is Op.POLY:
                out = engine.chebyshev(args[0], np.asarray(node.attrs["coeffs"]),
                                       node.attrs["lo"], node.attrs["hi"])
            else:
                out = engine.add(args[0], args[1])
            values[node.name] = out
            # Drop values no later node reads, so memory follows the live set only.
            for src in node.inputs:
                if self._last_use.get(src) == node.name:
                    values.pop(src, None)
        return values[self.graph.output]


def _bootstrap(engine: SlotEngine, ct: Any, bound: float) -> Any:
    """Refresh ``ct``'s levels; values are scaled into [-1, 1] around the bootstrap
    when the levels pass found them larger (one level each side, counted there)."""
    if bound <= 1.0:
        return engine.bootstrap(ct)
    ct = engine.bootstrap(engine.mul_scalar(ct, 1.0 / bound))
    return engine.mul_scalar(ct, bound)

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
from ...compiler.tiles import block, part
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
        # So does a layer between values cut into parts (one output part at a time).
        tiled = plan.blocks is not None
        self._source = (matrix, bias) if sp.issparse(matrix) or tiled else None
        if self._source is None:
            self._prepare(matrix, bias)

    def _prepare(self, matrix, bias: np.ndarray) -> None:
        plan, slots, lanes = self.plan, self.slots, self.lanes
        positions = slots // lanes
        m = matrix.shape[0]
        diags = self._diagonals(matrix)
        self.bias = spread(tile(bias, plan.out_period, positions,
                                plan.positions("out", m)), lanes)
        if plan.input_blocks:
            length = max(plan.in_period, plan.out_period)
            # Client-expanded input: block t already holds rot(x, diagonals[t]).
            pattern = np.zeros(plan.input_blocks * length)
            for t, d in enumerate(plan.diagonals):
                # a weightless host bundle (encrypted weights) has no non-zero diagonal
                pattern[t * length:(t + 1) * length] = diags.get(d % plan.in_period, 0.0)
            self.expanded = spread(np.tile(pattern, positions // pattern.size), lanes)
            return
        self.groups = self._grouped({0: diags}, keep_zero=True)

    def _diagonals(self, matrix) -> dict[int, np.ndarray]:
        """The non-zero diagonals of ``matrix`` (one part's block for a tiled layer)."""
        plan = self.plan
        m, n = matrix.shape
        ids, vecs = slot_diagonals(matrix, plan.in_period, plan.out_period,
                                   plan.positions("in", n), plan.positions("out", m))
        return dict(zip(ids.tolist(), vecs))

    def _grouped(self, parts: dict[int, dict[int, np.ndarray]], keep_zero: bool):
        """``groups[g2][g] = [(i, r, vector)]`` for d == g2 * outer + g * b + r, over
        the diagonals of each input part i, each vector pre-rotated for its giant step.
        ``keep_zero``: a diagonal absent from every part is kept as zeros (the all-zero
        layer keeps one diagonal); a tiled layer skips the blocks it lacks instead."""
        plan, positions = self.plan, self.slots // self.lanes
        length = max(plan.in_period, plan.out_period)
        b, outer = plan.baby_step, plan.giant2 * plan.baby_step
        groups: dict[int, dict[int, list[tuple[int, int, np.ndarray]]]] = {}
        for d in plan.diagonals:
            g2, g, r = plan.split3(d)
            for i, diags in parts.items():
                vec = diags.get(d % plan.in_period)
                if vec is None:
                    if not keep_zero:
                        continue
                    vec = np.zeros(length)
                # rot(rot(diag, -s) * rot(x, r), s) == diag * rot(x, d) for s = d - r
                vec = np.roll(vec, g2 * outer + g * b)  # period `length` block
                groups.setdefault(g2, {}).setdefault(g, []).append(
                    (i, r, spread(tile(vec, length, positions), self.lanes)))
        return groups

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
        if self.plan.blocks is not None:
            raise CompileError(f"layer {self.name!r} spans several ciphertexts; encrypted "
                               "weights need every value within one ciphertext")
        with self._laid_out():
            yield from self._vectors()

    def _vectors(self):
        if self.plan.input_blocks:
            yield (self.name, "expanded"), self.expanded
        else:
            for g2, inner in self.groups.items():
                for g, terms in inner.items():
                    for _, r, vec in terms:
                        yield self._key(g2, g, r), vec
        yield (self.name, "bias"), self.bias

    def __call__(self, engine: SlotEngine, ct: Any) -> Any:
        """One ciphertext in, one out (a layer whose values fit one ciphertext)."""
        with self._laid_out():
            return self._apply(engine, ct)

    def run_parts(self, engine: SlotEngine, cts: list) -> list:
        """The input's parts in, the output's parts out (see ``veil.compiler.tiles``)."""
        if self.plan.blocks is None:
            return [self(engine, cts[0])]
        return self._apply_tiled(engine, cts)

    def _apply(self, engine: SlotEngine, ct: Any) -> Any:
        if self.plan.input_blocks:
            total = engine.mul_plain(ct, self.expanded, (self.name, "expanded"))
            return self._finish(engine, total, self.plan.expanded_fold_steps(), self.bias,
                                (self.name, "bias"))
        rots = {0: self._babies(engine, engine.settle(ct))}
        total = self._accumulate(engine, self.groups, rots,
                                 lambda g2, g, i, r: self._key(g2, g, r))
        return self._finish(engine, total, self.plan.fold_steps, self.bias,
                            (self.name, "bias"))

    def _babies(self, engine: SlotEngine, ct: Any) -> dict[int, Any]:
        """``ct`` rotated by every baby step (hoisted), by step."""
        rots = {0: ct}
        if self.babies:
            keys = [self._rot(r) for r in self.babies]
            hoisted = engine.rotate_hoisted(ct, keys)
            rots.update({r: hoisted[k] for r, k in zip(self.babies, keys)})
        return rots

    def _accumulate(self, engine: SlotEngine, groups, rots: dict[int, dict[int, Any]],
                    key) -> Any:
        """sum over (g2, g) of rot(sum over (i, r) of vec * rots[i][r], g2 * outer + g * b)."""
        b, outer = self.plan.baby_step, self.plan.giant2 * self.plan.baby_step
        total = None
        for g2, inner in sorted(groups.items()):
            part = None
            for g, terms in sorted(inner.items()):
                acc = None
                for i, r, vec in terms:
                    prod = engine.mul_plain(rots[i][r], vec, key(g2, g, i, r))
                    acc = prod if acc is None else engine.add(acc, prod)
                if g:
                    acc = engine.rotate(acc, self._rot(g * b))
                part = acc if part is None else engine.add(part, acc)
            if g2:
                part = engine.rotate(part, self._rot(g2 * outer))
            total = part if total is None else engine.add(total, part)
        return total

    def _apply_tiled(self, engine: SlotEngine, cts: list) -> list:
        """Block (j, i) of the matrix maps input part i to output part j; every input
        part is rotated by the baby steps once, and each output part's block diagonals
        are laid out when it is computed (one part's vectors in memory at a time)."""
        plan, (matrix, bias) = self.plan, self._source
        if len(cts) != plan.in_parts:
            raise CompileError(f"layer {self.name!r} takes {plan.in_parts} ciphertexts, "
                               f"got {len(cts)}")
        by_out: dict[int, list[int]] = {}
        for j, i in plan.blocks:
            by_out.setdefault(j, []).append(i)
        readers = {i for _, i in plan.blocks}
        rots = {i: self._babies(engine, engine.settle(cts[i])) for i in sorted(readers)}
        positions = self.slots // self.lanes
        outs = []
        for j in range(plan.out_parts):
            parts = {i: self._diagonals(block(matrix, j, i, plan.in_chunk, plan.out_chunk))
                     for i in by_out.get(j, ())}
            groups = self._grouped(parts, keep_zero=False)
            bias_vec = spread(tile(part(bias, j, plan.out_chunk), plan.out_period, positions,
                                   plan.positions("out", plan.out_chunk)), self.lanes)
            if groups:
                total = self._accumulate(engine, groups, rots,
                                         lambda g2, g, i, r: (self.name, j, i, g2, g, r))
                total = self._finish(engine, total, plan.fold_steps, bias_vec,
                                     (self.name, "bias", j))
            else:      # rows no input reaches: the bias alone
                any_ct = rots[min(rots)][0] if rots else engine.settle(cts[0])
                total = engine.add_plain(engine.mul_plain(any_ct, np.zeros(self.slots),
                                                          (self.name, "zero")),
                                         bias_vec, (self.name, "bias", j))
            outs.append(total)
        return outs

    def keys(self) -> set[int]:
        """The slot rotations (rotation keys) one evaluation of this layer uses."""
        return {self._rot(r) for r in self.plan.rotations()} - {0}

    def _key(self, g2: int, g: int, r: int) -> tuple:
        """Cache key of one diagonal (the two-level form kept for two-level plans)."""
        return (self.name, g, r) if not self.plan.giant2 else (self.name, g2, g, r)

    def _finish(self, engine: SlotEngine, total: Any, folds, bias: np.ndarray,
                bias_key: tuple) -> Any:
        for step in folds:
            total = engine.add(total, engine.rotate(total, self._rot(step)))
        return engine.add_plain(total, bias, bias_key)

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
        """One input ciphertext in, the output ciphertext out (every value of the model
        fits one ciphertext; :meth:`run_parts` takes and gives lists)."""
        if self.plan.input_parts != 1 or self.plan.output_parts != 1:
            raise CompileError("this model's values span several ciphertexts: use run_parts")
        return self.run_parts(engine, [ct])[0]

    def run_parts(self, engine: SlotEngine, cts: list) -> list:
        """The input's ciphertexts in (``plan.input_parts``), the output's out.

        Every value is a list of ciphertexts, one per part; element-wise operations and
        bootstraps run on each part, a dense layer maps parts to parts by its blocks."""
        if len(cts) != self.plan.input_parts:
            raise CompileError(f"this model takes {self.plan.input_parts} input "
                               f"ciphertexts, got {len(cts)}")
        values = {self.graph.input.name: list(cts)}
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
                out = self.dense[node.name].run_parts(engine, args[0])
            elif node.op is Op.SQUARE:
                out = [engine.square(a) for a in args[0]]
            elif node.op is Op.MUL:
                out = [engine.mul(a, b) for a, b in zip(*args)]
            elif node.op is Op.BOOTSTRAP:
                out = [_bootstrap(engine, a, float(node.attrs["bound"])) for a in args[0]]
            elif node.op is Op.POLY:
                coeffs = np.asarray(node.attrs["coeffs"])
                out = [engine.chebyshev(a, coeffs, node.attrs["lo"], node.attrs["hi"])
                       for a in args[0]]
            else:
                out = [engine.add(a, b) for a, b in zip(*args)]
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

"""The levels pass: a CKKS level for every value, and bootstraps where the levels run out.

Runs last in HE's lowering, on the graph of ``DENSE`` / ``POLY`` / ``SQUARE`` / ``ADD``
nodes. Each node costs the levels the slot evaluator spends on it (a dense layer 1, a
squaring 1, a Chebyshev series its OpenFHE depth, an addition 0). A fresh ciphertext
may spend :attr:`CKKSParams.fresh_budget` levels, a bootstrapped one
:attr:`CKKSParams.boot_budget_levels`; both were measured against OpenFHE
(``tests/test_he_bootstrap.py`` checks them).

Placement is lazy: a value is bootstrapped only when the next node that reads it could
not otherwise run, so every bootstrap covers the longest span its levels allow. On a
chain this is optimal (an exchange argument: moving any bootstrap of an optimal
placement later, up to the point where the levels run out, never adds one). At a fork,
one bootstrap of the shared value serves every later reader, and a reader always takes
the freshest copy, so a residual connection meets its branch at the branch's level
instead of dragging the sum down to the skip value's old level. Lazy placement alone
still bootstraps inside a residual branch (where the levels run out) and leaves the skip
value old; a local search then moves such a bootstrap to the fork the branch starts
from, where both paths read the fresh copy, keeping each move that lowers the total
count (a residual network: one bootstrap per two blocks instead of per block when two
fit). Orion (Ebel et al. 2023) solves the same constraint exactly with a shortest path
over levels; EVA (Dathathri et al. 2020) places rescales by the "as late as possible"
rule. A value cut into
several ciphertexts (:mod:`.tiles`) bootstraps each of them; the placement counts one
per value, not per ciphertext.

OpenFHE's bootstrap needs its input in [-1, 1]. The pass runs the calibration batch
through the graph and records the largest magnitude of every bootstrapped value. A
polynomial's input already lies in [-1, 1] on the calibrated range (``fold_poly_domain``
maps it there), so the pass bootstraps values there when it can; where the calibration
batch exceeds 1 it sets the node's ``bound`` to that magnitude times (1 + margin): the
evaluator multiplies by 1 / bound before the bootstrap and by bound after, one level
each, which the placement counts.
"""
from __future__ import annotations

import numpy as np

from ..errors import BootstrapRequiredError, CompileError
from ..ir import Graph, Node, Op, run
from .params import CKKSParams, bootstrap_params, chebyshev_depth
from .passes import PassNote

# Head room between the calibration batch's largest magnitude and 1.
BOUND_MARGIN = 0.25
# What the slot evaluator (backends/he/evaluator.py) runs, and so what has a level cost.
SLOT_OPS = frozenset({Op.INPUT, Op.GATHER, Op.DENSE, Op.POLY, Op.SQUARE, Op.ADD,
                      Op.MUL, Op.BOOTSTRAP})


def node_levels(node: Node) -> int:
    """Levels the slot evaluator spends on ``node`` (a bootstrap's scaling aside)."""
    if node.op is Op.POLY:
        return chebyshev_depth(len(node.attrs["coeffs"]) - 1, node.attrs["lo"],
                               node.attrs["hi"])
    if node.op in (Op.DENSE, Op.SQUARE, Op.MUL):
        return 1
    if node.op in (Op.INPUT, Op.GATHER, Op.ADD, Op.BOOTSTRAP):
        return 0
    raise CompileError(f"{node.op.value} node {node.name!r} was not lowered; run the "
                       "linearize pass before the levels pass")


def graph_depth(graph: Graph) -> int:
    """Levels on the longest path of a graph without bootstraps."""
    depth: dict[str, int] = {}
    for node in graph.nodes:
        base = max((depth[s] for s in node.inputs), default=0)
        depth[node.name] = base + node_levels(node)
    return depth[graph.output]


def critical_path(graph: Graph) -> list[Node]:
    """The nodes of a longest path in levels from the input to the output (what sets
    :func:`graph_depth`; a bootstrap's scaling aside)."""
    depth: dict[str, int] = {}
    prev: dict[str, str | None] = {}
    for node in graph.nodes:
        src = max(node.inputs, key=depth.__getitem__, default=None)
        depth[node.name] = (depth[src] if src is not None else 0) + node_levels(node)
        prev[node.name] = src
    by_name = {n.name: n for n in graph.nodes}
    path: list[Node] = []
    name: str | None = graph.output
    while name is not None:
        path.append(by_name[name])
        name = prev[name]
    return path[::-1]


def _scaled(node: Node) -> int:
    """Levels a bootstrap's scaling costs on each side (0 when its bound is 1)."""
    return int(node.op is Op.BOOTSTRAP and float(node.attrs["bound"]) > 1.0)


def _left_after(node: Node, left: dict[str, int], params: CKKSParams) -> int:
    """Levels ``node``'s value has left, given its inputs' (-1: it cannot run)."""
    if node.op is Op.INPUT:
        return params.fresh_budget
    if node.op is Op.BOOTSTRAP:
        scale = _scaled(node)
        return params.boot_budget_levels - scale if left[node.inputs[0]] >= scale else -1
    return min(left[s] for s in node.inputs) - node_levels(node)


def remaining_levels(graph: Graph, params: CKKSParams) -> dict[str, int]:
    """Levels each value still has under ``params`` (negative: the graph is invalid)."""
    left: dict[str, int] = {}
    for node in graph.nodes:
        left[node.name] = _left_after(node, left, params)
    return left


def check_levels(graph: Graph, params: CKKSParams) -> dict[str, int]:
    """:func:`remaining_levels`, raising CompileError at the first value out of levels."""
    left = remaining_levels(graph, params)
    for node in graph.nodes:
        if left[node.name] < 0:
            raise CompileError(f"node {node.name!r} runs out of CKKS levels under "
                               f"{params}; run the levels pass (place_bootstraps)")
    return left


def _magnitudes(graph: Graph, calibration: np.ndarray) -> dict[str, float]:
    """Largest magnitude of every value on the calibration batch (the interpreter drops
    each value after its last reader: a deep graph's values at once could take GiBs)."""
    mags: dict[str, float] = {}
    run(graph, calibration,
        observe=lambda name, v: mags.__setitem__(name, float(np.max(np.abs(v), initial=0.0))))
    return mags


def place_bootstraps(graph: Graph, *, calibration: np.ndarray,
                     insecure_test_params: bool = False,
                     precision_bits: int | None = None) -> tuple[Graph, PassNote]:
    """Insert ``BOOTSTRAP`` nodes where the levels run out (see the module docstring).

    A graph that fits CKKS without bootstrapping (depth at most what a 128-bit ring of
    2^16 holds, the same rule for test parameters) is returned unchanged.
    """
    from .estimate import max_depth_without_bootstrapping

    note = PassNote("place_bootstraps")
    odd = next((n for n in graph.nodes if n.op not in SLOT_OPS), None)
    if odd is not None:         # the pipeline refuses it by name after the back stage
        note.messages.append(f"{odd.op.value} node {odd.name!r} has no slot kernel: no "
                             "levels assigned")
        return graph, note
    depth = graph_depth(graph)
    limit = max_depth_without_bootstrapping(precision_bits)
    if depth <= limit:
        note.messages.append(f"depth {depth} fits without bootstrapping (<= {limit})")
        note.data.update(depth=depth, bootstraps=0)
        return graph, note
    params = bootstrap_params(insecure_test_params=insecure_test_params,
                              precision_bits=precision_bits)
    mags = _magnitudes(graph, np.asarray(calibration, dtype=np.float64))
    largest = max(node_levels(n) for n in graph.nodes)
    if largest + 2 > params.boot_budget_levels:     # plus a scaled bootstrap's two
        raise BootstrapRequiredError(
            f"this model needs depth {depth} (more than the {limit} a 128-bit ring holds "
            f"without bootstrapping), and one of its ops needs {largest} levels, more "
            f"than the {params.boot_budget_levels - 2} a bootstrap leaves it: lower the "
            "polynomial degrees", depth=depth, max_depth=limit,
            bootstraps=-(-(depth - params.fresh_budget) // params.boot_budget_levels))

    def bound_of(name: str) -> float:
        return 1.0 if mags[name] <= 1.0 else float(mags[name] * (1.0 + BOUND_MARGIN))

    # Lazy placement, then a local search: a bootstrap placed lazily inside a branch may
    # move to the fork the branch starts from (both the branch and the skip connection
    # then read a fresh copy), kept only when the whole graph needs fewer bootstraps.
    forced: frozenset[str] = frozenset()
    out, placed, lazy = _place(graph, params, bound_of, forced)
    improved = True
    while improved:
        improved = False
        for value, reader in lazy:
            fork = _fork(graph, value, reader, params, bound_of)
            if fork is None or fork in forced:
                continue
            try:
                trial = _place(graph, params, bound_of, forced | {fork})
            except CompileError:        # no level left there to scale into [-1, 1]
                continue
            if len(trial[1]) < len(placed):
                forced = forced | {fork}
                out, placed, lazy = trial
                improved = True
                break
    lowered = graph.with_nodes(out)
    left = check_levels(lowered, params)
    scaled = sum(1 for _, _, b in placed if b > 1.0)
    note.messages.append(
        f"depth {depth} > {limit}: {len(placed)} bootstraps ({scaled} with their input "
        f"scaled into [-1, 1]) under {params.boot_budget_levels} levels between "
        f"bootstraps and {params.fresh_budget} for a fresh ciphertext")
    for boot, src, bound in placed:
        note.messages.append(f"  bootstrap {boot!r} on {src!r} at {left[src]} levels left"
                             + (f" (bound {bound:.3g})" if bound > 1.0 else ""))
    note.data.update(depth=depth, bootstraps=len(placed), levels_left=left,
                     placed=[{"node": b, "value": s, "bound": v, "levels_left": left[s]}
                             for b, s, v in placed])
    return lowered, note


def _place(graph: Graph, params: CKKSParams, bound_of, forced: frozenset[str]):
    """One placement: values in ``forced`` are bootstrapped as soon as they exist, any
    other when its next reader could not run. Returns the nodes, the bootstraps
    (bootstrap, value, bound) and the lazily placed (value, reader) pairs."""
    out: list[Node] = []
    left: dict[str, int] = {}
    fresh: dict[str, str] = {}        # value -> its bootstrapped copy
    placed: list[tuple[str, str, float]] = []
    lazy: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op is Op.INPUT:
            out.append(node)
            left[node.name] = _left_after(node, left, params)
            continue
        need = node_levels(node)
        # the node's own output must keep the levels for its own scaled bootstrap
        reserve = 1 if bound_of(node.name) > 1.0 else 0
        inputs = []
        for src in node.inputs:
            src = fresh.get(src, src)
            if left[src] < need + reserve:
                boot = _bootstrap(src, node, bound_of(src), out, left, params)
                fresh[src] = boot.name
                placed.append((boot.name, src, float(boot.attrs["bound"])))
                lazy.append((src, node.name))
                src = boot.name
            inputs.append(src)
        node = node.replace(inputs=tuple(inputs))
        out.append(node)
        left[node.name] = _left_after(node, left, params)
        if node.name in forced:
            boot = _bootstrap(node.name, node, bound_of(node.name), out, left, params)
            fresh[node.name] = boot.name
            placed.append((boot.name, node.name, float(boot.attrs["bound"])))
    return out, placed, lazy


def _fork(graph: Graph, value: str, reader: str, params: CKKSParams, bound_of):
    """The value a branch holding ``value`` starts from (one with several readers),
    when a bootstrap there still leaves the branch enough levels to reach ``reader``;
    else None."""
    by_name = {n.name: n for n in graph.nodes}
    if value not in by_name:
        return None
    target = by_name[reader]
    cost = node_levels(target) + (1 if bound_of(reader) > 1.0 else 0)
    current = value
    while True:
        node = by_name[current]
        if len(graph.consumers(current)) > 1:
            break
        if node.op in (Op.INPUT, Op.BOOTSTRAP) or len(node.inputs) != 1:
            return None
        cost += node_levels(node)
        current = node.inputs[0]
    if current == value or by_name[current].op is Op.INPUT:
        return None
    scaled = 1 if bound_of(current) > 1.0 else 0
    return current if cost <= params.boot_budget_levels - scaled else None


def _bootstrap(src: str, reader: Node, bound: float, out: list[Node],
               left: dict[str, int], params: CKKSParams) -> Node:
    """Append a bootstrap of ``src`` (which must still afford its scaling)."""
    if left[src] < (1 if bound > 1.0 else 0):
        raise CompileError(f"value {src!r} has no level left to scale it into [-1, 1] "
                           f"before a bootstrap for {reader.name!r}")
    shape = next(n.shape for n in out if n.name == src)
    boot = Node(f"{src}/bootstrap", Op.BOOTSTRAP, (src,), shape, {"bound": bound})
    out.append(boot)
    left[boot.name] = _left_after(boot, left, params)
    return boot

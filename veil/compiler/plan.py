"""HE planning: the plan and key manifest of a linearized graph.

The concerns live in their own modules: :mod:`.params` (CKKS parameter selection),
:mod:`.dense` (diagonals and baby-step / giant-step splits of one dense layer),
:mod:`.layout` (slot-layout search). This module walks the graph for levels, ties
them together in :class:`HEPlan` (what the client and server need) and re-exports
the names other layers import from ``veil.compiler.plan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import CompileError
from ..ir import Graph, Op
from .dense import (COST, KEY_WEIGHT, DensePlan, _layer_work, dense_cost,  # noqa: F401
                    nonzeros, normalize_rotation, plan_dense, slot_diagonals)
from .layout import _assign_layouts, _client_entry, _expand_first_layer
from .levels import check_levels, graph_depth, node_levels
from .tiles import surrogate, tiles_of
from .params import (FIRST_MOD_HEADROOM, HE_STD_128_LOGQP, INSECURE_RING_DIM,  # noqa: F401
                     PRECISION_LOSS_BITS, SCALING_BITS_CHOICES, CKKSParams,
                     bootstrap_params, chebyshev_depth, keyswitch_cost, next_pow2,
                     select_params, slot_ring)

@dataclass
class HEPlan:
    """Everything the HE backend and the key owner need; emitted by the compiler."""

    params: CKKSParams
    rotations: tuple[int, ...]
    depth: int
    levels: dict[str, int]
    dense: dict[str, DensePlan]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_period: int
    output_period: int
    param_reason: str = ""
    input_layout: dict = field(default_factory=lambda: {"layout": "replicated"})
    lanes: int = 1                # inputs per ciphertext (interleaved SIMD batching)
    costs: dict = field(default_factory=dict)   # see estimate_costs
    # a model whose values are wider than one ciphertext (see .tiles): the output's cut
    # ({"parts", "chunk"}; the input's is in input_layout) and each value's part count
    output_layout: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    # the smallest 128-bit ring whose slots hold the widest value (params.slot_ring):
    # what the ring would be if the depth did not ask for more (not in the manifest)
    slot_ring: int = 0

    def manifest(self) -> dict:
        """The key manifest: exactly what the client must generate and the server needs."""
        return {"params": self.params.to_dict(), "rotations": list(self.rotations),
                "relinearization_key": True, "bootstrapping": self.params.bootstraps,
                "depth": self.depth,
                "lanes": self.lanes, "costs": self.costs,
                "input": {"shape": list(self.input_shape), "period": self.input_period,
                          **self.input_layout},
                "output": {"shape": list(self.output_shape), "period": self.output_period,
                           **self.output_layout},
                "layers": {k: v.to_dict() for k, v in self.dense.items()}}

    @classmethod
    def from_manifest(cls, params: CKKSParams, m: dict) -> "HEPlan":
        """The plan a server needs, read back from :meth:`manifest` (levels omitted)."""
        fixed = {"shape", "period"}
        return cls(params, tuple(m["rotations"]), int(m["depth"]), {},
                   {k: DensePlan.from_dict(v) for k, v in m["layers"].items()},
                   tuple(m["input"]["shape"]), tuple(m["output"]["shape"]),
                   int(m["input"]["period"]), int(m["output"]["period"]),
                   input_layout={k: v for k, v in m["input"].items()
                                 if k not in fixed | {"range", "bounds", "range_enforced"}},
                   lanes=int(m.get("lanes", 1)), costs=dict(m.get("costs", {})),
                   output_layout={k: v for k, v in m["output"].items() if k not in fixed})

    @property
    def input_parts(self) -> int:
        """Ciphertexts one input takes (more than one: values wider than the slots)."""
        return int(self.input_layout.get("parts", 1))

    @property
    def output_parts(self) -> int:
        return int(self.output_layout.get("parts", 1))


LAYOUTS = ("latency", "throughput")


def plan_he(graph: Graph, *, insecure_test_params: bool = False,
            layout: str = "latency", precision_bits: int | None = None,
            max_slots: int | None = None) -> HEPlan:
    """Plan a linearized graph (INPUT, DENSE, POLY, ADD only) for CKKS.

    ``layout="latency"`` places convolution outputs on strided, channel-blocked slot
    grids (see :func:`_assign_layouts`) and lets the first layer spend free slots on a
    client-expanded input when that saves rotations; ``"throughput"`` keeps every value
    compact, leaving the slots for more inputs per ciphertext. Either way, the slots
    left over carry that many inputs side by side (interleaved lanes: slot j holds
    position j // lanes of input j % lanes, so a rotation by r * lanes moves every input
    by r positions at once).

    A value wider than ``max_slots`` (default: the bootstrapping ring's slots for a
    model that bootstraps, else ``TILE_SLOTS``) is cut into several ciphertexts
    (:mod:`.tiles`); the layouts and diagonal plans are searched on one part of each.
    """
    if layout not in LAYOUTS:
        raise CompileError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    entry = _client_entry(graph)
    levels, periods = _walk(graph, entry)
    depth = levels[graph.output]
    min_slots = max(max(periods.values()), 1)
    search = layout == "latency"
    boots = any(n.op is Op.BOOTSTRAP for n in graph.nodes)
    cap = max_slots or (bootstrap_params(insecure_test_params=insecure_test_params)
                        .ring_dim // 2 if boots else TILE_SLOTS)
    if cap & (cap - 1):
        raise CompileError(f"max_slots must be a power of two, not {cap}")
    # a value wider than cap is cut into two parts or more (tiles.tile_of)
    tiles = tiles_of(graph, cap) if min_slots > cap else None
    work, work_entry, blocks = graph, entry, {}
    if tiles is not None:
        # plan one part of every value; the client cuts its input (a gather included)
        work, blocks = surrogate(graph, entry, tiles)
        work_entry = work.input
        min_slots = cap
    floor_ring = slot_ring(min(min_slots, max(HE_STD_128_LOGQP) // 2))
    if boots:
        # bootstrapping: one input per ciphertext, in a sparse batch of the slots the
        # widest value needs or a wider one when the layouts it allows (strided grids
        # with gaps) make the linear layers cheaper; a bootstrap costs about the same at
        # any batch (bench/results/he_deep.md)
        batches = ([cap] if tiles is not None
                   else _batches(next_pow2(min_slots), insecure_test_params))
        tried = [(bootstrap_params(insecure_test_params=insecure_test_params,
                                   precision_bits=precision_bits, slots=s), s)
                 for s in batches]
        assigned = min(((p, _assign_layouts(work, work_entry, s, search=search,
                                            key_weight=BOOT_KEY_WEIGHT))
                        for p, s in tried), key=lambda t: t[1][0])
        params = assigned[0]
        check_levels(graph, params)
        depth = graph_depth(graph)
        why = (f"depth {depth} with bootstrapping: {params.boot_budget_levels} levels "
               f"between bootstraps ({params.key_dist} secret, level budget "
               f"{params.boot_budget}), {params.slots} slots bootstrapped, ring "
               f"{params.ring_dim}" + (" (INSECURE test parameters)"
                                       if params.insecure_test_params else ""))
    else:
        params, why = select_params(depth, min_slots,
                                    insecure_test_params=insecure_test_params,
                                    precision_bits=precision_bits)
        assigned = None
    slots = params.slots
    _, layouts, dense = (assigned[1] if assigned is not None
                         else _assign_layouts(work, work_entry, slots, search=search))
    periods = {name: lay[0] for name, lay in layouts.items()}
    input_layout = (_expand_first_layer(work, work_entry, dense, slots)
                    if layout == "latency" and tiles is None else {"layout": "replicated"})
    if entry.op is Op.GATHER:
        input_layout["gather"] = list(entry.attrs["indices"])
    if layouts[work_entry.name][1] is not None:
        input_layout["positions"] = [int(v) for v in layouts[work_entry.name][1]]
    output_layout, parts = {}, {}
    if tiles is not None:
        why += (f"; values wider than {cap} slots cut into parts (widest: "
                f"{max(t.parts for t in tiles.values())} ciphertexts)")
        for node in graph.nodes:
            if node.op is Op.DENSE:
                src, dst = tiles[node.inputs[0]], tiles[node.name]
                dense[node.name] = replace(dense[node.name], blocks=blocks[node.name],
                                           in_chunk=src.chunk, out_chunk=dst.chunk,
                                           in_parts=src.parts, out_parts=dst.parts)
        t_in, t_out = tiles[entry.name], tiles[graph.output]
        input_layout.update(parts=t_in.parts, chunk=t_in.chunk)
        output_layout = {"parts": t_out.parts, "chunk": t_out.chunk}
        parts = {name: t.parts for name, t in tiles.items() if t.parts > 1}
    used = max(max(periods.values()), *(p.in_period for p in dense.values()),
               input_layout.get("blocks", 0) * input_layout.get("block", 0))
    lanes = slots // next_pow2(used)
    rotations = set()
    for p in dense.values():
        rotations |= p.rotations()
    # Physical rotation = positions * lanes, normalised to (-slots/2, slots/2]: both
    # signs name the same automorphism key.
    rotations = {normalize_rotation(r * lanes, slots) for r in rotations} - {0}
    plan = HEPlan(params, tuple(sorted(rotations)), depth, levels, dense,
                  graph.input_shape, graph.output_shape, periods[work_entry.name],
                  periods[graph.output], why, input_layout, lanes,
                  output_layout=output_layout, parts=parts, slot_ring=floor_ring)
    plan.costs = estimate_costs(graph, plan)
    return plan


# Widest ciphertext a model without bootstrapping is planned on before its values are
# cut into parts: ring 2^16. A wider ring (2^17) would hold twice the values, but each
# of its operations costs over twice as much, so parts of 2^15 slots are no slower.
TILE_SLOTS = 1 << 15


# What one rotation key counts, in rotations, when a bootstrapped model's layers choose
# their splits (keys shared across layers count once): a ring-2^16 key is ~150 MB of
# client key generation, upload and server memory, and the keys must fit next to the
# bootstrapping keys in the memory budget.
BOOT_KEY_WEIGHT = 8.0


def _batches(smallest: int, insecure_test_params: bool) -> list[int]:
    """Bootstrapped batch sizes to try: powers of two from ``smallest`` to the ring's."""
    half = bootstrap_params(insecure_test_params=insecure_test_params).ring_dim // 2
    if smallest > half:
        raise CompileError(f"a value of {smallest} slots does not fit one ciphertext of "
                           f"the bootstrapping ring ({half} slots)")
    return [smallest << t for t in range((half // smallest).bit_length())]


MAX_FEATURES = 2048   # widest layer the feature layout accepts (one ciphertext each)


def _poly_cost(degree: int) -> float:
    return COST["square"] * (2 * math.sqrt(degree) + math.log2(max(degree, 2)))


def estimate_costs(graph: Graph, plan: HEPlan) -> dict:
    """Estimated cost of one ciphertext in the slot layout (``lanes`` inputs) and of one
    batch in the feature layout (``slots`` inputs), in rotations; None when a layer is
    too wide for one ciphertext per feature. A value cut into parts costs each part."""
    lanes_cost = features_cost = 0.0
    widest = 0
    boots = any(n.op is Op.BOOTSTRAP for n in graph.nodes)   # the slot layout only
    for node in graph.nodes:
        width = int(np.prod(node.shape))
        widest = max(widest, width)
        if node.op is Op.DENSE:
            lanes_cost += _layer_work(plan.dense[node.name])
            features_cost += nonzeros(node.params["matrix"])[0].size * COST["scalar_term"]
        elif node.op in (Op.POLY, Op.SQUARE, Op.MUL):
            one = (COST["square"] if node.op in (Op.SQUARE, Op.MUL)
                   else _poly_cost(len(node.attrs["coeffs"]) - 1))
            lanes_cost += one * plan.parts.get(node.name, 1)
            features_cost += width * one
    return {"lanes_per_ciphertext": round(lanes_cost, 2),
            "features_per_batch": (round(features_cost, 2)
                                   if widest <= MAX_FEATURES and not boots else None)}


def _walk(graph: Graph, entry) -> tuple[dict[str, int], dict[str, int]]:
    """Level after each node and its compact slot period."""
    levels: dict[str, int] = {}
    periods = {graph.input.name: next_pow2(int(np.prod(graph.input_shape)))}
    for node in graph.nodes:
        periods[node.name] = next_pow2(int(np.prod(node.shape)))
        if node.op in (Op.INPUT, Op.BOOTSTRAP) or node is entry:
            levels[node.name] = 0      # levels spent since the value was fresh
        else:
            levels[node.name] = max(levels[s] for s in node.inputs) + node_levels(node)
    return levels, periods

"""Slot-layout search: where each value's elements sit in its ciphertext.

Layout invariant. A value of ``n`` numbers lives in one ciphertext as a vector of
period ``P = next_pow2(n)``: slot ``j`` holds ``x[j mod P]`` (zero when
``j mod P >= n``). Because P divides the slot count, a cyclic rotation of the whole
ciphertext by ``i`` equals a cyclic rotation of every period block, which is what
the diagonal method needs. Convolutions may instead sit on strided, channel-blocked
grids (:func:`assign_layouts`), and the first layer may take a client-expanded input
(:func:`expand_first_layer`).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import CompileError
from ..ir import Graph, Op
from .dense import KEY_WEIGHT, DensePlan, dense_cost, normalize_rotation, plan_dense
from .params import next_pow2

# A value's slot layout: (period, positions or None for compact, grid or None). A grid
# (offsets, sy, sx) says element (c, y, x) of a (C, H, W) value sits at slot
# offsets[c] + y * sy + x * sx, which is what makes a convolution's diagonals
# independent of the output pixel.
_ELEMENTWISE = (Op.POLY, Op.SQUARE, Op.BOOTSTRAP)


def _compact(shape: tuple[int, ...]):
    n = int(np.prod(shape))
    grid = None
    if len(shape) == 3:
        c, h, w = shape
        grid = (tuple(range(0, c * h * w, h * w)), w, 1)
    return next_pow2(n), None, grid


def _grid_positions(shape, grid) -> np.ndarray:
    c, h, w = shape
    offs, sy, sx = grid
    return (np.asarray(offs)[:, None, None] + np.arange(h)[None, :, None] * sy
            + np.arange(w)[None, None, :] * sx).reshape(-1)


def _grid_candidates(node, in_grid, slots: int):
    """Output layouts for a convolution-like DENSE whose input sits on ``in_grid``.

    The output grid is the input grid strided like the layer (so every output pixel
    sees its receptive field at the same slot offsets), with channels in power-of-two
    blocks and, for strided layers, several channels interleaved in the gaps the stride
    leaves (the multiplexed packing of Lee et al., ICML 2022).
    """
    (sy_s, sx_s), shape = node.attrs["grid_stride"], node.shape
    _, sy, sx = in_grid
    c, h, w = shape
    sy2, sx2 = sy * sy_s, sx * sx_s
    footprint = (h - 1) * sy2 + (w - 1) * sx2 + 1
    phases = sorted({py * sy + px * sx for py in range(sy_s) for px in range(sx_s)})
    out = _phase_candidates(shape, sy2, sx2, footprint, phases, slots)
    if not out and (sy2 > 1 or sx2 > 1):
        # the input grid already has gaps of its own (an earlier strided layer): any
        # offset inside a pixel's cell keeps the diagonals pixel-independent, so fill
        # every gap, x-phases within a row's stride and y-phases within a row's span
        # (the multiplexing of Lee et al. carried through several strided stages)
        span = next_pow2((w - 1) * sx2 + 1)
        cells = sorted({py * span + px for py in range(max(sy2 // span, 1))
                        for px in range(sx2)})
        out = _phase_candidates(shape, sy2, sx2, footprint, cells, slots)
    return out


def _phase_candidates(shape, sy2: int, sx2: int, footprint: int, phases: list[int],
                      slots: int):
    """Grids for ``shape`` with pixel strides (sy2, sx2), channels interleaved at the
    first 1, 2, 4, ... of ``phases`` in each power-of-two block."""
    c, h, w = shape
    out = []
    for nph in (1 << t for t in range(len(phases).bit_length())
                if 1 << t <= len(phases)):
        block = next_pow2(footprint + phases[nph - 1])
        blocks = -(-c // nph)
        while next_pow2(blocks * block) <= slots:
            offs = tuple((k // nph) * block + phases[k % nph] for k in range(c))
            grid = (offs, sy2, sx2)
            pos = _grid_positions(shape, grid)
            period = next_pow2(blocks * block)
            if np.unique(pos).size == pos.size and pos.max() < period:
                out.append((period, pos, grid))
            block *= 2
    return out


def _cell_layouts(entry, first, slots: int):
    """Input layouts for client-side im2col patches: K groups of P positions.

    The first convolution's output (compact, period Po) folds ``slots / Po`` blocks
    together, so a patch group may sit in any block at no cost; only its offset inside
    the block sets the diagonal, (offset - channel * P). Filling the blocks column-wise
    (group k in block k mod nb at offset (k div nb) * P) leaves ceil(K / nb) offsets and
    so about ceil(K / nb) + C diagonals instead of K + C.
    """
    groups, width = (int(v) for v in entry.attrs["patch_groups"])
    po = next_pow2(int(np.prod(first.shape)))
    nb = slots // po
    if nb < 2 or -(-groups // nb) * width > po:
        return []
    k, p = np.divmod(np.arange(groups * width), width)
    pos = (k % nb) * po + (k // nb) * width + p
    return [(slots, pos, None)]


def _same(a, b) -> bool:
    """Two layouts put every element at the same slot."""
    if a[0] != b[0] or (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or np.array_equal(a[1], b[1])


def _assign_layouts(graph: Graph, entry, slots: int, *, search: bool,
                    key_weight: float | None = None):
    """Slot layout of every value and the diagonal plan of every DENSE node.

    With ``search``: the client's input takes the candidate layout (compact; a grid with
    power-of-two rows before a convolution; :func:`_cell_layouts` for im2col patches)
    under which the first dense layer is cheapest, and each convolution-like DENSE
    (``grid_stride`` attribute from linearize) picks, among compact and
    :func:`_grid_candidates`, the output layout with the lowest :func:`dense_cost` for
    itself plus the next dense layer. The two inputs of an ADD must sit alike: a DENSE
    whose value reaches an ADD whose other input already has a layout takes that layout
    (a dense map can write any layout; residual networks thus keep each stage's grid,
    as Lee et al.'s multiplexed packing does). When an ADD's inputs still differ (two
    values no DENSE feeds), every value that reaches an ADD falls back to compact. The
    model's output stays compact.

    With ``key_weight`` (one input per ciphertext, as bootstrapped models run), layers
    are planned in order and a rotation key an earlier layer already uses costs a later
    one nothing, while a new key counts ``key_weight`` rotations: at ring 2^16 a key is
    ~150 MB, so a network shares a few dozen keys instead of each layer choosing its own.
    """
    shared = key_weight is not None
    kw = KEY_WEIGHT if key_weight is None else key_weight
    consumers = {n.name: graph.consumers(n.name) for n in graph.nodes}

    def reaches(name: str, pred) -> bool:
        for c in consumers[name]:
            if pred(c) or (c.op in _ELEMENTWISE and reaches(c.name, pred)):
                return True
        return False

    def next_dense(name: str):
        for c in consumers[name]:
            if c.op is Op.DENSE:
                return c
            if c.op in _ELEMENTWISE:
                found = next_dense(c.name)
                if found is not None:
                    return found
        return None

    def is_output(name: str) -> bool:   # the value itself, maybe through activations
        return name == graph.output or any(c.op in _ELEMENTWISE and is_output(c.name)
                                           for c in consumers[name])

    def add_partner(name: str, layouts: dict, via: str | None = None):
        """The layout of the other input of an ADD ``name`` reaches, if already known."""
        for c in consumers[name]:
            if c.op in (Op.ADD, Op.MUL):
                other = [i for i in c.inputs if i != (via or name)]
                if other and other[0] in layouts:
                    return layouts[other[0]]
            elif c.op in _ELEMENTWISE:
                found = add_partner(c.name, layouts, c.name)
                if found is not None:
                    return found
        return None

    shapes = {n.name: tuple(n.shape) for n in graph.nodes}

    def keeps_grid(node, in_shape) -> bool:
        """A same-shape stride-1 convolution: it may write its input's grid (multiplexed
        channels included) and its diagonals stay independent of the pixel."""
        return (tuple(node.attrs.get("grid_stride", ())) == (1, 1)
                and tuple(node.shape) == tuple(in_shape))

    outputs = {n.name for n in graph.nodes if is_output(n.name)}
    to_add = {n.name for n in graph.nodes
              if reaches(n.name, lambda c: c.op in (Op.ADD, Op.MUL))}

    def best_dense(node, in_layout, fixed, layouts, keys):
        opts = {"key_weight": kw, "free_keys": keys, "slots": slots}
        in_period, in_pos, in_grid = in_layout
        matrix = node.params["matrix"]
        target = None if node.name in fixed else add_partner(node.name, layouts)
        if target is not None:
            options = [target]
        else:
            options = [_compact(node.shape)]
            if (search and in_grid is not None and "grid_stride" in node.attrs
                    and len(node.shape) == 3 and node.name not in fixed):
                options += _grid_candidates(node, in_grid, slots)
                if keeps_grid(node, shapes[node.inputs[0]]):
                    options.append(in_layout)
        after = next_dense(node.name)
        # the next layer's output: where an ADD will pin it, else compact or (a
        # same-shape convolution) this candidate's own layout, whichever is cheaper
        after_target = (None if after is None or after.name in fixed
                        else add_partner(after.name, layouts))
        best = None
        for period, pos, grid in options:
            plan = plan_dense(matrix, in_pos, pos, in_period, period, **opts)
            cost = dense_cost(plan, **opts)
            if after is not None and len(options) > 1:
                if after_target is not None:
                    outs = [after_target]
                else:
                    outs = [(None, None)]
                    if grid is not None and keeps_grid(after, node.shape):
                        outs.append((period, pos))
                cost += min(dense_cost(plan_dense(after.params["matrix"], pos, o[1], period,
                                                  o[0], **opts), **opts) for o in outs)
            if best is None or cost < best[0]:
                best = (cost, plan, (period, pos, grid))
        return best

    def assign(entry_layout, fixed):
        layouts: dict[str, tuple] = {n.name: _compact(n.shape) for n in graph.nodes
                                     if n.op is Op.INPUT or n is entry}
        layouts[entry.name] = entry_layout
        dense: dict[str, DensePlan] = {}
        keys: set[int] = set()
        total = 0.0
        for node in graph.nodes:
            if node.name in layouts:
                continue
            if node.op in (Op.ADD, Op.MUL):
                a, b = (layouts[i] for i in node.inputs)
                if not _same(a, b):
                    return None
            if node.op is not Op.DENSE:
                if node.op in _ELEMENTWISE + (Op.ADD, Op.MUL):
                    layouts[node.name] = layouts[node.inputs[0]]
                continue
            free = frozenset(keys)        # empty unless keys are shared
            _, dense[node.name], layouts[node.name] = best_dense(
                node, layouts[node.inputs[0]], fixed, layouts, free)
            total += dense_cost(dense[node.name], kw, free, slots)
            if shared:
                keys |= {normalize_rotation(r, slots) for r in dense[node.name].rotations()}
        return total, layouts, dense

    def assign_all(entry_layout):
        grids = assign(entry_layout, outputs) if search else None
        return grids if grids is not None else assign(entry_layout, outputs | to_add)

    options = [_compact(entry.shape)]
    first = next_dense(entry.name)
    if search and first is not None and len(consumers[entry.name]) == 1:
        if entry.op is Op.INPUT and len(entry.shape) == 3 and "grid_stride" in first.attrs:
            c, h, w = entry.shape
            sy = next_pow2(w)
            block = next_pow2(h * sy)
            grid = (tuple(k * block for k in range(c)), sy, 1)
            if next_pow2(c * block) <= slots:
                options.append((next_pow2(c * block), _grid_positions(entry.shape, grid),
                                grid))
        if entry.op is Op.GATHER and "patch_groups" in entry.attrs:
            options += _cell_layouts(entry, first, slots)
    # The whole model's cost decides: power-of-two rows rarely help the first layer but
    # let later layers split their rotations on a common stride.
    best = min((assign_all(o) for o in options), key=lambda r: r[0])
    return best[0], best[1], best[2]


def _client_entry(graph: Graph):
    """The node whose value the client encrypts: the input, or a GATHER right after it
    (the client applies the gather to its own input); a GATHER anywhere else cannot run."""
    readers = graph.consumers(graph.input.name)
    entry = readers[0] if len(readers) == 1 and readers[0].op is Op.GATHER else graph.input
    for node in graph.nodes:
        if node.op is Op.GATHER and node is not entry:
            raise CompileError(f"gather {node.name!r} is not on the input; only the client "
                               "can rearrange values")
    return entry


def _expand_first_layer(graph: Graph, entry, dense: dict[str, DensePlan], slots: int
                        ) -> dict:
    """Let the client pre-rotate its input for the first dense layer when that is cheaper.

    With block t of the input holding rot(x, d_t) for each non-zero diagonal d_t, the
    layer costs one product and log2(blocks) fold rotations instead of its baby and giant
    steps. Only when the input feeds that layer alone and the blocks fit in the slots.
    """
    readers = graph.consumers(entry.name)
    if len(readers) != 1 or readers[0].op is not Op.DENSE:
        return {"layout": "replicated"}
    name, plan = readers[0].name, dense[readers[0].name]
    block = max(plan.in_period, plan.out_period)
    blocks = next_pow2(len(plan.diagonals))
    if blocks * block > slots or math.log2(blocks) >= plan.rotation_count():
        return {"layout": "replicated"}
    dense[name] = replace(plan, input_blocks=blocks)
    return {"layout": "expanded", "block": block, "blocks": blocks,
            "shifts": list(plan.diagonals)}

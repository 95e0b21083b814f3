"""Values wider than one ciphertext: each split into parts of a fixed number of elements.

A value of ``n`` numbers that does not fit ``slots`` slots is cut into ``parts``
consecutive chunks of ``chunk`` elements (the last one may be shorter), one ciphertext
each. A (C, H, W) value is cut between channels, ``cc`` channels per chunk (the largest
power of two whose compact layout fits), so each part is itself a (cc, H, W) image
and a convolution's part-to-part maps keep the grid structure the layout search uses;
a value whose single channel does not fit is cut into flat chunks of ``slots``.

A DENSE map between tiled values is then a block matrix: block (j, i) takes input
part i to output part j. Every part of a value shares one slot layout, so all blocks of
a layer share one diagonal plan, planned on the *union* of the blocks' sparsity
patterns: the planner (:mod:`.layout`) runs unchanged on a surrogate graph in which
every value has its chunk's shape and every DENSE the union of its blocks (with
absolute values, so no entries cancel). The evaluator then rotates each input part by
the baby steps once, and each output part sums its blocks' diagonal products before
its giant rotations: a layer costs ``parts_in`` hoisted baby sets and ``parts_out``
giant sets, as in the block-diagonal variant of the multiplexed convolution of Lee et
al. (ICML 2022, Sec. 4), where channels beyond one ciphertext go to further ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..ir import Graph, Node, Op
from .params import next_pow2


@dataclass(frozen=True)
class Tile:
    """How one value is cut: ``parts`` chunks of ``chunk`` elements, each laid out as a
    value of ``shape`` (the chunk's shape; prod(shape) == chunk)."""

    shape: tuple[int, ...]
    parts: int

    @property
    def chunk(self) -> int:
        return int(np.prod(self.shape))


def tile_of(shape: tuple[int, ...], slots: int) -> Tile:
    """The cut of a value of ``shape`` into ciphertexts of ``slots`` slots."""
    n = int(np.prod(shape))
    if next_pow2(n) <= slots:
        return Tile(tuple(shape), 1)
    if len(shape) == 3 and next_pow2(shape[1] * shape[2]) <= slots:
        c, h, w = shape
        cc = 1
        while 2 * cc < c and next_pow2(2 * cc * h * w) <= slots:
            cc *= 2
        return Tile((cc, h, w), -(-c // cc))
    return Tile((slots,), -(-n // slots))


def tiles_of(graph: Graph, slots: int) -> dict[str, Tile]:
    """The cut of every value (the client's entry value included)."""
    return {n.name: tile_of(n.shape, slots) for n in graph.nodes}


def part(values: np.ndarray, p: int, chunk: int) -> np.ndarray:
    """Part ``p`` of a flat vector cut into chunks of ``chunk`` (the last zero-padded)."""
    out = np.zeros(chunk)
    piece = np.ravel(values)[p * chunk:(p + 1) * chunk]
    out[:piece.size] = piece
    return out


def block(matrix, j: int, i: int, in_chunk: int, out_chunk: int):
    """Block (j, i) of ``matrix``: output part j's rows, input part i's columns (the
    last parts are padded with zero rows / columns to a full chunk)."""
    m = sp.csr_array(matrix)
    rows = slice(j * out_chunk, min((j + 1) * out_chunk, m.shape[0]))
    cols = slice(i * in_chunk, min((i + 1) * in_chunk, m.shape[1]))
    sub = sp.coo_array(m[rows][:, cols])
    return sp.csr_array((sub.data, (sub.row, sub.col)), shape=(out_chunk, in_chunk))


def blocks_and_union(matrix, in_chunk: int, out_chunk: int
                     ) -> tuple[tuple[tuple[int, int], ...], sp.csr_array]:
    """The non-zero blocks (j, i) of ``matrix`` and the union of their patterns, as
    one (out_chunk, in_chunk) matrix of absolute values (linear in the non-zeros: a
    bincount over block indices, one sparse sum)."""
    coo = sp.coo_array(matrix)
    keep = coo.data != 0
    r, c, v = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
    n_in = -(-coo.shape[1] // in_chunk)
    n_out = -(-coo.shape[0] // out_chunk)
    seen = np.bincount((r // out_chunk) * n_in + c // in_chunk, minlength=n_in * n_out)
    pairs = np.flatnonzero(seen)
    union = sp.csr_array((np.abs(v), (r % out_chunk, c % in_chunk)),
                         shape=(out_chunk, in_chunk))
    union.sum_duplicates()
    return tuple((int(k // n_in), int(k % n_in)) for k in pairs), union


def surrogate(graph: Graph, entry: Node, tiles: dict[str, Tile]
              ) -> tuple[Graph, dict[str, tuple[tuple[int, int], ...]]]:
    """The graph the layout search plans for a tiled model, and each DENSE's blocks.

    Every value has its chunk's shape; a DENSE maps chunk to chunk by the union of its
    blocks; a grid stride is kept only where both sides are cut between channels (a
    flat cut breaks the pixel grid). The client's entry becomes a plain input: the
    client cuts the value it encrypts itself.
    """
    nodes: list[Node] = []
    blocks: dict[str, tuple[tuple[int, int], ...]] = {}
    for node in graph.nodes:
        t = tiles[node.name]
        if node.op is Op.INPUT or node is entry:
            # a client-side gather becomes the input itself
            nodes = [Node(graph.input.name, Op.INPUT, (), t.shape, {"shape": t.shape})]
            continue
        if node.op is Op.DENSE:
            src = tiles[node.inputs[0]]
            if src.parts == t.parts == 1:      # one block: the matrix itself
                pairs, union = ((0, 0),), node.params["matrix"]
            else:
                pairs, union = blocks_and_union(node.params["matrix"], src.chunk, t.chunk)
            blocks[node.name] = pairs
            attrs = {"shape": t.shape}
            stride = node.attrs.get("grid_stride")
            if stride is not None and len(src.shape) == 3 and len(t.shape) == 3:
                attrs["grid_stride"] = stride
            nodes.append(Node(node.name, Op.DENSE, _inputs(node, entry, graph), t.shape,
                              attrs, {"matrix": union, "bias": np.zeros(t.chunk)}))
            continue
        nodes.append(node.replace(shape=t.shape, inputs=_inputs(node, entry, graph)))
    return Graph(tuple(nodes), graph.output), blocks


def _inputs(node: Node, entry: Node, graph: Graph) -> tuple[str, ...]:
    return tuple(graph.input.name if s == entry.name else s for s in node.inputs)

"""Pure graph -> graph passes. None prints, generates keys or touches a backend."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CompileError, InputError, UnsupportedOperation
from ..ir import AFFINE_OPS, Graph, Node, Op, eval_node
from ..ir.kernels import token_ids
from .dense import plan_dense
from .sparse import chain_matrix

# Lowering a chain of affine ops by probing it with the identity costs O(n*m) memory
# and time; beyond this many entries (32 MiB) the chain's sparse matrix is written from
# its kernels (:mod:`.sparse`) instead, up to MAX_NONZEROS non-zeros.
MAX_DENSE_ENTRIES = 1 << 22
MAX_NONZEROS = 1 << 26


@dataclass
class PassNote:
    """What a pass changed, for the compile report."""

    pass_name: str
    messages: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)   # structured results (fit reports, ranges)


def _rename_inputs(node: Node, alias: dict[str, str]) -> Node:
    if any(i in alias for i in node.inputs):
        return node.replace(inputs=tuple(alias.get(i, i) for i in node.inputs))
    return node


def fold_batchnorm(graph: Graph) -> tuple[Graph, PassNote]:
    """Fuse a BATCHNORM into the LINEAR/CONV2D that feeds it when nothing else reads it.

    conv(x)*s + t == conv'(x) with weight W*s (per output channel) and bias b*s + t,
    so the fused graph computes the same function with one op less.
    """
    note = PassNote("fold_batchnorm")
    by_name = {n.name: n for n in graph.nodes}
    out: list[Node] = []
    alias: dict[str, str] = {}
    for node in graph.nodes:
        node = _rename_inputs(node, alias)
        src = by_name.get(node.inputs[0]) if node.inputs else None
        # (a LINEAR over (tokens, features) has tokens, not its features, as channels)
        if (node.op is Op.BATCHNORM and src is not None and src.op in (Op.LINEAR, Op.CONV2D)
                and (src.op is Op.CONV2D or len(src.shape) == 1)
                and len(graph.consumers(src.name)) == 1 and src.name != graph.output):
            s, t = node.params["scale"], node.params["shift"]
            w = src.params["weight"] * s.reshape((-1,) + (1,) * (src.params["weight"].ndim - 1))
            fused = src.replace(name=node.name, params={"weight": w,
                                                        "bias": src.params["bias"] * s + t})
            out = [fused if n.name == src.name else n for n in out]
            by_name[node.name] = fused
            note.messages.append(f"batchnorm {node.name!r} fused into {src.op.value} "
                                 f"{src.name!r}")
            # The fused node keeps the batchnorm's name so later readers stay valid.
            continue
        out.append(node)
    return graph.with_nodes(out), note


def _scalar_scale(node: Node) -> float | None:
    """The one factor of a BATCHNORM / AFFINE that only scales (same factor everywhere,
    no shift), else None."""
    if node.op not in (Op.BATCHNORM, Op.AFFINE):
        return None
    s, t = node.params["scale"], node.params["shift"]
    if s.size == 0 or np.any(t != 0) or np.any(s != s.ravel()[0]):
        return None
    return float(s.ravel()[0])


def fold_matmul_scale(graph: Graph) -> tuple[Graph, PassNote]:
    """An attention's 1/sqrt(d) scale folded into the query projection: c (Q K^T) =
    (c Q) K^T, so a scalar scaling of a MATMUL's output moves onto the LINEAR that makes
    its first operand (through RESHAPE / TRANSPOSE, each read only there). Exact; on
    shares it saves a truncation of every attention score (heads x tokens^2 values)."""
    note = PassNote("fold_matmul_scale")
    nodes = {n.name: n for n in graph.nodes}
    drop: dict[str, str] = {}
    for node in graph.nodes:
        c = _scalar_scale(node)
        if c is None or node.name == graph.output:
            continue
        mm = nodes[node.inputs[0]]
        if mm.op is not Op.MATMUL or len(graph.consumers(mm.name)) != 1:
            continue
        src = nodes[mm.inputs[0]]
        while src.op in (Op.RESHAPE, Op.TRANSPOSE) and len(graph.consumers(src.name)) == 1:
            src = nodes[src.inputs[0]]
        if src.op is not Op.LINEAR or len(graph.consumers(src.name)) != 1 \
                or mm.inputs[0] == mm.inputs[1]:
            continue
        nodes[src.name] = src.replace(params={"weight": src.params["weight"] * c,
                                              "bias": src.params["bias"] * c})
        drop[node.name] = mm.name
        note.messages.append(f"scale {c:g} of {node.name!r} folded into {src.name!r}")
    out = []
    for n in graph.nodes:
        if n.name in drop:
            continue
        n = nodes[n.name]
        out.append(_rename_inputs(n, drop))
    output = drop.get(graph.output, graph.output)
    return graph.with_nodes(out, output), note


def _id_positions(graph: Graph, node: Node) -> np.ndarray:
    """Where an EMBED's token ids sit in the flattened model input: its input must be
    the model input itself or moved out of it (SLICE / RESHAPE / TRANSPOSE)."""
    chain, src = [], graph.node(node.inputs[0])
    while src.op in (Op.SLICE, Op.RESHAPE, Op.TRANSPOSE):
        chain.insert(0, src)
        src = graph.node(src.inputs[0])
    if src.op is not Op.INPUT:
        raise UnsupportedOperation(
            f"embedding {node.name!r} looks up ids computed by the model; on shares only "
            "ids taken from the model input can be looked up (the client one-hot "
            "encodes them)")
    probe = np.arange(int(np.prod(src.shape)), dtype=np.float64).reshape((1,) + src.shape)
    for n in chain:
        probe = eval_node(n, [probe])
    return probe.ravel().astype(np.int64)


def onehot_embeddings(graph: Graph) -> tuple[Graph, PassNote]:
    """Token embeddings as products with one-hot inputs (MPC): the servers never see a
    token id, so an EMBED cannot index its table on shares. The client one-hot encodes
    the ids (:func:`encode_input`, public and deterministic, before sharing) and each
    EMBED becomes a LINEAR of its slice of the one-hot block (table^T, no bias): on
    shares a local product with public weights, no communication. The cost is the
    client's upload, ids x vocabulary values (MiniLM at 128 tokens: 3.9 M values, 31 MB
    per party) and each party's product with the table. The new input is flat: the
    original input, then one block per EMBED; its attrs ``onehot`` (per block: the
    vocabulary size, then the ids' positions in the flattened original input) and
    ``source_shape`` say how to build it."""
    note = PassNote("onehot_embeddings")
    embeds = [n for n in graph.nodes if n.op is Op.EMBED]
    if not embeds:
        return graph, note
    src = graph.input
    n0 = int(np.prod(src.shape))
    blocks, at = [], n0
    for e in embeds:
        pos = _id_positions(graph, e)
        blocks.append((e, pos, at))
        at += pos.size * e.params["table"].shape[0]
    spec = tuple((int(e.params["table"].shape[0]),) + tuple(int(p) for p in pos)
                 for e, pos, _ in blocks)
    new_in = Node(f"{src.name}_onehot", Op.INPUT, (), (at,),
                  {"shape": (at,), "onehot": spec, "source_shape": tuple(src.shape)})
    head = Node(f"{src.name}_flat", Op.SLICE, (new_in.name,), (n0,),
                {"axis": 0, "start": 0, "stop": n0})
    out = [new_in, head, Node(src.name, Op.RESHAPE, (head.name,), src.shape,
                              {"shape": tuple(src.shape)})]
    by_embed = {e.name: (pos, start) for e, pos, start in blocks}
    for node in graph.nodes[1:]:
        if node.name not in by_embed:
            out.append(node)
            continue
        pos, start = by_embed[node.name]
        table = node.params["table"]
        vocab = table.shape[0]
        part = Node(f"{node.name}_onehot", Op.SLICE, (new_in.name,), (pos.size * vocab,),
                    {"axis": 0, "start": start, "stop": start + pos.size * vocab})
        ids_shape = tuple(node.shape[:-1])
        rows = Node(f"{node.name}_rows", Op.RESHAPE, (part.name,), ids_shape + (vocab,),
                    {"shape": ids_shape + (vocab,)})
        out += [part, rows, Node(node.name, Op.LINEAR, (rows.name,), node.shape, {},
                                 {"weight": table.T, "bias": np.zeros(table.shape[1])})]
        note.messages.append(f"embedding {node.name!r}: {pos.size} ids one-hot encoded by "
                             f"the client over {vocab} tokens")
    return graph.with_nodes(out), note


def encode_input(graph: Graph, xs: np.ndarray) -> np.ndarray:
    """The input a lowered graph takes for a batch ``xs`` of the model's own input:
    ``xs`` itself, or with :func:`onehot_embeddings` its ids one-hot encoded after it
    (InputError when an id is not an integer of the vocabulary)."""
    return onehot_encode(graph.input.attrs, xs)


def onehot_encode(input_attrs, xs: np.ndarray) -> np.ndarray:
    """:func:`encode_input` from the lowered INPUT node's attrs alone (``onehot`` and
    ``source_shape``: what a client gets from the service, without the model)."""
    spec = input_attrs.get("onehot")
    if not spec:
        return xs
    xs = np.asarray(xs, dtype=np.float64)
    source = tuple(int(d) for d in input_attrs["source_shape"])
    if xs.ndim < 1 or xs.shape[1:] != source:
        raise InputError(f"inputs have shape {xs.shape}; the model takes (n, "
                         f"{', '.join(map(str, source))})")
    flat = xs.reshape(xs.shape[0], -1)
    parts = [flat]
    for vocab, *pos in spec:
        idx = token_ids(flat[:, np.asarray(pos, dtype=np.int64)], int(vocab))
        hot = np.zeros((xs.shape[0], len(pos), int(vocab)))
        np.put_along_axis(hot, idx[..., None], 1.0, axis=-1)
        parts.append(hot.reshape(xs.shape[0], -1))
    return np.concatenate(parts, axis=1)


def replace_maxpool(graph: Graph) -> tuple[Graph, PassNote]:
    """Replace MAXPOOL2D by AVGPOOL2D of the same window: max has no low-depth polynomial."""
    note = PassNote("replace_maxpool")
    out = []
    for node in graph.nodes:
        if node.op is Op.MAXPOOL2D:
            node = node.replace(op=Op.AVGPOOL2D)
            note.messages.append(f"max-pool {node.name!r} replaced by average pooling "
                                 f"(kernel {tuple(node.attrs['kernel'])})")
        out.append(node)
    return graph.with_nodes(out), note


def expand_broadcasts(graph: Graph) -> tuple[Graph, PassNote]:
    """Give every product and sum operands of one shape: an operand that broadcasts
    (a squeeze-excite gate of shape (C, 1, 1) times a (C, H, W) value) is first
    repeated by a DENSE map (a 0/1 sparse matrix: broadcasting is linear), so the slot
    evaluator multiplies or adds two ciphertexts position by position."""
    import scipy.sparse as sp

    note = PassNote("expand_broadcasts")
    shapes = {n.name: tuple(n.shape) for n in graph.nodes}
    out: list[Node] = []
    for node in graph.nodes:
        if node.op in (Op.MUL, Op.ADD) and any(shapes[i] != tuple(node.shape)
                                                for i in node.inputs):
            inputs = []
            for j, src in enumerate(node.inputs):
                if shapes[src] == tuple(node.shape):
                    inputs.append(src)
                    continue
                size = int(np.prod(shapes[src], dtype=np.int64))
                cols = np.broadcast_to(np.arange(size).reshape(shapes[src]),
                                       node.shape).ravel()
                rows = np.arange(cols.size)
                matrix = sp.csr_matrix((np.ones(cols.size), (rows, cols)),
                                       shape=(cols.size, size))
                expand = Node(f"{node.name}/expand{j}", Op.DENSE, (src,), node.shape,
                              {"shape": tuple(node.shape)},
                              {"matrix": matrix, "bias": np.zeros(cols.size)})
                out.append(expand)
                inputs.append(expand.name)
                note.messages.append(f"{src!r} {shapes[src]} repeated to {tuple(node.shape)}"
                                     f" for {node.op.value} {node.name!r}")
            node = node.replace(inputs=tuple(inputs))
        out.append(node)
    return graph.with_nodes(out), note


def linearize(graph: Graph) -> tuple[Graph, PassNote]:
    """Collapse each maximal chain of affine ops into one DENSE node.

    A chain is extended through a node only when that node is the sole reader of its
    input, so no intermediate value that another branch needs disappears.
    """
    note = PassNote("linearize")
    shapes = {n.name: n.shape for n in graph.nodes}
    readers = {n.name: len(graph.consumers(n.name)) for n in graph.nodes}
    out: list[Node] = []
    chain_of: dict[str, list[Node]] = {}  # chain tail name -> chain
    for node in graph.nodes:
        if node.op not in AFFINE_OPS:
            out.append(node)
            continue
        src = node.inputs[0]
        if src in chain_of and readers[src] == 1 and src != graph.output:
            chain = chain_of.pop(src) + [node]
            out = [n for n in out if n.name != src]
        else:
            chain = [node]
        chain_of[node.name] = chain
        out.append(_dense_from_chain(chain, shapes))
    merged = [c for c in chain_of.values() if len(c) > 1]
    for chain in merged:
        note.messages.append(" -> ".join(f"{n.op.value} {n.name!r}" for n in chain)
                             + " lowered to one dense map")
    return graph.with_nodes(out), note


def probe_entries(n_in: int, n_out: int) -> int:
    """Entries the identity probe of an n_in -> n_out chain holds: the probe batch (one
    input per column) and the matrix it yields."""
    return n_in * max(n_in, n_out)


def dense_chains(graph: Graph) -> list[tuple[str, int, int, tuple[Node, ...]]]:
    """(last node, input size, output size, nodes) of every chain :func:`linearize`
    would lower, found with the same rule but without building a matrix: the size check
    that decides how (and whether) each chain is lowered."""
    readers = {n.name: len(graph.consumers(n.name)) for n in graph.nodes}
    sizes = {n.name: int(np.prod(n.shape)) for n in graph.nodes}
    chains: dict[str, tuple[int, tuple[Node, ...]]] = {}   # tail -> (input size, nodes)
    for node in graph.nodes:
        if node.op not in AFFINE_OPS:
            continue
        src = node.inputs[0]
        if src in chains and readers[src] == 1 and src != graph.output:
            n_in, nodes = chains.pop(src)
            chains[node.name] = (n_in, nodes + (node,))
        else:
            chains[node.name] = (sizes[src], (node,))
    return [(name, n_in, sizes[name], nodes) for name, (n_in, nodes) in chains.items()]


def _dense_from_chain(chain: list[Node], shapes: dict[str, tuple[int, ...]]) -> Node:
    head, tail = chain[0], chain[-1]
    in_shape = shapes[head.inputs[0]]
    in_size, out_size = int(np.prod(in_shape)), int(np.prod(tail.shape))
    if probe_entries(in_size, out_size) > MAX_DENSE_ENTRIES:
        matrix, bias = chain_matrix(chain, in_shape)
        if matrix.nnz > MAX_NONZEROS:
            raise CompileError(
                f"layer {tail.name!r} maps {in_size} to {out_size} values through "
                f"{matrix.nnz} weights; the HE lowering takes at most {MAX_NONZEROS}")
    else:
        probe = np.vstack([np.zeros((1, in_size)), np.eye(in_size)])
        x = probe.reshape((in_size + 1,) + in_shape)
        for node in chain:
            x = eval_node(node, [x])
        flat = x.reshape(in_size + 1, -1)
        bias = flat[0]
        matrix = (flat[1:] - bias).T
    attrs = {"shape": tail.shape, "source": tuple(n.name for n in chain)}
    stride = _grid_stride(chain, in_shape)
    if stride is not None:
        attrs["grid_stride"] = stride
    return Node(tail.name, Op.DENSE, (head.inputs[0],), tail.shape, attrs,
                {"matrix": matrix, "bias": bias})


def _grid_stride(chain: list[Node], in_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(sy, sx) when the chain maps (C, H, W) to (C', H', W') by convolutions, pooling
    and per-channel affines only: output pixel (y, x) then reads a window anchored at
    input pixel (sy * y + oy, sx * x + ox), the same for every pixel, which the planner
    uses to lay the output out on a strided grid. None for anything else."""
    if len(in_shape) != 3 or len(chain[-1].shape) != 3:
        return None
    sy = sx = 1
    for node in chain:
        if node.op is Op.BATCHNORM:
            continue
        if node.op not in (Op.CONV2D, Op.AVGPOOL2D):
            return None
        sy, sx = sy * int(node.attrs["stride"][0]), sx * int(node.attrs["stride"][1])
    return sy, sx


def fold_poly_domain(graph: Graph) -> tuple[Graph, PassNote]:
    """Move each POLY's map from [lo, hi] onto [-1, 1] into the DENSE that feeds it.

    p(x) on [lo, hi] equals p evaluated at t = (2x - lo - hi) / (hi - lo) on [-1, 1];
    scaling the dense layer's rows and bias yields t directly, which saves OpenFHE the
    scalar multiplication (one level) it otherwise spends per activation.
    """
    note = PassNote("fold_poly_domain")
    by_name = {n.name: n for n in graph.nodes}
    replaced: dict[str, Node] = {}
    for node in graph.nodes:
        if node.op is not Op.POLY or (node.attrs["lo"], node.attrs["hi"]) == (-1.0, 1.0):
            continue
        src = by_name[node.inputs[0]]
        if (src.op is not Op.DENSE or src.name == graph.output
                or len(graph.consumers(src.name)) != 1):
            continue
        lo, hi = node.attrs["lo"], node.attrs["hi"]
        scale, shift = 2.0 / (hi - lo), -(hi + lo) / (hi - lo)
        replaced[src.name] = src.replace(params={
            "matrix": src.params["matrix"] * scale, "bias": src.params["bias"] * scale + shift})
        attrs = dict(node.attrs, lo=-1.0, hi=1.0, fit_lo=lo, fit_hi=hi)
        replaced[node.name] = node.replace(attrs=attrs)
        note.messages.append(f"range map of {node.name!r} folded into {src.name!r} "
                             "(one level saved)")
    return graph.with_nodes(replaced.get(n.name, n) for n in graph.nodes), note


def _im2col_indices(in_shape, kernel, stride, padding) -> np.ndarray:
    """For each (kernel offset k, output position p), the input pixel it reads, or -1."""
    ci, h, w = in_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    c, dr, dc, r, q = np.meshgrid(np.arange(ci), np.arange(kh), np.arange(kw),
                                  np.arange(ho), np.arange(wo), indexing="ij")
    row, col = r * sh + dr - ph, q * sw + dc - pw
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    return np.where(inside, (c * h + row) * w + col, -1).reshape(-1)


def im2col_first_conv(graph: Graph, *, max_values: int = 1 << 14,
                      layout: str = "latency") -> tuple[Graph, PassNote]:
    """Let the client lay out the first convolution's input patches (im2col).

    The client holds its input in the clear, so it can send ``x`` gathered into
    (kernel offset, output position) order. The convolution then maps patch k of every
    position with one weight per (output channel, k): a matrix with one non-zero
    diagonal per (k - c) pair instead of one per distinct pixel offset, which for
    strided convolutions cuts the rotations by an order of magnitude. Applied only
    when the input feeds one CONV2D, the patches fit in ``max_values``, and the
    rotation count at least halves. The ``throughput`` layout keeps the slots for lanes
    instead, so it leaves the graph alone.
    """
    note = PassNote("im2col_first_conv")
    readers = graph.consumers(graph.input.name)
    if layout != "latency" or len(readers) != 1 or readers[0].op is not Op.CONV2D:
        return graph, note
    conv = readers[0]
    if conv.attrs["groups"] != 1 or tuple(conv.attrs["dilation"]) != (1, 1):
        return graph, note
    w = conv.params["weight"]
    idx = _im2col_indices(graph.input_shape, w.shape[2:], conv.attrs["stride"],
                          conv.attrs["padding"])
    positions = int(np.prod(conv.shape[1:]))
    if idx.size > max_values:
        return graph, note
    patch = np.kron(w.reshape(w.shape[0], -1), np.eye(positions))
    bias = np.repeat(conv.params["bias"], positions)
    direct = _dense_from_chain([conv], {n.name: n.shape for n in graph.nodes})
    before = len(plan_dense(direct.params["matrix"]).rotations())
    after = len(plan_dense(patch).rotations())
    if after * 2 > before:
        return graph, note
    # patch_groups (K, P): the gathered vector is K groups (kernel taps) of P positions,
    # which the planner may place in slot cells of its choosing (layout._cell_layouts).
    gather = Node("input_im2col", Op.GATHER, (graph.input.name,), (idx.size,),
                  {"indices": tuple(int(i) for i in idx),
                   "patch_groups": (idx.size // positions, positions)})
    dense = Node(conv.name, Op.DENSE, (gather.name,), conv.shape,
                 {"shape": conv.shape, "source": (conv.name,)},
                 {"matrix": patch, "bias": bias})
    nodes = [graph.input, gather, dense] + [n for n in graph.nodes[1:] if n is not conv]
    note.messages.append(f"first convolution {conv.name!r}: the client sends im2col "
                         f"patches ({idx.size} values); rotations {before} -> {after}")
    return graph.with_nodes(nodes), note


def fold_quadratic(graph: Graph) -> tuple[Graph, PassNote]:
    """Evaluate a degree-2 POLY as one squaring: 1 level instead of OpenFHE's 2.

    On [-1, 1], p(t) = c0 + c1 t + c2 (2t^2 - 1) = a t^2 + b t + c with a = 2 c2. With
    u = sqrt|a| (t + b / 2a), p = sign(a) u^2 + (c - b^2 / 4a): the scale and shift
    of u fold into the DENSE before, sign(a) and the constant into every DENSE after,
    leaving a bare SQUARE (CryptoNets' square activation, Gilad-Bachrach et al. 2016).
    """
    note = PassNote("fold_quadratic")
    by_name = {n.name: n for n in graph.nodes}
    new: dict[str, Node] = {}
    for node in graph.nodes:
        if (node.op is not Op.POLY or len(node.attrs["coeffs"]) != 3
                or (node.attrs["lo"], node.attrs["hi"]) != (-1.0, 1.0)):
            continue
        # Earlier folds may already have rewritten a neighbour: always build on the latest.
        src = new.get(node.inputs[0], by_name[node.inputs[0]])
        readers = [new.get(r.name, r) for r in graph.consumers(node.name)]
        if (src.op is not Op.DENSE or len(graph.consumers(src.name)) != 1 or not readers
                or node.name == graph.output or any(r.op is not Op.DENSE for r in readers)):
            continue
        c0, c1, c2 = node.attrs["coeffs"]
        a, b, c = 2.0 * c2, c1, c0 - c2
        if abs(a) < 1e-12:
            continue
        root, sign, shift = np.sqrt(abs(a)), np.sign(a), b / (2.0 * a)
        const = c - b * b / (4.0 * a)
        new[src.name] = src.replace(params={"matrix": src.params["matrix"] * root,
                                            "bias": (src.params["bias"] + shift) * root})
        new[node.name] = Node(node.name, Op.SQUARE, node.inputs, node.shape,
                              {"source": node.attrs.get("source", "poly")})
        for r in readers:
            m = r.params["matrix"]
            new[r.name] = r.replace(params={"matrix": m * sign,
                                            "bias": r.params["bias"] + const * m.sum(axis=1)})
        note.messages.append(f"quadratic {node.name!r} evaluated as one squaring")
    return graph.with_nodes(new.get(n.name, n) for n in graph.nodes), note

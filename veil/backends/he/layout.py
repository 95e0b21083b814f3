"""Where values sit in ciphertext slots. Shared by the client (encoding its input) and
the evaluator (which relies on the same layout); see ``veil.compiler.plan``."""
from __future__ import annotations

import numpy as np

from ...compiler.tiles import part


def part_names(parts: int) -> list[str]:
    """Names of a request's or result's ciphertexts on the wire, one per part."""
    return ["ct"] + [f"ct{i}" for i in range(1, parts)]


def tile(values: np.ndarray, period: int, slots: int,
         positions: np.ndarray | None = None) -> np.ndarray:
    """Place ``values`` in a block of ``period`` slots (element k at ``positions[k]``,
    default slot k; the rest zero) and repeat the block across all ``slots``."""
    flat = np.zeros(period)
    if positions is None:
        flat[: np.size(values)] = np.ravel(values)
    else:
        flat[np.asarray(positions, dtype=np.int64)] = np.ravel(values)
    return np.tile(flat, slots // period)


def expanded(values: np.ndarray, period: int, block: int, shifts: list[int],
             blocks: int, slots: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Block ``t`` holds the input rotated by ``shifts[t]`` (the first layer's diagonals).

    The client has the input in the clear, so it performs the first layer's rotations
    itself at no cost; the server then needs one product and ``log2(blocks)`` folds.
    The pattern of ``blocks * block`` slots repeats across the ciphertext.
    """
    base = tile(values, period, block, positions)
    pattern = np.zeros(blocks * block)
    for t, shift in enumerate(shifts):
        pattern[t * block:(t + 1) * block] = np.roll(base, -shift)
    return np.tile(pattern, slots // pattern.size)


def apply_gather(values: np.ndarray, spec: dict) -> np.ndarray:
    """The input as the client encrypts it: flattened, and gathered into the first
    convolution's patches (client-side im2col) when the manifest says so."""
    flat = np.ravel(values).astype(np.float64)
    if "gather" not in spec:
        return flat
    idx = np.asarray(spec["gather"], dtype=np.int64)
    return np.append(flat, 0.0)[np.where(idx < 0, flat.size, idx)]


def encode_input(values: np.ndarray, spec: dict, positions: int) -> np.ndarray:
    """Position vector for one input according to the manifest's ``input`` entry."""
    if int(spec.get("parts", 1)) != 1:
        raise ValueError("this input spans several ciphertexts: use encode_parts")
    return encode_parts(values, spec, positions)[0]


def encode_parts(values: np.ndarray, spec: dict, positions: int) -> list[np.ndarray]:
    """Position vectors of one input, one per ciphertext it takes: ``spec["parts"]``
    chunks of ``spec["chunk"]`` consecutive elements (see ``veil.compiler.tiles``),
    each in the planner's layout of one part."""
    values = apply_gather(values, spec)
    where = spec.get("positions")   # the planner's slot grid for the input, if any
    if spec.get("layout", "replicated") == "expanded":
        return [expanded(values, spec["period"], spec["block"], spec["shifts"],
                         spec["blocks"], positions, where)]
    parts, chunk = int(spec.get("parts", 1)), int(spec.get("chunk", values.size))
    return [tile(part(values, p, chunk), spec["period"], positions, where)
            for p in range(parts)]


def interleave(vectors: list[np.ndarray], lanes: int) -> np.ndarray:
    """Slot j holds position j // lanes of lane j % lanes; missing lanes are zero."""
    positions = vectors[0].size
    out = np.zeros((positions, lanes))
    for lane, vec in enumerate(vectors):
        out[:, lane] = vec
    return out.reshape(-1)


def spread(vector: np.ndarray, lanes: int) -> np.ndarray:
    """A position vector shared by every lane (weights, biases) in slot order."""
    return np.repeat(vector, lanes)


def lane_outputs(slots: np.ndarray, lanes: int, count: int, size: int) -> np.ndarray:
    """The first ``size`` positions of the first ``count`` lanes: shape (count, size)."""
    return slots.reshape(-1, lanes)[:size, :count].T


def pack_inputs(xs: list[np.ndarray], manifest: dict, slots: int) -> np.ndarray:
    """Slot vector carrying up to ``manifest['lanes']`` inputs, one per lane."""
    vectors = pack_parts(xs, manifest, slots)
    if len(vectors) != 1:
        raise ValueError("this input spans several ciphertexts: use pack_parts")
    return vectors[0]


def pack_parts(xs: list[np.ndarray], manifest: dict, slots: int) -> list[np.ndarray]:
    """One slot vector per ciphertext of the input (``manifest['input']['parts']``),
    each carrying that part of up to ``manifest['lanes']`` inputs, one per lane."""
    lanes = int(manifest.get("lanes", 1))
    positions = slots // lanes
    encoded = [encode_parts(x, manifest["input"], positions) for x in xs]
    return [interleave([e[p] for e in encoded], lanes) for p in range(len(encoded[0]))]


def unpack_outputs(values: np.ndarray, manifest: dict, count: int) -> np.ndarray:
    """Outputs of the first ``count`` lanes, shape (count, *output shape)."""
    return unpack_parts([values], manifest, count)


def unpack_parts(vectors: list[np.ndarray], manifest: dict, count: int) -> np.ndarray:
    """Outputs of the first ``count`` lanes from the output's ciphertexts (one per
    part, in order), shape (count, *output shape)."""
    out = manifest["output"]
    shape = tuple(out["shape"])
    size = int(np.prod(shape))
    parts, chunk = int(out.get("parts", 1)), int(out.get("chunk", size))
    if len(vectors) != parts:
        raise ValueError(f"the output takes {parts} ciphertexts, got {len(vectors)}")
    lanes = int(manifest.get("lanes", 1))
    pieces = [lane_outputs(v, lanes, count, chunk) for v in vectors]
    return np.concatenate(pieces, axis=1)[:, :size].reshape((count,) + shape)


def gather_features(xs: list[np.ndarray], manifest: dict, slots: int) -> np.ndarray:
    """Feature layout: row f holds feature f of every input, one input per slot."""
    rows = [apply_gather(x, manifest["input"]) for x in xs]
    table = np.zeros((rows[0].size, slots))
    table[:, :len(rows)] = np.array(rows).T
    return table

"""The search index: document vectors, their ids, and the block layout HE scores.

An :class:`Index` is what ``veil index build`` writes and ``veil serve --index`` serves:

* ``vectors`` ``(n, d)`` float32 -- the documents' embeddings (L2-normalised when built
  from texts or with ``normalize=True``: scores are then cosine similarities);
* ``ids`` -- one string per document (what a search returns);
* the *layout*: ``rows`` (``blocks * slots`` entries, the document at each slot of each
  block, -1 for padding). A flat index packs documents in order; a clustered one
  (``clusters=C``, k-means) starts every cluster at a block boundary, so the client can
  ask for the blocks of the clusters nearest its query (``cluster_blocks[c]`` =
  ``[first, end)``) and the public ``centroids`` tell it which;
* ``params`` -- the :class:`~veil.backends.he.openfhe_search.SearchParams` the layout
  was made for, and ``model`` (the embedding model of text queries, or None).

The file is one ``.npz`` (``numpy.load(allow_pickle=False)``: arrays only, never
pickles) with a JSON metadata entry. What a client may see of it (ids, layout,
centroids, parameters: not the vectors) is :meth:`Index.public`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compiler.params import SearchParams
from ..errors import BundleError, InputError

FORMAT = "veil-index-1"
MINILM = "all-MiniLM-L6-v2"
# Rows of the index file, and ids of at most this many characters
MAX_ID_CHARS = 256


@dataclass
class Layout:
    """Where each document sits: ``rows[b * slots + s]`` is the document at slot ``s``
    of block ``b`` (-1: padding); clusters, when any, own ``[first, end)`` blocks."""

    slots: int
    rows: np.ndarray
    centroids: np.ndarray | None = None
    cluster_blocks: np.ndarray | None = None

    @property
    def blocks(self) -> int:
        return len(self.rows) // self.slots

    def blocks_of(self, clusters) -> list[int]:
        """The blocks of ``clusters`` (in the order given, each once)."""
        if self.cluster_blocks is None:
            raise InputError("this index is not clustered: search it whole")
        out: list[int] = []
        for c in clusters:
            c = int(c)
            if not 0 <= c < len(self.cluster_blocks):
                raise InputError(f"this index has clusters 0..{len(self.cluster_blocks) - 1}")
            first, end = (int(v) for v in self.cluster_blocks[c])
            out += [b for b in range(first, end) if b not in out]
        return out

    def docs(self, blocks) -> np.ndarray:
        """The document (or -1) at each slot of ``blocks``, concatenated."""
        idx = np.asarray(list(blocks), dtype=np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self.rows.reshape(self.blocks, self.slots)[idx].reshape(-1)

    def to_arrays(self) -> dict:
        out = {"rows": self.rows}
        if self.centroids is not None:
            out["centroids"] = self.centroids
            out["cluster_blocks"] = self.cluster_blocks
        return out

    @classmethod
    def from_arrays(cls, slots: int, arrays) -> "Layout":
        rows = np.asarray(arrays["rows"], dtype=np.int64)
        cent = arrays["centroids"] if "centroids" in arrays else None
        cb = arrays["cluster_blocks"] if "cluster_blocks" in arrays else None
        if slots <= 0 or rows.ndim != 1 or len(rows) % slots:
            raise BundleError("the index layout does not fill whole blocks")
        return cls(slots, rows, None if cent is None else np.asarray(cent, np.float32),
                   None if cb is None else np.asarray(cb, np.int64))


@dataclass
class Index:
    """A searchable set of vectors; see the module docstring."""

    vectors: np.ndarray
    ids: list[str]
    layout: Layout
    params: dict
    model: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def clustered(self) -> bool:
        return self.layout.cluster_blocks is not None

    def matrix(self) -> np.ndarray:
        """The vectors in layout order (zeros at padding): what HE scores."""
        rows = self.layout.rows
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        real = rows >= 0
        out[real] = self.vectors[rows[real]]
        return out

    def fingerprint(self) -> str:
        """SHA-256 over vectors, ids and layout: a served index's version."""
        h = hashlib.sha256(FORMAT.encode())
        h.update(np.ascontiguousarray(self.vectors, dtype="<f4").tobytes())
        h.update("\0".join(self.ids).encode("utf-8"))
        h.update(np.ascontiguousarray(self.layout.rows, dtype="<i8").tobytes())
        return h.hexdigest()[:32]

    def public(self) -> tuple[dict, dict]:
        """What any client of this index may know: metadata and the layout's arrays
        (ids, rows, centroids). Not the vectors."""
        info = {"format": FORMAT, "count": self.count, "dim": self.dim,
                "model": self.model, "params": self.params, "slots": self.layout.slots,
                "blocks": self.layout.blocks, "clustered": self.clustered,
                "clusters": 0 if not self.clustered else len(self.layout.cluster_blocks),
                "fingerprint": self.fingerprint(), "normalized": bool(
                    self.meta.get("normalized", False))}
        arrays = {"ids": np.array(self.ids, dtype=f"<U{_id_width(self.ids)}"),
                  **self.layout.to_arrays()}
        return info, arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index file atomically (a temporary name, then rename)."""
        path = Path(path)
        info, arrays = self.public()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps({**info, "meta": self.meta})),
                     vectors=self.vectors.astype(np.float32), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Index":
        try:
            with np.load(path, allow_pickle=False) as z:
                doc = json.loads(str(z["meta"]))
                if doc.get("format") != FORMAT:
                    raise BundleError(f"{path} is not a veil index ({FORMAT})")
                vectors = np.asarray(z["vectors"], dtype=np.float32)
                ids = [str(i) for i in z["ids"]]
                layout = Layout.from_arrays(int(doc["slots"]),
                                            {k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"cannot read the index {path}: {exc}") from None
        index = cls(vectors, ids, layout, dict(doc["params"]), doc.get("model"),
                    dict(doc.get("meta") or {}))
        _check(index)
        return index


def _id_width(ids: list[str]) -> int:
    return max([1, *(len(i) for i in ids)])


def _check(index: Index) -> None:
    v, rows = index.vectors, index.layout.rows
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise BundleError("the index's vectors must be a non-empty (n, d) matrix")
    if not np.isfinite(v).all():
        raise BundleError("the index's vectors have NaN or infinite values")
    if len(index.ids) != v.shape[0]:
        raise BundleError("the index has not one id per vector")
    real = rows[rows >= 0]
    spill = int(index.meta.get("spill", 1))
    counts = np.bincount(real, minlength=v.shape[0]) if len(real) else np.zeros(1)
    if rows.min() < -1 or real.max(initial=-1) >= v.shape[0] or counts.min() < 1 \
            or counts.max() > spill:
        raise BundleError("the index layout does not place every document once (or, "
                          "spilled, at most once per cluster it joins)")


# ------------------------------------------------------------------------------ build

def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0,
           sample: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007) on the rows
    of ``x``: ``(centroids (k, d), labels (n,))``; deterministic for ``seed``. The
    centroids are fitted on at most ``sample`` rows drawn at random (all of them when
    fewer), then every row is assigned once: a 1M-row index clusters in seconds."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    k = max(1, min(int(k), n))
    fit = x if n <= sample else x[np.sort(rng.choice(n, sample, replace=False))]
    fit = fit.astype(np.float64)
    centers = [fit[rng.integers(len(fit))]]
    d2 = ((fit - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        c = fit[rng.choice(len(fit), p=p)]
        centers.append(c)
        d2 = np.minimum(d2, ((fit - c) ** 2).sum(1))
    cent = np.stack(centers)
    for _ in range(iters):
        labels = _assign(fit, cent)
        new = np.zeros_like(cent)
        np.add.at(new, labels, fit)
        counts = np.bincount(labels, minlength=k)
        empty = counts == 0
        new[~empty] /= counts[~empty, None]
        new[empty] = cent[empty]
        if np.allclose(new, cent):
            break
        cent = new
    return cent.astype(np.float32), _assign(x, cent)


def _assign(x: np.ndarray, cent: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.int64)
    cn = (cent ** 2).sum(1)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].astype(np.float64)
        out[i:i + chunk] = np.argmin(cn[None, :] - 2 * part @ cent.T, axis=1)
    return out


def flat_layout(n: int, slots: int) -> Layout:
    blocks = max(1, -(-n // slots))
    rows = np.full(blocks * slots, -1, dtype=np.int64)
    rows[:n] = np.arange(n)
    return Layout(slots, rows)


def _nearest(x: np.ndarray, cent: np.ndarray, m: int, chunk: int = 65536) -> np.ndarray:
    """The ``m`` nearest centroids of every row, ``(n, m)``."""
    out = np.empty((x.shape[0], m), dtype=np.int64)
    cn = (cent.astype(np.float64) ** 2).sum(1)
    for i in range(0, x.shape[0], chunk):
        d = cn[None, :] - 2 * x[i:i + chunk].astype(np.float64) @ cent.T.astype(np.float64)
        out[i:i + chunk] = np.argpartition(d, m - 1, axis=1)[:, :m]
    return out


def clustered_layout(vectors: np.ndarray, clusters: int, slots: int, seed: int = 0,
                     spill: int = 1) -> Layout:
    """k-means into ``clusters``; each cluster starts at a block boundary. With
    ``spill = m > 1`` every document also joins its m - 1 next-nearest clusters (the
    documents near a boundary are then found from either side: better recall for a
    probed search, m times the index's blocks)."""
    cent, labels = kmeans(vectors, clusters, seed=seed)
    spill = max(1, min(int(spill), len(cent)))
    near = labels[:, None] if spill == 1 else _nearest(vectors, cent, spill)
    rows, bounds = [], []
    for c in range(len(cent)):
        members = np.flatnonzero((near == c).any(axis=1))
        first = len(rows) // slots
        blocks = max(1, -(-len(members) // slots))
        pad = np.full(blocks * slots, -1, dtype=np.int64)
        pad[:len(members)] = members
        rows.extend(pad.tolist())
        bounds.append((first, first + blocks))
    return Layout(slots, np.array(rows, dtype=np.int64), cent,
                  np.array(bounds, dtype=np.int64))


def build_index(vectors, ids=None, *, params: dict | None = None, clusters: int = 0,
                spill: int = 1, model: str | None = None, normalize: bool = True,
                seed: int = 0, meta: dict | None = None) -> Index:
    """An :class:`Index` of ``vectors`` ``(n, d)`` (ids default to ``"0".."n-1"``);
    ``clusters > 0`` makes a clustered layout (each document in its ``spill`` nearest
    clusters); ``normalize`` scales rows to unit norm
    (inner products are then cosine similarities; a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise InputError(f"index vectors must be a non-empty (n, d) matrix, got shape "
                         f"{tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise InputError("index vectors have NaN or infinite values")
    if normalize:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.where(norms > 0, norms, 1)
    ids = [str(i) for i in range(len(v))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(v):
        raise InputError(f"{len(ids)} ids for {len(v)} vectors")
    if any(len(i) > MAX_ID_CHARS for i in ids):
        raise InputError(f"document ids are limited to {MAX_ID_CHARS} characters")
    p = SearchParams.from_dict(params or {})
    if spill < 1 or (spill > 1 and not clusters):
        raise InputError("spill must be 1, or up to the cluster count with clusters")
    layout = (clustered_layout(v, clusters, p.slots, seed, spill) if clusters
              else flat_layout(len(v), p.slots))
    return Index(v, ids, layout, p.to_dict(), model,
                 {"normalized": bool(normalize), "spill": int(spill) if clusters else 1,
                  **(meta or {})})


class TextEmbedder:
    """MiniLM-L6 sentence embeddings in plaintext (``veil.text``), on the machine of
    whoever owns the texts (the index owner, or the client for its query); the model
    loads once per object. Calling it on a list of texts gives unit-normalised float32
    rows."""

    def __init__(self, seq_len: int = 128) -> None:
        from ..text.minilm import load_minilm
        from ..text.tokenize import Tokenizer

        self.encoder, self.tokenizer = load_minilm(seq_len), Tokenizer(seq_len)

    def __call__(self, texts: list[str], batch: int = 64) -> np.ndarray:
        import torch

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a list of strings")
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                x = torch.from_numpy(self.tokenizer.encode(texts[i:i + batch])
                                     .astype(np.float32))
                out.append(self.encoder(x).numpy())
        v = np.concatenate(out) if out else np.zeros((0, 384), np.float32)
        norms = np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return (v / norms).astype(np.float32)


def embed_texts(texts: list[str], *, batch: int = 64, seq_len: int = 128) -> np.ndarray:
    """:class:`TextEmbedder` once: the embeddings of ``texts``."""
    return TextEmbedder(seq_len)(texts, batch)

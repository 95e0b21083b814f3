"""Searching an index in each mode, and the client's half of encrypted search.

:class:`Searcher` runs a query in this process, in the modes of the rest of veil:

* ``plain`` -- the reference: ``vectors @ q`` in float64, exact top-k;
* ``he`` -- the client encrypts (:class:`QueryClient`), a :class:`BlockScorer` scores
  every block (or only the probed clusters' blocks) under CKKS, the client decrypts and
  ranks: the same code the service runs, minus the HTTP hop;
* ``tee`` -- the scoring matrix compiled as a veil model (one MatMul) and run in a
  local enclave (sealed request, attested key), top-k on the client.

:class:`QueryClient` is what the SDK uses too: it picks the blocks to ask for (all, or
the ``probe`` clusters whose public centroids are nearest the query, plus ``decoys``
random other clusters so the server cannot tell which of the set the query is near),
encrypts, and turns the decrypted scores of those blocks into ranked ids.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from ..backends.inputs import as_vector
from ..compiler.params import SearchParams
from ..errors import InputError, ModeError
from .index import Index, Layout

MODES = ("plain", "he", "tee")
MAX_K = 1000


@dataclass
class SearchResult:
    """The top-k of one query: ``ids`` and ``scores`` (best first), ``docs`` (row
    numbers in the index), and what the query cost (``bytes_up``, ``bytes_down``,
    ``server_s``, ``blocks``; HE and TEE only)."""

    ids: list[str]
    scores: np.ndarray
    docs: np.ndarray
    cost: dict = field(default_factory=dict)


def check_query(vector, dim: int) -> np.ndarray:
    """One query vector of ``dim`` values (or a batch of one), by the input contract."""
    return as_vector(vector, dim)


def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise InputError(f"k must be an integer from 1 to {MAX_K}")
    return int(k)


def top_k(scores: np.ndarray, docs: np.ndarray, k: int, ids: list[str]) -> SearchResult:
    """Rank ``scores`` of documents ``docs`` (-1: padding, skipped; a document listed
    twice, by a spilled clustered index, counts once); ties by row."""
    real = docs >= 0
    s, d = scores[real], docs[real]
    order = np.lexsort((d, -s))
    _, first = np.unique(d[order], return_index=True)
    order = order[np.sort(first)][:k]
    return SearchResult([ids[i] for i in d[order]], s[order], d[order])


def normalize_query(v: np.ndarray, normalized: bool) -> np.ndarray:
    """Unit-normalise a query for an index of unit vectors (cosine scores)."""
    if not normalized:
        return v
    n = np.linalg.norm(v)
    if n == 0:
        raise InputError("the query vector is zero")
    return v / n


def plan_blocks(layout: Layout, vector, probe: int | None = None, decoys: int = 0
                ) -> list[int]:
    """The blocks a query asks for: all of them, or those of the ``probe`` clusters
    nearest ``vector`` plus ``decoys`` other clusters drawn at random (shuffled together:
    the server sees a set of ``probe + decoys`` clusters, and which of them the query is
    near is hidden among them, nothing more)."""
    if probe is None:
        if decoys:
            raise InputError("decoys hide which clusters a query probes: give probe=")
        return list(range(layout.blocks))
    if layout.centroids is None:
        raise InputError("this index is not clustered: search it without probe=")
    c = len(layout.centroids)
    if not isinstance(probe, (int, np.integer)) or not isinstance(decoys, (int, np.integer)) \
            or not 1 <= int(probe) <= c or not 0 <= int(decoys) <= c - int(probe):
        raise InputError(f"probe must be 1..{c} and probe + decoys at most {c}")
    near = np.argsort(-(layout.centroids @ np.asarray(vector, np.float32)),
                      kind="stable")[:int(probe)].tolist()
    others = sorted(set(range(c)) - set(near))
    rng = secrets.SystemRandom()
    chosen = near + rng.sample(others, int(decoys))
    rng.shuffle(chosen)
    return layout.blocks_of(chosen)


class QueryClient:
    """The client's half of encrypted search against one index's public layout."""

    def __init__(self, info: dict, layout: Layout, ids: list[str], *, key=None) -> None:
        from ..backends.he.openfhe_search import QueryKey

        self.info, self.layout, self.ids = info, layout, ids
        self.dim = int(info["dim"])
        self.params = SearchParams.from_dict(info["params"])
        self.key = key if key is not None else QueryKey(self.params)

    def plan(self, vector, probe: int | None = None, decoys: int = 0) -> list[int]:
        return plan_blocks(self.layout, vector, probe, decoys)

    def key_vector(self, vector) -> np.ndarray:
        """The query as it is encrypted: checked, and unit-normalised for an index of
        unit vectors."""
        return normalize_query(check_query(vector, self.dim),
                               self.info.get("normalized", False))

    def encrypt(self, vector) -> list[bytes]:
        return self.key.encrypt(self.key_vector(vector), self.dim)

    def rank(self, replies: list[bytes], blocks: list[int], k: int) -> SearchResult:
        if len(replies) != len(blocks):
            raise InputError(f"{len(replies)} replies for {len(blocks)} blocks")
        docs = self.layout.docs(blocks)
        scores = self.key.decrypt(replies, len(docs))
        return top_k(scores, docs, check_k(k), self.ids)

    def close(self) -> None:
        self.key.close()


class Searcher:
    """All modes of one :class:`Index` in this process (see the module docstring);
    the HE scorer, the TEE model and the client key are made on first use."""

    def __init__(self, index: Index, *, threads: int = 2) -> None:
        self.index = index
        self.threads = threads
        self._scorer = None
        self._client: QueryClient | None = None
        self._tee = None

    # -- modes --------------------------------------------------------------------------
    def search(self, vector, k: int = 10, mode: str = "plain", *, probe: int | None = None,
               decoys: int = 0) -> SearchResult:
        """Top-``k`` documents for ``vector`` in ``mode``; ``probe`` (clustered
        indexes) scores only the blocks of the nearest clusters (plus ``decoys``)."""
        if mode not in MODES:
            raise ModeError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        k = check_k(k)
        v = normalize_query(check_query(vector, self.index.dim),
                            self.index.meta.get("normalized", False))
        if mode == "he":
            return self._he(v, k, probe, decoys)
        blocks = (plan_blocks(self.index.layout, v, probe, decoys) if probe is not None
                  else None)
        docs = (self.index.layout.docs(blocks) if blocks is not None
                else np.arange(self.index.count))
        docs = docs[docs >= 0]
        if mode == "plain":
            t = time.perf_counter()
            scores = self.index.vectors[docs].astype(np.float64) @ v
            out = top_k(scores, docs, k, self.index.ids)
            out.cost = {"server_s": time.perf_counter() - t, "docs": len(docs)}
            return out
        return self._tee_search(v, k, docs)

    def client(self) -> QueryClient:
        if self._client is None:
            info, _ = self.index.public()
            self._client = QueryClient(info, self.index.layout, self.index.ids)
        return self._client

    def scorer(self):
        if self._scorer is None:
            from ..backends.he.openfhe_search import BlockScorer
            self._scorer = BlockScorer(SearchParams.from_dict(self.index.params),
                                       self.index.matrix(), threads=self.threads)
        return self._scorer

    def _he(self, v: np.ndarray, k: int, probe, decoys) -> SearchResult:
        client, scorer = self.client(), self.scorer()
        blocks = client.plan(v, probe, decoys)
        query = client.key.encrypt(v, self.index.dim)
        t = time.perf_counter()
        replies = scorer.score(query, blocks)
        server_s = time.perf_counter() - t
        out = client.rank(replies, blocks, k)
        out.cost = {"server_s": server_s, "bytes_up": sum(len(c) for c in query),
                    "bytes_down": sum(len(r) for r in replies), "blocks": len(blocks),
                    "keys_bytes": 0}
        return out

    def _tee_search(self, v: np.ndarray, k: int, docs: np.ndarray) -> SearchResult:
        if len(docs) != self.index.count:
            raise InputError("the TEE variant searches the whole index (no probe=)")
        if self._tee is None:
            self._tee = _compile_scoring(self.index)
        t = time.perf_counter()
        scores = np.asarray(self._tee.run(v.astype(np.float32), mode="tee"), np.float64)
        out = top_k(scores.reshape(-1), np.arange(self.index.count), k, self.index.ids)
        out.cost = {"server_s": time.perf_counter() - t}
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._tee is not None:
            self._tee.close()
        self._scorer = self._client = self._tee = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _compile_scoring(index: Index):
    """The index as a veil model: one MatMul of the query by the vectors (ONNX), which
    the TEE mode runs in its enclave."""
    from onnx import TensorProto, helper, numpy_helper

    from ..model import compile as compile_model

    weights = numpy_helper.from_array(np.ascontiguousarray(index.vectors.T), "index")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["query", "index"], ["scores"])], "veil-search",
        [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, index.dim])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, index.count])],
        [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration = index.vectors[:min(16, index.count)]
    return compile_model(model, calibration)

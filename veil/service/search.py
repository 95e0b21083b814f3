"""Search routes: encrypted queries against served embedding indexes.

``veil serve --index NAME=PATH`` serves the index files of ``veil index build``
(:mod:`veil.search.index`). Routes (API key needed):

* ``GET /v1/indexes`` -- the served indexes (name, documents, dimension, model,
  clusters, fingerprint);
* ``GET /v1/indexes/{name}`` -- one index's public description, with its CKKS
  parameters and the size limits of a query;
* ``GET /v1/indexes/{name}/layout`` -- its public layout as an ``.npz`` (arrays only):
  document ids, the document at each slot of each block, and for a clustered index the
  centroids and each cluster's blocks. Never the vectors;
* ``POST /v1/indexes/{name}/search`` -- body: a ``veil-search-query`` envelope
  (:mod:`veil.wire`; parts ``0..m-1`` the query's ciphertexts, header ``blocks`` and
  the index ``fingerprint`` the client planned with); answer: a ciphertext batch, the
  encrypted scores of those blocks in order.

No evaluation key exists for search (the server never rotates or relinearizes), so
there is no session: every query is self-contained and nothing is stored. The server
learns which blocks are asked for (all of them for an exact scan; for a clustered
index the probed clusters, hidden among the client's decoys), the query's size, and
nothing of its content. The request log records the route, the status, the sizes and
the time, as for every route; nothing here logs a query or a score.

OpenFHE parses queries in supervised worker processes (:mod:`.search_worker`), as for
HE inference.
"""
from __future__ import annotations

import io
import logging
import secrets
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request, Response

from ..errors import InputError, NotFoundError, SerializationError, ServiceError
from ..search.index import Index
from ..wire import unpack
from .app import BINARY_BODY, ServiceContext
from .protocol import OCTETS, pack_batch
from .workers import HEWorkers

log = logging.getLogger("veil.service")
QUERY_KIND = "veil-search-query"


class SearchService:
    """The served indexes' public parts and the worker pool that scores queries."""

    def __init__(self, ctx: ServiceContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.info: dict[str, dict] = {}
        self.layouts: dict[str, bytes] = {}
        specs = []
        for name, path in sorted(cfg.indexes.items()):
            index = Index.load(path)
            info, arrays = index.public()
            slots = int(info["slots"])
            query_ct = _query_ciphertext_bytes(info["params"])
            self.info[name] = {"name": name, **info,
                               "query_ciphertexts": (index.dim + 1) // 2,
                               "max_query_bytes": (index.dim + 1) // 2 * query_ct + (1 << 16),
                               "documents_per_block": slots}
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            self.layouts[name] = buf.getvalue()
            specs += ["--serve", f"{name}={path}"]
            del index
        self.workers = HEWorkers(max(1, int(cfg.search_workers)),
                                 [*specs, "--memory-budget", str(cfg.memory_budget_bytes)],
                                 Path(cfg.store_dir) / "logs",
                                 timeout_s=cfg.worker_timeout_s,
                                 module="veil.service.search_worker")

    def index(self, name: str) -> dict:
        info = self.info.get(name)
        if info is None:
            raise NotFoundError(f"no index named {name!r}: GET /v1/indexes lists them")
        return info

    def search(self, name: str, body: bytes) -> bytes:
        info = self.index(name)
        header, parts = unpack(body, QUERY_KIND, max_size=info["max_query_bytes"])
        if header.get("fingerprint") != info["fingerprint"]:
            raise InputError("this query was planned for another version of the index: "
                             "fetch its layout again")
        blocks = header.get("blocks")
        if not isinstance(blocks, list) or not blocks or len(set(map(repr, blocks))) != \
                len(blocks) or not all(type(b) is int and 0 <= b < info["blocks"]
                                       for b in blocks):
            raise InputError(f"blocks must be distinct block numbers 0..{info['blocks'] - 1}")
        if set(parts) != {str(i) for i in range(len(parts))}:
            raise SerializationError("query parts must be named 0, 1, ...")
        _, out = self.workers.call(secrets.token_hex(8), "search",
                                   {"index": name, "blocks": blocks}, parts)
        if set(out) != {str(i) for i in range(len(blocks))}:
            raise ServiceError("a search worker sent a malformed result")
        return pack_batch([out[str(i)] for i in range(len(blocks))])

    def close(self) -> None:
        self.workers.close()


def _query_ciphertext_bytes(params: dict) -> int:
    """An upper bound on one query ciphertext's bytes: two towers of two polynomials
    (the exact size is checked by the worker's template)."""
    ring = int(params.get("ring_dim", 4096))
    return 2 * 2 * ring * 8 + (1 << 14)


def add_routes(app: FastAPI, ctx: ServiceContext) -> SearchService:
    """Mount the search routes; the service closes with the app."""
    search = SearchService(ctx)
    ctx.closers.append(search.close)
    for k in range(search.workers.count):
        ctx.children[f"search-worker-{k}"] = lambda k=k: search.workers.state(k)
        ctx.restarts[f"search-worker-{k}"] = lambda k=k: search.workers.restarts(k)
    app.state.search = search
    ctx.search_info = lambda: search.info
    octets = {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}

    @app.get("/v1/indexes", tags=["search"])
    def list_indexes(client: str = Depends(ctx.require_client)) -> list[dict]:
        keep = ("name", "count", "dim", "model", "clustered", "clusters", "fingerprint")
        return [{k: info[k] for k in keep} for info in search.info.values()]

    @app.get("/v1/indexes/{name}", tags=["search"])
    def describe(name: str, client: str = Depends(ctx.require_client)) -> dict:
        return search.index(name)

    @app.get("/v1/indexes/{name}/layout", tags=["search"], response_class=Response,
             responses={200: octets})
    def layout(name: str, client: str = Depends(ctx.require_client)) -> Response:
        search.index(name)
        return Response(search.layouts[name], media_type=OCTETS)

    @app.post("/v1/indexes/{name}/search", tags=["search"], response_class=Response,
              openapi_extra=BINARY_BODY, responses={200: octets})
    async def run_search(name: str, request: Request,
                         client: str = Depends(ctx.require_client)) -> Response:
        limit = search.index(name)["max_query_bytes"]
        body = await ctx.read_body(request, limit)
        async with ctx.slot("he"):
            out = await ctx.run_sync(search.search, name, body)
        return Response(out, media_type=OCTETS)

    return search

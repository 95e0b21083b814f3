"""HE routes: client bundles, evaluation-key sessions, encrypted inference.

The server side of ``veil.deploy`` over HTTP. It only ever holds evaluation keys and
ciphertexts: uploads are parsed as :class:`~veil.deploy.keys.EvaluationKeys` (a secret
key is refused with KeyTypeError) and must be for the model of the route.

This process never parses client bytes with OpenFHE, nor imports it: key loading,
ciphertext deserialization and evaluation run in supervised worker processes
(:mod:`veil.service.workers`), so a native crash on hostile bytes fails one request
(400 ``rejected-input``) instead of the service. What this process needs of a model
(its id, parameters, request sizes) comes from the server bundle's JSON
(:meth:`~veil.deploy.bundle.ServerBundle.summary`).

A session is created in three steps, and any failure leaves nothing behind:
1. stream the body to a temporary file, refusing it (413) once it passes the limit;
2. the worker the new session id maps to parses the file and loads the keys into
   OpenFHE (which validates them);
3. commit: rename into the store and insert the metadata row.

Sessions of other clients are indistinguishable from unknown ones (404 ``not-found``).

Encrypted weights (a model exported with ``--encrypted-weights``: the host's bundle
holds zeros). Three parties: the client (the data owner, holding the secret key), the
model owner, and this host, which sees neither inputs nor weights.

1. The client creates its session as usual (for such a model the worker checks the keys
   in OpenFHE and drops them: they load with the weights) and hands the model owner, out of band, its *weights request*: the session
   id and its public key (``veil weights-request``, ``HEMode.weights_request()``). It
   does not travel through this host: a host that could swap the public key for its own
   would decrypt the weights.
2. The model owner encrypts its weights under that public key (``encrypt_weights``) and
   uploads them: ``PUT /v1/models/{name}/he/sessions/{id}/weights`` with an API key made
   for that model's owner (``veil keys create NAME --owner MODEL``; any other key is 403
   ``forbidden``). The body is streamed to disk under the ``weights`` size limit (413)
   and the uploader's key quotas, then the session's worker loads keys and weights
   together: OpenFHE's validator checks every ciphertext, and the envelope's integrity
   check, model id and client tag must match (``malformed`` for tampered bytes,
   ``key-mismatch`` for another model or another client's public key). Only then is it
   stored with the session (``<id>.weights``), and it goes with the session.
3. Inference then runs ciphertext x ciphertext with those weights; before the upload it
   is 409 ``missing-key``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request, Response

from ..deploy.bundle import ServerBundle, ServerSummary
from ..errors import (NotFoundError, PayloadTooLargeError, SerializationError, ServiceError,
                      SessionExpiredError)
from .app import BINARY_BODY, ServiceContext, check_length, check_media_type, stream
from .protocol import OCTETS, pack_batch, pack_client_bundle, unpack_batch
from .store import NO_SESSION, SessionRecord, open_store
from .workers import HEWorkers

log = logging.getLogger("veil.service")
CHUNK = 1 << 20


class HEService:
    """Model summaries, the session store and the HE worker pool of one app."""

    def __init__(self, ctx: ServiceContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.servers: dict[str, ServerSummary] = {}
        self.bundles: dict[str, bytes] = {}
        exports = []
        for name, info in ctx.models.items():
            if "he" in info.modes:
                server = ServerBundle.summary(info.path("he") / "server")
                self.servers[name] = server
                self.bundles[name] = pack_client_bundle(
                    info.path("he") / "client", {"model": name, "model_id": server.model_id})
                exports += ["--export", f"{name}={info.path('he') / 'server'}"]
        self._by_id = {s.model_id: s for s in self.servers.values()}
        self.store = open_store(cfg.store_dir, cfg.store_url, revoked=ctx.keys.is_revoked,
                                ttl_s=cfg.session_ttl_s,
                                disk_budget_bytes=cfg.disk_budget_bytes,
                                max_uploads_total=cfg.max_uploads_total)
        try:
            self.store.sweep()
            if cfg.he_pool is not None:          # e.g. Ray Serve replicas (scale.py)
                self.workers = cfg.he_pool
            else:
                count = max(1, int(cfg.he_workers))     # HEWorkers refuses 0 itself
                budget = cfg.memory_budget_bytes // count   # each worker loads its own
                self.workers = HEWorkers(int(cfg.he_workers),
                                         [*exports, "--memory-budget", str(budget)],
                                         Path(cfg.store_dir) / "logs",
                                         timeout_s=cfg.worker_timeout_s)
        except BaseException:
            self.store.close()
            raise

    def server(self, name: str) -> ServerSummary:
        self.ctx.model(name, "he")
        return self.servers[name]

    def info(self, info) -> dict:
        server = self.servers[info.name]
        return {**info.index.get("he", {}), "model_id": server.model_id,
                "insecure_test_params": server.params.insecure_test_params,
                "max_input_bytes": server.max_input_bytes,
                "max_batch": self.ctx.config.max_batch,
                "max_batch_bytes": self.batch_limit(server)}

    def batch_limit(self, server: ServerSummary) -> int:
        cap = self.ctx.config.limit("batch")
        return max(server.max_input_bytes + (1 << 16),
                   min(cap, self.ctx.config.max_batch * server.max_input_bytes))

    # -- sessions -------------------------------------------------------------------
    async def create(self, request: Request, client: str, name: str) -> dict:
        server = self.server(name)
        check_media_type(request, OCTETS)
        limit = min(self.ctx.config.limit("keys"), self.store.disk_budget_bytes)
        check_length(request, limit)
        upload = await self.ctx.run_sync(self.store.begin, limit, client,
                                         self.ctx.limits_for(client))
        try:
            await self._receive(request, upload, limit, "evaluation keys")
            async with self.ctx.slot("he"):    # parsing and loading hold the keys in memory
                rec = await self.ctx.run_sync(self._commit, upload, client, name, server)
        except BaseException:
            upload.abort()
            raise
        return {"session": rec.id, "expires_at": rec.expires_at,
                "ttl_s": self.store.ttl_s}

    async def _receive(self, request: Request, upload, limit: int, what: str) -> None:
        """Stream the body into ``upload`` (to disk), 413 once it passes ``limit``."""
        buf, received = bytearray(), 0
        with self.ctx.deadline(request, limit):
            async for chunk in stream(request):
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(f"{what} exceed the {limit}-byte limit of "
                                               "this server")
                buf += chunk
                if len(buf) >= CHUNK:
                    await self.ctx.run_sync(upload.write, bytes(buf))
                    buf.clear()
        if buf:
            await self.ctx.run_sync(upload.write, bytes(buf))

    # -- encrypted weights (the model owner) -------------------------------------------
    async def upload_weights(self, request: Request, uploader: str, name: str,
                             session_id: str) -> dict:
        """Step 2 of the module docstring; returns the session id and its stored size."""
        server = self.server(name)
        if server.weights != "encrypted":
            raise SerializationError(f"model {name!r} is served with plaintext weights: "
                                     "export it with --encrypted-weights to take encrypted "
                                     "ones")
        await self.ctx.run_sync(self.ctx.keys.require_owner, uploader, name)
        check_media_type(request, OCTETS)
        limit = min(self.ctx.config.limit("weights"), self.store.disk_budget_bytes)
        check_length(request, limit)
        rec = await self.ctx.run_sync(self._owner_record, session_id, name, server)
        upload = await self.ctx.run_sync(self.store.begin, limit, uploader,
                                         self.ctx.limits_for(uploader))
        try:
            await self._receive(request, upload, limit, "encrypted weights")
            async with self.ctx.slot("he"):
                size = await self.ctx.run_sync(self._attach, upload, rec)
        except BaseException:
            upload.abort()
            raise
        return {"session": rec.id, "size": size}

    def _owner_record(self, session_id: str, name: str,
                      server: ServerSummary) -> SessionRecord:
        """The session the owner names: it must exist and be of this model (sessions of
        other models look unknown)."""
        try:
            rec = self.store.find(session_id)
        except SessionExpiredError:
            self.workers.forget(session_id)
            raise
        if rec.model != name or rec.model_id != server.model_id:
            raise NotFoundError(NO_SESSION)
        return rec

    def _attach(self, upload, rec: SessionRecord) -> int:
        if upload.size == 0:
            raise SerializationError("the body is empty: send the model owner's "
                                     "encrypt_weights() output")
        upload.finish()
        self.workers.call(rec.id, "weights", {"keys": str(self.store.key_path(rec.id)),
                                              "weights": str(upload.path),
                                              "owner": rec.owner, "model": rec.model})
        size = self.store.attach_weights(upload, rec.id)
        log.info("session %s…: the model owner's encrypted weights (%d bytes)", rec.id[:8],
                 upload.size)
        return size

    def _commit(self, upload, client: str, name: str, server: ServerSummary) -> SessionRecord:
        for sid in self.store.sweep():
            self.workers.forget(sid)
        if upload.size == 0:
            raise SerializationError("the body is empty: send ModelClient.evaluation_keys()")
        upload.finish()          # on disk, for the worker to read
        self.workers.call(upload.id, "open", {"keys": str(upload.path), "model": name,
                                              "model_id": server.model_id, "owner": client})
        try:
            rec, evicted = self.store.commit(upload, owner=client, model=name,
                                             model_id=server.model_id)
        except BaseException:
            self.workers.forget(upload.id)
            raise
        for sid in evicted:
            self.workers.forget(sid)
        log.info("session %s… for %s (%d bytes of keys)", rec.id[:8], name, rec.size)
        return rec

    def _record(self, session_id: str, client: str, *, touch: bool = True) -> SessionRecord:
        try:
            rec = self.store.get(session_id, client, touch=touch)
        except SessionExpiredError:
            self.workers.forget(session_id)
            raise
        if rec.model_id not in self._by_id:   # the model was re-exported meanwhile
            self.delete(session_id, client)
            raise NotFoundError(NO_SESSION)
        return rec

    def _call(self, rec: SessionRecord, op: str, parts: dict[str, bytes]) -> dict[str, bytes]:
        """``op`` in the session's worker, which loads its keys from the store if needed."""
        keys = self.store.key_path(rec.id)     # read by the worker only to (re)load
        weights = self.store.weights_path(rec.id)
        header = {"keys": str(keys), "owner": rec.owner, "model": rec.model}
        if weights is not None:
            header["weights"] = str(weights)
        _, out = self.workers.call(rec.id, op, header, parts)
        return out

    def infer(self, session_id: str, client: str, ciphertext: bytes) -> bytes:
        rec = self._record(session_id, client)
        out = self._call(rec, "infer", {"ct": ciphertext})
        if set(out) != {"ct"}:
            raise ServiceError("an HE worker sent a malformed result")
        return out["ct"]

    def infer_batch(self, session_id: str, client: str, blob: bytes) -> bytes:
        rec = self._record(session_id, client)
        server = self._by_id[rec.model_id]
        cts = unpack_batch(blob, max_items=self.ctx.config.max_batch,
                           max_size=self.batch_limit(server))
        out = self._call(rec, "infer-batch", {str(i): ct for i, ct in enumerate(cts)})
        if set(out) != {str(i) for i in range(len(cts))}:
            raise ServiceError("an HE worker sent a malformed result")
        return pack_batch([out[str(i)] for i in range(len(cts))])

    def delete(self, session_id: str, client: str) -> None:
        self.store.delete(session_id, client)
        self.workers.forget(session_id)

    def close(self) -> None:
        self.workers.close()
        self.store.close()


def add_routes(app: FastAPI, ctx: ServiceContext) -> HEService:
    """Mount the HE routes; the service closes with the app."""
    he = HEService(ctx)
    ctx.closers.append(he.close)
    for k in range(he.workers.count):
        ctx.children[f"he-worker-{k}"] = lambda k=k: he.workers.state(k)
    ctx.mode_info["he"] = he.info
    app.state.he = he
    ctx.on_revoke.append(lambda c: [he.workers.forget(s) for s in he.store.delete_owner(c)])
    octets = {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}

    @app.get("/v1/models/{name}/he/client-bundle", tags=["he"], response_class=Response,
             responses={200: octets})
    def client_bundle(name: str, client: str = Depends(ctx.require_client)) -> Response:
        he.server(name)
        return Response(he.bundles[name], media_type=OCTETS)

    @app.post("/v1/models/{name}/he/sessions", tags=["he"], status_code=201,
              openapi_extra=BINARY_BODY)
    async def create_session(name: str, request: Request,
                             client: str = Depends(ctx.require_client)) -> dict:
        return await he.create(request, client, name)

    async def compute(limit_of, run, session_id: str, client: str,
                      request: Request) -> Response:
        limit = await ctx.run_sync(limit_of, he, session_id, client)
        body = await ctx.read_body(request, limit)    # outside the slot: slow bodies wait alone
        async with ctx.slot("he"):
            out = await ctx.run_sync(run, session_id, client, body)
        return Response(out, media_type=OCTETS)

    @app.put("/v1/models/{name}/he/sessions/{session_id}/weights", tags=["he"],
             openapi_extra=BINARY_BODY)
    async def upload_weights(name: str, session_id: str, request: Request,
                             uploader: str = Depends(ctx.require_client)) -> dict:
        return await he.upload_weights(request, uploader, name, session_id)

    @app.post("/v1/he/sessions/{session_id}/infer", tags=["he"], response_class=Response,
              openapi_extra=BINARY_BODY, responses={200: octets})
    async def infer(session_id: str, request: Request,
                    client: str = Depends(ctx.require_client)) -> Response:
        return await compute(_ct_limit, he.infer, session_id, client, request)

    @app.post("/v1/he/sessions/{session_id}/infer-batch", tags=["he"],
              response_class=Response, openapi_extra=BINARY_BODY, responses={200: octets})
    async def infer_batch(session_id: str, request: Request,
                          client: str = Depends(ctx.require_client)) -> Response:
        return await compute(_batch_limit, he.infer_batch, session_id, client, request)

    @app.delete("/v1/he/sessions/{session_id}", tags=["he"], status_code=204,
                response_class=Response)
    def delete_session(session_id: str, client: str = Depends(ctx.require_client)) -> Response:
        he.delete(session_id, client)
        return Response(status_code=204)

    return he


def _ct_limit(he: HEService, session_id: str, client: str) -> int:
    """The body limit of this session's model; checks the session before any body."""
    return he._by_id[he._record(session_id, client, touch=False).model_id].max_input_bytes


def _batch_limit(he: HEService, session_id: str, client: str) -> int:
    return he.batch_limit(he._by_id[he._record(session_id, client, touch=False).model_id])

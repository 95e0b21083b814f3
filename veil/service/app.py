"""The HTTP service: a thin FastAPI adapter over ``veil.deploy`` and the backends.

``create_app(ServiceConfig)`` loads every export folder once, opens the key and session
stores, and mounts the routes of each mode the exports have (``he`` here, ``tee`` and
``mpc`` from ``veil.service.tee`` / ``veil.service.mpc``). Routes:

====== ==================================== =================================== ========
method path                                 body / answer                        success
====== ==================================== =================================== ========
GET    /v1/health                           ``{"status": "ok", "veil": ver}``    200
GET    /v1/models                           ``[{name, modes, input_shape, ...}]`` 200
GET    /v1/models/{name}                    that plus per-mode public info        200
GET    /v1/models/{name}/he/client-bundle   octet-stream (wire envelope)          200
POST   /v1/models/{name}/he/sessions        octet-stream evaluation keys          201
POST   /v1/he/sessions/{id}/infer           octet-stream ciphertext -> result     200
POST   /v1/he/sessions/{id}/infer-batch     wire list of ciphertexts -> results   200
DELETE /v1/he/sessions/{id}                 -                                     204
====== ==================================== =================================== ========

Every route but health needs ``Authorization: Bearer <API key>``. Every error is a JSON
body ``{"error": {"code", "message"}}`` with the status of :mod:`veil.service.errors`.

Guarantees: every body has a size limit enforced while it streams (413 before more is
buffered); at most ``max_inflight`` body-carrying requests are read and computed at
once (memory stays bounded); OpenFHE work runs in the threadpool, never on the event
loop; nothing is global: two apps in one process share nothing but OpenFHE's maps.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..deploy.export import ExportInfo, read_export
from ..errors import (AuthError, BundleError, MediaTypeError, ModeError, NotFoundError,
                      PayloadTooLargeError, SerializationError)
from .auth import INVALID, KeyStore
from .errors import install_handlers
from .protocol import OCTETS

log = logging.getLogger("veil.service")
BINARY_BODY = {"requestBody": {"required": True, "content": {
    OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}


def _default_limits() -> dict[str, int]:
    return {"keys": 1 << 30, "batch": 256 << 20, "json": 1 << 20}


@dataclass
class ServiceConfig:
    """What one service process serves and how much it may hold.

    Args:
        exports: export folders (``veil.deploy.export``), one model each.
        store_dir: sessions, evaluation keys and API keys (created 0700).
        session_ttl_s: idle seconds after which an HE session expires.
        disk_budget_bytes: most bytes of stored evaluation keys (LRU sessions go first).
        memory_budget_bytes: most (estimated) bytes of loaded OpenFHE sessions.
        max_body_bytes: per route kind: ``keys`` (evaluation-key uploads, streamed to
            disk), ``batch`` (infer-batch), ``json``; a single ciphertext is bounded by
            its model's ``ModelServer.max_input_bytes``.
        max_batch: most ciphertexts in one infer-batch request.
        max_inflight: most body-carrying requests read and computed at once (key
            uploads stream to disk and count only while they are validated).
        body_timeout_s: most seconds one request body may take to arrive.
        he_workers: HE worker processes (``veil.service.workers``); each loads the
            models and holds its share (1/N) of ``memory_budget_bytes`` of sessions.
        worker_timeout_s: most seconds one HE request may run in a worker before the
            worker is killed and restarted (the request gets 503).
        backends: opaque per-model settings for the TEE/MPC route modules, untouched.
    """

    exports: list[str | os.PathLike]
    store_dir: str | os.PathLike
    session_ttl_s: float = 24 * 3600.0
    disk_budget_bytes: int = 8 << 30
    memory_budget_bytes: int = 2 << 30
    max_body_bytes: dict[str, int] = field(default_factory=_default_limits)
    max_batch: int = 64
    max_inflight: int = 8
    body_timeout_s: float = 600.0
    he_workers: int = 2
    worker_timeout_s: float = 300.0
    backends: dict[str, dict] = field(default_factory=dict)

    def limit(self, kind: str) -> int:
        return int({**_default_limits(), **self.max_body_bytes}[kind])


@dataclass
class ServiceContext:
    """What a mode's ``add_routes(app, ctx)`` gets.

    Attributes:
        config: the ServiceConfig (``config.backends`` holds per-model backend settings).
        models: served exports by model name.
        require_client: FastAPI dependency; ``client: str = Depends(ctx.require_client)``
            gives the authenticated client id (401 without a valid key).
        mode_info: mode -> ``f(ExportInfo) -> dict`` of public info for
            ``GET /v1/models/{name}`` (default: the export index's entry of the mode).
        closers: called in reverse order by ``close()`` (``serve`` calls it on exit).
        children: name -> ``f() -> state`` for every supervised child (HE workers, enclaves,
            MPC dealer and parties); state is ``"ok"``, ``"restarting"``, ``"down"`` or
            ``"stopped"``. ``/v1/health`` reports them and says ``degraded`` unless all
            are ``ok``.
    Methods ``model``, ``read_body``, ``run_sync`` and ``slot`` are for handlers.
    """

    config: ServiceConfig
    models: dict[str, ExportInfo]
    require_client: Callable[..., str]
    keys: KeyStore
    mode_info: dict[str, Callable[[ExportInfo], dict]] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    children: dict[str, Callable[[], str]] = field(default_factory=dict)
    _slots: Any = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def model(self, name: str, mode: str | None = None) -> ExportInfo:
        """The export named ``name``; NotFoundError, or ModeError if it lacks ``mode``."""
        info = self.models.get(name)
        if info is None:
            raise NotFoundError(f"no model named {name!r}: GET /v1/models lists them")
        if mode is not None and mode not in info.modes:
            raise ModeError(f"model {name!r} is not served in mode {mode!r} "
                            f"(it has {', '.join(info.modes)})")
        return info

    def slot(self) -> asyncio.Semaphore:
        """``async with ctx.slot():`` around reading a body and computing on it."""
        loop = asyncio.get_running_loop()
        sem = self._slots.get(loop)
        if sem is None:
            sem = self._slots[loop] = asyncio.Semaphore(self.config.max_inflight)
        return sem

    async def read_body(self, request: Request, limit: int, *,
                        media_type: str | None = OCTETS) -> bytes:
        """The request body, refused with 413 as soon as it exceeds ``limit`` bytes
        (by its Content-Length or while streaming), 415 for another Content-Type."""
        check_media_type(request, media_type)
        check_length(request, limit)
        buf = bytearray()
        with self.deadline():
            async for chunk in stream(request):
                buf += chunk
                if len(buf) > limit:
                    raise PayloadTooLargeError(f"request body exceeds the {limit}-byte "
                                               "limit of this route")
        return bytes(buf)

    @contextmanager
    def deadline(self):
        """Bound the time a request body may take (a stalled client frees its slot)."""
        try:
            with anyio.fail_after(self.config.body_timeout_s):
                yield
        except TimeoutError:
            raise SerializationError(f"the request body did not arrive within "
                                     f"{self.config.body_timeout_s:g} s") from None

    async def run_sync(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` in the threadpool: CPU-heavy and blocking work goes here."""
        return await run_in_threadpool(fn, *args)

    def close(self) -> None:
        while self.closers:
            try:
                self.closers.pop()()
            except Exception:   # keep closing the rest; shutdown must finish
                log.exception("closing the service failed")


def check_media_type(request: Request, media_type: str | None) -> None:
    if media_type is None:
        return
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != media_type:
        raise MediaTypeError(f"this route takes Content-Type {media_type}, not {got or 'none'}")


def check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise SerializationError("Content-Length is not a number") from None
        if n > limit:
            raise PayloadTooLargeError(f"request body of {n} bytes exceeds the {limit}-byte "
                                       "limit of this route")


async def stream(request: Request):
    """The body's chunks; a client that hangs up mid-body is a malformed request."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise SerializationError("the request body ended early") from None


def load_exports(paths) -> dict[str, ExportInfo]:
    models: dict[str, ExportInfo] = {}
    for p in paths:
        info = read_export(p)
        if info.name in models:
            raise BundleError(f"two exports are named {info.name!r}: {models[info.name].directory}"
                              f" and {info.directory}; export one with another name=")
        models[info.name] = info
    if not models:
        raise BundleError("no export folders to serve")
    return models


def _summary(info: ExportInfo) -> dict:
    return {"name": info.name, "modes": list(info.modes),
            "input_shape": list(info.input_shape), "output_shape": list(info.output_shape)}


def create_app(config: ServiceConfig) -> FastAPI:
    """The FastAPI app serving ``config.exports`` (see the module docstring)."""
    models = load_exports(config.exports)
    keys = KeyStore(config.store_dir)
    bearer = HTTPBearer(auto_error=False, description="an API key from `veil keys create`")

    def require_client(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if cred is None:
            raise AuthError(INVALID)
        return keys.verify(cred.credentials)

    ctx = ServiceContext(config, models, require_client, keys, closers=[keys.close])

    # Resources are closed by ``app.state.veil.close()`` (``serve`` does it on exit), not
    # by a lifespan hook: test clients run the lifespan once per call, and the app must
    # stay usable across those cycles.
    app = FastAPI(title="veil", version=__version__,
                  description="Private inference: HE sessions, sealed (TEE) and MPC routes.")
    install_handlers(app)
    app.state.veil = ctx
    _add_model_routes(app, ctx)
    try:
        for mode in ("he", "tee", "mpc"):
            if any(mode in info.modes for info in models.values()):
                importlib.import_module(f"veil.service.{mode}").add_routes(app, ctx)
    except BaseException:
        ctx.close()
        raise
    return app


def _add_model_routes(app: FastAPI, ctx: ServiceContext) -> None:
    @app.get("/v1/health", tags=["service"])
    def health() -> dict:
        states = {name: state() for name, state in sorted(ctx.children.items())}
        ok = all(s == "ok" for s in states.values())
        return {"status": "ok" if ok else "degraded", "veil": __version__,
                "children": states}

    @app.get("/v1/models", tags=["service"])
    def list_models(client: str = Depends(ctx.require_client)) -> list[dict]:
        return [_summary(info) for info in ctx.models.values()]

    @app.get("/v1/models/{name}", tags=["service"])
    def describe_model(name: str, client: str = Depends(ctx.require_client)) -> dict:
        info = ctx.model(name)
        out = _summary(info)
        for mode in info.modes:
            describe = ctx.mode_info.get(mode)
            out[mode] = describe(info) if describe else dict(info.index.get(mode, {}))
        return out


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
GET    /openapi.json                        the OpenAPI schema (needs a key)      200
GET    /docs                                Swagger page, schema inlined          200
====== ==================================== =================================== ========

A model exported with encrypted weights also has ``PUT
/v1/models/{name}/he/sessions/{id}/weights`` (200): a model owner's key (``veil keys
create NAME --owner MODEL``) uploads the weights encrypted under that session's client's
public key (:mod:`veil.service.he`).

Every route but health needs ``Authorization: Bearer <API key>``, the OpenAPI schema
(``/openapi.json``) and its Swagger page (``/docs``, the schema inlined) included: the
schema lists what a client may call, so it is for clients. Every error is a JSON body
``{"error": {"code", "message"}}`` with the status of :mod:`veil.service.errors`.

Guarantees:

* Fair shares per API key (:mod:`veil.service.limits`): ``require_client`` (a dependency
  with ``yield``, so once for every authenticated route) checks the key, takes a token
  of its rate limit and one of its concurrent requests, and gives the latter back when
  the request ends; over a limit, 429 with ``Retry-After``. ``ctx.limits_for(client)``
  gives a key's limits to the modes (sessions, key bytes and uploads are enforced by the
  session store, TEE channels by the TEE relay).
* Separate compute slots per mode (``async with ctx.slot("he" | "tee" | "mpc")``,
  ``max_inflight_he/tee/mpc``), taken only after the body has fully arrived, so slow
  clients and one mode's load cannot starve another; a request that waits longer than
  ``slot_wait_s`` for a slot gets 429.
* Every body has a size limit enforced while it streams (413 before more is buffered)
  and a deadline: ``body_timeout_s`` plus its size at ``body_min_rate`` bytes/s (a
  stalled body is 400). Bodies are read under the per-key concurrency limit, and the
  bytes of all bodies held in memory (from their first byte to the end of their
  request) stay under ``max_buffered_bytes`` (then 429).
* Connections whose request headers are incomplete after ``header_timeout_s`` are
  closed (``veil.service.run``); idle keep-alive connections close after 5 s.
* Exports with insecure test parameters are refused by ``serve`` unless
  ``allow_insecure``; when served, ``/v1/health`` and ``/v1/models`` say ``insecure``.
* OpenFHE never runs in this process: HE work runs in supervised worker processes
  (``veil.service.workers``), which the threadpool only waits on; nothing is global:
  two apps in one process share nothing.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import threading
import weakref
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..deploy.export import ExportInfo, read_export
from ..errors import (AuthError, BundleError, InsecureParametersError, MediaTypeError,
                      ModeError, NotFoundError, PayloadTooLargeError, RateLimitError,
                      SerializationError)
from ..modes import SERVED
from .auth import INVALID, KeyStore, key_id
from .errors import install_handlers
from .limits import Limiter, Limits, check_limits, default_limits
from .protocol import OCTETS

log = logging.getLogger("veil.service")
BINARY_BODY = {"requestBody": {"required": True, "content": {
    OCTETS: {"schema": {"type": "string", "format": "binary"}}}}}


def default_body_limits() -> dict[str, int]:
    return {"keys": 1 << 30, "batch": 256 << 20, "json": 1 << 20, "weights": 1 << 30}


@dataclass
class ServiceConfig:
    """What one service process serves and how much it may hold.

    Args:
        exports: export folders (``veil.deploy.export``), one model each.
        store_dir: sessions, evaluation keys and API keys (created 0700).
        store_url: a ``postgresql://`` URL: HE sessions and their keys live in that
            database, shared by every service process using it
            (:class:`~veil.service.pgstore.PostgresStore`; ``store_dir`` keeps API keys,
            logs and a local cache); None: SQLite in ``store_dir``.
        session_ttl_s: idle seconds after which an HE session expires.
        disk_budget_bytes: most bytes of stored evaluation keys (LRU sessions go first).
        memory_budget_bytes: most (estimated) bytes of loaded OpenFHE sessions.
        max_body_bytes: per route kind: ``keys`` (evaluation-key uploads, streamed to
            disk), ``batch`` (infer-batch), ``json``, ``weights`` (a model owner's
            encrypted weights, streamed to disk); a single ciphertext is bounded by
            its model's ``ModelServer.max_input_bytes``.
        max_batch: most ciphertexts in one infer-batch request.
        max_inflight: compute slots of ``ctx.slot()`` without a mode (older callers).
        max_inflight_he, max_inflight_tee, max_inflight_mpc: compute slots per mode
            (``ctx.slot(mode)``), held only while computing, never while a body arrives.
        slot_wait_s: most seconds a request waits for its mode's slot (then 429).
        body_timeout_s: seconds a request body may take to arrive, plus its size at
            ``body_min_rate`` bytes per second (large key uploads get longer).
        body_min_rate: the slowest body rate accepted after ``body_timeout_s``.
        header_timeout_s: a connection whose request headers are incomplete this long
            is closed (``serve``).
        allow_insecure: ``serve`` exports with insecure test parameters (refused
            otherwise); they are announced at start and in ``/v1/health``.
        default_limits: per-key limits of keys without their own (names of
            :class:`~veil.service.limits.Limits`; unset ones are the built-ins, and
            ``max_key_bytes`` a quarter of ``disk_budget_bytes``).
        max_uploads_total: key uploads in progress at once, all keys together.
        max_buffered_bytes: most bytes of request bodies held in memory at once, all
            requests together, from their first byte until their request ends (then
            429); key uploads stream to disk and are not counted.
        he_workers: HE worker processes (``veil.service.workers``); each loads the
            models and holds its share (1/N) of ``memory_budget_bytes`` of sessions.
        worker_timeout_s: most seconds one HE request may run in a worker before the
            worker is killed and restarted (the request gets 503).
        backends: opaque per-model settings for the TEE/MPC route modules, untouched.
        he_pool: an object with :class:`~veil.service.workers.HEWorkers`' methods that
            evaluates HE requests instead of local worker processes (Ray Serve
            replicas: :mod:`veil.service.scale`); None: ``he_workers`` processes here.
        indexes: search indexes served (name -> index file, :mod:`veil.service.search`).
        search_workers: worker processes scoring encrypted queries; each encodes every
            index (up to ``memory_budget_bytes`` of plaintexts).
    """

    exports: list[str | os.PathLike]
    store_dir: str | os.PathLike
    store_url: str | None = None
    session_ttl_s: float = 24 * 3600.0
    disk_budget_bytes: int = 8 << 30
    memory_budget_bytes: int = 2 << 30
    max_body_bytes: dict[str, int] = field(default_factory=default_body_limits)
    max_batch: int = 64
    max_inflight: int = 8
    max_inflight_he: int = 4
    max_inflight_tee: int = 16
    max_inflight_mpc: int = 16
    slot_wait_s: float = 60.0
    body_timeout_s: float = 30.0
    body_min_rate: float = float(1 << 20)
    header_timeout_s: float = 10.0
    allow_insecure: bool = False
    default_limits: dict = field(default_factory=dict)
    max_uploads_total: int = 64
    max_buffered_bytes: int = 1 << 30
    he_workers: int = 2
    worker_timeout_s: float = 300.0
    backends: dict[str, dict] = field(default_factory=dict)
    he_pool: Any = None
    indexes: dict[str, str] = field(default_factory=dict)
    search_workers: int = 1

    def limit(self, kind: str) -> int:
        return int({**default_body_limits(), **self.max_body_bytes}[kind])

    def key_limits(self) -> Limits:
        """The limits of a key without its own."""
        return default_limits(self.disk_budget_bytes, self.default_limits)


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
        on_revoke: ``f(client)`` called once when the service first sees a revoked key
            presented (``veil keys revoke`` already deleted its sessions from the store;
            a layer holding loaded sessions drops them here).
        insecure: why the served exports are insecure (empty when they are not).
        restarts: name -> ``f() -> int``, how often each supervised child was restarted
            (``veil.service.observe`` exports it to Prometheus).
        metrics: the service's :class:`~veil.service.observe.ServiceMetrics`.
        limiter: the per-key rate and concurrency accounting.
        stats: name -> ``f() -> int``, counters ``/v1/health`` reports under ``stats``
            when there are any (a scaled-out service's evaluation-key loads).
        search_info: the served search indexes' public descriptions by name (set by
            :mod:`veil.service.search`), for the start-up summary.
    Methods ``model``, ``read_body``, ``run_sync``, ``slot`` and ``limits_for`` are for
    handlers.
    """

    config: ServiceConfig
    models: dict[str, ExportInfo]
    require_client: Callable[..., str]
    keys: KeyStore
    mode_info: dict[str, Callable[[ExportInfo], dict]] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    children: dict[str, Callable[[], str]] = field(default_factory=dict)
    on_revoke: list[Callable[[str], None]] = field(default_factory=list)
    insecure: list[str] = field(default_factory=list)
    restarts: dict[str, Callable[[], int]] = field(default_factory=dict)
    metrics: Any = None
    search_info: Callable[[], dict] | None = None
    limiter: Limiter = field(default_factory=Limiter)
    stats: dict[str, Callable[[], int]] = field(default_factory=dict)
    _slots: Any = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _revoked: set = field(default_factory=set, repr=False)
    _buffered: list = field(default_factory=lambda: [0, threading.Lock()], repr=False)

    def model(self, name: str, mode: str | None = None) -> ExportInfo:
        """The export named ``name``; NotFoundError, or ModeError if it lacks ``mode``."""
        info = self.models.get(name)
        if info is None:
            raise NotFoundError(f"no model named {name!r}: GET /v1/models lists them")
        if mode is not None and mode not in info.modes:
            raise ModeError(f"model {name!r} is not served in mode {mode!r} "
                            f"(it has {', '.join(info.modes)})")
        return info

    def limits_for(self, client: str) -> Limits:
        """The limits of ``client``'s API key (its own over the service's defaults),
        read now: ``veil keys set-limits`` takes effect on the next call."""
        return self.config.key_limits().merged(self.keys.limits(client))

    @asynccontextmanager
    async def slot(self, mode: str | None = None):
        """``async with ctx.slot("he" | "tee" | "mpc"):`` around computing, after the
        body has arrived. Each mode has its own ``max_inflight_<mode>`` slots; waiting
        longer than ``slot_wait_s`` is RateLimitError (429)."""
        size = (self.config.max_inflight if mode is None
                else getattr(self.config, f"max_inflight_{mode}", None))
        if size is None:
            raise ValueError(f"no compute slots for mode {mode!r}")
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = {}
        sem = slots.get(mode)
        if sem is None:
            sem = slots[mode] = asyncio.Semaphore(max(1, int(size)))
        try:
            with anyio.fail_after(self.config.slot_wait_s):
                await sem.acquire()
        except TimeoutError:
            raise RateLimitError(f"the server is busy with {mode or 'other'} requests: "
                                 "retry shortly", retry_after=2.0) from None
        try:
            yield
        finally:
            sem.release()

    async def read_body(self, request: Request, limit: int, *,
                        media_type: str | None = OCTETS) -> bytes:
        """The request body, refused with 413 as soon as it exceeds ``limit`` bytes
        (by its Content-Length or while streaming), 415 for another Content-Type, 400
        when it does not arrive in time (:meth:`deadline`)."""
        check_media_type(request, media_type)
        check_length(request, limit)
        buf = bytearray()
        try:
            with self.deadline(request, limit):
                async for chunk in stream(request):
                    self._hold(len(chunk))
                    buf += chunk
                    if len(buf) > limit:
                        raise PayloadTooLargeError(f"request body exceeds the {limit}-byte"
                                                   " limit of this route")
        except BaseException:
            self._hold(-len(buf))
            raise
        held = getattr(request.state, "veil_held", None)
        if held is None:      # no require_client to release it at the end: do it now
            self._hold(-len(buf))
        else:
            request.state.veil_held = held + len(buf)
        return bytes(buf)

    def _hold(self, n: int) -> None:
        """Count ``n`` more (or, negative, fewer) body bytes held in memory; refuse
        (429) past ``max_buffered_bytes``."""
        with self._buffered[1]:
            if n > 0 and self._buffered[0] + n > self.config.max_buffered_bytes:
                raise RateLimitError("the server holds too many request bodies right now: "
                                     "retry shortly", retry_after=2.0)
            self._buffered[0] += n

    def body_seconds(self, request: Request | None = None, limit: int = 0) -> float:
        """How long a body may take: ``body_timeout_s`` plus its size (Content-Length,
        else ``limit``, at most ``limit``) at ``body_min_rate`` bytes per second."""
        size = 0
        if request is not None:
            declared = request.headers.get("content-length", "")
            size = int(declared) if declared.isdigit() else limit
            size = min(size, limit) if limit else size
        return self.config.body_timeout_s + size / max(1.0, self.config.body_min_rate)

    @contextmanager
    def deadline(self, request: Request | None = None, limit: int = 0):
        """Bound the time a request body may take (see :meth:`body_seconds`): a stalled
        client is answered 400 and frees what it held."""
        seconds = self.body_seconds(request, limit)
        try:
            with anyio.fail_after(seconds):
                yield
        except TimeoutError:
            raise SerializationError(f"the request body did not arrive within "
                                     f"{seconds:g} s") from None

    async def run_sync(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` in the threadpool: CPU-heavy and blocking work goes here."""
        return await run_in_threadpool(fn, *args)

    def close(self) -> None:
        while self.closers:
            try:
                self.closers.pop()()
            except Exception:   # keep closing the rest; shutdown must finish
                log.exception("closing the service failed")


def add_limit_args(parser) -> None:
    """The timeout, slot and insecure-export options shared by ``veil serve`` and
    ``python -m veil.service`` (see :func:`limit_options`)."""
    d = ServiceConfig.__dataclass_fields__
    parser.add_argument("--body-timeout", type=float, default=d["body_timeout_s"].default,
                        help="seconds a request body may take, plus its size at "
                             "--body-min-rate (default %(default)s)")
    parser.add_argument("--body-min-rate", type=float, default=d["body_min_rate"].default,
                        help="slowest accepted body rate in bytes/s after --body-timeout")
    parser.add_argument("--header-timeout", type=float,
                        default=d["header_timeout_s"].default,
                        help="close connections whose request headers take longer (s)")
    for mode in SERVED:
        parser.add_argument(f"--max-inflight-{mode}", type=int,
                            default=d[f"max_inflight_{mode}"].default,
                            help=f"{mode} requests computed at once (default %(default)s)")
    parser.add_argument("--max-key-upload", type=int, default=default_body_limits()["keys"],
                        help="largest evaluation-key upload in bytes, streamed to disk "
                             "(default %(default)s; a bootstrapped ResNet-20's keys are "
                             "17.3 GB)")
    parser.add_argument("--max-weights-upload", type=int,
                        default=default_body_limits()["weights"],
                        help="largest upload of a model owner's encrypted weights in bytes, "
                             "streamed to disk (default %(default)s)")
    parser.add_argument("--allow-insecure", action="store_true",
                        help="serve exports with INSECURE test parameters (tests only)")


def limit_options(args) -> dict:
    """ServiceConfig fields from the options of :func:`add_limit_args`."""
    return {"body_timeout_s": args.body_timeout, "body_min_rate": args.body_min_rate,
            "header_timeout_s": args.header_timeout, "max_inflight_he": args.max_inflight_he,
            "max_inflight_tee": args.max_inflight_tee,
            "max_inflight_mpc": args.max_inflight_mpc, "allow_insecure": args.allow_insecure,
            "max_body_bytes": {**default_body_limits(), "keys": args.max_key_upload,
                               "weights": args.max_weights_upload}}


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


def load_exports(paths, *, allow_none: bool = False) -> dict[str, ExportInfo]:
    models: dict[str, ExportInfo] = {}
    for p in paths:
        info = read_export(p)
        if info.name in models:
            raise BundleError(f"two exports are named {info.name!r}: {models[info.name].directory}"
                              f" and {info.directory}; export one with another name=")
        models[info.name] = info
    if not models and not allow_none:
        raise BundleError("no export folders to serve")
    return models


def _summary(info: ExportInfo, ctx: ServiceContext) -> dict:
    out = {"name": info.name, "modes": list(info.modes),
           "input_shape": list(info.input_shape), "output_shape": list(info.output_shape),
           "insecure": any(r.startswith(f"{info.name}: ") for r in ctx.insecure)}
    if "text" in info.index:            # the tokenizer clients use (veil.text)
        out["text"] = dict(info.index["text"])
    if "head" in info.index:            # what clients compute from the output (veil.ir.head)
        out["head"] = info.index["head"]
    return out


_SWAGGER = """<!doctype html><html><head><title>veil API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({spec: SPEC, dom_id: "#swagger-ui"});</script></body></html>"""


def _add_schema_routes(app: FastAPI, ctx: ServiceContext) -> None:
    """``/openapi.json`` and ``/docs`` (the schema inlined, since the page's own fetch
    would carry no key), both behind the API key and not listed in the schema."""
    @app.get("/openapi.json", include_in_schema=False)
    def openapi(client: str = Depends(ctx.require_client)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(client: str = Depends(ctx.require_client)) -> HTMLResponse:
        spec = json.dumps(app.openapi()).replace("</", "<\\/")
        return HTMLResponse(_SWAGGER.replace("SPEC", spec))


def create_app(config: ServiceConfig) -> FastAPI:
    """The FastAPI app serving ``config.exports`` (see the module docstring)."""
    models = load_exports(config.exports, allow_none=bool(config.indexes))
    keys = KeyStore(config.store_dir)
    bearer = HTTPBearer(auto_error=False, description="an API key from `veil keys create`")

    defaults = config.key_limits()
    check_limits(config.default_limits)

    async def require_client(
            request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if cred is None:
            raise AuthError(INVALID)
        try:
            client, own = keys.authenticate(cred.credentials)
        except AuthError:
            _noticed_revocation(ctx, cred.credentials)
            raise
        ctx.limiter.admit(client, defaults.merged(own))
        request.state.veil_held = 0       # body bytes read_body holds until we are done
        try:
            yield client
        finally:
            ctx.limiter.release(client)
            ctx._hold(-request.state.veil_held)

    ctx = ServiceContext(config, models, require_client, keys, closers=[keys.close],
                         insecure=insecure_reasons(models.values()))
    if ctx.insecure:
        log.warning("serving INSECURE exports: %s", "; ".join(ctx.insecure))

    # Resources are closed by ``app.state.veil.close()`` (``serve`` does it on exit), not
    # by a lifespan hook: test clients run the lifespan once per call, and the app must
    # stay usable across those cycles.
    app = FastAPI(title="veil", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="Private inference: HE sessions, sealed (TEE) and MPC routes.")
    install_handlers(app)
    app.state.veil = ctx
    _add_model_routes(app, ctx)
    _add_schema_routes(app, ctx)
    try:
        for mode in SERVED:
            if any(mode in info.modes for info in models.values()):
                importlib.import_module(f"veil.service.{mode}").add_routes(app, ctx)
        if config.indexes:
            importlib.import_module("veil.service.search").add_routes(app, ctx)
    except BaseException:
        ctx.close()
        raise
    _observe(app, ctx)
    return app


def _observe(app: FastAPI, ctx: ServiceContext) -> None:
    """The request log and metrics of :mod:`veil.service.observe`, with the restarts of
    the HE workers and of the children in ``config.backends`` (``deploy.processes``)."""
    from .observe import Observe, ServiceMetrics

    he = getattr(app.state, "he", None)
    if he is not None:
        for k in range(he.workers.count):
            ctx.restarts[f"he-worker-{k}"] = lambda k=k: he.workers.restarts(k)
    for backends in ctx.config.backends.values():
        for backend in backends.values():
            if isinstance(backend, dict):
                ctx.restarts.update(backend.get("restarts") or {})
    sessions = None if he is None else (lambda: [(r.model, r.size)
                                                 for r in he.store.records()])
    ctx.metrics = ServiceMetrics(sessions, ctx.children, ctx.restarts)
    app.add_middleware(Observe, metrics=ctx.metrics,
                       session_model=None if he is None else he.store.model_of)


def insecure_reasons(infos) -> list[str]:
    """Why these exports are insecure: HE bundles with ``insecure_test_params``, and any
    mode whose export index says ``insecure``. Reads the bundles' JSON only."""
    reasons = []
    for info in infos:
        for mode in info.modes:
            entry = info.index.get(mode)
            if isinstance(entry, dict) and entry.get("insecure"):
                reasons.append(f"{info.name}: its {mode} export is marked insecure")
        if "he" in info.modes:
            try:
                doc = json.loads((info.path("he") / "server" / "model.json").read_text())
            except (OSError, ValueError) as exc:
                raise BundleError(f"{info.name}: cannot read its HE server bundle: "
                                  f"{exc}") from None
            if doc.get("insecure_test_params", True) is not False:
                reasons.append(f"{info.name}: its HE parameters are insecure test "
                               "parameters (exported with --insecure-test-params)")
    return reasons


def refuse_insecure(reasons: list[str], allow: bool) -> None:
    """InsecureParametersError when there are ``reasons`` (:func:`insecure_reasons`)
    and insecure exports are not allowed."""
    if reasons and not allow:
        raise InsecureParametersError(
            "refusing to serve insecure exports (" + "; ".join(reasons) + "): "
            "pass --allow-insecure to serve them anyway (tests and development only)")


def _noticed_revocation(ctx: ServiceContext, token: str) -> None:
    """Tell ``ctx.on_revoke`` once about a revoked key that was presented."""
    kid = key_id(token)
    if kid is None or kid in ctx._revoked or not ctx.keys.is_revoked(kid):
        return
    ctx._revoked.add(kid)
    for callback in list(ctx.on_revoke):
        try:
            callback(kid)
        except Exception:   # one layer's failure must not turn a 401 into a 500
            log.exception("dropping the sessions of a revoked key failed")


def _add_model_routes(app: FastAPI, ctx: ServiceContext) -> None:
    @app.get("/v1/health", tags=["service"])
    def health() -> dict:
        states = {name: state() for name, state in sorted(ctx.children.items())}
        ok = all(s == "ok" for s in states.values())
        out = {"status": "ok" if ok else "degraded", "veil": __version__,
               "children": states, "insecure": bool(ctx.insecure)}
        if ctx.stats:
            out["stats"] = {name: int(count()) for name, count in sorted(ctx.stats.items())}
        return out

    @app.get("/v1/models", tags=["service"])
    def list_models(client: str = Depends(ctx.require_client)) -> list[dict]:
        return [_summary(info, ctx) for info in ctx.models.values()]

    @app.get("/v1/models/{name}", tags=["service"])
    def describe_model(name: str, client: str = Depends(ctx.require_client)) -> dict:
        info = ctx.model(name)
        out = _summary(info, ctx)
        for mode in info.modes:
            describe = ctx.mode_info.get(mode)
            out[mode] = describe(info) if describe else dict(info.index.get(mode, {}))
        return out


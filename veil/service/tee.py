"""TEE mode over HTTP: the service is the untrusted host between clients and the enclave.

Routes (``add_routes``; all need an API key):

- ``GET  /v1/models/{name}/tee``: the enclave's public status (measurement, attester
  kind, whether it is INSECURE). Informational only: clients trust their own policy, never
  this answer.
- ``POST /v1/models/{name}/tee/evidence`` ``{"nonce": base64url}``: a fresh evidence token
  (``application/jwt``) that opens a channel for this client.
- ``POST /v1/models/{name}/tee/open`` (octet-stream): the HPKE message keying the channel.
- ``POST /v1/models/{name}/tee/infer`` (octet-stream): a sealed batch; answers the sealed
  result.

The service relays bytes: it holds no key that opens them (the enclave's private keys
never leave the enclave process), so it sees what any host sees (sizes, timing, the clear
channel header). It adds rules of its own: a channel belongs to the API client whose
evidence request opened it, and another client's request on it is answered 404 like an
unknown channel; each client holds at most ``max_channels`` channels (its key's limit
over ``ServiceConfig.default_limits``): a new one beyond that closes the
client's own oldest (in the service's table and, with a ``CLOSE`` message, in the
enclave's), never another client's. The enclave's refusals come back as their typed
errors.

When the service started the enclave (``processes.py``), it is registered as
``"<model>-enclave"`` in ``ctx.children``; while it is not ``ok`` (dead, restarting,
SIGSTOPped) a TEE request fails at once with 503 "the enclave is not responding",
before it takes a slot or a connection.
"""
from __future__ import annotations

import base64
import json
import threading
import time

from fastapi import Depends, Request, Response

from ..backends import sockets
from ..backends.tee import net
from ..backends.tee.service import EVIDENCE_TTL_S, MAX_CHANNELS
from ..errors import (InputError, RateLimitError, SerializationError, SessionError,
                      UnavailableError, VeilError)
from .pool import ConnectionPool, dial

MAX_CHANNELS_PER_CLIENT = 256

_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_NONCE = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["nonce"],
    "properties": {"nonce": {"type": "string", "description": "16-64 random bytes, base64url"}}}}}}}


def enclave_pool(address: tuple[str, int], timeout: float = 60.0,
                 state=None) -> ConnectionPool:
    """Connections to one enclave; ``pool.call(relay(kind, body, wanted))`` sends one
    message and returns the answer's body (the enclave's refusals as typed errors).
    ``state()``: the supervised enclave's state (fail fast unless ``"ok"``)."""
    return ConnectionPool("the enclave", lambda: dial(address, timeout),
                          check=None if state is None else child_check(state, "the enclave"))


def child_check(state, what: str):
    """A pool's ``check``: UnavailableError naming ``what`` unless ``state()`` is ok."""
    def check() -> None:
        now = state()
        if now != "ok":
            raise UnavailableError(f"{what} is not responding ({now}); try again shortly")
    return check


def relay(kind: int, body: bytes, wanted: int, pool: ConnectionPool | None = None):
    """The exchange of one message; with ``pool``, its answer is awaited watching the
    enclave's state (``ConnectionPool.wait_answer``)."""
    def exchange(sock):
        if pool is None:
            return bytes(net.call(sock, kind, body, wanted))
        net.send(sock, kind, body)
        pool.wait_answer(sock)
        return bytes(net.expect(*net.recv(sock), wanted))
    return exchange


class Channels:
    """Which API client opened which enclave channel: at most ``total`` channels, each
    client at most its own cap, each expiring with its evidence."""

    def __init__(self, total: int = MAX_CHANNELS, ttl: float = EVIDENCE_TTL_S) -> None:
        self.total, self.ttl = total, ttl
        self._owner: dict[bytes, tuple[str, float]] = {}
        self._mine: dict[str, dict[bytes, float]] = {}     # client -> channels, oldest first
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        for channel in [c for c, (_, exp) in self._owner.items() if exp <= now]:
            client, _ = self._owner.pop(channel)
            self._drop(client, channel)

    def _drop(self, client: str, channel: bytes) -> None:
        mine = self._mine.get(client)
        if mine is not None:
            mine.pop(channel, None)
            if not mine:
                del self._mine[client]

    def admit(self, client: str, cap: int) -> None:
        """Before a client's evidence request: RateLimitError when the table is full of
        other clients' live channels (the client has none of its own to give up)."""
        now = time.monotonic()
        with self._lock:
            if len(self._owner) >= self.total:
                self._expire(now)
            if len(self._owner) >= self.total and not self._mine.get(client) and cap > 0:
                soonest = min(exp for _, exp in self._owner.values())
                raise RateLimitError("the enclave holds as many channels as it can; "
                                     "try again later", retry_after=max(1.0, soonest - now))
            if cap <= 0:
                raise RateLimitError("this API key may not open TEE channels",
                                     retry_after=3600.0)

    def claim(self, channel: bytes, client: str, cap: int) -> list[bytes]:
        """Record ``client``'s new channel; the channels it gives up for it (its own
        oldest beyond ``cap``, or the table's soonest-expiring of its own when full),
        which the caller closes at the enclave."""
        now = time.monotonic()
        evicted = []
        with self._lock:
            mine = self._mine.setdefault(client, {})
            if len(self._owner) >= self.total:
                self._expire(now)
                mine = self._mine.setdefault(client, {})
            while mine and (len(mine) >= max(1, cap) or len(self._owner) >= self.total):
                oldest = next(iter(mine))
                del mine[oldest]
                self._owner.pop(oldest, None)
                evicted.append(oldest)
            self._owner[channel] = (client, now + self.ttl)
            mine[channel] = now + self.ttl
        return evicted

    def count(self, client: str) -> int:
        with self._lock:
            return len(self._mine.get(client, ()))

    def check(self, message: bytes, client: str) -> None:
        channel = bytes(message[:16])
        with self._lock:
            owner = self._owner.get(channel)
        if owner is None or owner[0] != client or owner[1] <= time.monotonic():
            raise SessionError("unknown or expired channel: fetch fresh evidence")


def max_channels(ctx, client: str) -> int:
    """``client``'s cap on TEE channels: its key's ``max_channels`` limit (over the
    service's defaults; ``veil keys create --max-channels``)."""
    return int(ctx.limits_for(client).max_channels)


def _channel_claim(token: bytes) -> bytes:
    """The channel id in an evidence token's claims (read, not verified: the service
    only uses it to bind the channel to the client that asked for it)."""
    try:
        payload = token.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        return base64.urlsafe_b64decode(claims["channel"] + "=" * (-len(claims["channel"]) % 4))
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"the enclave's evidence has no channel: {exc}") from None


def body_limit(input_shape: tuple[int, ...]) -> int:
    """The largest sealed request a model can need: a full batch of float64 inputs."""
    size = 1
    for s in input_shape:
        size *= int(s)
    return net.MAX_BATCH * size * 8 + (1 << 16)


class PoolLink:
    """The way to one enclave the routes use: :meth:`send` one message, get its
    answer's body. This one holds connections to one enclave process; a Ray Serve
    deployment of enclaves (:mod:`veil.service.scale`) has another with the same
    methods, which keeps each channel on the replica whose enclave opened it."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def ready(self) -> None:
        """UnavailableError at once when the enclave is not ok."""
        self.pool.ready()

    def send(self, kind: int, body: bytes, wanted: int) -> bytes:
        return self.pool.call(relay(kind, body, wanted, self.pool))

    def close(self) -> None:
        self.pool.close()


def enclave_link(backend: dict, name: str, ctx) -> "PoolLink":
    """The link of one model's ``config.backends[name]["tee"]``: its ``link`` when
    given, else connections to its ``enclave`` address."""
    if backend.get("link") is not None:
        return backend["link"]
    children = dict(backend.get("children") or {})
    ctx.children.update(children)
    return PoolLink(enclave_pool(sockets.parse_address(backend["enclave"]),
                                 state=children.get(f"{name}-enclave")))


def add_routes(app, ctx) -> None:
    """Register the TEE routes for every served model with the ``tee`` mode."""
    relays = {name: enclave_link(ctx.config.backends[name]["tee"], name, ctx)
              for name, info in ctx.models.items() if "tee" in info.modes}
    channels = Channels()
    ctx.closers.extend(r.close for r in relays.values())
    ctx.mode_info["tee"] = lambda info: dict(info.index.get("tee", {}))

    def pool(name: str):
        """The enclave's link; 503 at once (before any slot) when it is not ok."""
        ctx.model(name, "tee")
        relays[name].ready()
        return relays[name]

    async def call(link, kind: int, body: bytes, wanted: int) -> bytes:
        return await ctx.run_sync(link.send, kind, body, wanted)

    @app.get("/v1/models/{name}/tee", tags=["tee"], summary="The enclave's public status")
    async def tee_status(name: str, client: str = Depends(ctx.require_client)) -> dict:
        r = pool(name)
        status = sockets.json_object(await call(r, net.STATUS_REQUEST, b"", net.STATUS))
        return {k: status.get(k) for k in ("mode", "attester", "measurement", "insecure",
                                            "veil")}

    @app.post("/v1/models/{name}/tee/evidence", tags=["tee"], openapi_extra=_NONCE,
              summary="Fresh attestation evidence; opens a channel for this client",
              response_class=Response, responses={200: {"content": {"application/jwt": {}}}})
    async def tee_evidence(name: str, request: Request,
                           client: str = Depends(ctx.require_client)) -> Response:
        r = pool(name)
        body = await ctx.read_body(request, 4096, media_type="application/json")
        nonce = sockets.json_object(body).get("nonce")
        if not isinstance(nonce, str):
            raise InputError('an evidence request is {"nonce": "<base64url>"}')
        cap = max_channels(ctx, client)
        channels.admit(client, cap)
        token = await call(r, net.EVIDENCE_REQUEST, json.dumps({"nonce": nonce}).encode(),
                           net.EVIDENCE)
        for old in channels.claim(_channel_claim(token), client, cap):
            try:                   # best effort: the enclave also expires it on its own
                await call(r, net.CLOSE, old, net.CLOSED)
            except VeilError:
                pass
        return Response(token, media_type="application/jwt")

    @app.post("/v1/models/{name}/tee/open", tags=["tee"], status_code=204,
              openapi_extra=_BINARY, response_class=Response,
              summary="Key this client's channel (one HPKE message)")
    async def tee_open(name: str, request: Request,
                       client: str = Depends(ctx.require_client)) -> Response:
        r = pool(name)
        body = await ctx.read_body(request, 8192)
        channels.check(body, client)
        await call(r, net.OPEN, body, net.OPENED)
        return Response(status_code=204)

    @app.post("/v1/models/{name}/tee/infer", tags=["tee"], openapi_extra=_BINARY,
              response_class=Response, summary="A sealed batch in, its sealed answer out",
              responses={200: {"content": {"application/octet-stream": {}}}})
    async def tee_infer(name: str, request: Request,
                        client: str = Depends(ctx.require_client)) -> Response:
        r = pool(name)
        body = await ctx.read_body(request, body_limit(ctx.models[name].input_shape))
        async with ctx.slot("tee"):
            channels.check(body, client)
            answer = await call(r, net.REQUEST, body, net.RESULT)
        return Response(answer, media_type="application/octet-stream")

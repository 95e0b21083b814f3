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
channel header). It adds one rule of its own: a channel belongs to the API client whose
evidence request opened it, and another client's request on it is answered 404 like an
unknown channel. The enclave's refusals come back as their typed errors.
"""
from __future__ import annotations

import base64
import json
import threading
import time

from fastapi import Depends, Request, Response

from ..backends import sockets
from ..backends.tee import net
from ..backends.tee.service import EVIDENCE_TTL_S, MAX_CHANNELS, make_room
from ..errors import InputError, SerializationError, SessionError
from .pool import ConnectionPool

_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_NONCE = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["nonce"],
    "properties": {"nonce": {"type": "string", "description": "16-64 random bytes, base64url"}}}}}}}


def enclave_pool(address: tuple[str, int], timeout: float = 60.0) -> ConnectionPool:
    """Connections to one enclave; ``pool.call(relay(kind, body, wanted))`` sends one
    message and returns the answer's body (the enclave's refusals as typed errors)."""
    return ConnectionPool("the enclave", lambda: sockets.dial(address, timeout))


def relay(kind: int, body: bytes, wanted: int):
    return lambda sock: bytes(net.call(sock, kind, body, wanted))


class Channels:
    """Which API client opened which enclave channel (bounded, expiring)."""

    def __init__(self) -> None:
        self._owner: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def claim(self, channel: bytes, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            make_room(self._owner, MAX_CHANNELS, lambda owner: owner[1], now)
            self._owner[channel] = (client, now + EVIDENCE_TTL_S)

    def check(self, message: bytes, client: str) -> None:
        channel = bytes(message[:16])
        with self._lock:
            owner = self._owner.get(channel)
        if owner is None or owner[0] != client or owner[1] <= time.monotonic():
            raise SessionError("unknown or expired channel: fetch fresh evidence")


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


def add_routes(app, ctx) -> None:
    """Register the TEE routes for every served model with the ``tee`` mode."""
    relays: dict[str, ConnectionPool] = {}
    for name, info in ctx.models.items():
        if "tee" in info.modes:
            relays[name] = enclave_pool(
                sockets.parse_address(ctx.config.backends[name]["tee"]["enclave"]))
    channels = Channels()
    ctx.closers.extend(r.close for r in relays.values())
    ctx.mode_info["tee"] = lambda info: dict(info.index.get("tee", {}))

    def pool(name: str) -> ConnectionPool:
        ctx.model(name, "tee")
        return relays[name]

    async def call(p: ConnectionPool, kind: int, body: bytes, wanted: int) -> bytes:
        return await ctx.run_sync(p.call, relay(kind, body, wanted))

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
        token = await call(r, net.EVIDENCE_REQUEST, json.dumps({"nonce": nonce}).encode(),
                           net.EVIDENCE)
        channels.claim(_channel_claim(token), client)
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

"""MPC mode over HTTP: the service fronts party 0; party 1 stays on its own.

Routes (``add_routes``; API key needed):

- ``GET /v1/models/{name}/mpc``: where party 1 listens, its fixed-point scale, the
  model's shapes.
- ``POST /v1/models/{name}/mpc/share`` (octet-stream): a client's request for party 0
  (request id, party 0's share, the fixed-point scale; ``sockets.pack_arrays``). The
  service checks its form, hands it to party 0 over an authenticated, encrypted link
  (``backends/mpc/transport.py``, the client's NK handshake) and answers party 0's
  output share.

The client sends its other share straight to party 1 over a link it authenticates with
the deployment's public keys (``public.json`` of ``veil mpc-setup``, given by the
deployer, never by this service), then posts party 0's share here. The service runs on
party 0's side of the trust boundary: it sees party 0's share, which alone is uniformly
random, and never party 1's; a service that substituted party 1's address could not
read party 1's share either, because the client only completes the handshake with the
pinned key. Party 0's share travels in this HTTP body, so outside loopback the service
belongs behind TLS like any other.
"""
from __future__ import annotations

import numpy as np
from fastapi import Depends, Request, Response

from ..backends import sockets as so
from ..backends.mpc import transport as tp
from ..backends.mpc.service import (CLIENT_REQUEST, CLIENT_RESULT, ERROR, MAX_INPUTS,
                                    MpcError, read_client_request)
from .pool import ConnectionPool

_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def party0_pool(address: tuple[str, int], keys_dir, timeout: float = 60.0) -> ConnectionPool:
    """Client links to party 0 (Noise NK with the deployment's public keys)."""
    identity = tp.Identity.load(keys_dir, None)           # public keys only
    return ConnectionPool("party 0", lambda: tp.connect(so.dial(address, timeout), identity,
                                                         "party0"))


def relay(pool: ConnectionPool, body: bytes) -> bytes:
    """One party request through ``pool``: party 0's output share, or its refusal."""
    def exchange(link):
        link.send(CLIENT_REQUEST, body)
        return link.recv()
    kind, reply = pool.call(exchange)
    if kind == ERROR:
        raise MpcError(f"party0: {so.json_object(reply).get('error')}")
    if kind != CLIENT_RESULT:
        raise MpcError(f"party0 sent message kind {kind}")
    return bytes(reply)


def add_routes(app, ctx) -> None:
    """Register the MPC routes for every served model with the ``mpc`` mode."""
    served = {name: ctx.config.backends[name]["mpc"] for name, info in ctx.models.items()
              if "mpc" in info.modes}
    relays = {name: party0_pool(so.parse_address(b["party0"]), b["keys"])
              for name, b in served.items()}
    ctx.closers.extend(r.close for r in relays.values())

    @app.get("/v1/models/{name}/mpc", tags=["mpc"],
             summary="Where party 1 listens, and the fixed-point scale")
    async def mpc_info(name: str, client: str = Depends(ctx.require_client)) -> dict:
        info = ctx.model(name, "mpc")
        return {"party1": served[name]["party1"],
                "frac_bits": served[name].get("frac_bits", 20),
                "input_shape": list(info.input_shape),
                "output_shape": list(info.output_shape)}

    @app.post("/v1/models/{name}/mpc/share", tags=["mpc"], openapi_extra=_BINARY,
              response_class=Response, summary="Party 0's share in, its output share out",
              responses={200: {"content": {"application/octet-stream": {}}}})
    async def mpc_share(name: str, request: Request,
                        client: str = Depends(ctx.require_client)) -> Response:
        info = ctx.model(name, "mpc")
        size = 8 * MAX_INPUTS * int(np.prod(info.input_shape)) + (1 << 16)
        body = await ctx.read_body(request, size)
        async with ctx.slot("mpc"):
            read_client_request(body, info.input_shape, served[name].get("frac_bits", 20))
            reply = await ctx.run_sync(relay, relays[name], body)
        return Response(reply, media_type="application/octet-stream")

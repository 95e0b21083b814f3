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

import queue

import numpy as np
from fastapi import Depends, Request, Response

from ..backends import sockets as so
from ..backends.mpc import transport as tp
from ..backends.mpc.service import CLIENT_REQUEST, CLIENT_RESULT, ERROR, MpcError
from ..errors import InputError, SerializationError, UnavailableError

POOL = 8
MAX_INPUTS = 4096
_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def _address(text: str) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    return host, int(port)


class Party0Relay:
    """A small pool of client links to party 0; one request and its answer per use, and
    a link that failed is closed, never reused."""

    def __init__(self, address: tuple[str, int], keys_dir, timeout: float = 60.0) -> None:
        self.address, self.timeout = address, timeout
        self.identity = tp.Identity.load(keys_dir, None)      # public keys only
        self._idle: queue.LifoQueue = queue.LifoQueue(POOL)

    def call(self, body: bytes) -> bytes:
        try:
            link = self._idle.get_nowait()
        except queue.Empty:
            link = None
        try:
            if link is None:
                link = tp.connect(so.dial(self.address, self.timeout), self.identity,
                                  "party0")
            link.send(CLIENT_REQUEST, body)
            kind, reply = link.recv()
        except (so.TransportError, OSError) as exc:
            if link is not None:
                link.close()
            raise UnavailableError(f"party 0 is unreachable: {exc}") from None
        if kind == ERROR:
            try:
                self._idle.put_nowait(link)
            except queue.Full:
                link.close()
            raise MpcError(f"party0: {so.json_object(reply).get('error')}")
        if kind != CLIENT_RESULT:
            link.close()
            raise MpcError(f"party0 sent message kind {kind}")
        try:
            self._idle.put_nowait(link)
        except queue.Full:
            link.close()
        return bytes(reply)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def check_request(body: bytes, input_shape: tuple[int, ...], frac_bits: int) -> None:
    """A party request's form, checked before it reaches party 0."""
    try:
        arrays = so.unpack_arrays(body)
        rid, share, frac = arrays["request_id"], arrays["share"], arrays["frac_bits"]
    except KeyError as exc:
        raise SerializationError(f"a party request lacks {exc}") from None
    if set(arrays) != {"request_id", "share", "frac_bits"} or rid.dtype != np.uint8 or \
            rid.shape != (16,) or frac.dtype != np.uint64 or frac.shape != (1,):
        raise SerializationError("a party request is request_id (16 bytes), share and "
                                 "frac_bits")
    if share.dtype != np.uint64 or share.shape[1:] != tuple(input_shape) or \
            not 1 <= share.shape[0] <= MAX_INPUTS:
        raise InputError(f"the share has shape {share.shape}; this model takes (n, "
                         f"{', '.join(map(str, input_shape))}) with 1 <= n <= {MAX_INPUTS}")
    if int(frac[0]) != frac_bits:
        raise InputError(f"inputs must be encoded with {frac_bits} fractional bits")


def add_routes(app, ctx) -> None:
    """Register the MPC routes for every served model with the ``mpc`` mode."""
    served = {name: ctx.config.backends[name]["mpc"] for name, info in ctx.models.items()
              if "mpc" in info.modes}
    relays = {name: Party0Relay(_address(b["party0"]), b["keys"])
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
        async with ctx.slot():
            body = await ctx.read_body(request, size)
            check_request(body, info.input_shape, served[name].get("frac_bits", 20))
            reply = await ctx.run_sync(relays[name].call, body)
        return Response(reply, media_type="application/octet-stream")

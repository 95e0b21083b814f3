"""MPC mode over HTTP: the service fronts party 0; party 1 stays on its own.

Routes (``add_routes``; API key needed):

- ``GET /v1/models/{name}/mpc``: where party 1 listens, its fixed-point scale, the
  model's shapes.
- ``POST /v1/models/{name}/mpc/ticket`` ``{"request_id": "<32 hex digits>"}``:
  ``{"ticket": "<hex>"}``, party 1's admission ticket for that request and this client
  (``backends/mpc/tickets.py``: an HMAC under the deployment's ``ticket.key``, which the
  service loads from the ``--mpc-keys`` folder). Party 1 refuses a share without one,
  and holds a bounded number of shares per client.
- ``POST /v1/models/{name}/mpc/share`` (octet-stream): a client's request for party 0
  (request id, party 0's share, the fixed-point scale; ``sockets.pack_arrays``). The
  service checks its form, hands it to party 0 over an authenticated, encrypted link
  (``backends/mpc/transport.py``, the client's NK handshake) and answers party 0's
  output share.

The client gets a ticket, sends its other share (with the ticket) straight to party 1
over a link it authenticates with the deployment's public keys (``public.json`` of
``veil mpc-setup``, given by the deployer, never by this service), then posts party 0's
share here. The service runs on party 0's side of the trust boundary: it sees party 0's
share, which alone is uniformly random, and never party 1's; a service that substituted
party 1's address could not read party 1's share either, because the client only
completes the handshake with the pinned key. Party 0's share travels in this HTTP body,
so outside loopback the service belongs behind TLS like any other.

Faults: when the service started the dealer and parties (``processes.py``) they are
registered as ``"<model>-dealer"``, ``"<model>-party0"``, ``"<model>-party1"`` in
``ctx.children``; a ticket or share request while one of them is not ``ok`` fails at
once with 503 naming it ("party 1 is unreachable (down)"), before it takes a slot. A
failure party 0 reports for another role (its link to party 1 or the dealer broke) is
also a 503 naming that role, never a 4xx that blames the client.
"""
from __future__ import annotations

import numpy as np
from fastapi import Depends, Request, Response

from ..backends import sockets as so
from ..backends.mpc import tickets
from ..backends.mpc import transport as tp
from ..backends.mpc.service import (CLIENT_REQUEST, CLIENT_RESULT, ERROR, MpcError,
                                    input_contract, read_client_request)
from ..errors import InputError, MpcRefusedError, UnavailableError
from .pool import ConnectionPool, dial

_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_TICKET = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["request_id"],
    "properties": {"request_id": {"type": "string", "description": "16 bytes, hex"}}}}}}}
ROLES = {"party0": "party 0", "party1": "party 1", "dealer": "the MPC dealer"}


def party0_pool(address: tuple[str, int], keys_dir, timeout: float = 60.0,
                check=None) -> ConnectionPool:
    """Client links to party 0 (Noise NK with the deployment's public keys); ``check``
    raises UnavailableError while a role is not ok (see :func:`roles_check`)."""
    identity = tp.Identity.load(keys_dir, None)           # public keys only
    return ConnectionPool("party 0", lambda: tp.connect(dial(address, timeout), identity,
                                                         "party0"), check=check)


def relay(pool: ConnectionPool, body: bytes) -> bytes:
    """One party request through ``pool``: party 0's output share; its refusal of the
    client's shares (MpcRefusedError, 400: an error that names no role); 503 naming
    the role party 0 could not reach; MpcError (502) for an answer party 0 should not
    give."""
    def exchange(link):
        link.send(CLIENT_REQUEST, body)
        pool.wait_answer(link)
        return link.recv()
    kind, reply = pool.call(exchange)
    if kind == ERROR:
        error = so.json_object(reply)
        role = error.get("unavailable")
        if role in ROLES:
            raise UnavailableError(f"{ROLES[role]} is unreachable: {error.get('error')}")
        raise MpcRefusedError(f"party0: {error.get('error')}")
    if kind != CLIENT_RESULT:
        raise MpcError(f"party0 sent message kind {kind}")
    return bytes(reply)


def roles_check(model: str, children: dict):
    """Raise UnavailableError naming the first of ``model``'s MPC roles that is not ok
    (party 1, the dealer, party 0); nothing when they are, or are not supervised."""
    states = [(text, children.get(f"{model}-{role}")) for role, text in
              (("party1", ROLES["party1"]), ("dealer", ROLES["dealer"]),
               ("party0", ROLES["party0"]))]

    def check() -> None:
        for text, state in states:
            now = state() if state is not None else "ok"
            if now != "ok":
                raise UnavailableError(f"{text} is unreachable ({now}); try again shortly")
    return check


def add_routes(app, ctx) -> None:
    """Register the MPC routes for every served model with the ``mpc`` mode."""
    served = {name: ctx.config.backends[name]["mpc"] for name, info in ctx.models.items()
              if "mpc" in info.modes}
    relays, checks, keys, contracts = {}, {}, {}, {}
    for name, b in served.items():
        # the shares' shape (a transformer's client one-hot encodes its token ids)
        contracts[name] = input_contract(ctx.models[name].path("mpc"))
        children = dict(b.get("children") or {})
        ctx.children.update(children)
        checks[name] = roles_check(name, children)
        relays[name] = party0_pool(so.parse_address(b["party0"]), b["keys"],
                                   check=checks[name])
        keys[name] = tickets.load_key(b["keys"])
    ctx.closers.extend(r.close for r in relays.values())

    @app.get("/v1/models/{name}/mpc", tags=["mpc"],
             summary="Where party 1 listens, and the fixed-point scale")
    async def mpc_info(name: str, client: str = Depends(ctx.require_client)) -> dict:
        info = ctx.model(name, "mpc")
        contract = contracts[name]
        out = {"party1": served[name]["party1"],
               "frac_bits": served[name].get("frac_bits", 20),
               "input_shape": list(info.input_shape),
               "output_shape": list(info.output_shape),
               "max_batch": contract["max_batch"]}
        if contract.get("onehot"):
            out["encoding"] = contract
        return out

    @app.post("/v1/models/{name}/mpc/ticket", tags=["mpc"], openapi_extra=_TICKET,
              summary="Party 1's admission ticket for one request of this client")
    async def mpc_ticket(name: str, request: Request,
                         client: str = Depends(ctx.require_client)) -> dict:
        ctx.model(name, "mpc")
        checks[name]()
        body = await ctx.read_body(request, 4096, media_type="application/json")
        rid = so.json_object(body).get("request_id")
        try:
            rid = bytes.fromhex(rid) if isinstance(rid, str) else b""
        except ValueError:
            rid = b""
        if len(rid) != 16:
            raise InputError('a ticket request is {"request_id": "<32 hex digits>"}')
        return {"ticket": tickets.issue(keys[name], rid, client).hex()}

    @app.post("/v1/models/{name}/mpc/share", tags=["mpc"], openapi_extra=_BINARY,
              response_class=Response, summary="Party 0's share in, its output share out",
              responses={200: {"content": {"application/octet-stream": {}}}})
    async def mpc_share(name: str, request: Request,
                        client: str = Depends(ctx.require_client)) -> Response:
        ctx.model(name, "mpc")
        checks[name]()                   # 503 at once, before a slot, when a role is down
        shape = tuple(contracts[name]["shape"])
        size = 8 * contracts[name]["max_batch"] * int(np.prod(shape)) + (1 << 16)
        body = await ctx.read_body(request, size)
        async with ctx.slot("mpc"):
            read_client_request(body, shape, served[name].get("frac_bits", 20))
            reply = await ctx.run_sync(relay, relays[name], body)
        return Response(reply, media_type="application/octet-stream")

"""MPC mode over HTTP: the service is the deployment's directory, not a party's relay.

``GET /v1/models/{name}/mpc`` (API key needed) answers where the two parties listen and
the fixed-point scale they use. Clients then share their inputs over the parties' own
authenticated, encrypted links (``backends/mpc/transport.py``), one share to each
party, and they authenticate the parties with public keys they got from the deployer
(``public.json`` of ``veil mpc-setup``), never from this answer: a directory that could
substitute a party's key could collect both shares.
"""
from __future__ import annotations

from fastapi import Depends


def add_routes(app, ctx) -> None:
    """Register the MPC route for every served model with the ``mpc`` mode."""
    served = {name: ctx.config.backends[name]["mpc"] for name, info in ctx.models.items()
              if "mpc" in info.modes}

    @app.get("/v1/models/{name}/mpc", tags=["mpc"],
             summary="Where the two MPC parties listen, and their fixed-point scale")
    async def mpc_info(name: str, client: str = Depends(ctx.require_client)) -> dict:
        info = ctx.model(name, "mpc")
        return {"party0": served[name]["party0"], "party1": served[name]["party1"],
                "frac_bits": served[name].get("frac_bits", 20),
                "input_shape": list(info.input_shape),
                "output_shape": list(info.output_shape)}

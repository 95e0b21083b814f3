"""The SDK's MPC mode: secret-shared inference with two non-colluding parties.

``encrypt`` splits a batch into two additive shares locally; ``infer`` gets party 1's
admission ticket for the request from the service (``POST .../mpc/ticket``), sends one
share with it to party 1 over a link of its own (authenticated with the public keys in
``mpc_keys``, the ``public.json`` folder of ``veil mpc-setup`` given by the deployer,
never by the service) and the other to party 0 through the service, which fronts it
(``POST /v1/models/{name}/mpc/share``); ``decrypt`` adds the two output shares.
"""
from __future__ import annotations

import os

import numpy as np

from ..backends.inputs import as_inputs
from ..backends.mpc.service import MpcAnswer, MpcClient, MpcShares
from ..backends.sockets import parse_address
from ..compiler.passes import onehot_encode
from ..errors import InputError

BATCH = 64          # the parties prepare dealer material for batches of 64 ahead


class MPCMode:
    """Options: ``mpc_keys`` (required: folder with the deployment's ``public.json``)."""

    def __init__(self, client, *, mpc_keys: str | os.PathLike | None = None,
                 timeout: float = 60.0) -> None:
        if mpc_keys is None:
            raise InputError("the mpc mode needs mpc_keys=: the folder with the "
                             "deployment's public.json (from `veil mpc-setup`)")
        info = client._call("GET", f"/v1/models/{client.model}/mpc", expect="json")
        self.input_shape = tuple(info["input_shape"])
        share_route = f"/v1/models/{client.model}/mpc/share"
        ticket_route = f"/v1/models/{client.model}/mpc/ticket"

        def ticket(rid: bytes) -> bytes:
            answer = client._call("POST", ticket_route, json={"request_id": rid.hex()},
                                  expect="json")
            return bytes.fromhex(answer["ticket"])
        encoding = info.get("encoding")      # a transformer: token ids one-hot encoded
        self.max_batch = int(info.get("max_batch", BATCH))
        self._mpc = MpcClient(mpc_keys, None, parse_address(info["party1"]), self.input_shape,
                              timeout=timeout, frac_bits=int(info["frac_bits"]),
                              encoder=(lambda xs: onehot_encode(encoding, xs))
                              if encoding else None,
                              party0_call=lambda body: client._call(
                                  "POST", share_route, content=body, expect="bytes"),
                              ticket_call=ticket)
        self.last_stats: list[dict] = []

    def encrypt(self, x) -> tuple[MpcShares, bool]:
        """Two additive shares of one input (or a batch with a leading axis); the
        input contract of :mod:`veil.backends.inputs`."""
        xs, single = as_inputs(x, self.input_shape)      # the contract of every mode
        return self._mpc.share(xs), single

    def infer(self, payload: tuple[MpcShares, bool]) -> tuple[MpcAnswer, bool]:
        shares, single = payload
        answer = self._mpc.send(shares)
        self.last_stats = answer.stats
        return answer, single

    def decrypt(self, result: tuple[MpcAnswer, bool]) -> np.ndarray:
        answer, single = result
        ys = self._mpc.reconstruct(answer)
        return ys[0] if single else ys

    def predict(self, x) -> np.ndarray:
        return self.decrypt(self.infer(self.encrypt(x)))

    def infer_batch(self, xs, batch_size: int = BATCH) -> np.ndarray:
        """Outputs ``(B, *output_shape)`` for a batch (one input is a batch of one), in
        requests of ``batch_size``."""
        xs, _ = as_inputs(xs, self.input_shape)
        batch_size = max(1, min(batch_size, self.max_batch))
        return np.concatenate([self.predict(xs[i:i + batch_size])
                               for i in range(0, len(xs), batch_size)])

    def close(self) -> None:
        self._mpc.close()

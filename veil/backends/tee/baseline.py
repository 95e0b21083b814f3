"""The INSECURE plaintext baseline (``veil tee-serve --plaintext-baseline``): the same
process, framing, model runtime and model path as the enclave, without attestation or
sealing, for measuring what sealing costs (``bench/tee_digits.py``, ``bench/tee_zoo.py``).
"""
from __future__ import annotations

from ..sockets import pack_arrays
from . import net
from .server import _arrays, _ModelServer


class PlaintextServer(_ModelServer):
    """INSECURE baseline: the same model over the same framing, unsealed."""

    def _handle(self, kind: int, body: bytes) -> tuple:
        if kind != net.PLAIN_REQUEST:
            return super()._handle(kind, body)
        ys = self._infer(_arrays(body, "x"))
        self._count("served")
        return net.PLAIN_RESULT, pack_arrays({"y": ys})

    def _status(self) -> dict:
        return {"mode": "plaintext-baseline", "input_shape": list(self.graph.input_shape)}



"""The SDK's TEE mode: sealed inference through the HTTP service.

The service relays the sealed bytes to the enclave; this side verifies the enclave's
evidence against the user's own :class:`~veil.backends.tee.attest.Policy` (a file the
user was given by whoever vouches for the model, never fetched from the service) before
anything leaves the machine, and seals each batch to the attested key
(``backends/tee/seal.py``).

``encrypt`` seals one input (or a batch) on this client's channel, ``infer`` sends it,
``decrypt`` opens the answer; ``infer_batch`` keeps ``depth`` sealed batches in flight.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..backends.inputs import as_inputs
from ..backends.tee import net, seal
from ..backends.tee.attest import Policy
from ..backends.tee.service import DEFAULT_BATCH, DEFAULT_DEPTH, TEEClient, _chunks
from ..errors import InputError, SessionError


@dataclass(frozen=True)
class SealedRequest:
    """One sealed batch, bound to its channel and sequence number."""

    header: bytes               # the clear header: channel, sequence number, suite
    n: int
    single: bool
    message: bytes


@dataclass(frozen=True)
class SealedAnswer:
    request: SealedRequest
    message: bytes


class _HttpTEEClient(TEEClient):
    """:class:`TEEClient` whose messages travel as the service's TEE routes."""

    def __init__(self, http, model: str, policy: Policy, suite: str) -> None:
        super().__init__(("service", 0), policy, suite=suite)
        self._http, self._base = http, f"/v1/models/{model}/tee"

    def call(self, kind: int, payload: bytes, wanted: int) -> bytes:
        if kind == net.EVIDENCE_REQUEST:
            return self._http._call("POST", self._base + "/evidence",
                                    json=json.loads(payload), expect="bytes")
        if kind == net.OPEN:
            self._http._call("POST", self._base + "/open", content=bytes(payload),
                             expect=None)
            return b""
        if kind == net.REQUEST:
            return self._http._call("POST", self._base + "/infer", content=bytes(payload),
                                    expect="bytes")
        if kind == net.STATUS_REQUEST:
            return json.dumps(self._http._call("GET", self._base, expect="json")).encode()
        raise InputError(f"the service has no route for TEE message kind {kind}")

    def close(self) -> None:           # no socket of its own: the HTTP client owns it
        pass


class TEEMode:
    """Options: ``policy`` (required: a Policy or the path of ``veil tee-policy``'s
    file), ``suite`` (``"x25519"`` or ``"mlkem768-x25519"``)."""

    def __init__(self, client, *, policy=None, suite: str = seal.DEFAULT_SUITE) -> None:
        if policy is None:
            raise InputError("the tee mode needs policy=: the file from `veil tee-policy` "
                             "that says which enclave measurements and attesters you trust")
        if isinstance(policy, (str, os.PathLike)):
            policy = Policy.load(policy)
        self._tee = _HttpTEEClient(client, client.model, policy, suite)
        self._lock = threading.Lock()

    @property
    def evidence(self):
        """The verified evidence of the current channel (None before the first call)."""
        return self._tee.evidence

    def status(self) -> dict:
        return self._tee.status()

    def _attested(self) -> tuple[int, ...]:
        """The model's input shape, attesting first when the evidence is missing or too
        old (caller holds the lock)."""
        if not self._tee._fresh():
            self._tee.attest()
        return self._tee._shapes[0]

    def _seal(self, xs: np.ndarray, single: bool) -> SealedRequest:
        """Seal a checked batch on the current channel (caller holds the lock)."""
        header, message = self._tee._request(xs)
        return SealedRequest(header, len(xs), single, bytes(message))

    def encrypt(self, x) -> SealedRequest:
        """Seal one input (or a batch with a leading axis) on this client's channel;
        attests first when the evidence is missing or too old."""
        with self._lock:
            xs, single = as_inputs(x, self._attested(), max_batch=net.MAX_BATCH)
            return self._seal(xs, single)

    def infer(self, request: SealedRequest) -> SealedAnswer:
        return SealedAnswer(request, self._tee.call(net.REQUEST, request.message,
                                                    net.RESULT))

    def decrypt(self, answer: SealedAnswer) -> np.ndarray:
        r = answer.request
        ys = self._tee._answer(r.header, r.n, answer.message)
        return ys[0] if r.single else ys

    def _run(self, xs: np.ndarray, renew: bool = False) -> np.ndarray:
        """One checked batch sealed, sent and opened; if the enclave dropped the
        channel, once more on a fresh one."""
        with self._lock:
            if renew:
                self._tee.attest()
            else:
                self._attested()
            request = self._seal(xs, False)
        try:
            return self.decrypt(self.infer(request))
        except SessionError:
            if renew:
                raise
            return self._run(xs, renew=True)

    def infer_batch(self, xs, batch_size: int = DEFAULT_BATCH,
                    depth: int = DEFAULT_DEPTH) -> np.ndarray:
        """Outputs for any number of inputs: sealed batches of ``batch_size``, ``depth``
        of them in flight (the enclave accepts sequence numbers out of order). The
        inputs are checked once, here."""
        with self._lock:
            xs, _ = as_inputs(xs, self._attested())     # one input is a batch of one
        chunks = _chunks(xs, batch_size)
        with ThreadPoolExecutor(max(1, int(depth))) as pool:
            return np.concatenate(list(pool.map(self._run, chunks)))

    def close(self) -> None:
        self._tee.evidence = self._tee._keys = None

"""Client and server roles wired together in one process, with stage timings.

Used by ``CompiledModel.run(mode="he")`` and by the benchmarks. The two roles still
exchange only bytes: evaluation keys and ciphertexts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .bundle import ClientBundle, ServerBundle
from .client import ModelClient
from .server import ModelServer


@dataclass
class Timings:
    keygen_s: float = 0.0
    session_s: float = 0.0
    eval_key_bytes: int = 0
    encrypt_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    decrypt_s: list[float] = field(default_factory=list)
    input_ct_bytes: int = 0
    output_ct_bytes: int = 0


class Loopback:
    def __init__(self, client_bundle: ClientBundle, server_bundle: ServerBundle,
                 check_range: bool = True) -> None:
        self.timings = Timings()
        self.client = ModelClient(client_bundle, check_range=check_range)
        self.server = ModelServer(server_bundle)
        t0 = time.perf_counter()
        self.client.keygen()
        keys = self.client.evaluation_keys()
        t1 = time.perf_counter()
        self.session = self.server.open_session(keys)
        t2 = time.perf_counter()
        self.timings.keygen_s, self.timings.session_s = t1 - t0, t2 - t1
        self.timings.eval_key_bytes = len(keys)

    def infer(self, x) -> np.ndarray:
        t = self.timings
        t0 = time.perf_counter()
        ct = self.client.encrypt(x)
        t1 = time.perf_counter()
        out = self.session.run(ct)
        t2 = time.perf_counter()
        y = self.client.decrypt(out)
        t3 = time.perf_counter()
        t.encrypt_s.append(t1 - t0)
        t.eval_s.append(t2 - t1)
        t.decrypt_s.append(t3 - t2)
        t.input_ct_bytes, t.output_ct_bytes = len(ct), len(out)
        return y

    def close(self) -> None:
        self.session.close()
        self.client.close()

    def infer_batch(self, xs) -> np.ndarray:
        """Many inputs, ``client.lanes`` per ciphertext; timings are per ciphertext."""
        return timed_batch(self.client, self.timings, xs, self.session.run_batch)


def timed_batch(client: ModelClient, t: Timings, xs, evaluate) -> np.ndarray:
    """Encrypt ``xs`` (``client.lanes`` per ciphertext), ``evaluate(ciphertexts)`` on
    the server, decrypt; each stage's time per ciphertext is added to ``t``."""
    t0 = time.perf_counter()
    cts = client.encrypt_batch(list(xs))
    t1 = time.perf_counter()
    outs = evaluate(cts)
    t2 = time.perf_counter()
    ys = client.decrypt_batch(outs)
    t3 = time.perf_counter()
    n = len(cts)
    t.encrypt_s += [(t1 - t0) / n] * n
    t.eval_s += [(t2 - t1) / n] * n
    t.decrypt_s += [(t3 - t2) / n] * n
    t.input_ct_bytes, t.output_ct_bytes = len(cts[-1]), len(outs[-1])
    return ys

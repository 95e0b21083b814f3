"""The three remote modes, each against its own processes on loopback.

Each function starts the mode's servers with ``Processes`` (the enclave and its
plaintext baseline, the MPC roles, the HE server), measures as
``measure.py`` describes, reads every server's peak RSS, and leaves the stopping to
the caller's context managers (which also run on errors and Ctrl-C).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

from ..backends import sockets
from ..deploy.he_server import read_reply
from ..errors import EngineError, VeilError
from .measure import (ClientPeak, Job, batch_inputs, batches, budgeted, classes_of,
                      median_pass, row, server_peaks)

FRAME = sockets.LEN.size          # length prefix of every frame
TEE_HEAD = 2                      # TEE frames: version and kind bytes


class CompareError(VeilError):
    """A mode failed while ``veil compare`` measured it (the message says which)."""


# -- TEE ------------------------------------------------------------------------------------
def _counting(base):
    """``base`` (a TEE client class) counting frame bytes and the time spent in calls."""

    class Counting(base):
        sent = received = 0
        wait_s = 0.0

        def call(self, kind, payload, wanted):
            t = time.perf_counter()
            body = super().call(kind, payload, wanted)
            self.wait_s += time.perf_counter() - t
            self.sent += len(payload) + FRAME + TEE_HEAD
            self.received += len(body) + FRAME + TEE_HEAD
            return body

        def stream(self, kind, payloads, wanted, on_reply, depth):
            def counted():
                for p in payloads:
                    self.sent += len(p) + FRAME + TEE_HEAD
                    yield p

            def reply(body):
                self.received += len(body) + FRAME + TEE_HEAD
                on_reply(body)
            super().stream(kind, counted(), wanted, reply, depth)

    return Counting


def measure_tee(job: Job, procs) -> dict:
    """Sealed inference to the enclave; the same model served unsealed over the same
    transport (``--plaintext-baseline``) is timed alongside, alternating requests."""
    from ..backends.tee import (PlaintextClient, Policy, SoftwareAttester, TEEClient,
                                TrustedAttester)

    att = SoftwareAttester.create(job.work_dir / "tee-attester")
    enclave = sockets.parse_address(procs.tee(job.export, attester_key=att)["enclave"])
    (baseline,) = procs.start(f"{job.workload.name}-plaintext-server",
                              ["tee-serve", str(job.export.path("tee")),
                               "--plaintext-baseline"])
    baseline = procs.link(baseline)
    policy = Policy(frozenset({job.export.index["tee"]["measurement"]}),
                    (TrustedAttester.load(att),), allow_insecure=True)
    with ClientPeak() as peak, _counting(TEEClient)(enclave, policy) as client, \
            PlaintextClient(baseline, 60.0) as plain:
        t = time.perf_counter()
        client.attest()
        setup = {"attestation_s": time.perf_counter() - t,
                 "attestation_bytes": client.sent + client.received}
        client.infer(job.x[:1]), plain.infer(job.x[:1])      # warm-up
        lat, base, comp, outs = [], [], [], []
        up = down = 0
        for i in budgeted(job, len(job.x)):
            s0, r0, w0 = client.sent, client.received, client.wait_s
            t0 = time.perf_counter()
            outs.append(client.infer(job.x[i:i + 1]))
            lat.append(time.perf_counter() - t0)
            comp.append(lat[-1] - (client.wait_s - w0))
            up, down = client.sent - s0, client.received - r0
            t1 = time.perf_counter()
            plain.infer(job.x[i:i + 1])
            base.append(time.perf_counter() - t1)
            job.progress(1)
        xs = batch_inputs(job, len(lat))
        batch_s = median_pass(lambda: client.infer_batch(xs, batch_size=job.batch, depth=2),
                              job.budget_s / 4)
        base_batch_s = median_pass(lambda: plain.infer_batch(xs, batch_size=job.batch,
                                                             depth=2), job.budget_s / 4)
        job.progress(len(xs))
        servers = server_peaks()
    return row("tee", job, len(lat), np.concatenate(outs), lat, comp,
               throughput=len(xs) / batch_s, batch=job.batch, batch_inputs=len(xs),
               bytes_up=up, bytes_down=down,
               client_round_trips=1, setup=setup, peak_rss={**peak.fields(), **servers},
               baseline_latency_p50_s=float(np.median(base)),
               baseline_throughput_per_s=len(xs) / base_batch_s,
               note="INSECURE software attester (no TEE hardware here); baseline = the "
                    "same model served unsealed over the same loopback transport")


# -- MPC ------------------------------------------------------------------------------------
def _mpc_singles(job: Job, client):
    """One input per request: share, parties, reconstruct, each timed."""
    lat, comp, outs, answers = [], [], [], []
    for i in budgeted(job, len(job.x)):
        t0 = time.perf_counter()
        shares = client.share(job.x[i:i + 1])
        t1 = time.perf_counter()
        answer = client.send(shares)
        t2 = time.perf_counter()
        outs.append(client.reconstruct(answer))
        t3 = time.perf_counter()
        lat.append(t3 - t0)
        comp.append((t1 - t0) + (t3 - t2))
        answers.append(answer)
        job.progress(1)
    return lat, comp, outs, answers


def measure_mpc(job: Job, procs) -> dict:
    """Two parties and a dealer (``Processes.mpc``); the client shares, sends, and
    reconstructs, each timed."""
    from ..backends.mpc import transport
    from ..backends.mpc.evaluator import lower_for_mpc, max_batch
    from ..backends.mpc.service import MpcClient, input_contract
    from ..compiler.passes import onehot_encode
    from ..compiler.targets import lower

    # what a client sends: a transformer's token ids one-hot encoded, and no more inputs
    # per request than the parties take (2 texts of 128 tokens)
    contract = input_contract(job.export.path("mpc"))
    encoder = (lambda xs: onehot_encode(contract, xs)) if contract.get("onehot") else None
    # batches the parties' memory budget admits (a 224x224 model: one image per request)
    size = min(job.batch, contract["max_batch"],
               max_batch(lower_for_mpc(lower(job.compiled.result.source, "mpc")[0])))
    t = time.perf_counter()
    keys = transport.setup(job.work_dir / "mpc-keys")
    info = procs.mpc(job.export, keys, timeout=120.0)     # as the client: WAN batches are slow
    start_s = time.perf_counter() - t
    with ClientPeak() as peak, MpcClient(keys, sockets.parse_address(info["party0"]),
                                         sockets.parse_address(info["party1"]),
                                         job.workload.input_shape,
                                         frac_bits=info["frac_bits"], timeout=120.0,
                                         encoder=encoder) as client:
        t = time.perf_counter()
        client.infer(job.x[:1])                  # links (Noise handshakes) + warm-up
        first_s = time.perf_counter() - t
        time.sleep(1.0)                          # the parties prefetch dealer material
        lat, comp, outs, singles = _mpc_singles(job, client)
        xs = batch_inputs(job, len(lat))
        # the parties keep two batches' material ready; a longer pass has the dealer
        # in the loop, as a sustained load would
        batch_s = median_pass(lambda: [client.infer(c) for c in batches(xs, size)],
                              job.budget_s / 2)
        job.progress(len(xs))
        servers = server_peaks()
    last = singles[-1]
    stats = last.stats
    return row("mpc", job, len(lat), np.concatenate(outs), lat, comp,
               throughput=len(xs) / batch_s, batch=size, batch_inputs=len(xs),
               bytes_up=last.bytes_sent,
               bytes_down=last.bytes_received, client_round_trips=1,
               server_rounds=max(s["online_rounds"] for s in stats),
               setup={"processes_start_s": start_s, "first_inference_s": first_s},
               peak_rss={**peak.fields(), **servers},
               party_bytes_per_input=sum(s["online_bytes_sent"] for s in stats),
               dealer_bytes_per_input=sum(s["offline_bytes"] for s in stats),
               online_p50_s=float(np.median([max(s["online_s"] for s in a.stats)
                                             for a in singles])),
               offline_p50_s=float(np.median([max(s["offline_s"] for s in a.stats)
                                              for a in singles])),
               note="parties and dealer on one machine (loopback); dealer material is "
                    "per inference, fetched ahead of requests")


# -- HE -------------------------------------------------------------------------------------
class _HELink:
    """The client's side of ``he_server.py``'s protocol, counting frame bytes."""

    def __init__(self, address, timeout: float = 600.0) -> None:
        self.sock = sockets.dial(address, timeout)
        self.sent = self.received = 0

    def call(self, payload: bytes) -> bytes:
        sockets.send_frame(self.sock, payload)
        reply = sockets.recv_buffer(self.sock)
        self.sent += len(payload) + FRAME
        self.received += len(reply) + FRAME
        try:
            return read_reply(reply)
        except EngineError as exc:
            raise CompareError(str(exc)) from None

    def close(self) -> None:
        self.sock.close()


def _he_batch_size(job: Job, lanes: int, single_s: float) -> int:
    """``job.batch`` inputs, or fewer (whole ciphertexts) when that many would take
    longer than ``he_batch_budget_s`` at the measured single-input latency, and never
    more than the test inputs."""
    cts = math.ceil(job.batch / lanes)
    fit = max(1, int(job.he_batch_budget_s / max(single_s, 1e-9)))
    return min(job.batch, min(cts, fit) * lanes, len(job.x))


def _he_singles(job: Job, client, link: _HELink, n: int) -> dict:
    """One input per request: encrypt, server, decrypt, each timed."""
    lat, comp, outs = [], [], []
    for i in budgeted(job, n, minimum=3):
        s0, r0 = link.sent, link.received
        t0 = time.perf_counter()
        ct = client.encrypt(job.x[i])
        t1 = time.perf_counter()
        res = link.call(ct)
        t2 = time.perf_counter()
        outs.append(client.decrypt(res)[None])
        t3 = time.perf_counter()
        lat.append(t3 - t0)
        comp.append((t1 - t0) + (t3 - t2))
        up, down = link.sent - s0, link.received - r0
        job.progress(1)
    return {"lat": lat, "comp": comp, "outs": np.concatenate(outs), "up": up, "down": down}


def _he_batch(job: Job, client, link: _HELink, single_s: float) -> dict:
    """One batch through ``encrypt_batch`` (the layout it picks) and ``decrypt_batch``."""
    size = _he_batch_size(job, client.lanes, single_s)
    t = time.perf_counter()
    cts = client.encrypt_batch(list(job.x[:size]))
    out = client.decrypt_batch([link.call(c) for c in cts])
    seconds = time.perf_counter() - t
    job.progress(size)
    agree = np.mean(classes_of(job, np.asarray(out).reshape((size,) + job.plain.shape[1:]))
                    == classes_of(job, job.plain[:size]))
    return {"size": size, "seconds": seconds, "ciphertexts": len(cts),
            "layout": client.batch_layout(size), "agreement": float(agree)}


def measure_he(job: Job, procs) -> dict:
    """Key generation, evaluation-key upload, single inputs, one batch."""
    from ..deploy.client import ModelClient

    he = job.export.path("he")
    (address,) = procs.start(f"{job.workload.name}-he-server", [str(he / "server")],
                             module="veil.deploy.he_server")
    address = procs.link(address)
    with ClientPeak() as peak, ModelClient(he / "client") as client:
        t = time.perf_counter()
        client.keygen()
        keys = client.evaluation_keys()
        setup = {"keygen_s": time.perf_counter() - t, "evaluation_keys_bytes": len(keys)}
        link = _HELink(address)
        try:
            t = time.perf_counter()
            session_s = json.loads(link.call(keys))["session_s"]
            setup["upload_s"] = time.perf_counter() - t
            t = time.perf_counter()
            client.decrypt(link.call(client.encrypt(job.x[0])))
            setup["first_inference_s"] = time.perf_counter() - t   # plaintext caches fill
            one = _he_singles(job, client, link, min(job.n_he, len(job.x)))
            batch = _he_batch(job, client, link, float(np.median(one["lat"])))
        finally:
            link.close()
        servers = server_peaks()
    return row("he", job, len(one["lat"]), one["outs"], one["lat"], one["comp"],
               throughput=batch["size"] / batch["seconds"], batch=batch["size"],
               batch_inputs=batch["size"], bytes_up=one["up"], bytes_down=one["down"],
               client_round_trips=1, setup=setup, peak_rss={**peak.fields(), **servers},
               server_session_open_s=session_s, lanes=client.lanes,
               batch_layout=batch["layout"], batch_ciphertexts=batch["ciphertexts"],
               batch_agreement=batch["agreement"], params=job.compiled.report().params,
               note=f"{client.lanes} inputs per ciphertext; batch of {batch['size']} in "
                    f"{batch['ciphertexts']} {batch['layout']}-layout ciphertexts")


MEASURE = {"tee": measure_tee, "mpc": measure_mpc, "he": measure_he}

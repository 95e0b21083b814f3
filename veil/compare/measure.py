"""What every mode's measurement shares: the job, statistics, quality, the row.

A row (one mode on one workload) is a plain dict, written as is to ``report.json``:

- ``n`` single inputs timed one at a time from the client's call to its decoded output:
  ``latency_p50_s``, ``latency_p95_s``; ``client_compute_p50_s`` is the part spent in
  the client's own code (encoding, encrypting / sharing / sealing, decoding);
- ``throughput_per_s``: inputs per second over ``batch_inputs`` inputs sent in batches
  of ``batch`` (the whole pass timed end to end, client work included; the median of
  up to three passes where they fit the time budget);
- ``n`` is cut short when a mode's singles exceed the time budget (``budgeted``);
- ``accuracy`` (when labels exist), ``agreement`` (argmax equal to plain on the same
  inputs), ``max_abs_error`` (largest logit difference from plain); for a workload
  whose outputs are embeddings (``Workload.embedding``), ``cosine_min`` and
  ``cosine_mean``: the cosine similarity of each output to plain's on the same input;
- ``bytes_up`` / ``bytes_down``: bytes of one single-input inference, client to server(s)
  and back, counted at the frame level (TCP payload; IP and TCP headers excluded);
- ``client_round_trips`` and, for MPC, ``server_rounds`` (party-to-party);
- ``setup``: one-off costs with ``setup_s`` and ``setup_bytes`` their totals;
- ``peak_rss``: role -> bytes (VmHWM of each server process; ``client`` is this
  process's peak during the mode, after its peak was reset, and ``client_baseline`` its
  RSS when the mode started).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .children import peak_rss_bytes, reset_peak_rss, role_of, veil_children
from .default import Workload


@dataclass
class Job:
    """One workload ready to measure: the inputs, plain's outputs on them, the compiled
    model and the export folder."""

    workload: Workload
    x: np.ndarray
    y: np.ndarray | None
    plain: np.ndarray
    compiled: object
    export: object
    work_dir: Path
    n_he: int
    batch: int = 64
    he_batch_budget_s: float = 20.0
    budget_s: float = 30.0
    progress: Callable[..., None] = field(default=lambda k, done=False: None)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``out`` to the same row of ``ref`` (1 where
    both are zero)."""
    out, ref = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (out, ref))
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    dots = (out * ref).sum(1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                    np.where(np.abs(out).sum(1) + np.abs(ref).sum(1) == 0, 1.0, 0.0))


def quality(outputs: np.ndarray, job: Job) -> dict:
    """Accuracy, agreement of the predicted class and the largest logit error vs plain
    on the same (first ``len(outputs)``) inputs; for embeddings, the cosine to plain's.
    ``outputs`` are what the mode computed (the logits: every mode's output head is the
    same exact client step); the classes are the model's (``Head.predict``: an argmax,
    or one logit's sign), mapped to its labels."""
    n = len(outputs)
    out = np.asarray(outputs, dtype=np.float64).reshape(n, -1)
    ref = job.plain[:n].reshape(n, -1)
    classes, ref_classes = (classes_of(job, v) for v in (outputs, job.plain[:n]))
    row = {"agreement": float(np.mean(classes == ref_classes)),
           "max_abs_error": float(np.abs(out - ref).max()),
           "accuracy": None, "plain_accuracy_same_inputs": None}
    if job.workload.embedding:
        cos = cosines(out, ref)
        row.update(cosine_min=float(cos.min()), cosine_mean=float(cos.mean()))
    if job.y is not None:
        row["accuracy"] = float(np.mean(classes == job.y[:n]))
        row["plain_accuracy_same_inputs"] = float(np.mean(ref_classes == job.y[:n]))
    return row


def classes_of(job: Job, outputs: np.ndarray) -> np.ndarray:
    """The model's predicted classes from a mode's outputs (its logits)."""
    return job.compiled.head.classify(np.asarray(outputs, dtype=np.float64))


def latency_fields(latencies, client_s) -> dict:
    return {"latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "client_compute_p50_s": percentile(client_s, 50)}


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def budgeted(job: Job, n: int, minimum: int = 10):
    """Indices of the single inputs to time: ``0 .. n-1``, cut short once this mode's
    singles have taken ``job.budget_s`` (after at least ``minimum``); the row's ``n``
    says how many ran."""
    start = time.perf_counter()
    for i in range(n):
        if i >= minimum and time.perf_counter() - start > job.budget_s:
            return
        yield i


def batch_inputs(job: Job, n_used: int) -> np.ndarray:
    """The inputs of the throughput pass: those timed singly, at least one full batch."""
    return job.x[:max(n_used, min(job.batch, len(job.x)))]


def median_pass(fn, budget_s: float, max_passes: int = 3) -> float:
    """Median seconds of up to ``max_passes`` calls of ``fn``, as many as fit in
    ``budget_s`` (at least one): one pass can be hit by another tenant of the machine."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_passes:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start + times[-1] > budget_s:
            break
    return float(np.median(times))


def server_peaks() -> dict[str, int]:
    """VmHWM of every live veil child of this process, by role."""
    return {role_of(cmd): peak_rss_bytes(pid) for pid, cmd in sorted(veil_children().items())}


class ClientPeak:
    """This process's peak RSS over a block (``with ClientPeak() as peak: ...``) and its
    RSS when the block started (``baseline``): this process also holds the compiler, the
    other modes' leftovers and, for torch models, torch, so the client's own cost is
    ``bytes - baseline``."""

    def __enter__(self) -> "ClientPeak":
        self.reset = reset_peak_rss()
        self.baseline = peak_rss_bytes() if self.reset else 0
        self.bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = peak_rss_bytes()

    def fields(self) -> dict[str, int]:
        return {"client": self.bytes, "client_baseline": self.baseline}


def row(mode: str, job: Job, n: int, outputs: np.ndarray, latencies, client_s, *,
        throughput: float, batch: int, batch_inputs: int, bytes_up: int = 0,
        bytes_down: int = 0, client_round_trips: int = 0, server_rounds: int = 0,
        setup: dict | None = None, peak_rss: dict | None = None, **extra) -> dict:
    setup = dict(setup or {})
    out = {"mode": mode, "n": n, **quality(outputs, job), **latency_fields(latencies, client_s),
           "throughput_per_s": float(throughput), "batch": int(batch),
           "batch_inputs": int(batch_inputs), "bytes_up": int(bytes_up),
           "bytes_down": int(bytes_down), "client_round_trips": int(client_round_trips),
           "server_rounds": int(server_rounds), "setup": setup,
           "setup_s": float(sum(v for k, v in setup.items() if k.endswith("_s"))),
           "setup_bytes": int(sum(v for k, v in setup.items() if k.endswith("_bytes"))),
           "peak_rss": dict(peak_rss or {}), **extra}
    return out


def measure_local(job: Job, mode: str) -> dict:
    """``plain`` or ``simulate`` in this process: single inputs, then batches."""
    with ClientPeak() as peak:
        job.compiled.run(job.x[:job.batch], mode, head=False)             # warm-up
        lat, outs = [], []
        for i in budgeted(job, len(job.x)):
            t = time.perf_counter()
            outs.append(job.compiled.run(job.x[i:i + 1], mode, head=False))
            lat.append(time.perf_counter() - t)
            job.progress(1)
        xs = batch_inputs(job, len(lat))
        batch_s = median_pass(lambda: [job.compiled.run(c, mode, head=False)
                                       for c in batches(xs, job.batch)], job.budget_s / 2)
        job.progress(len(xs))
    return row(mode, job, len(lat), np.concatenate(outs), lat, lat,
               throughput=len(xs) / batch_s, batch=job.batch, batch_inputs=len(xs),
               peak_rss=peak.fields())

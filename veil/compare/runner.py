"""``veil compare``'s run: workloads -> compile and export -> each mode -> result dict.

For each workload: compile once (``veil.compile``: the HE plan, and the reference
``plain`` / ``simulate`` graphs), export once for the remote modes, compute plain's
outputs on the test inputs (the reference for agreement), then measure each mode in
turn with its own processes, started before and stopped after that mode alone so an
idle mode's servers (the MPC parties prefetch in the background) never load the
machine while another is timed. Nothing is printed here: progress goes through the
``progress`` callback, and logging.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
from contextlib import ExitStack
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .._version import __version__
from ..errors import InputError
from ..modes import LOCAL, MODES, SERVED, parse_modes
from .children import veil_children
from .default import Workload
from .measure import Job, measure_local

log = logging.getLogger("veil.compare")
# the modes that evaluate HE's polynomials, and so refuse inputs outside its range
RANGE_CHECKED = ("simulate", "he")

@dataclass
class CompareConfig:
    """What to measure.

    Args:
        modes: some of ``MODES``, in order.
        n: single inputs per mode (and the inputs sent in batches), capped by the data.
        n_he: single inputs for ``he`` (each costs ~0.1-2 s).
        n_mpc: single inputs (and batch inputs) for ``mpc``; None: ``n`` (a text of 128
            tokens costs ~5 s and ~1 GB of party traffic).
        batch: batch size for the throughput measurement.
        he_batch_budget_s: HE's batch is cut to whole ciphertexts that fit this long.
        budget_s: seconds each mode's single inputs may take; ``n`` is cut short after
            that (at least 10 inputs, 3 for HE), and the report says how many ran.
        insecure_test_params: small INSECURE CKKS rings (tests only; in every artifact).
        work_dir: exports, keys and logs (default: a temporary folder, removed).
        clip: clamp every test input into the model's calibrated input range before
            any mode sees it (each row counts its clipped inputs); without it
            ``simulate`` and ``he`` skip the inputs HE's client refuses, and their rows
            count them (quality figures are over the inputs a mode ran).
    """

    modes: tuple[str, ...] = MODES
    n: int = 360
    n_he: int = 30
    batch: int = 64
    he_batch_budget_s: float = 20.0
    budget_s: float = 30.0
    insecure_test_params: bool = False
    work_dir: Path | None = None
    wan: dict | None = field(default=None)
    n_mpc: int | None = None
    clip: bool = False

    def __post_init__(self) -> None:
        self.modes = parse_modes(self.modes, MODES, "--modes")
        if self.n < 1 or self.n_he < 1 or not 1 <= self.batch <= 4096 \
                or (self.n_mpc is not None and self.n_mpc < 1):
            raise InputError("n, n_he and n_mpc must be at least 1, batch 1 to 4096")

    def inputs(self, mode: str, n: int) -> int:
        """Single inputs ``mode`` runs when ``n`` test inputs are there."""
        if mode == "he":
            return min(self.n_he, n)
        if mode == "mpc" and self.n_mpc is not None:
            return min(self.n_mpc, n)
        return n


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "veil": __version__,
            "memory_bytes": _total_memory()}


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _compile(w: Workload, cfg: CompareConfig):
    from ..model import compile as compile_model

    t = time.perf_counter()
    compiled = compile_model(w.model, w.calibration,
                             insecure_test_params=cfg.insecure_test_params,
                             **w.compile_options)
    return compiled, time.perf_counter() - t


def _export(w: Workload, compiled, cfg: CompareConfig, directory: Path):
    from ..model import export_model

    remote = [m for m in cfg.modes if m in SERVED]
    if not remote:
        return None, 0.0
    t = time.perf_counter()
    info = export_model(w.model, w.calibration, directory, name=w.name, modes=remote,
                        compiled=compiled, input_shape=w.input_shape)
    return info, time.perf_counter() - t


def _range_rows(mode: str, outside: np.ndarray, k: int, clip: bool) -> np.ndarray:
    """Which of the first ``k`` test inputs ``mode`` runs: all of them, except for
    ``simulate`` and ``he`` without ``clip``, which refuse those outside the calibrated
    range (``outside``: one flag per test input)."""
    if clip or mode not in RANGE_CHECKED:
        return np.arange(k)
    return np.flatnonzero(~outside[:k])


def _range_fields(mode: str, row: dict, rows: np.ndarray, outside: np.ndarray,
                  clip: bool) -> dict:
    """The row's count of inputs out of range among those its quality covers: clipped
    (``clip``), or for ``simulate`` and ``he`` refused before its ``n`` accepted ones
    were reached."""
    n = int(row["n"])
    if clip:
        return {"clipped_inputs": int(outside[:n].sum())}
    if mode not in RANGE_CHECKED:
        return {}
    span = int(rows[n - 1]) + 1 if n else 0          # test inputs passed to get n
    refused = int(outside[:span].sum())
    return {"refused_inputs": refused, "offered_inputs": span} if refused else {}


def _measure_mode(mode: str, job: Job, log_dir: Path, wan: dict | None = None) -> dict:
    """One mode's row; with ``wan`` (``{"rtt_ms", "mbit"}``) its processes talk across
    an emulated wide-area link and the row is ``"<mode> (WAN)"``."""
    from ..deploy.processes import Processes
    from .remote import MEASURE
    from .wan import Wan

    if mode in LOCAL:
        return measure_local(job, mode)
    with ExitStack() as stack:
        link = stack.enter_context(Wan(wan["rtt_ms"], wan["mbit"])) if wan else None
        with Processes(log_dir, link=link.relay if link else None) as procs:
            row = MEASURE[mode](job, procs)
        if link is not None:
            row["mode"], row["wan"] = f"{mode} (WAN)", link.describe()
    return row


def run_workload(w: Workload, cfg: CompareConfig, work: Path,
                 progress: Callable[[str, int, int], Callable[[int], None]]) -> dict:
    """All modes on one workload. ``progress(label, total)`` returns a callback
    ``advance(k, done=False)``; ``done`` completes the task (a budget may cut it short)."""
    step = progress(f"{w.name}: compile and export", 2)
    compiled, compile_s = _compile(w, cfg)
    step(1)
    info, export_s = _export(w, compiled, cfg, work / w.name / "export")
    step(1, done=True)
    n = min(cfg.n, len(w.x_test))
    x = np.ascontiguousarray(w.x_test[:n], dtype=np.float64)
    y = None if w.y_test is None else np.asarray(w.y_test[:n])
    # HE's calibrated range: one flag per test input; --clip clamps them for every mode
    outside = compiled.input_range.outside(x).reshape(n, -1).any(axis=1)
    if cfg.clip:
        x = compiled.input_range.clip(x, warn=False)
    plain = compiled.run(x, "plain", head=False)    # logits: modes compare before the head
    report = compiled.report(advice=False)     # the modes are measured below instead
    out = {"name": w.name, "source": w.source, "input_shape": list(w.input_shape),
           "n_available": int(len(w.x_test)), "compile_s": compile_s, "export_s": export_s,
           "zoo": w.zoo, "text": w.text, "embedding": w.embedding,
           "he_estimate": report.estimate, "he_refused": report.he_error,
           "plain_logit_range": float(np.ptp(plain.reshape(len(plain), -1), axis=1).min()),
           "he_plan": {"params": report.params, "depth": report.depth,
                       "rotation_keys": len(report.rotations), "lanes": report.lanes,
                       "degrees": [r["degree"] for r in report.layers if r.get("degree")]},
           "modes": {}, "errors": {}}
    runs = [(mode, None) for mode in cfg.modes]
    runs += [(mode, cfg.wan) for mode in cfg.modes if cfg.wan and mode in SERVED]
    for mode, wan in runs:
        key = f"{mode} (WAN)" if wan else mode
        n_mode = cfg.inputs(mode, n)
        total = 2 * n_mode if mode != "he" else n_mode + cfg.batch
        k = n_mode if mode == "mpc" else n     # mpc's inputs are all it sees (batch too)
        rows = _range_rows(mode, outside, k, cfg.clip)
        job = Job(w, x[rows], None if y is None else y[rows], plain[rows], compiled, info,
                  work / w.name, cfg.n_he, cfg.batch, cfg.he_batch_budget_s, cfg.budget_s,
                  progress(f"{w.name}: {key}", total))
        log.info("%s: measuring %s", w.name, key)
        try:
            if not len(rows):
                raise InputError(f"all {k} test inputs are outside the calibrated input "
                                 f"range, which {mode} refuses as HE does: run with --clip")
            out["modes"][key] = _measure_mode(mode, job, work / w.name / "logs", wan)
            out["modes"][key].update(_range_fields(mode, out["modes"][key], rows,
                                                   outside, cfg.clip))
        except Exception as exc:       # one failing mode must not lose the others' numbers
            log.exception("%s: %s failed", w.name, key)
            out["errors"][key] = f"{type(exc).__name__}: {exc}"
        job.progress(0, done=True)
    compiled.close()
    return out


def run(workloads: list[Workload], cfg: CompareConfig, skipped: list[str] = (),
        progress=lambda label, total: (lambda k, done=False: None)) -> dict:
    """Measure every workload in every mode; the result dict that ``report.py`` writes.

    Every process started here is stopped before this returns or raises
    (``left_running`` lists any that were not, and should always be empty).
    """
    started = time.perf_counter()
    result = {"veil_compare": 1, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "config": {
                  "modes": list(cfg.modes), "n": cfg.n, "n_he": cfg.n_he,
                  "n_mpc": cfg.n_mpc, "batch": cfg.batch,
                  "he_batch_budget_s": cfg.he_batch_budget_s, "budget_s": cfg.budget_s,
                  "insecure_test_params": cfg.insecure_test_params, "wan": cfg.wan,
                  "clip": cfg.clip},
              "skipped": list(skipped), "workloads": []}
    with tempfile.TemporaryDirectory(prefix="veil-compare-") as tmp:
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tmp)
        for w in workloads:
            result["workloads"].append(run_workload(w, cfg, work, progress))
    result["wall_s"] = time.perf_counter() - started
    result["left_running"] = [" ".join(c) for c in veil_children().values()]
    return result

"""Measure one compiled model in plain, simulate and he modes; shared by demo and bench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_results(out: Path, name: str, data, title: str, body: list[str]) -> int:
    """Write ``out/name.json`` and ``out/name.md`` (``# name (title)`` then ``body``),
    print the markdown, and return 0 for the bench script's exit code."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    md = "\n".join([f"# {name} ({title})", "", *body, ""])
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def run_he_worker(compiled, xs: np.ndarray, how: str = "single",
                  encrypted_weights: bool = False) -> dict:
    """Export bundles to separate folders and run client+server in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        server_dir, client_dir = compiled.export(tmp, encrypted_weights=encrypted_weights)
        owner = ""
        if encrypted_weights:
            owner = str(Path(tmp) / "owner")
            compiled.server_bundle().save(owner)
        np.save(Path(tmp) / "inputs.npy", np.asarray(xs, dtype=np.float64))
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, str(HERE / "he_worker.py"), str(client_dir),
                        str(server_dir), str(Path(tmp) / "inputs.npy"), str(out), how,
                        owner],
                       check=True, env=dict(os.environ))
        return json.loads(out.read_text())


def measure(name: str, compiled, x_test: np.ndarray, y_test: np.ndarray, n_he: int,
            throughput=None, n_batch: int = 0, n_encrypted: int = 0) -> dict:
    """Accuracy and per-stage costs for plain, simulate and he on one model.

    ``throughput``: the same model compiled with ``layout="throughput"``; its batched
    run over ``n_batch`` inputs gives the amortised cost per input. ``n_encrypted``
    inputs also run in encrypted-weight mode.
    """
    rows = []
    for mode in ("plain", "simulate"):
        t = time.perf_counter()
        logits = compiled.run(x_test, mode)
        per = (time.perf_counter() - t) / len(x_test)
        rows.append({"mode": mode, "n": len(x_test), "accuracy": _accuracy(logits, y_test),
                     "latency_s": per})
    n_he = min(n_he, len(x_test))
    rows.append(_single_row(compiled, x_test[:n_he], y_test[:n_he]))
    if throughput is not None and n_batch:
        rows.append(_batch_row(throughput, x_test[:n_batch], y_test[:n_batch]))
    if n_encrypted:
        rows.append(_single_row(compiled, x_test[:n_encrypted], y_test[:n_encrypted],
                                encrypted_weights=True))
    report = compiled.report()
    return {"model": name, "rows": rows, "params": report.params, "depth": report.depth,
            "rotation_keys": len(report.rotations)}


def _single_row(compiled, xs, ys, encrypted_weights: bool = False) -> dict:
    n = len(xs)
    he = run_he_worker(compiled, xs, "single", encrypted_weights)
    he_logits = np.array(he["outputs"])
    sim = compiled.run(xs, "simulate").reshape(n, -1)
    plain = compiled.run(xs, "plain").reshape(n, -1)
    med = {k: float(np.median(he[k])) for k in ("encrypt_s", "eval_s", "decrypt_s")}
    e2e = np.array(he["encrypt_s"]) + np.array(he["eval_s"]) + np.array(he["decrypt_s"])
    return {
        "mode": "he, encrypted weights" if encrypted_weights else "he", "n": n,
        "encrypted_weights": encrypted_weights, "weight_bytes": he["weight_bytes"],
        "weight_encrypt_s": he["weight_encrypt_s"], "accuracy": _accuracy(he_logits, ys),
        "plain_accuracy_same_images": _accuracy(plain, ys),
        "argmax_agreement_with_simulate": float(np.mean(he_logits.argmax(1) == sim.argmax(1))),
        "max_rel_error_vs_simulate": float(np.max(np.abs(he_logits - sim)
                                                   / np.abs(sim).max(axis=1, keepdims=True))),
        "keygen_s": he["keygen_s"], "session_s": he["session_s"],
        "encrypt_s": med["encrypt_s"], "eval_s": med["eval_s"], "decrypt_s": med["decrypt_s"],
        "latency_s": float(np.median(e2e)), "latency_p95_s": float(np.percentile(e2e, 95)),
        "eval_key_bytes": he["eval_key_bytes"], "ct_in_bytes": he["ct_in_bytes"],
        "ct_out_bytes": he["ct_out_bytes"], "peak_rss_bytes": he["peak_rss_bytes"]}


def _batch_row(compiled, xs, ys, how: str = "batch") -> dict:
    n = len(xs)
    he = run_he_worker(compiled, xs, how)
    total = he["encrypt_s"] + he["eval_s"] + he["decrypt_s"]
    sim = compiled.run(xs, "simulate").reshape(n, -1)
    outs = np.array(he["outputs"])
    return {
        "mode": (f"he batch, {he['layout']} layout" + (f" ({he['lanes']}/ct)"
                                                         if he["layout"] == "lanes" else "")),
        "n": n, "batch": True, "layout": he["layout"],
        "accuracy": _accuracy(outs, ys), "lanes": he["lanes"],
        "ciphertexts": he["ciphertexts"], "keygen_s": he["keygen_s"],
        "encrypt_s": he["encrypt_s"] / he["ciphertexts"],
        "eval_s": he["eval_s"] / he["ciphertexts"],
        "decrypt_s": he["decrypt_s"] / he["ciphertexts"],
        "max_rel_error_vs_simulate": float(np.max(np.abs(outs - sim)
                                                   / np.abs(sim).max(axis=1, keepdims=True))),
        "amortized_s": total / n, "throughput_per_s": n / total,
        "latency_s": total / he["ciphertexts"], "eval_key_bytes": he["eval_key_bytes"],
        "ct_in_bytes": he["ct_in_bytes"], "ct_out_bytes": he["ct_out_bytes"],
        "peak_rss_bytes": he["peak_rss_bytes"]}


def _cells(row: dict) -> list[str]:
    if "keygen_s" not in row:
        return ["-"] * 4 + [f"{row['latency_s'] * 1e3:.3f}", "-", "-", "-"]
    return [f"{row['keygen_s']:.2f}", f"{row['encrypt_s'] * 1e3:.1f}",
            f"{row['eval_s'] * 1e3:.1f}", f"{row['decrypt_s'] * 1e3:.1f}",
            f"{row['latency_s'] * 1e3:.1f}" + (
                f" per ct; {row['amortized_s'] * 1e3:.1f} per input "
                f"({row['throughput_per_s']:.0f}/s)" if row.get("batch") else ""),
            f"{row['ct_in_bytes'] / 1024:.0f} / {row['ct_out_bytes'] / 1024:.0f}",
            f"{row['eval_key_bytes'] / 2**20:.1f}", f"{row['peak_rss_bytes'] / 2**20:.0f}"]


def table(results: list[dict]) -> str:
    """Markdown table of :func:`measure` results."""
    head = ["model", "mode", "n", "accuracy", "keygen s", "encrypt ms", "server ms",
            "decrypt ms", "end-to-end ms", "ct in/out KiB", "eval keys MiB", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for row in r["rows"]:
            cells = [r["model"], row["mode"], str(row["n"]), f"{row['accuracy']:.4f}"]
            lines.append("| " + " | ".join(cells + _cells(row)) + " |")
    return "\n".join(lines)

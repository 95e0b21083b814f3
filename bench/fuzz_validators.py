"""Longer run of the OpenFHE payload validators' fuzz target, and the validators' cost.

Runs ``tests/fuzz_he_validators.py`` (atheris, coverage-guided) for SECONDS (default
300) in a child process and reports executions, crashes (libFuzzer artifacts) and
coverage (libFuzzer's ``cov``/``ft`` counters). Then measures what validation costs on
the digits CNN's 128-bit parameters: building the validator (one throwaway key
generation), checking one input ciphertext and the evaluation keys.
Writes bench/results/fuzz_validators.{json,md}.

Usage: python bench/fuzz_validators.py [SECONDS] [--no-cost]
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fuzz(seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "fuzz_he_validators.py"),
             f"-max_total_time={seconds}", f"-artifact_prefix={tmp}/",
             "-print_final_stats=1"],
            capture_output=True, text=True, cwd=ROOT, timeout=seconds + 600)
        wall = time.perf_counter() - t
        crashes = sorted(p.name for p in Path(tmp).glob("*")
                         if p.name.split("-")[0] in ("crash", "oom", "timeout", "leak"))
    err = proc.stderr
    stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", err)}
    last = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", err)
    runs, cov, ft, corp = (int(x) for x in last[-1]) if last else (0, 0, 0, 0)
    verdicts = re.findall(r"^verdicts: (.*)$", err, re.M)
    return {"seconds": seconds, "wall_s": round(wall, 1), "exit_code": proc.returncode,
            "executions": stats.get("number_of_executed_units", runs),
            "exec_per_sec": stats.get("average_exec_per_sec"),
            "crashes": crashes, "coverage_edges": cov, "features": ft,
            "corpus_units": corp, "peak_rss_mb": stats.get("peak_rss_mb"),
            "verdicts": json.loads(verdicts[-1]) if verdicts else {},
            "tail": err.strip().splitlines()[-12:] if proc.returncode else []}


def _ms(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def cost() -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    import numpy as np
    from models import trained_digits_cnn

    import veil
    from veil.backends.he.openfhe_engine import ClientCrypto, payload_validator

    model, (xtr, xte, _, _) = trained_digits_cnn()
    compiled = veil.compile(model, xtr)
    with tempfile.TemporaryDirectory() as tmp:
        server_dir, _ = compiled.export(tmp)
        bundle = veil.ModelServer(server_dir).bundle
    params, rotations = bundle.params, bundle.manifest["rotations"]
    t = time.perf_counter()
    validator = payload_validator(params, rotations)
    build_s = time.perf_counter() - t
    client = ClientCrypto(params)
    parts = client.keygen(rotations)
    ct = client.encrypt(np.zeros(params.slots))
    structure = sum(len(s) for c in (validator.mult, validator.rotations)
                    for _, s in c.segments)
    return {"ring_dim": params.ring_dim, "mult_depth": params.mult_depth,
            "rotations": len(rotations), "ciphertext_bytes": len(ct),
            "eval_key_bytes": len(parts["mult"]) + len(parts["rotations"]),
            "validator_build_s": round(build_s, 2),
            "validator_structure_bytes_kept": structure,
            "check_ciphertext_ms": round(_ms(lambda: validator.check_ciphertext(
                ct, client.tag), 50), 3),
            "check_eval_keys_ms": round(_ms(lambda: validator.check_eval_keys(
                parts, client.tag), 5), 2)}


def main(argv: list[str]) -> int:
    seconds = int(next((a for a in argv if a.isdigit()), 300))
    result = {"fuzz": fuzz(seconds)}
    if "--no-cost" not in argv:
        result["cost_digits_cnn"] = cost()
    f = result["fuzz"]
    lines = ["`python bench/fuzz_validators.py " + " ".join(argv) + "`", "",
             "| fuzz | value |", "|---|---|"]
    lines += [f"| {k} | {f[k]} |" for k in ("seconds", "executions", "exec_per_sec",
                                             "coverage_edges", "features", "corpus_units",
                                             "peak_rss_mb", "exit_code")]
    lines.append(f"| crashes | {len(f['crashes'])} |")
    lines += [f"| verdict {k} | {v} |" for k, v in sorted(f["verdicts"].items())]
    if "cost_digits_cnn" in result:
        lines += ["", "| validator cost (digits CNN, 128-bit) | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in result["cost_digits_cnn"].items()]
    sys.path.insert(0, str(ROOT / "examples"))
    from harness import write_results

    write_results(ROOT / "bench" / "results", "fuzz_validators", result,
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {seconds} s", lines)
    return 0 if f["exit_code"] == 0 and not f["crashes"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

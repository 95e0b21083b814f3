"""The model zoo in every mode, with the anchors beside it (issue 15).

    python bench/zoo.py [--models resnet20,resnet18,mobilenet_v2 | all] [--n 2] [--keep-others]

Per model: parameters and multiply-accumulates (from the IR), compile time and peak
RSS (in a fresh process), torch's own eval latency (the native plaintext floor), then
``veil compare``'s own measurement (``veil.compare.runner``, the code behind
``veil compare --zoo``) of plain (the reference interpreter), tee (sealed requests to
the enclave, and the unsealed plaintext server over the same transport) and mpc (two
parties and a dealer, three processes on loopback): latency, online and offline time,
bytes between the parties and from the dealer, rounds, peak RSS per process, argmax
agreement and the largest logit error relative to the logit range; and HE's estimate
from the compiler's cost model. The anchors (CrypTen 0.4.1 measured on this machine,
seed 003's claims) and the issue's targets sit in the same table.

Writes bench/results/zoo.json and bench/results/zoo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

DEFAULT = ("resnet20", "resnet18", "mobilenet_v2")
ALL = ("resnet20", "resnet18", "resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0")
# CrypTen 0.4.1 on this machine (two parties plus a trusted third party, one thread each,
# batch norm folded, random weights): seconds per image, party traffic, rounds.
CRYPTEN = {"resnet18": (91.2, 3.71 * 2**30, 232), "mobilenet_v2": (47.0, 5.43 * 2**30, None),
           "resnet20": (3.96, 91 * 2**20, None)}
# The MPC targets, seconds per image.
MPC_TARGET_S = {"resnet18": 10.0, "mobilenet_v2": 5.0, "efficientnet_b0": 8.0,
                "resnet50": 30.0, "vgg16": 60.0, "resnet20": 0.5}
RSS_TARGET = 2 * 2**30
COMPILE_TARGET = (30.0, 4 * 2**30)   # ResNet-18: seconds, bytes
TEE_LATENCY_TARGET, TEE_THROUGHPUT_TARGET = 1.1, 0.9
LOGIT_TARGET = 1e-2


def macs(graph) -> int:
    """Multiply-accumulates of one inference, from the IR's convolutions and matrices."""
    from veil.ir import Op

    total = 0
    for n in graph.nodes:
        if n.op is Op.CONV2D:
            w = n.params["weight"]
            total += int(np.prod(n.shape)) * int(np.prod(w.shape[1:]))
        elif n.op is Op.LINEAR:
            total += int(np.prod(n.shape)) * n.params["weight"].shape[1]
        elif n.op is Op.DENSE:
            total += int(n.params["matrix"].size)
    return total


def compile_child(name: str) -> None:
    """In a fresh process: build, compile, and print the compile's time and peak RSS."""
    import veil
    from veil.compare.children import peak_rss_bytes, reset_peak_rss
    from veil.compare.zoo import ZOO, build, sample_images

    model = build(name)
    cal = sample_images(ZOO[name].input_shape, 8, seed=202)
    reset_peak_rss()
    base = peak_rss_bytes()
    t = time.perf_counter()
    compiled = veil.compile(model, cal)
    dt = time.perf_counter() - t
    print(json.dumps({"compile_s": dt, "compile_peak_rss": peak_rss_bytes(),
                      "compile_rss_above_start": peak_rss_bytes() - base,
                      "params": int(sum(p.numel() for p in model.parameters())),
                      "macs": macs(compiled.result.source)}))


def torch_ms(name: str, reps: int = 5) -> float:
    """torch's own eval latency, batch 1, median of ``reps`` (after a warm-up)."""
    import torch

    from veil.compare.zoo import ZOO, build, sample_images

    model = build(name)
    x = torch.from_numpy(sample_images(ZOO[name].input_shape, 1, seed=101))
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _reason(error: str) -> str:
    """The useful end of a mode's error (a child's stderr tail, without temp paths)."""
    tail = error.split("stderr ends:")[-1].strip()
    return tail.split(": ", 1)[-1] if "/veil-zoo-" in tail else tail


def _row(name: str, info: dict, w: dict) -> dict:
    modes = w["modes"]
    tee, mpc, plain = modes.get("tee"), modes.get("mpc"), modes.get("plain")
    rng = w["plain_logit_range"] or 1.0
    row = {"model": name, **info, "plain_ms": plain and 1e3 * plain["latency_p50_s"],
           "errors": w["errors"], "he_estimate": w["he_estimate"]}
    if tee:
        row.update(tee_ms=1e3 * tee["latency_p50_s"],
                   tee_baseline_ms=1e3 * tee["baseline_latency_p50_s"],
                   tee_latency_ratio=tee["latency_p50_s"] / tee["baseline_latency_p50_s"],
                   tee_throughput_ratio=(tee["throughput_per_s"]
                                         / tee["baseline_throughput_per_s"]),
                   tee_agreement=tee["agreement"],
                   tee_rel_logit_error=tee["max_abs_error"] / rng,
                   tee_peak_rss=tee["peak_rss"])
    if mpc:
        row.update(mpc_ms=1e3 * mpc["latency_p50_s"], mpc_online_ms=1e3 * mpc["online_p50_s"],
                   mpc_offline_ms=1e3 * mpc["offline_p50_s"],
                   mpc_party_bytes=mpc["party_bytes_per_input"],
                   mpc_dealer_bytes=mpc["dealer_bytes_per_input"],
                   mpc_rounds=mpc["server_rounds"], mpc_agreement=mpc["agreement"],
                   mpc_rel_logit_error=mpc["max_abs_error"] / rng,
                   mpc_peak_rss=mpc["peak_rss"], mpc_n=mpc["n"])
    return row


def warm_mpc(name: str, n: int) -> dict:
    """The same model through ``bench/mpc_zoo.measure`` with ``--spool``: each party
    keeps a material set on disk, fetched from the dealer while idle, and each timed
    image waits until both have it, so the request runs the online phase only (the
    dealer's generation and the transfer happened before it arrived)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import mpc_zoo

    from veil.compare.zoo import _entry, build, sample_images

    print(f"[zoo] {name}: mpc with the offline phase done ahead (--spool)", flush=True)
    shape = tuple(_entry(name).input_shape)
    # the photo crops veil compare's zoo workloads time (the models are calibrated on
    # photos: on noise their activations reach thousands)
    r = mpc_zoo.measure(name, build(name, 0), shape, n=n, spool=True,
                        x=sample_images(shape, n, seed=101))
    return {"mpc_warm_ms": 1e3 * r["end_to_end_s"], "mpc_warm_online_ms": 1e3 * r["online_s"],
            "mpc_warm_rel_logit_error": r["max_logit_error_rel_range"],
            "mpc_warm_agreement": r["argmax_agreement"],
            "mpc_warm_peak_rss": r["peak_rss_bytes"],
            "mpc_warm_runs_without_a_set": r["runs_without_a_set"]}


def _checks(rows: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for r in rows:
        m = r["model"]
        if "mpc_ms" not in r and m in MPC_TARGET_S:
            out.append((f"{m}: mpc <= {MPC_TARGET_S[m]:g} s per image", False,
                        "did not run: " + _reason(r["errors"].get("mpc", "-"))))
        if "mpc_ms" in r and m in MPC_TARGET_S:
            goal = 1e3 * MPC_TARGET_S[m]
            if r["mpc_ms"] <= goal or "mpc_warm_ms" not in r:
                out.append((f"{m}: mpc <= {MPC_TARGET_S[m]:g} s per image",
                            r["mpc_ms"] <= goal, f"{r['mpc_ms'] / 1e3:.2f} s"))
            else:       # met only with the dealer's work done before the request: say so
                out.append((f"{m}: mpc <= {MPC_TARGET_S[m]:g} s per image with the offline "
                            "phase done ahead (--spool)", r["mpc_warm_ms"] <= goal,
                            f"{r['mpc_warm_ms'] / 1e3:.2f} s warm; cold (the dealer "
                            f"streaming during the request) {r['mpc_ms'] / 1e3:.2f} s"))
                out.append((f"{m}: mpc warm logit error <= 1e-2 of the range, argmax 1.0, "
                            "peak RSS <= 2 GiB",
                            r["mpc_warm_rel_logit_error"] <= LOGIT_TARGET
                            and r["mpc_warm_agreement"] == 1.0
                            and max(r["mpc_warm_peak_rss"].values()) <= RSS_TARGET,
                            f"{r['mpc_warm_rel_logit_error']:.1e}, "
                            f"{r['mpc_warm_agreement']:.3f}, "
                            f"{_gib(max(r['mpc_warm_peak_rss'].values()))} GiB"))
            servers = {k: v for k, v in r["mpc_peak_rss"].items()
                       if k.startswith("party") or k == "dealer"}
            if servers:
                worst = max(servers.values())
                out.append((f"{m}: mpc peak RSS per process <= 2 GiB", worst <= RSS_TARGET,
                            ", ".join(f"{k} {_gib(v)} GiB" for k, v in servers.items())))
            out.append((f"{m}: mpc max logit error <= 1e-2 of the logit range",
                        r["mpc_rel_logit_error"] <= LOGIT_TARGET,
                        f"{r['mpc_rel_logit_error']:.1e}"))
            out.append((f"{m}: mpc argmax agreement 1.0", r["mpc_agreement"] == 1.0,
                        f"{r['mpc_agreement']:.3f}"))
            if m in CRYPTEN:
                out.append((f"{m}: less party traffic than CrypTen's {_gib(CRYPTEN[m][1])} "
                            "GiB", r["mpc_party_bytes"] < CRYPTEN[m][1],
                            f"{_gib(r['mpc_party_bytes'])} GiB"))
        if "tee_ms" in r and m in ("resnet18", "mobilenet_v2"):
            out.append((f"{m}: tee <= 1.1x the plaintext server's latency",
                        r["tee_latency_ratio"] <= TEE_LATENCY_TARGET,
                        f"{r['tee_latency_ratio']:.2f}x"))
            out.append((f"{m}: tee throughput >= 0.9x the plaintext server's (batches)",
                        r["tee_throughput_ratio"] >= TEE_THROUGHPUT_TARGET,
                        f"{r['tee_throughput_ratio']:.2f}x"))
        if m == "resnet18":
            out.append(("resnet18: compile <= 30 s and <= 4 GiB",
                        r["compile_s"] <= COMPILE_TARGET[0]
                        and r["compile_peak_rss"] <= COMPILE_TARGET[1],
                        f"{r['compile_s']:.1f} s, {_gib(r['compile_peak_rss'])} GiB"))
    return out


def markdown(result: dict) -> str:
    from veil.compare.claims import SEED_003_MS

    rows = result["rows"]
    lines = [f"# Model zoo in every mode ({result['time']})", "",
             f"`python bench/zoo.py --models ...` (each row: its own run, time in the "
             f"JSON; n = {result['n']}) on {result['machine']}. Random weights with batch norms "
             "calibrated on photo crops (`veil.compare.zoo`); inputs are other crops. "
             "Latencies are medians of single images; tee and mpc are separate processes "
             "on loopback (mpc: two parties and a dealer), their RSS is each process's "
             "VmHWM. plain = veil's reference interpreter (numpy float64); torch = "
             "torch's own eval, the native floor. mpc cold: the dealer generates and "
             "streams the material during the request (offline = the time spent waiting "
             "for it); mpc warm: each party holds a set fetched while it was idle "
             "(`mpc-node --spool`, `bench/mpc_zoo.py`'s measure on the same model and "
             "crops), so the request runs the online phase only. Timings are from a "
             "shared 2-core machine.", "",
             "| model | params | GMACs | compile s / GiB | torch ms | plain ms | tee ms "
             "(server ms) | mpc s cold (online / offline) | mpc s warm (logit err) | "
             "mpc party / dealer GiB | rounds | "
             "mpc peak RSS GiB (p0 / p1 / dealer) | agree tee / mpc | logit err / range "
             "(tee / mpc) | HE estimate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.get("he_estimate") or {}
        cal = e.get("calibrated") or {}
        he = (f"depth {e['depth']}, {e['bootstraps']} bootstraps, "
              f"{_gib(e['keys_bytes'])} GiB keys, ~{e['latency_s']:,.0f} s"
              + (f" (calibrated on ResNet-20: ~{cal['latency_s']:,.0f} s, "
                 f"{_gib(cal['keys_bytes'])} GiB keys)" if cal else "")
              if e else "-")
        rss = r.get("mpc_peak_rss", {})
        mpc = (f"{r['mpc_ms'] / 1e3:.2f} ({r['mpc_online_ms'] / 1e3:.2f} / "
               f"{r['mpc_offline_ms'] / 1e3:.2f})" if "mpc_ms" in r else
               f"failed: {_reason(r['errors'].get('mpc', '-'))[:90]}")
        warm = (f"{r['mpc_warm_ms'] / 1e3:.2f} ({r['mpc_warm_rel_logit_error']:.1e})"
                if "mpc_warm_ms" in r else "-")
        tee = (f"{r['tee_ms']:.1f} ({r['tee_baseline_ms']:.1f})" if "tee_ms" in r else
               f"failed: {_reason(r['errors'].get('tee', '-'))[:90]}")
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.2f} | "
            f"{r['compile_s']:.1f} / {_gib(r['compile_peak_rss'])} | {r['torch_ms']:.1f} | "
            f"{r['plain_ms']:.0f} | {tee} | {mpc} | {warm} | "
            f"{_gib(r.get('mpc_party_bytes'))} / {_gib(r.get('mpc_dealer_bytes'))} | "
            f"{r.get('mpc_rounds', '-')} | "
            f"{_gib(rss.get('party0'))} / {_gib(rss.get('party1'))} / "
            f"{_gib(rss.get('dealer'))} | "
            f"{r.get('tee_agreement', float('nan')):.2f} / "
            f"{r.get('mpc_agreement', float('nan')):.2f} | "
            f"{r.get('tee_rel_logit_error', float('nan')):.1e} / "
            f"{r.get('mpc_rel_logit_error', float('nan')):.1e} | {he} |")
    lines += ["", "## Anchors", "",
              "| model | CrypTen 0.4.1 here: s / party GiB / rounds | veil mpc s (x faster) | "
              "seed 003 claims (HE) | veil tee ms | veil mpc ms |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"]
        cr = CRYPTEN.get(m)
        crs = (f"{cr[0]:g} / {_gib(cr[1])} / {cr[2] or '-'}" if cr else "-")
        speed = (f"{r['mpc_ms'] / 1e3:.2f} ({cr[0] / (r['mpc_ms'] / 1e3):.1f}x)"
                 if cr and "mpc_ms" in r else "-")
        claim = f"{SEED_003_MS[m]:g} ms" if m in SEED_003_MS else "-"
        lines.append(f"| {m} | {crs} | {speed} | {claim} | "
                     f"{r.get('tee_ms', float('nan')):.1f} | "
                     f"{r.get('mpc_ms', float('nan')):.0f} |")
    lines += ["", "## Targets", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}: {val}" for text, ok, val in result["checks"]]
    if result.get("estimates_at"):
        lines += ["", f"The HE estimate column was recomputed with the current cost model "
                      f"on {result['estimates_at']} (`python bench/zoo.py --estimates`)."]
    lines += ["", "HE estimate assumptions: " + "; ".join(
        next((r["he_estimate"].get("assumptions", []) for r in rows
              if r.get("he_estimate")), [])), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT))
    ap.add_argument("--n", type=int, default=2, help="images per mode (default 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the rows of models not re-run from the last results")
    ap.add_argument("--render", action="store_true",
                    help="rewrite zoo.md (and the checks) from zoo.json without measuring")
    ap.add_argument("--no-warm", action="store_true",
                    help="skip the warm mpc run (offline phase done ahead, --spool)")
    ap.add_argument("--estimates", action="store_true",
                    help="recompute only the HE estimate column with the current cost "
                         "model (a compile per model), keep the measured columns")
    ap.add_argument("--compile-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile_child:
        compile_child(args.compile_child)
        return 0
    if args.estimates:
        import veil
        from veil.compare.default import zoo_workloads

        result = json.loads((OUT / "zoo.json").read_text())
        for row in result["rows"]:
            (w,), _ = zoo_workloads(row["model"], 1)
            row["he_estimate"] = veil.compile(w.model, w.calibration,
                                              **w.compile_options).report().estimate
            print(f"[zoo] {row['model']}: {row['he_estimate']['bootstraps']} bootstraps",
                  flush=True)
        result["estimates_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        args.render = True
        (OUT / "zoo.json").write_text(json.dumps(result, indent=1, default=float))
    if args.render:
        result = json.loads((OUT / "zoo.json").read_text())
        result["checks"] = _checks(result["rows"])
        (OUT / "zoo.json").write_text(json.dumps(result, indent=1, default=float))
        (OUT / "zoo.md").write_text(markdown(result))
        return 0
    from veil.compare.default import zoo_workloads
    from veil.compare.runner import CompareConfig, machine, run as run_compare

    names = ALL if args.models == "all" else tuple(args.models.split(","))
    rows = []
    for name in names:
        print(f"[zoo] {name}: compile in a fresh process", flush=True)
        child = subprocess.run([sys.executable, __file__, "--compile-child", name],
                               capture_output=True, text=True, check=True)
        info = json.loads(child.stdout.strip().splitlines()[-1])
        info["torch_ms"] = torch_ms(name)
        print(f"[zoo] {name}: {info}", flush=True)
        workloads, skipped = zoo_workloads(name, args.n)
        if skipped:
            print("\n".join(skipped))
            return 1
        cfg = CompareConfig(modes=("plain", "tee", "mpc"), n=args.n, batch=args.batch,
                            budget_s=600.0)
        with tempfile.TemporaryDirectory(prefix="veil-zoo-") as tmp:
            cfg.work_dir = Path(tmp)
            result = run_compare(workloads, cfg)
        w = result["workloads"][0]
        if result["left_running"]:
            raise SystemExit(f"processes left running: {result['left_running']}")
        rows.append(_row(name, info, w))
        if not args.no_warm and "mpc_ms" in rows[-1]:
            rows[-1].update(warm_mpc(name, args.n))
        print(f"[zoo] {name}: {json.dumps(rows[-1], default=float)[:600]}", flush=True)
    m = machine()
    if args.keep_others and (OUT / "zoo.json").is_file():
        # rows of models not re-run this time stay, each with the time it was measured
        old = json.loads((OUT / "zoo.json").read_text())
        rows = [r for r in old["rows"] if r["model"] not in names] + rows
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in rows:
        r.setdefault("measured", stamp)
    result = {"time": stamp, "n": args.n,
              "machine": f"{m['cpus']} CPUs, {m['memory_bytes'] / 2**30:.0f} GiB",
              "rows": rows}
    result["checks"] = _checks(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "zoo.json").write_text(json.dumps(result, indent=1, default=float))
    (OUT / "zoo.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

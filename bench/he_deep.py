"""Benchmark: CKKS bootstrapping for deep networks (issue 16).

Part 1, ``--candidates`` (the default): OpenFHE bootstrapping parameter candidates at
128-bit security (ring 2^16), each in a fresh process built with veil's own
``build_context`` and ``ClientCrypto`` key generation: context and precomputation time,
key generation time, evaluation-key bytes (the automorphism map streamed to a file), one
bootstrap's time (median of ``--reps``), output precision in bits (max error on uniform
[-1, 1] inputs, after a bootstrap from the last usable level), usable levels after it
(products until the next bootstrap, counted), and the process's peak RSS. The chosen
set becomes ``veil.compiler.params.BOOT_SECURE``.

Part 2, ``--deep`` (or ``--deep-only``): a deep narrow network (``tests/
test_he_bootstrap.py``'s shape, wider) at 128-bit parameters, end to end through
``compiled.run(x, mode="he")``: key generation, key bytes, server time per image,
agreement with simulate, peak RSS of the client and of the server process.

Part 3, ``--resnet20-plan``: ResNet-20 (3x32x32) compiled for HE: compile time and
memory, bootstraps, rotation keys, plaintext products and rotations per image, and the
time per image projected from unit costs measured at its parameters in the same run.

Writes bench/results/he_deep.json and bench/results/he_deep.md.
Usage: python bench/he_deep.py [--candidates NAME,...] [--keep-others] [--deep]
       python bench/he_deep.py --deep-only [--images 3]
       python bench/he_deep.py --resnet20-plan [--degree 7]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

# name -> the candidate's parameters (see _params): secret distribution, CoeffsToSlots /
# SlotsToCoeffs level budget, levels reserved after a bootstrap, scale bits, slots, the
# SlotsToCoeffs-first variant, OpenFHE's iterative bootstrapping (Meta-BTS, Bae et al.
# 2022: a second bootstrap of the scaled-up error, for about twice the bits), its
# correction factor (0: OpenFHE's default), and the first modulus (default scale + 8:
# OpenFHE's bootstrap needs first - scale <= the correction factor, 8 bits at 2^16).
def _c(secret="SPARSE_ENCAPSULATED", budget=(3, 3), levels=11, scale=47, slots=1 << 12,
       stc=False, iterations=1, correction=0, first=None):
    return dict(secret=secret, budget=budget, levels=levels, scale=scale, slots=slots,
                stc=stc, iterations=iterations, correction=correction,
                first=first or min(60, scale + max(correction, 8)))


CANDIDATES = {
    "enc-22-s45": _c(budget=(2, 2), scale=45),
    "enc-33-s45": _c(scale=45),
    "enc-33-s47": _c(),
    "enc-33-s50": _c(scale=50),
    "enc-33-s47-c10": _c(correction=10),
    "enc-33-s47-c12": _c(correction=12),
    "enc-33-s47-stc": _c(stc=True),
    "enc-33-s47-it2": _c(iterations=2),
    "enc-33-s47-1k": _c(slots=1 << 10),
    "enc-44-s47": _c(budget=(4, 4)),
    "enc-33-s47-full": _c(slots=1 << 15),
    "enc-33-s47-stc-full": _c(stc=True, slots=1 << 15),
}


CHOSEN = "enc-33-s47-stc"
FULL_SLOTS = "enc-33-s47-stc-full"     # the same set over all 2^15 slots (ResNet-20)
TARGETS = {"bootstrap_s": 20.0, "bits": 12.0, "levels": 10, "key_gib": 8.0}
ANCHORS = ("Measured earlier on this machine: OpenFHE full-slot bootstrap at N=2^16, 22.3 s "
           "on 2 threads, 3 levels left, 13.7-18.9 GiB of automorphism keys. "
           "LowMemoryFHEResNet20: ResNet-20 < 5 min on 8-10 cores, 11.6-15.1 GB. "
           "FHEON: ResNet-20 403 s. Lee et al. ICML 2022: 2,189 s on one thread.")


def _params(name: str):
    from veil.compiler.params import (CKKSParams, HE_STD_128_LOGQP, _digits_ok,
                                      _estimated_log_qp, bootstrap_depth)

    c = CANDIDATES[name]
    secret, budget, levels, scale, slots, stc = (c["secret"], c["budget"], c["levels"],
                                                 c["scale"], c["slots"], c["stc"])
    first = c["first"]
    depth = levels + bootstrap_depth(budget, secret)
    ring = 1 << 16
    from dataclasses import replace

    from veil.backends.he.openfhe_engine import build_context
    from veil.errors import EngineError

    # the fewest digits OpenFHE itself accepts at 128 bits (its modulus sizes can exceed
    # veil's estimate by a few bits), checked on a context without the bootstrap setup
    for dnum in (d for d in range(2, depth + 2) if _digits_ok(depth, d)
                 and _estimated_log_qp(depth, scale, first, d) < HE_STD_128_LOGQP[ring]):
        params = CKKSParams(ring, depth, scale, first, dnum, "HEStd_128_classic", False,
                            secret, 0 if slots == ring // 2 else slots, budget, levels, stc,
                            c["correction"])
        try:
            build_context(replace(params, boot_budget=None))
        except EngineError:
            continue
        return params
    raise SystemExit(f"{name}: depth {depth} at scale {scale} does not fit 128-bit")


def measure_one(name: str, reps: int) -> dict:
    """Run in a fresh process: one candidate, every figure of the table."""
    import resource

    import numpy as np

    from veil.backends.he import openfhe_engine as E

    params = _params(name)
    # a candidate whose keys do not fit fails alone instead of swapping the machine
    limit = int(os.environ.get("VEIL_BENCH_AS_GIB", "20")) << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import tempfile

    import openfhe as ofhe

    t0 = time.perf_counter()
    cc = E.build_context(params)             # veil's context, with the bootstrap setup
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kp = cc.KeyGen()
    cc.EvalMultKeyGen(kp.secretKey)
    cc.EvalBootstrapKeyGen(kp.secretKey, params.slots)   # what ClientCrypto.keygen adds
    keygen_s = time.perf_counter() - t0
    tag = kp.secretKey.GetKeyTag()
    keys = len(cc.GetExistingEvalAutomorphismKeyIndices(tag))
    # key bytes as streamed to a file (an in-memory blob would double the peak)
    with tempfile.TemporaryDirectory(dir=os.environ.get("VEIL_BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "keys.bin")
        t0 = time.perf_counter()
        cc.SerializeEvalAutomorphismKey(path, ofhe.BINARY, tag)
        write_s = time.perf_counter() - t0
        key_bytes = os.path.getsize(path) + len(ofhe.Serialize(
            cc.GetEvalMultKeyVector(tag)[0], ofhe.BINARY))

    def decrypt(ct):
        pt = cc.Decrypt(kp.secretKey, ct)
        pt.SetLength(params.slots)
        return np.array(pt.GetRealPackedValue())
    slots = params.slots
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, slots)
    ct = cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(x))
    # StC-first bootstraps start with their SlotsToCoeffs levels still in hand
    reserve = params.boot_budget[1] if params.boot_stc_first else 0
    for _ in range(params.fresh_budget - reserve):   # to the last level a bootstrap takes
        ct = cc.EvalMult(ct, 1.0)
    iterations = CANDIDATES[name]["iterations"]
    # Meta-BTS wants the precision of one bootstrap (measured: 7-8 bits at these scales)
    hint = 7 if iterations > 1 else 0
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = cc.EvalBootstrap(ct, iterations, hint)
        times.append(time.perf_counter() - t0)
    got = decrypt(out)
    err = float(np.max(np.abs(got - x)))
    mean_err = float(np.mean(np.abs(got - x)))
    # usable levels: products by a constant until one fails; a bootstrap needs two levels
    # left of those (veil's CKKSParams.boot_budget_levels rule), checked with one
    # bootstrap from the last usable level
    chain, cur = [], out
    while len(chain) < 60:
        try:
            cur = cc.EvalMult(cur, 1.0)
        except RuntimeError:
            break
        chain.append(cur)
    usable = max(len(chain) - 2 - reserve, 0)
    try:
        if usable:
            cc.EvalBootstrap(chain[usable - 1], iterations, hint)
    except RuntimeError:
        usable = -usable          # the rule does not hold: flagged in the table
    del chain
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"name": name, "secret": params.key_dist, "level_budget": list(params.boot_budget),
            "scale_bits": params.scaling_bits, "first_mod_bits": params.first_mod_bits,
            "iterations": iterations, "slots": slots, "stc_first": params.boot_stc_first,
            "mult_depth": params.mult_depth, "digits": params.num_large_digits,
            "setup_s": round(setup_s, 2), "keygen_s": round(keygen_s, 2),
            "key_write_s": round(write_s, 2),
            "key_bytes": key_bytes, "automorphism_keys": keys,
            "bootstrap_s": round(float(np.median(times)), 2), "bootstrap_runs": [round(t, 2) for t in times],
            "max_error": err, "bits": round(float(-np.log2(err)), 2),
            "mean_bits": round(float(-np.log2(mean_err)), 2),
            "correction": params.boot_correction,
            "usable_levels": usable, "peak_rss": rss,
            "threads": os.environ.get("OMP_NUM_THREADS", "all")}


DEEP_SCRIPT = r"""
import json, os, resource, sys, time
import numpy as np, torch
import veil
from veil.ir import Op

torch.manual_seed(0)
width, layers = 16, 12


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = torch.nn.Linear(width, width), torch.nn.Tanh()

    def forward(self, x):
        return x + self.act(self.fc(x))


model = torch.nn.Sequential(*[Block() for _ in range(layers)],
                            torch.nn.Linear(width, 4)).eval()
rng = np.random.default_rng(0)
cal, x = rng.normal(size=(256, width)), rng.normal(size=(N, width))
t0 = time.perf_counter()
compiled = veil.compile(model, cal, degree=13)
compile_s = time.perf_counter() - t0
plan = compiled.result.plan
t0 = time.perf_counter()
first = compiled.run(x[0], mode="he")        # keys, validator, session, one image
first_s = time.perf_counter() - t0
server = compiled._servers["he"]
he = np.stack([first] + [compiled.run(xi, mode="he") for xi in x[1:]])
sim = compiled.run(x, mode="simulate")
with torch.no_grad():
    ref = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
(pid,) = server.pids()
hwm = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status")
           if l.startswith("VmHWM"))
t = server.timings
print(json.dumps({
    "model": f"{layers} residual blocks of Linear({width}, {width}) + Tanh (degree 13)",
    "depth": int(plan.depth), "params": plan.params.to_dict(),
    "bootstraps": int(sum(n.op is Op.BOOTSTRAP for n in compiled.result.lowered.nodes)),
    "compile_s": compile_s, "keygen_s": t.keygen_s, "session_s": t.session_s,
    "eval_key_bytes": t.eval_key_bytes, "first_image_s": first_s,
    "server_s": float(np.median(t.eval_s[1:])) if len(t.eval_s) > 1 else t.eval_s[0],
    "encrypt_s": float(np.median(t.encrypt_s)), "decrypt_s": float(np.median(t.decrypt_s)),
    "images": int(N), "he_vs_simulate": float(np.abs(he - sim).max()),
    "simulate_vs_torch": float(np.abs(sim - ref).max()),
    "argmax_agree": float(np.mean(he.argmax(1) == sim.argmax(1))),
    "client_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "server_peak_rss": hwm}))
compiled.close()
"""


def measure_deep(n: int) -> dict:
    """A deep narrow network through ``compiled.run(x, mode="he")`` at 128-bit
    parameters (a fresh process: torch imported first, as users do)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"N = {n}\n" + DEEP_SCRIPT],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"failed": proc.stderr[-800:], "wall_s": round(time.perf_counter() - t0, 1)}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


RESNET20_SCRIPT = r"""
import json, resource, sys, time
from dataclasses import replace
import numpy as np, torch
sys.path.insert(0, "examples")
import veil
from veil.compare.resnet20 import ResNet20
from veil.ir import Op
try:
    from resnet20_models import fashion32, load_resnet20
    model, source = load_resnet20(), "shipped Fashion-MNIST weights"
    cal = fashion32()[0][:64]
except Exception as exc:          # the weights or the dataset are not here
    torch.manual_seed(0)
    model, source = ResNet20().eval(), f"seeded initialisation ({type(exc).__name__})"
    cal = np.random.default_rng(0).uniform(0, 1, size=(64, 3, 32, 32))
t0 = time.perf_counter()
compiled = veil.compile(model, cal, degree=DEGREE)
compile_s = time.perf_counter() - t0
plan, lowered = compiled.result.plan, compiled.result.lowered
polys = [n for n in lowered.nodes if n.op is Op.POLY]
row = {"model": "ResNet-20 (3x32x32)", "weights": source, "degree": DEGREE,
       "compile_s": round(compile_s, 1),
       "compile_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "slots": plan.params.slots, "depth": plan.depth,
       "bootstraps": sum(n.op is Op.BOOTSTRAP for n in lowered.nodes),
       "rotation_keys": len(plan.rotations),
       "diagonals": sum(len(p.diagonals) for p in plan.dense.values()),
       "rotations": round(sum(p.rotation_count() for p in plan.dense.values()), 1),
       "activations": len(polys) + sum(n.op is Op.SQUARE for n in lowered.nodes),
       "poly_degree": max((len(n.attrs["coeffs"]) - 1 for n in polys), default=2)}
# unit costs at these parameters (same ring and moduli, no bootstrapping keys needed):
# a rotation, a weight encoded and multiplied, one activation, at a mid level
from veil.backends.he import openfhe_engine as E
params = replace(plan.params, boot_budget=None)
client = E.ClientCrypto(params)
parts = client.keygen([1])
x = np.random.default_rng(1).uniform(-1, 1, params.slots)
with E.EvaluationSession(params, client.tag, parts, [1]) as s:
    ct = s.load(client.encrypt(x))
    for _ in range(params.mult_depth // 2):
        ct = s.settle(s.mul_scalar(ct, 1.0))   # rescaled, as the evaluator's are
    def med(f, n=5):
        ts = []
        for _ in range(n):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]
    row["rotation_s"] = med(lambda: s.rotate(ct, 1))
    row["pt_product_s"] = med(lambda: s.mul_plain(ct, x, None))
    coeffs = np.asarray(polys[0].attrs["coeffs"]) if polys else np.array([0.0, 0.0, 1.0])
    row["activation_s"] = med(lambda: s.chebyshev(ct, coeffs, -1.0, 1.0), 3)
print(json.dumps(row))
"""


RESNET20_RUN_SCRIPT = r"""
import json, os, resource, sys, time
import numpy as np, torch
sys.path.insert(0, "examples")
import veil
from veil.ir import Op
from resnet20_models import fashion32, load_resnet20

model = load_resnet20().eval()
_, _, xte, yte = fashion32()
if SIZE != 32:     # nearest upsampling: the same network (it pools globally) on wider values
    f = SIZE // 32
    xte = xte.repeat(f, axis=2).repeat(f, axis=3)
    xte, yte = xte[:SIM], yte[:SIM]
x, y = xte[:N], yte[:N]
t0 = time.perf_counter()
compiled = veil.compile(model, xte[:64], degree=2)
compile_s = time.perf_counter() - t0
lowered = compiled.result.lowered
with torch.no_grad():
    plain = model(torch.as_tensor(x)).numpy()


def server_hwm():
    (pid,) = compiled._servers["he"].pids()
    return next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status")
                if l.startswith("VmHWM"))


rows = []
t0 = time.perf_counter()
for i in range(N):
    t = time.perf_counter()
    out = compiled.run(x[i], mode="he")
    rows.append({"image": i, "wall_s": time.perf_counter() - t, "he_argmax": int(out.argmax()),
                 "plain_argmax": int(plain[i].argmax()), "label": int(y[i]),
                 "max_abs_vs_plain": float(np.abs(out - plain[i]).max())})
    server = compiled._servers["he"]
    tm = server.timings
    row = {"images": rows, "compile_s": compile_s, "keygen_s": tm.keygen_s,
           "session_s": tm.session_s, "eval_key_bytes": tm.eval_key_bytes,
           "server_s": [float(v) for v in tm.eval_s],
           "encrypt_s": float(np.median(tm.encrypt_s)),
           "decrypt_s": float(np.median(tm.decrypt_s)),
           "bootstraps": int(sum(n.op is Op.BOOTSTRAP for n in lowered.nodes)),
           "ciphertext_bootstraps": int(sum(compiled.result.plan.parts.get(n.name, 1)
                                            for n in lowered.nodes
                                            if n.op is Op.BOOTSTRAP)),
           "parts": max([1, *compiled.result.plan.parts.values()]),
           "size": SIZE,
           "depth": int(compiled.result.plan.depth),
           "rotation_keys": len(compiled.result.plan.rotations),
           "client_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "server_peak_rss": server_hwm()}
    with open(OUT, "w") as f:
        json.dump(row, f)
    print(f"image {i}: {rows[-1]} server {row['server_s'][-1]:.1f} s", file=sys.stderr,
          flush=True)
compiled.close()
t = time.perf_counter()
sim = np.concatenate([compiled.run(xte[i:i + 500], mode="simulate")
                      for i in range(0, len(xte), 500)])
with torch.no_grad():
    ref = np.concatenate([model(torch.as_tensor(xte[i:i + 500])).numpy()
                          for i in range(0, len(xte), 500)])
row.update(simulate_s=time.perf_counter() - t,
           simulate_acc=float(np.mean(sim.argmax(1) == yte)),
           plain_acc=float(np.mean(ref.argmax(1) == yte)), test_images=int(len(yte)))
with open(OUT, "w") as f:
    json.dump(row, f)
print(json.dumps(row))
"""


ACTIVATIONS_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
sys.path.insert(0, "examples")
import veil
from veil.ir import Op
from resnet20_models import fashion32, load_resnet20, load_resnet20_relu

_, _, xte, yte = fashion32()
xte, yte = xte[:N], yte[:N]
rows = []
for name, model, opts in [
        ("fine-tuned degree 2 (shipped)", load_resnet20(), {"degree": 2}),
        ("ReLU weights, degree-2 fit", load_resnet20_relu(), {"degree": 2}),
        ("ReLU weights, composite 6 bits", load_resnet20_relu(), {"relu_bits": 6}),
        ("ReLU weights, composite 8 bits", load_resnet20_relu(), {"relu_bits": 8})]:
    model = model.eval()
    t0 = time.perf_counter()
    compiled = veil.compile(model, xte[:64], **opts)
    compile_s = time.perf_counter() - t0
    plan, lowered = compiled.result.plan, compiled.result.lowered
    acts = compiled.result.activations
    sim = np.concatenate([compiled.run(xte[i:i + 250], mode="simulate")
                          for i in range(0, len(xte), 250)])
    with torch.no_grad():
        ref = np.concatenate([model(torch.as_tensor(xte[i:i + 250])).numpy()
                              for i in range(0, len(xte), 250)])
    rows.append({"name": name, "options": opts, "compile_s": compile_s,
                 "depth": None if plan is None else int(plan.depth),
                 "bootstraps": int(sum(n.op is Op.BOOTSTRAP for n in lowered.nodes)),
           "ciphertext_bootstraps": int(sum(compiled.result.plan.parts.get(n.name, 1)
                                            for n in lowered.nodes
                                            if n.op is Op.BOOTSTRAP)),
           "parts": max([1, *compiled.result.plan.parts.values()]),
           "size": SIZE,
                 "rotation_keys": None if plan is None else len(plan.rotations),
                 "stages": list(acts[0].stages) if acts and acts[0].stages else None,
                 "relu_error": max((a.max_abs_error_range for a in acts), default=0.0),
                 "plain_acc": float(np.mean(ref.argmax(1) == yte)),
                 "simulate_acc": float(np.mean(sim.argmax(1) == yte)),
                 "he_refusal": None if plan is not None else compiled.result.he_refusal[1]})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
print(json.dumps({"images": int(len(yte)), "rows": rows}))
"""


HTTP_SCRIPT = r"""
import json, os, subprocess, sys, tempfile, threading, time
import numpy as np, torch
sys.path.insert(0, "examples")
import veil
from veil.model import export_model
from veil.service.auth import KeyStore
from resnet20_models import fashion32, load_resnet20

model = load_resnet20().eval()
_, _, xte, yte = fashion32()
x = xte[:N]
with torch.no_grad():
    plain = model(torch.as_tensor(x)).numpy()
row = {"images": int(N)}
with tempfile.TemporaryDirectory(dir=os.environ.get("VEIL_BENCH_TMP")) as tmp:
    t0 = time.perf_counter()
    export_model(model, xte[:64], os.path.join(tmp, "resnet20"), name="resnet20",
                 modes=("he",), degree=2)
    row["export_s"] = time.perf_counter() - t0
    store = os.path.join(tmp, "store")
    keys = KeyStore(store)
    token = keys.create("bench", {"max_key_bytes": 40 << 30})
    keys.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil.service", os.path.join(tmp, "resnet20"), "--store", store,
         "--listen", "127.0.0.1:0", "--disk-budget", str(80 << 30), "--memory-budget",
         str(20 << 30), "--max-key-upload", str(40 << 30), "--he-workers", "1",
         "--worker-timeout", "3600", "--body-timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip().split()[-1]
    peak = {}

    def watch():         # VmHWM of every process of the service (HTTP, HE worker)
        while proc.poll() is None:
            for pid in [proc.pid] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    stat = open(f"/proc/{pid}/stat").read().split()
                    if pid != proc.pid and int(stat[3]) != proc.pid:
                        continue
                    hwm = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status")
                               if l.startswith("VmHWM"))
                    peak[pid] = max(peak.get(pid, 0), hwm)
                except (OSError, ValueError, StopIteration):
                    pass
            time.sleep(2)

    threading.Thread(target=watch, daemon=True).start()
    try:
        with veil.Client(url, "resnet20", api_key=token, key_dir=os.path.join(tmp, "keys"),
                         timeout=7200) as client:
            t0 = time.perf_counter()
            client.mode._ensure_keys()
            row["keygen_s"] = time.perf_counter() - t0
            row["eval_key_bytes"] = client.mode._evaluation_path().stat().st_size
            outs, walls = [], []
            for i in range(N):
                t0 = time.perf_counter()
                outs.append(np.asarray(client.predict(x[i])))
                walls.append(time.perf_counter() - t0)
                print(f"http image {i}: {walls[-1]:.1f} s", file=sys.stderr, flush=True)
            row["first_s"], row["image_s"] = walls[0], walls[1:]
        outs = np.stack(outs).reshape(plain.shape)
        row["argmax_agree"] = int(np.sum(outs.argmax(1) == plain.argmax(1)))
        row["max_abs_vs_plain"] = float(np.abs(outs - plain).max())
        row["client_peak_rss"] = next(int(l.split()[1]) * 1024 for l in
                                      open("/proc/self/status") if l.startswith("VmHWM"))
        time.sleep(3)
        row["service_peak_rss"] = sorted(peak.values())
    finally:
        proc.terminate()
        proc.wait(60)
print(json.dumps(row))
"""


def _script(script: str, n: int) -> dict:
    """``script`` with ``N = n`` in a fresh process; its last stdout line is the row."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"N = {n}\n" + script],
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        return {"failed": f"exit status {proc.returncode}",
                "wall_s": round(time.perf_counter() - t0, 1)}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def measure_http(n: int) -> dict:
    """ResNet-20 through ``veil.service`` and the SDK on loopback: export, key
    generation, a 17 GB key upload, and ``n`` images (the first includes the upload and
    the session's start)."""
    return _script(HTTP_SCRIPT, n)


def measure_activations(n: int) -> dict:
    """Item 5's choice for ResNet-20: the shipped fine-tuned low-degree network against
    the ReLU network with a degree-2 fit and with composite minimax ReLUs, on the first
    ``n`` test images (accuracy in plain and simulate, depth, bootstraps, keys)."""
    return _script(ACTIVATIONS_SCRIPT, n)


def measure_resnet20(n: int, size: int = 32, sim: int = 10000) -> dict:
    """ResNet-20 end to end through ``compiled.run(x, mode="he")`` on the first ``n``
    Fashion-MNIST test images (a fresh process; partial results survive in a file),
    then plain and simulate accuracy on the whole test split. ``size`` 64 runs the same
    network on images upsampled to 64x64 (its first stage's values, 16 x 64 x 64, take
    two ciphertexts each), with accuracy on the first ``sim`` test images."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        head = f"N = {n}\nOUT = {out!r}\nSIZE = {size}\nSIM = {sim}\n"
        proc = subprocess.run([sys.executable, "-c", head + RESNET20_RUN_SCRIPT],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        row = json.loads(open(out).read()) if os.path.exists(out) else {}
    if proc.returncode:
        row["failed"] = f"exit status {proc.returncode} (see stderr)"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def measure_resnet20_plan(degree: int, bootstrap_s: float, key_bytes: float) -> dict:
    """ResNet-20's HE plan (a fresh process): compile time and memory, bootstraps,
    rotation keys, plaintext products and rotations per image, and the projected time
    per image from unit costs measured at its parameters."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", f"DEGREE = {degree}\n" + RESNET20_SCRIPT],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"failed": proc.stderr[-800:], "wall_s": round(time.perf_counter() - t0, 1)}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = {"bootstraps": out["bootstraps"] * bootstrap_s,
             "rotations": out["rotations"] * out["rotation_s"],
             "products": out["diagonals"] * out["pt_product_s"],
             "activations": out["activations"] * out["activation_s"]}
    out.update(projected_parts_s={k: round(v, 1) for k, v in parts.items()},
               projected_s=round(sum(parts.values()), 1), bootstrap_s=bootstrap_s,
               rotation_key_bytes=out["rotation_keys"] * key_bytes,
               wall_s=round(time.perf_counter() - t0, 1))
    return out


def _run_candidate(name: str, reps: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--one", name, "--reps", str(reps)],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"name": name, "failed": (proc.stderr or proc.stdout).strip()[-400:],
                "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _checks(row: dict) -> list[str]:
    if "failed" in row:
        return ["failed"]
    gib = row["key_bytes"] / 2**30
    return [f"{'x' if row['bootstrap_s'] <= TARGETS['bootstrap_s'] else ' '} time",
            f"{'x' if row['bits'] >= TARGETS['bits'] else ' '} bits",
            f"{'x' if row['usable_levels'] >= TARGETS['levels'] else ' '} levels",
            f"{'x' if gib <= TARGETS['key_gib'] else ' '} keys"]


def render(data: dict) -> str:
    lines = ["# Deep HE: bootstrapping (issue 16)", "",
             f"`python bench/he_deep.py` on {data.get('cpus')} CPUs ({data.get('when')}). "
             "Each candidate in a fresh process, at 128-bit security (ring 2^16), "
             "built with veil's `build_context` and the keys `ClientCrypto.keygen` makes "
             "(streamed to a file for their size). Bootstrap time: median of the runs, "
             "all threads; bits: -log2 of the max (mean) error on 2^12 uniform [-1, 1] "
             "inputs, bootstrapped from the last level a bootstrap accepts (OpenFHE's "
             "examples report the mean); usable levels: products after a bootstrap "
             "before the next must start, checked by bootstrapping there (negative: "
             "that check failed). "
             f"Targets: <= {TARGETS['bootstrap_s']:.0f} s, >= {TARGETS['bits']:.0f} bits, "
             f">= {TARGETS['levels']} levels, keys <= {TARGETS['key_gib']:.0f} GiB.", "",
             "| candidate | secret | budget | scale / first | slots | variant | "
             "depth / digits | keygen s | keys (count, GiB) | bootstrap s | bits max "
             "(mean) | usable levels | peak RSS GiB | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in data.get("candidates", []):
        if "failed" in row:
            lines.append(f"| {row['name']} | failed (rc {row['returncode']}): "
                         f"{row['failed'][-120:]!r} |" + " |" * 12)
            continue
        lines.append(
            f"| {row['name']} | {row['secret']} | {tuple(row['level_budget'])} | "
            f"{row['scale_bits']} / {row.get('first_mod_bits', 60)} | {row['slots']} | "
            f"{'StC-first' if row['stc_first'] else 'ModRaise-first'}"
            f"{' x2 (Meta-BTS)' if row.get('iterations', 1) > 1 else ''}"
            f"{', correction ' + str(row['correction']) if row.get('correction') else ''} | "
            f"{row['mult_depth']} / {row['digits']} | {row['keygen_s']} | "
            f"{row['automorphism_keys']}, {row['key_bytes'] / 2**30:.2f} | "
            f"{row['bootstrap_s']} | {row['bits']} ({row.get('mean_bits', '-')}) | "
            f"{row['usable_levels']} | "
            f"{row['peak_rss'] / 2**30:.2f} | {', '.join(_checks(row))} |")
    chosen = next((r for r in data.get("candidates", []) if r["name"] == CHOSEN
                   and "failed" not in r), None)
    lines += ["", "Anchors: " + ANCHORS, ""]
    if chosen:
        lines += [f"Chosen (`veil.compiler.params.BOOT_SECURE`): {CHOSEN}, "
                  f"{chosen['bootstrap_s']} s per bootstrap ({22.3 / chosen['bootstrap_s']:.2f}x "
                  f"faster than the 22.3 s full-slot anchor), "
                  f"{chosen['key_bytes'] / 2**30:.2f} GiB of keys ("
                  f"{13.7 / (chosen['key_bytes'] / 2**30):.1f}-"
                  f"{18.9 / (chosen['key_bytes'] / 2**30):.1f}x smaller), "
                  f"{chosen['usable_levels']} usable levels after it (3 there), "
                  f"{chosen['bits']} bits (max error).", ""]
    deep = data.get("deep")
    if deep and "failed" not in deep:
        p = deep["params"]
        lines += ["## A deep narrow network under HE at 128-bit parameters", "",
                  f"`python bench/he_deep.py --deep` ({deep['model']}): depth "
                  f"{deep['depth']}, {deep['bootstraps']} bootstraps per image over "
                  f"{p['batch'] or p['ring_dim'] // 2} slots (ring {p['ring_dim']}), "
                  "through `compiled.run(x, mode=\"he\")` (client here, server in its "
                  "own process).", "",
                  "| keygen s | eval keys GiB | session s | server s / image | encrypt / "
                  "decrypt ms | he vs simulate (max abs) | argmax agreement | client / "
                  "server peak RSS GiB |", "|---|---|---|---|---|---|---|---|",
                  f"| {deep['keygen_s']:.1f} | {deep['eval_key_bytes'] / 2**30:.2f} | "
                  f"{deep['session_s']:.1f} | {deep['server_s']:.1f} | "
                  f"{deep['encrypt_s'] * 1e3:.0f} / {deep['decrypt_s'] * 1e3:.0f} | "
                  f"{deep['he_vs_simulate']:.1e} | {deep['argmax_agree']:.2f} "
                  f"({deep['images']} images) | {deep['client_peak_rss'] / 2**30:.2f} / "
                  f"{deep['server_peak_rss'] / 2**30:.2f} |", ""]
    elif deep:
        lines += ["## A deep narrow network under HE at 128-bit parameters", "",
                  f"failed: {deep['failed'][-300:]!r}", ""]
    if deep and deep.get("note"):
        lines += [deep["note"], ""]
    r20 = data.get("resnet20_plan")
    if r20 and "failed" not in r20:
        parts = r20["projected_parts_s"]
        lines += ["## ResNet-20: the HE plan and its projected cost", "",
                  f"`python bench/he_deep.py --resnet20-plan` ({r20['weights']}, "
                  f"activations of degree {r20['poly_degree']}): compiled in "
                  f"{r20['compile_s']} s (peak RSS {r20['compile_peak_rss'] / 2**30:.1f} "
                  f"GiB), every convolution lowered from its kernel onto strided grids of "
                  f"{r20['slots']} slots. Not run end to end yet: the time below is "
                  "projected from unit costs measured at these parameters in the same "
                  f"run (rotation {r20['rotation_s'] * 1e3:.0f} ms, weight encode + "
                  f"product {r20['pt_product_s'] * 1e3:.0f} ms, one activation "
                  f"{r20['activation_s']:.2f} s) and the bootstrap measured above "
                  f"({r20['bootstrap_s']} s).", "",
                  "| depth | bootstraps | rotation keys (GiB) | plaintext products | "
                  "rotations | projected s / image (bootstraps, rotations, products, "
                  "activations) | anchors |", "|---|---|---|---|---|---|---|",
                  f"| {r20['depth']} | {r20['bootstraps']} | {r20['rotation_keys']} "
                  f"({r20['rotation_key_bytes'] / 2**30:.1f}) | {r20['diagonals']} | "
                  f"{r20['rotations']} | {r20['projected_s']:.0f} ({parts['bootstraps']:.0f}, "
                  f"{parts['rotations']:.0f}, {parts['products']:.0f}, "
                  f"{parts['activations']:.0f}) | LowMemoryFHEResNet20 < 300 s on 8-10 "
                  "cores, FHEON 403 s, Lee et al. 2,189 s (1 thread) |", ""]
        if r20.get("note"):
            lines += [r20["note"], ""]
    elif r20:
        lines += ["## ResNet-20: the HE plan", "", f"failed: {r20['failed'][-300:]!r}", ""]
    lines += _render_activations(data.get("activations"))
    lines += _render_http(data.get("http"))
    lines += _render_resnet20(data.get("resnet20"), chosen_full=next(
        (r for r in data.get("candidates", []) if r["name"] == FULL_SLOTS
         and "failed" not in r), None), recheck=data.get("recheck"))
    lines += _render_wide(data.get("wide"), data.get("resnet20"))
    return "\n".join(lines)


def _render_wide(run: dict | None, base: dict | None) -> list[str]:
    """ResNet-20 on 64x64 images: values of two ciphertexts, against the 32x32 run."""
    if not run:
        return []
    head = ["## Values wider than one ciphertext: ResNet-20 on 64x64 images", ""]
    if not run.get("images"):
        return head + [f"failed before the first image: {run.get('failed')}", ""]
    imgs, n = run["images"], len(run["images"])
    server = np.array(run["server_s"])
    agree = sum(r["he_argmax"] == r["plain_argmax"] for r in imgs)
    ratio = (f"{np.median(server) / np.median(base['server_s']):.2f}x"
             if base and base.get("server_s") else "-")
    lines = head + [
        f"`python bench/he_deep.py --wide {n}`: the same shipped ResNet-20 on Fashion-MNIST "
        "test images upsampled (nearest) to 64x64, through `compiled.run(x, mode=\"he\")`. "
        "Its first stage's values (16 x 64 x 64 = 65,536 numbers) do not fit one "
        "ciphertext of 2^15 slots: each is cut between channels into "
        f"{run['parts']} ciphertexts of 8 channels, and each convolution runs as a block "
        "matrix over the parts, planned once on one part (`veil/compiler/tiles.py`). "
        "Four times the pixels of the 32x32 run; the ratio column compares the median "
        "server times of the two runs."
        + (f" Stopped early: {run['failed']}." if run.get("failed") else ""), "",
        "| images | ciphertexts per value (widest) | bootstraps (ciphertext bootstraps) "
        "| rotation keys | keygen s | eval keys GiB | server s / image | vs 32x32 | "
        "he = plain argmax | client / server peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {n} | {run['parts']} | {run['bootstraps']} ({run['ciphertext_bootstraps']}) | "
        f"{run['rotation_keys']} | {run['keygen_s']:.0f} | "
        f"{run['eval_key_bytes'] / 2**30:.1f} | {np.median(server):.0f} | {ratio} | "
        f"{agree}/{n} | {run['client_peak_rss'] / 2**30:.2f} / "
        f"{run['server_peak_rss'] / 2**30:.2f} |", ""]
    if "simulate_acc" in run:
        lines += [f"On the first {run['test_images']} upsampled test images: plain "
                  f"{run['plain_acc']:.2%}, simulate {run['simulate_acc']:.2%} (the "
                  "network was trained on 32x32 images; at 64x64 its receptive fields "
                  "cover a quarter as much of the garment, so agreement with plain is "
                  "the measure here, not accuracy).", ""]
    return lines


def _render_http(http: dict | None) -> list[str]:
    if not http:
        return []
    head = ["## ResNet-20 through the HTTP service", ""]
    if "failed" in http:
        return head + [f"failed: {http['failed']}", ""]
    n = http["images"]
    later = (f"{np.median(http['image_s']):.0f}" if http["image_s"] else "-")
    note = [http["note"], ""] if http.get("note") else []
    return head + [
        f"`python bench/he_deep.py --http {n}`: the shipped ResNet-20 exported "
        "(`export_model`), served by `python -m veil.service` on loopback with one HE "
        "worker, and predicted with the SDK (`veil.Client`): the SDK fetches the client "
        "bundle, generates the keys into its key folder and uploads them from disk; the "
        "worker checks them and loads them per layer.", "",
        "| export s | keygen s | key upload GB | first image s (upload, session, "
        "inference) | later images s | he = plain argmax | client / service peak RSS "
        "GiB |", "|---|---|---|---|---|---|---|",
        f"| {http['export_s']:.0f} | {http['keygen_s']:.0f} | "
        f"{http['eval_key_bytes'] / 1e9:.1f} | {http['first_s']:.0f} | {later} | "
        f"{http['argmax_agree']}/{n} | {http['client_peak_rss'] / 2**30:.1f} / "
        + " + ".join(f"{v / 2**30:.1f}" for v in http["service_peak_rss"]) + " |", ""] + note


def _render_activations(act: dict | None) -> list[str]:
    if not act:
        return []
    head = ["## ResNet-20: which activations", ""]
    if "failed" in act:
        return head + [f"failed: {act['failed']}", ""]
    lines = head + [
        f"`python bench/he_deep.py --activations {act['images']}`: the shipped network "
        "fine-tuned for degree-2 activations, and the ReLU network it came from compiled "
        "with a degree-2 fit of ReLU or with composite minimax ReLUs (`relu_bits`, "
        "`veil.compiler.composite`), on the first "
        f"{act['images']} Fashion-MNIST test images.", "",
        "| activations | sign stages | max ReLU error on its range | depth | bootstraps | "
        "rotation keys | plain acc | simulate acc |", "|---|---|---|---|---|---|---|---|"]
    for r in act["rows"]:
        # a network trained for its polynomials has no fitted activation to measure
        err = f"{r['relu_error']:.2g}" if r["relu_error"] else "- (trained)"
        lines.append(
            f"| {r['name']} | {r['stages'] or '-'} | {err} | "
            f"{r['depth'] if r['depth'] is not None else '-'} | {r['bootstraps']} | "
            f"{r['rotation_keys'] if r['rotation_keys'] is not None else '-'} | "
            f"{r['plain_acc']:.2%} | {r['simulate_acc']:.2%} |")
    return lines + [""]


def _recheck_lines(run: dict | None) -> list[str]:
    if not run or not run.get("images"):
        return []
    imgs, n = run["images"], len(run["images"])
    agree = sum(r["he_argmax"] == r["plain_argmax"] for r in imgs)
    return [f"Rechecked on the code of {run.get('when', '?')} "
            f"(`python bench/he_deep.py --recheck {n}`): server "
            f"{np.median(run['server_s']):.0f} s per image (median of {n}), keygen "
            f"{run['keygen_s']:.0f} s, he = plain argmax {agree}/{n}, peak RSS client "
            f"{run['client_peak_rss'] / 2**30:.2f} / server "
            f"{run['server_peak_rss'] / 2**30:.2f} GiB.", ""]


def _render_resnet20(run: dict | None, chosen_full: dict | None,
                     recheck: dict | None = None) -> list[str]:
    if not run:
        return []
    head = ["## ResNet-20 end to end under HE", ""]
    if not run.get("images"):
        return head + [f"failed before the first image: {run.get('failed')}", ""]
    imgs = run["images"]
    n = len(imgs)
    server = np.array(run["server_s"])
    walls = np.array([r["wall_s"] for r in imgs])
    agree = sum(r["he_argmax"] == r["plain_argmax"] for r in imgs)
    correct = sum(r["he_argmax"] == r["label"] for r in imgs)
    boot_s = chosen_full["bootstrap_s"] if chosen_full else None
    share = (f"{run['bootstraps'] * boot_s / float(np.median(server)):.0%}"
             if boot_s else "-")
    lines = head + [
        f"`python bench/he_deep.py --resnet20 --images {n}`: the shipped Fashion-MNIST "
        "ResNet-20 (degree-2 activations) through `compiled.run(x, mode=\"he\")` on the "
        f"first {n} test images, client in the bench process, server in its own process "
        "(`veil.deploy.he_server`, keys from the file the client wrote). 128-bit "
        f"parameters (ring 2^16, 2^15 slots), depth {run['depth']}, {run['bootstraps']} "
        f"bootstraps and {run['rotation_keys']} rotation keys per image; the server holds "
        "the bootstrapping keys and at most 3 GiB of rotation keys, loading the others "
        "per layer. Bootstrap share: bootstraps x the full-slot bootstrap measured above"
        f" ({boot_s} s) over the median server time."
        + (f" Stopped early: {run['failed']}." if run.get("failed") else ""), "",
        "| images | keygen s | eval keys GiB | session s | server s / image median "
        "(min-max) | end to end s / image | bootstrap share | encrypt / decrypt ms | "
        "he = plain argmax | he correct | client / server peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {n} | {run['keygen_s']:.0f} | {run['eval_key_bytes'] / 2**30:.1f} | "
        f"{run['session_s']:.0f} | {np.median(server):.0f} ({server.min():.0f}-"
        f"{server.max():.0f}) | {np.median(walls[1:] if n > 1 else walls):.0f} | {share} | "
        f"{run['encrypt_s'] * 1e3:.0f} / {run['decrypt_s'] * 1e3:.0f} | {agree}/{n} | "
        f"{correct}/{n} | {run['client_peak_rss'] / 2**30:.2f} / "
        f"{run['server_peak_rss'] / 2**30:.2f} |", ""]
    if "simulate_acc" in run:
        lines += [f"Accuracy on all {run['test_images']} test images: plain "
                  f"{run['plain_acc']:.2%}, simulate {run['simulate_acc']:.2%} "
                  f"(simulate took {run['simulate_s']:.0f} s).", ""]
    lines += _recheck_lines(recheck)
    lines += ["Anchors: LowMemoryFHEResNet20 (OpenFHE) < 300 s on 8-10 cores in 11.6-15.1 "
              "GB; FHEON 403 s; Lee et al. ICML 2022 2,189 s on one thread; Orion 1.0.2 "
              "was OOM-killed on this machine generating its ResNet-20 bootstrappers.", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--deep", action="store_true",
                    help="also run the deep narrow network under HE (128-bit)")
    ap.add_argument("--deep-only", action="store_true",
                    help="only the deep network (keeps the candidates' rows)")
    ap.add_argument("--images", type=int, default=3, help="images for --deep")
    ap.add_argument("--resnet20-plan", action="store_true",
                    help="only ResNet-20's HE plan and projected cost (keeps other rows)")
    ap.add_argument("--degree", type=int, default=7,
                    help="activation degree for --resnet20-plan (shipped fine-tuned "
                         "weights keep their own)")
    ap.add_argument("--resnet20", action="store_true",
                    help="only ResNet-20 end to end under HE on --images images "
                         "(keeps other rows)")
    ap.add_argument("--activations", type=int, default=0, metavar="N",
                    help="only ResNet-20's activation choices (fine-tuned degree 2, "
                         "ReLU weights fitted or composite) on N test images")
    ap.add_argument("--http", type=int, default=0, metavar="N",
                    help="only ResNet-20 through veil.service and the SDK on N images")
    ap.add_argument("--wide", type=int, default=0, metavar="N",
                    help="only ResNet-20 on 64x64 images (values wider than one "
                         "ciphertext) under HE on N images")
    ap.add_argument("--recheck", type=int, default=0, metavar="N",
                    help="only ResNet-20 (32x32) under HE on N images, kept beside the "
                         "--resnet20 rows (a check of a later change)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the rows of candidates not re-run from the last results")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.reps)))
        return
    out = RESULTS / "he_deep.json"
    data = json.loads(out.read_text()) if out.exists() and args.keep_others else {}
    if (args.deep_only or args.resnet20_plan or args.resnet20 or args.activations
            or args.http or args.wide or args.recheck):
        data = json.loads(out.read_text()) if out.exists() else {}
    sections = [("http", "ResNet-20 over HTTP", lambda: measure_http(args.http)),
                ("activations", "ResNet-20 activation choices",
                 lambda: measure_activations(args.activations)),
                ("resnet20", "ResNet-20 under HE", lambda: measure_resnet20(args.images)),
                ("wide", "ResNet-20 at 64x64 under HE (values across ciphertexts)",
                 lambda: measure_resnet20(args.wide, 64, 1000)),
                ("recheck", "ResNet-20 under HE, a few images on the current code",
                 lambda: measure_resnet20(args.recheck))]
    for key, what, measure in sections:
        if getattr(args, key):          # one section alone, the others' rows kept
            print(f"[he_deep] {what}", flush=True)
            data[key] = {**measure(), "when": time.strftime("%Y-%m-%d %H:%M")}
            out.write_text(json.dumps(data, indent=1))
            (RESULTS / "he_deep.md").write_text(render(data))
            return
    if args.resnet20_plan:
        chosen = next(r for r in data["candidates"] if r["name"] == CHOSEN)
        print("[he_deep] ResNet-20 plan", flush=True)
        data["resnet20_plan"] = measure_resnet20_plan(
            args.degree, chosen["bootstrap_s"],
            chosen["key_bytes"] / chosen["automorphism_keys"])
        print(f"[he_deep] {data['resnet20_plan']}", flush=True)
        out.write_text(json.dumps(data, indent=1))
        (RESULTS / "he_deep.md").write_text(render(data))
        return
    rows = {r["name"]: r for r in data.get("candidates", [])}
    for name in [] if args.deep_only else [n for n in args.candidates.split(",") if n]:
        print(f"[he_deep] {name}", flush=True)
        rows[name] = _run_candidate(name, args.reps)
        print(f"[he_deep] {rows[name]}", flush=True)
        data.update(candidates=[rows[n] for n in CANDIDATES if n in rows],
                    cpus=os.cpu_count(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        (RESULTS / "he_deep.md").write_text(render(data))
    if args.deep or args.deep_only:
        print("[he_deep] deep network", flush=True)
        data["deep"] = measure_deep(args.images)
        print(f"[he_deep] {data['deep']}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        (RESULTS / "he_deep.md").write_text(render(data))


if __name__ == "__main__":
    main()

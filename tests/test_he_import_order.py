"""HE runs with veil's OpenMP settings whatever the user imported first (issue 16).

torch ships its own libgomp.so.1; imported before veil, it is the runtime OpenFHE binds
to, and it read GOMP_SPINCOUNT before veil could set it. ``compiled.run(mode="he")``
therefore evaluates in a worker process that imports OpenFHE and not torch, with the
variable set. The speed difference is measured in bench/results/he_import_order.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch                       # first, as user scripts do
    import numpy as np
    import veil

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2)).eval()
    cal = np.random.default_rng(0).normal(size=(64, 6))
    compiled = veil.compile(model, cal, degree=7, insecure_test_params=True)
    he = compiled.run(cal[:2], mode="he")
    sim = compiled.run(cal[:2], mode="simulate")
    (pid,) = compiled._servers["he"].pids()
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\\0")
    worker_gomp = sorted({l.split()[-1] for l in open(f"/proc/{pid}/maps") if "libgomp" in l})
    here_gomp = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l})
    worker_torch = any("torch" in l for l in open(f"/proc/{pid}/maps"))
    compiled.close()
    print(json.dumps({"err": float(np.abs(he - sim).max()), "pid": pid, "me": os.getpid(),
                      "spin": [e.decode() for e in env if e.startswith(b"GOMP_SPINCOUNT=")],
                      "worker_gomp": worker_gomp, "here_gomp": here_gomp,
                      "worker_torch": worker_torch,
                      "alive": os.path.exists(f"/proc/{pid}")}))
""")


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_he_server_gets_veils_openmp_setting_after_torch_was_imported():
    out = _run({})
    assert out["err"] < 1e-3
    assert out["pid"] != out["me"]
    # here, OpenFHE would have run on torch's runtime; the worker has its own
    assert any("torch" in p for p in out["here_gomp"])
    assert out["worker_gomp"] and not any("torch" in p for p in out["worker_gomp"])
    assert not out["worker_torch"]
    assert out["spin"] == ["GOMP_SPINCOUNT=1000"]
    assert not out["alive"], "close() stops the HE worker"


def test_a_users_own_spincount_wins():
    out = _run({"GOMP_SPINCOUNT": "50"})
    assert out["spin"] == ["GOMP_SPINCOUNT=50"]

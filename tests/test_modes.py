"""One API for every mode: ``CompiledModel.run(x, mode)`` for plain, simulate, tee and mpc
on one sample and on a batch, against plain; the TEE and MPC processes it starts are
stopped by ``close()``, by the context manager and at interpreter exit; the list of
modes is the one in ``veil/modes.py`` everywhere.

(``he`` goes through the same ``run``; its round trip is tested in test_e2e.py.)
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import veil
from veil.errors import InputError, ModeError
from veil.modes import LOCAL, MODES, SERVED, Mode, as_mode, parse_modes

# Stated tolerances against plain (outputs of the tiny net below are O(1)):
# tee runs the same float64 graph; mpc computes in 20-bit fixed point; simulate is HE's
# polynomial model, whose error is the fitted activations' (bounded, not exact).
# tee: the enclave runs onnxruntime in float32 (backends/tee/executor.py)
# plain: one sample and a batch of them take different BLAS paths (a CI run measured
# 7e-18 apart), so "the same" means within float64 rounding, not bit for bit
ATOL = {"plain": 1e-12, "tee": 1e-4, "mpc": 1e-4, "simulate": 0.05}

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch, veil
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 4 * 4, 3)).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 6, 6))
    compiled = veil.compile(net, x, insecure_test_params=True)
    for mode in sys.argv[1].split(","):
        compiled.run(x[:2], mode)
    servers = compiled._servers.values()
    print(json.dumps({"pids": [p for s in servers for p in s.pids()],
                      "dirs": [str(s.dir) for s in servers]}), flush=True)
    if sys.argv[2] == "hang":
        import time
        time.sleep(600)
    # "exit": leave without close(); the finalizer stops the children at exit
""")


def _tiny_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 2 * 2, 5)).eval()


@pytest.fixture(scope="module")
def tiny():
    x = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8))
    compiled = veil.compile(_tiny_cnn(), x, insecure_test_params=True)
    yield compiled, x[:16], compiled.run(x[:16])
    compiled.close()


def _children() -> dict[int, list[str]]:
    """Live (not zombie) ``python -m veil`` children of this process."""
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and "-m" in cmd \
                    and cmd[cmd.index("-m") + 1] == "veil":
                out[child.pid] = cmd
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return out


def _gone(pids, timeout=15.0) -> list[int]:
    """The pids among ``pids`` still running (not zombies) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["plain", "simulate", "tee", "mpc"])
def test_every_mode_agrees_with_plain_on_a_sample_and_a_batch(tiny, mode):
    compiled, x, plain = tiny
    one = compiled.run(x[3], mode)
    batch = compiled.run(x, mode)
    assert one.shape == compiled.output_shape == plain.shape[1:]
    assert batch.shape == plain.shape
    np.testing.assert_allclose(one, plain[3], atol=ATOL[mode], rtol=0)
    np.testing.assert_allclose(batch, plain, atol=ATOL[mode], rtol=0)
    assert np.array_equal(batch.argmax(1), plain.argmax(1))
    if mode in ("tee", "mpc"):       # a second call reuses the processes
        pids = compiled._servers[mode].pids()
        compiled.run(x[:2], Mode(mode))
        assert compiled._servers[mode].pids() == pids


def test_close_stops_every_child_and_run_starts_them_again(tiny):
    compiled, x, plain = tiny
    compiled.run(x[:2], "tee"), compiled.run(x[:2], "mpc")
    servers = list(compiled._servers.values())
    pids = [p for s in servers for p in s.pids()]
    assert len(pids) == 4 and set(pids) <= set(_children())    # enclave, dealer, 2 parties
    assert all(s.dir.is_dir() for s in servers)
    compiled.close()
    assert _gone(pids, timeout=0) == [] and not _children()
    assert not any(s.dir.exists() for s in servers)            # keys and logs removed
    compiled.close()                                           # twice is fine
    np.testing.assert_allclose(compiled.run(x, "tee"), plain, atol=ATOL["tee"])
    assert not set(compiled._servers["tee"].pids()) & set(pids)
    compiled.close()
    assert not _children()


def test_context_manager_stops_the_children():
    x = np.random.default_rng(1).uniform(-1, 1, (16, 1, 8, 8))
    with veil.compile(_tiny_cnn(), x, insecure_test_params=True) as compiled:
        y = compiled.run(x, "mpc")
        np.testing.assert_allclose(y, compiled.run(x), atol=ATOL["mpc"])
        assert len(_children()) == 3
    assert not _children()


def test_a_child_that_died_is_started_again(tiny):
    compiled, x, plain = tiny
    compiled.run(x[:1], "tee")
    (pid,) = compiled._servers["tee"].pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15     # until it can be reaped (its threads exit too)
    while compiled._servers["tee"].alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not compiled._servers["tee"].alive()
    np.testing.assert_allclose(compiled.run(x, "tee"), plain, atol=ATOL["tee"])
    assert compiled._servers["tee"].pids() != [pid]
    compiled.close()


def test_children_outlive_the_thread_that_started_them(tiny):
    """Linux's parent-death signal follows the starting *thread*: a worker thread that
    ends must not take the enclave with it."""
    compiled, x, plain = tiny
    with ThreadPoolExecutor(1) as pool:
        pool.submit(compiled.run, x[:1], "tee").result()
    (pid,) = compiled._servers["tee"].pids()                  # the worker has ended
    time.sleep(0.5)
    assert _gone([pid], timeout=0) == [pid]
    np.testing.assert_allclose(compiled.run(x, "tee"), plain, atol=ATOL["tee"])
    assert compiled._servers["tee"].pids() == [pid]
    # threads share one model: requests take turns on each mode's links
    jobs = [(i, mode) for i in range(0, len(x), 4) for mode in ("tee", "mpc")]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda job: compiled.run(x[job[0]:job[0] + 4], job[1]), jobs))
    for (i, mode), out in zip(jobs, outs):
        np.testing.assert_allclose(out, plain[i:i + 4], atol=ATOL[mode])
    compiled.close()


def test_a_forked_copy_leaves_the_parents_children_alone(tiny):
    compiled, x, plain = tiny
    compiled.run(x[:1], "tee")
    pids = compiled._servers["tee"].pids()
    child = os.fork()
    if child == 0:                       # what a forked worker's exit would run
        try:
            compiled.close()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:          # stuck (a lock held at fork time)
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the forked copy's close() did not return")
        time.sleep(0.05)
    assert _gone(pids, timeout=0) == pids
    np.testing.assert_allclose(compiled.run(x, "tee"), plain, atol=ATOL["tee"])
    assert compiled._servers["tee"].pids() == pids
    compiled.close()


def test_no_child_outlives_the_interpreter(tmp_path):
    """Programs that never call close(): their children stop when the program exits
    (the finalizer) or is killed outright (the parent-death signal). Both run at once."""
    script = tmp_path / "forgets_close.py"
    script.write_text(SCRIPT)
    (tmp_path / "tmp").mkdir()        # the private folders go here (a killed one stays)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    procs = {how: subprocess.Popen([sys.executable, str(script), modes, how],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env)
             for how, modes in (("exit", "tee,mpc"), ("hang", "mpc"))}
    started = {}
    try:
        for how, proc in procs.items():
            started[how] = json.loads(proc.stdout.readline() or "{}")
            if how == "hang":
                assert len(started[how].get("pids", ())) == 3
                proc.kill()
            else:
                assert len(started[how].get("pids", ())) == 4, proc.stderr.read()
        assert procs["exit"].wait(timeout=60) == 0
        assert procs["hang"].wait(timeout=60) == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for how in procs:
        assert _gone(started[how]["pids"]) == [], how
    assert not any(Path(d).exists() for d in started["exit"]["dirs"])
    assert all(Path(d).parent == tmp_path / "tmp" for d in started["hang"]["dirs"])


def test_bad_input_is_refused_before_anything_starts(tiny):
    compiled, x, _ = tiny
    compiled.close()
    for mode in ("tee", "mpc"):
        with pytest.raises(InputError, match="NaN"):
            compiled.run(np.full((2, 1, 8, 8), np.nan), mode)
        with pytest.raises(InputError, match=r"compiled for \(1, 8, 8\)"):
            compiled.run(np.zeros((2, 1, 7, 8)), mode)
    for mode in MODES:                   # an empty batch is refused alike, in any mode
        with pytest.raises(InputError, match="the batch is empty"):
            compiled.run(np.zeros((0, 1, 8, 8)), mode)
    with pytest.raises(ModeError, match="unknown mode 'gpu'; choose one of plain, simulate"):
        compiled.run(x, "gpu")
    assert not compiled._servers and not _children()


def test_an_op_the_mode_cannot_run_is_refused_before_anything_starts(tmp_path, monkeypatch):
    from veil.errors import UnsupportedOperation

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where a folder would go
    torch.manual_seed(0)
    # a layer norm runs in plain, tee and mpc; HE and simulate have no kernel for it
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                              torch.nn.Linear(4, 2))
    x = np.random.default_rng(0).uniform(-1, 1, (32, 4))
    with veil.compile(net.eval(), x, insecure_test_params=True) as compiled:
        np.testing.assert_allclose(compiled.run(x, "tee"), compiled.run(x), atol=ATOL["tee"])
        compiled.close()
        with pytest.raises(UnsupportedOperation, match="layernorm node .* no HE kernel"):
            compiled.run(x, "he")
        with pytest.raises(UnsupportedOperation, match="layernorm node .* 'simulate'"):
            compiled.run(x, "simulate")
        assert not compiled._servers and not _children() and not list(tmp_path.iterdir())


def test_a_process_that_cannot_start_is_named_with_its_stderr(tiny, tmp_path, monkeypatch):
    from veil.deploy.processes import ProcessError

    compiled, x, _ = tiny
    compiled.close()
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'veil: the enclave refused to start: no entropy' >&2\n"
                      "exit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    with pytest.raises(ProcessError, match=r"(?s)local-enclave did not start.*no entropy"):
        compiled.run(x, "tee")
    with pytest.raises(ProcessError, match=r"(?s)local-dealer did not start.*no entropy"):
        compiled.run(x, "mpc")
    assert not compiled._servers and not _children()
    assert not list((tmp_path / "t").iterdir())                 # nothing left behind
    assert veil.ProcessError is ProcessError and issubclass(ProcessError, veil.VeilError)


def test_the_list_of_modes_lives_in_one_place():
    from veil import ir
    from veil.cli import _parser
    from veil.compare import MODES as compare_modes
    from veil.deploy.export import check_modes
    from veil.sdk.client import MODES as sdk_modes

    assert MODES == tuple(m.value for m in Mode) == ir.TARGETS == compare_modes
    assert set(LOCAL) | set(SERVED) == set(MODES) and not set(LOCAL) & set(SERVED)
    assert set(sdk_modes) == set(SERVED)
    assert veil.Mode is Mode and as_mode("mpc") is Mode.MPC
    assert check_modes("he, tee,he") == ("he", "tee")
    with pytest.raises(ModeError, match="choose some of tee, mpc, he"):
        check_modes(["plain"])
    with pytest.raises(ModeError):
        parse_modes("")
    (commands,) = [a for a in _parser()._actions if hasattr(a, "choices") and
                   isinstance(a.choices, dict)]
    predict = commands.choices["predict"]
    (mode_arg,) = [a for a in predict._actions if a.dest == "mode"]
    assert tuple(mode_arg.choices) == SERVED

"""HE worker processes: a native crash on client bytes fails one request, not the service.

A real ``python -m veil.service`` process with two HE workers. Workers are crashed
through their test seam (``VEIL_TEST_HE_WORKER_FAULTS``, set only on the service's
environment here) or killed, stopped and timed out from outside; the service must
answer with the right typed error, stay up, restart the worker, and serve the same
session again from its stored keys.
"""
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from veil.errors import RejectedInputError, ServiceError, SerializationError, UnavailableError
from veil.service.auth import KeyStore
from veil.service.workers import ERROR_TYPES, error_header, raise_error, worker_index
from veil.wire import pack, unpack

from service_util import ROOT, ServerProcess, tiny_export

OCT = {"Content-Type": "application/octet-stream"}
TOKEN = "t" + secrets.token_hex(8)
X = np.array([0.1, -0.2, 0.3, 0.4])
TIMEOUT = 10          # --worker-timeout of the service under test


# -- the protocol, without processes ---------------------------------------------------
def test_errors_cross_as_allow_listed_types_only():
    class NewValidationError(SerializationError):
        pass

    for exc, want in [(RejectedInputError("r"), RejectedInputError),
                      (NewValidationError("v"), SerializationError),
                      (UnavailableError("u"), ServiceError)]:
        head = error_header(exc)
        with pytest.raises(want) as got:
            raise_error(head, "HE worker 0")
        assert type(got.value) is want and str(got.value) == str(exc)
    assert error_header(ValueError("secret detail"))["error"] == {
        "type": "ServiceError", "message": "internal error in an HE worker"}
    for bad in ({"error": {"type": "SystemExit", "message": "x"}},
                {"error": {"type": "os.system", "message": "x"}},
                {"error": {"type": "EngineError", "message": 7}}, {"error": "x"}, {}):
        with pytest.raises(ServiceError):
            raise_error(bad, "HE worker 0")
    raise_error({"ok": True}, "HE worker 0")
    assert "UnavailableError" not in ERROR_TYPES      # a worker cannot fake a 503


def test_sessions_map_to_workers_stably_and_evenly():
    ids = [secrets.token_hex(16) for _ in range(2000)]
    first = [worker_index(i, 3) for i in ids]
    assert first == [worker_index(i, 3) for i in ids]
    counts = np.bincount(first, minlength=3)
    assert counts.min() > 500


def test_the_http_process_does_not_load_openfhe(tmp_path):
    tiny_export(tmp_path / "tiny", "tiny")
    script = f"""
import json, sys
from veil.service.app import ServiceConfig, create_app
app = create_app(ServiceConfig([{str(tmp_path / 'tiny')!r}], {str(tmp_path / 'store')!r},
                               he_workers=1))
ctx = app.state.veil
states = {{k: f() for k, f in ctx.children.items()}}
pids = app.state.he.workers.pids()
loaded = sorted(m for m in sys.modules if "openfhe" in m)
ctx.close()
print(json.dumps({{"loaded": loaded, "states": states, "pids": pids}}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [] and got["states"] == {"he-worker-0": "ok"}
    pid = got["pids"][0]
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)   # closed with the app


def test_a_model_a_worker_cannot_load_stops_the_start(tmp_path):
    from veil.errors import BundleError
    from veil.service.app import ServiceConfig, create_app

    tiny_export(tmp_path / "tiny", "tiny")
    (tmp_path / "tiny" / "he" / "server" / "weights.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleError):
        create_app(ServiceConfig([tmp_path / "tiny"], tmp_path / "store", he_workers=2))
    assert _my_workers() == []
    log = (tmp_path / "store" / "logs" / "he-worker-0.log").read_text()
    assert "BundleError" in log


def _my_workers() -> list[int]:
    """HE worker processes that are children of this (test) process."""
    out = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"veil.service.he_worker" in argv and not _zombie(int(child)):
                out.append(int(child))
    return out


# -- a real service -------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from veil.deploy import ClientBundle, ModelClient

    root = tmp_path_factory.mktemp("workers")
    _, compiled, _ = tiny_export(root / "tiny", "tiny", seed=0)
    store = root / "store"
    keys = KeyStore(store)
    token = keys.create("alice")
    keys.close()
    old = os.environ.get("VEIL_TEST_HE_WORKER_FAULTS")
    os.environ["VEIL_TEST_HE_WORKER_FAULTS"] = TOKEN     # inherited by the service only
    try:
        server = ServerProcess([root / "tiny"], store, "--he-workers", "2",
                               "--worker-timeout", str(TIMEOUT))
    finally:
        if old is None:
            del os.environ["VEIL_TEST_HE_WORKER_FAULTS"]
        else:
            os.environ["VEIL_TEST_HE_WORKER_FAULTS"] = old
    client = ModelClient(ClientBundle.load(root / "tiny" / "he" / "client"))
    http = httpx.Client(base_url=server.url, timeout=120,
                        headers={"Authorization": f"Bearer {token}"})
    yield {"server": server, "http": http, "client": client, "keys": client.keygen(),
           "store": store, "expect": compiled.run(X, mode="simulate")}
    http.close()
    server.stop()
    log = server.log.read_text()
    assert " crashed" not in log and "Fatal Python error" not in log   # no 500, no abort


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def worker_pids(server) -> dict[int, int]:
    """The service's HE worker processes by index (from /proc, as an operator would)."""
    pid = server.proc.pid
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"veil.service.he_worker" in argv and not _zombie(int(child)):
                out[int(argv[argv.index(b"--index") + 1])] = int(child)
    return out


def health(env) -> dict:
    return env["http"].get("/v1/health").json()


def wait_healthy(env, timeout=60) -> None:
    give_up = time.monotonic() + timeout
    while health(env)["status"] != "ok":
        assert time.monotonic() < give_up, health(env)
        time.sleep(0.1)


def new_session(env, worker: int, keys=None) -> str:
    """A session whose id maps to ``worker`` (ids are random: retry until one does)."""
    blob = (keys or env["keys"]).to_bytes()
    for _ in range(40):
        r = env["http"].post("/v1/models/tiny/he/sessions", content=blob, headers=OCT)
        assert r.status_code == 201, r.text
        sid = r.json()["session"]
        if worker_index(sid, 2) == worker:
            return sid
        assert env["http"].delete(f"/v1/he/sessions/{sid}").status_code == 204
    raise AssertionError("no session id mapped to the worker")


def infer(env, sid: str, blob: bytes | None = None) -> httpx.Response:
    blob = env["client"].encrypt(X) if blob is None else blob
    return env["http"].post(f"/v1/he/sessions/{sid}/infer", content=blob, headers=OCT)


def works(env, sid: str) -> bool:
    r = infer(env, sid)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(env["client"].decrypt(r.content), env["expect"], atol=1e-3)
    return True


def faulty(env, action: str) -> bytes:
    """A valid ciphertext envelope that carries the worker's test-seam marker."""
    header, parts = unpack(env["client"].encrypt(X), "veil-ciphertext")
    meta = {k: v for k, v in header.items() if k not in ("kind", "parts")}
    return pack("veil-ciphertext", parts, {**meta, "note": f"{TOKEN}:{action}"})


def seam_hits(env, worker: int, action: str) -> int:
    log = env["store"] / "logs" / f"he-worker-{worker}.log"
    return log.read_text(errors="replace").count(f"test seam: {action}") if log.exists() else 0


def in_background(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def when_hanging(env, worker: int, send) -> tuple[threading.Thread, dict]:
    """Start ``send()`` (a request that makes ``worker`` hang) and wait until it hangs."""
    before = seam_hits(env, worker, "hang")
    t, out = in_background(send)
    give_up = time.monotonic() + 60
    while seam_hits(env, worker, "hang") == before:
        assert time.monotonic() < give_up and t.is_alive(), out
        time.sleep(0.05)
    return t, out


def error_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_the_service_process_holds_no_openfhe(env):
    maps = Path(f"/proc/{env['server'].proc.pid}/maps").read_text()
    assert "openfhe" not in maps.lower()
    pids = worker_pids(env["server"])
    assert sorted(pids) == [0, 1]
    assert all("openfhe" in Path(f"/proc/{p}/maps").read_text().lower() for p in pids.values())
    assert health(env)["children"] == {"he-worker-0": "ok", "he-worker-1": "ok"}


@pytest.mark.parametrize("sig, status, code", [(signal.SIGKILL, 503, "unavailable"),
                                               (signal.SIGSEGV, 400, "rejected-input")])
def test_a_worker_killed_mid_request_fails_only_that_request(env, sig, status, code):
    wait_healthy(env)
    sid, other = new_session(env, 0), new_session(env, 1)
    assert works(env, sid) and works(env, other)
    old = worker_pids(env["server"])[0]
    t, out = when_hanging(env, 0, lambda: infer(env, sid, faulty(env, "hang")))
    os.kill(old, sig)
    t.join(60)
    assert error_of(out["r"]) == (status, code)
    if sig == signal.SIGKILL:
        assert "HE worker 0" in out["r"].json()["error"]["message"]
    # The same session works again: the replacement reloads its keys from the store.
    assert works(env, sid) and works(env, other)
    assert worker_pids(env["server"])[0] != old
    assert env["server"].proc.poll() is None


@pytest.mark.parametrize("action, status, code", [("segv", 400, "rejected-input"),
                                                  ("abort", 400, "rejected-input"),
                                                  ("exit", 503, "unavailable")])
def test_input_that_crashes_a_worker_is_refused_and_others_keep_working(env, action, status,
                                                                        code):
    wait_healthy(env)
    sid, neighbour, other = new_session(env, 1), new_session(env, 1), new_session(env, 0)
    assert works(env, neighbour) and works(env, other)
    old = worker_pids(env["server"])
    r = infer(env, sid, faulty(env, action))
    assert error_of(r) == (status, code)
    assert works(env, other)                       # the other worker never noticed
    assert worker_pids(env["server"])[0] == old[0]
    assert works(env, sid) and works(env, neighbour)   # reloaded in the replacement
    assert worker_pids(env["server"])[1] != old[1]
    batch = pack("veil-ciphertext-batch", {"0": env["client"].encrypt(X),
                                           "1": faulty(env, action)})
    r = env["http"].post(f"/v1/he/sessions/{sid}/infer-batch", content=batch, headers=OCT)
    assert error_of(r) == (status, code)
    assert env["server"].proc.poll() is None and works(env, sid)


def test_a_key_upload_that_crashes_its_worker_leaves_nothing(env):
    from veil.deploy.keys import EVAL_KEYS_KIND

    wait_healthy(env)
    keys = env["keys"]
    blob = pack(EVAL_KEYS_KIND, keys.parts, {"model": keys.model_id, "tag": keys.tag,
                                             "insecure": True, "note": f"{TOKEN}:segv"})
    sessions = sorted(p.name for p in (env["store"] / "sessions").iterdir())
    codes = set()
    for _ in range(6):     # the new id maps to either worker: both crash and come back
        wait_healthy(env)
        r = env["http"].post("/v1/models/tiny/he/sessions", content=blob, headers=OCT)
        codes.add(error_of(r))
    assert codes == {(400, "rejected-input")}
    assert sorted(p.name for p in (env["store"] / "sessions").iterdir()) == sessions
    assert list((env["store"] / "tmp").iterdir()) == []
    wait_healthy(env)
    assert works(env, new_session(env, 0)) and works(env, new_session(env, 1))


def test_health_reports_a_restarting_worker_until_it_is_back(env):
    wait_healthy(env)
    os.kill(worker_pids(env["server"])[1], signal.SIGKILL)
    seen, give_up = [], time.monotonic() + 60
    while time.monotonic() < give_up:
        h = health(env)
        seen.append((h["status"], h["children"]["he-worker-1"], h["children"]["he-worker-0"]))
        if seen[-1][0] == "ok" and any(h[0] != "ok" for h in seen):
            break
        time.sleep(0.02)
    assert ("degraded", "restarting", "ok") in seen
    assert seen[-1] == ("ok", "ok", "ok")
    assert works(env, new_session(env, 1))


def test_a_stopped_or_slow_worker_is_killed_and_its_request_gets_503(env):
    wait_healthy(env)
    sid = new_session(env, 0)
    assert works(env, sid)
    # SIGSTOP while it computes: noticed within a second or so, not after the timeout.
    t, out = when_hanging(env, 0, lambda: infer(env, sid, faulty(env, "hang")))
    stopped = worker_pids(env["server"])[0]
    start = time.monotonic()
    os.kill(stopped, signal.SIGSTOP)
    t.join(60)
    assert error_of(out["r"]) == (503, "unavailable")
    assert time.monotonic() - start < TIMEOUT - 2
    assert works(env, sid) and worker_pids(env["server"])[0] != stopped
    # A request that outlives --worker-timeout: 503, and the worker is replaced.
    wait_healthy(env)
    slow = worker_pids(env["server"])[0]
    start = time.monotonic()
    r = infer(env, sid, faulty(env, "hang"))
    assert error_of(r) == (503, "unavailable") and time.monotonic() - start >= TIMEOUT
    assert "within 10 s" in r.json()["error"]["message"]
    assert works(env, sid) and worker_pids(env["server"])[0] != slow


def test_a_client_crashing_its_worker_again_and_again_does_not_keep_it_down(env):
    wait_healthy(env)
    sid = new_session(env, 0)
    # Each crash restarts the worker at once (no growing backoff: the input, not the
    # worker, was at fault), so the next request is served, never refused with 503.
    for _ in range(6):
        assert error_of(infer(env, sid, faulty(env, "segv"))) == (400, "rejected-input")
    assert works(env, sid)


def test_a_crash_looping_worker_fails_requests_fast_then_heals(env):
    """Last: it leaves worker 1 with a long backoff."""
    wait_healthy(env)
    sid, other = new_session(env, 1), new_session(env, 0)
    # Repeated deaths while idle back off 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s: then a request
    # for the worker is refused at once instead of waiting for it.
    for _ in range(6):
        wait_healthy(env)
        os.kill(worker_pids(env["server"])[1], signal.SIGKILL)
        give_up = time.monotonic() + 30
        while health(env)["children"]["he-worker-1"] == "ok":
            assert time.monotonic() < give_up
            time.sleep(0.02)
    start = time.monotonic()
    r = infer(env, sid)
    assert error_of(r) == (503, "unavailable")
    assert "HE worker 1" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5          # fast: ~1 s (generous on 2 busy cores)
    assert works(env, other)                      # the other worker is unaffected
    wait_healthy(env)
    assert works(env, sid)


def test_workers_die_with_the_service(env, tmp_path):
    store = tmp_path / "store"
    KeyStore(store).close()
    root = env["store"].parent
    server = ServerProcess([root / "tiny"], store, "--he-workers", "1")
    try:
        pids = list(worker_pids(server).values())
        assert len(pids) == 1
        server.proc.kill()          # no graceful shutdown: the workers must go anyway
        give_up = time.monotonic() + 30
        while not all(_zombie(p) or not Path(f"/proc/{p}").exists() for p in pids):
            assert time.monotonic() < give_up, "a worker outlived the service"
            time.sleep(0.1)
    finally:
        server.stop()

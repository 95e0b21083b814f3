"""`veil serve` with the TEE and MPC modes: a real service process on loopback that starts
its enclave and MPC parties, driven by the SDK; isolation of TEE channels between API
clients; no child process left when the service stops."""
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from veil.model import export_model
from veil.errors import InputError, ReplayError
from veil.ir import interpreter
from veil.frontend import to_graph


def _veil(*args, env=None):
    return subprocess.run([sys.executable, "-m", "veil", *args], check=True,
                          capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester

    d = tmp_path_factory.mktemp("modes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (100, 6))
    info = export_model(model, x, d / "tiny", modes=("tee", "mpc"))
    SoftwareAttester.create(d / "att")
    transport.setup(d / "mpc-keys")
    _veil("tee-policy", str(info.path("tee")), "--attester", str(d / "att"),
          "--allow-insecure", "--out", str(d / "policy.json"))
    alice = _veil("keys", "create", "alice", "--store", str(d / "store")).strip()
    bob = _veil("keys", "create", "bob", "--store", str(d / "store")).strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "serve", str(d / "tiny"), "--store", str(d / "store"),
         "--listen", "127.0.0.1:0", "--tee-attester-key", str(d / "att"),
         "--mpc-keys", str(d / "mpc-keys")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on http://" in line, line
    url = line.split()[-1]
    plain = interpreter.run(to_graph(model, (6,)), x)
    yield {"url": url, "dir": d, "x": x, "plain": plain, "alice": alice, "bob": bob,
           "proc": proc, "policy": d / "policy.json", "mpc_keys": d / "mpc-keys"}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def _client(s, mode, who="alice", **kw):
    from veil.sdk import Client

    opts = {"policy": s["policy"]} if mode == "tee" else {"mpc_keys": s["mpc_keys"]}
    opts.update(kw)
    return Client(s["url"], "tiny", mode, api_key=s[who], key_dir=s["dir"] / f"k-{who}",
                  **opts)


# tee: the enclave runs onnxruntime in float32 (veil/backends/tee/executor.py)
@pytest.mark.parametrize("mode,atol", [("tee", 1e-5), ("mpc", 1e-4)])
def test_sdk_round_trips_through_the_service(served, mode, atol):
    x, plain = served["x"], served["plain"]
    with _client(served, mode) as c:
        np.testing.assert_allclose(c.predict(x[0]), plain[0], atol=atol)
        np.testing.assert_allclose(c.predict(x[:5]), plain[:5], atol=atol)
        ys = c.decrypt(c.infer(c.encrypt(x[7])))                 # the split API
        np.testing.assert_allclose(ys, plain[7], atol=atol)
        np.testing.assert_allclose(c.infer_batch(x), plain, atol=atol)
        with pytest.raises(InputError):
            c.predict(np.full((2, 6), np.nan))
        with pytest.raises(InputError):
            c.predict(np.zeros((2, 5)))


def test_a_tee_channel_belongs_to_the_client_that_opened_it(served):
    import httpx

    with _client(served, "tee") as a:
        request = a.encrypt(served["x"][:2])
        r = httpx.post(f"{served['url']}/v1/models/tiny/tee/infer",
                       content=request.message,
                       headers={"Authorization": f"Bearer {served['bob']}",
                                "Content-Type": "application/octet-stream"})
        assert r.status_code == 404 and r.json()["error"]["code"]
        # alice's own request still works after bob's attempt
        np.testing.assert_allclose(a.decrypt(a.infer(request)), served["plain"][:2],
                                   atol=1e-9)
        with pytest.raises(ReplayError):
            a.decrypt(a.infer(request))      # replaying it is refused (sequence number)


def test_tee_mode_refuses_without_a_policy_and_mpc_without_keys(served):
    from veil.sdk import Client

    for mode in ("tee", "mpc"):
        with pytest.raises(InputError):
            Client(served["url"], "tiny", mode, api_key=served["alice"],
                   key_dir=served["dir"] / "k-x")


def test_children_die_with_a_killed_service(tmp_path):
    """SIGKILL gives the service no chance to clean up: Linux stops its children."""
    from veil.backends.mpc import transport

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    info = export_model(model, np.zeros((4, 3)), tmp_path / "m", modes=("mpc",))
    transport.setup(tmp_path / "keys")
    code = ("import sys, time\n"
            "from veil.deploy.export import read_export\n"
            "from veil.service.processes import Processes\n"
            f"p = Processes({str(tmp_path / 'logs')!r})\n"
            f"p.mpc(read_export({str(info.directory)!r}), {str(tmp_path / 'keys')!r})\n"
            "print('up', flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "up"
    children = psutil.Process(parent.pid).children(recursive=True)
    assert len(children) == 3
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []


def test_party0_is_reached_only_through_the_service(served):
    import httpx

    from veil.backends.sockets import pack_arrays

    auth = {"Authorization": f"Bearer {served['alice']}"}
    info = httpx.get(f"{served['url']}/v1/models/tiny/mpc", headers=auth).json()
    assert "party1" in info and "party0" not in info       # clients never dial party 0
    route = f"{served['url']}/v1/models/tiny/mpc/share"
    oct_ = {"Content-Type": "application/octet-stream"}
    assert httpx.post(route, content=b"x", headers=oct_).status_code == 401
    bad = pack_arrays({"request_id": np.zeros(16, np.uint8),
                       "share": np.zeros((2, 5), np.uint64),          # wrong input shape
                       "frac_bits": np.array([20], np.uint64)})
    r = httpx.post(route, content=bytes(bad), headers={**auth, **oct_})
    assert r.status_code == 422 and r.json()["error"]["code"] == "input"
    r = httpx.post(route, content=b"garbage", headers={**auth, **oct_})
    assert r.status_code == 400


def test_an_unreachable_enclave_or_party_is_a_503(tmp_path):
    """The backends behind the service can be down: that is the service's failure (503
    with the usual error body), never a crash or a 4xx that blames the client."""
    from fastapi.testclient import TestClient

    from veil.backends.mpc import transport
    from veil.backends.sockets import pack_arrays
    from veil.service import KeyStore, ServiceConfig, create_app
    from veil.service.processes import connect_mpc, connect_tee

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    export_model(model, np.zeros((4, 3)), tmp_path / "m", modes=("tee", "mpc"))
    keys = transport.setup(tmp_path / "keys")
    backends = {"m": {"tee": connect_tee("127.0.0.1:9"),
                      "mpc": connect_mpc("127.0.0.1:9", "127.0.0.1:9", keys)}}
    token = KeyStore(tmp_path / "store").create("a")
    app = create_app(ServiceConfig(exports=[tmp_path / "m"], store_dir=tmp_path / "store",
                                   backends=backends))
    body = bytes(pack_arrays({"request_id": np.zeros(16, np.uint8),
                              "share": np.zeros((1, 3), np.uint64),
                              "frac_bits": np.array([20], np.uint64)}))
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as http:
        r = http.get("/v1/models/m/tee", headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        r = http.post("/v1/models/m/mpc/share", content=body,
                      headers={**auth, "Content-Type": "application/octet-stream"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    app.state.veil.close()


def test_stopping_the_service_stops_its_enclave_and_parties(served):
    proc = served["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 4          # enclave, dealer, party 1, party 0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []

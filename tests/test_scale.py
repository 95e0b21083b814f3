"""`veil serve --ray`: the HTTP API on a local Ray cluster (a head node and a second
worker node on loopback, started here and stopped after, nothing left running), HE
sessions and enclaves as Ray Serve replicas, sessions in a throwaway PostgreSQL
store; driven through the SDK."""
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest

from veil.model import export_model

import pg_util
import ray_util
from service_util import tiny_export

why = ray_util.missing() or pg_util.missing()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")
TOKEN = "scale-test-" + os.urandom(6).hex()


def _veil(*args):
    return subprocess.run([sys.executable, "-m", "veil", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout.strip()


def _leftovers(*dirs, width: int = 120) -> list[str]:
    """Processes still running whose command lines name one of ``dirs``: the cluster's
    temporary folder (every Ray process of it), the test's folder (veil serve --ray, the
    enclaves its replicas started)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if any(str(d) in line for d in dirs):
            out.append(f"{p.pid}: {line[:width]}")
    return out


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    from veil.backends.tee import SoftwareAttester
    from veil.service.he_worker import FAULTS_ENV

    d = tmp_path_factory.mktemp("scale")
    model, compiled, calib = tiny_export(d / "tiny", "tiny", modes=("he", "tee"))
    export_model(model, calib, d / "tiny-ew", name="tiny-ew", modes=("he",),
                 compiled=compiled, encrypted_weights=True)
    compiled.server_bundle().save(d / "owner-bundle")     # the model owner's, off the host
    SoftwareAttester.create(d / "att")
    _veil("tee-policy", d / "tiny" / "tee", "--attester", d / "att", "--allow-insecure",
          "--out", d / "policy.json")
    key = _veil("keys", "create", "alice", "--store", d / "store")
    owner = _veil("keys", "create", "owner", "--owner", "tiny-ew", "--store", d / "store")
    with pg_util.postgres_server() as url:
        db = url()
        cluster = ray_util.RayCluster(cpus=1, workers=1)
        try:
            # 2 HE + 2 enclave replicas at half a CPU each fill the two 1-CPU nodes
            server = ray_util.RayServe(
                [d / "tiny", d / "tiny-ew"], d / "store", cluster.address, "--replicas", "2",
                "--replica-cpus", "0.5", "--store-url", db, "--tee-attester-key",
                d / "att", env={FAULTS_ENV: TOKEN})
            try:
                yield {"url": server.url, "key": key, "owner": owner, "dir": d,
                       "calib": calib, "compiled": compiled, "cluster": cluster, "db": db}
            finally:
                server.stop()
        finally:
            cluster.stop()
    assert _leftovers(cluster.dir, d) == []


def _client(s, mode, name="k", model="tiny"):
    from veil.sdk import Client

    opts = ({"policy": s["dir"] / "policy.json"} if mode == "tee"
            else {"allow_insecure": True})
    return Client(s["url"], model, mode, api_key=s["key"], key_dir=s["dir"] / name, **opts)


def _stats(s) -> dict:
    return httpx.get(s["url"] + "/v1/health", timeout=30).json()["stats"]


def test_he_and_tee_requests_through_the_sdk(scaled):
    xs = scaled["calib"][:6]
    sim = scaled["compiled"].run(xs, mode="simulate")
    plain = scaled["compiled"].run(xs, mode="plain")
    with _client(scaled, "he") as he:
        np.testing.assert_allclose(he.predict(xs[0]), sim[0], atol=1e-3)
        np.testing.assert_allclose(he.predict(xs), sim, atol=1e-3)
    deadline = time.monotonic() + 60       # both enclave replicas have announced
    while _stats(scaled)["tee_enclaves_tiny"] < 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert _stats(scaled)["tee_enclaves_tiny"] == 2
    # each enclave stays on its replica's CPUs (half a CPU: one run at a time on one
    # thread), not a run per connection on a thread per core of the machine
    enclaves = [line for line in _leftovers(scaled["dir"] / "tiny" / "tee", width=4000)
                if " tee-serve " in line]
    assert len(enclaves) == 2, enclaves
    assert all("--threads 1 --parallel 1" in line for line in enclaves), enclaves
    tees = [_client(scaled, "tee", f"tee-{i}") for i in range(4)]   # 2 channels each
    try:
        for tee in tees:
            np.testing.assert_allclose(tee.predict(xs[0]), plain[0], atol=1e-5)
        for _ in range(3):       # every message of a channel reaches its enclave
            for tee in tees:
                np.testing.assert_allclose(tee.predict(xs), plain, atol=1e-5)
    finally:
        for tee in tees:
            tee.close()


def test_scale_options_are_checked():
    from veil.errors import InputError
    from veil.service.scale import ScaleOptions

    for options, threads, parallel in ((ScaleOptions("auto", replica_cpus=0.5), 1, 1),
                                       (ScaleOptions("auto", replica_cpus=3), 3, 1),
                                       (ScaleOptions("auto", replica_cpus=4, tee_threads=2),
                                        2, 2),
                                       (ScaleOptions("auto", replica_cpus=1, tee_threads=4),
                                        4, 1)):
        assert (options.enclave_threads, options.enclave_parallel) == (threads, parallel)
    for bad in ({"replicas": 0}, {"he_threads": 0}, {"tee_threads": -1},
                {"replica_cpus": 0}, {"replica_cpus": float("nan")}):
        with pytest.raises(InputError):
            ScaleOptions("auto", **bad)


def test_encrypted_weights_reach_the_replicas(scaled):
    """A model exported with encrypted weights: the owner's upload goes through the
    ingress to the session's replica (validated there with the keys) and into the
    PostgreSQL store, from which any replica loads keys and weights together."""
    from veil.errors import MissingKeyError
    from veil.sdk.owner import ModelOwner

    xs = scaled["calib"][:4]
    with _client(scaled, "he", "ew", "tiny-ew") as c, _client(scaled, "he", "ew-plain") as p:
        with pytest.raises(MissingKeyError):
            c.predict(xs[0])
        with ModelOwner(scaled["url"], scaled["dir"] / "owner-bundle",
                        api_key=scaled["owner"]) as owner:
            owner.upload_weights(c.mode.weights_request())
        out, ref = c.predict(xs), p.predict(xs)
        sid = c.mode.session_id
    assert np.abs(out - ref).max() / np.abs(ref).max() < 2.0 ** -10
    import psycopg

    with psycopg.connect(scaled["db"]) as conn:       # keys and weights in PostgreSQL
        kinds = {k for (k,) in conn.execute(
            "SELECT kind FROM veil_blobs WHERE session = %s", (sid,))}
    assert kinds == {"keys", "weights"}
    assert not (scaled["dir"] / "store" / "sessions").exists() or not any(
        (scaled["dir"] / "store" / "sessions").iterdir())     # nothing in SQLite's place


def test_warm_sessions_never_reload_their_keys(scaled):
    """Three sessions, 8 requests each: the keys load once per session (when the upload
    is validated, on the replica that then serves it), never again."""
    x = scaled["calib"][0]
    clients = [_client(scaled, "he", f"affinity-{i}") for i in range(3)]
    try:
        for c in clients:
            c.predict(x)                   # creates the session: its one key load
        before = _stats(scaled)["he_key_loads"]
        for _ in range(8):
            for c in clients:
                c.predict(x)
        assert _stats(scaled)["he_key_loads"] == before
    finally:
        for c in clients:
            c.close()


def test_a_replica_killed_mid_request_loses_no_session(scaled):
    """A request that kills its replica (the test seam: os._exit mid-request) is sent
    once more and, killing that one too, answered 503; the session survives in the
    store, and once Ray Serve has restarted the replicas it answers again (its keys
    reloaded from PostgreSQL)."""
    from veil.errors import UnavailableError

    x = scaled["calib"][:2]
    sim = scaled["compiled"].run(x, mode="simulate")
    with _client(scaled, "he", "fault") as c:
        c.predict(x[0])
        sid = c.mode.session_id
        retries = _stats(scaled)["he_retries"]
        r = httpx.post(f"{scaled['url']}/v1/he/sessions/{sid}/infer",
                       content=f"{TOKEN}:exit".encode(), timeout=120,
                       headers={"Authorization": f"Bearer {scaled['key']}",
                                "Content-Type": "application/octet-stream"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert _stats(scaled)["he_retries"] == retries + 1
        deadline = time.monotonic() + 120
        while True:
            try:
                out = c.predict(x)
                break
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        np.testing.assert_allclose(out, sim, atol=1e-3)
        assert c.mode.session_id == sid        # the same session, not a new upload


@pytest.mark.slow
def test_a_node_that_joins_takes_load(tmp_path):
    """A one-node cluster cannot place the second 1-CPU HE replica; a node that joins
    while the deployment waits takes it, and new sessions spread over both replicas."""
    import threading

    _, compiled, calib = tiny_export(tmp_path / "tiny", "tiny")
    key = _veil("keys", "create", "alice", "--store", tmp_path / "store")
    cluster = ray_util.RayCluster(cpus=1, workers=0)
    try:
        joined = threading.Timer(15, cluster.add_node)
        joined.start()
        server = ray_util.RayServe([tmp_path / "tiny"], tmp_path / "store", cluster.address,
                                   "--replicas", "2", "--replica-cpus", "1")
        joined.join()
        try:
            s = {"url": server.url, "key": key, "dir": tmp_path}
            clients = [_client(s, "he", f"join-{i}") for i in range(6)]
            threads = [threading.Thread(target=c.predict, args=(calib[0],)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert _stats(s)["he_replicas_seen"] == 2
            sim = compiled.run(calib[:3], mode="simulate")
            for c in clients:
                np.testing.assert_allclose(c.predict(calib[:3]), sim, atol=1e-3)
                c.close()
        finally:
            server.stop()
    finally:
        cluster.stop()
    assert _leftovers(cluster.dir, tmp_path) == []


def test_a_killed_replicas_scratch_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    """A replica killed outright leaves its private folder; the next replica on the
    machine removes those whose process is gone, never a live one's."""
    from veil.service.scale import scratch_dir

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"veil-x-{dead.pid}-abc").mkdir()
    (tmp_path / f"veil-x-{os.getpid()}-live").mkdir()
    mine = scratch_dir("veil-x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, f"veil-x-{os.getpid()}-live"])

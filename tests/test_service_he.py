"""The HE service end to end: a real server process on loopback, driven by the SDK.

Exports use insecure test parameters (ring 4096) so the module runs in seconds.
"""
import socket
import threading
import time

import httpx
import numpy as np
import pytest

import veil
from veil.errors import (AuthError, InputError, InsecureParametersError, KeyMismatchError,
                         NotFoundError)
from veil.service.auth import KeyStore
from veil.wire import pack, unpack

from service_util import ServerProcess, tiny_export

OCT = {"Content-Type": "application/octet-stream"}
# Loaded sessions are ~11.8 MB each here: a budget of about eight makes the concurrency
# test unload and reload sessions while they are in use by other clients.
MEMORY_BUDGET = str(8 * 12_000_000)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    model, compiled, calib = tiny_export(root / "tiny", "tiny", seed=0)
    _, other, _ = tiny_export(root / "tiny2", "tiny2", seed=1)
    store = root / "store"
    keys = KeyStore(store)
    tokens = {name: keys.create(name) for name in ("alice", "bob")}
    server = ServerProcess([root / "tiny", root / "tiny2"], store,
                           "--memory-budget", MEMORY_BUDGET)
    yield {"root": root, "model": model, "compiled": compiled, "calib": calib,
           "other": other, "store": store, "keys": keys, "tokens": tokens, "server": server,
           "url": server.url}
    server.stop()
    assert server.errors() == "", server.errors()
    keys.close()


def sdk(env, who="alice", key_dir=None, model="tiny", **kw):
    kd = key_dir or env["root"] / f"keys-{who}"
    return veil.Client(env["url"], model, api_key=env["tokens"].get(who, who), key_dir=kd,
                       allow_insecure=True, **kw)


def raw(env, who="alice"):
    return httpx.Client(base_url=env["url"], timeout=30,
                        headers={"Authorization": f"Bearer {env['tokens'][who]}"})


def test_predict_matches_simulation_and_plain_argmax(env):
    xs = env["calib"][:40]
    with sdk(env) as client:
        one = client.predict(xs[0])
        batch = client.predict(xs)
    sim = env["compiled"].run(xs, mode="simulate")
    plain = env["compiled"].run(xs, mode="plain")
    np.testing.assert_allclose(one, sim[0], atol=1e-3)
    np.testing.assert_allclose(batch, sim, atol=1e-3)
    top2 = np.sort(plain, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.02      # ties may flip under any approximation
    assert clear.sum() >= 30
    assert np.array_equal(batch[clear].argmax(1), plain[clear].argmax(1))


def test_split_steps_and_batches(env):
    # More inputs than one ciphertext has lanes (256), inside the calibrated range.
    xs = np.random.default_rng(1).uniform(-0.9, 0.9, (300, 4))
    sim = env["compiled"].run(xs, mode="simulate")
    with sdk(env) as client:
        ct = client.encrypt(xs[3])
        result = client.infer(ct)
        assert isinstance(ct, bytes) and isinstance(result, bytes)
        np.testing.assert_allclose(client.decrypt(result), sim[3], atol=1e-3)
        out = client.infer_batch(list(xs))
        assert out.shape == (300, 3)
        np.testing.assert_allclose(out, sim, atol=1e-3)
        with pytest.raises(InputError):
            client.predict(np.zeros((2, 5)))


def test_a_new_client_reuses_keys_and_session(env, tmp_path):
    with sdk(env, key_dir=tmp_path) as first:
        first.predict(env["calib"][0])
        sid, uploads = first.mode.session_id, first.mode.uploads
    assert uploads == 1
    with sdk(env, key_dir=tmp_path) as second:
        second.predict(env["calib"][1])
        assert second.mode.session_id == sid and second.mode.uploads == 0
    secret = next(tmp_path.glob("he/*/keys.veil"))
    assert secret.stat().st_mode & 0o777 == 0o600
    # the evaluation keys sit beside it, streamed from there on upload
    assert (secret.parent / "evaluation.veil").stat().st_mode & 0o777 == 0o600
    assert secret.parent.stat().st_mode & 0o777 == 0o700


def test_a_lost_session_is_recreated_and_old_ciphertexts_still_work(env, tmp_path):
    with sdk(env, key_dir=tmp_path) as client:
        client.predict(env["calib"][0])
        ct = client.encrypt(env["calib"][5])
        with raw(env) as http:
            r = http.delete(f"/v1/he/sessions/{client.mode.session_id}")
            assert r.status_code == 204
        out = client.decrypt(client.infer(ct))     # 404 -> upload the same keys -> retry
        assert client.mode.uploads == 2
        np.testing.assert_allclose(out, env["compiled"].run(env["calib"][5], "simulate"),
                                   atol=1e-3)


def test_clients_cannot_see_or_touch_each_others_sessions(env):
    with sdk(env, "alice") as alice, sdk(env, "bob") as bob:
        alice.predict(env["calib"][0])
        sid = alice.mode.session_id
        ct = alice.encrypt(env["calib"][0])
        with pytest.raises(NotFoundError) as foreign:
            bob._call("POST", f"/v1/he/sessions/{sid}/infer", content=ct, expect="bytes")
        with pytest.raises(NotFoundError) as unknown:
            bob._call("POST", f"/v1/he/sessions/{'0' * 32}/infer", content=ct,
                      expect="bytes")
        assert foreign.value.status == unknown.value.status == 404
        assert str(foreign.value) == str(unknown.value)
        with pytest.raises(NotFoundError):
            bob._call("DELETE", f"/v1/he/sessions/{sid}", expect=None)
        # Bob's own session refuses Alice's ciphertext: it is under other keys.
        bob.predict(env["calib"][0])
        with pytest.raises(KeyMismatchError):
            bob.infer(ct)
        assert alice.infer(ct) and alice.mode.uploads <= 1


def test_missing_invalid_and_revoked_keys_get_401(env):
    r = httpx.get(f"{env['url']}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{env['url']}/v1/health").json()["status"] == "ok"
    with pytest.raises(AuthError):
        veil.Client(env["url"], "tiny", api_key="veil_000000000000_" + "A" * 43,
                    key_dir=env["root"] / "k-x")
    token = env["keys"].create("carol")
    env["tokens"]["carol"] = token
    with sdk(env, "carol") as carol:
        carol.predict(env["calib"][0])
        env["keys"].revoke(token.split("_")[1])
        with pytest.raises(AuthError) as err:
            carol.predict(env["calib"][0])
        assert err.value.status == 401


def test_the_sdk_refuses_insecure_bundles_unless_asked(env):
    with pytest.raises(InsecureParametersError):
        veil.Client(env["url"], "tiny", api_key=env["tokens"]["alice"],
                    key_dir=env["root"] / "k-i")
    local = env["root"] / "tiny" / "he" / "client"
    with veil.Client(env["url"], "tiny", api_key=env["tokens"]["alice"], bundle=local,
                     key_dir=env["root"] / "k-l", allow_insecure=True) as c:
        assert c.predict(env["calib"][0]).shape == (3,)
    with pytest.raises(KeyMismatchError):   # a local bundle of another model
        veil.Client(env["url"], "tiny", api_key=env["tokens"]["alice"], allow_insecure=True,
                    bundle=env["root"] / "tiny2" / "he" / "client", key_dir=env["root"] / "k")


def _sessions_on_disk(env):
    return sorted(p.name for p in (env["store"] / "sessions").iterdir())


def test_bad_requests_get_typed_4xx_and_leave_nothing(env):
    with sdk(env) as alice, sdk(env, model="tiny2") as other, raw(env) as http:
        alice.predict(env["calib"][0])
        sid = alice.mode.session_id
        ct = alice.encrypt(env["calib"][0])
        before = _sessions_on_disk(env)
        header, parts = unpack(ct, "veil-ciphertext")
        flipped = bytearray(ct)
        flipped[-100] ^= 1
        meta = {k: v for k, v in header.items() if k not in ("kind", "parts")}
        # Valid envelopes (digests recomputed) around bytes OpenFHE cannot read.
        forged = [pack("veil-ciphertext", {"ct": body}, meta)
                  for body in (parts["ct"][:len(parts["ct"]) // 2], bytes(64) + parts["ct"][64:],
                               b"\xff" * 1000)]
        infer = f"/v1/he/sessions/{sid}/infer"
        limit = alice.info()["he"]["max_input_bytes"]
        cases = [
            (http.post(infer, content=bytes(flipped), headers=OCT), 400, "malformed"),
            (http.post(infer, content=b"VEIL" + bytes(100), headers=OCT), 400, "malformed"),
            (http.post(infer, content=other.encrypt(env["calib"][0]), headers=OCT),
             409, "key-mismatch"),
            (http.post(infer, content=b"x" * (limit + 1), headers=OCT), 413, "too-large"),
            (http.post(infer, content=ct), 415, "media-type"),
            (http.post(infer, content=b"{not json", headers={"Content-Type":
                                                             "application/json"}),
             415, "media-type"),
            (http.post(f"/v1/he/sessions/{sid}/infer-batch", content=ct, headers=OCT),
             400, "malformed"),
            (http.post(f"/v1/he/sessions/{sid}/infer-batch",
                       content=pack("veil-ciphertext-batch", {"7": ct}), headers=OCT),
             400, "malformed"),
            (http.post("/v1/models/tiny/he/sessions", content=b"", headers=OCT),
             400, "malformed"),
            (http.post("/v1/models/tiny/he/sessions", content=b"junk" * 1000, headers=OCT),
             400, "malformed"),
            (http.post("/v1/models/tiny/he/sessions",
                       content=alice.mode.crypto.secret_key().to_bytes(), headers=OCT),
             400, "key-type"),
            (http.post("/v1/models/tiny/he/sessions", content=_eval_keys(other), headers=OCT),
             409, "key-mismatch"),
            (http.post("/v1/models/nope/he/sessions", content=b"x", headers=OCT),
             404, "not-found"),
            (http.get("/v1/models/nope"), 404, "not-found"),
            (http.get("/v1/nothing"), 404, "not-found"),
            (http.put("/v1/models"), 405, "method-not-allowed"),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["error"]["code"]) == (status, code)
        for blob in forged:
            r = http.post(infer, content=blob, headers=OCT)
            assert r.status_code == 400 and r.json()["error"]["code"] in ("malformed", "engine")
        assert _sessions_on_disk(env) == before
        assert list((env["store"] / "tmp").iterdir()) == []
        assert alice.decrypt(alice.infer(ct)).shape == (3,)   # the session is unharmed


def _eval_keys(client) -> bytes:
    client.mode._ensure_keys()
    return client.mode._evaluation_path().read_bytes()


def test_sessions_survive_a_server_restart(env, tmp_path):
    store = tmp_path / "store"
    token = KeyStore(store).create("dave")
    first = ServerProcess([env["root"] / "tiny"], store)
    port = first.url.rsplit(":", 1)[1]
    try:
        client = veil.Client(first.url, "tiny", api_key=token, key_dir=tmp_path / "keys",
                             allow_insecure=True)
        before = client.predict(env["calib"][0])
        sid = client.mode.session_id
        first.stop(kill=True)          # SIGKILL: no graceful shutdown
        second = ServerProcess([env["root"] / "tiny"], store, "--listen",
                               f"127.0.0.1:{port}")
        assert second.url == first.url
        try:
            after = client.predict(env["calib"][0])
            assert client.mode.session_id == sid and client.mode.uploads == 1
            np.testing.assert_allclose(after, before, atol=1e-3)
            with veil.Client(second.url, "tiny", api_key=token, key_dir=tmp_path / "keys",
                             allow_insecure=True) as fresh:
                fresh.predict(env["calib"][1])
                assert fresh.mode.session_id == sid and fresh.mode.uploads == 0
            client.close()
        finally:
            second.stop()
        assert second.errors() == ""
    finally:
        first.stop()


def test_a_stalled_body_is_refused(env, tmp_path):
    store = tmp_path / "store"
    token = KeyStore(store).create("slow")
    server = ServerProcess([env["root"] / "tiny"], store, "--body-timeout", "1")
    try:
        host, port = server.url[len("http://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/models/tiny/he/sessions HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {token}\r\n"
                         "Content-Type: application/octet-stream\r\n"
                         "Content-Length: 1000\r\n\r\n".encode() + b"x" * 10)
            start = time.monotonic()
            answer = b""
            while b"}}" not in answer and time.monotonic() - start < 20:
                answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400") and b'"malformed"' in answer
        assert list((store / "tmp").iterdir()) == []
    finally:
        server.stop()
    assert server.errors() == ""


def test_32_concurrent_clients(env):
    n, per = 32, 3
    xs = env["calib"][:per]
    expect = env["compiled"].run(xs, mode="simulate")
    tokens = [env["keys"].create(f"c{i}") for i in range(n)]
    results, errors = {}, []

    def work(i):
        try:
            with veil.Client(env["url"], "tiny", api_key=tokens[i], timeout=120,
                             key_dir=env["root"] / f"conc-{i}", allow_insecure=True) as c:
                results[i] = np.stack([c.predict(x) for x in xs])
        except Exception as exc:   # reported by the assertion below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, 240 - (time.monotonic() - start)))
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    assert errors == []
    assert len(results) == n
    for out in results.values():
        np.testing.assert_allclose(out, expect, atol=1e-3)


def test_keys_saved_by_an_earlier_sdk_in_one_envelope_still_upload(env, tmp_path):
    """Before bootstrapped models, the SDK kept the evaluation keys inside keys.veil."""
    with sdk(env, key_dir=tmp_path) as client:
        client.predict(env["calib"][0])
        mode = client.mode
        header, parts = unpack(mode._keys_path().read_bytes(), "veil-sdk-he-keys")
        old = pack("veil-sdk-he-keys", {"secret": parts["secret"],
                                        "evaluation": mode._evaluation_path().read_bytes()},
                   {"model": header["model"], "tag": header["tag"]})
    mode._keys_path().write_bytes(old)
    mode._evaluation_path().unlink()
    (mode._keys_path().parent / "session.json").unlink()
    with sdk(env, key_dir=tmp_path) as again:
        out = again.predict(env["calib"][1])
        assert again.mode.uploads == 1
    np.testing.assert_allclose(out, env["compiled"].run(env["calib"][1:2], mode="simulate")[0],
                               atol=1e-3)

"""Fair resources per client and per mode, timeouts, and the smaller hardening items of
issue 14: each limit answers 429 with Retry-After and leaves other keys alone; compute
slots are per mode and never held while a body arrives; idle half-sent headers are cut;
uploads in progress count against the disk budget; revoking a key deletes its sessions;
insecure exports need --allow-insecure; the OpenAPI schema needs a key; ``veil keys``
takes its options in any order.

Most tests run a real ``veil serve`` process (``python -m veil.service``) and talk to it
with httpx or raw sockets. Time bounds are generous (a loaded 2-core machine).
"""
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest

import veil
from veil.errors import RateLimitError
from veil.service.app import ServiceConfig, ServiceContext
from veil.service.auth import KeyStore
from veil.service.limits import Limiter, Limits, default_limits
from veil.service.store import SQLiteStore

from service_util import ROOT, ServerProcess, tiny_export

OCT = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny HE export and the evaluation keys of one client for it."""
    from veil.deploy import ClientBundle, ModelClient

    root = tmp_path_factory.mktemp("limits")
    model, compiled, calib = tiny_export(root / "tiny", "tiny", seed=0)
    client = ModelClient(ClientBundle.load(root / "tiny" / "he" / "client"))
    client.keygen()
    return {"root": root, "export": root / "tiny", "calib": calib, "client": client,
            "eval_keys": client.evaluation_keys()}


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _addr(url: str) -> tuple[str, int]:
    host, port = url[len("http://"):].rsplit(":", 1)
    return host, int(port)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "veil", *args], capture_output=True,
                         text=True, env=env, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _slow_post(url: str, path: str, token: str, length: int, first: bytes = b"x"):
    """A raw connection that sent a request's headers and ``first`` body bytes of a
    declared ``length``, and then stalls (the caller closes it)."""
    sock = socket.create_connection(_addr(url), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
                 "\r\n".encode() + first)
    return sock


def _answer(sock: socket.socket, limit: float = 60) -> bytes:
    """Whatever the server answers on ``sock`` until it closes or a JSON body ends."""
    sock.settimeout(limit)
    data = b""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
            break
    return data


def _wait_for(predicate, limit: float = 30.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _create_session(url: str, token: str, keys: bytes) -> str:
    r = httpx.post(f"{url}/v1/models/tiny/he/sessions", content=keys,
                   headers={**_auth(token), **OCT}, timeout=120)
    assert r.status_code == 201, r.text
    return r.json()["session"]


def _assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate-limited"


# -- limits without a server ----------------------------------------------------------
def test_limits_for_reads_a_keys_own_limits_over_the_defaults(tmp_path):
    keys = KeyStore(tmp_path)
    kid = keys.verify(keys.create("tee-heavy", {"max_channels": 3}))
    other = keys.verify(keys.create("plain"))
    cfg = ServiceConfig(exports=[], store_dir=tmp_path, disk_budget_bytes=4000,
                        default_limits={"max_channels": 50})
    ctx = ServiceContext(cfg, {}, None, keys)
    assert ctx.limits_for(kid).max_channels == 3
    assert ctx.limits_for(other).max_channels == 50
    assert ctx.limits_for(other).max_key_bytes == 1000
    keys.set_limits(other, {"max_channels": 7})         # the next call sees it
    assert ctx.limits_for(other).max_channels == 7
    keys.close()


def test_token_bucket_and_concurrency_per_client():
    now = [0.0]
    limiter = Limiter(clock=lambda: now[0])
    slow = Limits(rate=2.0, burst=3, max_concurrent=100)
    for _ in range(3):
        limiter.admit("a", slow)
        limiter.release("a")
    with pytest.raises(RateLimitError) as err:
        limiter.admit("a", slow)
    assert 0.4 <= err.value.retry_after <= 0.5       # one token at 2/s
    limiter.admit("b", slow)                          # another key is unaffected
    now[0] += 0.5
    limiter.admit("a", slow)                          # refilled
    two = Limits(max_concurrent=2)
    limiter.admit("c", two)
    limiter.admit("c", two)
    with pytest.raises(RateLimitError):
        limiter.admit("c", two)
    limiter.release("c")
    limiter.admit("c", two)
    assert limiter.active("c") == 2


def test_default_limits_scale_with_the_disk_budget_and_reject_nonsense():
    lim = default_limits(4 << 30, {"rate": 5})
    assert lim.max_key_bytes == 1 << 30 and lim.rate == 5.0 and lim.burst == 100
    assert (lim.max_concurrent, lim.max_sessions, lim.max_uploads, lim.max_channels) == \
        (8, 64, 2, 256)
    from veil.errors import InputError
    for bad in ({"rate": 0}, {"burst": 1.5}, {"nope": 1}, {"max_sessions": "3"},
                {"rate": float("inf")}):
        with pytest.raises(InputError):
            Limits().merged(bad)


def test_key_limits_are_stored_changed_and_old_stores_migrate(tmp_path):
    # A store made before limits existed: the old api_keys table, one key in it.
    old = tmp_path / "old"
    legacy = KeyStore(old)
    token = legacy.create("legacy")
    legacy.close()
    with sqlite3.connect(old / "veil.sqlite3") as db:
        db.execute("ALTER TABLE api_keys DROP COLUMN limits")
    keys = KeyStore(old)
    kid, own = keys.authenticate(token)
    assert own == {}
    assert keys.set_limits(kid, {"rate": 3, "max_channels": 7}) == {"rate": 3.0,
                                                                   "max_channels": 7}
    assert keys.authenticate(token)[1] == {"rate": 3.0, "max_channels": 7}
    assert keys.set_limits(kid, {"burst": 4}, reset=True) == {"burst": 4}
    assert keys.list()[0]["limits"] == {"burst": 4}
    keys.close()


def test_store_quotas_per_owner(tmp_path):
    store = SQLiteStore(tmp_path, disk_budget_bytes=10_000)
    quota = Limits(max_sessions=2, max_key_bytes=1_000, max_uploads=1)

    def put(owner, data=b"k" * 100):
        up = store.begin(5_000, owner, quota)
        up.write(data)
        return store.commit(up, owner=owner, model="m", model_id="i")[0]

    put("alice")
    first = store.begin(5_000, "alice", quota)        # one upload in progress ...
    with pytest.raises(RateLimitError):
        store.begin(5_000, "alice", quota)            # ... is alice's limit
    store.begin(5_000, "bob", quota).abort()          # bob is unaffected
    with pytest.raises(RateLimitError):
        first.write(b"k" * 901)                       # 100 stored + 901 > 1,000 bytes
    assert list(store.tmp_dir.iterdir()) == []        # the partial upload is gone
    put("alice")
    with pytest.raises(RateLimitError):               # two sessions: alice's limit
        store.begin(5_000, "alice", quota)
    assert store.usage("alice") == (2, 200)
    assert len(store.delete_owner("alice")) == 2 and store.usage("alice") == (0, 0)


def test_uploads_in_progress_count_against_the_disk_budget(tmp_path):
    store = SQLiteStore(tmp_path, disk_budget_bytes=1_000, max_uploads_total=3)
    ups = [store.begin(1_000) for _ in range(3)]
    with pytest.raises(RateLimitError):
        store.begin(1_000)                            # three at once for everyone
    ups[0].write(b"a" * 400)
    ups[1].write(b"b" * 400)
    with pytest.raises(RateLimitError):
        ups[2].write(b"c" * 300)                      # 1,100 bytes would be on disk
    assert store.in_progress() == (2, 800)
    assert sum(len(u.data()) for u in ups[:2]) == 800 and len(list(store.tmp_dir.iterdir())) == 2
    rec, _ = store.commit(ups[0], owner="o", model="m", model_id="i")
    ups[1].write(b"b" * 200)                          # 400 stored + 600 arriving: fits
    later = store.begin(1_000)
    later.write(b"d" * 100)                           # the LRU session makes room
    assert [r.id for r in store.records()] == []
    assert store.in_progress() == (2, 700)


def test_mode_slots_are_separate_and_bounded(tmp_path):
    """A full HE slot does not delay TEE; waiting past slot_wait_s is 429."""
    cfg = ServiceConfig(exports=[], store_dir=tmp_path, max_inflight_he=1, slot_wait_s=0.5)
    ctx = ServiceContext(cfg, {}, None, None)

    async def scenario():
        async with ctx.slot("he"):
            start = time.monotonic()
            async with ctx.slot("tee"), ctx.slot("mpc"):
                other = time.monotonic() - start
            with pytest.raises(RateLimitError):
                async with ctx.slot("he"):
                    pass
        async with ctx.slot("he"):          # released: free again
            pass
        return other

    assert asyncio.run(scenario()) < 0.2


def _request(*chunks: bytes):
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)
    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                    "headers": [(b"content-type", b"application/octet-stream")]}, receive)


def test_bodies_held_in_memory_are_bounded_until_their_request_ends(tmp_path):
    cfg = ServiceConfig(exports=[], store_dir=tmp_path, max_buffered_bytes=100)
    ctx = ServiceContext(cfg, {}, None, None)

    async def scenario():
        first = _request(b"a" * 30, b"a" * 30)
        first.state.veil_held = 0                 # as require_client sets it
        assert await ctx.read_body(first, 1000) == b"a" * 60
        with pytest.raises(RateLimitError):       # 60 held + 60 > 100
            await ctx.read_body(_request(b"b" * 30, b"b" * 30), 1000)
        assert ctx._buffered[0] == 60             # the refused body is not counted
        ctx._hold(-first.state.veil_held)         # what require_client does at the end
        assert await ctx.read_body(_request(b"c" * 90), 1000) == b"c" * 90
        assert ctx._buffered[0] == 0              # no require_client: released at once

    asyncio.run(scenario())


# -- a real server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    keys = KeyStore(store)
    tokens = {"honest": keys.create("honest"),
              "slow": keys.create("slow", {"rate": 0.1, "burst": 3}),   # a token per 10 s
              "narrow": keys.create("narrow", {"max_concurrent": 2, "max_uploads": 5}),
              "abuser": keys.create("abuser", {"max_concurrent": 10, "max_uploads": 10}),
              "tiny-disk": keys.create("tiny-disk", {"max_key_bytes": 1000}),
              "one-session": keys.create("one-session", {"max_sessions": 1})}
    srv = ServerProcess([env["export"]], store, "--header-timeout", "1",
                        "--body-timeout", "60", "--max-inflight-he", "1")
    yield {"url": srv.url, "tokens": tokens, "store": store, "keys": keys, "proc": srv}
    srv.stop()
    assert srv.errors() == "", srv.errors()
    keys.close()


def test_insecure_exports_are_announced(server):
    r = httpx.get(f"{server['url']}/v1/health")
    assert r.status_code == 200 and r.json()["insecure"] is True
    r = httpx.get(f"{server['url']}/v1/models", headers=_auth(server["tokens"]["honest"]))
    assert r.json()[0]["insecure"] is True
    assert "INSECURE" in server["proc"].log.read_text()


def test_rate_limit_gives_429_with_retry_after_and_spares_other_keys(server):
    url, tokens = server["url"], server["tokens"]
    with httpx.Client(base_url=url, timeout=30) as http:
        codes = [http.get("/v1/models", headers=_auth(tokens["slow"])).status_code
                 for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        _assert_429(http.get("/v1/models", headers=_auth(tokens["slow"])))
        assert http.get("/v1/models", headers=_auth(tokens["honest"])).status_code == 200


def test_concurrent_request_limit_per_key(server):
    url, tokens = server["url"], server["tokens"]
    socks = [_slow_post(url, "/v1/models/tiny/he/sessions", tokens["narrow"], 10_000)
             for _ in range(2)]
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=30) as http:
            ok = _wait_for(lambda: http.get("/v1/models", headers=_auth(
                tokens["narrow"])).status_code == 429)
            assert ok
            _assert_429(http.get("/v1/models", headers=_auth(tokens["narrow"])))
            assert http.get("/v1/models", headers=_auth(tokens["honest"])).status_code == 200
    finally:
        for s in socks:
            s.close()
    with httpx.Client(base_url=url, timeout=30) as http:   # released when they hang up
        assert _wait_for(lambda: http.get("/v1/models", headers=_auth(
            tokens["narrow"])).status_code == 200)


def test_uploads_in_progress_limit_per_key(server):
    url, tokens = server["url"], server["tokens"]
    socks = [_slow_post(url, "/v1/models/tiny/he/sessions", tokens["honest"], 10_000)
             for _ in range(2)]                        # the default: two at once
    try:
        time.sleep(0.5)

        def third():
            return httpx.post(f"{url}/v1/models/tiny/he/sessions", content=b"x" * 100,
                              headers={**_auth(tokens["honest"]), **OCT}, timeout=30)
        assert _wait_for(lambda: third().status_code == 429)
        _assert_429(third())
        r = httpx.post(f"{url}/v1/models/tiny/he/sessions", content=b"x" * 100,
                       headers={**_auth(tokens["narrow"]), **OCT}, timeout=30)
        assert r.status_code == 400          # another key may upload (junk keys: 400)
    finally:
        for s in socks:
            s.close()


def test_stored_key_bytes_limit(server, env):
    r = httpx.post(f"{server['url']}/v1/models/tiny/he/sessions", content=env["eval_keys"],
                   headers={**_auth(server["tokens"]["tiny-disk"]), **OCT}, timeout=60)
    _assert_429(r)
    assert "bytes of evaluation keys" in r.json()["error"]["message"]
    assert _wait_for(lambda: list((server["store"] / "tmp").iterdir()) == [])
    r = httpx.post(f"{server['url']}/v1/models/tiny/he/sessions", content=b"x" * 2000,
                   headers={**_auth(server["tokens"]["narrow"]), **OCT}, timeout=60)
    assert r.status_code == 400                      # another key: judged on its bytes


def test_sessions_limit(server, env):
    token = server["tokens"]["one-session"]
    _create_session(server["url"], token, env["eval_keys"])
    r = httpx.post(f"{server['url']}/v1/models/tiny/he/sessions", content=env["eval_keys"],
                   headers={**_auth(token), **OCT}, timeout=60)
    _assert_429(r)
    assert "sessions" in r.json()["error"]["message"]
    _create_session(server["url"], server["tokens"]["narrow"], env["eval_keys"])


def test_slow_bodies_do_not_hold_compute_slots(server, env):
    """8 clients trickling infer bodies (1 byte/s) while only one HE slot exists: an
    honest inference still runs (before: the slow bodies held every slot)."""
    url, tokens = server["url"], server["tokens"]
    abusive = _create_session(url, tokens["abuser"], env["eval_keys"])
    path = f"/v1/he/sessions/{abusive}/infer"
    stop = threading.Event()
    socks = [_slow_post(url, path, tokens["abuser"], 4000) for _ in range(8)]

    def trickle():
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(b"x")
                except OSError:
                    pass

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        start = time.monotonic()
        with veil.Client(url, "tiny", api_key=tokens["honest"], timeout=120,
                         key_dir=env["root"] / "honest-keys", allow_insecure=True) as c:
            out = c.predict(env["calib"][0])
        took = time.monotonic() - start
        assert out.shape == (3,)
        assert took < 45, took          # the slow bodies may take up to 60 s
    finally:
        stop.set()
        for s in socks:
            s.close()


def test_incomplete_headers_are_cut_after_the_header_timeout(server):
    host, port = _addr(server["url"])
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"GET /v1/hea")                 # half a request line, then nothing
        start = time.monotonic()
        assert _answer(sock, 30) == b""               # closed without an answer
        took = time.monotonic() - start
    assert 0.5 < took < 15, took
    with socket.create_connection((host, port), timeout=30) as sock:   # silent client
        start = time.monotonic()
        assert _answer(sock, 30) == b""
        assert time.monotonic() - start < 15
    # a complete request on a kept-alive connection is unaffected
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        assert http.get("/v1/health").status_code == 200
        time.sleep(1.5)
        assert http.get("/v1/health").status_code == 200


def test_openapi_and_docs_need_a_key(server):
    url, token = server["url"], server["tokens"]["honest"]
    for path in ("/openapi.json", "/docs"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(url + "/openapi.json", headers=_auth(token))
    assert r.status_code == 200 and "/v1/he/sessions/{session_id}/infer" in r.json()["paths"]
    assert "/openapi.json" not in r.json()["paths"]
    r = httpx.get(url + "/docs", headers=_auth(token))
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text and '"openapi"' in r.text
    assert httpx.get(url + "/redoc", headers=_auth(token)).status_code == 404


def test_revoking_a_key_deletes_its_sessions_and_key_files(server, env):
    url, store = server["url"], server["store"]
    token = server["keys"].create("leaving")
    kid = token.split("_")[1]
    sid = _create_session(url, token, env["eval_keys"])
    assert (store / "sessions" / f"{sid}.keys").exists()
    out = _cli("keys", "revoke", kid, "--store", str(store))
    assert "deleted 1 sessions" in out.stdout
    assert not (store / "sessions" / f"{sid}.keys").exists()
    with sqlite3.connect(store / "veil.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM sessions WHERE owner = ?",
                          (kid,)).fetchone()[0] == 0
    r = httpx.post(f"{url}/v1/he/sessions/{sid}/infer", content=b"x",
                   headers={**_auth(token), **OCT}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=_auth(
        server["tokens"]["honest"])).status_code == 200


def test_five_partial_uploads_cannot_exceed_the_disk_budget(env, tmp_path):
    store = tmp_path / "store"
    keys = KeyStore(store)
    tokens = [keys.create(f"u{i}", {"max_key_bytes": 50 << 20}) for i in range(5)]
    budget = 3_500_000
    srv = ServerProcess([env["export"]], store, "--disk-budget", str(budget),
                        "--body-timeout", "60")
    socks = []
    try:
        chunk = b"x" * 1_100_000
        for token in tokens:
            socks.append(_slow_post(srv.url, "/v1/models/tiny/he/sessions", token,
                                    3_000_000, chunk))
            time.sleep(0.3)
        tmp = store / "tmp"

        def on_disk():
            return sum(p.stat().st_size for p in tmp.iterdir() if p.exists())
        # wait until each upload was either refused or has its bytes on disk
        answers = []
        for s in socks:
            s.settimeout(0.5)
        deadline = time.monotonic() + 30
        refused = set()
        while time.monotonic() < deadline and len(refused) < 2:
            for i, s in enumerate(socks):
                if i in refused:
                    continue
                try:
                    data = s.recv(65536)
                except socket.timeout:
                    continue
                if data:
                    answers.append(data)
                    refused.add(i)
            assert on_disk() <= budget
        assert len(refused) >= 2, answers       # 5 x 1.1 MB cannot fit in 3.5 MB
        assert all(a.startswith(b"HTTP/1.1 429") and b"session storage" in a
                   for a in answers), answers
        assert on_disk() <= budget
        assert len(list(tmp.iterdir())) <= 3
    finally:
        for s in socks:
            s.close()
        srv.stop()
        keys.close()
    assert srv.errors() == "", srv.errors()


def test_serve_refuses_insecure_exports_without_allow_insecure(env, tmp_path):
    out = _cli("serve", str(env["export"]), "--store", str(tmp_path / "s"), "--listen",
               "127.0.0.1:0", check=False)
    assert out.returncode == 1
    assert "--allow-insecure" in out.stderr and "insecure" in out.stderr
    assert "listening" not in out.stdout


# -- the CLI ----------------------------------------------------------------------------
def test_keys_cli_takes_options_in_any_order(tmp_path):
    store = str(tmp_path / "store")
    a = _cli("keys", "create", "--store", store, "alice", "--rate", "5").stdout.strip()
    b = _cli("keys", "create", "bob", "--store", store).stdout.strip()
    c = _cli("keys", "--store", store, "create", "--burst", "7", "--max-sessions", "3",
             "carol", "--max-key-bytes", "1000", "--max-uploads", "1", "--max-concurrent",
             "2", "--max-channels", "9").stdout.strip()
    assert all(t.startswith("veil_") for t in (a, b, c))
    rows = {r["name"]: r for r in map(json.loads, _cli(
        "keys", "list", "--store", store).stdout.splitlines())}
    assert rows["alice"]["limits"] == {"rate": 5.0} and rows["bob"]["limits"] == {}
    assert rows["carol"]["limits"] == {"burst": 7, "max_sessions": 3, "max_key_bytes": 1000,
                                       "max_uploads": 1, "max_concurrent": 2,
                                       "max_channels": 9}
    _cli("keys", "set-limits", "--store", store, "bob", "--max-channels", "4")
    _cli("keys", "set-limits", rows["alice"]["id"], "--reset", "--store", store,
         "--burst", "2")
    rows = {r["name"]: r for r in map(json.loads, _cli(
        "keys", "list", "--store", store).stdout.splitlines())}
    assert rows["bob"]["limits"] == {"max_channels": 4}
    assert rows["alice"]["limits"] == {"burst": 2}
    bad = _cli("keys", "create", "dave", "--store", store, "--rate", "0", check=False)
    assert bad.returncode == 1 and "rate" in bad.stderr
    missing = _cli("keys", "create", "erin", check=False)
    assert missing.returncode == 2 and "--store" in missing.stderr

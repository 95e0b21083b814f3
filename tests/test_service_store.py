"""Session store, loaded-session cache, API keys and the error table, without HTTP."""
import stat
import threading

import numpy as np
import pytest

from veil.errors import (AuthError, InputError, KeyMismatchError, KeyTypeError, NotFoundError,
                         PayloadTooLargeError, PolicyError, RateLimitError, ServiceError,
                         SessionExpiredError, VeilError)
from veil.service.auth import KeyStore, key_id
from veil.service.errors import ERRORS, exception_for, spec_for
from veil.service.sessions import LoadedSessions
from veil.service import pgstore
from veil.service.pgstore import PostgresStore
from veil.service.store import SQLiteStore

import pg_util
from service_util import tiny_export

OWNER, OTHER = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def put(store, data=b"k" * 100, owner=OWNER, model="m"):
    up = store.begin(1 << 20)
    up.write(data)
    return store.commit(up, owner=owner, model=model, model_id="id")


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server (tests/pg_util.py) for this module's store tests."""
    why = pg_util.missing()
    if why:
        pytest.skip(why)
    with pg_util.postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path):
    """``make(name="s", **options)``: a store of the parametrized backend; the same
    ``name`` reopens the same store (a restart). Every test runs against both."""
    made, urls = [], {}
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres")

    def make(name="s", **options):
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / name, **options)
        else:
            if name not in urls:
                urls[name] = postgres()
            store = PostgresStore(urls[name], tmp_path / name, **options)
        made.append(store)
        return store
    make.kind = request.param
    yield make
    for store in made:
        try:
            store.close()
        except Exception:   # closed by the test already
            pass


def files(store):
    """What a store keeps of its sessions and uploads: key files and partial uploads on
    disk (SQLite), rows of blobs and uploads (PostgreSQL) plus its local partial files."""
    local = sorted(p.name for p in store.tmp_dir.iterdir())
    if isinstance(store, SQLiteStore):
        return sorted(p.name for p in store.keys_dir.iterdir()) + local
    blobs = store._query("SELECT session, kind FROM veil_blobs ORDER BY session, kind")
    ups = store._query("SELECT id FROM veil_uploads ORDER BY id")
    return [f"{sid}.{kind}" for sid, kind in blobs] + [f"{u}.part" for (u,) in ups] + local


def test_sessions_are_private_durable_and_owner_only(make_store, tmp_path):
    store = make_store()
    rec, evicted = put(store, b"keys")
    assert evicted == [] and len(rec.id) == 32 and rec.size == 4
    assert store.read_keys(rec.id) == b"keys"
    key_file = store.key_path(rec.id)
    assert key_file.read_bytes() == b"keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    # Another client's id fails exactly like an unknown one.
    with pytest.raises(NotFoundError) as foreign:
        store.get(rec.id, OTHER)
    with pytest.raises(NotFoundError) as unknown:
        store.get("0" * 32, OWNER)
    assert str(foreign.value) == str(unknown.value)
    with pytest.raises(NotFoundError):
        store.delete(rec.id, OTHER)
    store.close()
    again = make_store()     # a restart keeps it
    assert again.get(rec.id, OWNER).model == "m" and again.read_keys(rec.id) == b"keys"
    assert again.key_path(rec.id).read_bytes() == b"keys"
    again.delete(rec.id, OWNER)
    assert files(again) == [] and again.records() == []


def test_ttl_is_sliding_and_expired_sessions_are_deleted(make_store):
    clock = Clock()
    store = make_store(ttl_s=10, clock=clock)
    a, _ = put(store)
    b, _ = put(store)
    clock.t += 8
    assert store.get(a.id, OWNER).expires_at == clock.t + 10   # use renews a, not b
    clock.t += 5
    with pytest.raises(SessionExpiredError):
        store.get(b.id, OWNER)
    assert f"{b.id}.keys" not in files(store)
    clock.t += 20
    assert store.sweep() == [a.id] and files(store) == []


def test_a_busy_session_is_written_once_per_touch_interval(make_store):
    """Uses within touch_every_s (ttl / 20 here) of the recorded one write nothing, so a
    shared database is not written on every request; a session in use never expires."""
    clock = Clock()
    store = make_store(ttl_s=100, clock=clock)
    assert store.touch_every_s == 5
    a, _ = put(store)
    written = clock.t
    clock.t += 4
    rec = store.get(a.id, OWNER)
    assert (rec.last_used, rec.expires_at) == (written, written + 100)
    clock.t += 2
    assert store.get(a.id, OWNER).expires_at == clock.t + 100
    for _ in range(60):                  # 4 s apart for 240 s: alive all along
        clock.t += 4
        assert store.get(a.id, OWNER).expires_at > clock.t + 90
    clock.t += 101
    with pytest.raises(SessionExpiredError):
        store.get(a.id, OWNER)


def test_disk_budget_evicts_least_recently_used(make_store):
    clock = Clock()
    store = make_store(disk_budget_bytes=300, clock=clock)
    ids = []
    step = store.touch_every_s             # uses closer than this are not ordered
    for _ in range(3):
        clock.t += step
        ids.append(put(store)[0].id)
    clock.t += step
    store.get(ids[0], OWNER)                 # 0 is now the most recently used
    clock.t += step
    rec, evicted = put(store, b"x" * 150)
    assert evicted == [ids[1], ids[2]]      # two LRU sessions make room for 150 bytes
    assert {r.id for r in store.records()} == {ids[0], rec.id}
    assert sum(r.size for r in store.records()) <= 300
    with pytest.raises(PayloadTooLargeError):
        put(store, b"x" * 301)              # larger than the whole budget: refused
    assert len(files(store)) == 2          # and nothing of it remains


def test_failed_uploads_leave_nothing(make_store):
    store = make_store()
    up = store.begin(10)
    up.write(b"12345")
    with pytest.raises(PayloadTooLargeError):
        up.write(b"123456")
    assert files(store) == []
    up = store.begin(10)
    up.write(b"abc")
    up.abort()
    assert files(store) == [] and store.records() == []


def test_crash_leftovers_are_cleaned(tmp_path):
    store = SQLiteStore(tmp_path)
    # Leftovers of a crash: a partial upload and a key file without metadata.
    (store.tmp_dir / "dead.part").write_bytes(b"x")
    (store.keys_dir / ("f" * 32 + ".keys")).write_bytes(b"x")
    kept, _ = put(store)
    store.close()
    store = SQLiteStore(tmp_path)
    assert files(store) == [f"{kept.id}.keys"]


def test_a_dead_process_upload_stops_counting_and_is_cleaned(postgres, tmp_path):
    """PostgreSQL: an upload whose process died (its row never updated again) is no
    longer counted after STALE_UPLOAD_S and is removed by the next store to open."""
    url, clock = postgres(), Clock()
    first = PostgresStore(url, tmp_path / "a", disk_budget_bytes=1000, clock=clock)
    up = first.begin(1 << 20)
    up.write(b"x" * 900)                    # a process that then dies mid-upload
    with pytest.raises(RateLimitError):
        put(first, b"y" * 200)              # its reservation still holds the budget
    clock.t += pgstore.STALE_UPLOAD_S + 1
    rec, _ = put(first, b"y" * 200)          # ... until it is stale
    second = PostgresStore(url, tmp_path / "b", clock=clock)   # another process opens it
    assert first.in_progress() == (0, 0) and second.records()[0].id == rec.id
    first.close()
    second.close()


def test_two_processes_share_sessions_and_budget(postgres, tmp_path):
    """PostgreSQL: a session committed by one service process is visible (keys and all)
    to another, uploads in progress count against the one budget, and deleting in one
    removes it for both."""
    url = postgres()
    a = PostgresStore(url, tmp_path / "a", disk_budget_bytes=500)
    b = PostgresStore(url, tmp_path / "b", disk_budget_bytes=500)
    rec, _ = put(a, b"keys-of-a")
    assert b.get(rec.id, OWNER).id == rec.id and b.key_path(rec.id).read_bytes() == b"keys-of-a"
    up = b.begin(1 << 20)
    up.write(b"z" * 400)                    # in progress at b
    with pytest.raises(RateLimitError):
        put(a, b"w" * 200)                   # a sees it: 400 + 200 > 500
    up.abort()
    b.delete(rec.id, OWNER)
    with pytest.raises(NotFoundError):
        a.get(rec.id, OWNER)
    with pytest.raises(NotFoundError):
        a.read_keys(rec.id)
    a.close()
    b.close()


def test_store_is_safe_under_concurrent_use(make_store):
    store = make_store(disk_budget_bytes=100 * 40)
    errors = []

    def work(owner):
        try:
            for _ in range(10):
                rec, _ = put(store, owner=owner)
                assert store.get(rec.id, owner).id == rec.id
                assert store.read_keys(rec.id) == b"k" * 100
                store.delete(rec.id, owner)
        except Exception as exc:   # collected: the assertion below shows them
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"{i:012x}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and store.records() == [] and files(store) == []


def test_api_keys_create_list_revoke_verify(tmp_path):
    keys = KeyStore(tmp_path)
    token = keys.create("alice")
    kid = key_id(token)
    assert token.startswith(f"veil_{kid}_") and len(token) == 5 + 12 + 1 + 43
    assert keys.verify(token) == kid
    assert token not in (tmp_path / "veil.sqlite3").read_bytes().decode("latin-1")
    [entry] = keys.list()
    assert entry["id"] == kid and entry["name"] == "alice" and entry["revoked"] is False
    for bad in (None, "", "veil_x", token[:-1] + ("A" if token[-1] != "A" else "B"),
                f"veil_{'0' * 12}_{token[-43:]}"):
        with pytest.raises(AuthError):
            keys.verify(bad)
    keys.revoke(kid)
    with pytest.raises(AuthError):
        keys.verify(token)
    assert keys.list()[0]["revoked"] is True
    with pytest.raises(NotFoundError):
        keys.revoke("123456789abc")
    with pytest.raises(InputError):
        keys.create("")


def test_keys_written_by_another_process_are_seen_after_this_one_opens_more(tmp_path):
    """The service holds its key store open and opens the session store on the same
    file; `veil keys` in another process then creates and revokes keys. Both must be
    seen at once, every time (opening the file again must not drop this process's
    SQLite locks, after which the other process removed the WAL under the service)."""
    import subprocess
    import sys

    keys = KeyStore(tmp_path)
    first = keys.create("first")
    assert keys.verify(first)
    sessions = SQLiteStore(tmp_path)          # a second connection of this process
    for i in range(3):
        token = subprocess.run([sys.executable, "-m", "veil", "keys", "create", f"k{i}",
                                "--store", str(tmp_path)], check=True, capture_output=True,
                               text=True).stdout.strip()
        assert keys.verify(token) == key_id(token)
    subprocess.run([sys.executable, "-m", "veil", "keys", "revoke", key_id(first),
                    "--store", str(tmp_path)], check=True, capture_output=True)
    assert keys.is_revoked(key_id(first))
    with pytest.raises(AuthError):
        keys.verify(first)
    sessions.close()
    keys.close()


def test_error_table_round_trips_every_code():
    for row in ERRORS:
        exc = exception_for(row.code, "msg", row.status)
        assert spec_for(exc).code == row.code and spec_for(exc).status == row.status
    assert spec_for(KeyTypeError("x")).status == 400
    assert spec_for(KeyMismatchError("x")).status == 409
    assert spec_for(PolicyError("x")).code == "policy"
    assert spec_for(SessionExpiredError("x")).code == "not-found"
    assert spec_for(ValueError("x")).status == 500
    assert type(exception_for("refused", "m")) is VeilError
    assert type(exception_for("from-a-newer-server", "m")) is ServiceError


@pytest.fixture(scope="module")
def he_model(tmp_path_factory):
    from veil.deploy import ClientBundle, ModelClient, ModelServer, ServerBundle

    d = tmp_path_factory.mktemp("export") / "tiny"
    tiny_export(d, "tiny")
    server = ModelServer(ServerBundle.load(d / "he" / "server"))
    clients = [ModelClient(ClientBundle.load(d / "he" / "client")) for _ in range(3)]
    keys = [c.keygen() for c in clients]
    return server, clients, keys


def test_memory_budget_unloads_lru_and_reloads_from_disk(he_model):
    server, clients, keys = he_model
    one = keys[0].size + (1 << 20)
    loaded = LoadedSessions(2 * one + 10, lambda keys, ns: server.open_session(keys, namespace=ns))
    x = np.array([0.1, -0.2, 0.3, 0.4])
    runs = {}
    for i in (0, 1, 2, 0):
        out = loaded.run(f"s{i}", lambda i=i: keys[i], lambda s, i=i: s.run(clients[i].encrypt(x)))
        runs.setdefault(i, []).append(clients[i].decrypt(out))
    # s0 was unloaded for s2, then reloaded (4 loads); never more than two loaded.
    assert loaded.loads == 4 and sorted(loaded.loaded_ids()) == ["s0", "s2"]
    assert loaded.loaded_bytes() <= loaded.budget_bytes
    np.testing.assert_allclose(runs[0][0], runs[0][1], atol=1e-3)
    # The same keys under a second id: the first holder is unloaded, both keep working.
    loaded.run("s0-again", lambda: keys[0], lambda s: None)
    assert "s0" not in loaded.loaded_ids()
    loaded.run("s0", lambda: keys[0], lambda s: s.run(clients[0].encrypt(x)))
    loaded.close()
    assert loaded.loaded_ids() == []


def test_a_loaded_session_is_never_used_by_two_threads(he_model):
    server, clients, keys = he_model
    loaded = LoadedSessions(1 << 40, lambda keys, ns: server.open_session(keys, namespace=ns))
    ct = clients[1].encrypt(np.zeros(4))
    active, peak, lock = [0], [0], threading.Lock()

    def fn(session):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return session.run(ct)
        finally:
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=lambda: loaded.run("s", lambda: keys[1], fn))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] == 1 and loaded.loads == 1
    loaded.close()


def test_revoking_a_key_deletes_its_sessions_in_postgres(postgres, tmp_path):
    """`veil keys revoke --store-url` deletes the key's sessions from the shared store,
    and a PostgresStore never commits an upload for a revoked key."""
    import subprocess
    import sys

    url = postgres()
    keys = KeyStore(tmp_path)
    token = keys.create("alice")
    kid = key_id(token)
    store = PostgresStore(url, tmp_path / "cache", revoked=keys.is_revoked)
    mine, _ = put(store, owner=kid)
    other, _ = put(store, owner=OTHER)
    pending = store.begin(1 << 20, kid)
    pending.write(b"k" * 10)
    out = subprocess.run([sys.executable, "-m", "veil", "keys", "revoke", kid, "--store",
                          str(tmp_path), "--store-url", url], capture_output=True,
                         text=True, check=True).stdout
    assert "deleted 1 sessions" in out
    assert [r.id for r in store.records()] == [other.id]
    with pytest.raises(AuthError):
        store.commit(pending, owner=kid, model="m", model_id="id")
    assert store.in_progress() == (0, 0)
    store.close()
    keys.close()

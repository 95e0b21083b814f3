"""HE sessions in PostgreSQL: one store that several service processes and machines share.

:class:`PostgresStore` is a :class:`~veil.service.store.SessionStore` with the
guarantees of :class:`~veil.service.store.SQLiteStore` (read them there), kept by the
database instead of one process:

* Metadata in ``veil_sessions``; evaluation keys and a model owner's encrypted weights
  as ``bytea`` chunks (8 MiB each, so no row nears bytea's 1 GiB cap) in ``veil_blobs``,
  which cascade with their session.
* Atomic uploads: an upload streams to a private local file (``cache_dir/tmp``), and
  ``commit`` inserts the session row and every chunk in ONE transaction: another
  process sees the whole session or none of it. ``attach_weights`` swaps a session's
  weights in one transaction too.
* Budgets and quotas hold across processes: uploads in progress are rows of
  ``veil_uploads`` (their reserved bytes), and every check-then-act (admitting an
  upload, reserving a chunk, making room, committing) runs under one transaction-scoped
  advisory lock, so two machines cannot both take the last byte of the disk budget.
  An upload whose process died stops counting ``STALE_UPLOAD_S`` after its last chunk.
* Owner isolation, sliding TTL, LRU eviction, ``delete_owner``: as SQLiteStore. API
  keys stay in each service's own key store; ``revoked(owner)`` is asked before a
  commit.
* HE worker processes read keys from files: :meth:`key_path` writes a session's keys
  once into ``cache_dir/cache`` (0600, renamed into place when complete) and reuses
  them; ids are 128 random bits and never reused, so a cached file is never stale, and
  weights carry a version in their file name.

psycopg (3.x) is imported only when a PostgresStore is made: ``pip install 'veil[scale]'``.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import AuthError, NotFoundError, RateLimitError, ServiceError
from .._files import private_dir
from .store import (_ID, NO_SESSION, SessionRecord, SessionStore, Upload, _FileUpload,
                    lru_victims)

CHUNK = 8 << 20
STALE_UPLOAD_S = 3600.0
_LOCK = 0x7665696C          # "veil": the advisory lock of every budget decision
_COLUMNS = "id, owner, model, model_id, created, last_used, expires_at, size"
SCHEMA = """
CREATE TABLE IF NOT EXISTS veil_sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, model_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, last_used DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL, size BIGINT NOT NULL,
    weights_version INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS veil_sessions_last_used ON veil_sessions(last_used, created);
CREATE INDEX IF NOT EXISTS veil_sessions_owner ON veil_sessions(owner);
CREATE TABLE IF NOT EXISTS veil_blobs (
    session TEXT NOT NULL REFERENCES veil_sessions(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, seq INTEGER NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (session, kind, seq));
CREATE TABLE IF NOT EXISTS veil_uploads (
    id TEXT PRIMARY KEY, owner TEXT, reserved BIGINT NOT NULL,
    seen DOUBLE PRECISION NOT NULL)
"""


def _connect(url: str):
    try:
        import psycopg
    except ImportError:
        raise ServiceError("a postgresql:// session store needs psycopg: "
                           "pip install 'veil[scale]'") from None
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as exc:
        # the URL may hold a password: name the failure, not the URL
        raise ServiceError(f"cannot connect to the PostgreSQL session store: "
                           f"{str(exc).splitlines()[0][:200]}") from None


class PostgresStore(SessionStore):
    """Sessions in the PostgreSQL database at ``url`` (``postgresql://...``).

    Args:
        url: libpq connection string.
        cache_dir: this process's private folder for uploads in progress and key files
            handed to HE workers.
        ttl_s, disk_budget_bytes, max_uploads_total, clock: as
            :class:`~veil.service.store.SQLiteStore` (the budget is the database's,
            shared by every process using it).
        revoked: ``f(owner) -> bool``, whether an owner's API key is revoked.
        recover: remove this folder's leftovers and uploads whose process died.
    """

    def __init__(self, url: str, cache_dir: str | os.PathLike, *,
                 ttl_s: float = 24 * 3600.0, disk_budget_bytes: int = 8 << 30,
                 max_uploads_total: int = 64, clock: Callable[[], float] = time.time,
                 revoked: Callable[[str], bool] | None = None, recover: bool = True) -> None:
        self.dir = private_dir(cache_dir)
        self.cache_dir = private_dir(self.dir / "cache")
        self.tmp_dir = private_dir(self.dir / "tmp")
        self.ttl_s, self.disk_budget_bytes, self._clock = ttl_s, disk_budget_bytes, clock
        self.max_uploads_total = max_uploads_total
        self.on_drop: list[Callable[[list[str]], None]] = []
        self._revoked = revoked or (lambda owner: False)
        self._mu = threading.Lock()         # one connection, one statement at a time
        self._conn = _connect(url)
        self._uploads: dict[str, _FileUpload] = {}
        with self._tx(locked=True) as cur:
            for stmt in filter(str.strip, SCHEMA.split(";")):
                cur.execute(stmt)
        if recover:
            self._recover()

    # -- database access ------------------------------------------------------------------
    @contextmanager
    def _tx(self, *, locked: bool = False):
        """A transaction (rolled back on any exception); ``locked`` takes the advisory
        lock that serializes budget decisions across every process."""
        with self._mu, self._conn.transaction(), self._conn.cursor() as cur:
            if locked:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            yield cur

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._mu, self._conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def _recover(self) -> None:
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
        for p in self.cache_dir.iterdir():
            p.unlink(missing_ok=True)
        with self._tx(locked=True) as cur:
            cur.execute("DELETE FROM veil_uploads WHERE seen < %s",
                        (self._clock() - STALE_UPLOAD_S,))

    # -- uploads --------------------------------------------------------------------------
    def begin(self, limit: int, owner: str | None = None, quota=None) -> Upload:
        sid = secrets.token_hex(16)
        with self._tx(locked=True) as cur:
            cur.execute("SELECT COUNT(*) FROM veil_uploads WHERE seen >= %s",
                        (self._clock() - STALE_UPLOAD_S,))
            uploads = cur.fetchone()[0]
            mine = sessions = 0
            owned = owner is not None and quota is not None
            if owned:
                cur.execute("SELECT COUNT(*) FROM veil_uploads WHERE owner = %s AND "
                            "seen >= %s", (owner, self._clock() - STALE_UPLOAD_S))
                mine = cur.fetchone()[0]
                sessions = self._usage(cur, owner)[0]
            self._check_admit(uploads, quota if owned else None, mine, sessions)
            cur.execute("INSERT INTO veil_uploads VALUES (%s, %s, 0, %s)",
                        (sid, owner, self._clock()))
        try:
            upload = _FileUpload(self, self.tmp_dir / f"{sid}.part", sid, limit, owner, quota)
        except BaseException:
            self._forget_id(sid)
            raise
        with self._mu:
            self._uploads[sid] = upload
        return upload

    @staticmethod
    def _usage(cur, owner: str) -> tuple[int, int]:
        cur.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM veil_sessions "
                    "WHERE owner = %s", (owner,))
        n, size = cur.fetchone()
        return int(n), int(size)

    def usage(self, owner: str) -> tuple[int, int]:
        """(sessions, bytes of stored keys) of ``owner``."""
        with self._tx() as cur:
            return self._usage(cur, owner)

    def in_progress(self) -> tuple[int, int]:
        """(uploads in progress, their bytes so far), every process together."""
        rows = self._query("SELECT COUNT(*), COALESCE(SUM(reserved), 0) FROM veil_uploads "
                           "WHERE seen >= %s", (self._clock() - STALE_UPLOAD_S,))
        return int(rows[0][0]), int(rows[0][1])

    def _forget(self, upload: _FileUpload) -> None:
        with self._mu:
            self._uploads.pop(upload.id, None)
        self._forget_id(upload.id)

    def _forget_id(self, sid: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM veil_uploads WHERE id = %s", (sid,))

    def _pending(self, cur, but: str | None = None) -> int:
        cur.execute("SELECT COALESCE(SUM(reserved), 0) FROM veil_uploads "
                    "WHERE seen >= %s AND id <> %s",
                    (self._clock() - STALE_UPLOAD_S, but or ""))
        return int(cur.fetchone()[0])

    def _reserve(self, upload: _FileUpload, n: int) -> None:
        """Room for ``n`` more bytes of ``upload`` (see SQLiteStore._reserve)."""
        with self._tx(locked=True) as cur:
            pending = self._pending(cur)
            owner_bytes = None
            if upload.owner is not None and upload.quota is not None:
                cur.execute("SELECT COALESCE(SUM(reserved), 0) FROM veil_uploads "
                            "WHERE owner = %s AND seen >= %s",
                            (upload.owner, self._clock() - STALE_UPLOAD_S))
                mine = int(cur.fetchone()[0])
                owner_bytes = (self._usage(cur, upload.owner)[1], mine)
            self._check_chunk(upload, n, pending, owner_bytes)
            victims = self._make_room(cur, pending + n)
            cur.execute("UPDATE veil_uploads SET reserved = reserved + %s, seen = %s "
                        "WHERE id = %s", (n, self._clock(), upload.id))
            if cur.rowcount != 1:
                raise RateLimitError("this upload stalled and was given up: start again",
                                     retry_after=1.0)
        upload.reserved += n
        upload.evicted += victims
        self._dropped(victims)

    def _make_room(self, cur, size: int) -> list[str]:
        """(under the lock) Delete LRU sessions until ``size`` more bytes fit."""
        cur.execute("SELECT id, size FROM veil_sessions ORDER BY last_used, created")
        victims = lru_victims(cur.fetchall(), size, self.disk_budget_bytes)
        if victims:
            cur.execute("DELETE FROM veil_sessions WHERE id = ANY(%s)", (victims,))
        return victims

    @staticmethod
    def _put_blob(cur, sid: str, kind: str, path: Path) -> None:
        with open(path, "rb") as fh:
            seq = 0
            while chunk := fh.read(CHUNK):
                cur.execute("INSERT INTO veil_blobs VALUES (%s, %s, %s, %s)",
                            (sid, kind, seq, chunk))
                seq += 1

    def commit(self, upload: Upload, *, owner: str, model: str,
               model_id: str) -> tuple[SessionRecord, list[str]]:
        if not isinstance(upload, _FileUpload) or upload._store is not self:
            raise TypeError("commit() takes an upload from this store's begin()")
        try:
            upload.finish()
            if self._revoked(owner):
                raise AuthError("this API key was revoked")
            self._check_whole(upload)
            now = self._clock()
            rec = SessionRecord(upload.id, owner, model, model_id, now, now,
                                now + self.ttl_s, upload.size)
            with self._tx(locked=True) as cur:
                if upload.quota is not None:
                    self._check_sessions(upload.quota, self._usage(cur, owner)[0])
                cur.execute("DELETE FROM veil_uploads WHERE id = %s", (upload.id,))
                evicted = self._make_room(cur, upload.size + self._pending(cur))
                cur.execute(f"INSERT INTO veil_sessions ({_COLUMNS}) VALUES "
                            "(%s, %s, %s, %s, %s, %s, %s, %s)",
                            (rec.id, owner, model, model_id, rec.created, rec.last_used,
                             rec.expires_at, rec.size))
                self._put_blob(cur, rec.id, "keys", upload.path)
            with self._mu:
                self._uploads.pop(upload.id, None)
            os.replace(upload.path, self.key_file(rec.id))  # this process's cached copy
            self._dropped(evicted)
            return rec, upload.evicted + evicted
        except BaseException:
            upload.abort()
            raise

    def attach_weights(self, upload: Upload, session_id: str) -> int:
        """As :meth:`SQLiteStore.attach_weights`: one transaction swaps them."""
        if not isinstance(upload, _FileUpload) or upload._store is not self:
            raise TypeError("attach_weights() takes an upload from this store's begin()")
        try:
            upload.finish()
            with self._tx(locked=True) as cur:
                cur.execute("DELETE FROM veil_uploads WHERE id = %s", (upload.id,))
                cur.execute("SELECT size FROM veil_sessions WHERE id = %s FOR UPDATE",
                            (session_id,))
                row = cur.fetchone()
                if row is None:
                    raise NotFoundError(NO_SESSION)
                cur.execute("SELECT COALESCE(SUM(length(data)), 0) FROM veil_blobs "
                            "WHERE session = %s AND kind = 'weights'", (session_id,))
                size = int(row[0]) - int(cur.fetchone()[0]) + upload.size
                cur.execute("DELETE FROM veil_blobs WHERE session = %s AND kind = 'weights'",
                            (session_id,))
                self._put_blob(cur, session_id, "weights", upload.path)
                cur.execute("UPDATE veil_sessions SET size = %s, weights_version = "
                            "weights_version + 1 WHERE id = %s RETURNING weights_version",
                            (size, session_id))
                version = cur.fetchone()[0]
            with self._mu:
                self._uploads.pop(upload.id, None)
            for old in self.cache_dir.glob(f"{session_id}.*.weights"):
                old.unlink(missing_ok=True)
            os.replace(upload.path, self.cache_dir / f"{session_id}.{version}.weights")
            return size
        except BaseException:
            upload.abort()
            raise

    # -- sessions ---------------------------------------------------------------------------
    def key_file(self, session_id: str) -> Path:
        return self.cache_dir / f"{session_id}.keys"

    def key_path(self, session_id: str) -> Path:
        """A local file with the session's keys (written from the database once)."""
        path = self.key_file(session_id)
        if not path.exists():
            self._materialize(path, self.read_keys(session_id))
        return path

    def weights_path(self, session_id: str) -> Path | None:
        """A local file with the session's encrypted weights, None while it has none."""
        rows = self._query("SELECT weights_version FROM veil_sessions WHERE id = %s",
                           (session_id,))
        if not rows or rows[0][0] == 0:
            return None
        path = self.cache_dir / f"{session_id}.{rows[0][0]}.weights"
        if not path.exists():
            self._materialize(path, self._blob(session_id, "weights"))
        return path

    def _materialize(self, path: Path, data: bytes) -> None:
        tmp = self.tmp_dir / f"{path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def _blob(self, session_id: str, kind: str) -> bytes:
        rows = self._query("SELECT data FROM veil_blobs WHERE session = %s AND kind = %s "
                           "ORDER BY seq", (session_id, kind))
        if not rows:
            raise NotFoundError(NO_SESSION)
        return b"".join(bytes(r[0]) for r in rows)

    def read_keys(self, session_id: str) -> bytes:
        return self._blob(session_id, "keys")

    def find(self, session_id: str) -> SessionRecord:
        rows = self._query("SELECT owner FROM veil_sessions WHERE id = %s", (session_id,)) \
            if isinstance(session_id, str) and _ID.match(session_id) else []
        if not rows:
            raise NotFoundError(NO_SESSION)
        return self._row(session_id, rows[0][0])

    def model_of(self, session_id: str) -> str | None:
        rows = self._query("SELECT model FROM veil_sessions WHERE id = %s", (session_id,))
        return rows[0][0] if rows else None

    def _fetch(self, session_id: str) -> tuple | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM veil_sessions WHERE id = %s",
                           (session_id,))
        return rows[0] if rows else None

    def _touch(self, session_id: str, last_used: float, expires_at: float) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE veil_sessions SET last_used = %s, expires_at = %s "
                        "WHERE id = %s", (last_used, expires_at, session_id))

    def _drop(self, ids: list[str]) -> None:
        if ids:
            with self._tx() as cur:
                cur.execute("DELETE FROM veil_sessions WHERE id = ANY(%s)", (list(ids),))
            self._dropped(ids)

    def _dropped(self, ids: list[str]) -> None:
        """Remove this process's cached files of deleted sessions and tell ``on_drop``."""
        if not ids:
            return
        for sid in ids:
            self.key_file(sid).unlink(missing_ok=True)
            for old in self.cache_dir.glob(f"{sid}.*.weights"):
                old.unlink(missing_ok=True)
        for callback in list(self.on_drop):
            callback(list(ids))

    def delete(self, session_id: str, owner: str) -> None:
        self._drop([self._row(session_id, owner).id])

    def sweep(self) -> list[str]:
        with self._tx() as cur:
            cur.execute("DELETE FROM veil_sessions WHERE expires_at <= %s RETURNING id",
                        (self._clock(),))
            ids = [r[0] for r in cur.fetchall()]
        self._dropped(ids)
        return ids

    def records(self) -> list[SessionRecord]:
        return [SessionRecord(*r) for r in self._query(
            f"SELECT {_COLUMNS} FROM veil_sessions ORDER BY last_used, created")]

    def delete_owner(self, owner: str) -> list[str]:
        with self._tx() as cur:
            cur.execute("DELETE FROM veil_sessions WHERE owner = %s RETURNING id", (owner,))
            ids = [r[0] for r in cur.fetchall()]
        self._dropped(ids)
        return ids

    def close(self) -> None:
        with self._mu:
            uploads = list(self._uploads.values())
        for upload in uploads:
            upload.abort()
        with self._mu:
            self._conn.close()

"""Durable HE sessions: who uploaded which evaluation keys, for which model, until when.

:class:`SessionStore` is the interface the handlers use; :func:`open_store` picks the
backend: :class:`SQLiteStore` (the embedded default: one service process, files on its
disk) or, for a ``postgresql://`` URL, :class:`~veil.service.pgstore.PostgresStore`
(several processes and machines share sessions; same guarantees).

:class:`SQLiteStore` guarantees:

* Session ids are 128 random bits (``secrets``); a session belongs to the client that
  created it, and any lookup by another client fails exactly like an unknown id.
* Evaluation keys live in ``store_dir/sessions/<id>.keys`` (0600). An upload is written
  to ``store_dir/tmp/`` and renamed into place only once it is complete and validated,
  after which its metadata row is inserted: a key file is never half-written, and a
  failed upload leaves nothing. Leftovers of a crash are removed when the store opens.
* Sessions survive restarts (metadata in SQLite, keys on disk).
* Time to live is sliding: a use moves ``expires_at`` to ``now + ttl_s``; an expired
  session is refused and deleted. A session used again within ``touch_every_s``
  (``min(TOUCH_S, ttl_s / 20)``) of its recorded last use is not written again, so a busy
  session costs the store (a database that many processes share) one write per
  ``TOUCH_S``, not one per request: it expires between ``ttl_s - touch_every_s`` and
  ``ttl_s`` after its last use, and least-recently-used order is that coarse too.
* Disk budget: stored sessions plus uploads in progress never exceed it. Each chunk of
  an upload reserves its bytes first: least recently used sessions are deleted to make
  room, and a chunk that cannot fit because uploads in progress alone would pass the
  budget is refused (RateLimitError, 429: it is transient) and its upload deleted. One upload larger
  than the whole budget is refused (413).
* Quotas per owner (``begin(limit, owner, quota)``; ``quota`` has ``max_uploads``,
  ``max_sessions`` and ``max_key_bytes``, e.g. :class:`~veil.service.limits.Limits`):
  uploads in progress, sessions (uploads in progress count) and bytes of stored keys
  plus uploads; and at most ``max_uploads_total`` uploads in progress for everyone.
  Over any of them: RateLimitError (429), nothing kept.
* A session is never committed for an owner whose API key is revoked (AuthError), and
  :meth:`SQLiteStore.delete_owner` deletes all of an owner's sessions (``veil keys
  revoke`` calls it, on the store of a running service: ``recover=False``).
* Encrypted weights (a model exported with ``--encrypted-weights``): the model owner's
  upload for a session lives in ``store_dir/sessions/<id>.weights`` (0600), written
  like keys (``begin``, validated, then :meth:`SQLiteStore.attach_weights` renames it
  into place and adds its size to the session's, so it counts against the disk budget
  and the session owner's key bytes); it goes with its session.
* ``on_drop``: callbacks told the ids of sessions deleted by this store object
  (eviction, expiry, deletion), so a layer that holds loaded sessions can drop them.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import (AuthError, NotFoundError, PayloadTooLargeError, RateLimitError,
                      SessionExpiredError)
from .._files import private_dir
from ._db import Database

_ID = re.compile(r"^[0-9a-f]{32}$")
NO_SESSION = "no such session (it may have expired): create a new one"
TOUCH_S = 10.0      # a busy session's use is written at most this often (see above)


@dataclass(frozen=True)
class SessionRecord:
    id: str
    owner: str
    model: str
    model_id: str
    created: float
    last_used: float
    expires_at: float
    size: int


class Upload(ABC):
    """Evaluation keys being received for a new session (``id`` is already chosen)."""

    id: str
    size: int

    @abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raises PayloadTooLargeError (and aborts) past the limit."""

    @abstractmethod
    def data(self) -> bytes:
        """Everything written so far (for validation before commit)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard the upload; nothing of it remains. Idempotent."""


class SessionStore(ABC):
    """Session metadata and evaluation keys; thread-safe."""

    @abstractmethod
    def begin(self, limit: int, owner: str | None = None, quota=None) -> Upload:
        """Start receiving at most ``limit`` bytes of evaluation keys for ``owner``
        within its ``quota`` (RateLimitError when the owner is at a limit)."""

    @abstractmethod
    def commit(self, upload: Upload, *, owner: str, model: str,
               model_id: str) -> tuple[SessionRecord, list[str]]:
        """Make a validated upload a session; returns it and the ids evicted for room.

        Raises PayloadTooLargeError (and aborts) if it exceeds the whole disk budget."""

    def get(self, session_id: str, owner: str, *, touch: bool = True) -> SessionRecord:
        """The session, its TTL renewed (unless it was within ``touch_every_s``).
        NotFoundError for unknown or foreign ids; SessionExpiredError (a NotFoundError)
        for an expired one, which is deleted."""
        rec = self._row(session_id, owner)
        now = self._clock()
        if not touch or now - rec.last_used < self.touch_every_s:
            return rec
        self._touch(rec.id, now, now + self.ttl_s)
        return replace(rec, last_used=now, expires_at=now + self.ttl_s)

    @property
    def touch_every_s(self) -> float:
        """Uses closer together than this renew the TTL once (see the module notes)."""
        return min(TOUCH_S, self.ttl_s / 20)

    @abstractmethod
    def _touch(self, session_id: str, last_used: float, expires_at: float) -> None:
        """Record a use of the session (its row's last_used and expires_at)."""

    @abstractmethod
    def read_keys(self, session_id: str) -> bytes:
        """The session's evaluation-key bytes (NotFoundError if they are gone)."""

    @abstractmethod
    def delete(self, session_id: str, owner: str) -> None:
        """Delete an own session; NotFoundError like :meth:`get`."""

    @abstractmethod
    def sweep(self) -> list[str]:
        """Delete every expired session; returns their ids."""

    @abstractmethod
    def records(self) -> list[SessionRecord]:
        """All sessions, least recently used first."""

    @abstractmethod
    def delete_owner(self, owner: str) -> list[str]:
        """Delete every session of ``owner`` (a revoked key); returns their ids."""

    @abstractmethod
    def key_path(self, session_id: str) -> Path:
        """A local file holding the session's keys, for an HE worker to load."""

    # -- shared by the backends: one session's row, owner and expiry checked ----------
    def _row(self, session_id: str, owner: str) -> SessionRecord:
        """``owner``'s live session ``session_id`` (NotFoundError otherwise, and
        SessionExpiredError after dropping an expired one)."""
        if not isinstance(session_id, str) or not _ID.match(session_id):
            raise NotFoundError(NO_SESSION)
        row = self._fetch(session_id)
        if row is None or row[1] != owner:
            raise NotFoundError(NO_SESSION)
        rec = SessionRecord(*row)
        if rec.expires_at <= self._clock():
            self._drop([rec.id])
            raise SessionExpiredError(NO_SESSION)
        return rec

    @abstractmethod
    def _fetch(self, session_id: str) -> tuple | None:
        """The session's row, in :class:`SessionRecord`'s field order, or None."""

    @abstractmethod
    def _drop(self, ids: list[str]) -> None:
        """Delete the sessions ``ids`` (rows and files) and tell ``on_drop``."""

    @abstractmethod
    def weights_path(self, session_id: str) -> Path | None:
        """A local file holding the session's encrypted weights; None without any."""

    # -- shared by the backends: budget and quota decisions on the backend's counts ----
    def _check_admit(self, uploads: int, quota=None, mine: int = 0,
                     sessions: int = 0) -> None:
        """RateLimitError unless one more upload fits: ``uploads`` in progress in all,
        and, with an owner's ``quota``, its ``mine`` uploads and ``sessions``."""
        if uploads >= self.max_uploads_total:
            raise RateLimitError(f"this service takes at most {self.max_uploads_total} "
                                 "key uploads at once: retry shortly", retry_after=5.0)
        if quota is None:
            return
        if mine >= quota.max_uploads:
            raise RateLimitError(f"this API key has {mine} key uploads in progress "
                                 f"(its limit is {quota.max_uploads}): finish one first",
                                 retry_after=5.0)
        if sessions + mine >= quota.max_sessions:
            raise RateLimitError(f"this API key has {sessions} sessions (its limit is "
                                 f"{quota.max_sessions}): delete one first", retry_after=60.0)

    def _check_chunk(self, upload: "_FileUpload", n: int, pending: int,
                     owner_bytes: tuple[int, int] | None = None) -> None:
        """Refuse ``n`` more bytes of ``upload`` past its owner's key bytes
        (``owner_bytes``: stored, arriving; None without a quota), past the whole
        budget (413), or while ``pending`` bytes of uploads fill it (429)."""
        if owner_bytes is not None:
            stored, mine = owner_bytes
            if stored + mine + n > upload.quota.max_key_bytes:
                raise RateLimitError(
                    f"this API key may keep {upload.quota.max_key_bytes} bytes of evaluation "
                    f"keys (it has {stored} stored and {mine} arriving): delete a "
                    "session first", retry_after=60.0)
        if upload.size + n > self.disk_budget_bytes:
            raise PayloadTooLargeError(
                f"evaluation keys of over {upload.size + n - 1} bytes exceed this "
                f"service's whole session storage ({self.disk_budget_bytes} bytes)")
        if pending + n > self.disk_budget_bytes:
            # transient (uploads end or are refused), and caused by other clients:
            # a 429 to retry, not a server-side 5xx
            raise RateLimitError("the key uploads in progress fill this service's "
                                 "session storage: retry shortly", retry_after=10.0)

    def _check_whole(self, upload: "_FileUpload") -> None:
        """PayloadTooLargeError when ``upload`` is larger than the whole budget."""
        if upload.size > self.disk_budget_bytes:
            raise PayloadTooLargeError(
                f"evaluation keys of {upload.size} bytes exceed this service's whole "
                f"session storage ({self.disk_budget_bytes} bytes)")

    @staticmethod
    def _check_sessions(quota, sessions: int) -> None:
        """RateLimitError when an owner with ``sessions`` is at its ``quota``'s limit."""
        if sessions >= quota.max_sessions:
            raise RateLimitError(f"this API key has reached its limit of "
                                 f"{quota.max_sessions} sessions: delete one first",
                                 retry_after=60.0)

    def close(self) -> None:
        """Release resources; sessions stay stored."""


class _FileUpload(Upload):
    def __init__(self, store: "SessionStore", path: Path, session_id: str, limit: int,
                 owner: str | None, quota) -> None:
        self.id, self.path, self.limit, self.size = session_id, path, limit, 0
        self.owner, self.quota, self._store = owner, quota, store
        self.evicted: list[str] = []     # sessions deleted to make room for this upload
        self.reserved = 0                # bytes counted against the budgets (>= size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fh = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise NotFoundError("this upload was aborted")
        if self.size + len(chunk) > self.limit:
            self.abort()
            raise PayloadTooLargeError(f"evaluation keys exceed the {self.limit}-byte limit "
                                       "of this server")
        try:
            self._store._reserve(self, len(chunk))
        except BaseException:
            self.abort()
            raise
        self._fh.write(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def data(self) -> bytes:
        if self._fh is not None:
            self._fh.flush()
        return self.path.read_bytes()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)
        self._store._forget(self)


class SQLiteStore(SessionStore):
    """Sessions in ``store_dir``: SQLite metadata (WAL) plus one key file per session.

    Args:
        ttl_s: idle time after which a session expires.
        disk_budget_bytes: most bytes of key files plus uploads in progress; LRU
            sessions make room.
        max_uploads_total: most uploads in progress at once, all owners together.
        clock: time source (a test seam).
        recover: remove leftovers of a crash (partial uploads, orphan files) on open;
            False for a second process (``veil keys revoke``) beside a running service.
    """

    def __init__(self, store_dir: str | os.PathLike, *, ttl_s: float = 24 * 3600.0,
                 disk_budget_bytes: int = 8 << 30, max_uploads_total: int = 64,
                 clock: Callable[[], float] = time.time, recover: bool = True) -> None:
        self.dir = private_dir(store_dir)
        self.keys_dir = private_dir(self.dir / "sessions")
        self.tmp_dir = private_dir(self.dir / "tmp")
        self.ttl_s, self.disk_budget_bytes, self._clock = ttl_s, disk_budget_bytes, clock
        self.max_uploads_total = max_uploads_total
        self.on_drop: list[Callable[[list[str]], None]] = []
        self._db = Database(self.dir)
        self._commit_lock = threading.Lock()      # guards room-making and the uploads
        self._uploads: dict[str, _FileUpload] = {}
        if recover:
            self._recover()

    def key_path(self, session_id: str) -> Path:
        """The file holding the session's keys (what HE workers load)."""
        return self.keys_dir / f"{session_id}.keys"

    def weights_path(self, session_id: str) -> Path | None:
        """The session's encrypted weights file, None while the owner has sent none."""
        path = self.keys_dir / f"{session_id}.weights"
        return path if path.exists() else None

    def _recover(self) -> None:
        """Remove partial uploads, key files without a row and rows without a file."""
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
        ids = {r[0] for r in self._db.query("SELECT id FROM sessions")}
        for p in self.keys_dir.iterdir():
            if p.suffix not in (".keys", ".weights") or p.stem not in ids:
                p.unlink(missing_ok=True)
        for sid in ids:
            if not self.key_path(sid).exists():
                self._drop([sid])

    def begin(self, limit: int, owner: str | None = None, quota=None) -> Upload:
        sid = secrets.token_hex(16)
        with self._commit_lock:
            mine = sessions = 0
            owned = owner is not None and quota is not None
            if owned:
                mine = sum(1 for u in self._uploads.values() if u.owner == owner)
                sessions = self.usage(owner)[0]
            self._check_admit(len(self._uploads), quota if owned else None, mine, sessions)
            upload = _FileUpload(self, self.tmp_dir / f"{sid}.part", sid, limit, owner, quota)
            self._uploads[sid] = upload
        return upload

    def usage(self, owner: str) -> tuple[int, int]:
        """(sessions, bytes of stored keys) of ``owner``."""
        rows = self._db.query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM sessions "
                              "WHERE owner = ?", (owner,))
        return int(rows[0][0]), int(rows[0][1])

    def model_of(self, session_id: str) -> str | None:
        """The model of session ``session_id`` (any owner), None if there is none; for
        the request log and metrics, never for access decisions."""
        rows = self._db.query("SELECT model FROM sessions WHERE id = ?", (session_id,))
        return rows[0][0] if rows else None

    def in_progress(self) -> tuple[int, int]:
        """(uploads in progress, their bytes so far)."""
        with self._commit_lock:
            return len(self._uploads), sum(u.reserved for u in self._uploads.values())

    def _forget(self, upload: "_FileUpload") -> None:
        with self._commit_lock:
            self._uploads.pop(upload.id, None)

    def _reserve(self, upload: "_FileUpload", n: int) -> None:
        """Room for ``n`` more bytes of ``upload``: within its owner's key bytes, and
        within the disk budget with every upload in progress (LRU sessions go)."""
        with self._commit_lock:
            pending = sum(u.reserved for u in self._uploads.values())
            owner_bytes = None
            if upload.owner is not None and upload.quota is not None:
                owner_bytes = (self.usage(upload.owner)[1],
                               sum(u.reserved for u in self._uploads.values()
                                   if u.owner == upload.owner))
            self._check_chunk(upload, n, pending, owner_bytes)
            upload.evicted += self._make_room(pending + n)
            upload.reserved += n

    def commit(self, upload: Upload, *, owner: str, model: str,
               model_id: str) -> tuple[SessionRecord, list[str]]:
        if not isinstance(upload, _FileUpload):
            raise TypeError("commit() takes an upload from this store's begin()")
        try:
            upload.finish()
            self._check_owner(upload, owner)
            self._check_whole(upload)
            now = self._clock()
            rec = SessionRecord(upload.id, owner, model, model_id, now, now,
                                now + self.ttl_s, upload.size)
            with self._commit_lock:
                self._uploads.pop(upload.id, None)    # its bytes now count as stored
                pending = sum(u.reserved for u in self._uploads.values())
                evicted = self._make_room(upload.size + pending)
                path = self.key_path(upload.id)
                os.replace(upload.path, path)
                _fsync_dir(self.keys_dir)
                try:
                    with self._db.transaction() as cur:
                        cur.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                                    (rec.id, owner, model, model_id, rec.created,
                                     rec.last_used, rec.expires_at, rec.size))
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            return rec, upload.evicted + evicted
        except BaseException:
            upload.abort()
            raise

    def attach_weights(self, upload: Upload, session_id: str) -> int:
        """Make a validated upload the encrypted weights of ``session_id`` (replacing
        earlier ones); returns the session's new size. NotFoundError (and the upload
        aborted) if the session went meanwhile."""
        if not isinstance(upload, _FileUpload):
            raise TypeError("attach_weights() takes an upload from this store's begin()")
        try:
            upload.finish()
            with self._commit_lock:
                self._uploads.pop(upload.id, None)
                rows = self._db.query("SELECT size FROM sessions WHERE id = ?",
                                      (session_id,))
                if not rows:
                    raise NotFoundError(NO_SESSION)
                path = self.keys_dir / f"{session_id}.weights"
                old = path.stat().st_size if path.exists() else 0
                size = int(rows[0][0]) - old + upload.size
                with self._db.transaction() as cur:
                    cur.execute("UPDATE sessions SET size = ? WHERE id = ?",
                                (size, session_id))
                os.replace(upload.path, path)
                _fsync_dir(self.keys_dir)
            return size
        except BaseException:
            upload.abort()
            raise

    def find(self, session_id: str) -> SessionRecord:
        """The session ``session_id`` whoever owns it, not renewed: for the model
        owner, who knows the id from the session's client. NotFoundError like
        :meth:`get`."""
        rows = self._db.query("SELECT owner FROM sessions WHERE id = ?", (session_id,)) \
            if isinstance(session_id, str) and _ID.match(session_id) else []
        if not rows:
            raise NotFoundError(NO_SESSION)
        return self._row(session_id, rows[0][0])

    def _check_owner(self, upload: "_FileUpload", owner: str) -> None:
        """Refuse to commit for a revoked API key, or past the owner's session quota."""
        rows = self._db.query("SELECT revoked FROM api_keys WHERE id = ?", (owner,))
        if rows and rows[0][0] is not None:
            raise AuthError("this API key was revoked")
        if upload.quota is not None:
            self._check_sessions(upload.quota, self.usage(owner)[0])

    def _make_room(self, size: int) -> list[str]:
        rows = self._db.query("SELECT id, size FROM sessions ORDER BY last_used, created")
        victims = lru_victims(rows, size, self.disk_budget_bytes)
        self._drop(victims)
        return victims

    def _drop(self, ids: list[str]) -> None:
        """Delete rows first, then files: a crash between leaves only an orphan file,
        which :meth:`_recover` removes."""
        if not ids:
            return
        with self._db.transaction() as cur:
            cur.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
        for sid in ids:
            self.key_path(sid).unlink(missing_ok=True)
            (self.keys_dir / f"{sid}.weights").unlink(missing_ok=True)
        for callback in list(self.on_drop):
            callback(list(ids))

    def _fetch(self, session_id: str) -> tuple | None:
        rows = self._db.query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return rows[0] if rows else None

    def _touch(self, session_id: str, last_used: float, expires_at: float) -> None:
        with self._db.transaction() as cur:
            cur.execute("UPDATE sessions SET last_used = ?, expires_at = ? WHERE id = ?",
                        (last_used, expires_at, session_id))

    def read_keys(self, session_id: str) -> bytes:
        try:
            return self.key_path(session_id).read_bytes()
        except FileNotFoundError:
            self._drop([session_id])
            raise NotFoundError(NO_SESSION) from None

    def delete(self, session_id: str, owner: str) -> None:
        rec = self._row(session_id, owner)
        self._drop([rec.id])

    def sweep(self) -> list[str]:
        ids = [r[0] for r in self._db.query("SELECT id FROM sessions WHERE expires_at <= ?",
                                            (self._clock(),))]
        self._drop(ids)
        return ids

    def records(self) -> list[SessionRecord]:
        return [SessionRecord(*r) for r in self._db.query(
            "SELECT * FROM sessions ORDER BY last_used, created")]

    def delete_owner(self, owner: str) -> list[str]:
        ids = [r[0] for r in self._db.query("SELECT id FROM sessions WHERE owner = ?",
                                            (owner,))]
        self._drop(ids)
        return ids

    def close(self) -> None:
        self._db.close()


def open_store(store_dir: str | os.PathLike, url: str | None = None, *,
               revoked: Callable[[str], bool] | None = None, **options) -> SessionStore:
    """The session store: SQLite in ``store_dir``, or PostgreSQL at ``url``
    (``postgresql://...``, with ``store_dir`` its local cache). ``options``: ``ttl_s``,
    ``disk_budget_bytes``, ``max_uploads_total``, ``recover``. ``revoked(owner)`` tells
    a PostgreSQL store about revoked API keys (SQLite reads them from its own file)."""
    if url is None:
        return SQLiteStore(store_dir, **options)
    if not url.startswith(("postgresql://", "postgres://")):
        from ..errors import InputError

        raise InputError("a session store URL starts with postgresql://")
    from .pgstore import PostgresStore

    return PostgresStore(url, store_dir, revoked=revoked, **options)


def lru_victims(rows: list[tuple[str, int]], size: int, budget: int) -> list[str]:
    """The sessions to delete, least recently used first (``rows``: (id, size) in that
    order), so that ``size`` more bytes fit within ``budget``."""
    total = sum(n for _, n in rows)
    victims = []
    for sid, n in rows:
        if total + size <= budget:
            break
        victims.append(sid)
        total -= n
    return victims


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

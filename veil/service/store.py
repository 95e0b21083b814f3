"""Durable HE sessions: who uploaded which evaluation keys, for which model, until when.

:class:`SessionStore` is the interface the handlers use; another backend (Redis
metadata, S3 key objects) replaces :class:`SQLiteStore` without touching them.

:class:`SQLiteStore` guarantees:

* Session ids are 128 random bits (``secrets``); a session belongs to the client that
  created it, and any lookup by another client fails exactly like an unknown id.
* Evaluation keys live in ``store_dir/sessions/<id>.keys`` (0600). An upload is written
  to ``store_dir/tmp/`` and renamed into place only once it is complete and validated,
  after which its metadata row is inserted: a key file is never half-written, and a
  failed upload leaves nothing. Leftovers of a crash are removed when the store opens.
* Sessions survive restarts (metadata in SQLite, keys on disk).
* Time to live is sliding: each use moves ``expires_at`` to ``now + ttl_s``; an expired
  session is refused and deleted.
* Disk budget: before a new session is committed, least recently used sessions are
  deleted until the new one fits; one larger than the whole budget is refused (413).
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import NotFoundError, PayloadTooLargeError, SessionExpiredError
from .._files import private_dir
from ._db import Database

_ID = re.compile(r"^[0-9a-f]{32}$")
NO_SESSION = "no such session (it may have expired): create a new one"


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
    def begin(self, limit: int) -> Upload:
        """Start receiving at most ``limit`` bytes of evaluation keys."""

    @abstractmethod
    def commit(self, upload: Upload, *, owner: str, model: str,
               model_id: str) -> tuple[SessionRecord, list[str]]:
        """Make a validated upload a session; returns it and the ids evicted for room.

        Raises PayloadTooLargeError (and aborts) if it exceeds the whole disk budget."""

    @abstractmethod
    def get(self, session_id: str, owner: str, *, touch: bool = True) -> SessionRecord:
        """The session, its TTL renewed. NotFoundError for unknown or foreign ids;
        SessionExpiredError (a NotFoundError) for an expired one, which is deleted."""

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

    def close(self) -> None:
        """Release resources; sessions stay stored."""


class _FileUpload(Upload):
    def __init__(self, path: Path, session_id: str, limit: int) -> None:
        self.id, self.path, self.limit, self.size = session_id, path, limit, 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fh = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise NotFoundError("this upload was aborted")
        if self.size + len(chunk) > self.limit:
            self.abort()
            raise PayloadTooLargeError(f"evaluation keys exceed the {self.limit}-byte limit "
                                       "of this server")
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


class SQLiteStore(SessionStore):
    """Sessions in ``store_dir``: SQLite metadata (WAL) plus one key file per session.

    Args:
        ttl_s: idle time after which a session expires.
        disk_budget_bytes: most bytes of key files kept; LRU sessions make room.
        clock: time source (a test seam).
    """

    def __init__(self, store_dir: str | os.PathLike, *, ttl_s: float = 24 * 3600.0,
                 disk_budget_bytes: int = 8 << 30,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = private_dir(store_dir)
        self.keys_dir = private_dir(self.dir / "sessions")
        self.tmp_dir = private_dir(self.dir / "tmp")
        self.ttl_s, self.disk_budget_bytes, self._clock = ttl_s, disk_budget_bytes, clock
        self._db = Database(self.dir)
        self._commit_lock = threading.Lock()
        self._recover()

    def _key_path(self, session_id: str) -> Path:
        return self.keys_dir / f"{session_id}.keys"

    def _recover(self) -> None:
        """Remove partial uploads, key files without a row and rows without a file."""
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
        ids = {r[0] for r in self._db.query("SELECT id FROM sessions")}
        for p in self.keys_dir.iterdir():
            if p.suffix != ".keys" or p.stem not in ids:
                p.unlink(missing_ok=True)
        for sid in ids:
            if not self._key_path(sid).exists():
                self._drop([sid])

    def begin(self, limit: int) -> Upload:
        sid = secrets.token_hex(16)
        return _FileUpload(self.tmp_dir / f"{sid}.part", sid, limit)

    def commit(self, upload: Upload, *, owner: str, model: str,
               model_id: str) -> tuple[SessionRecord, list[str]]:
        if not isinstance(upload, _FileUpload):
            raise TypeError("commit() takes an upload from this store's begin()")
        try:
            upload.finish()
            if upload.size > self.disk_budget_bytes:
                raise PayloadTooLargeError(
                    f"evaluation keys of {upload.size} bytes exceed this server's whole "
                    f"session storage ({self.disk_budget_bytes} bytes)")
            now = self._clock()
            rec = SessionRecord(upload.id, owner, model, model_id, now, now,
                                now + self.ttl_s, upload.size)
            with self._commit_lock:
                evicted = self._make_room(upload.size)
                path = self._key_path(upload.id)
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
            return rec, evicted
        except BaseException:
            upload.abort()
            raise

    def _make_room(self, size: int) -> list[str]:
        rows = self._db.query("SELECT id, size FROM sessions ORDER BY last_used, created")
        total = sum(r[1] for r in rows)
        victims = []
        for sid, n in rows:
            if total + size <= self.disk_budget_bytes:
                break
            victims.append(sid)
            total -= n
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
            self._key_path(sid).unlink(missing_ok=True)

    def _row(self, session_id: str, owner: str) -> SessionRecord:
        if not isinstance(session_id, str) or not _ID.match(session_id):
            raise NotFoundError(NO_SESSION)
        rows = self._db.query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows or rows[0][1] != owner:
            raise NotFoundError(NO_SESSION)
        rec = SessionRecord(*rows[0])
        if rec.expires_at <= self._clock():
            self._drop([rec.id])
            raise SessionExpiredError(NO_SESSION)
        return rec

    def get(self, session_id: str, owner: str, *, touch: bool = True) -> SessionRecord:
        rec = self._row(session_id, owner)
        if not touch:
            return rec
        now = self._clock()
        with self._db.transaction() as cur:
            cur.execute("UPDATE sessions SET last_used = ?, expires_at = ? WHERE id = ?",
                        (now, now + self.ttl_s, rec.id))
        return SessionRecord(rec.id, rec.owner, rec.model, rec.model_id, rec.created, now,
                             now + self.ttl_s, rec.size)

    def read_keys(self, session_id: str) -> bytes:
        try:
            return self._key_path(session_id).read_bytes()
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

    def close(self) -> None:
        self._db.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

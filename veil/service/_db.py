"""The service's SQLite file: one connection per object, guarded by a lock.

``store_dir/veil.sqlite3`` holds session metadata and API-key digests. WAL lets the
``veil keys`` CLI write while a server reads. Every statement runs under the object's
lock, so one connection is shared safely by the threadpool's threads.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager

from .._files import private_dir

DB_NAME = "veil.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, model_id TEXT NOT NULL,
    created REAL NOT NULL, last_used REAL NOT NULL, expires_at REAL NOT NULL,
    size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_last_used ON sessions(last_used);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    created REAL NOT NULL, revoked REAL);
"""


class Database:
    """One SQLite connection with a lock; ``synchronous`` FULL or NORMAL (WAL)."""

    def __init__(self, store_dir: str | os.PathLike, *, synchronous: str = "NORMAL") -> None:
        path = private_dir(store_dir) / DB_NAME
        # Created 0600 (never world-readable) only when it does not exist yet. Opening
        # and closing an existing file here would drop every POSIX lock this process
        # holds on it (close() releases them all), including the SHARED lock of another
        # connection of this process. Another process's last connection would then think
        # it was the last one, checkpoint and remove the WAL, and that connection would go
        # on reading a stale snapshot: keys created or revoked by `veil keys` went unseen.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        with self.transaction() as cur:
            for stmt in filter(str.strip, SCHEMA.split(";")):
                cur.execute(stmt)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

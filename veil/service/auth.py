"""API keys: one per client, checked on every request except health.

A token is ``veil_<12 hex id>_<43-char urlsafe secret>`` (256 random bits from
``secrets``). The store keeps only the id, a name, and SHA-256 of the secret: a fast
hash is the standard choice for high-entropy random tokens (nothing to brute-force),
and digests are compared with :func:`hmac.compare_digest`. The token is shown once,
by :meth:`KeyStore.create`. The client id of an authenticated request is the key id,
so a new key is a new client: it does not see the sessions of a revoked one.
Revocation takes effect on the next request (each check reads the database).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from datetime import datetime, timezone

from ..errors import AuthError, InputError, NotFoundError
from ._db import Database

PREFIX = "veil"
_TOKEN = re.compile(r"^veil_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DUMMY = hashlib.sha256(b"veil: no such key").hexdigest()
INVALID = "invalid or revoked API key: pass a key from `veil keys create` as a Bearer token"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def key_id(token: str) -> str | None:
    """The public id part of a well-formed token (None otherwise); not a check."""
    m = _TOKEN.match(token) if isinstance(token, str) else None
    return m.group(1) if m else None


class KeyStore:
    """API keys in ``store_dir/veil.sqlite3`` (the session store's file)."""

    def __init__(self, store_dir: str | os.PathLike) -> None:
        self._db = Database(store_dir, synchronous="FULL")

    def create(self, name: str) -> str:
        """Make a key named ``name``; returns the token. It is not stored: show it once."""
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InputError("a key name is 1-200 characters")
        secret = secrets.token_urlsafe(32)
        with self._db.transaction() as cur:
            while True:
                kid = secrets.token_hex(6)
                if not cur.execute("SELECT 1 FROM api_keys WHERE id = ?", (kid,)).fetchall():
                    break
            cur.execute("INSERT INTO api_keys VALUES (?,?,?,?,NULL)",
                        (kid, name.strip(), _digest(secret), time.time()))
        return f"{PREFIX}_{kid}_{secret}"

    def list(self) -> list[dict]:
        """``[{id, name, created, revoked}]``: ISO-8601 UTC ``created``, bool ``revoked``."""
        rows = self._db.query("SELECT id, name, created, revoked FROM api_keys ORDER BY created")
        return [{"id": r[0], "name": r[1], "created": _iso(r[2]), "revoked": r[3] is not None}
                for r in rows]

    def revoke(self, key_id: str) -> None:
        """Revoke a key by id (idempotent); NotFoundError for an unknown id."""
        with self._db.transaction() as cur:
            if not cur.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchall():
                raise NotFoundError(f"no API key with id {key_id!r}")
            cur.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                        (time.time(), key_id))

    def verify(self, token: str | None) -> str:
        """The client id of a valid, unrevoked ``token``; AuthError otherwise."""
        m = _TOKEN.match(token) if isinstance(token, str) else None
        if m is None:
            raise AuthError(INVALID)
        kid, secret = m.groups()
        rows = self._db.query("SELECT secret_sha256, revoked FROM api_keys WHERE id = ?", (kid,))
        stored, revoked = rows[0] if rows else (_DUMMY, None)
        # Compare even for unknown ids so timing does not tell which ids exist.
        ok = hmac.compare_digest(stored, _digest(secret))
        if not rows or not ok or revoked is not None:
            raise AuthError(INVALID)
        return kid

    def close(self) -> None:
        self._db.close()

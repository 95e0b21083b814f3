"""API keys: one per client, checked on every request except health.

A token is ``veil_<12 hex id>_<43-char urlsafe secret>`` (256 random bits from
``secrets``). The store keeps only the id, a name, and SHA-256 of the secret: a fast
hash is the standard choice for high-entropy random tokens (nothing to brute-force),
and digests are compared with :func:`hmac.compare_digest`. The token is shown once,
by :meth:`KeyStore.create`. The client id of an authenticated request is the key id,
so a new key is a new client: it does not see the sessions of a revoked one.
Revocation takes effect on the next request (each check reads the database).

Each key may carry its own limits (:mod:`veil.service.limits`): only the values set for
it are stored (JSON in the ``limits`` column, added to older stores when they open), so
the rest follow the service's defaults. :meth:`KeyStore.authenticate` returns them with
the client id in the same database read.

Roles: a key is a *client* key (the default: it creates HE sessions and runs
inference) or a *model owner* key (``create(name, owner_of=[MODEL, ...])``, ``veil keys
create NAME --owner MODEL``), which may additionally upload encrypted weights for the
listed models only (``PUT /v1/he/sessions/{id}/weights``). Scoping owner keys to models
matters: anyone may encrypt weights under a client's public key, so the service must
know which key speaks for a model's owner. The models are JSON in the ``owner_of``
column (added to older stores when they open; NULL for a client key).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import re
import secrets
import time
from datetime import datetime, timezone

from ..errors import AuthError, ForbiddenError, InputError, NotFoundError
from ._db import Database
from .limits import check_limits

PREFIX = "veil"
_TOKEN = re.compile(r"^veil_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DUMMY = hashlib.sha256(b"veil: no such key").hexdigest()
INVALID = "invalid or revoked API key: pass a key from `veil keys create` as a Bearer token"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def _limits(text: str | None) -> dict:
    """A key's stored limits; a damaged entry is ignored (the defaults apply)."""
    if not text:
        return {}
    try:
        return check_limits(json.loads(text))
    except (ValueError, InputError):
        return {}


def _check_models(models) -> list[str]:
    """Model names of an owner key: a list of 1-64 character names, no duplicates."""
    if models is None:
        return []
    if isinstance(models, str) or not all(isinstance(m, str) and 0 < len(m) <= 64
                                          for m in models):
        raise InputError("owner_of is a list of model names")
    return sorted(set(models))


def _models(text: str | None) -> list[str]:
    """A key's stored ``owner_of``; a damaged entry grants nothing."""
    if not text:
        return []
    try:
        return _check_models(json.loads(text))
    except (ValueError, InputError):
        return []


def key_id(token: str) -> str | None:
    """The public id part of a well-formed token (None otherwise); not a check."""
    m = _TOKEN.match(token) if isinstance(token, str) else None
    return m.group(1) if m else None


class KeyStore:
    """API keys in ``store_dir/veil.sqlite3`` (the session store's file)."""

    def __init__(self, store_dir: str | os.PathLike) -> None:
        self._db = Database(store_dir, synchronous="FULL")
        self._migrate()

    def _migrate(self) -> None:
        """Add the ``limits`` and ``owner_of`` columns to a store made before per-key
        limits and roles existed."""
        for column in ("limits", "owner_of"):
            cols = {r[1] for r in self._db.query("PRAGMA table_info(api_keys)")}
            if column in cols:
                continue
            try:
                with self._db.transaction() as cur:
                    cur.execute(f"ALTER TABLE api_keys ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError:     # another process added it meanwhile
                if column not in {r[1] for r in
                                  self._db.query("PRAGMA table_info(api_keys)")}:
                    raise

    def create(self, name: str, limits: dict | None = None, *,
               owner_of: list[str] | None = None) -> str:
        """Make a key named ``name`` with its own ``limits`` (names of
        :class:`~veil.service.limits.Limits`; the others follow the service's defaults);
        returns the token. It is not stored: show it once. ``owner_of``: model names
        this key may upload encrypted weights for (a model owner's key)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InputError("a key name is 1-200 characters")
        own = check_limits(limits or {})
        models = _check_models(owner_of)
        secret = secrets.token_urlsafe(32)
        with self._db.transaction() as cur:
            while True:
                kid = secrets.token_hex(6)
                if not cur.execute("SELECT 1 FROM api_keys WHERE id = ?", (kid,)).fetchall():
                    break
            cur.execute("INSERT INTO api_keys (id, name, secret_sha256, created, revoked, "
                        "limits, owner_of) VALUES (?,?,?,?,NULL,?,?)",
                        (kid, name.strip(), _digest(secret), time.time(),
                         json.dumps(own) if own else None,
                         json.dumps(models) if models else None))
        return f"{PREFIX}_{kid}_{secret}"

    def list(self) -> list[dict]:
        """``[{id, name, created, revoked, limits, owner_of}]``: ISO-8601 UTC ``created``,
        bool ``revoked``, ``limits`` the key's own limits (the others are the defaults),
        ``owner_of`` the models it uploads weights for (empty: a client key)."""
        rows = self._db.query("SELECT id, name, created, revoked, limits, owner_of "
                              "FROM api_keys ORDER BY created")
        return [{"id": r[0], "name": r[1], "created": _iso(r[2]), "revoked": r[3] is not None,
                 "limits": _limits(r[4]), "owner_of": _models(r[5])} for r in rows]

    def resolve(self, ref: str) -> str:
        """The id of the key whose id, or unique name, is ``ref``; NotFoundError else."""
        rows = self._db.query("SELECT id FROM api_keys WHERE id = ? OR name = ?", (ref, ref))
        ids = sorted({r[0] for r in rows})
        if ref in ids:
            return ref
        if len(ids) != 1:
            raise NotFoundError(f"no API key with id {ref!r}" if not ids else
                                f"{len(ids)} API keys are named {ref!r}: give the key id "
                                "(`veil keys list`)")
        return ids[0]

    def set_limits(self, key_id: str, limits: dict, *, reset: bool = False) -> dict:
        """Change a key's own limits (``reset``: forget the old ones first); returns the
        key's own limits now. Takes effect on the key's next request."""
        new = check_limits(limits)
        with self._db.transaction() as cur:
            rows = cur.execute("SELECT limits FROM api_keys WHERE id = ?", (key_id,)).fetchall()
            if not rows:
                raise NotFoundError(f"no API key with id {key_id!r}")
            own = {} if reset else _limits(rows[0][0])
            own.update(new)
            cur.execute("UPDATE api_keys SET limits = ? WHERE id = ?",
                        (json.dumps(own) if own else None, key_id))
        return own

    def revoke(self, key_id: str) -> None:
        """Revoke a key by id (idempotent); NotFoundError for an unknown id."""
        with self._db.transaction() as cur:
            if not cur.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchall():
                raise NotFoundError(f"no API key with id {key_id!r}")
            cur.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                        (time.time(), key_id))

    def verify(self, token: str | None) -> str:
        """The client id of a valid, unrevoked ``token``; AuthError otherwise."""
        return self.authenticate(token)[0]

    def authenticate(self, token: str | None) -> tuple[str, dict]:
        """(client id, the key's own limits) of a valid, unrevoked ``token``; AuthError
        otherwise."""
        m = _TOKEN.match(token) if isinstance(token, str) else None
        if m is None:
            raise AuthError(INVALID)
        kid, secret = m.groups()
        rows = self._db.query("SELECT secret_sha256, revoked, limits FROM api_keys "
                              "WHERE id = ?", (kid,))
        stored, revoked, limits = rows[0] if rows else (_DUMMY, None, None)
        # Compare even for unknown ids so timing does not tell which ids exist.
        ok = hmac.compare_digest(stored, _digest(secret))
        if not rows or not ok or revoked is not None:
            raise AuthError(INVALID)
        return kid, _limits(limits)

    def is_revoked(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that was revoked."""
        rows = self._db.query("SELECT revoked FROM api_keys WHERE id = ?", (key_id,))
        return bool(rows) and rows[0][0] is not None

    def require_owner(self, key_id: str, model: str) -> None:
        """ForbiddenError unless ``key_id`` is a model owner's key for ``model``."""
        rows = self._db.query("SELECT owner_of FROM api_keys WHERE id = ?", (key_id,))
        if not rows or model not in _models(rows[0][0]):
            raise ForbiddenError(f"this API key may not upload weights for model {model!r}: "
                                 f"the model owner uses a key made with `veil keys create "
                                 f"NAME --owner {model}`")

    def limits(self, key_id: str) -> dict:
        """A key's own limits ({} for an unknown key)."""
        rows = self._db.query("SELECT limits FROM api_keys WHERE id = ?", (key_id,))
        return _limits(rows[0][0]) if rows else {}

    def close(self) -> None:
        self._db.close()

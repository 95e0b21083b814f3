"""OpenFHE sessions held in memory, bounded by a byte budget (least recently used out).

A stored session (keys on disk, see :mod:`veil.service.store`) is loaded into a
:class:`~veil.deploy.ServerSession` on first use and stays loaded while it fits the
memory budget; an unloaded one reloads from disk transparently.

The service keeps one of these in each HE worker process (:mod:`veil.service.he_worker`,
with its share of the memory budget), never in the HTTP process; a worker that is
restarted starts empty and reloads its sessions from the store as they are used.

Guarantees:

* One lock per session: a ServerSession is never used by two threads at once.
* OpenFHE's process-wide key maps are guarded by the engine itself (a readers-writer
  lock in ``backends/he/openfhe_native.py``); here one lock makes "is this key set
  loaded already? then load it" a single step.
* OpenFHE allows one loaded key set per tag: loading a session whose keys are already
  loaded under another session id (the same keys uploaded twice) unloads that one.
* Lock order is session lock, then the load lock; other sessions' locks are only ever tried
  without blocking (eviction skips busy sessions), except to take over a tag, whose
  holder never waits for another session lock. No cycle, so no deadlock.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ..deploy.keys import EvaluationKeys
from ..errors import NotFoundError
from .store import NO_SESSION

log = logging.getLogger("veil.service")
T = TypeVar("T")
# Measured: a loaded ServerSession grows the process by 0.93x its serialized evaluation
# keys (6 sessions of a ring-4096 model, 10.8 MB keys each). 1.0x plus a fixed part for
# the context and plaintext caches is the estimate.
MEMORY_FACTOR = 1.0
MEMORY_OVERHEAD = 1 << 20


@dataclass(eq=False)
class _Entry:
    sid: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    session: Any = None
    tag: str | None = None
    size: int = 0


class LoadedSessions:
    """ServerSessions by session id, at most ``budget_bytes`` (estimated) loaded.

    ``opener(keys, namespace)`` makes a ServerSession from EvaluationKeys (under the load
    lock); ``tag_of(keys, namespace)`` is the OpenFHE tag it will load them under (the
    service namespaces tags per API client, so one client cannot claim another's tag).
    """

    def __init__(self, budget_bytes: int, opener: Callable[[EvaluationKeys, str | None], Any],
                 tag_of: Callable[[EvaluationKeys, str | None], str] | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._open = opener
        self._tag_of = tag_of or (lambda keys, namespace: keys.tag)
        self._loading = threading.Lock()
        self._mu = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tags: dict[str, _Entry] = {}
        self.loads = 0   # how many times keys were deserialized (tests and metrics)

    def _entry(self, sid: str) -> _Entry:
        with self._mu:
            entry = self._entries.get(sid)
            if entry is None:
                entry = self._entries[sid] = _Entry(sid)
            self._entries.move_to_end(sid)
            return entry

    def run(self, sid: str, keys: Callable[[], EvaluationKeys],
            fn: Callable[[Any], T], namespace: str | None = None,
            opener: Callable[[EvaluationKeys, str | None], Any] | None = None) -> T:
        """``fn(session)`` with session ``sid`` loaded (from ``keys()`` under
        ``namespace`` if needed, by ``opener`` if given, else the one of the
        constructor: a session with encrypted weights passes one that adds them).

        Raises NotFoundError if ``sid`` is discarded meanwhile."""
        entry = self._entry(sid)
        with entry.lock:
            with self._mu:
                if self._entries.get(sid) is not entry:
                    raise NotFoundError(NO_SESSION)
            if entry.session is None:
                self._load(entry, keys(), namespace, opener or self._open)
            return fn(entry.session)

    def _load(self, entry: _Entry, keys: EvaluationKeys, namespace: str | None,
              opener: Callable[[EvaluationKeys, str | None], Any]) -> None:
        tag = self._tag_of(keys, namespace)
        while True:
            holder = self._tags.get(tag)
            if holder is not None and holder is not entry:
                with holder.lock:   # a loaded holder waits for no other session lock
                    self._close(holder)
                continue
            with self._loading:
                if self._tags.get(tag) not in (None, entry):
                    continue    # another thread loaded these keys meanwhile
                session = opener(keys, namespace)
                with self._mu:
                    entry.session, entry.tag = session, tag
                    entry.size = int(keys.size * MEMORY_FACTOR) + MEMORY_OVERHEAD
                    self._tags[tag] = entry
                    self.loads += 1
                    victims = self._over_budget(entry)
            break
        for victim in victims:
            if victim.lock.acquire(blocking=False):   # busy sessions stay for now
                try:
                    self._close(victim)
                finally:
                    victim.lock.release()

    def _over_budget(self, keep: _Entry) -> list[_Entry]:
        used = sum(e.size for e in self._entries.values() if e.session is not None)
        victims = []
        for e in self._entries.values():
            if used <= self.budget_bytes:
                break
            if e is not keep and e.session is not None:
                victims.append(e)
                used -= e.size
        return victims

    def _close(self, entry: _Entry) -> None:
        """Unload ``entry`` (caller holds its lock); it stays known and reloads on use."""
        if entry.session is None:
            return
        entry.session.close()
        with self._mu:
            if self._tags.get(entry.tag) is entry:
                del self._tags[entry.tag]
            entry.session, entry.tag, entry.size = None, None, 0
        log.debug("unloaded session %s", entry.sid[:8])

    def discard(self, sid: str) -> None:
        """Forget ``sid`` (deleted or expired), closing its ServerSession."""
        with self._mu:
            entry = self._entries.pop(sid, None)
        if entry is not None:
            with entry.lock:
                self._close(entry)

    def loaded_bytes(self) -> int:
        with self._mu:
            return sum(e.size for e in self._entries.values() if e.session is not None)

    def loaded_ids(self) -> list[str]:
        with self._mu:
            return [e.sid for e in self._entries.values() if e.session is not None]

    def close(self) -> None:
        with self._mu:
            sids = list(self._entries)
        for sid in sids:
            self.discard(sid)

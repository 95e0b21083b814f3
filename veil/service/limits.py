"""Fair shares: per-API-key limits, their in-memory accounting, and per-mode slots.

A key's limits (:class:`Limits`) are stored with the key (``KeyStore``; only the values
set for that key, the rest come from ``ServiceConfig.default_limits``) and read on every
request, so ``veil keys set-limits`` takes effect on the next request of a running
service. What each limit bounds, and where it is enforced:

================ =================================================== ==================
limit            bounds                                              enforced by
================ =================================================== ==================
rate, burst      requests per second (token bucket: ``burst``        :class:`Limiter`,
                 tokens, refilled at ``rate`` per second)            every auth'd route
max_concurrent   requests of the key being handled at once           :class:`Limiter`
max_sessions     stored HE sessions (uploads in progress count)      ``SQLiteStore``
max_key_bytes    bytes of stored evaluation keys plus uploads        ``SQLiteStore``
max_uploads      key uploads in progress                             ``SQLiteStore``
max_channels     open TEE channels (``ctx.limits_for(c).max_channels``) the TEE relay
================ =================================================== ==================

Over a limit a request gets :class:`~veil.errors.RateLimitError` (HTTP 429 with
``Retry-After`` and the JSON error body); other keys are unaffected. State is per app
object (no globals) and guarded by a lock, so handlers in the threadpool may use it.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Mapping

from ..errors import InputError, RateLimitError

#: limit name -> (type, smallest allowed value)
_KINDS: dict[str, tuple[type, float]] = {
    "rate": (float, 0.001), "burst": (int, 1), "max_sessions": (int, 0),
    "max_key_bytes": (int, 0), "max_uploads": (int, 0), "max_concurrent": (int, 1),
    "max_channels": (int, 0)}


@dataclass(frozen=True)
class Limits:
    """One API key's limits (see the module docstring); the defaults are the built-ins
    (``max_key_bytes``: a quarter of the default 8 GiB disk budget)."""

    rate: float = 50.0
    burst: int = 100
    max_sessions: int = 64
    max_key_bytes: int = 2 << 30
    max_uploads: int = 2
    max_concurrent: int = 8
    max_channels: int = 256

    def to_dict(self) -> dict:
        return asdict(self)

    def merged(self, overrides: Mapping | None) -> "Limits":
        """These limits with ``overrides`` (checked by :func:`check_limits`) applied."""
        return replace(self, **check_limits(overrides or {}))


NAMES = tuple(f.name for f in fields(Limits))


def check_limits(values: Mapping) -> dict:
    """``values`` as a dict of valid limits: known names, numbers in range; InputError
    otherwise (this checks operator input and what the store holds)."""
    if not isinstance(values, Mapping):
        raise InputError("limits are a mapping of limit name to number")
    out: dict = {}
    for name, value in values.items():
        if name not in _KINDS:
            raise InputError(f"unknown limit {name!r}: the limits are {', '.join(NAMES)}")
        kind, low = _KINDS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"limit {name} is a number, not {value!r}")
        if kind is int and value != int(value):
            raise InputError(f"limit {name} is a whole number, not {value!r}")
        value = kind(value)
        if not math.isfinite(value) or value < low:
            raise InputError(f"limit {name} must be at least {low:g}, not {value!r}")
        out[name] = value
    return out


def default_limits(disk_budget_bytes: int, overrides: Mapping | None = None) -> Limits:
    """The limits of keys without their own: built-ins, ``max_key_bytes`` a quarter of
    the disk budget, then ``overrides`` (``ServiceConfig.default_limits``)."""
    return Limits(max_key_bytes=max(0, int(disk_budget_bytes) // 4)).merged(overrides)


class Limiter:
    """Requests per second and requests at once, per client (thread-safe).

    ``admit(client, limits)`` takes one token and one concurrency unit or raises
    RateLimitError; ``release(client)`` returns the unit. ``clock`` is a test seam."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}     # client -> [tokens, last refill]
        self._active: dict[str, int] = {}

    def admit(self, client: str, limits: Limits) -> None:
        now = self._clock()
        with self._lock:
            active = self._active.get(client, 0)
            if active >= limits.max_concurrent:
                raise RateLimitError(f"this API key already has {active} requests in "
                                     f"progress (its limit is {limits.max_concurrent}): "
                                     "wait for one to finish", retry_after=1.0)
            bucket = self._buckets.setdefault(client, [float(limits.burst), now])
            tokens = min(float(limits.burst), bucket[0] + (now - bucket[1]) * limits.rate)
            bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                raise RateLimitError(f"this API key may make {limits.rate:g} requests per "
                                     f"second (bursts of {limits.burst}): slow down",
                                     retry_after=(1.0 - tokens) / limits.rate)
            bucket[0] = tokens - 1.0
            self._active[client] = active + 1

    def release(self, client: str) -> None:
        with self._lock:
            n = self._active.get(client, 0) - 1
            if n > 0:
                self._active[client] = n
            else:
                self._active.pop(client, None)

    def active(self, client: str) -> int:
        with self._lock:
            return self._active.get(client, 0)

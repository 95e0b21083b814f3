"""What an operator sees of a running service: a structured log and Prometheus metrics.

* **Request log.** :class:`Observe` is an ASGI middleware around the whole app. For
  every HTTP request it writes one JSON line (``time, level, logger, message, model,
  mode, route, method, status, latency_ms, request_id``) through a logging handler, and
  answers with the same id in ``X-Request-ID`` so a client's report can be matched to
  the line. ``route`` is the route's template (``/v1/he/sessions/{session_id}/infer``),
  never the concrete path, and nothing of a request's headers or body is logged: no API
  keys, session ids, ciphertexts or shares. ``veil serve`` sends the log, and the
  warnings and errors of every ``veil`` logger, to ``STORE/logs/service.log``
  (:func:`file_handler`), beside the children's ``<model>-<role>.log`` and
  ``he-worker-<k>.log``.
* **Metrics.** :class:`ServiceMetrics` holds one service's metrics in its own
  ``CollectorRegistry`` (no process-global registry: two apps in one process count
  apart): requests, latency histograms and errors per model, mode and route; 429
  answers (rate, concurrency, session and key-byte quotas, busy slots) per model and
  mode; and, read at scrape time, HE sessions and evaluation-key bytes stored per model,
  and each supervised child's restarts and state (HE workers, enclaves, MPC dealer and
  parties). ``veil serve --metrics-listen HOST:PORT`` exposes them (:func:`serve_metrics`)
  on a listener of their own, off by default: the scrape endpoint has no API key, so it
  belongs on a private interface, never on the service's public one.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: the request fields of a log line, in order (besides time, level, logger, message)
FIELDS = ("model", "mode", "route", "method", "status", "latency_ms", "request_id")
#: seconds; HE requests take from milliseconds (a small MLP) to minutes (ResNet-20)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0)
ACCESS = "veil.service.access"


class JSONLines(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, and the
    :data:`FIELDS` a record carries."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def file_handler(log_dir: str | os.PathLike) -> logging.Handler:
    """A handler appending :class:`JSONLines` to ``log_dir/service.log`` (0600)."""
    path = Path(log_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "service.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)                       # created with our mode; FileHandler reopens it
    handler = logging.FileHandler(path / "service.log", encoding="utf-8")
    handler.setFormatter(JSONLines())
    handler.setLevel(logging.INFO)
    return handler


class ServiceMetrics:
    """The metrics of one service (see the module docstring).

    Args:
        sessions: ``f() -> [(model, key bytes)]``, one per stored HE session (read at
            scrape time; None without the HE mode).
        children: name -> state function of each supervised child (``ctx.children``).
        restarts: name -> ``f() -> restarts so far`` of each supervised child.
    """

    def __init__(self, sessions: Callable[[], list[tuple[str, int]]] | None,
                 children: dict[str, Callable[[], str]],
                 restarts: dict[str, Callable[[], int]]) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "mode", "route")
        self.requests = Counter("veil_requests", "HTTP requests answered", (*labels, "status"),
                                registry=self.registry)
        self.latency = Histogram("veil_request_seconds", "time from a request's start to "
                                 "its answer's end", labels, buckets=BUCKETS,
                                 registry=self.registry)
        self.errors = Counter("veil_request_errors", "requests answered 4xx or 5xx",
                              ("model", "mode", "status"), registry=self.registry)
        self.rejected = Counter("veil_quota_rejections", "requests answered 429 (an API "
                                "key's rate, concurrency, session or key-byte quota, or "
                                "a mode's busy compute slots)", ("model", "mode"),
                                registry=self.registry)
        self._state = _State(sessions, children, restarts)
        self.registry.register(self._state)

    def observe(self, model: str, mode: str, route: str, status: int,
                seconds: float) -> None:
        self.requests.labels(model, mode, route, str(status)).inc()
        self.latency.labels(model, mode, route).observe(seconds)
        if status >= 400:
            self.errors.labels(model, mode, str(status)).inc()
        if status == 429:
            self.rejected.labels(model, mode).inc()


class _State:
    """A collector of what the service holds now: HE sessions and key bytes per model,
    children's restarts and whether each is up."""

    def __init__(self, sessions, children, restarts) -> None:
        self.sessions, self.children, self.restarts = sessions, children, restarts

    def describe(self):
        return []                     # read at scrape time only: nothing to check early

    def collect(self):
        count = GaugeMetricFamily("veil_he_sessions", "HE sessions stored", labels=["model"])
        size = GaugeMetricFamily("veil_he_key_bytes", "bytes of evaluation keys stored",
                                 labels=["model"])
        per_model: dict[str, list[int]] = {}
        for model, nbytes in (self.sessions() if self.sessions else []):
            entry = per_model.setdefault(model, [0, 0])
            entry[0] += 1
            entry[1] += nbytes
        for model, (n, nbytes) in sorted(per_model.items()):
            count.add_metric([model], n)
            size.add_metric([model], nbytes)
        yield count
        yield size
        restarts = CounterMetricFamily("veil_child_restarts", "times a supervised child "
                                       "(HE worker, enclave, MPC dealer or party) was "
                                       "started again", labels=["child"])
        for name, fn in sorted(self.restarts.items()):
            restarts.add_metric([name], fn())
        yield restarts
        up = GaugeMetricFamily("veil_child_up", "1 while a supervised child is ok",
                               labels=["child"])
        for name, fn in sorted(self.children.items()):
            up.add_metric([name], 1.0 if fn() == "ok" else 0.0)
        yield up


def _mode_of(route: str) -> str:
    parts = route.split("/")
    for mode in ("he", "tee", "mpc"):
        if mode in parts:
            return mode
    return "-"


class Observe:
    """ASGI middleware: a request id, one log line and the metrics of every request.

    ``session_model(session_id) -> model or None`` names the model of an HE session's
    routes (their path has no model name)."""

    def __init__(self, app, metrics: ServiceMetrics,
                 session_model: Callable[[str], str | None] | None = None) -> None:
        self.app, self.metrics, self.session_model = app, metrics, session_model
        self.log = logging.getLogger(ACCESS)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        start, status = time.perf_counter(), [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status[0], time.perf_counter() - start, request_id)

    def _record(self, scope, status: int, seconds: float, request_id: str) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        params = scope.get("path_params") or {}
        model = params.get("name")
        if model is None and "session_id" in params and self.session_model is not None:
            try:
                model = self.session_model(params["session_id"])
            except Exception:            # the log line must not fail the request
                model = None
        model, mode = model or "-", _mode_of(route)
        self.metrics.observe(model, mode, route, status, seconds)
        level = logging.ERROR if status >= 500 else logging.INFO
        if self.log.isEnabledFor(level):
            self.log.log(level, "%s %s %d", scope.get("method", "-"), route, status,
                         extra={"model": model, "mode": mode, "route": route,
                                "method": scope.get("method", "-"), "status": status,
                                "latency_ms": round(seconds * 1e3, 3),
                                "request_id": request_id})


def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                  certfile: str | None = None, keyfile: str | None = None):
    """Serve ``registry`` at ``http(s)://host:port/metrics`` in a thread; returns
    ``(server, address)`` (``server.shutdown()`` stops it)."""
    server, _thread = start_http_server(port, host, registry, certfile=certfile,
                                        keyfile=keyfile)
    return server, server.server_address[:2]

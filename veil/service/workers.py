"""Supervised HE worker processes: OpenFHE never runs on client bytes in the HTTP process.

OpenFHE's binary deserializers and evaluator are native code: a ciphertext or key with
the right (wrong) bytes can abort, SIGSEGV or SIGFPE the process that parses it. So the
HTTP process only streams bodies, checks sessions and sizes, and hands the bytes to one
of ``count`` worker processes (``python -m veil.service.he_worker``), each with its own
loaded sessions. :class:`HEWorkers` is the whole interface the routes see::

    header, parts = workers.call(session_id, op, header, parts)

so another pool (for example one on Ray) can replace it without touching the routes.

Protocol (one socketpair per worker, one request at a time): each message is a
length-prefixed frame (``veil.backends.sockets``) holding a ``veil.wire`` envelope, a
JSON header and raw byte parts. A reply carries ``{"ok": true}`` or
``{"error": {"type", "message"}}``, where ``type`` must name a class of the fixed
allow-list :data:`ERROR_TYPES`; the parent raises that class. Nothing is unpickled: a
worker that parsed hostile bytes is not trusted by the HTTP process.

Supervision:

* Affinity: a session id maps to one worker (:func:`worker_index`, a stable hash), so a
  key set is loaded in one process only; a restarted worker reloads its sessions from
  the store on next use.
* A worker that dies fails only the request it was running: killed by SIGSEGV,
  SIGABRT, SIGFPE, SIGBUS or SIGILL while processing client input it is
  :class:`~veil.errors.RejectedInputError` (HTTP 400), otherwise (SIGKILL, out of
  memory, exit) :class:`~veil.errors.UnavailableError` (503, naming the worker).
* One that does not answer within ``timeout_s``, or is stopped (SIGSTOP), is killed;
  its request gets 503.
* Restarts back off (0.1 s doubling to 5 s) while a worker keeps dying before it took
  a request (at start, or idle: something is wrong with it or the machine). One that
  dies *on* a request is restarted after 0.1 s: the request is the likely cause, and a
  client sending crashing inputs must not keep the worker down for everyone else
  (per-key rate limits bound how often it can try). Staying up 30 s also resets it.
  Requests queued for a worker that died go to its replacement; a request for a worker
  that cannot be restarted soon (backing off, or its start failed) fails at once (503).
* Workers are started from their supervisor thread with ``PR_SET_PDEATHSIG``
  (``veil.service.processes``): Linux sends that signal when the *thread* that forked
  the child ends, and these threads live as long as the pool. They also exit when their
  socket closes. ``state(k)`` is what ``/v1/health`` reports as ``he-worker-k``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..backends.sockets import LEN, MAX_FRAME
from ..errors import (BundleError, EngineError, InputError, InsecureParametersError,
                      KeyMismatchError, KeyTypeError, MissingKeyError, NotFoundError,
                      PayloadTooLargeError, RejectedInputError, SerializationError,
                      ServiceError, UnavailableError, VeilError)
from ..wire import pack, unpack
from .processes import _PRCTL, _die_with_parent

log = logging.getLogger("veil.service")

REQUEST_KIND = "veil-he-worker-request"
REPLY_KIND = "veil-he-worker-reply"
# What a worker may report; anything else is a protocol error (500). A subclass is sent
# as its nearest listed ancestor, so new validation errors need no change here.
ERROR_TYPES: dict[str, type[VeilError]] = {c.__name__: c for c in (
    VeilError, SerializationError, RejectedInputError, InputError, KeyTypeError,
    KeyMismatchError, MissingKeyError, NotFoundError, PayloadTooLargeError, EngineError,
    InsecureParametersError, BundleError, ServiceError)}
MAX_MESSAGE = 2000
# Signals of a native fault: the input being processed is the likely cause.
FAULTS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGBUS,
                    signal.SIGILL})
START_TIMEOUT_S = 60.0
FAIL_FAST_S = 1.0        # a request waits at most this long for a restart to begin
RESTART_WAIT_S = 10.0    # ... and this long for a restarting worker to be ready
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
STABLE_S = 30.0          # up this long: the next death starts the backoff over
TICK_S = 0.25            # how often a waiting request checks its worker


def worker_index(session_id: str, count: int) -> int:
    """The worker that serves ``session_id`` among ``count`` (stable across restarts)."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def error_header(exc: BaseException) -> dict:
    """The reply header for ``exc`` (in a worker): its nearest allow-listed class."""
    for cls in type(exc).__mro__:
        if cls.__name__ in ERROR_TYPES and ERROR_TYPES[cls.__name__] is cls:
            return {"error": {"type": cls.__name__, "message": str(exc)[:MAX_MESSAGE]}}
    return {"error": {"type": "ServiceError", "message": "internal error in an HE worker"}}


def raise_error(header: dict, who: str) -> None:
    """Raise the error a reply header carries (in the parent); nothing if it has none."""
    err = header.get("error")
    if err is None:
        if header.get("ok") is not True:
            raise ServiceError(f"{who} sent a malformed reply")
        return
    if not isinstance(err, dict):
        raise ServiceError(f"{who} sent a malformed reply")
    cls, message = ERROR_TYPES.get(err.get("type")), err.get("message")
    if cls is None or not isinstance(message, str):
        raise ServiceError(f"{who} sent an unknown error")
    raise cls(message[:MAX_MESSAGE])


class _Failed(Exception):
    """The worker of a request failed it (died, stopped, timed out); ``why`` says how."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Worker:
    """One worker slot: its current process, its state and its supervisor thread.

    ``phase``: ``starting`` (spawned, loading), ``ok``, ``backoff`` (dead, restart at
    ``retry_at``), ``down`` (its last start failed; retried at ``retry_at``), ``closed``.
    """

    def __init__(self, pool: "HEWorkers", index: int) -> None:
        self.pool, self.index, self.name = pool, index, f"HE worker {index}"
        self.cond = threading.Condition()
        self.phase, self.retry_at, self.backoff, self.up_since = "backoff", 0.0, 0.0, 0.0
        self.took_request = False     # this process got as far as taking a request
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.busy = False
        self.starts = 0                         # successful starts (restarts: all but one)
        self.error: VeilError | None = None     # why the last start failed
        self.forget: set[str] = set()           # sessions to drop with the next request
        self.thread = threading.Thread(target=self._supervise, daemon=True,
                                       name=f"he-worker-{index}")

    # -- supervisor thread ---------------------------------------------------------------
    def _supervise(self) -> None:
        while True:
            with self.cond:
                while self.phase == "ok":
                    self.cond.wait(TICK_S)
                    if self.phase == "ok" and not self.busy:
                        self._check_idle()
                if self.phase == "closed":
                    return
                delay = self.retry_at - time.monotonic()
            if delay > 0 and self.pool._closing.wait(delay):
                return
            with self.cond:
                if self.phase == "closed":
                    return
                self.phase = "starting"
                self.cond.notify_all()
            try:
                proc, sock = self.pool._spawn(self.index)
            except Exception as exc:    # this thread must live on to retry
                if not isinstance(exc, VeilError):
                    exc = UnavailableError(f"{self.name} could not be started: {exc}")
                log.error("%s did not start: %s", self.name, exc)
                with self.cond:
                    if self.phase == "closed":
                        return
                    self.phase, self.error = "down", exc
                    self._schedule_restart()
                continue
            with self.cond:
                if self.phase == "closed":
                    _stop(proc, sock)
                    return
                self.proc, self.sock, self.error = proc, sock, None
                self.phase, self.up_since, self.took_request = "ok", time.monotonic(), False
                self.starts += 1
                self.cond.notify_all()

    def _check_idle(self) -> None:
        """(cond held, idle) Notice a worker that died or was stopped between requests."""
        if self.proc.poll() is not None:
            log.error("%s died while idle (%s)", self.name, _exit_text(self.proc.returncode))
            self._mark_dead()
        elif _stopped(self.proc.pid):
            log.error("%s was stopped; restarting it", self.name)
            self._mark_dead()

    def _schedule_restart(self) -> None:
        """(cond held) Back off: 0.1 s, doubling to 5 s, reset after a good run."""
        now = time.monotonic()
        if self.took_request or (self.up_since and now - self.up_since >= STABLE_S):
            self.backoff = 0.0
        self.took_request = False
        self.backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * self.backoff))
        self.retry_at, self.up_since = now + self.backoff, 0.0
        self.cond.notify_all()

    def _mark_dead(self) -> None:
        """(cond held) Kill and reap the current process; schedule its replacement."""
        _stop(self.proc, self.sock, grace=0)
        self.proc = self.sock = None
        if self.phase != "closed":
            self.phase = "backoff"
            self._schedule_restart()

    # -- requests ------------------------------------------------------------------------
    def acquire(self, wait_s: float) -> tuple[subprocess.Popen, socket.socket, list[str]]:
        """Wait for this worker to be free and up (``wait_s`` at most while it is busy,
        RESTART_WAIT_S while it restarts); fail fast when it cannot come back soon."""
        give_up = time.monotonic() + wait_s
        with self.cond:
            while True:
                now = time.monotonic()
                if self.phase not in ("ok", "closed"):
                    give_up = min(give_up, now + RESTART_WAIT_S)
                if self.phase == "closed":
                    raise UnavailableError(f"{self.name} is shut down")
                if self.phase == "ok" and not self.busy:
                    self._check_idle()      # dead or stopped: wait for its replacement
                if self.phase == "ok" and not self.busy:
                    self.busy = True
                    forget, self.forget = sorted(self.forget), set()
                    return self.proc, self.sock, forget
                if self.phase in ("backoff", "down") and self.retry_at - now > FAIL_FAST_S:
                    raise UnavailableError(f"{self.name} is down and restarts in "
                                           f"{self.retry_at - now:.1f} s: retry then")
                if now >= give_up:
                    raise UnavailableError(f"{self.name} is "
                                           f"{'busy' if self.phase == 'ok' else 'restarting'}"
                                           " for too long: retry")
                self.cond.wait(min(TICK_S, give_up - now))

    def release(self, proc: subprocess.Popen, failed: bool) -> None:
        with self.cond:
            self.busy = False
            if self.proc is proc:
                self.took_request = True
                if failed:
                    self._mark_dead()
            self.cond.notify_all()

    def state(self) -> str:
        with self.cond:
            if self.phase == "ok":     # live: the supervisor notices within a tick
                if self.proc.poll() is not None:
                    return "restarting"
                return "stopped" if _stopped(self.proc.pid) else "ok"
            return {"starting": "restarting", "backoff": "restarting"}.get(self.phase, "down")

    def close(self) -> None:
        with self.cond:
            self.phase = "closed"
            proc, sock, self.proc, self.sock = self.proc, self.sock, None, None
            self.cond.notify_all()
        if proc is not None:
            _stop(proc, sock)


class HEWorkers:
    """``count`` supervised worker processes running ``python -m MODULE ARGS``.

    Args:
        count: number of workers (sessions are spread over them by id).
        args: arguments of every worker (the pool adds ``--fd`` and ``--index``).
        log_dir: each worker's stderr goes to ``log_dir/he-worker-<k>.log``.
        timeout_s: most seconds one request may take in a worker before it is killed.
        module: the worker's entry module.

    Raises (at start): the error a worker reported while loading (e.g. BundleError),
    or UnavailableError if one did not start within 60 s.
    """

    def __init__(self, count: int, args: list[str], log_dir: str | os.PathLike, *,
                 timeout_s: float = 300.0, module: str = "veil.service.he_worker") -> None:
        if int(count) < 1:
            raise InputError(f"the service needs at least one HE worker, not {count}")
        if not timeout_s > 0:
            raise InputError(f"the worker timeout must be positive, not {timeout_s}")
        self.count, self.timeout_s = int(count), float(timeout_s)
        self._args, self._module = list(args), module
        self._log_dir = Path(log_dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._closing = threading.Event()
        self._workers = [_Worker(self, k) for k in range(self.count)]
        for w in self._workers:
            w.thread.start()
        try:
            self._wait_started()
        except BaseException:
            self.close()
            raise

    def _wait_started(self) -> None:
        give_up = time.monotonic() + START_TIMEOUT_S + 5
        for w in self._workers:
            with w.cond:
                while w.phase not in ("ok", "down") and time.monotonic() < give_up:
                    w.cond.wait(TICK_S)
                if w.phase == "down":
                    raise w.error
                if w.phase != "ok":
                    raise UnavailableError(f"{w.name} did not start within "
                                           f"{START_TIMEOUT_S:g} s")

    # -- the interface of the routes -------------------------------------------------
    def call(self, session_id: str, op: str, header: dict | None = None,
             parts: dict[str, bytes] | None = None, *,
             client_input: bool = True) -> tuple[dict, dict[str, bytes]]:
        """Run ``op`` for ``session_id`` in its worker; returns the reply (header, parts).

        Raises:
            the allow-listed VeilError the worker answered with;
            RejectedInputError: the worker died of a native fault on ``client_input``;
            UnavailableError: the worker died otherwise, timed out, was stopped, or is
                down (503; the request may be retried).
        """
        w = self._workers[worker_index(session_id, self.count)]
        proc, sock, forget = w.acquire(self.timeout_s + START_TIMEOUT_S)
        failed = True
        try:
            blob = pack(REQUEST_KIND, dict(parts or {}),
                        {**(header or {}), "op": op, "session": session_id,
                         "forget": forget})
            try:
                reply = self._exchange(proc, sock, blob)
            except _Failed as exc:
                raise self._failure(w, proc, exc.why, client_input) from None
            try:
                head, out = unpack(reply, REPLY_KIND, max_size=MAX_FRAME)
            except SerializationError:
                raise ServiceError(f"{w.name} sent a malformed reply") from None
            failed = False
            raise_error(head, w.name)
            return head, out
        finally:
            w.release(proc, failed)

    def forget(self, session_id: str) -> None:
        """Unload ``session_id`` (deleted or expired) with its worker's next request."""
        w = self._workers[worker_index(session_id, self.count)]
        with w.cond:
            w.forget.add(session_id)

    def state(self, index: int) -> str:
        """``ok``, ``restarting``, ``down`` or ``stopped`` (for ``/v1/health``)."""
        return self._workers[index].state()

    def restarts(self, index: int) -> int:
        """How often worker ``index`` was started again after its first start."""
        w = self._workers[index]
        with w.cond:
            return max(0, w.starts - 1)

    def pids(self) -> list[int | None]:
        """The process id of each worker now (None while it is down); for operators."""
        out = []
        for w in self._workers:
            with w.cond:
                out.append(w.proc.pid if w.proc is not None else None)
        return out

    def close(self) -> None:
        self._closing.set()
        for w in self._workers:
            w.close()
        for w in self._workers:
            if w.thread.is_alive() and w.thread is not threading.current_thread():
                w.thread.join(10)

    # -- processes and messages ------------------------------------------------------
    def _spawn(self, index: int) -> tuple[subprocess.Popen, socket.socket]:
        """Start worker ``index`` (from its supervisor thread) and wait for its ready."""
        ours, theirs = socket.socketpair()
        try:
            with open(self._log_dir / f"he-worker-{index}.log", "ab") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", self._module, "--fd", str(theirs.fileno()),
                     "--index", str(index), *self._args],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err,
                    preexec_fn=_die_with_parent if _PRCTL else None)
        except OSError as exc:
            ours.close()
            raise UnavailableError(f"HE worker {index} could not be started: {exc}") from None
        finally:
            theirs.close()
        ours.settimeout(TICK_S)     # waits wake up to check on the worker
        try:
            reply = self._receive(proc, ours, time.monotonic() + START_TIMEOUT_S)
            head, _ = unpack(reply, REPLY_KIND, max_size=1 << 20)
            raise_error(head, f"HE worker {index}")
        except _Failed as exc:
            _stop(proc, ours)
            raise UnavailableError(f"HE worker {index} did not start ({exc.why}); see "
                                   f"{self._log_dir / f'he-worker-{index}.log'}") from None
        except BaseException:
            _stop(proc, ours)
            raise
        log.info("HE worker %d started (pid %d)", index, proc.pid)
        return proc, ours

    def _exchange(self, proc: subprocess.Popen, sock: socket.socket, blob: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        view = memoryview(LEN.pack(len(blob)) + blob)
        while view:
            try:
                view = view[sock.send(view[:1 << 22]):]
            except socket.timeout:
                _check(proc, deadline, self.timeout_s)
            except OSError:
                raise _Failed(_exit_reason(proc)) from None
        return self._receive(proc, sock, deadline)

    def _receive(self, proc: subprocess.Popen, sock: socket.socket, deadline: float) -> bytes:
        head = bytearray(LEN.size)
        _recv_exact(proc, sock, memoryview(head), deadline, self.timeout_s)
        (n,) = LEN.unpack(head)
        if n > MAX_FRAME:
            raise _Failed(f"it sent a frame of {n} bytes")
        body = bytearray(n)
        _recv_exact(proc, sock, memoryview(body), deadline, self.timeout_s)
        return bytes(body)

    def _failure(self, w: _Worker, proc: subprocess.Popen, why: str,
                 client_input: bool) -> VeilError:
        code = proc.poll()
        log.error("%s failed a request: %s", w.name, why)
        if client_input and code is not None and -code in FAULTS:
            return RejectedInputError(
                f"this input made the HE evaluator fail ({_exit_text(code)}); only this "
                "request failed and the evaluator was restarted")
        return UnavailableError(f"{w.name} failed during this request ({why}); it is "
                                "being restarted: retry")


def _recv_exact(proc, sock, view: memoryview, deadline: float, timeout_s: float) -> None:
    while view:
        try:
            n = sock.recv_into(view)
        except socket.timeout:
            _check(proc, deadline, timeout_s)
            continue
        except OSError:
            n = 0
        if n == 0:
            raise _Failed(_exit_reason(proc))
        view = view[n:]


def _check(proc: subprocess.Popen, deadline: float, timeout_s: float) -> None:
    """Between waits on a worker: it must be alive, running, and within its time."""
    if proc.poll() is not None:
        raise _Failed(_exit_text(proc.returncode))
    if _stopped(proc.pid):
        raise _Failed("it was stopped")
    if time.monotonic() > deadline:
        raise _Failed(f"no answer within {timeout_s:g} s")


def _exit_reason(proc: subprocess.Popen) -> str:
    """Why a worker's socket closed: its exit status once it is reaped (5 s at most)."""
    try:
        return _exit_text(proc.wait(5))
    except subprocess.TimeoutExpired:
        return "it closed its connection"


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, or a debugger): state ``T``/``t`` in /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")


def _stop(proc: subprocess.Popen | None, sock: socket.socket | None, grace: float = 5) -> None:
    """Close the socket (a live worker exits on EOF), then terminate, kill and reap."""
    if sock is not None:
        sock.close()
    if proc is None:
        return
    if proc.poll() is None:
        if grace:
            proc.terminate()
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log.error("HE worker pid %d did not exit after SIGKILL", proc.pid)


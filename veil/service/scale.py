"""Scale-out on Ray Serve: the same HTTP API, HE evaluation and enclaves as replicas.

``veil serve EXPORT... --store DIR --ray ADDRESS`` (:func:`serve_on_ray`) deploys one
Ray Serve application, ``veil``, on the Ray cluster at ``ADDRESS``:

* ``veil-ingress`` (one replica, on the head node): the app of
  :func:`veil.service.app.create_app`, unchanged (API keys, per-key limits, body
  limits, the session store, TEE channel ownership), served by uvicorn inside the
  replica on ``--listen`` as ``veil serve`` serves it. Ray Serve's own HTTP proxy is
  off: it would add a process hop to every request. The ingress computes nothing.
* ``veil-he`` (``--replicas`` replicas, ``--replica-cpus`` CPUs each, OpenFHE on
  ``--he-threads`` threads): each holds an HE worker's model servers and loaded
  sessions (:class:`veil.service.he_worker.Worker`). Requests carry the session id as
  Ray Serve's *multiplexed model id*, so Ray routes a session to a replica that already
  has its evaluation keys loaded (LRU, at most ``SESSIONS_PER_REPLICA`` per replica):
  keys load once per replica. A session starts on the replica that validated its
  upload; a request that comes before Ray's routing table knows that (it is updated
  asynchronously) may go to another replica, which then loads the keys too.
* ``veil-enclave-<model>`` (``--replicas`` replicas per TEE model): each starts its
  own enclave process and announces its address in a registry (a small named Ray
  actor). The ingress talks to the enclaves directly over their TCP ports (the enclave
  protocol of ``veil tee-serve``), and keeps each channel on the enclave that opened it;
  a new channel goes to the enclave with the fewest.

Keys come from the shared session store: each HE replica opens it itself
(``--store-url postgresql://...`` for several machines; the SQLite store in ``--store``
serves replicas on the ingress's machine).

Faults: a replica that dies (killed, out of memory, a native crash) fails its requests
with a Ray error; an HE request is then sent once more, to any live replica, which loads
the session's keys from the store (the store is only ever written by the ingress, and
atomically, so it stays consistent); a second failure is
:class:`~veil.errors.UnavailableError` (503). Ray Serve restarts the replica. A TEE
message whose enclave died gets 503 until the enclave leaves the registry (``FRESH_S``),
then "unknown channel", on which the SDK attests again (to a live enclave). A node that
joins the cluster takes new replicas; Ray's router spreads new sessions over replicas
by load.

Only veil's own server processes exchange Ray's (pickled) messages; clients reach the
ingress over HTTP only, as with ``veil serve``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import ray
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException

from ..errors import InputError, ServiceError, UnavailableError, VeilError
from .workers import error_header, raise_error

log = logging.getLogger("veil.service")
APP = "veil"
ROUTES = 4096          # TEE channels whose enclave one ingress remembers
REGISTRY = "veil-enclave-registry"
ANNOUNCE_S, FRESH_S, REFRESH_S = 2.0, 6.0, 1.0
START_WAIT_S = 120.0   # how long the ingress waits at start for the enclave replicas
# Ray Serve's multiplexing LRU: the sessions routed to one HE replica (the memory budget
# still bounds what stays loaded)
SESSIONS_PER_REPLICA = 64
HEAD_NODE = "node:__internal_head__"   # Ray's resource of the head node
# The worker requests that carry an upload (a file in the ingress) and its part's name
UPLOADS = {"open": "keys", "weights": "weights"}


@dataclass(frozen=True)
class ScaleOptions:
    """How the Ray Serve deployment is sized.

    Args:
        address: the Ray cluster (``ray start --head`` prints it; ``auto`` finds a
            local one).
        replicas: HE replicas, and enclave replicas per TEE model.
        replica_cpus: CPUs Ray reserves for each replica.
        he_threads: OpenFHE's threads in each HE replica (``OMP_NUM_THREADS``).
        tee_threads: the model runtime's threads in each enclave replica; None: the
            replica's CPUs (at least 1). Each enclave runs as many models at once as
            its CPUs hold runs of that many threads (at least one), the other requests
            wait their turn: an enclave is a child process, which Ray does not hold to
            the replica's CPUs, and left to its defaults (onnxruntime's thread per core,
            a run per connection) one enclave would take every core of its machine.
    """

    address: str
    replicas: int = 1
    replica_cpus: float = 1.0
    he_threads: int = 1
    tee_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("replicas", "he_threads", "tee_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"--{name.replace('_', '-')} must be a whole number >= 1, "
                                 f"not {value!r}")
        if not self.replica_cpus > 0:
            raise InputError(f"--replica-cpus must be > 0, not {self.replica_cpus!r}")

    @property
    def enclave_threads(self) -> int:
        """The threads of each model run in an enclave replica."""
        return self.tee_threads or max(1, int(self.replica_cpus))

    @property
    def enclave_parallel(self) -> int:
        """The model runs an enclave replica computes at once."""
        return max(1, int(self.replica_cpus) // self.enclave_threads)


def scratch_dir(prefix: str) -> Path:
    """A private temporary folder for this replica, ``PREFIX-<pid>-*``. A replica that
    was killed could not remove its own; the next replica started on the machine
    removes those whose process is gone."""
    import psutil

    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{prefix}-*-*"):
        pid = old.name[len(prefix) + 1:].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))


# -- HE replicas --------------------------------------------------------------------------
@serve.deployment(name="veil-he")
class HEReplica:
    """One HE worker (model servers + loaded sessions) as a Ray Serve replica."""

    def __init__(self, exports: list[str], store_dir: str, store_url: str | None,
                 memory_budget: int) -> None:
        from .he_worker import FAULTS_ENV, Worker
        from .store import open_store

        self._dir = scratch_dir("veil-he-replica")
        self.worker = Worker(exports, memory_budget, os.environ.get(FAULTS_ENV))
        cache = self._dir / "store" if store_url else store_dir
        self.store = open_store(cache, store_url, recover=False)
        self._run = ThreadPoolExecutor(1)       # one request at a time, like a worker
        self._pins: dict[str, object] = {}
        self.id = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def load(self, sid: str) -> "_Pin":
        """Ray Serve's multiplexed loader: marks this replica as the session's. The keys
        load on the first request that needs them (LoadedSessions counts it)."""
        pin = _Pin(self, sid)
        self._pins[sid] = pin
        return pin

    def unpin(self, pin: "_Pin") -> None:
        """Ray Serve evicted the session from this replica: unload its keys."""
        if self._pins.get(pin.sid) is pin:
            del self._pins[pin.sid]
            self.worker.loaded.discard(pin.sid)

    async def call(self, header: dict, parts: dict[str, bytes]) -> tuple[dict, dict]:
        sid = serve.get_multiplexed_model_id()
        await self.load(sid)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._run, self._handle, sid, header, parts)

    async def forget(self) -> None:
        """Unload a deleted session (after any request of it running here)."""
        sid = serve.get_multiplexed_model_id()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._run, self.worker.loaded.discard, sid)

    def _handle(self, sid: str, header: dict, parts: dict[str, bytes]) -> tuple[dict, dict]:
        header = {**header, "session": sid}
        scratch = []
        try:
            upload = UPLOADS.get(header.get("op"))
            if upload is not None:             # the upload, as a private file here
                path = self._dir / f"{secrets.token_hex(8)}.{upload}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(parts.pop(upload))
                header[upload] = str(path)
                scratch.append(path)
            if header.get("op") != "open":
                header["keys"] = str(self.store.key_path(sid))
                if "weights" not in header:
                    weights = self.store.weights_path(sid)
                    if weights is not None:
                        header["weights"] = str(weights)
            head, out = self.worker.handle(header, parts)
        except Exception as exc:     # the same allow-listed errors as a worker's reply
            if not isinstance(exc, VeilError):
                log.exception("an HE replica request failed")
            head, out = error_header(exc), {}
        finally:
            for path in scratch:
                path.unlink(missing_ok=True)
        return {**head, "loads": self.worker.loaded.loads, "replica": self.id}, out

    def __del__(self) -> None:
        """Ray Serve's shutdown hook for a replica: unload and remove its files."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.loaded.close()
            self.store.close()
            self._run.shutdown(wait=False)
            shutil.rmtree(self._dir, ignore_errors=True)


class _Pin:
    """A session pinned to a replica by Ray Serve's multiplexing; Ray calls ``__del__``
    explicitly when it evicts the session (its documented unload hook)."""

    def __init__(self, replica: HEReplica, sid: str) -> None:
        self.replica, self.sid = replica, sid

    def __del__(self) -> None:
        self.replica.unpin(self)


class RayHEPool:
    """:class:`~veil.service.workers.HEWorkers`' interface over the ``veil-he``
    deployment (``config.he_pool``), in the ingress."""

    count = 0    # no local workers: /v1/health reports "he-replicas"

    def __init__(self, handle, timeout_s: float = 300.0) -> None:
        self.handle, self.timeout_s = handle, timeout_s
        self._loads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.retries = 0

    def call(self, session_id: str, op: str, header: dict,
             parts: dict[str, bytes] | None = None) -> tuple[dict, dict]:
        header, parts = {**header, "op": op}, dict(parts or {})
        upload = UPLOADS.get(op)        # a file of the ingress: its bytes travel
        if upload is not None:
            parts[upload] = Path(header[upload]).read_bytes()
        header.pop("keys", None)        # other files: the replica finds them itself
        header.pop("weights", None)
        for attempt in (0, 1):
            try:
                reply, out = self.handle.options(multiplexed_model_id=session_id).call \
                    .remote(header, parts).result(timeout_s=self.timeout_s)
                break
            except TimeoutError:
                raise UnavailableError(f"an HE replica did not answer within "
                                       f"{self.timeout_s:g} s; try again") from None
            except RayTaskError as exc:      # a bug in the replica, not its death
                log.error("an HE replica request failed: %s", str(exc)[:2000])
                raise ServiceError("internal error in an HE replica") from None
            except (RayError, RayServeException) as exc:
                log.warning("an HE replica failed (%s): %s: %s", "giving up" if attempt
                            else "retrying", type(exc).__name__, str(exc)[:2000])
                if attempt:
                    raise UnavailableError("the HE replicas serving this request failed "
                                           "twice; try again shortly") from None
                self.retries += 1
        with self._lock:
            replica, loads = reply.pop("replica", None), reply.pop("loads", None)
            if isinstance(replica, str) and isinstance(loads, int):
                self._loads[replica] = loads
        raise_error(reply, "an HE replica")
        return reply, out

    def key_loads(self) -> int:
        """Evaluation-key loads over every replica that answered (restarted ones too)."""
        with self._lock:
            return sum(self._loads.values())

    def replicas_seen(self) -> int:
        """How many replicas (restarted ones counted again) have answered."""
        with self._lock:
            return len(self._loads)

    def forget(self, session_id: str) -> None:
        """Unload a deleted session where it is loaded (best effort, not awaited)."""
        try:
            self.handle.options(multiplexed_model_id=session_id).forget.remote()
        except (RayError, RayServeException):
            pass

    def state(self, k: int = 0) -> str:
        return "ok"

    def restarts(self, k: int = 0) -> int:
        return 0

    def close(self) -> None:
        pass


# -- enclave replicas ---------------------------------------------------------------------
@ray.remote(num_cpus=0)
class EnclaveRegistry:
    """Where each enclave replica's enclave listens (a named Ray actor, ``REGISTRY`` in
    namespace ``veil``): replicas announce theirs every ``ANNOUNCE_S``; the ingress
    reads the ones announced within ``FRESH_S``."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}

    def announce(self, model: str, replica: str, address: str) -> None:
        self._seen[(model, replica)] = (address, time.monotonic())

    def withdraw(self, model: str, replica: str) -> None:
        self._seen.pop((model, replica), None)

    def enclaves(self, model: str) -> list[str]:
        now = time.monotonic()
        return sorted(a for (m, _), (a, t) in self._seen.items()
                      if m == model and now - t <= FRESH_S)


def registry(create: bool = False):
    """The enclave registry. The ingress makes it (``create``) and holds its handle: a
    Ray actor lives as long as its maker's handles, so it lives as long as the ingress
    (a restarted ingress makes a new one). Enclave replicas only look it up, every time
    they announce (ValueError while there is none)."""
    if create:
        return EnclaveRegistry.options(name=REGISTRY, namespace="veil",
                                       get_if_exists=True).remote()
    return ray.get_actor(REGISTRY, namespace="veil")


@serve.deployment
class EnclaveReplica:
    """One enclave process, started and supervised here, placed and restarted by Ray
    Serve. The ingress talks to the enclave itself (its TCP port, the enclave protocol
    of ``veil tee-serve``), found through the registry: a channel lives in one enclave,
    so the ingress keeps each channel on the enclave that opened it."""

    def __init__(self, export_dir: str, attester_key: str | None,
                 key_release: str | None, threads: int, parallel: int) -> None:
        from ..deploy.export import read_export
        from ..deploy.processes import Processes

        self._dir = scratch_dir("veil-enclave-replica")
        self.procs = Processes(self._dir / "logs")
        info = read_export(export_dir)
        self.model, self.id = info.name, secrets.token_hex(8)
        backend = self.procs.tee(info, attester_key=attester_key, key_release=key_release,
                                 host=ray.util.get_node_ip_address(), threads=threads,
                                 parallel=parallel)
        self.address, self.state = backend["enclave"], backend["children"][
            f"{info.name}-enclave"]
        self._stop = threading.Event()
        self._announcer = threading.Thread(target=self._announce, daemon=True,
                                           name="veil-enclave-announce")
        self._announcer.start()

    def _announce(self) -> None:
        while True:
            if self.state() == "ok":
                try:
                    registry().announce.remote(self.model, self.id, self.address)
                except Exception as exc:  # no registry yet (the ingress makes it)
                    log.info("cannot announce the enclave yet: %s", str(exc)[:300])
            if self._stop.wait(ANNOUNCE_S):
                return

    def check_health(self) -> None:
        """Ray Serve's health check: a dead enclave process fails it (Serve restarts
        the replica when its supervisor cannot bring the enclave back)."""
        if self.state() in ("down",):
            raise UnavailableError(f"the enclave of {self.model} is down")

    def __del__(self) -> None:
        """Ray Serve's shutdown hook: withdraw, stop the enclave, remove the files."""
        procs = getattr(self, "procs", None)
        if procs is not None:
            self._stop.set()
            try:
                registry().withdraw.remote(self.model, self.id)
            except Exception:     # the registry went with the ingress: nothing to do
                pass
            procs.close()
            shutil.rmtree(self._dir, ignore_errors=True)


class RayEnclaveLink:
    """:class:`~veil.service.tee.PoolLink`'s interface over one model's enclave
    replicas: a new channel (an evidence request) goes to the enclave with the fewest
    channels, and every later message of the channel to that enclave, over pooled
    connections straight to it. A thread refreshes the registry's list every
    ``REFRESH_S``; a channel whose enclave left it is unknown (the SDK attests again)."""

    def __init__(self, model: str, expect: int = 0, wait_s: float = START_WAIT_S) -> None:
        """Reads the registry until ``expect`` enclaves have announced themselves (at
        most ``wait_s``), so the service announces itself with its enclaves up."""
        self.model = model
        self._links: dict[str, object] = {}
        self._channels: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._registry = registry(create=True)
        deadline = time.monotonic() + wait_s
        self._refresh()
        while self.count() < expect and time.monotonic() < deadline:
            time.sleep(REFRESH_S / 4)
            self._refresh()
        self._thread = threading.Thread(target=self._poll, daemon=True,
                                        name=f"veil-enclaves-{model}")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._refresh()

    def _refresh(self) -> None:
        from ..backends.sockets import parse_address
        from .tee import PoolLink, enclave_pool

        try:
            now = ray.get(self._registry.enclaves.remote(self.model), timeout=10)
        except Exception as exc:    # this thread must live on: retried in REFRESH_S
            log.warning("cannot read the enclave registry: %s", str(exc)[:300])
            return
        gone = []
        with self._lock:
            for address in now:
                if address not in self._links:
                    self._links[address] = PoolLink(enclave_pool(parse_address(address)))
            for address in set(self._links) - set(now):
                gone.append(self._links.pop(address))
        for link in gone:
            link.close()

    def count(self) -> int:
        """How many enclaves this link reaches now."""
        with self._lock:
            return len(self._links)

    def ready(self) -> None:
        with self._lock:
            if not self._links:
                raise UnavailableError("no enclave replica is up yet; try again shortly")

    def _pick(self, kind: int, body: bytes) -> tuple[str, object]:
        from ..backends.tee import net
        from ..errors import SessionError

        with self._lock:
            if kind in (net.EVIDENCE_REQUEST, net.STATUS_REQUEST):
                if not self._links:
                    raise UnavailableError("no enclave replica is up; try again shortly")
                load = {a: 0 for a in self._links}
                for a in self._channels.values():
                    if a in load:
                        load[a] += 1
                address = min(load, key=lambda a: (load[a], a))
            else:
                address = self._channels.get(bytes(body[:16]))
                if address not in self._links:
                    raise SessionError("unknown or expired channel: fetch fresh evidence")
            return address, self._links[address]

    def send(self, kind: int, body: bytes, wanted: int) -> bytes:
        from ..backends.tee import net
        from .tee import _channel_claim

        address, link = self._pick(kind, body)
        out = link.send(kind, body, wanted)
        if kind == net.EVIDENCE_REQUEST:
            with self._lock:
                self._channels[_channel_claim(out)] = address
                while len(self._channels) > ROUTES:
                    self._channels.popitem(last=False)
        return out

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()


# -- ingress ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Listen:
    """Where the ingress serves HTTP (``veil serve --listen``, ``--tls-cert/--tls-key``)."""

    host: str
    port: int
    tls_cert: str | None = None
    tls_key: str | None = None


@serve.deployment(name="veil-ingress")
class Ingress:
    """The veil HTTP app (:func:`veil.service.app.create_app`, unchanged) served by
    uvicorn in this replica on ``listen``, as ``veil serve`` serves it, with HE work sent
    to the ``veil-he`` handle and TEE messages to the enclave replicas. It has no Ray
    Serve route: clients reach it directly, so a request pays no proxy hop."""

    def __init__(self, config, he, enclaves: dict, replicas: int, listen: Listen) -> None:
        from contextlib import ExitStack
        from dataclasses import replace

        self._stack = ExitStack()
        try:
            backends = {name: dict(b) for name, b in config.backends.items()}
            for name in enclaves:
                link = RayEnclaveLink(name, replicas)
                self._stack.callback(link.close)
                backends.setdefault(name, {})["tee"] = {"link": link}
            self.pool = None if he is None else RayHEPool(he, config.worker_timeout_s)
            self.config = replace(config, backends=backends, he_pool=self.pool)
            self._serve(listen)
        except BaseException:
            self._stack.close()
            raise

    def _app(self):
        from .app import create_app

        app = create_app(self.config)
        ctx = app.state.veil
        self._stack.callback(ctx.close)
        if self.pool is not None:
            ctx.children["he-replicas"] = self.pool.state
            ctx.stats["he_key_loads"] = self.pool.key_loads
            ctx.stats["he_retries"] = lambda: self.pool.retries
            ctx.stats["he_replicas_seen"] = self.pool.replicas_seen
        for name, backend in self.config.backends.items():
            link = backend.get("tee", {}).get("link")
            if isinstance(link, RayEnclaveLink):
                ctx.stats[f"tee_enclaves_{name}"] = link.count
        return app

    def _serve(self, listen: Listen) -> None:
        """Bind ``listen``, start uvicorn on a thread of its own and wait until it
        accepts connections (then Ray Serve counts this replica as started)."""
        import uvicorn

        from .run import _service_log, bind, header_timeout_protocol

        app = self._app()
        sock = bind(listen.host, listen.port)
        self._stack.callback(sock.close)
        self._stack.enter_context(_service_log(Path(self.config.store_dir) / "logs"))
        uv = uvicorn.Config(app, log_level="warning", lifespan="on", workers=1,
                            timeout_graceful_shutdown=10, ssl_certfile=listen.tls_cert,
                            ssl_keyfile=listen.tls_key,
                            http=header_timeout_protocol(self.config.header_timeout_s))
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True, name="veil-ingress-http")
        self.thread.start()
        self._stack.callback(self._stop_http)
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServiceError("the ingress's HTTP server did not start")
            time.sleep(0.05)

    def _stop_http(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def check_health(self) -> None:
        """Ray Serve's health check: the HTTP server must still run."""
        if not self.thread.is_alive():
            raise UnavailableError("the ingress's HTTP server stopped")

    def __del__(self) -> None:
        """Ray Serve's shutdown hook: stop serving, close the app's resources."""
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()


def build(config, options: ScaleOptions, listen: Listen, *,
          attester_key: str | None = None, key_release: str | None = None):
    """The Ray Serve application of ``config`` (a ServiceConfig) sized by ``options``,
    its ingress serving HTTP on ``listen`` from the head node."""
    from .app import load_exports

    models = load_exports(config.exports)
    env = {"OMP_NUM_THREADS": str(options.he_threads), "OPENBLAS_NUM_THREADS": "1"}
    from .he_worker import FAULTS_ENV

    if os.environ.get(FAULTS_ENV):             # the test seam reaches the replicas
        env[FAULTS_ENV] = os.environ[FAULTS_ENV]
    actor = {"num_cpus": options.replica_cpus, "runtime_env": {"env_vars": env}}
    he = None
    exports = [f"{name}={info.path('he') / 'server'}" for name, info in models.items()
               if "he" in info.modes]
    if exports:
        budget = config.memory_budget_bytes // max(1, options.replicas)
        he = HEReplica.options(num_replicas=options.replicas, ray_actor_options=actor,
                               max_ongoing_requests=8).bind(
            exports, str(config.store_dir), config.store_url, budget)
    enclaves = {}
    for name, info in models.items():
        if "tee" in info.modes:
            if attester_key is None:
                raise ServiceError(f"{name} has the tee mode: --ray starts enclaves in "
                                   "its replicas and needs --tee-attester-key DIR")
            enclaves[name] = EnclaveReplica.options(
                name=f"veil-enclave-{name}", num_replicas=options.replicas,
                ray_actor_options={"num_cpus": options.replica_cpus}).bind(
                str(info.directory), attester_key, key_release, options.enclave_threads,
                options.enclave_parallel)
    head = {"num_cpus": 0, "resources": {HEAD_NODE: 0.001}}   # --listen is the head's
    return Ingress.options(ray_actor_options=head).bind(config, he, enclaves,
                                                        options.replicas, listen)


def serve_on_ray(config, options: ScaleOptions, host: str = "127.0.0.1", port: int = 8000,
                 *, out: TextIO | None = None, attester_key: str | None = None,
                 key_release: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, stop: threading.Event | None = None) -> None:
    """Deploy on the Ray cluster, announce ``veil-serve listening on URL`` (the line
    ``veil serve`` writes) once the ingress accepts connections on ``host:port`` (an
    address of the head node), and serve until SIGINT/SIGTERM (or ``stop``); then shut
    Ray Serve down (every replica and enclave stops) and disconnect. ``port=0`` picks a
    free port here."""
    from .run import READY, bind

    if port == 0:
        probe = bind(host, 0)
        port = probe.getsockname()[1]
        probe.close()
    ray.init(address=options.address, logging_level=logging.WARNING,
             log_to_driver=False, namespace="veil")
    stop = stop or threading.Event()
    try:
        serve.start(proxy_location="Disabled")     # the ingress serves HTTP itself
        serve.run(build(config, options, Listen(host, port, tls_cert, tls_key),
                        attester_key=attester_key, key_release=key_release),
                  name=APP, route_prefix=None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: stop.set())
        scheme = "https" if tls_cert else "http"
        where = f"[{host}]" if ":" in host else host
        (out or sys.stdout).write(f"{READY} {scheme}://{where}:{port}\n")
        (out or sys.stdout).flush()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

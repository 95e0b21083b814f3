"""``veil.Client``: private inference against a veil service, in one of its modes.

The client speaks HTTP (``httpx``) and leaves the cryptography to a *mode object*
picked by ``mode=``: ``he`` -> :class:`veil.sdk.he.HEMode`, ``tee`` ->
``veil.sdk.tee.TEEMode``, ``mpc`` -> ``veil.sdk.mpc.MPCMode`` (imported lazily).
A mode object implements :class:`ModeClient` and is built as
``ModeClass(client, **mode_options)``; it talks to the server only through
:meth:`Client._call`, which turns every error body into the same veil exception the
server raised (see :mod:`veil.service.errors`).

A Client is not thread-safe: use one per thread (they may share an API key and a
``key_dir``).
"""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import numpy as np

from .._version import __version__
from ..backends.inputs import as_inputs
from ..errors import AuthError, InputError, ModeError, ServiceError, VeilError
from ..ir.head import Head
from ..service.auth import key_id
from ..service.errors import exception_for
from ..service.protocol import OCTETS

MODES = {"he": ("veil.sdk.he", "HEMode"), "tee": ("veil.sdk.tee", "TEEMode"),
         "mpc": ("veil.sdk.mpc", "MPCMode")}


class ModeClient(Protocol):
    """What a mode object provides (``Client`` forwards to it)."""

    def encrypt(self, x) -> Any:
        """Protect one input (of the model's input shape), or a batch ``(B, *shape)``
        (up to the mode's cap for one request), for :meth:`infer`; the input contract
        of :mod:`veil.backends.inputs`."""

    def infer(self, payload) -> Any:
        """Send a protected input; returns the protected result."""

    def decrypt(self, result) -> np.ndarray:
        """The plain output of one :meth:`infer` result: one output (model output
        shape) for one input, ``(B, *output_shape)`` for a batch."""

    def infer_batch(self, xs) -> np.ndarray:
        """Plain outputs, shape ``(B, *output_shape)``, for a batch (one input is a
        batch of one)."""

    def close(self) -> None:
        """Drop keys and connections held in memory (nothing on the server)."""


class Client:
    """Private inference for one model of a veil service, or encrypted search of one
    of its indexes (``index=``).

    Args:
        url: the service, e.g. ``http://127.0.0.1:8000``.
        model: the model name (``GET /v1/models``); None with ``index``.
        index: an index name (``GET /v1/indexes``): this client then only
            searches it (:meth:`search`, :mod:`veil.sdk.search`; ``mode`` is not used).
        mode: ``"he"``, ``"tee"`` or ``"mpc"``.
        api_key: the API key; default: the ``VEIL_API_KEY`` environment variable.
        key_dir: where client secrets and session ids persist (0700; default ``~/.veil``).
        timeout: seconds per HTTP request.
        transport: an ``httpx`` transport (test seam, e.g. an in-process app).
        ca: for an ``https://`` service, a PEM file of the certificate authorities to
            trust (e.g. a service's self-signed certificate); default: the
            ``SSL_CERT_FILE`` environment variable, else the system's and certifi's.
        mode_options: passed to the mode class (HE: ``bundle``, ``allow_insecure``,
            ``progress``, ``check_range``, ``clip``, ``layout``; ``clip=True`` clamps
            inputs into the model's calibrated range before encryption instead of
            refusing them).

    Raises:
        AuthError: no API key; ModeError: unknown mode. Every call raises the veil
        exception of the server's error body, or ServiceError if the service cannot be
        reached or answers something that is not veil's.
    """

    def __init__(self, url: str, model: str | None = None, mode: str = "he", *,
                 index: str | None = None, api_key: str | None = None,
                 key_dir: str | os.PathLike | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, ca: str | None = None,
                 **mode_options) -> None:
        if mode not in MODES:
            raise ModeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if (model is None) == (index is None):
            raise InputError("give a model name or an index= name (one of them)")
        self.url, self.model, self.mode_name = url.rstrip("/"), model, mode
        token = api_key or os.environ.get("VEIL_API_KEY")
        if not token:
            raise AuthError("no API key: pass api_key= or set VEIL_API_KEY")
        # Secrets are stored per client: the key id names it (the secret part never does).
        self.client_id = key_id(token) or hashlib.sha256(token.encode()).hexdigest()[:16]
        self.key_dir = Path(key_dir) if key_dir is not None else Path.home() / ".veil"
        if transport is None:
            # Nagle off: a request goes out as headers then body, and with Nagle the body
            # waits for the server's delayed ACK of the headers (40 ms on Linux)
            transport = httpx.HTTPTransport(verify=_verify(ca), socket_options=[
                (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}",
                                           "User-Agent": f"veil-sdk/{__version__}"})
        self._info: dict | None = None
        self._head: Head | None = None
        try:
            if index is not None:
                from .search import SearchMode

                if mode_options:
                    raise InputError(f"an index client takes no mode options "
                                     f"({', '.join(mode_options)})")
                self.mode = SearchMode(self, index)
            else:
                module, cls = MODES[mode]
                self.mode = getattr(import_module(module), cls)(self, **mode_options)
        except BaseException:
            self._http.close()
            raise

    # -- HTTP, for mode objects ------------------------------------------------------
    def _call(self, method: str, path: str, *, json: Any = None, content: Any = None,
              headers: dict | None = None,
              expect: Literal["json", "bytes", None] = "json") -> Any:
        """One request to the service; returns parsed JSON, raw bytes, or None.

        ``content`` (bytes or an iterator of bytes) is sent as octet-stream. An error
        answer raises the veil exception its body names (``exc.status``, ``exc.code``).
        """
        h = dict(headers or {})
        if content is not None:
            h.setdefault("Content-Type", OCTETS)
        try:
            r = self._http.request(method, path, json=json, content=content, headers=h)
        except httpx.TimeoutException as exc:
            raise ServiceError(f"{method} {path}: {self.url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach {self.url}: {exc}") from exc
        if r.status_code >= 400:
            raise _error(r)
        if expect == "json":
            try:
                return r.json()
            except ValueError:
                raise ServiceError(f"{method} {path}: the answer is not JSON") from None
        return r.content if expect == "bytes" else None

    def info(self) -> dict:
        """The model's public description (``GET /v1/models/{model}``), cached."""
        if self._info is None:
            self._info = self._call("GET", f"/v1/models/{self.model}")
        return self._info

    # -- the verbs ---------------------------------------------------------------------
    def encrypt(self, x) -> Any:
        """Protect one input (of the model's input shape) on this machine: a CKKS
        ciphertext (he), a sealed request (tee) or two additive shares (mpc). Pass the
        result to :meth:`infer`."""
        return self.mode.encrypt(x)

    def infer(self, payload) -> Any:
        """Send what :meth:`encrypt` returned to the service; returns the protected
        result (the service never sees the input or the output)."""
        return self.mode.infer(payload)

    def decrypt(self, result) -> np.ndarray:
        """The model's output (its output shape) from one :meth:`infer` result,
        recovered on this machine."""
        return self.mode.decrypt(result)

    def infer_batch(self, xs) -> np.ndarray:
        return self.mode.infer_batch(xs)

    def tokenize(self, texts) -> np.ndarray:
        """Texts -> the model's input batch, with the tokenizer the model was exported
        with (``info()["text"]``), here on the client: the service never sees a text."""
        spec = self.info().get("text")
        if not spec:
            raise InputError(f"model {self.model!r} takes arrays, not texts")
        from ..text.tokenize import tokenizer_for

        return tokenizer_for(spec).encode([texts] if isinstance(texts, str) else list(texts))

    @property
    def head(self) -> Head:
        """The model's output head (``info()["head"]``, :mod:`veil.ir.head`): what this
        client computes from the service's output (a final softmax, class labels)."""
        if self._head is None:
            spec = self.info().get("head")
            self._head = Head.from_dict(spec) if spec else Head()
        return self._head

    def predict(self, x) -> np.ndarray:
        """All in one: one input -> its output; a batch ``(B, *input_shape)`` -> ``(B, ...)``;
        for a text model, a text -> its output and a list of texts -> ``(B, ...)``
        (tokenized here, :meth:`tokenize`). The model's output head (a final softmax,
        labels) is computed here from the service's output (:attr:`head`);
        :meth:`infer_batch` and :meth:`decrypt` return the service's output as it is."""
        raw, single = self._raw(x)
        out = self.head.finish(raw)
        return out[0] if single else out

    def classify(self, x) -> np.ndarray:
        """The class of each input (its label when the classifier has some), as
        :meth:`veil.ir.head.Head.predict` decides it from the model's scores."""
        raw, single = self._raw(x)
        classes = self.head.classify(raw)
        return classes[0] if single else classes

    def _raw(self, x) -> tuple[np.ndarray, bool]:
        """The service's outputs as a batch, and whether ``x`` was one input (the
        input contract, :mod:`veil.backends.inputs`; texts tokenized here)."""
        if isinstance(x, str):
            return self._raw(self.tokenize(x))[0], True
        if isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x):
            return self._raw(self.tokenize(x))[0], False
        batch, single = as_inputs(x, self.info()["input_shape"])
        if single:
            return self.decrypt(self.infer(self.encrypt(batch[0])))[None], True
        return self.infer_batch(batch), False

    def search(self, query, k: int = 10, *, probe: int | None = None, decoys: int = 0):
        """The ``k`` documents of the index nearest ``query`` (a text, embedded here
        with the index's model, or a vector): a :class:`~veil.search.engine.SearchResult`
        (``ids``, ``scores``, best first; ``cost``: bytes up and down). Encrypted here,
        scored by the service under CKKS, decrypted and ranked here. ``probe`` (a
        clustered index) asks only for the blocks of the ``probe`` clusters nearest the
        query, hidden among ``decoys`` other clusters drawn at random."""
        from .search import SearchMode

        if not isinstance(self.mode, SearchMode):
            raise ModeError("this client is for a model: make one with index=NAME to search")
        return self.mode.search(query, k, probe=probe, decoys=decoys)

    def close(self) -> None:
        try:
            self.mode.close()
        finally:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _verify(ca: str | None) -> ssl.SSLContext | bool:
    """How the client checks an https service: against ``ca`` or ``SSL_CERT_FILE`` when
    given (a missing file is an InputError), else httpx's defaults."""
    cafile = ca or os.environ.get("SSL_CERT_FILE")
    if not cafile:
        return True
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"cannot read the certificate authorities in {cafile}: "
                         f"{exc}") from None


def _error(r: httpx.Response) -> VeilError:
    try:
        body = r.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        exc = ServiceError(f"HTTP {r.status_code} from {r.request.url}: {r.text[:200]!r}")
        exc.status, exc.code = r.status_code, None
        return exc
    try:
        retry_after = float(r.headers["retry-after"])
    except (KeyError, ValueError):
        retry_after = None
    return exception_for(code, message, r.status_code, retry_after)

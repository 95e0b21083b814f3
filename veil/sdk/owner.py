"""The model owner's side of encrypted-weight serving: ``ModelOwner(url, bundle)``.

The host serves an export made with ``--encrypted-weights`` (its server bundle holds
zeros). For each client session, the client hands the model owner a *weights request*
(``HEMode.weights_request()`` / ``veil weights-request``: session id, model, public
key) out of band; the owner encrypts its weights under that public key here
(:func:`veil.deploy.owner.encrypt_weights`) and uploads them with a model owner's API key
(``veil keys create NAME --owner MODEL``) to ``PUT
/v1/models/{name}/he/sessions/{id}/weights``. The plaintext weights never leave this
machine; the host can neither read them nor use them with another client's keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import httpx

from .._version import __version__
from ..deploy.bundle import ServerBundle
from ..errors import AuthError, BundleError, KeyMismatchError, SerializationError, ServiceError
from ..service.protocol import OCTETS
from ..wire import unpack
from .client import _error

#: what a client hands a model owner: its session id and public key (``veil.sdk.he``)
WEIGHTS_REQUEST_KIND = "veil-weights-request"


def read_weights_request(blob: bytes) -> tuple[str, str, str, bytes]:
    """(session id, model name, model id, public key) of a weights request."""
    header, parts = unpack(blob, WEIGHTS_REQUEST_KIND, max_size=1 << 26)
    fields = [header.get(k) for k in ("session", "model", "model_id")]
    if set(parts) != {"public_key"} or not all(isinstance(f, str) for f in fields):
        raise SerializationError("a weights request holds a session id, a model and a "
                                 "public key: make it with `veil weights-request`")
    return (*fields, parts["public_key"])


class ModelOwner:
    """Uploads encrypted weights of one model to a veil service.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8000``.
        bundle: the owner's server bundle *with* its plaintext weights (a folder, a
            ``ServerBundle``, or ``CompiledModel.server_bundle()``); ``veil export
            --owner-bundle DIR`` writes one beside an ``--encrypted-weights`` export.
        api_key: a model owner's key for this model; default ``VEIL_API_KEY``.
        timeout: seconds per HTTP request; transport: an ``httpx`` transport (tests).
    """

    def __init__(self, url: str, bundle: str | os.PathLike | ServerBundle, *,
                 api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, ServerBundle) else ServerBundle.load(
            Path(bundle))
        if self.bundle.weights == "encrypted":
            raise BundleError("this is the host's bundle, without weights: give the model "
                              "owner's bundle (veil export --owner-bundle DIR)")
        token = api_key or os.environ.get("VEIL_API_KEY")
        if not token:
            raise AuthError("no API key: pass api_key= or set VEIL_API_KEY")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}",
                                           "User-Agent": f"veil-sdk/{__version__}"})

    def encrypt(self, request: bytes) -> tuple[str, str, bytes]:
        """(model name, session id, encrypted weights) for a client's weights request;
        KeyMismatchError if it is for another model than this bundle's."""
        sid, model, model_id, public_key = read_weights_request(request)
        if model_id != self.bundle.model_id:
            raise KeyMismatchError(f"this weights request is for model id {model_id}; this "
                                   f"bundle is {self.bundle.model_id}")
        from ..deploy.owner import encrypt_weights

        return model, sid, encrypt_weights(self.bundle, public_key)

    def upload_weights(self, request: bytes) -> dict:
        """Encrypt the weights for the client of ``request`` and upload them to its
        session; returns the service's answer (``{"session", "size"}``)."""
        model, sid, blob = self.encrypt(request)
        return self.upload(model, sid, blob)

    def upload(self, model: str, session_id: str, weights: bytes) -> dict:
        """Upload already encrypted weights (``encrypt_weights`` output)."""
        try:
            r = self._http.put(f"/v1/models/{model}/he/sessions/{session_id}/weights",
                               content=weights, headers={"Content-Type": OCTETS})
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach {self.url}: {exc}") from exc
        if r.status_code >= 400:
            raise _error(r)
        return r.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ModelOwner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

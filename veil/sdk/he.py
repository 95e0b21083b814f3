"""HE mode of ``veil.Client``: keys stay here, the server sees only ciphertexts.

1. The client bundle comes from the server (``GET .../he/client-bundle``, cached per
   server under ``key_dir/bundles/``) or from a local folder (``bundle=``). Its model id
   must be the one the server announces, and a bundle with insecure test parameters is
   refused unless ``allow_insecure=True``.
2. Keys are generated once per (server, model, client, model id) and persisted under
   ``key_dir/he/<digest>/keys.veil`` (secret key + evaluation keys, 0600, dirs 0700,
   written atomically), so a new ``Client`` reuses them.
3. The evaluation keys are uploaded once; the session id persists next to them
   (``session.json``). A session the server no longer has (404: expired, evicted, or a
   server that lost its store) is re-created from the same keys, once per call, so a
   ciphertext made before stays valid.
4. A model with encrypted weights (``info()["he"]["weights"] == "encrypted"``) needs its
   owner's weights for each session: :meth:`HEMode.weights_request` gives the bytes to
   hand the model owner out of band (session id and this client's public key), who
   uploads them with :class:`veil.sdk.owner.ModelOwner`. A session re-created after the
   server lost it needs a new request (inference answers MissingKeyError until then).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .._files import private_dir, write_private
from ..backends.inputs import as_inputs
from ..deploy.bundle import ClientBundle
from ..deploy.client import ModelClient
from ..deploy.keys import SecretKey
from ..errors import (BundleError, InputError, InsecureParametersError, KeyMismatchError,
                      ModeError, NotFoundError, SerializationError)
from ..service.protocol import pack_batch, unpack_batch, unpack_client_bundle
from ..wire import pack, unpack
from .owner import WEIGHTS_REQUEST_KIND

log = logging.getLogger("veil.sdk")
KEYS_KIND = "veil-sdk-he-keys"
UPLOAD_CHUNK = 1 << 20


def _write_atomic_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, data)
    os.replace(tmp, path)


class HEPayload(bytes):
    """Ciphertext bytes (from :meth:`HEMode.encrypt`, or the service's answer to them)
    that remember whether the caller gave one input or a batch, so :meth:`HEMode.decrypt`
    returns one output or a batch of them, as the other modes do. Plain bytes read as
    one input."""

    single: bool = True

    @classmethod
    def of(cls, blob: bytes, single: bool) -> "HEPayload":
        out = cls(blob)
        out.single = single
        return out


class HEMode:
    """The HE mode object (see :class:`veil.sdk.client.ModeClient`).

    Args:
        client: the owning :class:`~veil.sdk.Client`.
        bundle: a local client-bundle folder instead of the server's.
        allow_insecure: accept a bundle with insecure test parameters.
        progress: show key generation and upload progress on stderr (rich).
        check_range: refuse inputs outside the calibrated range, per feature, with an
            InputRangeError naming the row and feature (default True).
        clip: clamp inputs into the calibrated range on this machine before encrypting,
            with an InputClippedWarning counting what changed, instead of refusing
            them (default False).
        layout: batch layout for :meth:`infer_batch` (``auto``, ``lanes``, ``features``).
    Attributes:
        uploads: evaluation-key uploads done by this object; session_id: current session.
    """

    def __init__(self, client, *, bundle: str | os.PathLike | None = None,
                 allow_insecure: bool = False, progress: bool = False,
                 check_range: bool = True, clip: bool = False,
                 layout: str = "auto") -> None:
        self._client, self.progress, self.layout = client, progress, layout
        info = client.info()
        if "he" not in info.get("modes", ()):
            raise ModeError(f"model {client.model!r} is not served in mode 'he' "
                            f"(it has {', '.join(info.get('modes', ()))})")
        he = info["he"]
        self.model_id = he["model_id"]
        self.max_batch, self.max_batch_bytes = int(he["max_batch"]), int(he["max_batch_bytes"])
        cb = ClientBundle.load(bundle) if bundle is not None else self._fetch_bundle()
        if cb.model_id != self.model_id:
            raise KeyMismatchError(f"the client bundle is for model id {cb.model_id}, the "
                                   f"server serves {client.model!r} as {self.model_id}: use "
                                   "the bundle of the served export")
        if (cb.params.insecure_test_params or cb.params.security == "HEStd_NotSet") \
                and not allow_insecure:
            raise InsecureParametersError(
                f"model {client.model!r} uses insecure test parameters (no security level): "
                "pass allow_insecure=True only for tests")
        self.crypto = ModelClient(cb, check_range=check_range, clip=clip)
        ident = "\n".join([client.url, client.model, client.client_id, self.model_id])
        self.dir = client.key_dir / "he" / hashlib.sha256(ident.encode()).hexdigest()[:32]
        self._tag: str | None = None
        self.session_id: str | None = None
        self.uploads = 0

    @property
    def input_range(self):
        """The model's calibrated input range (per feature) from its client bundle:
        what ``check_range`` refuses outside and ``clip`` clamps into."""
        return self.crypto.bundle.input_range

    # -- bundle and keys ----------------------------------------------------------------
    def _fetch_bundle(self) -> ClientBundle:
        # Cached per server: a bundle is trusted only from the server that sent it.
        server = hashlib.sha256(self._client.url.encode()).hexdigest()[:16]
        d = private_dir(self._client.key_dir / "bundles" / f"{server}-{self.model_id}")
        try:
            cached = ClientBundle.load(d)
            if cached.model_id == self.model_id:
                return cached
        except BundleError:
            pass
        blob = self._client._call("GET", f"/v1/models/{self._client.model}/he/client-bundle",
                                  expect="bytes")
        unpack_client_bundle(blob, d)
        return ClientBundle.load(d)

    def _keys_path(self) -> Path:
        return self.dir / "keys.veil"

    def _evaluation_path(self) -> Path:
        return self.dir / "evaluation.veil"

    def _ensure_keys(self) -> None:
        if self._tag is not None:
            return
        private_dir(self.dir)
        path = self._keys_path()
        if path.exists():
            try:
                header, parts = unpack(path.read_bytes(), KEYS_KIND)
                self.crypto.load_secret_key(SecretKey.from_bytes(parts["secret"]))
                self._tag = str(header["tag"])
                return
            except (SerializationError, KeyMismatchError, KeyError, OSError) as exc:
                log.warning("ignoring unreadable keys in %s (%s); generating new ones",
                            path, exc)
        with self._status("generating HE keys"):
            keys = self.crypto.keygen()
        # the evaluation keys in their own file, written part by part (a bootstrapped
        # model's are many GiB), then the secret key's envelope naming it
        evaluation = self._evaluation_path()
        tmp = evaluation.with_name(f".{evaluation.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        self.crypto.write_evaluation_keys(tmp, forget=True)
        os.replace(tmp, evaluation)
        blob = pack(KEYS_KIND, {"secret": self.crypto.secret_key().to_bytes()},
                    {"model": self.model_id, "tag": keys.tag,
                     "evaluation": evaluation.name})
        _write_atomic_private(path, blob)
        self._tag = keys.tag
        self.session_id = None

    # -- sessions -----------------------------------------------------------------------
    def _saved_session(self) -> str | None:
        try:
            saved = json.loads((self.dir / "session.json").read_text())
            if saved.get("tag") == self._tag and isinstance(saved.get("session"), str):
                return saved["session"]
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def _ensure_session(self) -> str:
        self._ensure_keys()
        if self.session_id is None:
            self.session_id = self._saved_session()
        return self.session_id or self._upload()

    def _upload(self) -> str:
        """Upload the evaluation keys; persists and returns the new session id."""
        header, parts = unpack(self._keys_path().read_bytes(), KEYS_KIND)
        if "evaluation" in parts:        # keys written by an earlier veil: one envelope
            data = parts["evaluation"]
            body, size = self._chunks(lambda n, at: data[at:at + n], len(data)), len(data)
        else:
            path = self._evaluation_path()
            size = path.stat().st_size
            source = open(path, "rb")
            body = self._chunks(lambda n, at: source.read(n), size, source)
        answer = self._client._call(
            "POST", f"/v1/models/{self._client.model}/he/sessions",
            content=body, headers={"Content-Length": str(size)})
        self.session_id = answer["session"]
        self.uploads += 1
        _write_atomic_private(self.dir / "session.json", json.dumps(
            {"session": self.session_id, "tag": self._tag,
             "expires_at": answer.get("expires_at")}).encode())
        return self.session_id

    def _with_session(self, fn):
        """``fn(session_id)``; a session the server lost is re-created once."""
        sid = self._ensure_session()
        try:
            return fn(sid)
        except NotFoundError:
            log.info("session %s… is gone on the server; uploading the keys again", sid[:8])
            self.session_id = None
            return fn(self._upload())

    def delete_session(self) -> None:
        """Delete the session on the server (keys stay here; the next call re-uploads)."""
        self._ensure_keys()
        sid = self.session_id or self._saved_session()
        if sid is not None:
            try:
                self._client._call("DELETE", f"/v1/he/sessions/{sid}", expect=None)
            except NotFoundError:
                pass
        self.session_id = None
        (self.dir / "session.json").unlink(missing_ok=True)

    # -- encrypted weights ----------------------------------------------------------------
    def public_key(self) -> bytes:
        """This client's public key (``PublicKey`` envelope): a model owner encrypts
        its weights under it. It reveals nothing secret."""
        self._ensure_keys()
        return self.crypto.public_key().to_bytes()

    def weights_request(self) -> bytes:
        """What the model owner needs to upload weights for this client's session: the
        session id (created now if needed), the model, and :meth:`public_key`. Hand it
        over out of band (not through the host, which could swap the key); the owner
        passes it to :meth:`veil.sdk.owner.ModelOwner.upload_weights`."""
        sid = self._ensure_session()
        return pack(WEIGHTS_REQUEST_KIND, {"public_key": self.public_key()},
                    {"session": sid, "model": self._client.model, "model_id": self.model_id})

    # -- the mode interface -------------------------------------------------------------
    def encrypt(self, x) -> HEPayload:
        """One input, or a batch of up to ``lanes`` inputs (one ciphertext), under the
        input contract (:mod:`veil.backends.inputs`)."""
        batch, single = as_inputs(x, self.crypto.input_shape, max_batch=self.crypto.lanes)
        self._ensure_keys()
        return HEPayload.of(self.crypto.encrypt(batch), single)

    def infer(self, payload: bytes) -> bytes:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InputError("infer() takes the bytes of encrypt(); use predict() for arrays")
        answer = self._with_session(lambda sid: self._client._call(
            "POST", f"/v1/he/sessions/{sid}/infer", content=bytes(payload), expect="bytes"))
        return HEPayload.of(answer, getattr(payload, "single", True))

    def decrypt(self, result: bytes) -> np.ndarray:
        self._ensure_keys()
        if getattr(result, "single", True):
            return self.crypto.decrypt(result)
        return self.crypto.decrypt_batch([result])

    def infer_batch(self, xs) -> np.ndarray:
        """Outputs ``(B, *output_shape)`` for a batch (one input is a batch of one)."""
        xs, _ = as_inputs(xs, self.crypto.input_shape)   # before keys are made
        self._ensure_keys()
        cts = self.crypto.encrypt_batch(xs, layout=self.layout)
        outs: list[bytes] = []
        for group in self._groups(cts):
            blob = pack_batch(group)
            answer = self._with_session(lambda sid: self._client._call(
                "POST", f"/v1/he/sessions/{sid}/infer-batch", content=blob, expect="bytes"))
            outs += unpack_batch(answer, max_items=len(group), max_size=1 << 34)
        return self.crypto.decrypt_batch(outs)

    def _groups(self, cts: list[bytes]) -> Iterator[list[bytes]]:
        group: list[bytes] = []
        size = 0
        for ct in cts:
            if group and (len(group) >= self.max_batch
                          or size + len(ct) + 4096 > self.max_batch_bytes):
                yield group
                group, size = [], 0
            group.append(ct)
            size += len(ct) + 256
        if group:
            yield group

    def close(self) -> None:
        self.crypto.close()

    # -- progress (only when asked) -------------------------------------------------------
    @contextmanager
    def _status(self, text: str):
        if not self.progress:
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(text):
            yield

    def _chunks(self, read, size: int, source=None) -> Iterator[bytes]:
        """The upload body in chunks of ``read(n, offset)`` (a file is read as it goes,
        never held whole); closes ``source`` at the end."""
        try:
            if not self.progress:
                for at in range(0, size, UPLOAD_CHUNK):
                    yield bytes(read(UPLOAD_CHUNK, at))
                return
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TransferSpeedColumn)

            with Progress(TextColumn("uploading evaluation keys"), BarColumn(),
                          DownloadColumn(), TransferSpeedColumn(), transient=True) as bar:
                task = bar.add_task("upload", total=size)
                for at in range(0, size, UPLOAD_CHUNK):
                    chunk = bytes(read(UPLOAD_CHUNK, at))
                    yield chunk
                    bar.advance(task, len(chunk))
        finally:
            if source is not None:
                source.close()


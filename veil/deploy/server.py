"""The untrusted server's role: evaluates ciphertexts with evaluation keys only.

Every OpenFHE payload a client sends (evaluation keys, input ciphertexts, the model
owner's encrypted weights) is checked by the model's
:class:`~veil.backends.he.validate.PayloadValidator` before OpenFHE decodes it; the
:class:`ModelServer` builds that validator once (lazily, one throwaway key generation)
and every :class:`ServerSession` uses it, so an application that embeds ModelServer is
protected as the service is.

``open_session(..., namespace=...)`` keeps clients apart in OpenFHE's process-wide key
maps: the keys are inserted under a tag derived from the namespace and the client's tag
(:attr:`ServerSession.native_tag`), so no client can name another's keys.
"""
from __future__ import annotations

import os
import secrets
import threading

import numpy as np

from ..backends.he.evaluator import Evaluator
from ..backends.he.features import FeatureEvaluator
from ..backends.he.layout import part_names
from ..backends.he.openfhe_engine import (DEFAULT_KEY_CACHE_BYTES, EvaluationSession,
                                          native_tag, payload_validator)
from ..backends.he.validate import PayloadValidator
from ..compiler.plan import HEPlan
from ..errors import KeyMismatchError, KeyTypeError, MissingKeyError, SerializationError
from ..wire import pack, unpack
from .bundle import ServerBundle
from .keys import CIPHERTEXT_KIND, WEIGHTS_KIND, EvaluationKeys, SecretKey


class ServerSession:
    """One client's evaluation keys loaded for repeated inference. Close it when done."""

    def __init__(self, server: "ModelServer", keys: EvaluationKeys,
                 weights: bytes | None = None, namespace: str | None = None) -> None:
        if keys.model_id != server.bundle.model_id:
            raise KeyMismatchError("these evaluation keys were generated for another model")
        encrypted = server.bundle.weights == "encrypted"
        if encrypted and weights is None:
            raise MissingKeyError("this model's weights are encrypted: pass the model "
                                  "owner's encrypt_weights() output as weights=")
        if weights is not None and not encrypted:
            raise SerializationError("this server bundle has plaintext weights; export it "
                                     "with encrypted_weights=True to use encrypted ones")
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError("namespace must be a str or None")
        self._server = server
        self.tag = keys.tag
        #: The tag of these keys in OpenFHE's process-wide maps: the client's tag, or
        #: one derived from (namespace, client tag). At most one session per native tag.
        self.native_tag = ModelServer.native_tag(keys.tag, namespace)
        self._engine = EvaluationSession(server.bundle.params, keys.tag, keys.parts,
                                         server.bundle.manifest["rotations"],
                                         validator=server.validator,
                                         native_tag=self.native_tag,
                                         key_cache_bytes=server.key_cache_bytes)
        if weights is not None:
            try:
                self._load_weights(weights)
            except Exception:
                self._engine.close()
                raise

    def _load_weights(self, blob: bytes) -> None:
        header, parts = unpack(blob, WEIGHTS_KIND)
        if header.get("model") != self._server.bundle.model_id:
            raise KeyMismatchError("these encrypted weights belong to another model")
        if header.get("tag") != self.tag:
            raise KeyMismatchError("these weights were encrypted for another client")
        self._engine.load_weights(parts)

    def run(self, ciphertext: bytes) -> bytes:
        """Evaluate the model on one input ciphertext; returns the output ciphertext."""
        header, parts = unpack(ciphertext, CIPHERTEXT_KIND,
                               max_size=self._server.max_input_bytes)
        if header.get("model") != self._server.bundle.model_id:
            raise KeyMismatchError("this ciphertext was encrypted for another model")
        if header.get("layout") == "features":
            return self._run_features(header, parts)
        count = header.get("count", 1)
        plan = self._server.evaluator.plan
        names = part_names(plan.input_parts)
        if header.get("role") != "input" or sorted(parts) != sorted(names) \
                or not isinstance(count, int) or not 1 <= count <= plan.lanes:
            raise SerializationError("expected a model input ciphertext" + (
                f" in {len(names)} parts ({', '.join(names)})" if len(names) > 1 else ""))
        cts = [self._engine.load(parts[n]) for n in names]
        outs = self._server.evaluator.run_parts(self._engine, cts)
        return pack(CIPHERTEXT_KIND, {n: self._engine.dump(c) for n, c in
                                      zip(part_names(len(outs)), outs)},
                    {"model": self._server.bundle.model_id, "tag": self.tag,
                     "role": "output", "count": count,
                     "insecure": self._server.bundle.params.insecure_test_params})

    def _run_features(self, header: dict, parts: dict[str, bytes]) -> bytes:
        bundle = self._server.bundle
        count, width = header.get("count"), self._server.feature_width
        if (header.get("role") != "input" or not isinstance(count, int)
                or not 1 <= count <= bundle.params.slots
                or sorted(parts) != sorted(f"f{i}" for i in range(width))):
            raise SerializationError("expected a feature-layout input with one ciphertext "
                                     f"per each of {width} features")
        if bundle.weights == "encrypted":
            raise SerializationError("the feature layout does not support encrypted weights")
        if self._server.feature_evaluator is None:
            raise SerializationError("this model bootstraps: it takes slot-layout inputs "
                                     "only")
        cts = [self._engine.load(parts[f"f{i}"]) for i in range(width)]
        outs = self._server.feature_evaluator.run(self._engine, cts)
        return pack(CIPHERTEXT_KIND, {f"o{i}": self._engine.dump(c) for i, c in enumerate(outs)},
                    {"model": bundle.model_id, "tag": self.tag, "role": "output",
                     "layout": "features", "count": count,
                     "insecure": bundle.params.insecure_test_params})

    def run_batch(self, ciphertexts: list[bytes]) -> list[bytes]:
        """Evaluate each ciphertext of ``ModelClient.encrypt_batch``; same order."""
        return [self.run(ct) for ct in ciphertexts]

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> "ServerSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelServer:
    """Loads a server bundle; evaluates encrypted inputs. Never holds a secret key.

    ``key_cache_bytes``: for a model that bootstraps, the rotation keys each session
    holds in memory at once (default ``DEFAULT_KEY_CACHE_BYTES``, 3 GiB); the rest stay
    in the key file and are loaded when a layer needs them (see
    :mod:`veil.backends.he.keycache`).
    """

    def __init__(self, bundle: str | os.PathLike | ServerBundle, *,
                 key_cache_bytes: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, ServerBundle) else ServerBundle.load(bundle)
        self.key_cache_bytes = (DEFAULT_KEY_CACHE_BYTES if key_cache_bytes is None
                                else int(key_cache_bytes))
        self.evaluator = Evaluator(self.bundle.graph, HEPlan.from_manifest(
            self.bundle.params, self.bundle.manifest))
        # a bootstrapped model runs in the slot layout only (see estimate_costs)
        self.feature_evaluator = (None if self.bundle.params.bootstraps
                                  else FeatureEvaluator(self.bundle.graph))
        entry = self.bundle.manifest["input"]
        self.feature_width = (len(entry["gather"]) if "gather" in entry
                              else int(np.prod(entry["shape"])))
        # bundle.max_input_bytes: the HTTP service computes it without loading OpenFHE
        self.max_input_bytes = self.bundle.max_input_bytes
        self._validator: PayloadValidator | None = None
        self._validator_lock = threading.Lock()

    @property
    def validator(self) -> PayloadValidator:
        """The checks of client payloads for this model, built on first use (one
        throwaway key generation with the manifest's rotations)."""
        with self._validator_lock:
            if self._validator is None:
                self._validator = payload_validator(self.bundle.params,
                                                    self.bundle.manifest["rotations"])
            return self._validator

    @staticmethod
    def native_tag(tag: str, namespace: str | None = None) -> str:
        """The tag keys with client tag ``tag`` get in OpenFHE's maps when opened with
        ``namespace`` (what :attr:`ServerSession.native_tag` will be), so a session
        layer can tell before loading whether the key set is already loaded."""
        return tag if namespace is None else native_tag(namespace, tag)

    def open_session(self, evaluation_keys: bytes | EvaluationKeys, *,
                     weights: bytes | None = None,
                     namespace: str | None = None) -> ServerSession:
        """Load a client's evaluation keys (bytes from ``ModelClient.evaluation_keys``).

        ``weights``: for a bundle exported with ``encrypted_weights=True``, the model
        owner's ``encrypt_weights`` output for this client.
        ``namespace``: who the keys belong to (the service passes the API client id).
        When given, the keys live in OpenFHE's maps under a tag derived from it and the
        client's tag (``ServerSession.native_tag``), so two namespaces may load keys
        with the same client tag and neither can displace the other's.
        """
        if isinstance(evaluation_keys, SecretKey):
            raise KeyTypeError("servers never accept secret keys; send evaluation_keys()")
        keys = (evaluation_keys if isinstance(evaluation_keys, EvaluationKeys)
                else EvaluationKeys.from_bytes(evaluation_keys))
        return ServerSession(self, keys, weights, namespace)

    def check_keys(self, evaluation_keys: bytes | EvaluationKeys) -> None:
        """Validate a client's evaluation keys by loading them into OpenFHE, then drop
        them. For a bundle with encrypted weights, whose sessions open only with the
        model owner's weights (which arrive later), so bad keys are refused when they
        arrive. They load under a throwaway tag, so a session holding the same keys is
        untouched."""
        if isinstance(evaluation_keys, SecretKey):
            raise KeyTypeError("servers never accept secret keys; send evaluation_keys()")
        keys = (evaluation_keys if isinstance(evaluation_keys, EvaluationKeys)
                else EvaluationKeys.from_bytes(evaluation_keys))
        if keys.model_id != self.bundle.model_id:
            raise KeyMismatchError("these evaluation keys were generated for another model")
        probe = native_tag(f"veil-check-keys/{secrets.token_hex(16)}", keys.tag)
        EvaluationSession(self.bundle.params, keys.tag, keys.parts,
                          self.bundle.manifest["rotations"], validator=self.validator,
                          native_tag=probe, key_cache_bytes=self.key_cache_bytes).close()

    def run(self, ciphertext: bytes, evaluation_keys: bytes | EvaluationKeys) -> bytes:
        """One-shot inference: load keys, evaluate, drop keys."""
        with self.open_session(evaluation_keys) as session:
            return session.run(ciphertext)

"""The untrusted server's role: evaluates ciphertexts with evaluation keys only."""
from __future__ import annotations

import os

import numpy as np

from ..backends.he.evaluator import Evaluator
from ..backends.he.features import FeatureEvaluator
from ..backends.he.openfhe_engine import EvaluationSession
from ..compiler.plan import HEPlan
from ..errors import KeyMismatchError, KeyTypeError, MissingKeyError, SerializationError
from ..wire import pack, unpack
from .bundle import ServerBundle
from .keys import CIPHERTEXT_KIND, WEIGHTS_KIND, EvaluationKeys, SecretKey


class ServerSession:
    """One client's evaluation keys loaded for repeated inference. Close it when done."""

    def __init__(self, server: "ModelServer", keys: EvaluationKeys,
                 weights: bytes | None = None) -> None:
        if keys.model_id != server.bundle.model_id:
            raise KeyMismatchError("these evaluation keys were generated for another model")
        encrypted = server.bundle.weights == "encrypted"
        if encrypted and weights is None:
            raise MissingKeyError("this model's weights are encrypted: pass the model "
                                  "owner's encrypt_weights() output as weights=")
        if weights is not None and not encrypted:
            raise SerializationError("this server bundle has plaintext weights; export it "
                                     "with encrypted_weights=True to use encrypted ones")
        self._server = server
        self.tag = keys.tag
        self._engine = EvaluationSession(server.bundle.params, keys.tag, keys.parts,
                                         server.bundle.manifest["rotations"])
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
        if header.get("role") != "input" or "ct" not in parts or not isinstance(count, int) \
                or not 1 <= count <= self._server.evaluator.plan.lanes:
            raise SerializationError("expected a model input ciphertext")
        ct = self._engine.load(parts["ct"])
        out = self._server.evaluator.run(self._engine, ct)
        return pack(CIPHERTEXT_KIND, {"ct": self._engine.dump(out)},
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
    """Loads a server bundle; evaluates encrypted inputs. Never holds a secret key."""

    def __init__(self, bundle: str | os.PathLike | ServerBundle) -> None:
        self.bundle = bundle if isinstance(bundle, ServerBundle) else ServerBundle.load(bundle)
        self.evaluator = Evaluator(self.bundle.graph, HEPlan.from_manifest(
            self.bundle.params, self.bundle.manifest))
        self.feature_evaluator = FeatureEvaluator(self.bundle.graph)
        entry = self.bundle.manifest["input"]
        self.feature_width = (len(entry["gather"]) if "gather" in entry
                              else int(np.prod(entry["shape"])))
        # bundle.max_input_bytes: the HTTP service computes it without loading OpenFHE
        self.max_input_bytes = self.bundle.max_input_bytes

    def open_session(self, evaluation_keys: bytes | EvaluationKeys, *,
                     weights: bytes | None = None) -> ServerSession:
        """Load a client's evaluation keys (bytes from ``ModelClient.evaluation_keys``).

        ``weights``: for a bundle exported with ``encrypted_weights=True``, the model
        owner's ``encrypt_weights`` output for this client.
        """
        if isinstance(evaluation_keys, SecretKey):
            raise KeyTypeError("servers never accept secret keys; send evaluation_keys()")
        keys = (evaluation_keys if isinstance(evaluation_keys, EvaluationKeys)
                else EvaluationKeys.from_bytes(evaluation_keys))
        return ServerSession(self, keys, weights)

    def run(self, ciphertext: bytes, evaluation_keys: bytes | EvaluationKeys) -> bytes:
        """One-shot inference: load keys, evaluate, drop keys."""
        with self.open_session(evaluation_keys) as session:
            return session.run(ciphertext)

"""The only module that imports OpenFHE. Everything else talks to the classes here.

Roles are separate classes: :class:`ClientCrypto` owns a key pair (and so the secret
key), :class:`EvaluationSession` owns only evaluation keys and evaluates. Both build
their CryptoContext from :class:`~veil.compiler.plan.CKKSParams`.

OpenFHE keeps evaluation keys in process-wide maps keyed by the secret key's tag.
Each object here inserts its keys under its own tag and removes exactly those on
``close()``. The maps are native global state shared by all sessions in the process,
and OpenFHE releases the GIL while it computes, so ``_KEYMAPS`` is a readers-writer
lock: every native evaluation reads them (shared), and inserting or removing keys
(key generation, loading a session, closing one) writes them (exclusive).
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any

import numpy as np

# libgomp reads its spin policy once, when it loads with OpenFHE. Its default spins idle
# threads for ~300k iterations: with two OpenFHE processes on a 2-core machine a rotation
# took 176 ms instead of 23 ms (bench/engine_ops.py); a short spin keeps the
# single-process speed. Only a default: an explicit setting by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import openfhe as ofhe  # noqa: E402

from ...compiler.plan import CKKSParams
from ...errors import EngineError, KeyMismatchError, MissingKeyError, SerializationError

log = logging.getLogger(__name__)
class _KeyMapLock:
    """Readers-writer lock over OpenFHE's key maps. Writers are preferred (a waiting
    key load is not starved by a stream of evaluations) and may re-enter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = self._waiting = self._depth = 0
        self._writer: int | None = None

    @contextmanager
    def read(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:          # a writer may evaluate inside its own write
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            if self._writer != me:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                self._waiting += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


_KEYMAPS = _KeyMapLock()
OPENFHE_VERSION = getattr(ofhe, "__version__", "1.6.1.0.22.4")
_SECURITY = {"HEStd_128_classic": ofhe.HEStd_128_classic,
             "HEStd_192_classic": ofhe.HEStd_192_classic,
             "HEStd_256_classic": ofhe.HEStd_256_classic,
             "HEStd_NotSet": ofhe.HEStd_NotSet}


def build_context(params: CKKSParams):
    """A CKKS CryptoContext for ``params``; raises EngineError if OpenFHE rejects them."""
    p = ofhe.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.mult_depth)
    p.SetScalingModSize(params.scaling_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetSecurityLevel(_SECURITY[params.security])
    p.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
    p.SetKeySwitchTechnique(ofhe.HYBRID)
    p.SetNumLargeDigits(params.num_large_digits)
    p.SetRingDim(params.ring_dim)
    p.SetBatchSize(params.slots)
    try:
        cc = ofhe.GenCryptoContext(p)
    except RuntimeError as exc:
        raise EngineError(f"OpenFHE rejected the CKKS parameters {params}: {exc}") from exc
    if cc.GetRingDimension() != params.ring_dim:
        raise EngineError(f"OpenFHE chose ring {cc.GetRingDimension()} for {params}")
    for feature in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE, ofhe.ADVANCEDSHE):
        cc.Enable(feature)
    return cc


def _remove_tag(cc, tag: str) -> None:
    """Drop one tag's keys from OpenFHE's global maps, keeping every other tag's."""
    with _KEYMAPS.write():
        mult = {t: list(v) for t, v in cc.GetAllEvalMultKeys().items() if t != tag}
        auto = {t: v for t, v in cc.GetAllEvalAutomorphismKeys().items() if t != tag}
        ofhe.ClearEvalMultKeys()
        cc.ClearEvalAutomorphismKeys()
        for t, keys in mult.items():
            cc.InsertEvalMultKey(keys, t)
        for t, keymap in auto.items():
            cc.InsertEvalAutomorphismKey(keymap, t)


def serialize_ciphertext(ct) -> bytes:
    return ofhe.Serialize(ct, ofhe.BINARY)


def deserialize_ciphertext(data: bytes):
    try:
        ct = ofhe.DeserializeCiphertextString(data, ofhe.BINARY)
    except RuntimeError as exc:
        raise SerializationError("ciphertext bytes could not be decoded") from exc
    if ct is None:          # some malformed inputs (e.g. a zeroed header) give None, no error
        raise SerializationError("ciphertext bytes could not be decoded")
    return ct


class ClientCrypto:
    """Key owner: generates keys, encrypts, decrypts. Holds the secret key in memory."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.cc = build_context(params)
        self._secret = None
        self._public = None

    @property
    def tag(self) -> str:
        self._require_keys()
        return self._secret.GetKeyTag()

    def _require_keys(self) -> None:
        if self._secret is None:
            raise MissingKeyError("no keys yet: call keygen() or load a secret key first")

    def keygen(self, rotations: list[int]) -> dict[str, bytes]:
        """Generate a key pair and exactly the listed rotation keys; return them serialized.

        The evaluation keys leave OpenFHE's global maps right after serialization: the
        client never evaluates, and another session in this process must not find them.
        """
        with _KEYMAPS.write():
            keys = self.cc.KeyGen()
            tag = keys.secretKey.GetKeyTag()
            try:
                self.cc.EvalMultKeyGen(keys.secretKey)
                if rotations:
                    self.cc.EvalRotateKeyGen(keys.secretKey, [int(r) for r in rotations])
                mult = ofhe.Serialize(self.cc.GetEvalMultKeyVector(tag)[0], ofhe.BINARY)
                rot = (ofhe.Serialize(self.cc.GetEvalAutomorphismKeyMap(tag), ofhe.BINARY)
                       if rotations else b"")
            finally:
                _remove_tag(self.cc, tag)
        self._secret, self._public = keys.secretKey, keys.publicKey
        return {"mult": bytes(mult), "rotations": bytes(rot)}

    def secret_key_bytes(self) -> bytes:
        self._require_keys()
        return bytes(ofhe.Serialize(self._secret, ofhe.BINARY))

    def public_key_bytes(self) -> bytes:
        self._require_keys()
        return bytes(ofhe.Serialize(self._public, ofhe.BINARY))

    def load_keys(self, secret: bytes, public: bytes) -> None:
        try:
            sk = ofhe.DeserializePrivateKeyString(secret, ofhe.BINARY)
            pk = ofhe.DeserializePublicKeyString(public, ofhe.BINARY)
        except (RuntimeError, TypeError) as exc:
            raise SerializationError("key bytes could not be decoded") from exc
        if sk.GetKeyTag() != pk.GetKeyTag():
            raise KeyMismatchError("the public key does not belong to this secret key")
        self._secret, self._public = sk, pk

    def encrypt(self, values: np.ndarray) -> bytes:
        self._require_keys()
        pt = self.cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64))
        return bytes(serialize_ciphertext(self.cc.Encrypt(self._public, pt)))

    def decrypt(self, data: bytes, length: int) -> np.ndarray:
        self._require_keys()
        ct = deserialize_ciphertext(data)
        if ct.GetKeyTag() != self.tag:
            raise KeyMismatchError("this ciphertext was produced under another client's keys")
        try:
            pt = self.cc.Decrypt(self._secret, ct)
        except RuntimeError as exc:
            raise EngineError(f"decryption failed: {exc}") from exc
        pt.SetLength(length)
        return np.array(pt.GetRealPackedValue()[:length], dtype=np.float64)

    def close(self) -> None:
        self._secret = self._public = None

    def __enter__(self) -> "ClientCrypto":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def weight_key(cache_key: tuple) -> str:
    """Stable text name of an evaluator cache key (used on the wire for weights)."""
    return "/".join(str(k) for k in cache_key)


class WeightEncryptor:
    """Model owner's side of encrypted weights: encrypts under a client's public key."""

    def __init__(self, params: CKKSParams, public_key: bytes) -> None:
        self.cc = build_context(params)
        try:
            self._public = ofhe.DeserializePublicKeyString(public_key, ofhe.BINARY)
        except (RuntimeError, TypeError) as exc:
            raise SerializationError("public key bytes could not be decoded") from exc

    @property
    def tag(self) -> str:
        return self._public.GetKeyTag()

    def encrypt(self, values: np.ndarray) -> bytes:
        pt = self.cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64))
        return bytes(serialize_ciphertext(self.cc.Encrypt(self._public, pt)))


class EvaluationSession:
    """Server side: evaluation keys of one client under one tag, and the HE operations.

    Implements the evaluator's ``SlotEngine`` protocol. Holds no secret key: it is built
    only from serialized evaluation keys.
    """

    def __init__(self, params: CKKSParams, tag: str, key_parts: dict[str, bytes],
                 rotations: list[int]) -> None:
        self.params, self.tag, self.slots = params, tag, params.slots
        self.cc = build_context(params)
        self._plaintexts: dict[tuple, Any] = {}
        self._weights: dict[str, Any] | None = None
        self._closed = False
        with _KEYMAPS.write():
            if tag in self.cc.GetAllEvalMultKeys():
                raise KeyMismatchError("these evaluation keys are already loaded by another "
                                       "session; open one session per key set")
            try:
                mult = ofhe.DeserializeEvalKeyString(key_parts["mult"], ofhe.BINARY)
                auto = (ofhe.DeserializeEvalKeyMapString(key_parts["rotations"], ofhe.BINARY)
                        if key_parts.get("rotations") else None)
            except (RuntimeError, KeyError) as exc:
                raise SerializationError("evaluation key bytes could not be decoded") from exc
            if mult is None or (key_parts.get("rotations") and auto is None):
                raise SerializationError("evaluation key bytes could not be decoded")
            self.cc.InsertEvalMultKey([mult], tag)
            if auto is not None:
                self.cc.InsertEvalAutomorphismKey(auto, tag)
            present = set(self.cc.GetExistingEvalAutomorphismKeyIndices(tag)) if auto else set()
        self._rotations = {int(r) for r in rotations
                           if self.cc.FindAutomorphismIndex(int(r)) in present}
        missing = sorted(set(int(r) for r in rotations) - self._rotations)
        if missing:
            self.close()
            raise MissingKeyError(f"the evaluation keys lack rotation keys for {missing}; "
                                  "regenerate them from this model's client bundle")

    # -- ciphertext I/O -------------------------------------------------------------------
    def load(self, data: bytes):
        """Deserialize a client ciphertext and check it belongs to this session."""
        self._check_open()
        ct = deserialize_ciphertext(data)
        if ct.GetKeyTag() != self.tag:
            raise KeyMismatchError("the ciphertext was encrypted under other keys than this "
                                   "session's evaluation keys")
        ring = ct.GetCryptoContext().GetRingDimension()
        if (ring != self.params.ring_dim or ct.NumberCiphertextElements() != 2
                or ct.GetLevel() != 0 or ct.GetNoiseScaleDeg() != 1):
            raise SerializationError("the ciphertext does not match this model's parameters "
                                     "(ring dimension, level or size)")
        # A deserialized ciphertext refers to its CryptoContext through a pointer that is
        # not this context's own, and every OpenFHE call on it then pays a ~4 ms context
        # check (bench/engine_ops.py: EvalAdd 4.1 ms vs 0.17 ms). Compress with more
        # towers than the ciphertext has changes no value and returns a ciphertext bound
        # to this context.
        return self._native(self.cc.Compress, ct, 1 << 10)

    def dump(self, ct) -> bytes:
        return bytes(serialize_ciphertext(ct))

    def load_weights(self, weights: dict[str, bytes]) -> None:
        """Use encrypted weights (model owner's ciphertexts under this client's key)
        instead of plaintext vectors: products become ciphertext x ciphertext."""
        loaded = {}
        for key, blob in weights.items():
            ct = deserialize_ciphertext(blob)
            if ct.GetKeyTag() != self.tag:
                raise KeyMismatchError("the encrypted weights were encrypted for another "
                                       "client's public key")
            loaded[key] = self._native(self.cc.Compress, ct, 1 << 10)
        self._weights = loaded

    def _weight(self, cache_key: tuple | None):
        try:
            return self._weights[weight_key(cache_key)]
        except (KeyError, TypeError):
            raise MissingKeyError(f"the encrypted weights lack {cache_key}: encrypt them "
                                  "from this exact compiled model") from None

    # -- SlotEngine -----------------------------------------------------------------------
    def _encode(self, values: np.ndarray, like, cache_key: tuple | None):
        key = None
        if cache_key is not None:
            key = cache_key + (like.GetLevel(), like.GetNoiseScaleDeg())
            hit = self._plaintexts.get(key)
            if hit is not None:
                return hit
        pt = self.cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64),
                                             like.GetNoiseScaleDeg(), like.GetLevel())
        if key is not None:
            self._plaintexts[key] = pt
        return pt

    def add(self, a, b):
        return self._native(self.cc.EvalAdd, a, b)

    def add_plain(self, a, values, cache_key=None):
        if self._weights is not None:
            return self._native(self.cc.EvalAdd, a, self._weight(cache_key))
        return self._native(self.cc.EvalAdd, a, self._encode(values, a, cache_key))

    def mul_plain(self, a, values, cache_key=None):
        if self._weights is not None:
            return self._native(self.cc.EvalMult, a, self._weight(cache_key))
        return self._native(self.cc.EvalMult, a, self._encode(values, a, cache_key))

    def settle(self, a):
        """Finish a pending rescale (scale degree 2 -> 1) once, before a ciphertext is
        multiplied many times: FLEXIBLEAUTO would otherwise redo it inside every product.
        ``Compress`` with more towers than the ciphertext has only rescales."""
        if a.GetNoiseScaleDeg() < 2:
            return a
        return self._native(self.cc.Compress, a, 1 << 10)

    def _require_rotation(self, k: int) -> None:
        if k not in self._rotations:
            raise MissingKeyError(f"no rotation key for index {k} in this session")

    def rotate(self, a, k):
        self._require_rotation(k)
        return self._native(self.cc.EvalRotate, a, int(k))

    def rotate_hoisted(self, a, ks):
        for k in ks:
            self._require_rotation(k)
        digits = self._native(self.cc.EvalFastRotationPrecompute, a)
        return {k: self._native(self.cc.EvalFastRotation, a, int(k), digits) for k in ks}

    def square(self, a):
        return self._native(self.cc.EvalSquare, a)

    # -- FeatureEngine (throughput layout) ----------------------------------------------
    def linear_sum(self, cts, weights):
        if len(cts) == 1:
            return self._native(self.cc.EvalMult, cts[0], float(weights[0]))
        return self._native(self.cc.EvalLinearWSum, list(cts), [float(w) for w in weights])

    def add_scalar(self, a, value):
        return self._native(self.cc.EvalAdd, a, float(value))

    def chebyshev(self, a, coeffs, lo, hi):
        # OpenFHE's series convention halves the constant term: pass 2*c0.
        series = [float(c) for c in coeffs]
        series[0] *= 2.0
        return self._native(self.cc.EvalChebyshevSeries, a, series, float(lo), float(hi))

    def _native(self, fn, *args):
        self._check_open()
        try:
            with _KEYMAPS.read():
                return fn(*args)
        except RuntimeError as exc:
            raise EngineError(f"homomorphic evaluation failed: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("this evaluation session is closed")

    def close(self) -> None:
        """Remove this session's keys from OpenFHE's global maps and drop cached plaintexts."""
        if not self._closed:
            self._closed = True
            self._plaintexts.clear()
            _remove_tag(self.cc, self.tag)

    def __enter__(self) -> "EvaluationSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""The server's side of CKKS: :class:`EvaluationSession` holds one client's
evaluation keys (never a secret key) and performs the homomorphic operations the
evaluator asks for.

Roles are separate classes: :class:`~.openfhe_client.ClientCrypto` owns a key pair
(and so the secret key), :class:`EvaluationSession` owns only evaluation keys and
evaluates. Both build their CryptoContext from
:class:`~veil.compiler.plan.CKKSParams` (:func:`~.openfhe_native.build_context`). This
module re-exports the client side's names, so ``openfhe_engine`` is the one import
for callers.

Untrusted bytes: every ciphertext and evaluation key an :class:`EvaluationSession`
deserializes was first checked by a :class:`~veil.backends.he.validate.PayloadValidator`
(see :func:`payload_validator`), so OpenFHE's deserializers only ever see bytes laid
out exactly like the server's own payloads.

Key tags: a session may insert its keys under a *native* tag other than the client's
(``native_tag``, see :func:`native_tag`), so one client cannot name another's keys in
OpenFHE's process-wide maps. Ciphertexts must carry the client's tag; they are re-tagged
after decoding, and outputs carry the client's tag again. A bootstrapped model's
rotation keys are loaded one at a time, each under a tag of its own (see
:meth:`EvaluationSession._under`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import (EngineError, KeyMismatchError, MissingKeyError, SerializationError,
                       VeilError)
from .keycache import KeyCache
from .keyparts import BOOTSTRAP, SpooledPart, is_per_key, rotation_part
from .native import release_native_memory
from .openfhe_client import (ClientCrypto, WeightEncryptor, payload_validator,  # noqa: F401
                             weight_key)
from .openfhe_native import (_KEYMAPS, OPENFHE_VERSION, CKKSParams,  # noqa: F401
                             _remove_tag, build_context, deserialize_ciphertext,
                             native_call, native_tag, ofhe, serialize_ciphertext)
from .validate import PayloadValidator

__all__ = ["DEFAULT_KEY_CACHE_BYTES", "ClientCrypto", "EvaluationSession", "OPENFHE_VERSION",
           "WeightEncryptor", "build_context", "deserialize_ciphertext", "native_call",
           "native_tag", "payload_validator", "serialize_ciphertext", "weight_key"]

# Plaintext weights a session keeps encoded (per level) for its next requests; beyond
# this a layer's weights are encoded each time they are used (deep networks: hundreds
# of ring-2^16 plaintexts per layer, several MiB each).
PLAINTEXT_CACHE_BYTES = 2 << 30
# A bootstrapped model's session spends its memory on keys instead (ResNet-20 at ring
# 2^16: 6.8 GiB of bootstrapping keys and 4.3 GiB of bootstrap precomputations), and
# holds at most DEFAULT_KEY_CACHE_BYTES of rotation keys at once (136 MiB a key, up to
# 31 a layer; one part per key, loaded per layer: see .keycache).
BOOT_PLAINTEXT_CACHE_BYTES = 256 << 20
DEFAULT_KEY_CACHE_BYTES = 3 << 30


class EvaluationSession:
    """Server side: evaluation keys of one client under one tag, and the HE operations.

    Implements the evaluator's ``SlotEngine`` protocol. Holds no secret key: it is built
    only from serialized evaluation keys, which ``validator`` checks before OpenFHE
    reads them (built from ``params`` and ``rotations`` when not given: pass one
    :func:`payload_validator` per model to avoid a key generation per session).

    ``tag`` is the client's key tag: keys, ciphertexts and encrypted weights must carry
    it. ``native_tag`` (default: ``tag``) is the tag the keys get in OpenFHE's
    process-wide maps; ciphertexts are re-tagged to it after decoding and back to
    ``tag`` by :meth:`dump`.
    """

    def __init__(self, params: CKKSParams, tag: str, key_parts: dict[str, bytes],
                 rotations: list[int], *, validator: PayloadValidator | None = None,
                 native_tag: str | None = None,
                 key_cache_bytes: int = DEFAULT_KEY_CACHE_BYTES) -> None:
        self.params, self.tag, self.slots = params, tag, params.slots
        self.native_tag = tag if native_tag is None else native_tag
        self._closed = True             # nothing to remove from OpenFHE's maps yet
        self._keys: KeyCache | None = None
        self._rotation_tags: dict[int, str] = {}
        self._spooled: dict[int, SpooledPart] = {}     # rotation -> its checked copy
        if validator is None:
            validator = payload_validator(params, rotations)
        if validator.params_key != (params, tuple(sorted({int(r) for r in rotations}))):
            raise EngineError("the payload validator was built for other parameters or "
                              "rotations than this session's")
        self._validator = validator
        if not isinstance(key_parts, dict):
            raise SerializationError("evaluation keys must be a dict of byte strings")
        if validator.per_key != is_per_key(key_parts):
            raise SerializationError("these evaluation keys are not laid out for this "
                                     "model (one part per rotation key for a model that "
                                     "bootstraps, one key map otherwise)")
        if validator.per_key:
            # each rotation key copied once to a private unnamed file and checked
            # there; OpenFHE later reads that copy when a layer needs the key
            validator.check_key_layout(key_parts, tag)
            try:
                for r in sorted({int(r) for r in rotations}):
                    part = self._spooled[r] = SpooledPart(key_parts[rotation_part(r)])
                    with part.view() as view:
                        validator.check_rotation(r, view, tag)
            except BaseException:
                self._close_spooled()
                raise
        else:
            validator.check_eval_keys(key_parts, tag)
        self.cc = build_context(params)
        self._plaintexts: dict[tuple, Any] = {}
        self._cached_bytes = 0
        self._plaintext_cap = (BOOT_PLAINTEXT_CACHE_BYTES if validator.per_key
                               else PLAINTEXT_CACHE_BYTES)
        self._weights: dict[str, Any] | None = None
        with _KEYMAPS.write():
            if self.native_tag in self.cc.GetAllEvalMultKeys():
                raise KeyMismatchError("these evaluation keys are already loaded by another "
                                       "session; open one session per key set")
            self._closed = False
        try:
            if validator.per_key:
                auto = self._load_bootstrap_keys(key_parts[BOOTSTRAP])
            else:
                rot = key_parts.get("rotations")
                auto = (self._decode_keys(bytes(rot), ofhe.DeserializeEvalKeyMapString)
                        if rot is not None and memoryview(rot).nbytes else None)
                del rot
            mult = self._decode_keys(bytes(key_parts["mult"]), ofhe.DeserializeEvalKeyString)
            present = self._insert(mult, auto)
            del auto, mult
        except VeilError:
            self.close()
            raise
        if validator.per_key:
            # rotation keys stay in their checked copies, decoded when a layer needs
            # them, each under its own native tag (see _load_rotation)
            self._rotations = set(self._spooled)
            self._keys = KeyCache(key_cache_bytes, lambda k: self._spooled[k].nbytes,
                                  self._load_rotation, self._drop_rotation)
            present |= set(validator.rotation_index.values())   # checked: exact templates
        else:
            self._rotations = {int(r) for r in rotations
                               if self.cc.FindAutomorphismIndex(int(r)) in present}
        missing = sorted(set(int(r) for r in rotations) - self._rotations)
        if missing:
            self.close()
            raise MissingKeyError(f"the evaluation keys lack rotation keys for {missing}; "
                                  "regenerate them from this model's client bundle")
        if not set(validator.bootstrap_indices) <= present:
            self.close()
            raise MissingKeyError("the evaluation keys lack the bootstrapping keys; "
                                  "regenerate them from this model's client bundle")

    @staticmethod
    def _decode_keys(data: bytes, decoder):
        return native_call(SerializationError, "evaluation key bytes could not be decoded",
                           decoder, data, ofhe.BINARY)

    def _insert(self, mult, auto) -> set[int]:
        """Put the relinearization key and a key map under the native tag; the
        automorphism indices now there."""
        native = self.native_tag
        with _KEYMAPS.write():
            native_call(SerializationError, "evaluation keys could not be loaded",
                        self.cc.InsertEvalMultKey, [mult], native, none_ok=True)
            if auto is None:
                return set()
            native_call(SerializationError, "evaluation keys could not be loaded",
                        self.cc.InsertEvalAutomorphismKey, auto, native, none_ok=True)
            return set(native_call(EngineError, "rotation keys could not be listed",
                                   self.cc.GetExistingEvalAutomorphismKeyIndices, native))

    def _load_bootstrap_keys(self, part):
        """Copy the bootstrapping keys to a private unnamed file, check that copy and
        let OpenFHE read it (decoding GiB from bytes would hold them three times)."""
        copy = SpooledPart(part)
        try:
            with copy.view() as view:
                self._validator.boot.check(view, self.tag)
            return self._read_keys(copy, "bootstrapping keys could not be decoded")
        finally:
            copy.close()

    @staticmethod
    def _read_keys(copy: SpooledPart, message: str):
        keymap, ok = native_call(SerializationError, message, ofhe.DeserializeEvalKeyMap,
                                 copy.path, ofhe.BINARY)
        if not ok:
            raise SerializationError(message)
        return keymap

    def _rotation_tag(self, k: int) -> str:
        tag = self._rotation_tags.get(k)
        if tag is None:
            tag = native_tag(f"{self.native_tag}/rotation/{k}", self.native_tag)
            self._rotation_tags[k] = tag
        return tag

    def _load_rotation(self, k: int) -> None:
        self._check_open()
        keymap = self._read_keys(self._spooled[k], "a rotation key could not be decoded")
        with _KEYMAPS.write():
            native_call(SerializationError, "a rotation key could not be loaded",
                        self.cc.InsertEvalAutomorphismKey, keymap, self._rotation_tag(k),
                        none_ok=True)

    def _drop_rotation(self, k: int) -> None:
        _remove_tag(self.cc, self._rotation_tag(k))
        release_native_memory()

    # -- key schedule (rotation keys loaded per layer) --------------------------------------
    def schedule_keys(self, layers: list[set[int]]) -> None:
        """The rotation keys of each layer in evaluation order (see :mod:`.keycache`)."""
        if self._keys is not None:
            self._keys.schedule(layers)

    def enter_layer(self, index: int) -> None:
        if self._keys is not None:
            self._keys.enter(index)

    @property
    def key_stats(self) -> dict:
        """Rotation keys loaded so far and the most key bytes held at once."""
        if self._keys is None:
            return {"loads": 0, "peak_bytes": 0, "per_key": False}
        return {"loads": self._keys.loads, "peak_bytes": self._keys.peak, "per_key": True,
                "capacity_bytes": self._keys.capacity}

    # -- ciphertext I/O -------------------------------------------------------------------
    def _decode(self, data: bytes, what: str):
        """Validate, decode and re-tag one client ciphertext; bound to this context."""
        self._check_open()
        self._validator.check_ciphertext(data, self.tag)
        ct = deserialize_ciphertext(data)
        if ct.GetKeyTag() != self.tag:
            raise KeyMismatchError(f"the {what} was encrypted under other keys than this "
                                   "session's evaluation keys")
        ring = ct.GetCryptoContext().GetRingDimension()
        if (ring != self.params.ring_dim or ct.NumberCiphertextElements() != 2
                or ct.GetLevel() != 0 or ct.GetNoiseScaleDeg() != 1):
            raise SerializationError("the ciphertext does not match this model's parameters "
                                     "(ring dimension, level or size)")
        if self.native_tag != self.tag:
            native_call(EngineError, "the ciphertext could not be re-tagged", ct.SetKeyTag,
                        self.native_tag, none_ok=True)
        # A deserialized ciphertext refers to its CryptoContext through a pointer that is
        # not this context's own, and every OpenFHE call on it then pays a ~4 ms context
        # check (bench/engine_ops.py: EvalAdd 4.1 ms vs 0.17 ms). Compress with more
        # towers than the ciphertext has changes no value and returns a ciphertext bound
        # to this context.
        return self._native(self.cc.Compress, ct, 1 << 10)

    def load(self, data: bytes):
        """Validate and decode a client ciphertext that belongs to this session."""
        return self._decode(data, "ciphertext")

    def dump(self, ct) -> bytes:
        """Serialize an output ciphertext under the client's tag."""
        self._check_open()
        if self.native_tag == self.tag:
            return serialize_ciphertext(ct)
        native_call(EngineError, "the ciphertext could not be re-tagged", ct.SetKeyTag,
                    self.tag, none_ok=True)
        try:
            return serialize_ciphertext(ct)
        finally:
            ct.SetKeyTag(self.native_tag)

    def load_weights(self, weights: dict[str, bytes]) -> None:
        """Use encrypted weights (model owner's ciphertexts under this client's key)
        instead of plaintext vectors: products become ciphertext x ciphertext."""
        if not isinstance(weights, dict):
            raise SerializationError("encrypted weights must be a dict of ciphertexts")
        self._weights = {key: self._decode(blob, "encrypted weights")
                         for key, blob in weights.items()}

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
        # NTT form: one ring-size vector of 8-byte words per remaining modulus
        size = self.params.ring_dim * 8 * (self.params.mult_depth + 1 - like.GetLevel())
        if key is not None and self._cached_bytes + size <= self._plaintext_cap:
            self._plaintexts[key] = pt
            self._cached_bytes += size
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
        if self._keys is None:
            return self._native(self.cc.EvalRotate, a, int(k))
        self._keys.require([int(k)])
        return self._under(int(k), self.cc.EvalRotate, a, int(k))

    def rotate_hoisted(self, a, ks):
        for k in ks:
            self._require_rotation(k)
        digits = self._native(self.cc.EvalFastRotationPrecompute, a)
        if self._keys is None:
            return {k: self._native(self.cc.EvalFastRotation, a, int(k), digits)
                    for k in ks}
        # the digits need no key: each rotation loads its own key when it runs, so a
        # layer with more baby steps than the key budget holds stays within it
        out = {}
        for k in ks:
            self._keys.require([int(k)])
            out[k] = self._under(int(k), self.cc.EvalFastRotation, a, int(k), digits)
        return out

    def _under(self, k: int, fn, a, *args):
        """``fn(a, *args)`` with ``a`` tagged as rotation key ``k``'s own native tag
        (each loaded rotation key sits alone under one), the result tagged back."""
        tag = self._rotation_tag(k)
        a.SetKeyTag(tag)
        try:
            out = self._native(fn, a, *args)
        finally:
            a.SetKeyTag(self.native_tag)
        out.SetKeyTag(self.native_tag)
        return out

    def square(self, a):
        return self._native(self.cc.EvalSquare, a)

    def mul(self, a, b):
        """Product of two ciphertexts (relinearized; OpenFHE brings both to one level)."""
        return self._native(self.cc.EvalMult, a, b)

    def mul_scalar(self, a, value):
        return self._native(self.cc.EvalMult, a, float(value))

    def bootstrap(self, a):
        """Refresh ``a``'s levels (OpenFHE's EvalBootstrap over ``params.slots`` slots);
        its values should lie in [-1, 1] (the evaluator scales them there)."""
        if not self.params.bootstraps:
            raise EngineError("these CKKS parameters have no bootstrapping")
        return self._native(self.cc.EvalBootstrap, a)

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
        with _KEYMAPS.read():
            return native_call(EngineError, "homomorphic evaluation failed", fn, *args)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("this evaluation session is closed")

    def close(self) -> None:
        """Remove this session's keys from OpenFHE's global maps and drop cached plaintexts."""
        if not self._closed:
            self._closed = True
            self._plaintexts.clear()
            self._cached_bytes = 0
            self._keys = None
            _remove_tag(self.cc, {self.native_tag, *self._rotation_tags.values()})
            release_native_memory()
        self._close_spooled()

    def _close_spooled(self) -> None:
        for part in self._spooled.values():
            part.close()
        self._spooled = {}


    def __enter__(self) -> "EvaluationSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

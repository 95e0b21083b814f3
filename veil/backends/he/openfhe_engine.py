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

Untrusted bytes: every ciphertext and evaluation key an :class:`EvaluationSession`
deserializes was first checked by a :class:`~veil.backends.he.validate.PayloadValidator`
(see :func:`payload_validator`), so OpenFHE's deserializers only ever see bytes laid
out exactly like the server's own payloads. Every exception the binding raises, and
its ``None`` returns, become veil errors in :func:`native_call`: SerializationError
while decoding, EngineError while evaluating.

Key tags: a session may insert its keys under a *native* tag other than the client's
(``native_tag``, see :func:`native_tag`), so one client cannot name another's keys in
OpenFHE's process-wide maps. Ciphertexts must carry the client's tag; they are re-tagged
after decoding, and outputs carry the client's tag again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from typing import Any

import numpy as np

# libgomp reads its spin policy once, when it loads with OpenFHE. Its default spins idle
# threads for ~300k iterations: with two OpenFHE processes on a 2-core machine a rotation
# took 176 ms instead of 23 ms (bench/engine_ops.py); a short spin keeps the
# single-process speed. Only a default: an explicit setting by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import openfhe as ofhe  # noqa: E402

from ...compiler.plan import CKKSParams
from ...errors import (EngineError, KeyMismatchError, MissingKeyError, SerializationError,
                       VeilError)
from ...wire import FilePart, part_size
from .keycache import KeyCache
from .keyparts import (BOOTSTRAP, copy_part, is_per_key, mapped, remove_tree, rotation_part,
                       spool)
from .native import KeyMapLock, release_native_memory
from .validate import PayloadValidator, TemplateError, compile_checker, rotation_layout

log = logging.getLogger(__name__)
_KEYMAPS = KeyMapLock()
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
OPENFHE_VERSION = getattr(ofhe, "__version__", "1.6.1.0.22.4")
_SECURITY = {"HEStd_128_classic": ofhe.HEStd_128_classic,
             "HEStd_192_classic": ofhe.HEStd_192_classic,
             "HEStd_256_classic": ofhe.HEStd_256_classic,
             "HEStd_NotSet": ofhe.HEStd_NotSet}


_KEY_DISTS = {"UNIFORM_TERNARY": ofhe.UNIFORM_TERNARY,
              "SPARSE_TERNARY": ofhe.SPARSE_TERNARY,
              "SPARSE_ENCAPSULATED": ofhe.SPARSE_ENCAPSULATED}


def build_context(params: CKKSParams, *, precompute: bool = True):
    """A CKKS CryptoContext for ``params``; raises EngineError if OpenFHE rejects them.

    A bootstrapping context gets OpenFHE's bootstrap setup for ``params.slots`` slots:
    the rotation indices the client's key generation needs and, with ``precompute``,
    the encoded CoeffsToSlots / SlotsToCoeffs matrices the server's bootstraps use
    (4.3 GiB at ring 2^16 and 2^15 slots; without them one bootstrap took over 2
    minutes instead of 12 s, measured). Only an evaluating context precomputes.
    """
    p = ofhe.CCParamsCKKSRNS()
    p.SetSecretKeyDist(_KEY_DISTS[params.key_dist])
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
    if params.bootstraps:
        cc.Enable(ofhe.FHE)
        native_call(EngineError, "OpenFHE rejected the bootstrapping parameters",
                    cc.EvalBootstrapSetup, list(params.boot_budget), [0, 0], params.slots,
                    int(params.boot_correction), bool(precompute),
                    bool(params.boot_stc_first),
                    none_ok=True)
    return cc


def _remove_tag(cc, tag: str | set[str]) -> None:
    """Drop one tag's (or a set of tags') keys from OpenFHE's global maps, keeping
    every other tag's."""
    tags = {tag} if isinstance(tag, str) else set(tag)
    with _KEYMAPS.write():
        mult = {t: list(v) for t, v in cc.GetAllEvalMultKeys().items() if t not in tags}
        auto = {t: v for t, v in cc.GetAllEvalAutomorphismKeys().items() if t not in tags}
        ofhe.ClearEvalMultKeys()
        cc.ClearEvalAutomorphismKeys()
        for t, keys in mult.items():
            cc.InsertEvalMultKey(keys, t)
        for t, keymap in auto.items():
            cc.InsertEvalAutomorphismKey(keymap, t)


# Everything the pybind11 binding raises for a native failure: std::exception ->
# RuntimeError, std::bad_alloc -> MemoryError, std::length_error/invalid_argument ->
# ValueError, std::out_of_range -> IndexError, overflowing conversions -> OverflowError,
# argument mismatches -> TypeError, an error while an error was set -> SystemError.
_NATIVE_ERRORS = (RuntimeError, ValueError, TypeError, MemoryError, OverflowError,
                  IndexError, SystemError, KeyError)


def native_call(error: type[VeilError], message: str, fn, *args, none_ok: bool = False):
    """``fn(*args)`` with every binding exception (and, unless ``none_ok``, a ``None``
    result) raised as ``error(message)``; the native text goes to the chained cause and
    the debug log, not into the message for decoding errors."""
    try:
        out = fn(*args)
    except VeilError:
        raise
    except _NATIVE_ERRORS as exc:
        log.debug("native %s failed: %r", getattr(fn, "__name__", fn), exc)
        detail = f": {exc}" if error is EngineError else ""
        raise error(f"{message}{detail}") from exc
    if out is None and not none_ok:     # some malformed inputs give None, no error
        raise error(message)
    return out


def serialize_ciphertext(ct) -> bytes:
    return bytes(native_call(EngineError, "ciphertext could not be serialized",
                             ofhe.Serialize, ct, ofhe.BINARY))


def deserialize_ciphertext(data: bytes):
    """Decode a ciphertext. Servers call this only on validated bytes."""
    return native_call(SerializationError, "ciphertext bytes could not be decoded",
                       ofhe.DeserializeCiphertextString, data, ofhe.BINARY)


def native_tag(namespace: str, client_tag: str) -> str:
    """The tag a namespaced session's keys get in OpenFHE's maps: SHA-256 of the
    namespace and the client's tag, as lowercase hex of the client tag's length (the
    alphabet and length of OpenFHE's own tags)."""
    digest = hashlib.sha256(b"veil-openfhe-tag\0" + namespace.encode("utf-8") + b"\0"
                            + client_tag.encode("utf-8")).hexdigest()
    return digest[:max(1, min(len(client_tag), len(digest)))]


def payload_validator(params: CKKSParams, rotations: list[int]) -> PayloadValidator:
    """Compile the checkers of client payloads for ``params`` and ``rotations``.

    Generates a throwaway key pair with exactly these rotation keys (the code path of an
    honest :class:`ClientCrypto`), a fresh ciphertext and the evaluation keys, and keeps
    only their structure and hole descriptors (see :mod:`.validate`). Costs one client
    key generation; build it once per model and pass it to every session. For a
    bootstrapped model (keys one part per rotation) it generates one rotation key,
    whose template serves every rotation index, and the bootstrapping keys, compiled
    from their file: at most those are in memory at once.
    """
    rotations = sorted({int(r) for r in rotations})
    per_key = params.bootstraps
    with ClientCrypto(params) as client:
        probe = rotations[:1] or [1]
        parts = client.keygen(probe if per_key else rotations)
        tag = client.tag
        indices = client.automorphism_indices
        zeros = np.zeros(params.slots)
        # Two honest layouts: a key pair generated in this context shares its ring
        # parameters with the context (cereal writes references); a public key decoded
        # from bytes (ModelClient.load_secret_key, the model owner's WeightEncryptor)
        # brings its own, written out in full in every ciphertext.
        fresh = [client.encrypt(zeros),
                 WeightEncryptor(params, client.public_key_bytes()).encrypt(zeros)]
        cc = build_context(params, precompute=False)
        n = params.ring_dim
        index = {r: int(cc.FindAutomorphismIndex(r)) for r in rotations}
        try:
            ciphertexts = tuple(compile_checker("ciphertext", ct, tag, n) for ct in fresh)
            q = 1
            for m in set(ciphertexts[0].hole_moduli.tolist()):
                q *= int(m)
            if q != int(cc.GetElementParams().GetModulus()) or any(
                    len(c.hole_offsets) != 2 * (params.mult_depth + 1) for c in ciphertexts):
                raise TemplateError("the ciphertext template's towers are not the context's")
            mult = compile_checker("relinearization key", parts["mult"], tag, n)
            if per_key:
                rot, at, boot = _per_key_checkers(cc, parts, probe[0], tag, n)
                validator = PayloadValidator(
                    (params, tuple(rotations)), ciphertexts, mult, None, index, None,
                    tuple(indices), rotation_key=rot, rotation_at=at, boot=boot)
            else:
                rot, layout = _map_checkers(parts["rotations"], indices, mult, tag, n)
                validator = PayloadValidator((params, tuple(rotations)), ciphertexts, mult,
                                             rot, index, layout)
        except TemplateError as exc:
            raise EngineError(f"cannot build payload checks for {params} with this "
                              f"OpenFHE ({OPENFHE_VERSION}): {exc}") from exc
    del parts, fresh
    release_native_memory()     # the throwaway keys: gone before the client's load
    return validator


def _map_checkers(blob: bytes, indices: list[int], mult, tag: str, n: int):
    """Checker and layout of one rotation key map (models that do not bootstrap)."""
    if not blob:
        return None, None
    rot = compile_checker("rotation key map", blob, tag, n)
    return rot, rotation_layout(blob, indices, len(mult.hole_offsets), rot)


def _per_key_checkers(cc, parts: dict, probe: int, tag: str, n: int):
    """(rotation key checker, offset of its automorphism index, bootstrapping keys'
    checker) from a throwaway key generation's files."""
    data = parts[rotation_part(probe)].read()
    rot = compile_checker("rotation key", data, tag, n)
    head = struct.pack("<QI", 1, int(cc.FindAutomorphismIndex(probe)))
    at = data.find(head)
    if at < 0 or data.find(head, at + 1) >= 0:
        raise TemplateError("unexpected rotation key layout")
    del data
    with mapped(parts[BOOTSTRAP].path) as view:
        boot = compile_checker("bootstrapping keys", view, tag, n)
    return rot, at + 8, boot


class ClientCrypto:
    """Key owner: generates keys, encrypts, decrypts. Holds the secret key in memory."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.cc = build_context(params, precompute=False)    # it never bootstraps
        self._secret = None
        self._public = None
        self.automorphism_indices: list[int] = []   # of the last keygen's key map
        self._spool: tempfile.TemporaryDirectory | None = None

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
        A bootstrapped model's keys come one part per rotation key plus the
        bootstrapping keys, each written to a private temporary file as soon as it is
        made (:class:`~veil.wire.FilePart`; see :mod:`.keyparts`), so the client holds
        at most the bootstrapping keys in memory at once.
        """
        if self.params.bootstraps:
            return self._keygen_parts(sorted({int(r) for r in rotations}))
        with _KEYMAPS.write():
            keys = self.cc.KeyGen()
            tag = keys.secretKey.GetKeyTag()
            try:
                self.cc.EvalMultKeyGen(keys.secretKey)
                if rotations:
                    self.cc.EvalRotateKeyGen(keys.secretKey, [int(r) for r in rotations])
                if self.params.bootstraps:
                    # rotation, conjugation and (sparse-encapsulated secrets) dense/sparse
                    # switching keys, all in the automorphism map under this tag
                    self.cc.EvalBootstrapKeyGen(keys.secretKey, self.params.slots)
                mult = ofhe.Serialize(self.cc.GetEvalMultKeyVector(tag)[0], ofhe.BINARY)
                auto = rotations or self.params.bootstraps
                self.automorphism_indices = (
                    sorted(int(i) for i in self.cc.GetExistingEvalAutomorphismKeyIndices(tag))
                    if auto else [])
                rot = (ofhe.Serialize(self.cc.GetEvalAutomorphismKeyMap(tag), ofhe.BINARY)
                       if auto else b"")
            finally:
                _remove_tag(self.cc, tag)
        self._secret, self._public = keys.secretKey, keys.publicKey
        parts = {"mult": bytes(mult), "rotations": bytes(rot)}
        del mult, rot
        release_native_memory()
        return parts

    def _keygen_parts(self, rotations: list[int]) -> dict:
        self.drop_key_files()
        self._spool = tempfile.TemporaryDirectory(prefix="veil-keys-")
        folder = self._spool.name

        def write(name: str, tag: str) -> FilePart:
            path = os.path.join(folder, name.replace("/", "_"))
            keymap = self.cc.GetEvalAutomorphismKeyMap(tag)
            native_call(EngineError, "evaluation keys could not be written",
                        ofhe.SerializeToFile, path, keymap, ofhe.BINARY)
            del keymap
            _remove_tag(self.cc, tag)
            release_native_memory()
            return FilePart(path)

        with _KEYMAPS.write():
            keys = self.cc.KeyGen()
            tag = keys.secretKey.GetKeyTag()
            try:
                self.cc.EvalMultKeyGen(keys.secretKey)
                parts = {"mult": bytes(ofhe.Serialize(self.cc.GetEvalMultKeyVector(tag)[0],
                                                      ofhe.BINARY))}
                # rotation, conjugation and (sparse-encapsulated secrets) dense/sparse
                # switching keys, all in the automorphism map under this tag
                self.cc.EvalBootstrapKeyGen(keys.secretKey, self.params.slots)
                self.automorphism_indices = sorted(
                    int(i) for i in self.cc.GetExistingEvalAutomorphismKeyIndices(tag))
                parts[BOOTSTRAP] = write(BOOTSTRAP, tag)
                for r in rotations:
                    self.cc.EvalRotateKeyGen(keys.secretKey, [r])
                    parts[rotation_part(r)] = write(rotation_part(r), tag)
            finally:
                _remove_tag(self.cc, tag)
        self._secret, self._public = keys.secretKey, keys.publicKey
        release_native_memory()
        return parts

    def secret_key_bytes(self) -> bytes:
        self._require_keys()
        return bytes(ofhe.Serialize(self._secret, ofhe.BINARY))

    def public_key_bytes(self) -> bytes:
        self._require_keys()
        return bytes(ofhe.Serialize(self._public, ofhe.BINARY))

    def load_keys(self, secret: bytes, public: bytes) -> None:
        sk = native_call(SerializationError, "key bytes could not be decoded",
                         ofhe.DeserializePrivateKeyString, secret, ofhe.BINARY)
        pk = native_call(SerializationError, "key bytes could not be decoded",
                         ofhe.DeserializePublicKeyString, public, ofhe.BINARY)
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
        pt = native_call(EngineError, "decryption failed", self.cc.Decrypt, self._secret, ct)
        pt.SetLength(length)
        return np.array(pt.GetRealPackedValue()[:length], dtype=np.float64)

    def drop_key_files(self) -> None:
        """Remove the files of the last key generation's parts (once written out)."""
        if self._spool is not None:
            self._spool.cleanup()
            self._spool = None

    def close(self) -> None:
        """Forget the key pair and remove the key files of the last key generation."""
        self._secret = self._public = None
        self.drop_key_files()

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
        self.cc = build_context(params, precompute=False)
        self._public = native_call(SerializationError, "public key bytes could not be "
                                   "decoded", ofhe.DeserializePublicKeyString, public_key,
                                   ofhe.BINARY)

    @property
    def tag(self) -> str:
        return self._public.GetKeyTag()

    def encrypt(self, values: np.ndarray) -> bytes:
        pt = self.cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(values, dtype=np.float64))
        return bytes(serialize_ciphertext(self.cc.Encrypt(self._public, pt)))


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
        self._folder: str | None = None
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
            # rotation keys stay in their parts (copied, checked and decoded when a layer
            # needs them, each under its own native tag: see _load_rotation)
            self._parts = {int(r): key_parts[rotation_part(r)] for r in rotations}
            self._rotations = set(self._parts)
            self._keys = KeyCache(key_cache_bytes, lambda k: part_size(self._parts[k]),
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
        """Spool the bootstrapping keys to a private file, check that copy, and let
        OpenFHE read it: decoding GiB from bytes would hold them three times."""
        self._folder = tempfile.mkdtemp(prefix="veil-session-")
        path = os.path.join(self._folder, BOOTSTRAP)
        spool(part, path)
        with mapped(path) as view:
            self._validator.boot.check(view, self.tag)
        keymap, ok = native_call(SerializationError, "bootstrapping keys could not be "
                                 "decoded", ofhe.DeserializeEvalKeyMap, path, ofhe.BINARY)
        os.unlink(path)
        if not ok:
            raise SerializationError("bootstrapping keys could not be decoded")
        return keymap

    def _rotation_tag(self, k: int) -> str:
        tag = self._rotation_tags.get(k)
        if tag is None:
            tag = native_tag(f"{self.native_tag}/rotation/{k}", self.native_tag)
            self._rotation_tags[k] = tag
        return tag

    def _load_rotation(self, k: int) -> None:
        self._check_open()
        data = copy_part(self._parts[k])
        self._validator.check_rotation(k, data, self.tag)
        keymap = self._decode_keys(data, ofhe.DeserializeEvalKeyMapString)
        del data
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
        if self._keys is not None:
            self._keys.require([int(k) for k in ks])
        digits = self._native(self.cc.EvalFastRotationPrecompute, a)
        if self._keys is None:
            return {k: self._native(self.cc.EvalFastRotation, a, int(k), digits)
                    for k in ks}
        return {k: self._under(int(k), self.cc.EvalFastRotation, a, int(k), digits)
                for k in ks}

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
            if self._keys is not None:
                self._keys = None
            _remove_tag(self.cc, {self.native_tag, *self._rotation_tags.values()})
            release_native_memory()
        if self._folder is not None:
            remove_tree(self._folder)
            self._folder = None

    def __enter__(self) -> "EvaluationSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

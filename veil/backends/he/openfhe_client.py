"""The key owner's side of CKKS (:class:`ClientCrypto`), the model owner's weight
encryption (:class:`WeightEncryptor`), and the server's checks of what clients send
(:func:`payload_validator`, built by generating the payloads an honest client would).
"""
from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

import numpy as np

from ...errors import EngineError, KeyMismatchError, MissingKeyError, SerializationError
from ...wire import FilePart
from .keyparts import BOOTSTRAP, readable, rotation_part
from .native import release_native_memory
from .openfhe_native import (_KEYMAPS, OPENFHE_VERSION, CKKSParams, _remove_tag,
                             build_context, deserialize_ciphertext, native_call, ofhe,
                             serialize_ciphertext)
from .validate import PayloadValidator, TemplateError, compile_checker, rotation_layout


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
    with readable(parts[BOOTSTRAP]) as view:
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

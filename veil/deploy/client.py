"""The data owner's role: key generation, encryption, decryption."""
from __future__ import annotations

import os

import numpy as np

from ..backends.he.layout import gather_features, pack_parts, part_names, unpack_parts
from ..backends.he.openfhe_engine import ClientCrypto
from ..backends.inputs import as_inputs
from ..errors import InputError, KeyMismatchError, MissingKeyError, SerializationError
from ..wire import pack, unpack
from .bundle import ClientBundle
from .keys import CIPHERTEXT_KIND, EvaluationKeys, PublicKey, SecretKey


class ModelClient:
    """Holds the secret key; encrypts inputs and decrypts outputs for one model.

    Args:
        bundle: a client bundle directory (from ``compiled.export``) or a ClientBundle.
        check_range: refuse inputs outside the calibrated range, per feature
            (``bundle.input_range``), with an InputRangeError that names the row and
            feature (default True).
        clip: clamp inputs into the calibrated range before encrypting instead of
            refusing them, with an InputClippedWarning that counts what changed
            (default False: refuse).
    """

    def __init__(self, bundle: str | os.PathLike | ClientBundle, *,
                 check_range: bool = True, clip: bool = False) -> None:
        self.bundle = bundle if isinstance(bundle, ClientBundle) else ClientBundle.load(bundle)
        self._crypto = ClientCrypto(self.bundle.params)
        self._eval_keys: EvaluationKeys | None = None
        self._check_range, self._clip = check_range, clip

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.bundle.input_shape

    def keygen(self) -> EvaluationKeys:
        """Generate a fresh key pair and exactly the manifest's evaluation keys."""
        parts = self._crypto.keygen(self.bundle.manifest["rotations"])
        self._eval_keys = EvaluationKeys(self.bundle.model_id, self._crypto.tag, parts,
                                         self.bundle.params.insecure_test_params)
        return self._eval_keys

    def evaluation_keys(self) -> bytes:
        """Serialized evaluation keys for the server (no secret material)."""
        if self._eval_keys is None:
            raise MissingKeyError("call keygen() before evaluation_keys()")
        return self._eval_keys.to_bytes()

    def write_evaluation_keys(self, path, *, forget: bool = False) -> int:
        """:meth:`evaluation_keys` written to a new private file part by part (a
        bootstrapped model's are several GiB); returns the bytes written. ``forget``
        drops this object's copy afterwards (``evaluation_keys`` then needs a new
        ``keygen``)."""
        if self._eval_keys is None:
            raise MissingKeyError("call keygen() before write_evaluation_keys()")
        written = self._eval_keys.save(path)
        if forget:
            self._eval_keys = None
            self._crypto.drop_key_files()
        return written

    def public_key(self) -> PublicKey:
        """The public key, for a model owner who encrypts weights for this client."""
        return PublicKey(self.bundle.model_id, self._crypto.tag,
                         self._crypto.public_key_bytes())

    def secret_key(self) -> SecretKey:
        return SecretKey(self.bundle.model_id, self._crypto.secret_key_bytes(),
                         self._crypto.public_key_bytes())

    def save_secret_key(self, path: str | os.PathLike) -> None:
        """Write the secret key to ``path`` (mode 0600). Only done when you call this."""
        self.secret_key().save(path)

    def load_secret_key(self, key: str | os.PathLike | SecretKey) -> None:
        key = key if isinstance(key, SecretKey) else SecretKey.load(key)
        if key.model_id != self.bundle.model_id:
            raise KeyMismatchError("this secret key was generated for another model")
        self._crypto.load_keys(key.secret, key.public)

    @property
    def lanes(self) -> int:
        """How many inputs one ciphertext carries (see ``encrypt_batch``)."""
        return int(self.bundle.manifest.get("lanes", 1))

    def _checked(self, xs, max_batch: int | None = None) -> np.ndarray:
        """One input or a batch (the input contract, :mod:`veil.backends.inputs`) as one
        checked batch; then clamped into the calibrated range (``clip``) or refused
        outside it (``check_range``), with the batch's row indices in the error or
        warning."""
        batch, _ = as_inputs(xs, self.input_shape, max_batch=max_batch)
        if self._clip:
            return self.bundle.input_range.clip(batch)
        if self._check_range:
            self.bundle.input_range.check(batch)
        return batch

    def _encrypt_lanes(self, arrs: np.ndarray) -> bytes:
        slots = self.bundle.params.slots
        vectors = pack_parts(arrs, self.bundle.manifest, slots)
        cts = {name: self._crypto.encrypt(v) for name, v in zip(part_names(len(vectors)),
                                                                 vectors)}
        return pack(CIPHERTEXT_KIND, cts, {
            "model": self.bundle.model_id, "tag": self._crypto.tag, "role": "input",
            "count": len(arrs), "insecure": self.bundle.params.insecure_test_params})

    def encrypt(self, x) -> bytes:
        """Encrypt one input of the model's input shape, or a batch ``(B, *shape)`` of
        up to :attr:`lanes` inputs into one ciphertext (:meth:`decrypt_batch` opens
        its answer). Raises InputError on bad input (InputRangeError outside the
        calibrated range)."""
        return self._encrypt_lanes(self._checked(x, max_batch=self.lanes))

    def _encrypt_features(self, arrs: np.ndarray) -> bytes:
        table = gather_features(arrs, self.bundle.manifest, self.bundle.params.slots)
        parts = {f"f{i}": self._crypto.encrypt(col) for i, col in enumerate(table)}
        return pack(CIPHERTEXT_KIND, parts, {
            "model": self.bundle.model_id, "tag": self._crypto.tag, "role": "input",
            "layout": "features", "count": len(arrs),
            "insecure": self.bundle.params.insecure_test_params})

    def batch_layout(self, n: int) -> str:
        """``"lanes"`` or ``"features"``: the cheaper layout for ``n`` inputs, from the
        compiler's cost estimates (feature layout: one ciphertext per feature)."""
        costs = self.bundle.manifest.get("costs", {})
        per_batch = costs.get("features_per_batch")
        if per_batch is None or n <= self.lanes:
            return "lanes"
        slots = self.bundle.params.slots
        lanes_cost = -(-n // self.lanes) * costs["lanes_per_ciphertext"]
        return "features" if -(-n // slots) * per_batch < lanes_cost else "lanes"

    def encrypt_batch(self, xs, layout: str = "auto") -> list[bytes]:
        """Encrypt many inputs (a batch ``(B, *shape)``; one input is a batch of one);
        returns blobs the server runs like single inputs.

        ``layout``: ``"lanes"`` packs ``lanes`` inputs per ciphertext; ``"features"``
        sends one ciphertext per input feature with one input per slot (best for large
        batches); ``"auto"`` picks the cheaper by the compiler's estimate.
        ``decrypt_batch`` returns the outputs in input order. The whole batch is checked
        first: an InputRangeError names rows by their index in ``xs``.
        """
        xs = self._checked(xs)        # the whole batch: errors name its row indices
        if layout == "auto":
            layout = self.batch_layout(len(xs))
        if layout == "features":
            if self.bundle.manifest.get("costs", {}).get("features_per_batch") is None:
                raise InputError("this model is too wide for the feature layout")
            slots = self.bundle.params.slots
            return [self._encrypt_features(xs[i:i + slots]) for i in range(0, len(xs), slots)]
        if layout != "lanes":
            raise InputError(f"layout must be 'auto', 'lanes' or 'features', not {layout!r}")
        return [self._encrypt_lanes(xs[i:i + self.lanes])
                for i in range(0, len(xs), self.lanes)]

    def _open(self, blob: bytes) -> np.ndarray:
        header, parts = unpack(blob, CIPHERTEXT_KIND)
        if header.get("model") != self.bundle.model_id:
            raise KeyMismatchError("this ciphertext belongs to another model")
        count = header.get("count")
        features = header.get("layout") == "features"
        limit = self.bundle.params.slots if features else self.lanes
        if header.get("role") != "output" or not isinstance(count, int) \
                or not 1 <= count <= limit or (not features and "ct" not in parts):
            raise SerializationError("expected a model output ciphertext")
        if features:
            shape = self.bundle.output_shape
            if len(parts) != int(np.prod(shape)):
                raise SerializationError("feature-layout output has the wrong size")
            cols = [self._crypto.decrypt(parts[f"o{i}"], count) for i in range(len(parts))]
            return np.stack(cols, axis=1).reshape((count,) + shape)
        names = part_names(int(self.bundle.manifest["output"].get("parts", 1)))
        if sorted(parts) != sorted(names):
            raise SerializationError(f"expected a model output of {len(names)} ciphertexts")
        values = [self._crypto.decrypt(parts[n], self.bundle.params.slots) for n in names]
        return unpack_parts(values, self.bundle.manifest, count)

    def decrypt(self, blob: bytes) -> np.ndarray:
        """Decrypt a server result for one input into an array of the output shape."""
        out = self._open(blob)
        if len(out) != 1:
            raise InputError(f"this ciphertext holds {len(out)} outputs: use decrypt_batch")
        return out[0]

    def decrypt_batch(self, blobs: list[bytes]) -> np.ndarray:
        """Decrypt the results of ``encrypt_batch``: shape (inputs, *output shape)."""
        return np.concatenate([self._open(b) for b in blobs])

    def close(self) -> None:
        self._crypto.close()

    def __enter__(self) -> "ModelClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The model owner's role in encrypted-weight mode.

The owner encrypts every weight vector the evaluator uses under the data owner's
public key, so the host evaluates ciphertext x ciphertext and sees neither the input
nor the weights. Architecture (layer shapes, non-zero diagonal positions, polynomial
activations) stays public: it is in the server bundle.
"""
from __future__ import annotations

from ..backends.he.evaluator import Evaluator
from ..backends.he.openfhe_engine import WeightEncryptor, weight_key
from ..compiler.plan import HEPlan
from ..errors import KeyMismatchError
from ..wire import pack
from .bundle import ServerBundle
from .keys import WEIGHTS_KIND, PublicKey


def encrypt_weights(bundle: ServerBundle, public_key: bytes | PublicKey) -> bytes:
    """Encrypt the bundle's weights for the client that owns ``public_key``.

    Args:
        bundle: the server bundle *with* its plaintext weights (the owner's copy).
        public_key: ``ModelClient.public_key()`` of the data owner.

    Returns:
        An envelope the host passes to ``ModelServer.open_session(..., weights=...)``.
    """
    key = PublicKey.from_bytes(public_key)
    if key.model_id != bundle.model_id:
        raise KeyMismatchError("this public key was generated for another model")
    encryptor = WeightEncryptor(bundle.params, key.key)
    evaluator = Evaluator(bundle.graph, HEPlan.from_manifest(bundle.params, bundle.manifest))
    parts = {weight_key(k): encryptor.encrypt(vec) for k, vec in evaluator.weight_vectors()}
    return pack(WEIGHTS_KIND, parts, {"model": bundle.model_id, "tag": encryptor.tag})

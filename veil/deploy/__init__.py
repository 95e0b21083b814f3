"""Roles: the model developer's bundles, the client (secret key), the server (eval keys)."""
from .bundle import ClientBundle, ServerBundle
from .client import ModelClient
from .keys import EvaluationKeys, PublicKey, SecretKey
from .owner import encrypt_weights
from .server import ModelServer, ServerSession

__all__ = ["ClientBundle", "EvaluationKeys", "ModelClient", "ModelServer", "PublicKey",
           "SecretKey", "ServerBundle", "ServerSession", "encrypt_weights"]

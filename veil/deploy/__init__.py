"""Roles: the model developer's bundles, the client (secret key), the server (eval keys)."""
from .bundle import ClientBundle, ServerBundle
from .client import ModelClient
from .keys import EvaluationKeys, SecretKey
from .server import ModelServer, ServerSession

__all__ = ["ClientBundle", "EvaluationKeys", "ModelClient", "ModelServer", "SecretKey",
           "ServerBundle", "ServerSession"]

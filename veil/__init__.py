"""veil: private inference for PyTorch and ONNX models.

Top-level verbs: :func:`compile` a model with calibration data, ``run`` it in a
:class:`Mode`, ``export`` the client and server bundles, and use
:class:`ModelClient` / :class:`ModelServer` in their own processes.
"""
from ._version import __version__
from .errors import (BootstrapRequiredError, BundleError, CompileError, EngineError,
                     GraphError, InputError, KeyMismatchError, KeyTypeError,
                     MissingKeyError, ModeError, SerializationError, UnsupportedOperation,
                     VeilError)
from .finetune import finetune
from .model import CompiledModel, Mode, Report, compile


def __getattr__(name):
    # The roles import OpenFHE; load them only when asked so `import veil` stays light.
    if name in ("ModelClient", "ModelServer", "EvaluationKeys", "PublicKey", "SecretKey"):
        from . import deploy

        return getattr(deploy, name)
    if name == "Client":   # the service SDK (imports httpx): only when asked
        from .sdk import Client

        return Client
    raise AttributeError(f"module 'veil' has no attribute {name!r}")


__all__ = ["BootstrapRequiredError", "BundleError", "Client", "CompileError", "CompiledModel",
           "EngineError", "EvaluationKeys", "GraphError", "InputError", "KeyMismatchError", "KeyTypeError",
           "MissingKeyError", "Mode", "ModeError", "ModelClient", "ModelServer", "PublicKey",
           "Report", "SecretKey", "SerializationError", "UnsupportedOperation", "VeilError",
           "__version__", "compile", "finetune"]

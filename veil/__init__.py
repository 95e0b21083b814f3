"""veil: private inference for PyTorch and ONNX models.

Top-level verbs: :func:`compile` a model with calibration data, ``run`` it in a
:class:`Mode` (plain, simulate, tee, mpc, he), ``export`` the client and server bundles
(or :func:`export_model` one folder for ``veil serve``), and use :class:`ModelClient` /
:class:`ModelServer` in their own processes.
"""
from ._version import __version__
from .errors import (ApproximationWarning, BootstrapRequiredError, BundleError,
                     CompileError, DepthWarning, EngineError, GraphError,
                     InputClippedWarning, InputError, InputRangeError, KeyMismatchError,
                     KeyTypeError, MissingKeyError, ModeError, SerializationError,
                     TrainingModeWarning, UnsupportedOperation, VeilError, VeilWarning)
from .finetune import finetune
from .model import CompiledModel, Report, compile, export_model
from .modes import Mode


def __getattr__(name):
    # The roles import OpenFHE; load them (and the launcher's error type) only when
    # asked so `import veil` stays light.
    if name in ("ModelClient", "ModelServer", "EvaluationKeys", "PublicKey", "SecretKey",
                "ProcessError"):
        from . import deploy

        return getattr(deploy, name)
    if name == "Client":   # the service SDK (imports httpx): only when asked
        from .sdk import Client

        return Client
    raise AttributeError(f"module 'veil' has no attribute {name!r}")


__all__ = ["ApproximationWarning", "BootstrapRequiredError", "BundleError", "Client",
           "CompileError", "CompiledModel", "DepthWarning", "EngineError",
           "EvaluationKeys", "GraphError", "InputClippedWarning", "InputError",
           "InputRangeError", "KeyMismatchError", "KeyTypeError",
           "MissingKeyError", "Mode", "ModeError", "ModelClient", "ModelServer",
           "ProcessError", "PublicKey", "Report", "SecretKey", "SerializationError",
           "TrainingModeWarning", "UnsupportedOperation", "VeilError", "VeilWarning",
           "__version__", "compile", "export_model", "finetune"]

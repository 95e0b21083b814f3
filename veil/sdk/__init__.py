"""The Python SDK of the veil service: ``Client(url, model, mode="he")``.

``predict(x)`` does everything (keys, session, encryption, inference, decryption);
``encrypt`` / ``infer`` / ``decrypt`` split the steps; ``infer_batch`` runs many
inputs. Modes: ``he`` (:mod:`veil.sdk.he`), ``tee``, ``mpc``.
"""
from .client import Client, ModeClient

__all__ = ["Client", "ModeClient"]

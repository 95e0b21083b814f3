"""The Python SDK of the veil service: ``Client(url, model, mode="he")``.

``predict(x)`` does everything (keys, session, encryption, inference, decryption);
``encrypt`` / ``infer`` / ``decrypt`` split the steps; ``infer_batch`` runs many
inputs. Modes: ``he`` (:mod:`veil.sdk.he`), ``tee``, ``mpc``. A model owner uploads
encrypted weights with ``ModelOwner(url, bundle)`` (:mod:`veil.sdk.owner`).
"""
from .client import Client, ModeClient


def __getattr__(name: str):
    if name == "ModelOwner":        # lazily: it loads OpenFHE, which clients of tee need not
        from .owner import ModelOwner

        return ModelOwner
    raise AttributeError(f"module 'veil.sdk' has no attribute {name!r}")


__all__ = ["Client", "ModeClient", "ModelOwner"]

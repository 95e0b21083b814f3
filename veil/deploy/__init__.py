"""Roles: the model developer's bundles, the client (secret key), the server (eval keys).

Names load lazily (PEP 562): ``veil.deploy.bundle`` and ``veil.deploy.export`` are plain
Python, and the HTTP service imports them without loading OpenFHE, which only the
client and server roles (and the service's HE worker processes) need.
"""
_NAMES = {"ClientBundle": "bundle", "ServerBundle": "bundle", "ModelClient": "client",
          "EvaluationKeys": "keys", "PublicKey": "keys", "SecretKey": "keys",
          "encrypt_weights": "owner", "ModelServer": "server", "ServerSession": "server",
          "Processes": "processes", "ProcessError": "processes"}


def __getattr__(name):
    if name in _NAMES:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)

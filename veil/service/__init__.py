"""The veil inference service: HTTP routes over ``veil.deploy`` and the backends.

``create_app(ServiceConfig(...))`` builds the FastAPI app; ``serve(config, host, port)``
runs it; ``python -m veil.service EXPORT... --store DIR --listen HOST:PORT`` from a shell.
API keys: :class:`~veil.service.auth.KeyStore`; sessions: :mod:`veil.service.store`;
the error table shared with the SDK: :mod:`veil.service.errors`; wire formats shared
with the SDK: :mod:`veil.service.protocol`. Names load lazily, so the SDK can import
those two without the web framework.
"""
_NAMES = {"ServiceConfig": "app", "ServiceContext": "app", "create_app": "app",
          "KeyStore": "auth", "serve": "run"}


def __getattr__(name):
    if name in _NAMES:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)

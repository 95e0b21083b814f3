"""The veil inference service: HTTP routes over ``veil.deploy`` and the backends.

``create_app(ServiceConfig(...))`` builds the FastAPI app; ``serve(config, host, port)``
runs it; ``python -m veil.service EXPORT... --store DIR --listen HOST:PORT`` from a shell.
API keys: :class:`~veil.service.auth.KeyStore`; sessions: :mod:`veil.service.store`;
the error table shared with the SDK: :mod:`veil.service.errors`.
"""
from .app import ServiceConfig, ServiceContext, create_app
from .auth import KeyStore
from .run import serve

__all__ = ["KeyStore", "ServiceConfig", "ServiceContext", "create_app", "serve"]

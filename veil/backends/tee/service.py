"""The TEE processes and their clients, by role (this module keeps the names importable
from one place):

- ``server.py``: what the enclave and the baseline share (a threaded message server
  running the bundle's model runtime, ``executor.py``);
- ``enclave.py``: :class:`Enclave`, sealed inference to an attested key;
- ``baseline.py``: :class:`PlaintextServer`, the INSECURE unsealed baseline;
- ``client.py``: :class:`TEEClient` and :class:`PlaintextClient`.
"""
from .baseline import PlaintextServer
from .client import (DEFAULT_BATCH, DEFAULT_DEPTH, PlaintextClient, TEEClient, _chunks,
                     _Connection)
from .enclave import EVIDENCE_TTL_S, MAX_CHANNELS, Enclave, _Channel
from .server import DEFAULT_TIMEOUT, _arrays, _ModelServer, make_room

__all__ = ["DEFAULT_BATCH", "DEFAULT_DEPTH", "DEFAULT_TIMEOUT", "EVIDENCE_TTL_S",
           "MAX_CHANNELS", "Enclave", "PlaintextClient", "PlaintextServer", "TEEClient",
           "make_room"]

"""Key release: the model key goes only to an enclave whose evidence the policy accepts.

Protocol (one connection, enclave -> service ``veil tee-key-release``):

1. The enclave sends ``KR_HELLO {"key_id": ...}`` (from its bundle's manifest).
2. The service answers ``KR_NONCE`` with 32 fresh random bytes.
3. The enclave has its attester sign evidence for that nonce (its HPKE public keys and
   its measurement) and sends the token (``KR_EVIDENCE``).
4. The service verifies the token against its policy (trusted attester, freshness,
   nonce) and checks that the measurement is the one recorded for this key at export,
   then HPKE-seals the 32-byte model key to the enclave's attested hybrid
   (ML-KEM-768 + X25519) key, with the key id and the nonce in ``info`` (``KR_KEY``).
   The model key protects data at rest for a long time, hence the post-quantum suite.
5. The enclave opens it with its private key, which never left its memory; the host
   relaying these bytes learns nothing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

from ...errors import KeyReleaseError, VeilError
from .. import sockets
from . import net, seal
from .attest import Policy, verify_evidence
from .bundle import model_key_path

log = logging.getLogger("veil.tee")

KEY_SUITE = "mlkem768-x25519"
_LABEL = b"veil/tee/key-release/v1\x00"
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")


def _info(key_id: str, nonce: bytes) -> bytes:
    return _LABEL + key_id.encode() + b"\x00" + nonce


def release_key(token: str, policy: Policy, nonce: bytes, key_dir: str | os.PathLike,
                key_id: str, now: float | None = None) -> bytes:
    """Steps 4 of the module docstring: the model key sealed to the attested enclave.

    Raises:
        AttestationError / PolicyError / EvidenceExpiredError: the evidence is refused.
        KeyReleaseError: unknown key, or the measurement is not this key's.
    """
    evidence = verify_evidence(token, policy, nonce, now)
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise KeyReleaseError("malformed model key id")
    path = model_key_path(key_dir, key_id)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        key = path.read_bytes()
    except (OSError, ValueError):
        raise KeyReleaseError(f"no model key {key_id} here") from None
    if meta.get("measurement") != evidence.measurement:
        raise KeyReleaseError("this enclave's measurement is not the one the model key "
                              "was released for")
    pk = seal.public_key(KEY_SUITE, evidence.public_key(KEY_SUITE))
    return seal.seal(KEY_SUITE, pk, key, _info(key_id, nonce))


class KeyReleaseService:
    """The service side of the protocol; one thread per enclave connection."""

    def __init__(self, key_dir: str | os.PathLike, policy: Policy,
                 listen: tuple[str, int], timeout: float = 10.0) -> None:
        self.key_dir, self.policy, self.timeout = Path(key_dir), policy, timeout
        self.server = sockets.listen(listen)
        self.address = self.server.getsockname()

    def serve_forever(self) -> None:
        sockets.accept_forever(self.server, self.timeout, self._serve)

    def _serve(self, sock: socket.socket) -> None:
        try:
            key_id = sockets.json_object(net.expect(*net.recv(sock, 4096), net.KR_HELLO)).get("key_id")
            nonce = secrets.token_bytes(32)
            net.send(sock, net.KR_NONCE, nonce)
            token = net.expect(*net.recv(sock, 1 << 16), net.KR_EVIDENCE).decode()
            wrapped = release_key(token, self.policy, nonce, self.key_dir, key_id)
            net.send(sock, net.KR_KEY, wrapped)
            log.info("released model key %s", key_id)
        except (VeilError, OSError, UnicodeDecodeError) as exc:
            log.warning("key release refused: %s", exc)
            try:
                net.send(sock, net.ERROR, net.error_body(exc))
            except (VeilError, OSError):
                pass
        finally:
            sock.close()


def fetch_model_key(address: tuple[str, int], key_id: str, keys: seal.EnclaveKeys,
                    attest: Callable[[bytes], str], timeout: float = 10.0) -> bytes:
    """Enclave side (steps 1, 3 and 5): the model key, opened inside the enclave.

    Raises:
        KeyReleaseError: the service refused (its reason in the message) or is unreachable.
    """
    try:
        sock = sockets.dial(address, timeout)
    except OSError as exc:
        raise KeyReleaseError(f"cannot reach the key-release service at "
                              f"{address[0]}:{address[1]}: {exc}") from None
    try:
        nonce = net.call(sock, net.KR_HELLO, json.dumps({"key_id": key_id}).encode(),
                         net.KR_NONCE)
        wrapped = net.call(sock, net.KR_EVIDENCE, attest(nonce).encode(), net.KR_KEY)
        return keys.open(KEY_SUITE, wrapped, _info(key_id, nonce))
    except VeilError as exc:
        raise KeyReleaseError(f"the model key was not released: {exc}") from None
    finally:
        sock.close()

"""MPC transport: mutual authentication, encryption, replay/tamper detection, framing."""
import os
import socket
import stat
import threading

import numpy as np
import pytest

from veil.errors import KeyMaterialError, SerializationError
from veil.backends import sockets as so
from veil.backends.mpc import transport as tp


@pytest.fixture()
def keys(tmp_path):
    tp.setup(tmp_path)
    return tmp_path


def _pair(keys, client_role, server_role, allowed, timeout=5.0):
    a, b = socket.socketpair()
    a.settimeout(timeout)
    b.settimeout(timeout)
    out = {}

    def serve():
        try:
            out["server"] = tp.accept(b, tp.Identity.load(keys, server_role), allowed)
        except Exception as exc:  # reported to the test
            out["error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        out["client"] = tp.connect(a, tp.Identity.load(keys, client_role), server_role)
    except Exception as exc:
        out["client_error"] = exc
    t.join()
    return out


def test_setup_writes_private_keys_0600(keys):
    for role in tp.ROLES:
        assert stat.S_IMODE(os.stat(keys / f"{role}.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys / "ticket.key").st_mode) == 0o600   # party 1's tickets
    assert len((keys / "ticket.key").read_bytes()) == 32
    assert tp.Identity.load(keys, "party1").ticket_key is not None
    assert tp.Identity.load(keys, None).ticket_key is None           # never a client's
    assert tp.Identity.load(keys, "dealer").ticket_key is None
    with pytest.raises(KeyMaterialError):
        tp.Identity.load(keys, "nobody")


def test_parties_authenticate_each_other_and_exchange_arrays(keys):
    out = _pair(keys, "party0", "party1", ("party0",))
    c, s = out["client"], out["server"]
    x = np.arange(10, dtype=np.uint64) * np.uint64(2 ** 60)
    c.send(5, so.pack_array(x))
    kind, body = s.recv()
    assert kind == 5 and np.array_equal(so.unpack_array(body), x)
    s.send(6, b"ok")
    assert c.recv() == (6, b"ok")


def test_a_client_authenticates_the_party(keys):
    out = _pair(keys, None, "party0", ("client",))
    assert out["server"].peer == "client" and out["client"].peer == "party0"


def test_impersonation_and_unexpected_roles_are_refused(keys, tmp_path_factory):
    # the dealer may not talk to party1 where only party0 is allowed
    out = _pair(keys, "dealer", "party1", ("party0",))
    assert isinstance(out.get("error"), so.TransportError)
    # keys from another setup cannot pass for party0
    other = tmp_path_factory.mktemp("other")
    tp.setup(other)
    (keys / "party0.key").write_bytes((other / "party0.key").read_bytes())
    with pytest.raises(KeyMaterialError, match="does not match"):
        tp.Identity.load(keys, "party0")


def test_tampered_replayed_and_oversized_frames_fail(keys):
    out = _pair(keys, "party0", "party1", ("party0",))
    c, s = out["client"], out["server"]
    # tamper: send a frame whose ciphertext has one flipped bit
    frame = c._send.encrypt(c._nonce(c._send_n), bytes([tp.VERSION, 1]) + b"data", None)
    bad = bytearray(frame)
    bad[3] ^= 1
    c.sock.sendall(so.LEN.pack(len(bad)) + bytes(bad))
    with pytest.raises(so.TransportError, match="authentication"):
        s.recv()
    # replay: the same valid frame twice; the second is out of sequence
    out = _pair(keys, "party0", "party1", ("party0",))
    c, s = out["client"], out["server"]
    frame = c._send.encrypt(c._nonce(c._send_n), bytes([tp.VERSION, 1]) + b"data", None)
    c.sock.sendall(so.LEN.pack(len(frame)) + frame)
    c.sock.sendall(so.LEN.pack(len(frame)) + frame)
    assert s.recv() == (1, b"data")
    with pytest.raises(so.TransportError, match="authentication"):
        s.recv()
    # oversized: refused from the length prefix alone
    c.sock.sendall(so.LEN.pack(2 ** 31))
    with pytest.raises(so.TransportError, match="exceeds"):
        s.recv(limit=1 << 20)


def test_silence_times_out(keys):
    out = _pair(keys, "party0", "party1", ("party0",), timeout=0.3)
    with pytest.raises(so.TransportError, match="timed out"):
        out["server"].recv()


def test_malformed_arrays_are_serialization_errors():
    good = so.pack_array(np.zeros(4, np.uint64))
    with pytest.raises(SerializationError):
        so.unpack_array(good[:-3])
    with pytest.raises(SerializationError):
        so.pack_array(np.zeros(2, dtype=object))


def test_idle_wait_still_times_out_on_half_a_frame(keys):
    """Waiting for a frame to start may take forever; finishing one may not (a corrupted
    length or a stalled sender must not hold the reader)."""
    out = _pair(keys, "party0", "party1", ("party0",), timeout=0.3)
    out["client"].sock.sendall(b"\x00\x00")          # half a length prefix, then nothing
    with pytest.raises(so.TransportError, match="timed out"):
        out["server"].recv(idle=True)

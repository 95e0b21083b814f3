"""TCP plumbing shared by the MPC and TEE processes: frames, sockets and arrays.

Frames: a 4-byte big-endian length, checked against a limit before anything is read,
then the body. An idle reader may wait for a frame to start, but the rest must arrive
within the socket's timeout. Arrays travel as dtype, shape and raw bytes, never as
pickles; control messages as JSON objects. What goes inside a frame (AEAD, versions,
kinds) is each backend's business (``mpc/transport.py``, ``tee/net.py``).
"""
from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np

from ..errors import SerializationError, VeilError

MAX_FRAME = 1 << 30          # 1 GiB: far above any message veil sends
LEN = struct.Struct(">I")


class TransportError(VeilError):
    """The link failed: peer gone, timed out, or sent something that did not authenticate."""


# -- frames -------------------------------------------------------------------------------
def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            raise TransportError("timed out waiting for the peer") from None
        except OSError as exc:
            raise TransportError(f"link failed: {exc}") from None
        if not chunk:
            raise TransportError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME, idle: bool = False) -> bytes:
    """One frame. With ``idle``, wait as long as it takes for a frame to start, but
    once it has, the socket's timeout applies to the rest: a peer that sends half a
    frame (or a corrupted length) cannot hold the reader forever."""
    if idle:
        timeout = sock.gettimeout()
        sock.settimeout(None)
        try:
            first = _recv_exact(sock, 1)
        finally:
            sock.settimeout(timeout)
        head = first + _recv_exact(sock, LEN.size - 1)
    else:
        head = _recv_exact(sock, LEN.size)
    (n,) = LEN.unpack(head)
    if n > limit:
        raise TransportError(f"frame of {n} bytes exceeds the limit of {limit}")
    return _recv_exact(sock, n)


# -- sockets ------------------------------------------------------------------------------
def listen(address: tuple[str, int]) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(address)
    srv.listen(64)
    return srv


def accept_forever(server: socket.socket, timeout: float, handle) -> None:
    """Accept connections forever; each one is handled on its own thread."""
    while True:
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


def dial(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


# -- payloads -----------------------------------------------------------------------------
def json_object(data: bytes) -> dict:
    """A control message: a JSON object, or a SerializationError."""
    try:
        out = json.loads(data.decode())
        if not isinstance(out, dict):
            raise ValueError("not an object")
        return out
    except (ValueError, UnicodeDecodeError) as exc:
        raise SerializationError(f"malformed control message: {exc}") from None


_DTYPES = {"u8": np.dtype("<u8"), "u1": np.dtype("u1"), "f8": np.dtype("<f8")}


def pack_array(a: np.ndarray) -> bytes:
    code = next((k for k, v in _DTYPES.items() if v == a.dtype.newbyteorder("<")
                 or v == a.dtype), None)
    if code is None:
        raise SerializationError(f"arrays of {a.dtype} do not travel between processes")
    head = json.dumps({"dtype": code, "shape": list(a.shape)}).encode()
    return LEN.pack(len(head)) + head + np.ascontiguousarray(a, _DTYPES[code]).tobytes()


def unpack_array(data: bytes) -> np.ndarray:
    try:
        (n,) = LEN.unpack(data[:4])
        head = json.loads(data[4:4 + n].decode())
        dtype, shape = _DTYPES[head["dtype"]], tuple(int(s) for s in head["shape"])
        body = data[4 + n:]
        if any(s < 0 for s in shape) or len(body) != dtype.itemsize * int(np.prod(shape)):
            raise ValueError("size mismatch")
        # a read-only view when the wire order is the machine's (no copy of big messages)
        return np.frombuffer(body, dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="), copy=False)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed array message: {exc}") from None


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one message (a JSON index, then each array's bytes)."""
    parts = {k: pack_array(np.asarray(v)) for k, v in arrays.items()}
    index = json.dumps({k: len(v) for k, v in parts.items()}).encode()
    return LEN.pack(len(index)) + index + b"".join(parts.values())


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        (n,) = LEN.unpack(data[:4])
        index = json.loads(data[4:4 + n].decode())
        out, at = {}, 4 + n
        for key, size in index.items():
            out[str(key)] = unpack_array(data[at:at + int(size)])
            at += int(size)
        if at != len(data):
            raise ValueError("trailing bytes")
        return out
    except (ValueError, AttributeError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed message: {exc}") from None

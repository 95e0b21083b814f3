"""TCP plumbing shared by the MPC and TEE processes: frames, sockets and arrays.

Frames: a 4-byte big-endian length, checked against a limit before anything is read,
then the body. An idle reader may wait for a frame to start, but the rest must arrive
within the socket's timeout. Arrays travel as dtype, shape and raw bytes, never as
pickles; control messages as JSON objects. What goes inside a frame (AEAD, versions,
kinds) is each backend's business (``mpc/transport.py``, ``tee/net.py``).
"""
from __future__ import annotations

import json
import math
import socket
import struct
import threading

import numpy as np

from ..errors import InputError, SerializationError, TransportError

MAX_FRAME = 1 << 30          # 1 GiB: far above any message veil sends
LEN = struct.Struct(">I")


# -- frames -------------------------------------------------------------------------------
def send_frame(sock: socket.socket, *parts) -> None:
    """One frame whose body is the concatenation of ``parts`` (bytes-like), written with
    scatter-gather I/O: large bodies are not copied to be framed."""
    views = [memoryview(LEN.pack(sum(len(p) for p in parts)))]
    views += [memoryview(p).cast("B") for p in parts if len(p)]
    try:
        while views:
            sent = sock.sendmsg(views[:64])
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]
    except socket.timeout:
        raise TransportError("timed out sending to the peer") from None
    except OSError as exc:
        raise TransportError(f"link failed: {exc}") from None


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:], min(len(view) - got, 1 << 22))
        except socket.timeout:
            raise TransportError("timed out waiting for the peer") from None
        except OSError as exc:
            raise TransportError(f"link failed: {exc}") from None
        if not n:
            raise TransportError("the peer closed the connection")
        got += n


def recv_buffer(sock: socket.socket, limit: int = MAX_FRAME, idle: bool = False,
                alloc=bytearray):
    """One frame's body, read straight into the buffer it is returned in (no copies):
    ``alloc(n)``, a bytearray unless the caller passes another (the MPC links take an
    uninitialised numpy buffer: no pass to zero memory about to be overwritten).

    With ``idle``, wait as long as it takes for a frame to start, but once it has, the
    socket's timeout applies to the rest: a peer that sends half a frame (or a corrupted
    length) cannot hold the reader forever."""
    head = bytearray(LEN.size)
    view = memoryview(head)
    if idle:
        timeout = sock.gettimeout()
        sock.settimeout(None)
        try:
            _recv_into(sock, view[:1])
        finally:
            sock.settimeout(timeout)
        _recv_into(sock, view[1:])
    else:
        _recv_into(sock, view)
    (n,) = LEN.unpack(head)
    if n > limit:
        raise TransportError(f"frame of {n} bytes exceeds the limit of {limit}")
    body = alloc(n)
    _recv_into(sock, memoryview(body))
    return body


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME, idle: bool = False) -> bytes:
    """One frame's body as ``bytes`` (for small messages such as handshakes; bulk readers
    use :func:`recv_buffer`)."""
    return bytes(recv_buffer(sock, limit, idle))


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


def parse_address(text) -> tuple[str, int]:
    """``HOST:PORT`` as ``(host, port)`` (an address tuple passes through);
    InputError when it is not one."""
    if isinstance(text, tuple):
        return text[0], int(text[1])
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def dial(address: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


# -- payloads -----------------------------------------------------------------------------
def json_object(data: bytes) -> dict:
    """A control message: a JSON object, or a SerializationError."""
    try:
        out = json.loads(bytes(data).decode())
        if not isinstance(out, dict):
            raise ValueError("not an object")
        return out
    except (ValueError, UnicodeDecodeError) as exc:
        raise SerializationError(f"malformed control message: {exc}") from None


_DTYPES = {"u8": np.dtype("<u8"), "u1": np.dtype("u1"), "f8": np.dtype("<f8")}


def _dtype_code(a: np.ndarray) -> str:
    code = next((k for k, v in _DTYPES.items() if v == a.dtype.newbyteorder("<")
                 or v == a.dtype), None)
    if code is None:
        raise SerializationError(f"arrays of {a.dtype} do not travel between processes")
    return code


def _array_head(a: np.ndarray, code: str) -> bytes:
    head = json.dumps({"dtype": code, "shape": list(a.shape)}).encode()
    return LEN.pack(len(head)) + head


def array_parts(a: np.ndarray) -> tuple[bytes, memoryview]:
    """:func:`pack_array`'s bytes as (header, a view of the array's data): a sender that
    copies them into its own buffer (``mpc.transport``) need not join them first."""
    code = _dtype_code(a)
    return _array_head(a, code), memoryview(np.ascontiguousarray(a, _DTYPES[code])).cast("B")


def pack_array(a: np.ndarray) -> bytes:
    return b"".join(array_parts(a))


def unpack_array(data) -> np.ndarray:
    """The array in ``data`` (bytes-like). A view of ``data`` when the wire order is the
    machine's: big messages are not copied."""
    try:
        data = memoryview(data).cast("B")
        (n,) = LEN.unpack(data[:4])
        head = json.loads(bytes(data[4:4 + n]).decode())
        dtype, shape = _DTYPES[head["dtype"]], tuple(int(s) for s in head["shape"])
        body = data[4 + n:]
        if any(s < 0 for s in shape) or len(body) != dtype.itemsize * math.prod(shape):
            raise ValueError("size mismatch")
        return np.frombuffer(body, dtype=dtype).reshape(shape).astype(
            dtype.newbyteorder("="), copy=False)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed array message: {exc}") from None


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytearray:
    """Named arrays as one message (a JSON index, then each array's head and bytes),
    written into one buffer."""
    items = []
    for k, v in arrays.items():
        v = np.asarray(v)
        code = _dtype_code(v)
        items.append((k, _array_head(v, code), np.ascontiguousarray(v, _DTYPES[code])))
    index = json.dumps({k: len(h) + a.nbytes for k, h, a in items}).encode()
    out = bytearray(LEN.size + len(index) + sum(len(h) + a.nbytes for _, h, a in items))
    out[:LEN.size + len(index)] = LEN.pack(len(index)) + index
    at = LEN.size + len(index)
    for _, h, a in items:
        out[at:at + len(h)] = h
        at += len(h)
        np.frombuffer(out, np.uint8, a.nbytes, at)[:] = a.reshape(-1).view(np.uint8)
        at += a.nbytes
    return out


def unpack_arrays(data) -> dict[str, np.ndarray]:
    """The named arrays of a :func:`pack_arrays` message (bytes-like), as views of it."""
    try:
        data = memoryview(data).cast("B")
        (n,) = LEN.unpack(data[:4])
        index = json.loads(bytes(data[4:4 + n]).decode())
        if not isinstance(index, dict):
            raise ValueError("the index is not an object")
        out, at = {}, 4 + n
        for key, size in index.items():
            if int(size) < 0 or at + int(size) > len(data):
                raise ValueError("sizes exceed the message")
            out[str(key)] = unpack_array(data[at:at + int(size)])
            at += int(size)
        if at != len(data):
            raise ValueError("trailing bytes")
        return out
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise SerializationError(f"malformed message: {exc}") from None

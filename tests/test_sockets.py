"""Shared socket plumbing: scatter-gather frames, zero-copy receive, the array codec."""
import socket
import threading

import numpy as np
import pytest

from veil.backends import sockets as so
from veil.errors import SerializationError


def test_frames_of_parts_arrive_whole_even_when_larger_than_socket_buffers():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # force partial sendmsg
    big = np.random.default_rng(0).bytes(3 << 20)
    parts = [b"\x01\x02", bytearray(big), memoryview(b"tail"), b""]
    t = threading.Thread(target=so.send_frame, args=(a, *parts))
    t.start()
    got = so.recv_buffer(b)
    t.join()
    assert isinstance(got, bytearray) and bytes(got) == b"\x01\x02" + big + b"tail"
    so.send_frame(a, b"small")
    assert so.recv_frame(b) == b"small"
    a.close()
    with pytest.raises(so.TransportError):
        so.recv_frame(b)


def test_frame_over_the_limit_is_refused_before_reading():
    a, b = socket.socketpair()
    a.sendall(so.LEN.pack(1 << 20))
    with pytest.raises(so.TransportError, match="exceeds"):
        so.recv_buffer(b, limit=1000)


def test_arrays_round_trip_from_any_buffer_without_copies():
    rng = np.random.default_rng(1)
    arrays = {"x": rng.random((3, 4)), "k": rng.integers(0, 2 ** 63, (5,), dtype=np.uint64),
              "b": np.arange(7, dtype=np.uint8), "empty": np.zeros((0, 2))}
    msg = so.pack_arrays(arrays)
    for buf in (bytes(msg), bytearray(msg), memoryview(msg)):
        out = so.unpack_arrays(buf)
        assert set(out) == set(arrays)
        for k, v in arrays.items():
            assert out[k].dtype == v.dtype and np.array_equal(out[k], v)
    view = so.unpack_arrays(msg)["x"]
    assert np.shares_memory(view, np.frombuffer(msg, np.uint8))     # a view, not a copy
    with pytest.raises(SerializationError):
        so.pack_arrays({"f": np.zeros(2, np.float32)})


@pytest.mark.parametrize("cut", [3, 10, -1])
def test_truncated_or_inflated_array_messages_are_refused(cut):
    msg = bytes(so.pack_arrays({"x": np.ones((2, 2))}))
    with pytest.raises(SerializationError):
        so.unpack_arrays(msg[:cut])
    with pytest.raises(SerializationError):
        so.unpack_arrays(msg + b"\x00")
    index = b'{"x": 99999}'
    with pytest.raises(SerializationError):
        so.unpack_arrays(so.LEN.pack(len(index)) + index + b"\x00" * 8)

"""Envelopes: versioned, typed, integrity-checked; malformed bytes are typed errors."""
import struct

import pytest

from veil.errors import SerializationError
from veil.wire import FORMAT_VERSION, pack, peek_kind, unpack


def test_round_trip_and_kind():
    blob = pack("veil-thing", {"a": b"xyz", "b": b""}, {"model": "m1"})
    header, parts = unpack(blob, "veil-thing")
    assert parts == {"a": b"xyz", "b": b""} and header["model"] == "m1"
    assert peek_kind(blob) == "veil-thing" and peek_kind(b"junk") is None
    with pytest.raises(SerializationError, match="expected a veil-other, got a veil-thing"):
        unpack(blob, "veil-other")


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"!", "trailing"),
    (lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:], "integrity"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([FORMAT_VERSION + 1]) + b[5:], "wire format"),
    (lambda b: b[:5] + struct.pack(">I", 1 << 30) + b[9:], "header"),
    (lambda b: b[:3], "truncated"),
])
def test_malformed_envelopes_are_rejected(mutate, message):
    blob = pack("veil-thing", {"a": b"payload bytes"})
    with pytest.raises(SerializationError, match=message):
        unpack(mutate(blob), "veil-thing")


def test_size_limit_and_type():
    blob = pack("veil-thing", {"a": b"x" * 100})
    with pytest.raises(SerializationError, match="exceeds"):
        unpack(blob, "veil-thing", max_size=50)
    with pytest.raises(SerializationError, match="expected bytes"):
        unpack("a string", "veil-thing")

"""Envelopes: versioned, typed, integrity-checked; malformed bytes are typed errors."""
import struct

import pytest

from veil.errors import SerializationError
from veil.wire import FORMAT_VERSION, pack, peek_kind, unpack, write


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


def test_streamed_write_equals_pack_and_views_are_checked_too(tmp_path):
    import io

    parts = {"a": b"xyz" * 1000, "b": b""}
    buf = io.BytesIO()
    assert write(buf, "veil-thing", parts, {"model": "m1"}) == len(buf.getvalue())
    assert buf.getvalue() == pack("veil-thing", parts, {"model": "m1"})
    header, views = unpack(memoryview(buf.getvalue()), "veil-thing", copy=False)
    assert all(isinstance(v, memoryview) for v in views.values())
    assert {k: bytes(v) for k, v in views.items()} == parts
    bad = bytearray(buf.getvalue())
    bad[-1] ^= 1
    with pytest.raises(SerializationError, match="integrity"):
        unpack(memoryview(bad), "veil-thing", copy=False)


def test_evaluation_key_files_map_rather_than_read(tmp_path):
    from veil.deploy.keys import EvaluationKeys
    from veil.errors import KeyTypeError

    keys = EvaluationKeys("m", "0" * 32, {"mult": b"m" * 64, "rotations": b"r" * 128})
    path = tmp_path / "keys"
    assert keys.save(path) == len(keys.to_bytes())
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):         # never overwrites
        keys.save(path)
    loaded = EvaluationKeys.load(path)
    assert isinstance(loaded.parts["rotations"], memoryview)
    assert (loaded.model_id, loaded.tag, loaded.size) == ("m", "0" * 32, 192)
    assert bytes(loaded.parts["mult"]) == b"m" * 64
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SerializationError, match="empty"):
        EvaluationKeys.load(tmp_path / "empty")
    from veil.deploy.keys import SecretKey

    SecretKey("m", b"s", b"p").save(tmp_path / "sk")
    with pytest.raises(KeyTypeError):           # a secret key is refused by kind
        EvaluationKeys.load(tmp_path / "sk")


def test_file_parts_are_written_like_bytes_and_per_key_layouts_are_named(tmp_path):
    """A part kept in a file (a bootstrapped model's keys) makes the same envelope as
    its bytes; evaluation keys take one key map or one part per rotation key."""
    from veil.deploy.keys import EvaluationKeys
    from veil.wire import FilePart

    (tmp_path / "r1").write_bytes(b"1" * 100)
    (tmp_path / "boot").write_bytes(b"b" * 300)
    files = {"mult": b"m" * 8, "bootstrap": FilePart(tmp_path / "boot"),
             "rotation/1": FilePart(tmp_path / "r1")}
    same = {"mult": b"m" * 8, "bootstrap": b"b" * 300, "rotation/1": b"1" * 100}
    keys = EvaluationKeys("m", "0" * 32, files)
    assert keys.to_bytes() == EvaluationKeys("m", "0" * 32, same).to_bytes()
    assert keys.save(tmp_path / "keys") == len(keys.to_bytes()) and keys.size == 408
    loaded = EvaluationKeys.load(tmp_path / "keys")
    assert {k: bytes(v) for k, v in loaded.parts.items()} == same
    for parts in ({"mult": b"", "rotation/1": b""},                  # no bootstrap part
                  {"mult": b"", "bootstrap": b"", "rotation/x": b""},
                  {"mult": b"", "bootstrap": b"", "rotations": b""}):
        with pytest.raises(SerializationError, match="missing parts"):
            EvaluationKeys.from_bytes(EvaluationKeys("m", "0" * 32, parts).to_bytes())

"""Every bad input gets a clear, typed veil error."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import veil
from veil import ModelClient, ModelServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, compiled_cnn):
    root = tmp_path_factory.mktemp("bundles")
    server_dir, client_dir = compiled_cnn.export(root)
    client = ModelClient(client_dir)
    client.keygen()
    server = ModelServer(server_dir)
    session = server.open_session(client.evaluation_keys())
    yield root, client, server, session
    session.close()


def test_unsupported_operation_names_op_and_node():
    # (fx does not map Softplus, and neither does the ONNX frontend it falls back to)
    model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2))
    with pytest.raises(veil.UnsupportedOperation, match=r"Softplus \(torch module\) at node '_1'"):
        veil.compile(model, np.zeros((2, 4)))


def test_wrong_shape_nan_inf_and_range(setup, compiled_cnn):
    _, client, _, _ = setup
    with pytest.raises(veil.InputError, match=r"compiled for \(1, 8, 8\)"):
        client.encrypt(np.zeros((1, 28, 28)))
    with pytest.raises(veil.InputError, match="NaN"):
        client.encrypt(np.full((1, 8, 8), np.nan))
    with pytest.raises(veil.InputError, match="NaN or infinity"):
        client.encrypt(np.full((1, 8, 8), np.inf))
    with pytest.raises(veil.InputRangeError, match=r"row 0, feature \(0, 0, 0\): value 50 is "
                       r"outside the calibrated range .*clip=True") as info:
        client.encrypt(np.full((1, 8, 8), 50.0))
    assert info.value.rows == (0,) and len(info.value.features) == 64
    with pytest.raises(veil.InputError):
        compiled_cnn.run(np.zeros((3, 28, 28)))
    with pytest.raises(veil.ModeError, match="unknown mode"):
        compiled_cnn.run(np.zeros((1, 8, 8)), mode="fhe")


def test_tampered_truncated_and_foreign_bytes(setup):
    _, client, _, session = setup
    ct = bytearray(client.encrypt(np.zeros((1, 8, 8))))
    ct[len(ct) // 2] ^= 0x01
    with pytest.raises(veil.SerializationError, match="integrity"):
        session.run(bytes(ct))
    with pytest.raises(veil.SerializationError):
        session.run(bytes(ct[:100]))
    with pytest.raises(veil.SerializationError):
        session.run(b"not a ciphertext at all")
    with pytest.raises(veil.SerializationError, match="expected a veil-ciphertext"):
        session.run(client.public_key().to_bytes())
    with pytest.raises(veil.SerializationError, match="exceeds"):
        session.run(client.evaluation_keys())     # far larger than any input ciphertext
    out = session.run(client.encrypt(np.zeros((1, 8, 8))))
    with pytest.raises(veil.SerializationError, match="input ciphertext"):
        session.run(out)  # an output is not an input


def test_oversized_payload_is_refused_before_parsing(setup):
    _, client, server, session = setup
    ct = client.encrypt(np.zeros((1, 8, 8)))
    assert len(ct) < server.max_input_bytes
    with pytest.raises(veil.SerializationError, match="exceeds"):
        session.run(ct + b"\0" * server.max_input_bytes)


def test_ciphertext_from_another_key(setup):
    root, client, _, session = setup
    other = ModelClient(root / "client")
    other.keygen()
    with pytest.raises(veil.KeyMismatchError):
        session.run(other.encrypt(np.zeros((1, 8, 8))))
    with pytest.raises(veil.KeyMismatchError):
        other.decrypt(session.run(client.encrypt(np.zeros((1, 8, 8)))))


def test_missing_evaluation_keys(setup):
    root, client, server, _ = setup
    fresh = ModelClient(root / "client")
    with pytest.raises(veil.MissingKeyError, match="keygen"):
        fresh.evaluation_keys()
    with pytest.raises(veil.MissingKeyError):
        fresh.encrypt(np.zeros((1, 8, 8)))
    keys = veil.EvaluationKeys.from_bytes(fresh_keys(root))
    stripped = veil.EvaluationKeys(keys.model_id, keys.tag, {"mult": keys.parts["mult"],
                                                             "rotations": b""})
    with pytest.raises(veil.MissingKeyError, match="rotation keys"):
        server.open_session(stripped.to_bytes())


def fresh_keys(root):
    c = ModelClient(root / "client")
    c.keygen()
    return c.evaluation_keys()


def test_keys_for_another_model(setup, tmp_path):
    root, client, server, _ = setup
    other = veil.compile(nn.Sequential(nn.Linear(4, 2)), np.random.rand(8, 4))
    _, other_client_dir = other.export(tmp_path)
    c = ModelClient(other_client_dir)
    c.keygen()
    with pytest.raises(veil.KeyMismatchError, match="another model"):
        server.open_session(c.evaluation_keys())


def test_bundle_version_and_missing_files(setup, tmp_path):
    root, _, _, _ = setup
    with pytest.raises(veil.BundleError, match="missing"):
        ModelServer(tmp_path / "nothing")
    doc = json.loads((root / "client" / "client.json").read_text())
    doc["format"] = 99
    (tmp_path / "client.json").write_text(json.dumps(doc))
    with pytest.raises(veil.BundleError, match="format 99"):
        ModelClient(tmp_path)
    doc["format"], doc["libraries"]["openfhe"] = 1, "0.0.1"
    (tmp_path / "client.json").write_text(json.dumps(doc))
    with pytest.raises(veil.BundleError, match="OpenFHE 0.0.1"):
        ModelClient(tmp_path)


def test_calibration_shape_mismatch():
    with pytest.raises(veil.VeilError):
        veil.compile(nn.Sequential(nn.Linear(4, 2)), np.zeros((3, 5)))

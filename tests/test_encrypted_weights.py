"""Encrypted-weight mode: the host holds neither the input nor the weights."""
import numpy as np
import pytest

import veil
from veil import ModelClient, ModelServer

REL_TOL = 2.0 ** -16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, compiled_cnn):
    root = tmp_path_factory.mktemp("enc")
    server_dir, client_dir = compiled_cnn.export(root, encrypted_weights=True)
    client = ModelClient(client_dir)
    keys = client.keygen()
    weights = compiled_cnn.encrypt_weights(client.public_key())       # model owner
    server = ModelServer(server_dir)
    return root, client, keys, weights, server


def test_host_bundle_has_no_weights(setup):
    _, _, _, _, server = setup
    assert server.bundle.weights == "encrypted"
    for node in server.bundle.graph.nodes:
        for arr in node.params.values():
            assert not np.any(arr)


def test_ciphertext_times_ciphertext_matches_simulate(setup, digits_cnn, compiled_cnn):
    _, client, keys, weights, server = setup
    _, (_, xte, _, _) = digits_cnn
    with server.open_session(keys, weights=weights) as session:
        for x in xte[:2]:
            out = client.decrypt(session.run(client.encrypt(x)))
            sim = compiled_cnn.run(x, "simulate")
            assert np.abs(out - sim).max() / np.abs(sim).max() < REL_TOL
            assert out.argmax() == sim.argmax()


def test_encrypted_weights_are_required_and_bound_to_the_client(setup, compiled_cnn):
    root, client, keys, weights, server = setup
    with pytest.raises(veil.MissingKeyError, match="weights are encrypted"):
        server.open_session(keys)
    other = ModelClient(root / "client")
    other_keys = other.keygen()
    with pytest.raises(veil.KeyMismatchError, match="another client"):
        server.open_session(other_keys, weights=weights)
    plain_server = ModelServer(compiled_cnn.server_bundle())
    with pytest.raises(veil.SerializationError, match="plaintext weights"):
        plain_server.open_session(keys, weights=weights)
    tampered = bytearray(weights)
    tampered[-10] ^= 1
    with pytest.raises(veil.SerializationError, match="integrity"):
        server.open_session(keys, weights=bytes(tampered))


def test_weightless_host_builds_every_layout():
    """The host's bundle holds zeros: every layer kind (here a client-expanded first
    layer) must still build its evaluator from the manifest's diagonals."""
    from models import trained_digits_mlp

    model, (xtr, _, _, _) = trained_digits_mlp()
    compiled = veil.compile(model, xtr)
    assert compiled.manifest()["input"]["layout"] == "expanded"
    ModelServer(compiled.server_bundle().without_weights())

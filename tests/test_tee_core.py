"""TEE building blocks in one process: evidence tokens and policy, HPKE sealing, the
replay window, the encrypted bundle and key release."""
import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.backends.tee import (Policy, SoftwareAttester, TrustedAttester, attest, bundle,
                               keyrelease, seal)
from veil.errors import (AttestationError, BundleError, DecryptionError,
                         EvidenceExpiredError, KeyReleaseError, PolicyError, ReplayError)
from veil.backends.tee.executor import RuntimeSpec
from veil.ir import interpreter

M = "ab" * 32


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    d = tmp_path_factory.mktemp("att")
    SoftwareAttester.create(d)
    return SoftwareAttester.load(d), TrustedAttester.load(d)


def _claims(nonce, measurement=M, iat=None, ttl=60, keys=None):
    iat = int(time.time()) if iat is None else iat
    return {"eat_profile": attest.PROFILE, "eat_nonce": attest.b64(nonce), "iat": iat,
            "exp": iat + ttl, "measurement": measurement,
            "hpke": {s: attest.b64(k) for s, k in (keys.public if keys else {}).items()}}


def _policy(trusted, **kw):
    return Policy(frozenset({M}), (trusted,), **{"allow_insecure": True, **kw})


def test_evidence_round_trip_and_every_refusal(signer):
    attester, trusted = signer
    nonce = b"n" * 32
    token = attester.attest(_claims(nonce))
    ev = attest.verify_evidence(token, _policy(trusted), nonce)
    assert ev.measurement == M and ev.insecure and "INSECURE" in ev.claims["iss"]
    head = json.loads(attest.unb64(token.split(".")[0]))
    assert head == {"alg": "EdDSA", "typ": "eat+jwt", "kid": trusted.kid}
    with pytest.raises(AttestationError, match="nonce"):
        attest.verify_evidence(token, _policy(trusted), b"m" * 32)
    h, c, s = token.split(".")
    forged = attest.b64(json.dumps(dict(json.loads(attest.unb64(c)), measurement=M)).encode())
    with pytest.raises(AttestationError, match="signature"):
        attest.verify_evidence(f"{h}.{forged}.{s}", _policy(trusted), nonce)
    with pytest.raises(PolicyError, match="unknown measurement"):
        attest.verify_evidence(attester.attest(_claims(nonce, "cd" * 32)), _policy(trusted),
                               nonce)
    with pytest.raises(EvidenceExpiredError):
        attest.verify_evidence(token, _policy(trusted, max_age_s=10), nonce,
                               now=time.time() + 30)
    with pytest.raises(EvidenceExpiredError):
        attest.verify_evidence(token, _policy(trusted), nonce, now=time.time() - 60)
    with pytest.raises(PolicyError, match="INSECURE"):
        attest.verify_evidence(token, _policy(trusted, allow_insecure=False), nonce)
    stranger = TrustedAttester("software", Ed25519PrivateKey.generate().public_key())
    with pytest.raises(PolicyError, match="does not trust"):
        attest.verify_evidence(token, _policy(stranger), nonce)
    with pytest.raises(AttestationError):
        attest.verify_evidence("not.a-token", _policy(trusted), nonce)
    with pytest.raises(AttestationError, match="SEV-SNP"):
        attest.load_attester("sev-snp", ".")


def test_policy_file_round_trip(signer, tmp_path):
    policy = _policy(signer[1], max_age_s=42)
    assert Policy.load(policy.save(tmp_path / "p.json")) == policy
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PolicyError):
        Policy.load(tmp_path / "bad.json")


@pytest.mark.parametrize("suite", list(seal.SUITES))
def test_channel_keying_and_sealed_messages(suite):
    keys = seal.EnclaveKeys()
    assert "private" not in repr(keys).replace("private keys in process memory", "")
    pk = seal.public_key(suite, keys.public[suite])
    opening, client = seal.open_channel(seal.Header(b"c" * 16, 0, suite), pk)
    enclave = seal.accept_channel(keys, *seal.read_header(opening))
    raw = seal.Header(b"c" * 16, 7, suite).encode()
    request = client.seal(True, 7, raw, b"input bytes")
    assert b"input bytes" not in request
    h, got, sealed = seal.read_header(request)
    assert (h.seq, got, seal.header_seq(raw)) == (7, raw, 7)
    assert enclave.decrypt(True, 7, raw, sealed) == b"input bytes"
    reply = enclave.encrypt(False, 7, raw, b"output bytes")
    assert client.decrypt(False, 7, raw, reply) == b"output bytes"
    assert client.seal(False, 7, raw, b"x")[:len(raw)] == raw
    errors = set()

    def refused(fn, *args):
        with pytest.raises(DecryptionError) as err:
            fn(*args)
        errors.add(str(err.value))
    flip = lambda b: b[:-1] + bytes([b[-1] ^ 1])        # noqa: E731
    refused(enclave.decrypt, True, 7, raw, flip(bytes(sealed)))          # ciphertext
    moved = seal.Header(b"c" * 16, 8, suite).encode()                    # header (aad)
    refused(enclave.decrypt, True, 8, moved, sealed)
    refused(enclave.decrypt, True, 7, moved, sealed)
    refused(client.decrypt, False, 7, raw, flip(reply))
    other = enclave.encrypt(False, 8, moved, b"output bytes")
    refused(client.decrypt, False, 7, raw, other)                        # another answer
    refused(client.decrypt, False, 7, raw, sealed)          # its own request reflected back
    refused(seal.accept_channel, keys, *seal.read_header(flip(opening)))
    refused(seal.accept_channel, seal.EnclaveKeys(), *seal.read_header(opening))
    assert errors == {"the sealed message could not be opened"}      # one opaque error


def test_replay_window():
    w = seal.ReplayWindow(size=4)
    for s in (1, 3, 2):
        w.commit(s)
    for s in (1, 2, 3):
        with pytest.raises(ReplayError):
            w.commit(s)
    w.commit(10)
    with pytest.raises(ReplayError):
        w.check(6)                         # below the window: refused
    w.commit(8)                            # inside it, out of order: fine once
    with pytest.raises(ReplayError):
        w.commit(8)


@pytest.fixture(scope="module")
def graph():
    import torch
    from models import DigitsCNN

    from veil.frontend import to_graph

    torch.manual_seed(0)
    return to_graph(DigitsCNN().eval(), (1, 8, 8))


def test_encrypted_bundle_and_key_release(graph, signer, tmp_path, rng):
    attester, trusted = signer
    ex = bundle.export_model(graph, tmp_path / "export", tmp_path / "keys")
    blob = (tmp_path / "export" / bundle.MODEL).read_bytes()
    weight = graph.nodes[-1].params["weight"]
    assert weight[0].tobytes()[:32] not in blob and b"DENSE" not in blob.upper()
    with pytest.raises(BundleError, match="key-release"):
        bundle.load_model(tmp_path / "export")
    with pytest.raises(BundleError, match="does not open"):
        bundle.load_model(tmp_path / "export", bytes(32))
    # key release: the key goes, sealed, to the attested enclave key and only there
    keys, nonce = seal.EnclaveKeys(), b"k" * 32
    policy = Policy(frozenset({ex.measurement}), (trusted,), allow_insecure=True)
    token = attester.attest(_claims(nonce, ex.measurement, keys=keys))
    wrapped = keyrelease.release_key(token, policy, nonce, tmp_path / "keys", ex.key_id)
    key = keys.open(keyrelease.KEY_SUITE, wrapped, keyrelease._info(ex.key_id, nonce))
    lowered = bundle.load_model(tmp_path / "export", key)
    x = rng.normal(size=(5, 1, 8, 8))
    np.testing.assert_allclose(interpreter.run(lowered, x), interpreter.run(graph, x),
                               atol=1e-10)
    with pytest.raises(DecryptionError):
        seal.EnclaveKeys().open(keyrelease.KEY_SUITE, wrapped,
                                keyrelease._info(ex.key_id, nonce))
    # another bundle's enclave (different measurement) gets nothing
    other = bundle.export_model(graph, tmp_path / "other")
    policy2 = Policy(frozenset({ex.measurement, other.measurement}), (trusted,),
                     allow_insecure=True)
    token2 = attester.attest(_claims(nonce, other.measurement, keys=keys))
    with pytest.raises(KeyReleaseError, match="measurement"):
        keyrelease.release_key(token2, policy2, nonce, tmp_path / "keys", ex.key_id)
    with pytest.raises(PolicyError):
        keyrelease.release_key(token2, policy, nonce, tmp_path / "keys", ex.key_id)


def test_measurement_covers_bundle_and_code(graph, tmp_path):
    a = bundle.export_model(graph, tmp_path / "a")
    assert bundle.measure(tmp_path / "a") == a.measurement
    (tmp_path / "a" / bundle.MODEL).write_bytes((tmp_path / "a" / bundle.MODEL).read_bytes()
                                                + b"\0")
    assert bundle.measure(tmp_path / "a") != a.measurement
    assert len(bundle.code_digest()) == 64
    # the TEE target keeps structure (a convolution stays one: the runtime runs it
    # natively) and the measurement covers the runtime, its dtype and its version
    b = bundle.export_model(graph, tmp_path / "b")
    lowered = bundle.load_model(b.directory)
    assert [n.op.value for n in lowered.nodes] == [n.op.value for n in graph.nodes]
    assert bundle.load_runtime(b.directory) == RuntimeSpec("onnxruntime", "float32")
    c = bundle.export_model(graph, tmp_path / "c", runtime=RuntimeSpec("torch", "float64"))
    assert c.measurement != b.measurement and bundle.measure(c.directory) == c.measurement

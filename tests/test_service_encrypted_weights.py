"""Encrypted weights served end to end: three parties, each its own actor.

* the service: a real ``veil serve`` process (``python -m veil.service``) serving one
  model twice, with plaintext weights (``tiny``) and as an ``--encrypted-weights`` export
  (``tiny-ew``, its bundle holds zeros);
* the clients (data owners): the SDK, each with its own API key and key folder;
* the model owner: the CLI (``veil owner upload-weights``) and ``veil.sdk.ModelOwner``,
  with an owner key for ``tiny-ew`` and its bundle with plaintext weights.

Insecure test parameters (ring 4096), as in the other service tests.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

import veil
from veil.deploy.bundle import ServerBundle
from veil.deploy.client import ModelClient
from veil.deploy.keys import WEIGHTS_KIND
from veil.errors import (ForbiddenError, KeyMismatchError, MissingKeyError, NotFoundError,
                         PayloadTooLargeError, SerializationError)
from veil.model import export_model
from veil.sdk.owner import ModelOwner
from veil.service.auth import KeyStore
from veil.wire import peek_kind

from service_util import ROOT, ServerProcess, tiny_export

REL_TOL = 2.0 ** -10     # CKKS noise of ciphertext x ciphertext products at ring 4096


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ew")
    model, compiled, calib = tiny_export(root / "tiny", "tiny")
    export_model(model, calib, root / "tiny-ew", name="tiny-ew", modes=("he",),
                 compiled=compiled, encrypted_weights=True)
    owner_bundle = root / "owner-bundle"      # the model owner's, never on the host
    compiled.server_bundle().save(owner_bundle)
    # the size of one client's encrypted weights, to set the upload limit just above it
    probe = ModelClient(compiled.client_bundle())
    probe.keygen()
    size = len(compiled.encrypt_weights(probe.public_key()))
    probe.close()
    store = root / "store"
    keys = KeyStore(store)
    tokens = {name: keys.create(name) for name in ("alice", "bob", "carol")}
    tokens["owner"] = keys.create("owner", owner_of=["tiny-ew"])
    tokens["tiny-owner"] = keys.create("tiny-owner", owner_of=["tiny"])
    server = ServerProcess([root / "tiny", root / "tiny-ew"], store,
                           "--max-weights-upload", str(size + 4096))
    yield {"root": root, "compiled": compiled, "calib": calib, "store": store,
           "tokens": tokens, "url": server.url, "owner_bundle": owner_bundle,
           "size": size}
    server.stop()
    assert server.errors() == "", server.errors()
    keys.close()


def client(env, who, model="tiny-ew"):
    return veil.Client(env["url"], model, api_key=env["tokens"][who],
                       key_dir=env["root"] / f"keys-{who}", allow_insecure=True)


def owner(env, who="owner"):
    return ModelOwner(env["url"], env["owner_bundle"], api_key=env["tokens"][who])


def veil_cli(*args: str) -> str:
    """``python -m veil ARGS`` in its own process; its stdout."""
    r = subprocess.run([sys.executable, "-m", "veil", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                  "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_three_parties_match_the_plaintext_export(env):
    xs = env["calib"][:6]
    with client(env, "alice") as alice:
        with pytest.raises(MissingKeyError, match="owner has not uploaded"):
            alice.predict(xs[0])
    path = env["root"] / "alice.request"     # handed to the model owner out of band
    out = veil_cli("weights-request", env["url"], "--model", "tiny-ew", "--out", str(path),
                   "--api-key", env["tokens"]["alice"], "--key-dir",
                   str(env["root"] / "keys-alice"), "--allow-insecure")
    assert "written to" in out
    out = veil_cli("owner", "upload-weights", env["url"], "--bundle", str(env["owner_bundle"]),
                   "--request", str(path), "--api-key", env["tokens"]["owner"])
    assert "encrypted weights uploaded to session" in out
    with client(env, "alice") as alice, client(env, "alice", "tiny") as plain:
        out = alice.infer_batch(xs)              # a new Client reuses the session
        ref = plain.infer_batch(xs)
    sim = np.stack([env["compiled"].run(x, "simulate") for x in xs])
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < REL_TOL
    assert np.abs(out - sim).max() / scale < REL_TOL
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_the_host_holds_no_plaintext_weights(env):
    with client(env, "carol") as carol, owner(env) as o:   # the SDK path of the owner
        o.upload_weights(carol.mode.weights_request())
        carol.predict(env["calib"][0])
    weights = list((env["store"] / "sessions").glob("*.weights"))
    assert weights and all(peek_kind(p.read_bytes()[:4096]) == WEIGHTS_KIND for p in weights)
    arrays = [a for n in ServerBundle.load(env["owner_bundle"]).graph.nodes
              for a in n.params.values() if np.any(a)]
    assert arrays
    needles = [a.astype(dt).tobytes()[:64] for a in arrays for dt in (np.float64, np.float32)]
    files = [p for p in env["store"].rglob("*") if p.is_file()]
    files += [p for p in (env["root"] / "tiny-ew").rglob("*") if p.is_file()]
    for p in files:
        data = p.read_bytes()
        assert not any(n in data for n in needles), p


def test_refused_uploads_say_why(env):
    with client(env, "alice") as alice, client(env, "bob") as bob:
        request, other_request = alice.mode.weights_request(), bob.mode.weights_request()
    with owner(env) as o:
        name, sid, blob = o.encrypt(request)
        _, bob_sid, _ = o.encrypt(other_request)
        # wrong session: weights for alice's public key sent to bob's session
        with pytest.raises(KeyMismatchError, match="another client") as exc:
            o.upload(name, bob_sid, blob)
        assert exc.value.status == 409
        with pytest.raises(NotFoundError):
            o.upload(name, "0" * 32, blob)
        tampered = bytearray(blob)
        tampered[-10] ^= 1
        with pytest.raises(SerializationError, match="integrity") as exc:
            o.upload(name, sid, bytes(tampered))
        assert exc.value.status == 400
        with pytest.raises(SerializationError):
            o.upload(name, sid, b"not an envelope")
        with pytest.raises(PayloadTooLargeError) as exc:
            o.upload(name, sid, blob + b"\0" * 8192)
        assert exc.value.status == 413
        # wrong model: another model's weights, encrypted for a client of that model (a
        # model id fingerprints the architecture and parameters, not the weights' values)
        torch.manual_seed(3)
        wider = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3))
        other = veil.compile(wider, env["calib"], insecure_test_params=True)
        assert other.server_bundle().model_id != env["compiled"].server_bundle().model_id
        with ModelClient(other.client_bundle()) as stranger:
            stranger.keygen()
            foreign = other.encrypt_weights(stranger.public_key())
        with pytest.raises(KeyMismatchError, match="another model"):
            o.upload(name, sid, foreign)
    for who in ("alice", "tiny-owner"):     # a client key; another model's owner key
        with owner(env, who) as o, pytest.raises(ForbiddenError) as exc:
            o.upload(name, sid, blob)
        assert exc.value.status == 403
    with owner(env) as o:           # nothing refused was kept: the good upload still works
        assert o.upload(name, sid, blob)["session"] == sid
    with owner(env, "tiny-owner") as o, pytest.raises(SerializationError, match="plaintext"):
        o.upload("tiny", sid, blob)


def test_owner_keys_are_scoped_to_models_and_old_stores_migrate(tmp_path):
    import sqlite3

    from veil.errors import InputError

    store = tmp_path / "store"
    keys = KeyStore(store)
    client_token = keys.create("client")
    keys.close()
    with sqlite3.connect(store / "veil.sqlite3") as db:     # a store made before roles
        db.execute("ALTER TABLE api_keys DROP COLUMN owner_of")
    keys = KeyStore(store)
    owner_token = keys.create("owner", owner_of=["b", "a", "a"])
    client, owner = keys.verify(client_token), keys.verify(owner_token)
    keys.require_owner(owner, "a")
    for kid, model in ((owner, "c"), (client, "a"), ("000000000000", "a")):
        with pytest.raises(ForbiddenError, match="--owner"):
            keys.require_owner(kid, model)
    assert {r["name"]: r["owner_of"] for r in keys.list()} == {"client": [],
                                                               "owner": ["a", "b"]}
    with pytest.raises(InputError):
        keys.create("bad", owner_of="a")        # a str, not a list of names
    keys.close()


def test_bad_keys_for_an_encrypted_weights_model_are_refused_at_upload(env):
    """Its sessions load keys only with the owner's weights, yet OpenFHE checks them when
    they arrive: a valid envelope around rotation keys cut short is refused at once."""
    import httpx

    from veil.wire import pack, unpack

    with ModelClient(env["compiled"].client_bundle()) as stranger:
        good = stranger.keygen().to_bytes()
    header, parts = unpack(good, "veil-evaluation-keys")
    meta = {k: v for k, v in header.items() if k not in ("kind", "parts")}
    forged = pack("veil-evaluation-keys",
                  {**parts, "rotations": parts["rotations"][:len(parts["rotations"]) // 2]},
                  meta)
    before = sorted((env["store"] / "sessions").iterdir())
    with httpx.Client(base_url=env["url"], timeout=60, headers={
            "Authorization": f"Bearer {env['tokens']['bob']}",
            "Content-Type": "application/octet-stream"}) as http:
        r = http.post("/v1/models/tiny-ew/he/sessions", content=forged)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] in ("malformed", "rejected-input")
        r = http.post("/v1/models/tiny-ew/he/sessions", content=good)
        assert r.status_code == 201, r.text
    assert len(sorted((env["store"] / "sessions").iterdir())) == len(before) + 1

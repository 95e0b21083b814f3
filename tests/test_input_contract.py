"""One input contract in every mode (veil.backends.inputs): the same shapes pushed
through ``compiled.run`` in plain, simulate, he, tee and mpc, and through the SDK against
one real service in he, tee and mpc, are accepted or refused alike, with the same output
shapes and the same error wording.

The model takes inputs of shape (2, 3), so a flat sample is distinct from one sample;
HE uses insecure test parameters (ring 4096) so the module runs in well under 90 s."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import veil
from veil.backends.inputs import as_inputs, check_batch
from veil.errors import InputError
from veil.model import export_model

SHAPE_HINT = "this model was compiled for (2, 3) (one input) or a batch (B, 2, 3)"
CALIB = np.random.default_rng(0).uniform(-1, 1, (64, 2, 3))
X = CALIB[:3]                       # inside the calibrated range: he and simulate take them
NAN = X.copy()
NAN[1, 0, 2] = np.nan

# name, what the caller passes, the output shape (per sample (3,)) or the refusal's words
CASES = [
    ("one sample", X[0], (3,)),
    ("flat sample", X[0].ravel(), (3,)),
    ("batch of one", X[:1], (1, 3)),
    ("batch of three", X, (3, 3)),
    ("list of lists", X[:2].tolist(), (2, 3)),
    ("empty batch", np.zeros((0, 2, 3)),
     "the batch is empty: give one input of shape (2, 3) or a batch (B, 2, 3) with B >= 1"),
    ("empty list", [],
     "the batch is empty: give one input of shape (2, 3) or a batch (B, 2, 3) with B >= 1"),
    ("wrong trailing shape", np.zeros((2, 3, 2)), f"input has shape (2, 3, 2); {SHAPE_HINT}"),
    ("flat of the wrong size", np.zeros(5), f"input has shape (5,); {SHAPE_HINT}"),
    ("0-d scalar", np.float64(0.5), f"input has shape (); {SHAPE_HINT}"),
    ("NaN", NAN, "input contains NaN or infinity"),
    ("infinity", np.full((2, 3), np.inf), "input contains NaN or infinity"),
    ("not numeric", [[[0, "x", 1]] * 2],
     "input is not numeric: could not convert string to float: 'x'"),
]
IDS = [name for name, _, _ in CASES]


TOLERANCE = {"plain": 1e-9, "simulate": 0.05, "he": 0.05, "tee": 1e-4, "mpc": 1e-3}


torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 3)).eval()


def _reference(x, want: tuple[int, ...]) -> np.ndarray:
    """The torch model's answer to an accepted case, shaped as the case says."""
    with torch.no_grad():
        out = MODEL(torch.tensor(np.asarray(x, dtype=np.float32).reshape(-1, 2, 3))).numpy()
    return out.reshape(want)


def _check(call, x, want, atol):
    if isinstance(want, str):
        with pytest.raises(InputError) as info:
            call(x)
        assert str(info.value) == want
        return
    out = np.asarray(call(x))
    assert out.shape == want
    np.testing.assert_allclose(out, _reference(x, want), atol=atol)


@pytest.fixture(scope="module")
def compiled():
    c = veil.compile(MODEL, CALIB, insecure_test_params=True)
    yield MODEL, c
    c.close()


@pytest.mark.parametrize("name,x,want", CASES, ids=IDS)
def test_the_contract_itself(name, x, want):
    if isinstance(want, str):
        with pytest.raises(InputError) as info:
            as_inputs(x, (2, 3))
        assert str(info.value) == want
    else:
        batch, single = as_inputs(x, (2, 3))
        assert batch.shape[1:] == (2, 3) and single == (len(want) == 1)


def test_a_mode_cap_and_the_batch_only_form_use_the_same_words():
    with pytest.raises(InputError, match="a batch here holds at most 2 inputs, not 3"):
        as_inputs(X, (2, 3), max_batch=2)
    with pytest.raises(InputError) as info:
        check_batch(X[0], (2, 3))                     # a wire wants a batch
    assert str(info.value) == f"input has shape (2, 3); {SHAPE_HINT}"
    with pytest.raises(InputError, match="the batch is empty"):
        check_batch(np.zeros((0, 2, 3)), (2, 3))


@pytest.mark.parametrize("mode", ["plain", "simulate", "he", "tee", "mpc"])
def test_compiled_run_in_every_mode(compiled, mode):
    _, c = compiled
    for name, x, want in CASES:
        _check(lambda v: c.run(v, mode), x, want, TOLERANCE[mode])


@pytest.fixture(scope="module")
def served(compiled, tmp_path_factory):
    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester

    model, c = compiled
    d = tmp_path_factory.mktemp("contract")
    info = export_model(model, CALIB, d / "m", compiled=c)      # he, tee and mpc
    SoftwareAttester.create(d / "att")
    transport.setup(d / "mpc-keys")

    def veil_cli(*args):
        return subprocess.run([sys.executable, "-m", "veil", *args], check=True,
                              capture_output=True, text=True).stdout
    veil_cli("tee-policy", str(info.path("tee")), "--attester", str(d / "att"),
             "--allow-insecure", "--out", str(d / "policy.json"))
    key = veil_cli("keys", "create", "alice", "--store", str(d / "store")).strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "serve", str(d / "m"), "--store", str(d / "store"),
         "--listen", "127.0.0.1:0", "--tee-attester-key", str(d / "att"),
         "--mpc-keys", str(d / "mpc-keys"), "--allow-insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on http://" in line, line
    options = {"he": {"allow_insecure": True}, "tee": {"policy": d / "policy.json"},
               "mpc": {"mpc_keys": d / "mpc-keys"}}
    clients = {mode: veil.Client(line.split()[-1], "m", mode, api_key=key,
                                 key_dir=d / "keys", **options[mode])
               for mode in ("he", "tee", "mpc")}
    yield {"clients": clients, "url": line.split()[-1], "key": key, "dir": d,
           "options": options}
    for client in clients.values():
        client.close()
    proc.terminate()
    proc.wait(timeout=30)


def _split(client, x):
    """The split API: encrypt (seal, share), infer, decrypt."""
    return client.decrypt(client.infer(client.encrypt(x)))


def _batch_of(want):
    """What infer_batch answers for a case: one input is a batch of one."""
    return want if isinstance(want, str) or len(want) == 2 else (1, *want)


@pytest.mark.parametrize("mode", ["he", "tee", "mpc"])
def test_the_sdk_in_every_mode(served, mode):
    client = served["clients"][mode]
    for name, x, want in CASES:
        _check(client.predict, x, want, TOLERANCE[mode])
        _check(lambda v: _split(client, v), x, want, TOLERANCE[mode])
        if isinstance(want, str):
            _check(client.infer_batch, x, want, TOLERANCE[mode])
            _check(client.classify, x, want, TOLERANCE[mode])
        else:
            out = np.asarray(client.infer_batch(x))
            np.testing.assert_allclose(out, _reference(x, _batch_of(want)),
                                       atol=TOLERANCE[mode])
            assert np.shape(client.classify(x)) == want[:-1]


@pytest.mark.parametrize("data,count", [(X[0], 1), (X[0].ravel(), 1), (X[:1], 1), (X, 3)],
                         ids=["one sample", "flat sample", "batch of one", "batch of three"])
def test_veil_predict_reads_a_file_of_the_input_shape_as_one_input(
        served, tmp_path, capsys, monkeypatch, data, count):
    """It used to read a (30,) file as 30 inputs."""
    import argparse
    import json

    from veil.commands import predict_cmd
    np.save(tmp_path / "x.npy", data)
    monkeypatch.setenv("HOME", str(served["dir"]))
    args = argparse.Namespace(url=served["url"], model="m", mode="tee", clip=False,
                              text=None, texts=None, input=str(tmp_path / "x.npy"),
                              api_key=served["key"], policy=served["options"]["tee"]["policy"],
                              mpc_keys=None, batch_size=64, out=None)
    assert predict_cmd(args) == 0
    classes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = _reference(data, (count, 3)).argmax(1)
    assert classes == want.tolist()

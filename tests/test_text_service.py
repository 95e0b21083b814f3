"""A text model served: MiniLM-L6 (8 tokens) exported for tee and mpc, `veil serve`, and
the SDK and `veil predict --text` sending texts that only the client tokenizes (mpc:
the client one-hot encodes the ids before sharing them)."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")


def _veil(*args):
    return subprocess.run([sys.executable, "-m", "veil", *args], check=True,
                          capture_output=True, text=True).stdout


TEXTS = ["Wheat prices rose sharply on export demand.", "Be patient: good things come."]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    from veil.backends.mpc import transport
    from veil.backends.tee import SoftwareAttester
    from veil.model import export_model
    try:
        from veil.text.minilm import load_minilm
        from veil.text.tokenize import Tokenizer
        model, tok = load_minilm(8), Tokenizer(8)
    except ImportError as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("text")
    x = tok.encode(TEXTS)
    info = export_model(model, x, d / "minilm", modes=("tee", "mpc"))
    assert info.index["text"] == {"tokenizer": "all-MiniLM-L6-v2", "seq_len": 8}
    with torch.no_grad():
        plain = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    SoftwareAttester.create(d / "att")
    transport.setup(d / "mpc-keys")
    _veil("tee-policy", str(info.path("tee")), "--attester", str(d / "att"),
          "--allow-insecure", "--out", str(d / "policy.json"))
    key = _veil("keys", "create", "alice", "--store", str(d / "store")).strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "veil", "serve", str(d / "minilm"), "--store", str(d / "store"),
         "--listen", "127.0.0.1:0", "--tee-attester-key", str(d / "att"),
         "--mpc-keys", str(d / "mpc-keys")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on http://" in line, line
    yield {"url": line.split()[-1], "dir": d, "key": key, "plain": plain}
    proc.terminate()
    proc.wait(timeout=30)


def _cos(a, b):
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("mode", ["tee", "mpc"])
def test_the_sdk_sends_texts_it_tokenized_itself(served, mode):
    from veil.sdk import Client

    opts = {"policy": served["dir"] / "policy.json"} if mode == "tee" else \
        {"mpc_keys": served["dir"] / "mpc-keys"}
    with Client(served["url"], "minilm", mode, api_key=served["key"], **opts) as c:
        assert c.info()["text"]["seq_len"] == 8
        assert _cos(c.predict(TEXTS), served["plain"]).min() >= 0.999
        assert _cos(c.predict(TEXTS[0]), served["plain"][0]).min() >= 0.999


def test_veil_predict_takes_texts(served, tmp_path):
    out = tmp_path / "emb.npy"
    _veil("predict", served["url"], "--model", "minilm", "--mode", "mpc", "--api-key",
          served["key"], "--mpc-keys", str(served["dir"] / "mpc-keys"),
          "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(out))
    assert _cos(np.load(out), served["plain"]).min() >= 0.999

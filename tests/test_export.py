"""One export folder per model for all modes, and its index checks."""
import json

import numpy as np
import pytest
import torch

from veil.deploy.export import read_export
from veil.model import export_model
from veil.errors import BundleError, ModeError


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def test_export_writes_every_mode_and_reads_back(mlp, tmp_path):
    calib = np.random.default_rng(0).uniform(-1, 1, (64, 4))
    info = export_model(mlp, calib, tmp_path / "tiny", modes="he,tee,mpc",
                        insecure_test_params=True)
    assert info.name == "tiny" and info.modes == ("he", "tee", "mpc")
    assert info.input_shape == (4,) and info.output_shape == (3,)
    for sub in ("he/server", "he/client", "tee", "mpc"):
        assert (tmp_path / "tiny" / sub).is_dir()
    assert read_export(tmp_path / "tiny").index["he"]["model_id"] == info.index["he"]["model_id"]
    with pytest.raises(ModeError):
        export_model(mlp, calib, tmp_path / "x", modes="he,gpu")
    only = export_model(mlp, calib, tmp_path / "t2", name="t-2", modes=["tee"])
    with pytest.raises(ModeError, match="not exported for mode 'he'"):
        only.path("he")


@pytest.mark.parametrize("index", [None, "{", {"format": 9}, {"format": 1, "name": "../x",
                                                               "modes": ["tee"],
                                                               "input_shape": [4],
                                                               "output_shape": [3]},
                                   {"format": 1, "name": "ok", "modes": ["mpc"],
                                    "input_shape": [4], "output_shape": [3]}])
def test_bad_export_folders_are_refused(tmp_path, index):
    if index is not None:
        (tmp_path / "veil-export.json").write_text(index if isinstance(index, str)
                                                   else json.dumps(index))
    with pytest.raises(BundleError):
        read_export(tmp_path)

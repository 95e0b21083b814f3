"""Calibrated input ranges per feature: what compile records, what the HE client and
simulate refuse (the same rows, with the same typed error), what ``clip`` clamps, and
how the bounds travel (manifest, client bundle, SDK, CLI, ``veil compare``).

The model is a small MLP on scikit-learn's breast-cancer data with raw features (one
spans 0.05-0.16, another 140-2500): one range for all of them would be useless.
"""
import json
import warnings

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import veil
from veil.compiler.ranges import PER_ELEMENT_MAX, InputRange
from veil.errors import BundleError, InputClippedWarning, InputError, InputRangeError

MARGIN = 0.1


@pytest.fixture(scope="module")
def cancer():
    """(model, calibration, test inputs, test labels, compiled): 400 rows calibrate,
    the other 169 test; the model standardizes the raw features in its first layer."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cal, xte, yte = x[:400], x[400:], y[400:]
    torch.manual_seed(0)
    scale = nn.Linear(30, 30)
    with torch.no_grad():
        scale.weight.copy_(torch.diag(torch.as_tensor(1 / cal.std(0), dtype=torch.float32)))
        scale.bias.copy_(torch.as_tensor(-cal.mean(0) / cal.std(0), dtype=torch.float32))
    scale.requires_grad_(False)
    model = nn.Sequential(scale, nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.as_tensor(cal, dtype=torch.float32), torch.as_tensor(y[:400])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    compiled = veil.compile(model, cal, degree=7, margin=MARGIN, insecure_test_params=True)
    yield model, cal, xte, yte, compiled
    compiled.close()


def _outside_rows(compiled, x) -> np.ndarray:
    lo, hi = compiled.input_range.bounds()
    return np.flatnonzero(((x < lo) | (x > hi)).any(axis=1))


# -- what compile records ---------------------------------------------------------------------

def test_each_feature_gets_its_own_calibrated_range(cancer):
    _, cal, _, _, compiled = cancer
    rng = compiled.input_range
    assert rng.per == "element" and rng.lo.shape == rng.hi.shape == (30,)
    width = cal.max(0) - cal.min(0)
    np.testing.assert_allclose(rng.lo, cal.min(0) - MARGIN * width)
    np.testing.assert_allclose(rng.hi, cal.max(0) + MARGIN * width)
    assert rng.overall == (float(rng.lo.min()), float(rng.hi.max()))
    # the point: a radius of 1000 lies inside the one overall pair (areas reach ~2500)
    # but far outside the radius's own range, and is refused
    x = cal[:3].copy()
    x[1, 0] = 1000.0
    assert rng.overall[0] < 1000.0 < rng.overall[1]
    with pytest.raises(InputRangeError) as info:
        compiled.run(x, "simulate")
    assert info.value.rows == (1,) and info.value.features == ((0,),)


def test_a_constant_feature_is_widened_by_the_batch_width():
    cal = np.random.default_rng(0).uniform(-3, 5, (50, 4))
    cal[:, 2] = 1.5
    rng = InputRange.calibrate(cal, MARGIN)
    whole = cal.max() - cal.min()
    assert rng.lo[2] == pytest.approx(1.5 - MARGIN * whole)
    assert rng.hi[2] == pytest.approx(1.5 + MARGIN * whole)
    flat = InputRange.calibrate(np.zeros((5, 3)), MARGIN)       # one constant: a sliver
    assert 0 < flat.hi[0] - flat.lo[0] < 1e-6


def test_images_get_per_channel_bounds_and_long_vectors_one_pair():
    small = InputRange.calibrate(np.random.default_rng(0).uniform(0, 1, (9, 1, 8, 8)), MARGIN)
    assert small.per == "channel" and small.lo.shape == (1, 1, 1)
    wide = np.random.default_rng(0).normal(size=(4, PER_ELEMENT_MAX + 1))
    one = InputRange.calibrate(wide, MARGIN)
    w = wide.max() - wide.min()
    assert one.per == "model" and one.lo.shape == () and "bounds" not in one.to_manifest()
    assert one.overall == pytest.approx((wide.min() - MARGIN * w, wide.max() + MARGIN * w))
    cal = np.random.default_rng(1).normal(size=(6, 2, 48, 48))
    cal[:, 1] *= 10
    rng = InputRange.calibrate(cal, MARGIN)
    assert rng.per == "channel" and rng.lo.shape == (2, 1, 1)
    for c in range(2):
        w = cal[:, c].max() - cal[:, c].min()
        assert rng.lo[c, 0, 0] == pytest.approx(cal[:, c].min() - MARGIN * w)
    entry = {"shape": [2, 48, 48], **rng.to_manifest()}
    assert len(entry["bounds"]["lo"]) == 2
    back = InputRange.from_manifest(json.loads(json.dumps(entry)))
    assert back.per == "channel" and np.array_equal(back.lo, rng.lo)
    x = cal[:2].copy()
    x[1, 0, 5, 3] = 20.0                 # inside channel 1's range, not channel 0's
    assert rng.hi[0, 0, 0] < 20.0 < rng.hi[1, 0, 0]
    with pytest.raises(InputRangeError, match=r"input row 1, feature \(0, 5, 3\): value "
                       r"20 is outside") as info:
        rng.check(x)
    assert info.value.rows == (1,) and info.value.features == ((0, 5, 3),)


# -- the error --------------------------------------------------------------------------------

def test_the_error_names_row_feature_value_range_and_the_way_out(cancer):
    _, _, xte, _, compiled = cancer
    lo, hi = compiled.input_range.bounds()
    x = np.clip(xte[:6], lo, hi)
    x[2, 5] = hi[5] + 1.0
    x[4, 7], x[4, 9] = lo[7] - 1.0, hi[9] * 3
    with pytest.raises(InputRangeError) as info:
        compiled.run(x, "simulate")
    err = info.value
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert err.rows == (2, 4) and err.features == ((5,), (7,), (9,))
    text = str(err)
    assert text.startswith(f"input row 2, feature 5: value {x[2, 5]:.6g} is outside the "
                           f"calibrated range [{lo[5]:.6g}, {hi[5]:.6g}]")
    assert "3 values out of range in all: rows 2, 4; features 5, 7, 9" in text
    assert "clip=True" in text


# -- simulate predicts HE ---------------------------------------------------------------------

def test_simulate_refuses_exactly_the_rows_the_he_client_refuses(cancer):
    from veil.deploy.client import ModelClient

    _, _, xte, _, compiled = cancer
    bad = _outside_rows(compiled, xte)
    assert 0 < len(bad) < len(xte)          # the raw test split reaches past calibration

    def refused(check, x) -> bool:
        try:
            check(x)
        except InputRangeError:
            return True
        return False

    with ModelClient(compiled.client_bundle()) as client:
        # the HE client checks the whole batch before it encrypts (no keys needed)
        with pytest.raises(InputRangeError) as he:
            client.encrypt_batch(list(xte))
        with pytest.raises(InputRangeError) as sim:
            compiled.run(xte, "simulate")
        assert he.value.rows == sim.value.rows == tuple(bad)
        assert he.value.features == sim.value.features and str(he.value) == str(sim.value)
        # one input at a time, with the client's own check
        by_he = [i for i in range(len(xte)) if refused(lambda v: client._checked([v]), xte[i])]
        by_sim = [i for i in range(len(xte))
                  if refused(lambda v: compiled.run(v, "simulate"), xte[i])]
        assert by_he == by_sim == list(bad)
    # plain computes any input exactly
    assert compiled.run(xte, "plain").shape == (len(xte), 2)


def test_he_refuses_before_starting_and_clip_agrees_with_simulate(cancer):
    _, _, xte, _, compiled = cancer
    x = xte[_outside_rows(compiled, xte)[:2]]
    with pytest.raises(InputRangeError):
        compiled.run(x, "he")
    assert not compiled._servers                      # refused before keys or processes
    with pytest.warns(InputClippedWarning):
        he = compiled.run(x, "he", clip=True)
    with pytest.warns(InputClippedWarning):
        sim = compiled.run(x, "simulate", clip=True)
    assert np.abs(he - sim).max() < 1e-2 * max(1.0, np.abs(sim).max())


# -- clip -------------------------------------------------------------------------------------

def test_clip_clamps_every_mode_and_warns_with_the_count(cancer):
    _, _, xte, _, compiled = cancer
    lo, hi = compiled.input_range.bounds()
    bad = _outside_rows(compiled, xte)
    values = int(((xte < lo) | (xte > hi)).sum())
    clamped = np.clip(xte, lo, hi)
    with pytest.warns(InputClippedWarning, match=rf"clipped {values} input values in "
                      rf"{len(bad)} of {len(xte)} rows \({bad[0]}, "):
        out = compiled.run(xte, "plain", clip=True)
    np.testing.assert_array_equal(out, compiled.run(clamped, "plain"))
    assert not np.array_equal(out, compiled.run(xte, "plain"))   # plain alone: exact
    with pytest.warns(InputClippedWarning):
        sim = compiled.run(xte, "simulate", clip=True)
    np.testing.assert_array_equal(sim, compiled.run(clamped, "simulate"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # nothing to clip: no warning
        compiled.run(clamped, "simulate", clip=True)


def test_clip_is_refused_for_token_ids(cancer):
    from veil.compare.cli import main as compare_main
    from veil.model import CompiledModel

    _, cal, _, _, compiled = cancer
    text = CompiledModel(compiled.result, compiled.input_range, {}, text={"name": "t"})
    with pytest.raises(InputError, match="token ids"):
        text.run(cal[:2], "plain", clip=True)
    assert compare_main(["--text", "--clip", "--out", "unused"]) == 2


def test_a_model_built_with_one_pair_checks_that_pair(cancer):
    from veil.model import CompiledModel

    _, cal, _, _, compiled = cancer
    old = CompiledModel(compiled.result, (0.0, 3000.0), {})
    assert old.input_range.per == "model" and old.input_range.overall == (0.0, 3000.0)
    assert old.manifest()["input"]["range"] == [0.0, 3000.0]
    assert "bounds" not in old.manifest()["input"]
    x = cal[:2].copy()
    x[1, 4] = -1.0
    with pytest.raises(InputRangeError, match="input row 1, feature 4: value -1 is outside "
                       r"the calibrated range \[0, 3000\]"):
        old.run(x, "simulate")


def test_report_accuracy_says_which_rows_simulate_covers(cancer):
    _, _, xte, yte, compiled = cancer
    bad = _outside_rows(compiled, xte)
    report = compiled.report(xte, yte)
    keep = np.setdiff1d(np.arange(len(xte)), bad)
    pred = compiled.run(xte[keep], "simulate").argmax(1)
    assert report.accuracy["simulate"] == pytest.approx(np.mean(pred == yte[keep]))
    assert report.accuracy["plain"] > 0.85
    assert any(f"over the {len(keep)} of {len(xte)} inputs" in n for n in report.notes)


# -- how the bounds travel --------------------------------------------------------------------

def test_manifest_and_client_bundle_round_trip(cancer, tmp_path):
    from veil.deploy.bundle import ClientBundle

    _, _, _, _, compiled = cancer
    entry = compiled.manifest()["input"]
    assert entry["range"] == list(compiled.input_range.overall)
    assert entry["bounds"]["per"] == "element" and len(entry["bounds"]["lo"]) == 30
    _, client_dir = compiled.export(tmp_path)
    loaded = ClientBundle.load(client_dir)
    assert loaded.model_id == compiled.model_id
    assert np.array_equal(loaded.input_range.lo, compiled.input_range.lo)
    assert np.array_equal(loaded.input_range.hi, compiled.input_range.hi)


def test_an_old_manifest_with_one_pair_still_loads_and_checks(cancer, tmp_path):
    from veil.deploy.bundle import ClientBundle
    from veil.deploy.client import ModelClient

    _, cal, _, _, compiled = cancer
    _, client_dir = compiled.export(tmp_path)
    path = client_dir / "client.json"
    doc = json.loads(path.read_text())
    del doc["manifest"]["input"]["bounds"]                  # as veil wrote it before
    path.write_text(json.dumps(doc))
    rng = ClientBundle.load(client_dir).input_range
    assert rng.per == "model" and rng.overall == tuple(doc["manifest"]["input"]["range"])
    with ModelClient(client_dir) as client:
        x = cal[0].copy()
        x[3] = rng.overall[1] + 1
        with pytest.raises(InputRangeError, match="input row 0, feature 3: value"):
            client.encrypt(x)
    doc["manifest"]["input"]["bounds"] = {"per": "element", "lo": [0.0], "hi": [1.0]}
    path.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="input range is malformed"):
        ClientBundle.load(client_dir)


def test_the_service_maps_the_error_to_its_own_code():
    from veil.service.errors import exception_for, spec_for

    row = spec_for(InputRangeError("x", rows=(1,), features=((2,),)))
    assert (row.status, row.code) == (422, "input-range")
    back = exception_for("input-range", "msg", 422)
    assert type(back) is InputRangeError and back.rows == () and str(back) == "msg"


def test_sdk_he_mode_takes_clip(cancer, tmp_path):
    _, _, xte, _, compiled = cancer
    _, client_dir = compiled.export(tmp_path / "export")
    info = {"modes": ["he"], "input_shape": [30],
            "he": {"model_id": compiled.model_id, "max_batch": 8, "max_batch_bytes": 1 << 30}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=info))
    bad = xte[_outside_rows(compiled, xte)[0]]

    def client(**options):
        return veil.Client("http://veil.test", "cancer", "he", api_key="k",
                           key_dir=tmp_path / "keys", transport=transport,
                           bundle=client_dir, allow_insecure=True, **options)

    with client() as refusing:
        with pytest.raises(InputRangeError, match="input row 0, feature"):
            refusing.encrypt(bad)
    with client(clip=True) as clipping:
        assert np.array_equal(clipping.mode.input_range.lo, compiled.input_range.lo)
        with pytest.warns(InputClippedWarning, match="in 1 of 1 rows"):
            clipping.encrypt(bad)


def test_predict_cli_clip_flag(capsys):
    from veil.cli import _parser
    from veil.commands import _say_clipped, predict_cmd

    args = _parser().parse_args(["predict", "http://x", "--model", "m", "--input", "a.npy",
                                 "--clip"])
    assert args.clip is True
    args.mode = "tee"
    with pytest.raises(InputError, match="--clip .* he mode"):
        predict_cmd(args)
    rng = InputRange(np.zeros(3), np.ones(3), (3,), "element")
    _say_clipped(np.array([[0.5, 0.5, 0.5], [2.0, -1.0, 0.5], [0.0, 0.0, 3.0]]), rng)
    assert "3 values in 2 of 3 inputs (rows 1, 2) clamped" in capsys.readouterr().err


# -- veil compare -----------------------------------------------------------------------------

def _compare(cancer, clip: bool) -> dict:
    from veil.compare import runner
    from veil.compare.default import Workload

    model, cal, xte, yte, _ = cancer
    w = Workload("cancer", model, xte, yte, cal, "breast cancer MLP",
                 {"degree": 7, "margin": MARGIN})
    cfg = runner.CompareConfig(modes=("plain", "simulate"), n=len(xte), batch=16,
                               budget_s=20, insecure_test_params=True, clip=clip)
    return runner.run([w], cfg)["workloads"][0]


def test_compare_counts_refused_rows_and_gives_accuracy_over_the_others(cancer):
    from veil.compare import report

    _, _, xte, yte, compiled = cancer
    bad = _outside_rows(compiled, xte)
    w = _compare(cancer, clip=False)
    assert not w["errors"]
    plain, sim = w["modes"]["plain"], w["modes"]["simulate"]
    assert plain["n"] == len(xte) and "refused_inputs" not in plain
    keep = np.setdiff1d(np.arange(len(xte)), bad)[:sim["n"]]
    assert sim["refused_inputs"] == int(np.sum(bad < keep[-1] + 1))
    assert sim["offered_inputs"] == keep[-1] + 1
    pred = compiled.run(xte[keep], "simulate").argmax(1)
    assert sim["accuracy"] == pytest.approx(np.mean(pred == yte[keep]))
    assert sim["plain_accuracy_same_inputs"] == pytest.approx(
        np.mean(compiled.run(xte[keep], "plain").argmax(1) == yte[keep]))
    assert report.cells(sim, plain)[1] == f"{sim['n']} ({sim['refused_inputs']} refused)"


def test_compare_with_clip_counts_clipped_rows_in_every_mode(cancer):
    from veil.compare import report
    from veil.compare.cli import _config, _defaults, _options

    _, _, xte, _, compiled = cancer
    bad = _outside_rows(compiled, xte)
    w = _compare(cancer, clip=True)
    assert not w["errors"]
    for mode in ("plain", "simulate"):
        r = w["modes"][mode]
        assert r["n"] == len(xte) and r["clipped_inputs"] == len(bad)
        assert report.cells(r, None)[1] == f"{len(xte)} ({len(bad)} clipped)"
    import argparse

    parser = argparse.ArgumentParser()
    _options(parser)
    args = parser.parse_args(["--clip", "--modes", "plain"])
    _defaults(args)
    assert _config(args).clip is True

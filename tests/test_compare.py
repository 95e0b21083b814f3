"""``veil compare`` end to end on a tiny model: the report's shape and numbers, and that
no process it started is left running (also when a mode is interrupted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "simulate", "tee", "mpc", "he")


def _veil_descendants() -> list[str]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if p.status() != psutil.STATUS_ZOMBIE and "-m" in cmd and \
                    cmd[cmd.index("-m") + 1].startswith("veil"):
                out.append(" ".join(cmd))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _tiny_model(tmp: Path) -> tuple[Path, Path]:
    """An ONNX MLP 4 -> 8 -> ReLU -> 3 and 80 labelled inputs (labels are the model's
    own argmax on most inputs, so accuracy is high but not trivially 1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(8, 4)), rng.normal(size=8) * 0.1
    w2, b2 = rng.normal(size=(3, 8)), np.zeros(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp / "tiny.onnx")
    x = rng.uniform(-1, 1, size=(80, 4))
    y = (np.maximum(x @ w1.T + b1, 0) @ w2.T + b2).argmax(1)
    y[::7] = (y[::7] + 1) % 3
    np.savez(tmp / "tiny.npz", x=x, y=y)
    return tmp / "tiny.onnx", tmp / "tiny.npz"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    model, data = _tiny_model(tmp)
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.compare", str(model), "--data", str(data),
         "--n", "24", "--n-he", "3", "--batch", "8", "--insecure-test-params",
         "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=tmp)
    return proc, out


def test_command_succeeds_and_prints_the_table(compared):
    proc, _ = compared
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in MODES:
        assert mode in proc.stdout
    assert "the seeds' claims, measured" in proc.stdout


def test_no_process_left_running(compared):
    proc, out = compared
    assert _veil_descendants() == []
    result = json.loads((out / "report.json").read_text())
    assert result["left_running"] == []


def test_report_is_well_formed(compared):
    _, out = compared
    result = json.loads((out / "report.json").read_text())
    assert result["config"]["insecure_test_params"] is True
    (w,) = result["workloads"]
    assert w["errors"] == {}
    assert list(w["modes"]) == list(MODES)
    for mode, r in w["modes"].items():
        assert r["n"] == (3 if mode == "he" else 24)
        for key in ("latency_p50_s", "latency_p95_s", "throughput_per_s",
                    "client_compute_p50_s"):
            assert r[key] > 0, (mode, key)
        assert r["latency_p95_s"] >= r["latency_p50_s"]
        assert 0 <= r["accuracy"] <= 1
        assert r["peak_rss"]["client"] > 0
    md = (out / "report.md").read_text()
    assert "## tiny" in md and "### The seeds' claims, measured" in md
    assert "INSECURE test parameters" in md
    for name in ("latency.png", "throughput.png", "bytes.png", "accuracy.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"plots/{name}" in md


def test_numbers_are_consistent(compared):
    _, out = compared
    (w,) = json.loads((out / "report.json").read_text())["workloads"]
    modes = w["modes"]
    plain = modes["plain"]
    assert plain["agreement"] == 1.0 and plain["max_abs_error"] < 1e-9
    for mode in ("tee", "mpc"):           # exact protocols: plain's answers
        r = modes[mode]
        assert r["accuracy"] == r["plain_accuracy_same_inputs"] == plain["accuracy"]
        assert r["agreement"] == 1.0
        assert r["max_abs_error"] < 1e-3
    assert modes["he"]["agreement"] == 1.0 and modes["he"]["batch_agreement"] == 1.0
    for mode in ("tee", "mpc", "he"):
        r = modes[mode]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["client_round_trips"] == 1
        assert r["setup_s"] > 0
        assert any(k not in ("client", "client_baseline") and v > 0
                   for k, v in r["peak_rss"].items()), r["peak_rss"]
        assert r["client_compute_p50_s"] <= r["latency_p50_s"]
    # a batch is never much slower per input than one input at a time, and cannot be
    # more than ~batch times faster
    for mode, r in modes.items():
        gain = r["throughput_per_s"] * r["latency_p50_s"]
        assert 0.3 <= gain <= 2 * r["batch"], (mode, gain)
    assert modes["mpc"]["server_rounds"] >= 1
    assert modes["he"]["setup"]["evaluation_keys_bytes"] > 100_000
    # HE ciphertexts are far larger than the sealed TEE request of the same input
    assert modes["he"]["bytes_up"] > 10 * modes["tee"]["bytes_up"]
    assert all(c["ok"] for c in w["checks"]), w["checks"]


def test_claims_compare_measured_values(compared):
    _, out = compared
    (w,) = json.loads((out / "report.json").read_text())["workloads"]
    by = {c["claim"]: c for c in w["claims"]}
    he = by['HE "100-1000x" slower']
    ratio = w["modes"]["he"]["latency_p50_s"] / w["modes"]["plain"]["latency_p50_s"]
    assert he["measured"] == pytest.approx(ratio)
    assert he["verdict"].startswith("within" if 100 <= ratio <= 1000 else
                                    "outside (below)" if ratio < 100 else "outside (above)")
    # the ratio rests on the thinner of its two sides: he ran 3 inputs (--n-he 3)
    assert w["modes"]["he"]["n"] == 3 and he["samples"] == 3
    assert he["verdict"].endswith("(3 inputs, few)")
    assert by['MPC "3-10+ rounds"']["measured"] == w["modes"]["mpc"]["server_rounds"]
    assert by['seed 000: HE "cannot fit MLOps tools"']["verdict"].startswith("not tested")


def test_verdicts():
    from veil.compare.claims import verdict

    assert verdict(5, 1.1, 2) == "outside (above)"
    assert verdict(1.5, 1.1, 2) == "within"
    assert verdict(0.5, None, 1) == "within"
    assert verdict(2, 3, None) == "outside (below)"
    assert verdict(None, 1, 2) == "not measured"


def test_verdicts_say_how_many_inputs_they_rest_on():
    from veil.compare.claims import samples, with_samples

    modes = {"plain": {"n": 40}, "he": {"n": 4, "batch_inputs": 8}}
    assert samples(modes, ("he", "plain")) == 4
    assert samples(modes, ("he",), "batch_inputs") == 8
    assert samples(modes, ("mpc", "plain")) is None
    assert with_samples("within", 4) == "within (4 inputs, few)"
    assert with_samples("outside (above)", 40) == "outside (above) (40 inputs)"
    assert with_samples("not measured", None) == "not measured"


def test_header_states_the_inputs_each_mode_ran():
    """--n 4 with the default --n-he 20: the header says he ran 4, not 20."""
    from veil.compare import report

    mode = lambda n: {"n": n}  # noqa: E731
    result = {"workloads": [{"name": "digits", "modes": {"plain": mode(4), "he": mode(4),
                                                          "mpc": mode(3)}}]}
    assert report._ran(result) == "plain 4, he 4, mpc 3"
    result["workloads"].append({"name": "lenet", "modes": {"plain": mode(2)}})
    assert report._ran(result) == "digits: plain 4, he 4, mpc 3; lenet: plain 2"


def test_accuracy_legend_covers_no_bar():
    """Every bar of the accuracy plot reaches ~1, so no spot inside the axes is free:
    the legend sits outside them."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.compare import plots

    modes = ("plain", "simulate", "he", "mpc", "tee")
    values = {w: {m: 0.98 for m in modes} for w in ("digits", "lenet")}
    fig = plots.figure(plt, ["digits", "lenet"], "Accuracy", "accuracy",
                       dict(values=values, log=False), accuracy=True)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches]
    assert len(bars) == 10 and not any(legend.overlaps(b) for b in bars)
    plt.close(fig)


def test_interrupted_mode_stops_its_processes(tmp_path, monkeypatch):
    """Ctrl-C while the MPC parties run: every process is stopped before it propagates."""
    from veil.compare import default, remote, runner

    model, data = _tiny_model(tmp_path)
    with np.load(data) as z:
        x, y = z["x"], z["y"]
    w = default.Workload("tiny", str(model), x[40:], y[40:], x[:40], "test")

    def interrupted(job, procs):
        from veil.backends.mpc import transport

        procs.mpc(job.export, transport.setup(job.work_dir / "keys"))
        assert len(_veil_descendants()) == 3
        raise KeyboardInterrupt

    monkeypatch.setitem(remote.MEASURE, "mpc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run([w], runner.CompareConfig(modes=("plain", "mpc"), n=4))
    assert _veil_descendants() == []


def test_mlflow_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("onnx")
    try:
        import mlflow  # noqa: F401
        pytest.skip("mlflow is installed")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "veil.compare", "--mlflow",
                           str(tmp_path / "mlruns"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "pip install mlflow" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_model_needs_data(tmp_path):
    model, _ = _tiny_model(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "veil.compare", str(model)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--data" in proc.stderr


def test_mlflow_logs_runs_and_artifacts(tmp_path, monkeypatch):
    """mlflow-skinny is pinned in the dev extra, so this runs in the dev install: the
    parent run holds the report and plots, one nested run per mode holds its metrics
    and the compile settings (ring, depth, degrees), read back from the file store."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    model, data = _tiny_model(tmp_path)
    store, out = tmp_path / "mlruns", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.compare", str(model), "--data", str(data), "--modes",
         "plain,tee", "--n", "12", "--batch", "4", "--out", str(out), "--mlflow",
         str(store)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "report.json").read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # as veil compare does
    client = MlflowClient(store.resolve().as_uri())
    exp = client.get_experiment_by_name("veil-compare")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    tee = runs["tiny tee"]
    assert tee.data.metrics["latency_p50_s"] == pytest.approx(
        result["workloads"][0]["modes"]["tee"]["latency_p50_s"])
    plan = result["workloads"][0]["he_plan"]
    assert tee.data.params["ring_dim"] == str(plan["params"]["ring_dim"])
    assert tee.data.params["depth"] == str(plan["depth"])
    assert tee.data.params["degrees"] == ",".join(str(d) for d in plan["degrees"])
    assert plan["degrees"] and all(d >= 2 for d in plan["degrees"])    # the ReLU's fit
    assert runs["tiny plain"].data.params["mode"] == "plain"
    parent = client.get_run(result["mlflow_run"])
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json", "plots"} <= names


def test_he_server_refuses_bad_keys_and_ciphertexts(tmp_path):
    """The measurement HE server answers a typed error frame for bytes that are not
    evaluation keys or a ciphertext, and holds no key material of its own."""
    import veil
    from veil.backends import sockets
    from veil.compare.remote import CompareError, _HELink
    from veil.service.processes import Processes

    model, data = _tiny_model(tmp_path)
    with np.load(data) as z:
        x = z["x"]
    server_dir, client_dir = veil.compile(str(model), x, insecure_test_params=True) \
        .export(tmp_path / "he")
    with Processes(tmp_path / "logs") as procs:
        (address,) = procs.start("he", [str(server_dir)], module="veil.deploy.he_server")
        link = _HELink(address, timeout=30)
        with pytest.raises(CompareError, match="SerializationError"):
            link.call(b"not keys")
        link.close()
        client = veil.ModelClient(client_dir)
        client.keygen()
        link = _HELink(address, timeout=30)
        assert json.loads(link.call(client.evaluation_keys()))["session_s"] >= 0
        out = client.decrypt(link.call(client.encrypt(x[0])))
        assert out.shape == (3,)
        with pytest.raises(CompareError, match="SerializationError"):
            link.call(b"VEIL garbage")
        link.close()
    assert _veil_descendants() == []


def test_wan_relay_adds_the_round_trip_and_keeps_the_bytes():
    import socket
    import threading
    import time

    from veil.compare.wan import Wan

    server = socket.create_server(("127.0.0.1", 0))

    def echo():
        conn, _ = server.accept()
        while data := conn.recv(1 << 16):
            conn.sendall(data)
    threading.Thread(target=echo, daemon=True).start()
    with Wan(60, 20) as wan:
        sock = socket.create_connection(wan.relay(server.getsockname()))
        t = time.perf_counter()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        assert time.perf_counter() - t >= 0.06          # the round trip is there
        data = np.random.default_rng(0).bytes(100_000)
        t = time.perf_counter()
        sock.sendall(data)
        got = bytearray()
        while len(got) < len(data):
            got += sock.recv(1 << 16)
        assert bytes(got) == data                         # in order, intact
        assert time.perf_counter() - t >= 100_000 * 8 / 20e6   # and rate-limited
        sock.close()
    server.close()


def test_mpc_over_an_emulated_wan_is_measured_and_stopped(tmp_path):
    from veil.compare import default, runner

    model, data = _tiny_model(tmp_path)
    with np.load(data) as z:
        x, y = z["x"], z["y"]
    w = default.Workload("tiny", str(model), x[40:], y[40:], x[:40], "test")
    result = runner.run([w], runner.CompareConfig(modes=("plain", "mpc"), n=4,
                                                  wan={"rtt_ms": 10, "mbit": 100}))
    modes = result["workloads"][0]["modes"]
    lan, wan = modes["mpc"], modes["mpc (WAN)"]
    assert wan["mode"] == "mpc (WAN)" and wan["wan"] == "10 ms RTT, 100 Mbit/s"
    # each of the parties' rounds now crosses a 10 ms round trip
    assert wan["latency_p50_s"] > lan["latency_p50_s"] + 0.01 * wan["server_rounds"] / 2
    assert wan["agreement"] == 1.0 and result["left_running"] == []
    assert _veil_descendants() == []


# -- --text: MiniLM end to end, and the report of embedding workloads ---------------------

def _text_ready() -> None:
    """Skip unless torch, transformers, the MiniLM files and the fortunes are there."""
    pytest.importorskip("torch", reason="--text needs torch")
    pytest.importorskip("transformers", reason="--text needs transformers")
    from veil.text import DatasetUnavailable, TextDependencyError, model_dir
    from veil.text.datasets import fortunes

    try:
        model_dir()
        fortunes(1)
    except (TextDependencyError, DatasetUnavailable) as exc:
        pytest.skip(str(exc))


def test_text_minilm_runs_plain_tee_mpc_with_cosines_and_seed_000s_claim(tmp_path):
    """``--text minilm`` really runs plain, tee and mpc (processes on loopback) on one
    text of 8 tokens for mpc, two for the others: the cosine to plain's embedding per
    mode and seed 000's BERT claim beside the HE estimate (~30 s)."""
    _text_ready()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "veil.compare", "--text", "minilm", "--seq-len", "8",
         "--n", "2", "--n-mpc", "1", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cos min" in proc.stdout and 'BERT under HE in "287 s"' in proc.stdout
    result = json.loads((out / "report.json").read_text())
    assert result["left_running"] == [] and _veil_descendants() == []
    assert result["config"]["modes"] == ["plain", "tee", "mpc"]
    assert result["config"]["n_mpc"] == 1
    (w,) = result["workloads"]
    assert w["name"] == "minilm" and w["text"] == "minilm" and w["embedding"] is True
    assert w["input_shape"] == [2, 8] and w["errors"] == {}
    modes = w["modes"]
    assert list(modes) == ["plain", "tee", "mpc"]
    assert modes["plain"]["n"] == modes["tee"]["n"] == 2 and modes["mpc"]["n"] == 1
    assert modes["plain"]["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    for mode in ("tee", "mpc"):
        r = modes[mode]
        assert 0.999 <= r["cosine_min"] <= r["cosine_mean"] <= 1.0 + 1e-12, (mode, r)
        assert r["accuracy"] is None and r["bytes_up"] > 0 and r["bytes_down"] > 0
    # the one-hot encoded token ids are what the MPC client shares
    assert modes["mpc"]["bytes_up"] > 8 * 30522 * 8
    # (the timing checks are left out: two inputs on a shared machine are too noisy)
    cosine = [c for c in w["checks"] if "cosine" in c["check"]]
    assert len(cosine) == 2 and all(c["ok"] for c in cosine), cosine
    est = w["he_estimate"]
    assert est["transformer"] is True and est["latency_s"] > 0 and w["he_refused"]
    by = {c["claim"]: c for c in w["claims"]}
    he = by['seed 000: BERT under HE in "287 s"']
    assert he["measured"] == pytest.approx(est["latency_s"])
    assert he["verdict"] == "estimate only"
    tee = by['seed 000: BERT in a TEE in "0.3 s"']
    assert tee["measured"] == pytest.approx(modes["tee"]["latency_p50_s"])
    assert tee["verdict"].startswith("within" if tee["measured"] <= 0.3 else "outside (above)")
    ratio = by['seed 000: BERT "287 s" under HE vs "0.3 s" in a TEE']
    assert ratio["claimed"] == "957x"
    assert ratio["measured"] == pytest.approx(est["latency_s"] / modes["tee"]["latency_p50_s"])
    md = (out / "report.md").read_text()
    assert "| mode | n | cos min | cos mean |" in md
    assert 'seed 000: BERT under HE in "287 s"' in md and "| 287 s |" in md
    assert "max |output - plain|" in md and "PUMA" in md


def test_text_refuses_modes_that_cannot_run_transformers(tmp_path):
    for argv in (["--text", "--modes", "plain,he"], ["--text", "minilm", "--zoo"],
                 ["--seq-len", "8"]):
        proc = subprocess.run([sys.executable, "-m", "veil.compare", *argv, "--out",
                               str(tmp_path / "out")], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
    assert not (tmp_path / "out").exists()


def test_text_workload_missing_parts_is_skipped_with_the_reason(monkeypatch):
    from veil.compare import default
    from veil.text import DatasetUnavailable, TextDependencyError

    def missing(name, n, seq_len):
        if name == "minilm":
            raise TextDependencyError("the MiniLM model files are not installed: pip ...")
        raise DatasetUnavailable("weka data not found; run `make data`")

    monkeypatch.setattr(default, "_text_workload", missing)
    workloads, skipped = default.text_workloads("all", 3)
    assert workloads == []
    assert skipped == ["minilm skipped: the MiniLM model files are not installed: pip ...",
                       "minilm-grain skipped: weka data not found; run `make data`"]
    with pytest.raises(Exception, match="no text workload 'bert'"):
        default.text_workloads("minilm,bert", 3)


def _row(mode: str, **kw) -> dict:
    r = {"mode": mode, "n": 3, "agreement": 1.0, "max_abs_error": 1e-5, "accuracy": None,
         "plain_accuracy_same_inputs": None, "latency_p50_s": 0.01, "latency_p95_s": 0.02,
         "client_compute_p50_s": 0.001, "throughput_per_s": 150.0, "batch": 4,
         "batch_inputs": 3, "bytes_up": 100, "bytes_down": 200, "client_round_trips": 1,
         "server_rounds": 0, "setup": {}, "setup_s": 0.0, "setup_bytes": 0,
         "peak_rss": {"client": 2**30, "client_baseline": 2**30}}
    return {**r, **kw}


def test_report_of_an_embedding_workload_shows_cosines_and_the_bert_claim():
    """The report's formatting alone (no model is run): cosine columns replace accuracy
    and agreement, a failing cosine fails its check, seed 000's rows carry the values."""
    from veil.compare import report

    modes = {"plain": _row("plain", cosine_min=1.0, cosine_mean=1.0),
             "tee": _row("tee", cosine_min=1 - 3e-13, cosine_mean=1 - 1e-13,
                         latency_p50_s=0.02, baseline_latency_p50_s=0.015,
                         baseline_throughput_per_s=60.0),
             "mpc": _row("mpc", cosine_min=0.99, cosine_mean=0.995, latency_p50_s=1.5,
                         throughput_per_s=0.7, server_rounds=1160,
                         party_bytes_per_input=3e7, dealer_bytes_per_input=2e7,
                         online_p50_s=1.0)}
    est = {"depth": 315, "max_depth": 55, "bootstraps": 34, "bootstrap_ciphertexts": 34,
           "ring_dim": 65536, "rotation_keys": 178, "keys_bytes": 25 * 2**30,
           "latency_s": 1800.0, "fits": False, "transformer": True}
    w = {"name": "minilm", "source": "MiniLM", "input_shape": [2, 32], "compile_s": 1.0,
         "export_s": 1.0, "zoo": None, "text": "minilm", "embedding": True,
         "he_estimate": est, "he_refused": "layernorm has no HE kernel", "modes": modes,
         "errors": {}}
    result = {"time": "now", "machine": {"cpus": 2, "memory_bytes": 2**34, "platform": "x",
                                         "python": "3", "veil": "0"},
              "config": {"modes": ["plain", "tee", "mpc"], "n": 40, "n_he": 20, "n_mpc": 3,
                         "batch": 4, "budget_s": 30.0, "insecure_test_params": False},
              "skipped": ["minilm-grain skipped: weka data not found"], "workloads": [w],
              "wall_s": 10.0}
    report.finish(result)
    assert report.columns(w)[2:4] == ("cos min", "cos mean")
    rows = {r[0]: r for r in report.table_rows(w)}
    assert rows["plain"][2:4] == ["1", "1"]
    assert rows["tee"][2:4] == ["1 - 3.0e-13", "1 - 1.0e-13"]
    assert rows["mpc"][2:4] == ["0.990000", "0.995000"]
    checks = {c["check"].split(":")[0] + (" cos" if "cosine" in c["check"] else ""): c["ok"]
              for c in w["checks"]}
    assert checks["tee cos"] is True and checks["mpc cos"] is False
    by = {c["claim"]: c for c in w["claims"]}
    tee = by['seed 000: BERT in a TEE in "0.3 s"']
    assert tee["measured"] == 0.02 and tee["verdict"].startswith("within")
    assert "one text of 32 tokens" in tee["quantity"]
    assert by['seed 000: BERT in a TEE in "0.3 s" (mpc for context)']["measured"] == 1.5
    assert by['seed 000: BERT under HE in "287 s"']["measured"] == 1800.0
    assert by['seed 000: BERT "287 s" under HE vs "0.3 s" in a TEE']["measured"] == 90000.0
    md = report.markdown(result)
    assert "| mode | n | cos min | cos mean | p50 ms |" in md
    assert '| seed 000: BERT under HE in "287 s" |' in md
    assert "| 1,800 s (6.3x the claim" in md
    assert "| 90,000x (1,800 s / 0.02 s) | estimate only |" in md
    assert "single inputs each mode ran: plain 3, tee 3, mpc 3 " in md
    assert "not run: layernorm has no HE kernel" in md
    assert "_minilm-grain skipped: weka data not found_" in md
    # a logits workload keeps the accuracy and agreement columns
    assert report.columns({"embedding": False}) == report.COLUMNS
    assert report.rich_tables(result)[0].columns[2].header == "cos min"

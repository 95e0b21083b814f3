"""Operating ``veil serve``: what it announces, its JSON request log, its Prometheus
metrics on a private listener, HTTPS, and ``veil predict`` failing cleanly; all against
a real server process on loopback."""
from __future__ import annotations

import datetime
import ipaddress
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.service_util import ROOT, ServerProcess, tiny_export


def _veil(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "veil", *args], capture_output=True,
                          text=True, check=True, cwd=ROOT).stdout.strip()


def _line(server: ServerProcess, pattern: str, timeout: float = 10.0) -> re.Match:
    """The first match of ``pattern`` in the server's stderr (waits for it)."""
    end = time.monotonic() + timeout
    while True:
        found = re.search(pattern, server.log.read_text(errors="replace"))
        if found or time.monotonic() > end:
            assert found, f"{pattern!r} not in\n{server.log.read_text()}"
            return found
        time.sleep(0.05)


def _samples(text: str, name: str) -> dict[frozenset, float]:
    """``{labels: value}`` of metric ``name`` in a Prometheus text page."""
    out = {}
    for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[labels] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    tiny_export(root / "m", "m")
    store = root / "store"
    token = _veil("keys", "create", "alice", "--store", str(store))
    stingy = _veil("keys", "create", "bob", "--store", str(store), "--rate", "0.01",
                   "--burst", "1")
    server = ServerProcess([root / "m"], store, "--metrics-listen", "127.0.0.1:0",
                           "--he-workers", "1")
    metrics = _line(server, r"veil-serve metrics on (http://\S+/metrics)").group(1)
    yield {"server": server, "store": store, "token": token, "stingy": stingy,
           "metrics": metrics, "root": root}
    server.stop()


def test_start_says_what_it_serves_and_that_it_is_insecure(served):
    text = served["server"].log.read_text()
    index = json.loads((served["root"] / "m" / "veil-export.json").read_text())
    he = index["he"]
    assert f"serving m: he (model id {he['model_id']}, {he['lanes']} inputs per " \
           "ciphertext)" in text
    assert re.search(r"^INSECURE: m: its HE parameters are insecure test parameters", text,
                     re.M)


def test_requests_are_logged_as_json_lines_and_counted(served):
    import veil

    url, token = served["server"].url, served["token"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4))
    with veil.Client(url, "m", "he", api_key=token, key_dir=served["root"] / "keys",
                     allow_insecure=True) as client:
        out = client.infer_batch(x)
    assert len(out) == 2
    denied = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert denied.status_code == 401
    rid = denied.headers["x-request-id"]
    stingy = {"Authorization": f"Bearer {served['stingy']}"}
    answers = [httpx.get(f"{url}/v1/models/m", headers=stingy).status_code for _ in range(3)]
    assert 429 in answers
    # the service port has no metrics page: it is on its own listener
    assert httpx.get(f"{url}/metrics").status_code in (401, 404)

    log_file = served["store"] / "logs" / "service.log"
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    access = [r for r in lines if r["logger"] == "veil.service.access"]
    infer = [r for r in access if r["route"] == "/v1/he/sessions/{session_id}/infer-batch"]
    assert infer and infer[0]["model"] == "m" and infer[0]["mode"] == "he"
    assert infer[0]["status"] == 200 and infer[0]["latency_ms"] > 0
    assert {"time", "level", "message", "request_id", "method"} <= set(infer[0])
    (bad,) = [r for r in access if r["request_id"] == rid]
    assert bad["status"] == 401 and bad["route"] == "/v1/models"
    raw = log_file.read_text()
    for secret in (token, served["stingy"], token.split(".")[-1]):
        assert secret not in raw                  # no API keys, whole or in part

    page = httpx.get(served["metrics"]).text
    requests = _samples(page, "veil_requests_total")
    key = frozenset({("model", "m"), ("mode", "he"), ("status", "200"),
                     ("route", "/v1/he/sessions/{session_id}/infer-batch")})
    assert requests[key] == 1
    assert _samples(page, "veil_request_seconds_count")[key - {("status", "200")}] == 1
    errors = _samples(page, "veil_request_errors_total")
    assert errors[frozenset({("model", "-"), ("mode", "-"), ("status", "401")})] >= 1
    rejected = _samples(page, "veil_quota_rejections_total")
    assert rejected[frozenset({("model", "m"), ("mode", "-")})] == answers.count(429)
    assert _samples(page, "veil_he_sessions")[frozenset({("model", "m")})] == 1
    assert _samples(page, "veil_he_key_bytes")[frozenset({("model", "m")})] > 1000
    assert _samples(page, "veil_child_restarts_total")[
        frozenset({("child", "he-worker-0")})] == 0
    assert _samples(page, "veil_child_up")[frozenset({("child", "he-worker-0")})] == 1
    assert not served["server"].errors()


def test_predict_drops_its_bar_on_error(served, tmp_path, capsys, monkeypatch):
    """An error mid-prediction leaves no frozen 0/N bar above it; an SDK error that
    names a keyword argument names the flag instead."""
    from veil import cli

    monkeypatch.setenv("VEIL_API_KEY", served["token"])
    monkeypatch.setenv("HOME", str(tmp_path))             # the SDK's key folder
    np.save(tmp_path / "bad.npy", np.zeros((1, 5)))      # the model takes 4 features
    predict = ["predict", served["server"].url, "--model", "m", "--mode", "he",
               "--input", str(tmp_path / "bad.npy")]
    assert cli.main(predict) == 1
    err = capsys.readouterr().err
    assert "pass --allow-insecure" in err and "allow_insecure=" not in err
    assert cli.main([*predict, "--allow-insecure"]) == 1
    err = capsys.readouterr().err
    assert "veil predict:" in err and "shape" in err
    assert "0/1" not in err and "he: 1 inputs" not in err


def _self_signed(directory):
    """A certificate for 127.0.0.1 and its key, made here (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https(served, tmp_path, monkeypatch):
    """``--tls-cert/--tls-key`` serve HTTPS; the SDK trusts the certificate by ``ca=``
    or ``SSL_CERT_FILE`` and refuses it otherwise."""
    import veil
    from veil.errors import ServiceError

    cert, key = _self_signed(tmp_path)
    server = ServerProcess([served["root"] / "m"], served["store"], "--tls-cert", str(cert),
                           "--tls-key", str(key), "--he-workers", "1")
    try:
        assert server.url.startswith("https://127.0.0.1:")
        with veil.Client(server.url, "m", "he", api_key=served["token"], ca=str(cert),
                         key_dir=served["root"] / "keys", allow_insecure=True) as client:
            assert client.info()["name"] == "m"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with veil.Client(server.url, "m", "he", api_key=served["token"],
                         key_dir=served["root"] / "keys", allow_insecure=True) as client:
            assert client.info()["name"] == "m"
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(ServiceError):
            with veil.Client(server.url, "m", "he", api_key=served["token"],
                             key_dir=served["root"] / "keys", allow_insecure=True) as client:
                client.info()
        with pytest.raises(httpx.HTTPError):       # no plain HTTP on the TLS port
            httpx.get(server.url.replace("https", "http") + "/v1/health", timeout=5)
    finally:
        server.stop()
    assert not server.errors()


def test_serve_announces_enclaves_logs_children_and_counts_restarts(tmp_path):
    """``veil serve`` with a TEE export: the measurement and the software attester's
    INSECURE line at start, the enclave's log file says when it started, and killing the
    enclave shows as one restart in the metrics."""
    import os
    import signal

    from tests.abuse_util import Served
    from veil.backends.tee import SoftwareAttester

    tiny_export(tmp_path / "t", "t", modes=("tee",))
    SoftwareAttester.create(tmp_path / "att")
    served = Served([tmp_path / "t"], tmp_path / "store", "--allow-insecure",
                    "--tee-attester-key", tmp_path / "att",
                    "--metrics-listen", "127.0.0.1:0")
    try:
        index = json.loads((tmp_path / "t" / "veil-export.json").read_text())
        text = served.log.read_text()
        assert f"serving t: tee (measurement {index['tee']['measurement']})" in text
        assert "INSECURE: enclaves are vouched for by the software attester" in text
        metrics = re.search(r"veil-serve metrics on (http://\S+/metrics)", text).group(1)
        enclave_log = tmp_path / "store" / "logs" / "t-enclave.log"
        started = re.search(r"veil-tee enclave \(INSECURE software attester\) listening "
                            r"on \S+ \(pid (\d+)\)", enclave_log.read_text())
        assert started
        os.kill(int(started.group(1)), signal.SIGKILL)
        key = frozenset({("child", "t-enclave")})
        for _ in range(200):
            page = httpx.get(metrics).text
            if (_samples(page, "veil_child_restarts_total").get(key) == 1
                    and _samples(page, "veil_child_up").get(key) == 1):
                break
            time.sleep(0.05)
        assert _samples(page, "veil_child_restarts_total")[key] == 1
        assert _samples(page, "veil_child_up")[key] == 1
        assert len(re.findall(r"veil-tee enclave .* listening", enclave_log.read_text())) == 2
    finally:
        served.stop()

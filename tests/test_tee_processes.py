"""TEE through real processes: key-release service, enclave, and a host relay between the
client and the enclave that records (and, in attacks, alters) every frame it forwards."""
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from veil.backends.tee import PlaintextClient, Policy, TEEClient, bundle, net
from veil.errors import (AttestationError, DecryptionError, EvidenceExpiredError, InputError,
                         PolicyError, ReplayError, SessionError)
from veil.backends.sockets import LEN as _LEN, TransportError
from veil.ir import interpreter

# The enclave runs its bundle in onnxruntime, float32 (backends/tee/executor.py): its
# outputs (|y| < 1 here) agree with the float64 interpreter within float32 rounding.
ATOL = 1e-5


def _start(args):
    proc = subprocess.Popen([sys.executable, "-m", "veil", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        return proc, None, line
    host, port = line.split()[-1].rsplit(":", 1)
    return proc, (host, int(port)), line


def _veil(*args):
    return subprocess.run([sys.executable, "-m", "veil", *args], check=True,
                          capture_output=True, text=True).stdout


class Relay:
    """The untrusted host: forwards frames between clients and the enclave, keeps a copy
    of every byte, and lets a test rewrite frames (``hook(direction, kind, body)``)."""

    def __init__(self, target):
        self.target, self.hook = target, None
        self.seen = {"up": bytearray(), "down": bytearray()}
        self.kinds = {"up": [], "down": []}
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.server.accept()
            enclave = socket.create_connection(self.target)
            for src, dst, d in ((client, enclave, "up"), (enclave, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, d), daemon=True).start()

    @staticmethod
    def _read(sock, n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise OSError("closed")
            buf += chunk
        return buf

    def _pump(self, src, dst, direction):
        try:
            while True:
                (n,) = _LEN.unpack(self._read(src, 4))
                frame = self._read(src, n)
                if self.hook is not None:
                    frame = self.hook(direction, frame[1], frame)
                self.seen[direction] += _LEN.pack(len(frame)) + frame
                self.kinds[direction].append(frame[1])
                dst.sendall(_LEN.pack(len(frame)) + frame)
        except OSError:
            src.close()
            dst.close()

    def reset(self):
        self.hook = None
        for d in ("up", "down"):
            self.seen[d].clear()
            self.kinds[d].clear()


@pytest.fixture(scope="module")
def tee(tmp_path_factory):
    import torch
    from models import digits_mlp, digits_split

    from veil.frontend import to_graph

    torch.manual_seed(0)      # agreement with plain inference needs no training
    model, (_, xte, _, _) = digits_mlp().eval(), digits_split()
    d = tmp_path_factory.mktemp("tee")
    onnx_path = d / "mlp.onnx"
    torch.onnx.export(model.eval(), torch.zeros((1,) + xte.shape[1:]), str(onnx_path),
                      dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    _veil("tee-attester-setup", str(d / "att"))
    out = _veil("tee-export", str(onnx_path), "--input-shape", "1,8,8", str(d / "export"),
                "--encrypt-keys", str(d / "keys"))
    _veil("tee-policy", str(d / "export"), "--attester", str(d / "att"), "--allow-insecure",
          "--out", str(d / "policy.json"))
    procs = []
    krs, kr_addr, _ = _start(["tee-key-release", "--keys", str(d / "keys"), "--policy",
                              str(d / "policy.json")])
    procs.append(krs)
    enclave, addr, line = _start(["tee-serve", str(d / "export"), "--attester-key",
                                  str(d / "att"), "--key-release", f"{kr_addr[0]}:{kr_addr[1]}"])
    procs.append(enclave)
    assert "INSECURE" in line and addr is not None
    with torch.no_grad():
        want = model(torch.as_tensor(xte)).numpy()
    graph = to_graph(model, xte.shape[1:])
    plain = interpreter.run(graph, xte.astype(np.float64))
    relay = Relay(addr)
    yield {"dir": d, "addr": addr, "kr": kr_addr, "relay": relay, "x": xte.astype(np.float64),
           "want": want, "plain": plain, "graph": graph,
           "policy": Policy.load(d / "policy.json"),
           "export_line": out}
    for p in procs:
        p.kill()
        p.wait()


def _client(tee, **kw):
    tee["relay"].reset()
    return TEEClient(tee["relay"].address, kw.pop("policy", tee["policy"]), **kw)


def _status(tee):
    with TEEClient(tee["addr"], tee["policy"]) as c:
        return c.status()


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_round_trip_equals_plain_inference(tee, suite):
    with _client(tee, suite=suite) as client:
        ys = client.infer(tee["x"][:64])
        one = client.infer(tee["x"][64:65])
        assert client.evidence.insecure and client.evidence.claims["attester"] == "software"
    np.testing.assert_allclose(ys, tee["plain"][:64], rtol=0, atol=ATOL)
    np.testing.assert_allclose(one, tee["plain"][64:65], rtol=0, atol=ATOL)
    np.testing.assert_allclose(ys, tee["want"][:64], rtol=0, atol=1e-5)     # torch, float32
    assert "model key" in tee["export_line"]          # the enclave got its key released


@pytest.mark.parametrize("batch_size,depth", [(64, 2), (50, 3), (400, 1)])
def test_infer_batch_streams_sealed_batches_in_order(tee, batch_size, depth):
    xs = tee["x"]
    with _client(tee) as client:
        ys = client.infer_batch(xs, batch_size=batch_size, depth=depth)
        kinds = tee["relay"].kinds["up"]
        assert kinds.count(net.REQUEST) == -(-len(xs) // batch_size)
        np.testing.assert_allclose(ys, tee["plain"], rtol=0, atol=ATOL)
        with pytest.raises(InputError):
            client.infer_batch(xs, batch_size=0)


def test_infer_batch_failure_midstream_is_raised_and_the_client_recovers(tee):
    seen = []

    def third_result(direction, kind, frame):           # tamper with one answer only
        if kind == net.RESULT:
            seen.append(1)
            if len(seen) == 3:
                return frame[:-1] + bytes([frame[-1] ^ 1])
        return frame
    with _client(tee) as client:
        tee["relay"].hook = third_result
        with pytest.raises(DecryptionError):
            client.infer_batch(tee["x"], batch_size=32, depth=4)
        tee["relay"].hook = None
        np.testing.assert_allclose(client.infer_batch(tee["x"][:100], batch_size=32),
                                   tee["plain"][:100], rtol=0, atol=ATOL)


def _leaks(relay, arrays) -> list:
    seen = bytes(relay.seen["up"] + relay.seen["down"])
    return [i for i, row in enumerate(arrays) if row.tobytes()[:32] in seen]


def test_host_relay_never_sees_plaintext(tee, tmp_path):
    xs = tee["x"][:16]
    with _client(tee) as client:
        ys = client.infer(xs)
    relay = tee["relay"]
    assert relay.kinds["up"] == [net.EVIDENCE_REQUEST, net.OPEN, net.REQUEST]
    assert _leaks(relay, xs) == [] and _leaks(relay, ys) == []
    # the check can fail: the plaintext baseline (same model, unencrypted bundle) through
    # the same kind of relay shows every row
    plain_dir = tmp_path / "plain"
    bundle.export_model(bundle.load_model(tee["dir"] / "export", _model_key(tee)), plain_dir)
    base, addr, line = _start(["tee-serve", str(plain_dir), "--plaintext-baseline"])
    try:
        assert "INSECURE" in line
        leaky = Relay(addr)
        with PlaintextClient(leaky.address, 10.0) as pc:
            ys_plain = pc.infer(xs)
        np.testing.assert_allclose(ys_plain, ys, atol=1e-12)
        assert _leaks(leaky, xs) == list(range(16)) and _leaks(leaky, ys) == list(range(16))
    finally:
        base.kill()
        base.wait()


def _model_key(tee):
    key_id = bundle.read_manifest(tee["dir"] / "export")["key_id"]
    return bundle.model_key_path(tee["dir"] / "keys", key_id).read_bytes()


def _flip_last(kind_wanted):
    def hook(direction, kind, frame):
        if kind == kind_wanted:
            return frame[:-1] + bytes([frame[-1] ^ 1])
        return frame
    return hook


def test_tampered_request_is_refused_unopened(tee):
    before = _status(tee)
    with _client(tee) as client:
        tee["relay"].hook = _flip_last(net.REQUEST)
        with pytest.raises(DecryptionError) as err:
            client.infer(tee["x"][:2])
        after = _status(tee)
        assert after["opened"] == before["opened"] and after["refused"] == before["refused"] + 1
        tee["relay"].hook = None
        np.testing.assert_allclose(client.infer(tee["x"][:2]), tee["plain"][:2], atol=ATOL)
    assert str(err.value) == "the sealed message could not be opened"


def test_tampered_response_is_one_opaque_error(tee):
    with _client(tee) as client:
        tee["relay"].hook = _flip_last(net.RESULT)
        with pytest.raises(DecryptionError) as err:
            client.infer(tee["x"][:2])
    assert str(err.value) == "the sealed message could not be opened"


def test_replayed_request_is_refused_unopened(tee):
    captured = []

    def keep(direction, kind, frame):
        if kind == net.REQUEST:
            captured.append(frame[2:])
        return frame
    with _client(tee) as client:
        tee["relay"].hook = keep
        client.infer(tee["x"][:1])
    before = _status(tee)
    sock = socket.create_connection(tee["addr"])
    try:
        with pytest.raises(ReplayError):
            net.call(sock, net.REQUEST, captured[0], net.RESULT)
    finally:
        sock.close()
    assert _status(tee)["opened"] == before["opened"]


def test_evidence_for_another_nonce_is_refused_and_nothing_sent(tee):
    old = []

    def swap(direction, kind, frame):
        if kind == net.EVIDENCE:
            if not old:
                old.append(frame)
            return old[0]
        return frame
    with _client(tee) as first:
        tee["relay"].hook = swap
        first.attest()
        second = TEEClient(tee["relay"].address, tee["policy"])
        with pytest.raises(AttestationError, match="nonce"):
            second.infer(tee["x"][:1])
        second.close()
    assert net.REQUEST not in tee["relay"].kinds["up"]


@pytest.mark.parametrize("case", ["measurement", "expired", "insecure"])
def test_policy_refusals_send_nothing(tee, case):
    policy, clock = tee["policy"], time.time
    if case == "measurement":
        policy = Policy(frozenset({"00" * 32}), policy.attesters, allow_insecure=True)
    elif case == "insecure":
        policy = Policy(policy.measurements, policy.attesters)
    else:
        clock = lambda: time.time() + 3600     # noqa: E731
    want = {"measurement": PolicyError, "insecure": PolicyError,
            "expired": EvidenceExpiredError}[case]
    with _client(tee, policy=policy, clock=clock) as client:
        with pytest.raises(want):
            client.infer(tee["x"][:1])
    assert tee["relay"].kinds["up"] == [net.EVIDENCE_REQUEST]


def test_unknown_channel_and_bad_inputs_are_refused_and_the_enclave_keeps_serving(tee):
    with _client(tee) as client:
        client.attest()
        with pytest.raises(InputError):
            client.infer(np.zeros((1, 64)))                      # checked before sending
        with pytest.raises(InputError):
            client.infer(np.full((1, 1, 8, 8), np.nan))
        assert net.REQUEST not in tee["relay"].kinds["up"]
        with pytest.raises(InputError, match="shape"):
            client._sealed(np.zeros((2, 3)))                     # the enclave's own check
        client._channel = bytes(16)
        with pytest.raises(SessionError):
            client._sealed(tee["x"][:1])
        # infer() re-attests once after a lost channel
        np.testing.assert_allclose(client.infer(tee["x"][:3]), tee["plain"][:3], atol=ATOL)
    sock = socket.create_connection(tee["addr"])
    try:
        sock.sendall(_LEN.pack(net.MAX_MESSAGE + 1))             # oversized: cut off
        with pytest.raises(TransportError):
            net.recv(sock)
    finally:
        sock.close()
    with TEEClient(tee["addr"], tee["policy"]) as c:
        np.testing.assert_allclose(c.infer(tee["x"][:1]), tee["plain"][:1], atol=ATOL)


def test_key_release_refuses_an_enclave_with_another_measurement(tee, tmp_path):
    import shutil

    other = tmp_path / "export"
    shutil.copytree(tee["dir"] / "export", other)
    manifest = other / bundle.MANIFEST
    manifest.write_text(manifest.read_text() + "\n")            # a different measurement
    proc, addr, _ = _start(["tee-serve", str(other), "--attester-key", str(tee["dir"] / "att"),
                            "--key-release", "%s:%d" % tee["kr"]])
    err = proc.stderr.read()
    assert addr is None and proc.returncode != 0
    assert "not released" in err and "measurement" in err


def test_bench_aes_floor_answers_like_the_model(tee):
    """``bench/tee_floor.py``, the benchmark's AES-only floor, serves the model's answers
    (encrypted on the wire), one batch at a time and streamed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "tee_floor.py"
    spec = importlib.util.spec_from_file_location("tee_floor", path)
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    srv = floor.FloorServer(tee["graph"], ("127.0.0.1", 0), 10.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    relay = Relay(srv.address)
    with floor.FloorClient(relay.address, 10.0) as client:
        ys = client.infer(tee["x"][:64])
        np.testing.assert_allclose(ys, tee["plain"][:64], rtol=0, atol=ATOL)
        ys = client.infer_batch(tee["x"], depth=2)
        np.testing.assert_allclose(ys, tee["plain"], rtol=0, atol=ATOL)
    assert relay.kinds["up"].count(net.PLAIN_REQUEST) == 1 + -(-len(tee["x"]) // 64)
    assert tee["x"][0].tobytes() not in relay.seen["up"]        # it did encrypt
    srv.server.close()

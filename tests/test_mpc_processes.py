"""MPC through real processes on loopback: two parties, a separate dealer, a client."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from veil.backends.mpc.service import MpcClient, MpcError, save_model


def _start(args, lines=1):
    proc = subprocess.Popen([sys.executable, "-m", "veil", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = []
    for _ in range(lines):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"{args[0]} did not start")
        host, port = line.split()[-1].rsplit(":", 1)
        out.append((host, int(port)))
    return proc, out


class Cluster:
    def __init__(self, tmp, model_dir, timeout="8", proxy=None, cmp="circuit", extra=()):
        self.keys, self.model, self.timeout = str(tmp / "keys"), str(model_dir), timeout
        self.cmp, self.extra = cmp, list(extra)
        subprocess.run([sys.executable, "-m", "veil", "mpc-setup", self.keys], check=True,
                       stdout=subprocess.DEVNULL)
        self.procs = {}
        self.start_dealer()
        self.start_party1()
        peer = self.peer if proxy is None else proxy(self.peer)
        self.procs["party0"], (self.p0,) = _start(
            ["mpc-node", "--party", "0", "--keys", self.keys, "--model", self.model,
             "--dealer", self._fmt(self.dealer), "--peer", self._fmt(peer),
             "--timeout", self.timeout, "--cmp", cmp, *self.extra])

    @staticmethod
    def _fmt(addr):
        return f"{addr[0]}:{addr[1]}"

    def start_dealer(self, port=0):
        self.procs["dealer"], (self.dealer,) = _start(
            ["mpc-dealer", "--keys", self.keys, "--listen", f"127.0.0.1:{port}",
             "--timeout", self.timeout])

    def start_party1(self, listen=0, peer=0):
        self.procs["party1"], (self.p1, self.peer) = _start(
            ["mpc-node", "--party", "1", "--keys", self.keys, "--model", self.model,
             "--dealer", self._fmt(self.dealer), "--listen", f"127.0.0.1:{listen}",
             "--peer-listen", f"127.0.0.1:{peer}", "--timeout", self.timeout,
             "--cmp", self.cmp, *self.extra], lines=2)

    def client(self, shape):
        return MpcClient(self.keys, self.p0, self.p1, shape, timeout=10.0)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    import torch
    from models import trained_digits_mlp

    from veil.frontend import to_graph

    model, (_, xte, _, _) = trained_digits_mlp()
    d = tmp_path_factory.mktemp("mpc")
    save_model(to_graph(model, xte.shape[1:]), d / "model")
    with torch.no_grad():
        want = model(torch.as_tensor(xte)).numpy()
    cluster = Cluster(d, d / "model")
    yield cluster, xte, want
    cluster.stop()


def test_processes_match_plain_inference(mlp):
    cluster, xte, want = mlp
    client = cluster.client(xte.shape[1:])
    # a batch of 64 through the processes (all 360 test images run through the same
    # protocol code in one process in test_mpc_core)
    res = client.infer(xte[:64])
    assert np.array_equal(res.outputs.argmax(1), want[:64].argmax(1))
    assert np.abs(res.outputs - want[:64]).max() <= 1e-3
    one = client.infer(xte[:1])
    np.testing.assert_allclose(one.outputs, want[:1], atol=1e-3)
    stats = {s["party"]: s for s in one.stats}
    assert stats[0]["online_rounds"] == stats[1]["online_rounds"] == 5     # circuits
    assert stats[0]["prefetched"] and stats[1]["prefetched"]        # offline ran ahead
    links = list(client._links)
    client.infer(xte[1:2])
    assert client._links == links                   # one authenticated link per party
    assert all(s["prefetched"] for s in res.stats)               # 64: a pooled batch size
    odd = client.infer(xte[:5])
    np.testing.assert_allclose(odd.outputs, want[:5], atol=1e-3)
    assert not any(s["prefetched"] for s in odd.stats)          # 5 waits for its own
    assert stats[0]["offline_bytes"] > 0 and stats[0]["online_bytes_sent"] > 0


def test_processes_with_fss_comparisons(tmp_path, mlp):
    """--cmp fss on both parties: the same answers in two rounds."""
    cluster_c, xte, want = mlp
    cluster = Cluster(tmp_path, cluster_c.model, cmp="fss")
    try:
        with cluster.client(xte.shape[1:]) as client:
            res = _retry(lambda: client.infer(xte[:8]))
            np.testing.assert_allclose(res.outputs, want[:8], atol=1e-3)
            assert {s["online_rounds"] for s in res.stats} == {2}
    finally:
        cluster.stop()


def test_bad_client_input_is_refused_and_the_parties_keep_serving(mlp):
    cluster, xte, want = mlp
    with pytest.raises(MpcError):
        MpcClient(cluster.keys, cluster.p0, cluster.p1, (3,)).infer(np.zeros((1, 3)))
    res = cluster.client(xte.shape[1:]).infer(xte[:4])
    np.testing.assert_allclose(res.outputs, want[:4], atol=1e-3)


def test_a_dead_party_fails_the_request_and_a_restart_recovers(mlp):
    cluster, xte, want = mlp
    client = cluster.client(xte.shape[1:])
    cluster.procs["party1"].kill()
    cluster.procs["party1"].wait()
    start = time.monotonic()
    with pytest.raises(MpcError):
        client.infer(xte[:2])
    assert time.monotonic() - start < 30                   # fails within the timeouts
    cluster.start_party1(listen=cluster.p1[1], peer=cluster.peer[1])
    res = _retry(lambda: client.infer(xte[:2]))
    np.testing.assert_allclose(res.outputs, want[:2], atol=1e-3)


def test_a_stalled_or_dead_dealer_fails_the_request_without_a_hang(mlp):
    cluster, xte, want = mlp
    client = cluster.client(xte.shape[1:])
    dealer = cluster.procs["dealer"]
    os.kill(dealer.pid, signal.SIGSTOP)                    # stalls: no answer at all
    try:
        start = time.monotonic()
        with pytest.raises(MpcError):
            client.infer(xte[:2])
        assert time.monotonic() - start < 30
    finally:
        os.kill(dealer.pid, signal.SIGCONT)
    dealer.kill()
    dealer.wait()
    cluster.start_dealer(port=cluster.dealer[1])
    res = _retry(lambda: client.infer(xte[:2]))
    np.testing.assert_allclose(res.outputs, want[:2], atol=1e-3)


def _retry(fn, attempts=20):
    for i in range(attempts):
        try:
            return fn()
        except MpcError:
            if i == attempts - 1:
                raise
            time.sleep(0.5)


class FlipProxy:
    """Forwards party0 -> party1 traffic; when armed, flips one bit of the next chunk."""

    def __init__(self):
        self.armed = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)

    def __call__(self, target):
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()
        return self.server.getsockname()

    def _accept(self):
        while True:
            a, _ = self.server.accept()
            b = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, src, dst, forward):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if forward and self.armed.is_set():
                    self.armed.clear()
                    data = bytes([data[0]]) + bytes([data[1] ^ 0x40]) + data[2:] \
                        if len(data) > 8 else data[:-1] + bytes([data[-1] ^ 0x40])
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()


def test_a_corrupted_message_between_parties_fails_cleanly(tmp_path):
    from models import trained_digits_mlp

    from veil.frontend import to_graph

    model, (_, xte, _, _) = trained_digits_mlp()
    save_model(to_graph(model, xte.shape[1:]), tmp_path / "model")
    proxy = FlipProxy()
    cluster = Cluster(tmp_path, tmp_path / "model", proxy=proxy)
    try:
        client = cluster.client(xte.shape[1:])
        good = _retry(lambda: client.infer(xte[:2])).outputs
        proxy.armed.set()                       # the next party0 -> party1 bytes
        with pytest.raises(MpcError):
            client.infer(xte[:2])
        again = _retry(lambda: client.infer(xte[:2])).outputs
        np.testing.assert_allclose(again, good, atol=1e-3)
    finally:
        cluster.stop()


def test_requests_the_other_party_never_claims_are_dropped(tmp_path):
    """A client whose other share never arrived (say its HTTP post to party 0 failed)
    must not leave its request in party 1 for long: unconfirmed shares age out after
    ``orphan_s`` idle seconds; one party 0 confirmed stays."""
    import torch

    from veil.backends.mpc import transport
    from veil.backends.mpc.service import _Request, Party
    from veil.frontend import to_graph

    transport.setup(tmp_path)
    model = to_graph(torch.nn.Sequential(torch.nn.Linear(3, 2)).eval(), (3,))
    party = Party(1, transport.Identity.load(tmp_path, "party1"), model,
                  ("127.0.0.1", 0), ("127.0.0.1", 9), peer_listen=("127.0.0.1", 0),
                  timeout=5.0, orphan_s=1.0)
    try:
        share = np.zeros((1, 3), np.uint64)
        party._requests[b"old"] = _Request(None, share, time.monotonic(), tag=b"t")
        party._requests[b"new"] = _Request(None, share, time.monotonic(), tag=b"t")
        party._requests[b"kept"] = _Request(None, share, time.monotonic(), tag=b"t",
                                            confirmed=True)
        party._requests[b"old"].idle_age = 0.9
        party._per_client[b"t"] = 3
        party._order += [b"old", b"new", b"kept"]
        with party._cond:
            stale = party._drop_stale(0.5)
        assert [rid for rid, _ in stale] == [b"old"]
        assert list(party._requests) == [b"new", b"kept"]
        assert party._order == [b"new", b"kept"] and party._per_client[b"t"] == 2
    finally:
        party.clients.close()
        party.peer_server.close()


def test_resnet20_through_three_processes_streams_layers_and_matches_plain(tmp_path):
    """A CIFAR ResNet-20 (random weights, random BN statistics) through the dealer and
    both parties on loopback: material streamed layer by layer (never a whole set),
    logits within 1e-2 of the logit range of plain, same argmax where the margin
    exceeds twice the error."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.mpc_zoo import resnet20, with_running_stats
    from veil.backends.mpc.evaluator import material_plan
    from veil.backends.mpc.service import load_model
    from veil.frontend import to_graph

    torch.manual_seed(1)
    model = with_running_stats(resnet20(), (3, 32, 32))
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    save_model(to_graph(model, (3, 32, 32)), tmp_path / "model")
    layers = len(material_plan(load_model(tmp_path / "model")))
    cluster = Cluster(tmp_path, tmp_path / "model", timeout="60")
    try:
        with MpcClient(cluster.keys, cluster.p0, cluster.p1, (3, 32, 32), timeout=120) as c:
            res = _retry(lambda: c.infer(x))
    finally:
        cluster.stop()
    err = np.abs(res.outputs - want).max()
    assert err <= 1e-2 * (want.max() - want.min())
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * err
    assert np.array_equal(res.outputs.argmax(1)[clear], want.argmax(1)[clear])
    for s in res.stats:
        assert not s["prefetched"] and s["layers_streamed"] == layers
        assert 0 < s["peak_layer_bytes"] < s["offline_bytes"] / 4
        assert s["max_rss_bytes"] < s["estimated_bytes"] * 2


def _small_convnet(model_dir, seed, first, second):
    """conv -> ``first`` -> 2x2 max pool -> ``second`` -> linear on 1x8x8, saved to
    ``model_dir``: three inputs and torch's outputs for them."""
    import torch

    from veil.frontend import to_graph

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), first, torch.nn.MaxPool2d(2),
                              second, torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5)).eval()
    x = np.random.default_rng(seed).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    save_model(to_graph(net, (1, 8, 8)), model_dir)
    return x, want


def test_layers_over_stream_above_run_chunk_by_chunk_and_match_plain(tmp_path):
    """With ``--stream-above 0`` every layer's material streams chunk by chunk while the
    layer runs (the path that lets a 224x224 model's big layers fit the budget): a
    small convnet with a fused ReLU, an unfused one and a piecewise sigmoid still
    matches plain, and the runs report their chunks as streamed material."""
    import torch

    x, want = _small_convnet(tmp_path / "model", 3, torch.nn.ReLU(), torch.nn.Sigmoid())
    cluster = Cluster(tmp_path, tmp_path / "model", timeout="30",
                      extra=["--stream-above", "0", "--prefetch", "0", "--prefetch-batch", "0"])
    try:
        with MpcClient(cluster.keys, cluster.p0, cluster.p1, (1, 8, 8), timeout=60) as c:
            res = _retry(lambda: c.infer(x))
    finally:
        cluster.stop()
    np.testing.assert_allclose(res.outputs, want, atol=2e-3)
    for s in res.stats:
        assert not s["prefetched"] and s["offline_bytes"] > 0


def test_row_scaled_layers_stream_their_matrix_triple_as_one_piece(tmp_path):
    """Softmax and layer norm scale each row by one shared value with a matrix triple
    (``nonlinear._scale_rows``): under ``--stream-above 0`` their layers stream chunk by
    chunk and the triple comes as one piece when the run reaches it; the outputs match
    plain."""
    import torch

    from veil.frontend import to_graph

    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Softmax(dim=-1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 5)).eval()
    x = np.random.default_rng(7).normal(size=(2, 1, 8, 8)).astype(np.float32) * 3
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    save_model(to_graph(net, (1, 8, 8)), tmp_path / "model")
    cluster = Cluster(tmp_path, tmp_path / "model", timeout="30",
                      extra=["--stream-above", "0", "--prefetch", "0", "--prefetch-batch", "0"])
    try:
        with MpcClient(cluster.keys, cluster.p0, cluster.p1, (1, 8, 8), timeout=60) as c:
            res = _retry(lambda: c.infer(x))
    finally:
        cluster.stop()
    np.testing.assert_allclose(res.outputs, want, atol=1e-3)
    for s in res.stats:
        assert not s["prefetched"] and s["offline_bytes"] > 0


def test_a_spooled_set_is_computed_ahead_read_back_from_disk_and_leaves_nothing(tmp_path):
    """With ``--spool`` a set too large for the memory pool (here: forced by asking for
    more sets than the pool holds) is fetched from the dealer while the parties are
    idle and written to an unlinked file: the request then uses it (prefetched, every
    layer read back from disk, the chunked ones a chunk at a time), matches plain, and
    the spool directories stay empty by name while the processes run and after."""
    import torch

    x, want = _small_convnet(tmp_path / "model", 5, torch.nn.SiLU(), torch.nn.ReLU6())
    spool = tmp_path / "spool"
    cluster = Cluster(tmp_path, tmp_path / "model", timeout="30",
                      extra=["--prefetch", "10000000", "--spool", str(spool),
                             "--spool-sets", "2", "--stream-above", "0"])
    try:
        with MpcClient(cluster.keys, cluster.p0, cluster.p1, (1, 8, 8), timeout=60) as c:
            runs = []
            for i in range(3):
                deadline = time.monotonic() + 30
                while True:         # the first sets are written while the cluster is idle
                    res = _retry(lambda: c.infer(x[i:i + 1]))
                    if all(s["prefetched"] for s in res.stats) or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                runs.append(res)
            assert sorted(os.listdir(spool)) == ["party0", "party1"] or \
                sorted(os.listdir(spool)) == []
            for party in os.listdir(spool):
                assert os.listdir(spool / party) == []
    finally:
        cluster.stop()
    out = np.concatenate([r.outputs for r in runs])
    np.testing.assert_allclose(out, want, atol=3e-3)
    for r in runs:
        for s in r.stats:
            assert s["prefetched"] and s["offline_bytes"] > 0 and s["layers_streamed"] == 0


def test_a_spool_without_room_is_refused_at_start(tmp_path):
    """A spool that cannot hold the sets is a typed error before anything runs."""
    from veil.backends.mpc.party import Party
    from veil.backends.mpc import transport as tp
    from veil.errors import ResourceError
    from veil.frontend import to_graph
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    subprocess.run([sys.executable, "-m", "veil", "mpc-setup", str(tmp_path / "keys")],
                   check=True, stdout=subprocess.DEVNULL)
    ident = tp.Identity.load(tmp_path / "keys", "party1")
    with pytest.raises(ResourceError, match="spool"):
        Party(1, ident, to_graph(net, (4,)), ("127.0.0.1", 0), ("127.0.0.1", 9),
              peer_listen=("127.0.0.1", 0), prefetch=10 ** 12, spool=str(tmp_path / "s"),
              spool_sets=10 ** 12)
    assert not (tmp_path / "s").exists()


def test_a_model_with_hundreds_of_layers_opens_a_session(tmp_path):
    """The parties' hello carries a digest of the material plan, not the plan: with 200
    layers (EfficientNet-B0 has 179) the plan's JSON is over the 4 kB a party reads
    before checking anything, and the session must still open."""
    import torch

    from veil.frontend import to_graph

    torch.manual_seed(4)
    layers = []
    for _ in range(200):
        layers += [torch.nn.Linear(4, 4), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers).eval()
    x = np.random.default_rng(4).normal(size=(1, 4)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    save_model(to_graph(net, (4,)), tmp_path / "model")
    cluster = Cluster(tmp_path, tmp_path / "model", timeout="30")
    try:
        with MpcClient(cluster.keys, cluster.p0, cluster.p1, (4,), timeout=60) as c:
            res = _retry(lambda: c.infer(x))
    finally:
        cluster.stop()
    np.testing.assert_allclose(res.outputs, want, atol=1e-3)


def test_a_model_over_the_party_memory_budget_is_refused_at_start(tmp_path):
    import torch

    from veil.backends.mpc import transport
    from veil.backends.mpc.service import Party
    from veil.errors import ModelTooLargeError
    from veil.frontend import to_graph

    transport.setup(tmp_path)
    model = to_graph(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval(),
                     (3, 64, 64))
    with pytest.raises(ModelTooLargeError, match="convnet needs an estimated .* budget of "
                                                 "64 MiB"):
        Party(1, transport.Identity.load(tmp_path, "party1"), model, ("127.0.0.1", 0),
              ("127.0.0.1", 9), peer_listen=("127.0.0.1", 0), memory_budget=64 << 20,
              name="convnet")
    save_model(model, tmp_path / "model")          # the CLI says so and exits 1
    out = subprocess.run([sys.executable, "-m", "veil", "mpc-node", "--party", "1", "--keys",
                          str(tmp_path), "--model", str(tmp_path / "model"), "--dealer",
                          "127.0.0.1:9", "--memory-budget", "64"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "over the memory budget of 64 MiB" in out.stderr


def _dealer(tmp_path, ttl):
    from veil.backends.mpc import transport as tp
    from veil.backends.mpc.dealer import Dealer

    subprocess.run([sys.executable, "-m", "veil", "mpc-setup", str(tmp_path / "keys")],
                   check=True, stdout=subprocess.DEVNULL)
    return Dealer(tp.Identity.load(tmp_path / "keys", "dealer"), ("127.0.0.1", 0), ttl=ttl)


def _ask(seq, chunk=0):
    return {"session": "s/pool1", "seq": seq, "batch": 1, "layer": 0, "step": 0,
            "chunk": chunk, "steps": [[["relu", 4096]]]}


def test_a_half_that_expired_is_refused_never_generated_again(tmp_path):
    """Party 0 took its half; party 1's half expired unfetched. Asking for it later is a
    typed error: a fresh pair would give party 1 material that does not match what
    party 0 already holds (a wrong answer, silently)."""
    from veil.errors import InputError

    dealer = _dealer(tmp_path, ttl=0.2)
    try:
        dealer._material("party0", _ask(1))
        time.sleep(0.3)
        dealer._material("party0", _ask(2))      # a later request sweeps the old half
        with pytest.raises(InputError, match="expired"):
            dealer._material("party1", _ask(1))
        dealer._material("party1", _ask(2))      # the live pair is still served
    finally:
        dealer.server.close()


def test_a_party_running_ahead_waits_for_the_other_to_fetch(tmp_path, monkeypatch):
    """Over PENDING_LIMIT bytes left for the other party in one session, the next new
    request there waits until the other party fetches (and fails after ttl if it
    never does); other sessions are not held up."""
    from veil.backends.mpc import dealer as dealer_mod
    from veil.errors import InputError

    monkeypatch.setattr(dealer_mod, "PENDING_LIMIT", 1)
    dealer = _dealer(tmp_path, ttl=1.0)
    try:
        dealer._material("party0", _ask(1, 0))
        other = dict(_ask(1, 0), session="s/stream")
        dealer._material("party0", other)                   # another session: no wait
        t = time.monotonic()
        fetch = threading.Timer(0.3, dealer._material, ("party1", _ask(1, 0)))
        fetch.start()
        dealer._material("party0", _ask(1, 1))              # waits for that fetch
        assert time.monotonic() - t >= 0.25
        fetch.join()
        t = time.monotonic()
        with pytest.raises(InputError, match="has not fetched"):
            dealer._material("party0", _ask(1, 2))          # party 1 never comes
        assert time.monotonic() - t >= 0.9
    finally:
        dealer.server.close()

"""OpenFHE payload validation: honest payloads pass, tampered ones never reach OpenFHE.

The byte-flip sweep runs in-process through the validator only; whatever it accepts is
then decoded and evaluated in a child process, so a native crash fails the test instead
of killing pytest.
"""
import json
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import veil
from veil import ModelClient, ModelServer
from veil.backends.he.openfhe_engine import ClientCrypto, WeightEncryptor, payload_validator
from veil.compiler.plan import CKKSParams, select_params
from veil.errors import KeyMismatchError, SerializationError

ROOT = Path(__file__).resolve().parents[1]
TOY = CKKSParams(1 << 12, 2, 40, 60, 3, "HEStd_NotSet", True)
ROTS = [1, -2]
SWEEP = 2048


@pytest.fixture(scope="module")
def toy():
    client = ClientCrypto(TOY)
    parts = client.keygen(ROTS)
    ct = client.encrypt(np.linspace(-1, 1, TOY.slots))
    yield client, parts, ct, payload_validator(TOY, ROTS)
    client.close()


def _flip(blob: bytes, pos: int, mask: int = 0xFF) -> bytes:
    out = bytearray(blob)
    out[pos] ^= mask
    return bytes(out)


def _structure_mask(checker) -> np.ndarray:
    """True where a byte is structure (neither a coefficient word nor a tag)."""
    mask = np.ones(checker.length, dtype=bool)
    for off in checker.hole_offsets.tolist():
        mask[off:off + 8 * checker.ring_dim] = False
    for off in checker.tag_offsets:
        mask[off:off + checker.tag_length] = False
    return mask


@pytest.mark.parametrize("params", [TOY, select_params(1, 256)[0]],
                         ids=["toy-insecure", "128-bit"])
def test_honest_payloads_of_every_client_path_pass(params):
    """keygen'd, reloaded and model-owner ciphertexts and the evaluation keys pass; the
    holes the checker found are exactly where two honest payloads differ."""
    rots = [1, 3]
    validator = payload_validator(params, rots)
    a, b = ClientCrypto(params), ClientCrypto(params)
    pa, pb = a.keygen(rots), b.keygen(rots)
    zeros = np.zeros(params.slots)
    validator.check_eval_keys(pa, a.tag)
    validator.check_eval_keys(pb, b.tag)
    reloaded = ClientCrypto(params)
    reloaded.load_keys(a.secret_key_bytes(), a.public_key_bytes())
    for ct in (a.encrypt(zeros), reloaded.encrypt(np.ones(params.slots)),
               WeightEncryptor(params, a.public_key_bytes()).encrypt(zeros)):
        validator.check_ciphertext(ct, a.tag)
    assert len(validator.ciphertexts[0].hole_offsets) == 2 * (params.mult_depth + 1)
    # Two clients' payloads differ only inside the holes and the tags.
    for checker, x, y in ((validator.ciphertexts[0], a.encrypt(zeros), b.encrypt(zeros)),
                          (validator.mult, pa["mult"], pb["mult"]),
                          (validator.rotations, pa["rotations"], pb["rotations"])):
        diff = np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8)
        assert len(x) == len(y) == checker.length
        assert not (diff & _structure_mask(checker)).any()
        assert diff.mean() > 0.5          # the holes are mostly random data


def test_foreign_tags_are_refused(toy):
    client, parts, ct, validator = toy
    other = ClientCrypto(TOY)
    other_parts = other.keygen(ROTS)
    with pytest.raises(KeyMismatchError):
        validator.check_ciphertext(other.encrypt(np.zeros(TOY.slots)), client.tag)
    with pytest.raises(KeyMismatchError):
        validator.check_eval_keys(other_parts, client.tag)
    with pytest.raises(KeyMismatchError):   # a tag of another length is no OpenFHE tag
        validator.check_ciphertext(ct, client.tag + "0")


def _sweep(checker, blob: bytes, tag: str, check) -> list[int]:
    """Flip each of the first SWEEP bytes; assert the verdict; return accepted offsets."""
    structure = _structure_mask(checker)
    hole_of = {}
    for off, mod in zip(checker.hole_offsets.tolist(), checker.hole_moduli.tolist()):
        for p in range(off, min(off + 8 * checker.ring_dim, SWEEP)):
            hole_of[p] = (off, mod)
    accepted, refused_structure = [], 0
    for pos in range(SWEEP):
        mutant = _flip(blob, pos)
        try:
            check(mutant, tag)
        except (SerializationError, KeyMismatchError):
            if pos in hole_of:
                off, mod = hole_of[pos]
                word_at = off + (pos - off) // 8 * 8
                assert struct.unpack_from("<Q", mutant, word_at)[0] >= mod, pos
            else:
                refused_structure += 1
            continue
        assert not structure[pos], f"a flip of structure byte {pos} was accepted"
        off, mod = hole_of[pos]
        word_at = off + (pos - off) // 8 * 8
        assert struct.unpack_from("<Q", mutant, word_at)[0] < mod
        accepted.append(pos)
    assert refused_structure == int(structure[:SWEEP].sum()) + sum(
        1 for o in checker.tag_offsets for p in range(o, o + checker.tag_length) if p < SWEEP)
    return accepted


CHILD = r"""
import json, sys
import numpy as np
from veil.backends.he.openfhe_engine import EvaluationSession, payload_validator
from veil.compiler.plan import CKKSParams
from veil.errors import VeilError
d = sys.argv[1]
job = json.load(open(d + "/job.json"))
params = CKKSParams(**job["params"])
parts = {k: open(f"{d}/{k}.bin", "rb").read() for k in ("mult", "rotations", "ct")}
def flipped(blob, pos):
    out = bytearray(blob); out[pos] ^= 0xFF; return bytes(out)
done = errors = 0
with EvaluationSession(params, job["tag"], {"mult": parts["mult"],
                       "rotations": parts["rotations"]}, job["rots"]) as s:
    for pos in job["ct"]:
        try:
            ct = s.load(flipped(parts["ct"], pos))
            s.dump(s.square(s.rotate(s.add(ct, ct), 1)))
            done += 1
        except VeilError:
            errors += 1
plain = payload_validator(params, [])
good = None
for pos in job["mult"]:
    try:
        with EvaluationSession(params, job["tag"], {"mult": flipped(parts["mult"], pos),
                               "rotations": b""}, [], validator=plain) as s:
            ct = s.load(parts["ct"])
            s.dump(s.square(ct))
            done += 1
    except VeilError:
        errors += 1
print(json.dumps({"evaluated": done, "veil_errors": errors}))
"""


def test_byte_flip_sweep_refuses_structure_and_accepted_mutants_are_harmless(toy, tmp_path):
    """Every flip of a structural byte in the first 2 KB of a ciphertext and of the
    relinearization key is refused; a flip in a coefficient is refused exactly when the
    word reaches its modulus. All accepted mutants are then decoded and evaluated by
    OpenFHE in a child process: none may crash it."""
    client, parts, ct, validator = toy
    ct_ok = _sweep(validator.ciphertexts[0], ct, client.tag, validator.check_ciphertext)
    mult_ok = _sweep(validator.mult, parts["mult"], client.tag,
                     lambda b, t: validator.mult.check(b, t))
    # The rotation key map's structure (its first 2 KB hold the map and the first key's
    # header): every structural flip is refused.
    rotations = validator.rotations
    structure = _structure_mask(rotations)
    for pos in np.nonzero(structure[:SWEEP])[0].tolist():
        with pytest.raises((SerializationError, KeyMismatchError)):
            validator.check_eval_keys({"mult": parts["mult"],
                                       "rotations": _flip(parts["rotations"], pos)},
                                      client.tag)
    assert 300 < len(ct_ok) < SWEEP and 300 < len(mult_ok) < SWEEP
    for name, blob in (("mult", parts["mult"]), ("rotations", parts["rotations"]),
                       ("ct", ct)):
        (tmp_path / f"{name}.bin").write_bytes(blob)
    (tmp_path / "job.json").write_text(json.dumps({
        "params": TOY.to_dict(), "tag": client.tag, "rots": ROTS,
        "ct": ct_ok, "mult": mult_ok}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["evaluated"] + report["veil_errors"] == len(ct_ok) + len(mult_ok)
    assert report["evaluated"] == len(ct_ok) + len(mult_ok)


@pytest.mark.parametrize("value", [1 << 31, 1 << 40, (1 << 64) - 1])
def test_huge_length_fields_are_refused_at_once_without_allocating(toy, value):
    client, parts, ct, validator = toy
    for blob, checker, check in (
            (ct, validator.ciphertexts[0], validator.check_ciphertext),
            (parts["mult"], validator.mult, lambda b, t: validator.check_eval_keys(
                {"mult": b, "rotations": parts["rotations"]}, t))):
        count_at = int(checker.hole_offsets[0]) - 8
        assert struct.unpack_from("<Q", blob, count_at)[0] == TOY.ring_dim
        mutant = bytearray(blob)
        struct.pack_into("<Q", mutant, count_at, value)
        mutant = bytes(mutant)
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(SerializationError):
            check(mutant, client.tag)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.05, elapsed         # microseconds when idle; generous bound
        assert peak < 1 << 20, peak


WIRED = r"""
import json, sys
from veil import ModelClient, ModelServer
from veil.deploy.keys import EvaluationKeys
from veil.errors import VeilError
from veil.wire import pack, unpack
server_dir, client_dir = sys.argv[1:3]
client, server = ModelClient(client_dir), ModelServer(server_dir)
keys = client.keygen()
blob = client.encrypt([0.1, 0.2, 0.3, 0.4])
header, parts = unpack(blob, "veil-ciphertext")
out = {}
for pos in (114, 262, 700):
    ct = bytearray(parts["ct"]); ct[pos] ^= 0xFF
    evil = pack("veil-ciphertext", {"ct": bytes(ct)}, header)
    with server.open_session(keys) as s:
        try:
            s.run(evil); out[f"ct{pos}"] = "accepted"
        except VeilError as exc:
            out[f"ct{pos}"] = type(exc).__name__
for pos in (177, 332):
    mult = bytearray(keys.parts["mult"]); mult[pos] ^= 0xFF
    try:
        server.open_session(EvaluationKeys(keys.model_id, keys.tag, {
            "mult": bytes(mult), "rotations": keys.parts["rotations"]}, True)).close()
        out[f"keys{pos}"] = "accepted"
    except VeilError as exc:
        out[f"keys{pos}"] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    calib = np.random.default_rng(0).uniform(-1, 1, (64, 4))
    compiled = veil.compile(model, calib, insecure_test_params=True)
    server_dir, client_dir = compiled.export(tmp_path_factory.mktemp("tiny"))
    return compiled, server_dir, client_dir


def test_model_server_validates_before_openfhe(tiny):
    """The bytes of the security review (ciphertext bytes 114 and 262, key bytes 177
    and 332) killed the process inside OpenFHE; through ModelServer they are refused.
    Run in a child: without the validator it dies, and must fail this test, not pytest."""
    _, server_dir, client_dir = tiny
    proc = subprocess.run([sys.executable, "-c", WIRED, str(server_dir), str(client_dir)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "ct114": "SerializationError", "ct262": "SerializationError",
        "ct700": "SerializationError", "keys177": "SerializationError",
        "keys332": "SerializationError"}


def _retag(blob: bytes, old: str, new: str) -> bytes:
    assert blob.count(old.encode()) >= 1
    return blob.replace(old.encode(), new.encode())


def test_namespaces_keep_same_client_tag_apart(tiny):
    """Two clients whose keys carry the same OpenFHE tag (one copied the other's) load
    in two namespaces at once; each evaluates correctly under its own keys. Without
    namespaces the second is refused, as before."""
    compiled, server_dir, client_dir = tiny
    server = ModelServer(server_dir)
    alice, mallory = ModelClient(client_dir), ModelClient(client_dir)
    keys_a, keys_m = alice.keygen(), mallory.keygen()
    tag_a, tag_m = keys_a.tag, keys_m.tag
    forged = veil.EvaluationKeys(keys_m.model_id, tag_a, {
        k: _retag(v, tag_m, tag_a) for k, v in keys_m.parts.items()}, True)
    x = np.array([0.3, -0.2, 0.5, 0.1])
    with server.open_session(keys_a) as plain:
        with pytest.raises(KeyMismatchError, match="already loaded"):
            server.open_session(forged)
        assert plain.native_tag == tag_a
    sa = server.open_session(keys_a, namespace="alice")
    sm = server.open_session(forged, namespace="mallory")
    assert len({sa.native_tag, sm.native_tag, tag_a}) == 3
    assert sa.native_tag == ModelServer.native_tag(tag_a, "alice")
    assert len(sa.native_tag) == len(tag_a) and set(sa.native_tag) <= set("0123456789abcdef")
    try:
        want = compiled.run(x, "simulate")
        out_a = alice.decrypt(sa.run(alice.encrypt(x)))
        np.testing.assert_allclose(out_a, want, atol=1e-3)
        from veil.wire import pack, unpack
        header, parts = unpack(mallory.encrypt(x), "veil-ciphertext")
        header["tag"] = tag_a
        sent = pack("veil-ciphertext", {"ct": _retag(parts["ct"], tag_m, tag_a)}, header)
        header, parts = unpack(sm.run(sent), "veil-ciphertext")
        assert header["tag"] == tag_a
        header["tag"] = tag_m
        back = pack("veil-ciphertext", {"ct": _retag(parts["ct"], tag_a, tag_m)}, header)
        np.testing.assert_allclose(mallory.decrypt(back), want, atol=1e-3)
        sm.close()      # closing one namespace's keys leaves the other's
        np.testing.assert_allclose(alice.decrypt(sa.run(alice.encrypt(x))), want, atol=1e-3)
    finally:
        sa.close()
        sm.close()


def test_native_errors_map_to_veil_errors():
    """Every exception type the binding raises becomes the given veil error; None too."""
    from veil.backends.he.openfhe_engine import native_call
    from veil.errors import EngineError

    for exc in (RuntimeError, ValueError, TypeError, MemoryError, OverflowError,
                IndexError, SystemError):
        def boom(exc=exc):
            raise exc("native")
        with pytest.raises(SerializationError):
            native_call(SerializationError, "could not decode", boom)
        with pytest.raises(EngineError, match="native"):
            native_call(EngineError, "evaluation failed", boom)
    with pytest.raises(SerializationError):
        native_call(SerializationError, "could not decode", lambda: None)
    assert native_call(EngineError, "x", lambda: None, none_ok=True) is None


def test_fuzz_target_runs_briefly(tmp_path):
    """The coverage-guided fuzz target (atheris) over the validators, bounded."""
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz_he_validators.py"), "-runs=200000",
         "-max_total_time=15", "-rss_limit_mb=8192", f"-artifact_prefix={tmp_path}/",
         "-print_final_stats=1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr and not list(tmp_path.glob("crash-*"))



def test_evaluation_keys_with_a_malformed_tag_are_refused(toy):
    client, parts, _, _ = toy
    good = veil.EvaluationKeys("m", client.tag, parts, True).to_bytes()
    assert veil.EvaluationKeys.from_bytes(good).tag == client.tag
    for tag in ("../" + client.tag[3:], client.tag.upper(), client.tag + "0", ""):
        with pytest.raises(SerializationError, match="malformed key tag"):
            veil.EvaluationKeys.from_bytes(veil.EvaluationKeys("m", tag, parts, True).to_bytes())

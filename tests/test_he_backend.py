"""The OpenFHE engine against numpy: real CKKS, small and fast cases."""
import numpy as np
import pytest

from veil.backends.he.openfhe_engine import ClientCrypto, EvaluationSession, build_context
from veil.compiler.approx import fit_chebyshev
from veil.compiler.plan import CKKSParams, chebyshev_depth, select_params
from veil.errors import EngineError, KeyMismatchError, MissingKeyError
from veil.ir import Op, cheb_eval

# Small insecure ring: these tests check arithmetic, not security, and run in seconds.
TOY = CKKSParams(1 << 12, 6, 40, 60, 3, "HEStd_NotSet", True)


@pytest.fixture(scope="module")
def pair():
    client = ClientCrypto(TOY)
    parts = client.keygen([1, 3, -2])
    with EvaluationSession(TOY, client.tag, parts, [1, 3, -2]) as session:
        yield client, session


def _enc(client, session, x):
    return session.load(client.encrypt(x))


def _dec(client, session, ct):
    return client.decrypt(session.dump(ct), TOY.slots)


def test_arithmetic_and_rotations_match_numpy(pair, rng):
    client, s = pair
    x, w = rng.uniform(-1, 1, TOY.slots), rng.uniform(-1, 1, TOY.slots)
    ct = _enc(client, s, x)
    np.testing.assert_allclose(_dec(client, s, s.mul_plain(ct, w, ("w",))), x * w, atol=1e-6)
    np.testing.assert_allclose(_dec(client, s, s.add_plain(ct, w, None)), x + w, atol=1e-6)
    np.testing.assert_allclose(_dec(client, s, s.add(ct, ct)), 2 * x, atol=1e-6)
    np.testing.assert_allclose(_dec(client, s, s.rotate(ct, 3)), np.roll(x, -3), atol=1e-5)
    hoisted = s.rotate_hoisted(ct, [1, -2])
    np.testing.assert_allclose(_dec(client, s, hoisted[-2]), np.roll(x, 2), atol=1e-5)


def test_chebyshev_matches_cleartext_polynomial_and_function(pair, rng):
    """Encryption noise (vs the cleartext polynomial) is far below approximation error."""
    client, s = pair
    x = rng.uniform(-1, 1, TOY.slots)
    coeffs = fit_chebyshev(Op.RELU, -1.0, 1.0, 13)
    out = _dec(client, s, s.chebyshev(_enc(client, s, x), coeffs, -1.0, 1.0))
    noise = np.abs(out - cheb_eval(x, coeffs, -1.0, 1.0)).max()
    approx = np.abs(cheb_eval(x, coeffs, -1.0, 1.0) - np.maximum(x, 0)).max()
    assert noise < 1e-4 and approx > 10 * noise


@pytest.mark.parametrize("degree", [1, 2, 5, 13, 27])
def test_depth_table_matches_openfhe(degree, rng):
    """The compiler's depth for a degree is exactly what OpenFHE needs: enough, not more."""
    need = chebyshev_depth(degree)
    coeffs = fit_chebyshev(Op.TANH, -1.0, 1.0, degree)
    x = rng.uniform(-1, 1, 1 << 11)
    for depth, works in ((need, True), (need - 1, False)):
        # degree 1 (a chosen degree, approx.smallest_degree) checks depth 0: one tower,
        # one key-switching digit
        p = CKKSParams(1 << 12, depth, 40, 60, min(2, depth + 1), "HEStd_NotSet", True)
        client = ClientCrypto(p)
        parts = client.keygen([])
        with EvaluationSession(p, client.tag, parts, []) as s:
            ct = s.load(client.encrypt(x))
            if works:
                out = client.decrypt(s.dump(s.chebyshev(ct, coeffs, -1.0, 1.0)), x.size)
                np.testing.assert_allclose(out, cheb_eval(x, coeffs, -1, 1), atol=1e-4)
            else:  # OpenFHE fails during evaluation or at decoding, as a veil error
                with pytest.raises(EngineError):
                    client.decrypt(s.dump(s.chebyshev(ct, coeffs, -1.0, 1.0)), x.size)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
def test_selected_params_are_accepted_at_128_bits(depth):
    for bits in (None, 12, 20):   # each precision floor picks other (scale, digits) pairs
        params, _ = select_params(depth, 256, precision_bits=bits)
        cc = build_context(params)   # OpenFHE enforces HEStd_128_classic for the ring
        assert cc.GetRingDimension() == params.ring_dim
    toy, _ = select_params(depth, 256, insecure_test_params=True)
    assert build_context(toy).GetRingDimension() == toy.ring_dim


def test_missing_rotation_keys_fail_at_session_open():
    client = ClientCrypto(TOY)
    parts = client.keygen([1])
    with pytest.raises(MissingKeyError, match=r"\[5\]"):
        EvaluationSession(TOY, client.tag, parts, [1, 5])


def test_rotation_without_key_is_a_veil_error_not_a_native_crash(pair, rng):
    client, s = pair
    with pytest.raises(MissingKeyError):
        s.rotate(_enc(client, s, rng.uniform(-1, 1, TOY.slots)), 7)


def test_ciphertext_from_another_key_is_rejected(pair, rng):
    client, s = pair
    other = ClientCrypto(TOY)
    other.keygen([])
    with pytest.raises(KeyMismatchError):
        s.load(other.encrypt(rng.uniform(-1, 1, TOY.slots)))
    with pytest.raises(KeyMismatchError):
        other.decrypt(client.encrypt(np.zeros(TOY.slots)), 4)


def test_two_sessions_in_one_process_are_independent(rng):
    """Closing one session removes only its own keys from OpenFHE's global maps."""
    c1, c2 = ClientCrypto(TOY), ClientCrypto(TOY)
    p1, p2 = c1.keygen([1]), c2.keygen([1])
    s1, s2 = EvaluationSession(TOY, c1.tag, p1, [1]), EvaluationSession(TOY, c2.tag, p2, [1])
    x = rng.uniform(-1, 1, TOY.slots)
    s1.close()
    out = c2.decrypt(s2.dump(s2.rotate(s2.load(c2.encrypt(x)), 1)), TOY.slots)
    np.testing.assert_allclose(out, np.roll(x, -1), atol=1e-5)
    with pytest.raises(EngineError, match="closed"):
        s1.rotate(s2.load(c2.encrypt(x)), 1)
    s2.close()


def test_same_keys_cannot_back_two_live_sessions():
    client = ClientCrypto(TOY)
    parts = client.keygen([1])
    with EvaluationSession(TOY, client.tag, parts, [1]):
        with pytest.raises(KeyMismatchError, match="already loaded"):
            EvaluationSession(TOY, client.tag, parts, [1])


def test_evaluations_and_key_changes_on_other_threads_do_not_race(rng):
    """OpenFHE computes with the GIL released and reads process-global key maps: one
    thread evaluating while another loads and closes sessions (rewriting those maps)
    must neither crash nor change a result."""
    import threading

    client = ClientCrypto(TOY)
    parts = client.keygen([1])
    x = rng.uniform(-1, 1, TOY.slots)
    others = [(c, c.keygen([1])) for c in (ClientCrypto(TOY) for _ in range(4))]
    errors, stop = [], threading.Event()

    def churn():
        try:
            while not stop.is_set():
                for c, p in others:
                    EvaluationSession(TOY, c.tag, p, [1]).close()
        except Exception as exc:        # reported below
            errors.append(exc)
    with EvaluationSession(TOY, client.tag, parts, [1]) as session:
        t = threading.Thread(target=churn)
        t.start()
        try:
            for _ in range(30):
                ct = session.square(session.rotate(session.load(client.encrypt(x)), 1))
                out = client.decrypt(session.dump(ct), TOY.slots)
                np.testing.assert_allclose(out, np.roll(x, -1) ** 2, atol=1e-4)
        finally:
            stop.set()
            t.join()
    assert errors == []


def test_key_changes_wait_for_evaluations_in_flight(pair):
    """The exclusion itself: loading a session (a key-map write) waits until an
    evaluation that is running with the GIL released has finished."""
    import threading
    import time

    client, session = pair
    other = ClientCrypto(TOY)
    parts = other.keygen([1])
    inside, release, done, opened = threading.Event(), threading.Event(), [], []

    def slow():                         # stands in for a native call that holds no GIL
        inside.set()
        release.wait(10)
        return "evaluated"
    evaluation = threading.Thread(target=lambda: done.append(session._native(slow)))
    evaluation.start()
    assert inside.wait(10)
    loader = threading.Thread(target=lambda: opened.append(
        EvaluationSession(TOY, other.tag, parts, [1])))
    loader.start()
    time.sleep(0.3)
    assert opened == []                 # still waiting for the evaluation
    release.set()
    evaluation.join(10)
    loader.join(10)
    assert done == ["evaluated"] and len(opened) == 1
    opened[0].close()

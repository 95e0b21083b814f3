"""OpenFHE's context and the native boundary: every OpenFHE call veil makes goes
through the ``openfhe_*`` modules (this one, :mod:`.openfhe_client`, and
:mod:`.openfhe_engine`); nothing else imports OpenFHE.

OpenFHE keeps evaluation keys in process-wide maps keyed by the secret key's tag.
Each object inserts its keys under its own tag and removes exactly those on
``close()``. The maps are native global state shared by all sessions in the process,
and OpenFHE releases the GIL while it computes, so ``_KEYMAPS`` is a readers-writer
lock: every native evaluation reads them (shared), and inserting or removing keys
(key generation, loading a session, closing one) writes them (exclusive).

Every exception the binding raises, and its ``None`` returns, become veil errors in
:func:`native_call`: SerializationError while decoding, EngineError while evaluating.
"""
from __future__ import annotations

import hashlib
import logging
import os

# libgomp reads its spin policy once, when it loads with OpenFHE. Its default spins idle
# threads for ~300k iterations: with two OpenFHE processes on a 2-core machine a rotation
# took 176 ms instead of 23 ms (bench/engine_ops.py); a short spin keeps the
# single-process speed. Only a default: an explicit setting by the user wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import openfhe as ofhe  # noqa: E402

from ...compiler.plan import CKKSParams  # noqa: E402
from ...errors import EngineError, SerializationError, VeilError  # noqa: E402
from .native import KeyMapLock  # noqa: E402

log = logging.getLogger(__name__)
_KEYMAPS = KeyMapLock()
OPENFHE_VERSION = getattr(ofhe, "__version__", "1.6.1.0.22.4")
_SECURITY = {"HEStd_128_classic": ofhe.HEStd_128_classic,
             "HEStd_192_classic": ofhe.HEStd_192_classic,
             "HEStd_256_classic": ofhe.HEStd_256_classic,
             "HEStd_NotSet": ofhe.HEStd_NotSet}


_KEY_DISTS = {"UNIFORM_TERNARY": ofhe.UNIFORM_TERNARY,
              "SPARSE_TERNARY": ofhe.SPARSE_TERNARY,
              "SPARSE_ENCAPSULATED": ofhe.SPARSE_ENCAPSULATED}


def build_context(params: CKKSParams, *, precompute: bool = True):
    """A CKKS CryptoContext for ``params``; raises EngineError if OpenFHE rejects them.

    A bootstrapping context gets OpenFHE's bootstrap setup for ``params.slots`` slots:
    the rotation indices the client's key generation needs and, with ``precompute``,
    the encoded CoeffsToSlots / SlotsToCoeffs matrices the server's bootstraps use
    (4.3 GiB at ring 2^16 and 2^15 slots; without them one bootstrap took over 2
    minutes instead of 12 s, measured). Only an evaluating context precomputes.
    """
    p = ofhe.CCParamsCKKSRNS()
    p.SetSecretKeyDist(_KEY_DISTS[params.key_dist])
    p.SetMultiplicativeDepth(params.mult_depth)
    p.SetScalingModSize(params.scaling_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetSecurityLevel(_SECURITY[params.security])
    p.SetScalingTechnique(ofhe.FLEXIBLEAUTO)
    p.SetKeySwitchTechnique(ofhe.HYBRID)
    p.SetNumLargeDigits(params.num_large_digits)
    p.SetRingDim(params.ring_dim)
    p.SetBatchSize(params.slots)
    try:
        cc = ofhe.GenCryptoContext(p)
    except RuntimeError as exc:
        raise EngineError(f"OpenFHE rejected the CKKS parameters {params}: {exc}") from exc
    if cc.GetRingDimension() != params.ring_dim:
        raise EngineError(f"OpenFHE chose ring {cc.GetRingDimension()} for {params}")
    for feature in (ofhe.PKE, ofhe.KEYSWITCH, ofhe.LEVELEDSHE, ofhe.ADVANCEDSHE):
        cc.Enable(feature)
    if params.bootstraps:
        cc.Enable(ofhe.FHE)
        native_call(EngineError, "OpenFHE rejected the bootstrapping parameters",
                    cc.EvalBootstrapSetup, list(params.boot_budget), [0, 0], params.slots,
                    int(params.boot_correction), bool(precompute),
                    bool(params.boot_stc_first),
                    none_ok=True)
    return cc


def _remove_tag(cc, tag: str | set[str]) -> None:
    """Drop one tag's (or a set of tags') keys from OpenFHE's global maps, keeping
    every other tag's."""
    tags = {tag} if isinstance(tag, str) else set(tag)
    with _KEYMAPS.write():
        mult = {t: list(v) for t, v in cc.GetAllEvalMultKeys().items() if t not in tags}
        auto = {t: v for t, v in cc.GetAllEvalAutomorphismKeys().items() if t not in tags}
        ofhe.ClearEvalMultKeys()
        cc.ClearEvalAutomorphismKeys()
        for t, keys in mult.items():
            cc.InsertEvalMultKey(keys, t)
        for t, keymap in auto.items():
            cc.InsertEvalAutomorphismKey(keymap, t)


# Everything the pybind11 binding raises for a native failure: std::exception ->
# RuntimeError, std::bad_alloc -> MemoryError, std::length_error/invalid_argument ->
# ValueError, std::out_of_range -> IndexError, overflowing conversions -> OverflowError,
# argument mismatches -> TypeError, an error while an error was set -> SystemError.
_NATIVE_ERRORS = (RuntimeError, ValueError, TypeError, MemoryError, OverflowError,
                  IndexError, SystemError, KeyError)


def native_call(error: type[VeilError], message: str, fn, *args, none_ok: bool = False):
    """``fn(*args)`` with every binding exception (and, unless ``none_ok``, a ``None``
    result) raised as ``error(message)``; the native text goes to the chained cause and
    the debug log, not into the message for decoding errors."""
    try:
        out = fn(*args)
    except VeilError:
        raise
    except _NATIVE_ERRORS as exc:
        log.debug("native %s failed: %r", getattr(fn, "__name__", fn), exc)
        detail = f": {exc}" if error is EngineError else ""
        raise error(f"{message}{detail}") from exc
    if out is None and not none_ok:     # some malformed inputs give None, no error
        raise error(message)
    return out


def serialize_ciphertext(ct) -> bytes:
    return bytes(native_call(EngineError, "ciphertext could not be serialized",
                             ofhe.Serialize, ct, ofhe.BINARY))


def deserialize_ciphertext(data: bytes):
    """Decode a ciphertext. Servers call this only on validated bytes."""
    return native_call(SerializationError, "ciphertext bytes could not be decoded",
                       ofhe.DeserializeCiphertextString, data, ofhe.BINARY)


def native_tag(namespace: str, client_tag: str) -> str:
    """The tag a namespaced session's keys get in OpenFHE's maps: SHA-256 of the
    namespace and the client's tag, as lowercase hex of the client tag's length (the
    alphabet and length of OpenFHE's own tags)."""
    digest = hashlib.sha256(b"veil-openfhe-tag\0" + namespace.encode("utf-8") + b"\0"
                            + client_tag.encode("utf-8")).hexdigest()
    return digest[:max(1, min(len(client_tag), len(digest)))]

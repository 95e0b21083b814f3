"""CKKS parameter selection: the smallest 128-bit-secure ring for a depth, then the
scale and key-switching digits; OpenFHE's Chebyshev depth table.

The HomomorphicEncryption.org bound on log2(Q*P) sets which (ring, depth, scale,
digits) are secure; ``_estimated_log_qp`` mirrors how OpenFHE builds the modulus chain
for HYBRID key switching (validated against OpenFHE by a backend test).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import CompileError, SerializationError

# Smallest ring dimensions with their 128-bit classical bound on log2(Q*P)
# (HomomorphicEncryption.org standard, Table for uniform ternary secrets).
HE_STD_128_LOGQP = {1 << 13: 218, 1 << 14: 438, 1 << 15: 881, 1 << 16: 1761, 1 << 17: 3523}
# Ring dimension used when the caller opts into insecure test parameters.
INSECURE_RING_DIM = 1 << 12
SCALING_BITS_CHOICES = (40, 38, 36, 34, 32, 30)
# Output bits measured per scaling size for veil's models (bench/he_models.py): a
# 32-bit scale leaves ~15-16 bits of output precision, 36 bits ~19, 40 bits 21-23.
PRECISION_LOSS_BITS = 17
# The first modulus holds the decrypted output: ``scale + 16`` bits leaves room for
# outputs up to 2^15 in magnitude, which logits never approach.
FIRST_MOD_HEADROOM = 16
# Degree thresholds of OpenFHE's Chebyshev evaluation on [-1, 1]: degree <= t costs
# `depth` levels. Any other interval costs one more level for the affine map onto
# [-1, 1] (which ``fold_poly_domain`` moves into the preceding dense layer). Checked
# against OpenFHE by a backend test.
_CHEB_DEPTH = ((1, 1), (2, 2), (5, 3), (13, 4), (27, 5), (59, 6), (119, 7), (247, 8),
               (495, 9), (1007, 10), (2031, 11))

# The largest degree each depth evaluates: a lower degree at the same depth costs the
# same levels for a worse fit, so these are the only degrees worth choosing (degree 2
# costs one level, not two, where ``fold_quadratic`` makes it a squaring).
FULL_DEPTH_DEGREES = tuple(limit for limit, _ in _CHEB_DEPTH)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def chebyshev_depth(degree: int, lo: float = -1.0, hi: float = 1.0) -> int:
    """Multiplicative levels OpenFHE's EvalChebyshevSeries consumes for ``degree``."""
    extra = 0 if (lo, hi) == (-1.0, 1.0) else 1
    for limit, depth in _CHEB_DEPTH:
        if degree <= limit:
            return depth + extra
    raise CompileError(f"polynomial degree {degree} is above the supported 2031")


# Depth of OpenFHE's approximate modular reduction (Chebyshev series of the scaled sine,
# plus double-angle iterations, more of them for the wider overflow bound K of uniform
# ternary secrets); a bootstrap consumes it plus its CoeffsToSlots and SlotsToCoeffs
# level budgets. Checked against GetBootstrapDepth by a backend test.
_EVALMOD_DEPTH = {"SPARSE_ENCAPSULATED": 10, "UNIFORM_TERNARY": 14, "SPARSE_TERNARY": 10}
KEY_DISTS = tuple(_EVALMOD_DEPTH)


def bootstrap_depth(level_budget: tuple[int, int], key_dist: str) -> int:
    """Levels one OpenFHE bootstrap consumes (``GetBootstrapDepth``)."""
    if key_dist not in _EVALMOD_DEPTH:
        raise CompileError(f"unknown secret distribution {key_dist!r}; one of "
                           f"{KEY_DISTS}")
    return _EVALMOD_DEPTH[key_dist] + int(level_budget[0]) + int(level_budget[1])


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters; ``security`` is the OpenFHE security level name.

    ``batch`` is the number of slots a ciphertext packs (0: all ``ring_dim / 2``); a
    smaller power of two replicates the vector across the ring, which is what makes a
    bootstrap over ``batch`` slots cheaper than over all of them. ``boot_budget`` (the
    CoeffsToSlots and SlotsToCoeffs level budgets) turns bootstrapping on; the context
    then reserves ``boot_levels`` levels after each bootstrap, and ``mult_depth`` is
    ``boot_levels + bootstrap_depth(boot_budget, key_dist)``.
    """

    ring_dim: int
    mult_depth: int
    scaling_bits: int
    first_mod_bits: int
    num_large_digits: int
    security: str = "HEStd_128_classic"
    insecure_test_params: bool = False
    key_dist: str = "UNIFORM_TERNARY"
    batch: int = 0
    boot_budget: tuple[int, int] | None = None
    boot_levels: int = 0
    boot_stc_first: bool = False     # OpenFHE's SlotsToCoeffs-first variant
    boot_correction: int = 0         # OpenFHE's correction factor (0: its default)

    def __post_init__(self) -> None:
        if self.boot_budget is not None:
            object.__setattr__(self, "boot_budget", tuple(int(b) for b in self.boot_budget))

    @property
    def slots(self) -> int:
        return self.batch or self.ring_dim // 2

    @property
    def bootstraps(self) -> bool:
        return self.boot_budget is not None

    @property
    def fresh_budget(self) -> int:
        """Levels a fresh ciphertext may spend before it must be bootstrapped: OpenFHE
        needs one level left, and the SlotsToCoeffs-first variant its SlotsToCoeffs
        budget too (measured in ``tests/test_he_bootstrap.py`` and bench/he_deep.py)."""
        return self.mult_depth - 1 - (self.boot_budget[1] if self.boot_stc_first else 0)

    @property
    def boot_budget_levels(self) -> int:
        """Levels a bootstrapped ciphertext may spend before the next bootstrap: one
        fewer than the context reserves, in both variants (measured as for
        :attr:`fresh_budget`)."""
        return self.boot_levels - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CKKSParams":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _estimated_log_qp(depth: int, scaling: int, first: int, dnum: int) -> int:
    """log2(Q*P) as OpenFHE builds it for HYBRID key switching (validated by a test)."""
    towers = depth + 1
    alpha = math.ceil(towers / dnum)
    digit_bits = first + (alpha - 1) * scaling
    log_p = math.ceil((digit_bits + 8) / 60) * 60  # +8: headroom OpenFHE keeps
    return first + depth * scaling + log_p


def _digits_ok(depth: int, dnum: int) -> bool:
    """OpenFHE needs every key-switching digit non-empty: (dnum - 1) * alpha < towers."""
    towers = depth + 1
    return 1 <= dnum and (dnum - 1) * math.ceil(towers / dnum) < towers


def slot_ring(min_slots: int) -> int:
    """The smallest 128-bit ring with ``min_slots`` slots: what a model of depth 1 gets
    (any depth that ring holds gets it too; a deeper model needs a larger ring)."""
    ring = next((r for r in HE_STD_128_LOGQP if r // 2 >= min_slots), None)
    if ring is None:
        raise CompileError(f"a value of {min_slots} slots does not fit one ciphertext")
    return ring


def keyswitch_cost(depth: int, scaling: int, first: int, dnum: int) -> int:
    """Towers one rotation key holds, over all digits: ``dnum * (towers + P towers)``.

    Both the evaluation-key memory and the NTTs of a key switch scale with it, so it
    is what parameter selection minimises once security and precision are met.
    """
    log_p = _estimated_log_qp(depth, scaling, first, dnum) - first - depth * scaling
    return dnum * (depth + 1 + log_p // 60)


def select_params(depth: int, min_slots: int, *, insecure_test_params: bool = False,
                  precision_bits: int | None = None) -> tuple[CKKSParams, str]:
    """Smallest secure ring; then the scale and key-switching digits.

    By default the largest scale that fits wins (the most output precision the ring
    allows), then the fewest digits. With ``precision_bits``, scales below
    ``precision_bits + PRECISION_LOSS_BITS`` are ruled out and the (scale, first
    modulus, digits) with the smallest :func:`keyswitch_cost` wins, ties going to the
    larger scale: a caller who needs 12 bits gets keys half the size on deep models.
    """
    depth = max(depth, 1)
    if insecure_test_params:
        ring = max(INSECURE_RING_DIM, 2 * next_pow2(min_slots))
        dnum = next(d for d in (3, 2, 1) if _digits_ok(depth, d))
        return (CKKSParams(ring, depth, 40, 60, dnum, "HEStd_NotSet", True),
                f"INSECURE test parameters: ring {ring}, no security level enforced")
    min_scale = 0 if precision_bits is None else precision_bits + PRECISION_LOSS_BITS
    scales = [c for c in SCALING_BITS_CHOICES if c >= min_scale]
    if not scales:
        raise CompileError(f"precision_bits={precision_bits} needs a scale above "
                           f"{max(SCALING_BITS_CHOICES)} bits; ask for at most "
                           f"{max(SCALING_BITS_CHOICES) - PRECISION_LOSS_BITS}")
    for ring, bound in HE_STD_128_LOGQP.items():
        if ring // 2 < min_slots:
            continue
        firsts = (lambda s: {min(60, s + 20)}) if precision_bits is None else \
            (lambda s: {min(60, s + 20), s + FIRST_MOD_HEADROOM})
        fits = [(s, first, dnum) for s in scales for first in sorted(firsts(s))
                for dnum in range(2, depth + 2)
                if _digits_ok(depth, dnum)
                # Strictly below: OpenFHE's primes sit a fraction of a bit above their
                # nominal size, so an estimate equal to the bound can fail its check.
                and _estimated_log_qp(depth, s, first, dnum) < bound]
        if not fits:
            continue
        if precision_bits is None:
            s, first, dnum = min(fits, key=lambda f: (-f[0], f[2]))
            goal = "the largest scale that fits, then the fewest key-switch digits"
        else:
            s, first, dnum = min(fits, key=lambda f: (keyswitch_cost(depth, *f), -f[0]))
            goal = (f"the cheapest key switching that keeps >= {precision_bits} output "
                    "bits")
        why = (f"depth {depth} with {s}-bit scaling fits ring {ring} (log2 QP < {bound} "
               f"for 128-bit security); {dnum} key-switch digits "
               f"({keyswitch_cost(depth, s, first, dnum)} towers per key): {goal}; "
               f"{ring // 2} slots >= {min_slots} needed")
        return CKKSParams(ring, depth, s, first, dnum), why
    widest = max(HE_STD_128_LOGQP) // 2
    if min_slots > widest:
        raise CompileError(f"a value of {min_slots} slots does not fit one ciphertext "
                           f"({widest} slots at most); plan_he cuts such values into "
                           "several ciphertexts (veil.compiler.tiles)")
    raise CompileError(f"depth {depth} does not fit a ring of at most 2^17 at 128-bit "
                       "security; lower the polynomial degrees")


# Bootstrapping parameters. The secure set is the candidate bench/he_deep.py measured
# best at 128-bit security on this 2-core machine ("enc-33-s47-stc" in
# bench/results/he_deep.md: 18 s per bootstrap of 2^12 slots, 15.6 bits (max error),
# 10 usable levels after it, 7.0 GiB of keys): a sparse-encapsulated secret, level
# budgets (3, 3), 11 levels reserved, a 47-bit scale over a 55-bit first modulus
# (OpenFHE's bootstrap needs first - scale <= its correction factor, 8 bits at 2^16),
# 4 key-switching digits (the fewest OpenFHE accepts at 128 bits), SlotsToCoeffs first.
# The test set is INSECURE (ring 2^12, no security level): the smallest that still
# bootstraps, for the default test run.
BOOT_PRECISION_BITS = 15     # max-error bits of one bootstrap, measured (15.6 at 2^16)
BOOT_SECURE = CKKSParams(1 << 16, 0, 47, 55, 4, "HEStd_128_classic", False,
                         "SPARSE_ENCAPSULATED", 0, (3, 3), 11, True)
BOOT_TEST = CKKSParams(1 << 12, 0, 50, 60, 3, "HEStd_NotSet", True,
                       "SPARSE_ENCAPSULATED", 0, (2, 2), 10, True)


def bootstrap_params(*, insecure_test_params: bool = False, precision_bits: int | None = None,
                     slots: int = 0) -> CKKSParams:
    """CKKS parameters with bootstrapping: the measured set (see ``BOOT_SECURE``) with
    ``mult_depth`` filled in and a batch of ``slots`` (a power of two; 0 for all of the
    ring's)."""
    base = BOOT_TEST if insecure_test_params else BOOT_SECURE
    depth = base.boot_levels + bootstrap_depth(base.boot_budget, base.key_dist)
    if slots and (slots & (slots - 1) or slots > base.ring_dim // 2):
        raise CompileError(f"a bootstrapped batch must be a power of two up to "
                           f"{base.ring_dim // 2} slots, not {slots}")
    if precision_bits is not None and precision_bits > BOOT_PRECISION_BITS:
        raise CompileError(f"precision_bits={precision_bits} is above the "
                           f"{BOOT_PRECISION_BITS} bits a bootstrap keeps (measured); a "
                           "model this deep cannot promise more")
    # the digits are part of the measured set: OpenFHE's moduli run a few bits above
    # _estimated_log_qp here, so the estimate's fewest digits (3) fail its 128-bit check
    # (a backend test builds BOOT_SECURE with OpenFHE)
    return replace(base, mult_depth=depth, batch=0 if slots == base.ring_dim // 2 else slots)


@dataclass(frozen=True)
class SearchParams:
    """CKKS parameters of encrypted search (:mod:`veil.backends.he.openfhe_search`):
    ring 2^12, a 60-bit first modulus and one 40-bit scaling modulus (Q = 100 bits)."""

    ring_dim: int = 1 << 12
    scaling_bits: int = 40
    first_mod_bits: int = 60
    security: str = "HEStd_128_classic"

    @property
    def slots(self) -> int:
        """Documents per block (one reply ciphertext)."""
        return self.ring_dim // 2

    def pairs(self, dim: int) -> int:
        """Query ciphertexts for a ``dim``-dimensional vector."""
        return (int(dim) + 1) // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "SearchParams":
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError as exc:
            raise SerializationError(f"malformed search parameters: {exc}") from None

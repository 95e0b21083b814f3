"""Which modes suit a compiled model, and what each costs per input in seconds, before
anything is run in it (``CompiledModel.report().advice``, ``veil compile``).

Each figure says what it rests on:

- ``he``: the slot plan's work in rotation units (``compiler.plan.estimate_costs``; the
  structural estimate when there is no plan or it bootstraps) times the cost of one
  rotation at the plan's ring and key towers. That cost is the bench-measured constant
  ``compiler.estimate.ROTATION_S_REF`` (20 ms at 2^14, depth 7, on 2 cores), scaled
  linearly in the ring and the towers (``estimate.rotation_seconds``); bootstrapped
  models use the estimate calibrated on the measured ResNet-20. Measured runs on this
  machine's two cores landed within about 2x of it (``bench/results``).
- ``mpc``: one input run here with both parties in this process
  (``backends.mpc.local.run_graph``): its compute time, and the exact rounds and bytes
  one party sends the other, priced on the links of :data:`LINKS` (each round costs a
  round trip, the bytes their serialization; the client adds one round trip). The
  dealer's material is counted apart: it can be dealt ahead of the request.
- ``tee``: plain's time here (the enclave runs the same graph in onnxruntime) plus one
  sealed round trip; it needs an attested enclave, and trusts its vendor.

Suitability follows what each mode refuses (the op registry's targets), HE's depth,
bootstraps and key memory, and MPC's rounds and traffic. No keys are generated and no
process is started.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .compiler.estimate import ROTATION_REF_DEPTH, ROTATION_REF_RING, ROTATION_S_REF, \
    rotation_seconds
from .compiler.params import keyswitch_cost
from .errors import VeilError
from .ir import ops_for

# Above these, HE is flagged costly: a second per input, or rotation keys that take a
# few GiB to generate, upload and hold on the server.
HE_SLOW_S = 1.0
HE_KEYS_BYTES = 2 << 30
# MPC is measured in this process only below this estimated party memory: larger
# models take seconds to minutes (``veil compare`` measures them across processes).
MPC_MEASURE_BYTES = 512 << 20


@dataclass(frozen=True)
class Link:
    """A network between the parties: round trip and bytes per second each way."""

    name: str
    rtt_s: float
    bytes_per_s: float


# loopback: ~50 us per exchange between two processes on this machine (a TCP round
# trip and the framing) at ~2 GB/s; a LAN: 0.5 ms and 1 Gbit/s; a WAN as veil compare's
# --wan 20,100 emulates it: 20 ms and 100 Mbit/s.
LINKS = (Link("loopback", 50e-6, 2e9), Link("LAN", 0.5e-3, 1e9 / 8),
         Link("WAN", 20e-3, 100e6 / 8))
# One HPKE-sealed request and reply over loopback on top of plain's compute (tee p50
# 0.47 ms against plain's 0.15 ms in the README's measured veil compare run).
TEE_OVERHEAD_S = 0.3e-3


@dataclass(frozen=True)
class ModeAdvice:
    """One mode's verdict: ``suits`` is "yes", "costly" or "no" (it refuses the model)."""

    mode: str
    suits: str
    seconds: float | None        # per input, on this machine (None: not priced)
    why: str
    basis: str = ""              # what the seconds rest on

    def line(self) -> str:
        cost = "" if self.seconds is None else f" ~{_seconds(self.seconds)} per input;"
        return f"{self.mode:<9}{self.suits:<7}{cost} {self.why}"

    def to_dict(self) -> dict:
        return asdict(self)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:,.3g} s"


def _refused(source, mode: str) -> str:
    """The first op ``mode`` refuses ("" when it accepts them all)."""
    accepted = ops_for(mode)
    for node in source.nodes:
        if node.op not in accepted:
            return f"refuses {node.op.value} (node {node.name!r})"
    return ""


def he_seconds(result) -> tuple[float | None, str]:
    """(seconds for one input, what it rests on) under HE; None when HE cannot price it."""
    est, plan = result.estimate, result.plan
    if plan is not None and (est is None or est.fits):
        p = plan.params
        towers = keyswitch_cost(p.mult_depth, p.scaling_bits, p.first_mod_bits,
                                p.num_large_digits)
        rot = rotation_seconds(p.ring_dim, towers)
        units = float(plan.costs.get("lanes_per_ciphertext", 0.0))
        return units * rot, (
            f"the slot plan's {units:g} rotation units x {rot * 1e3:.3g} ms a rotation at "
            f"ring 2^{p.ring_dim.bit_length() - 1} ({towers} key towers), scaled from "
            f"the bench-measured {ROTATION_S_REF * 1e3:g} ms at "
            f"2^{ROTATION_REF_RING.bit_length() - 1}, depth {ROTATION_REF_DEPTH}; up to "
            f"{plan.lanes} inputs share one ciphertext at that cost")
    if est is None:
        return None, ""
    cal = est.calibrated()
    if cal:
        return cal["latency_s"], f"structural estimate calibrated on {cal['on']}"
    return est.latency_s, ("structural estimate (bench-measured rotation cost, no slot "
                           "plan)")


def _he_keys(result) -> tuple[int, int]:
    """(rotation-key bytes, depth) of the slot plan, else of the structural estimate."""
    plan, est = result.plan, result.estimate
    if plan is None:
        return est.keys_bytes, est.depth
    p = plan.params
    towers = keyswitch_cost(p.mult_depth, p.scaling_bits, p.first_mod_bits,
                            p.num_large_digits)
    return len(plan.rotations) * 2 * p.ring_dim * 8 * towers, plan.depth


def _he(result, refusal: str) -> ModeAdvice:
    seconds, basis = he_seconds(result)
    if result.plan is None and result.estimate is None:
        return ModeAdvice("he", "no", None, refusal or "HE cannot price this model")
    keys, depth = _he_keys(result)
    boots = 0 if result.estimate is None else result.estimate.bootstraps
    facts = (f"depth {depth}, " + (f"{boots} bootstraps on the longest path"
                                   if boots else "no bootstrapping")
             + f", rotation keys {keys / 2**20:,.0f} MiB")
    if result.plan is None or refusal:
        return ModeAdvice("he", "no", seconds, f"refused: {refusal or 'no slot plan'} "
                          f"(estimate: {facts})", basis)
    costly = [why for bad, why in (
        (boots, "bootstrapping (~19 s a ciphertext, GiB of keys)"),
        (seconds is not None and seconds > HE_SLOW_S, f"over {HE_SLOW_S:g} s per input"),
        (keys > HE_KEYS_BYTES, f"keys over {HE_KEYS_BYTES >> 30} GiB")) if bad]
    why = facts + ("; costly: " + ", ".join(costly) if costly
                   else "; the server sees only ciphertexts")
    return ModeAdvice("he", "costly" if costly else "yes", seconds, why, basis)


def _mpc(source, refusal: str, x: np.ndarray) -> ModeAdvice:
    if refusal:
        return ModeAdvice("mpc", "no", None, refusal)
    from .backends.mpc import evaluator
    from .backends.mpc.local import run_graph

    try:
        graph = evaluator.lower_for_mpc(source)
    except VeilError as exc:          # an op the MPC lowering refuses after all
        return ModeAdvice("mpc", "no", None, f"refused: {exc}")
    party = evaluator.estimate_memory(graph)["party"]
    if party > MPC_MEASURE_BYTES:
        return ModeAdvice("mpc", "yes", None, (
            f"not run here: ~{party / 2**20:,.0f} MiB a party; veil compare measures "
            "its rounds and bytes; the two servers must not collude"))
    prog = evaluator.Program(graph)
    t = time.perf_counter()
    _, chans = run_graph(prog, x)
    compute = time.perf_counter() - t
    rounds, sent = chans[0].rounds, max(c.bytes_sent for c in chans)
    dealt = evaluator.material_bytes([s for layer in prog.layers for s in layer.steps], 1)
    by_link = {k.name: compute + (rounds + 1) * k.rtt_s + sent / k.bytes_per_s
               for k in LINKS}
    links = ", ".join(f"{name} ~{_seconds(s)}" for name, s in by_link.items())
    why = (f"{rounds} party rounds, {sent / 1e3:,.1f} kB a party sends, "
           f"{dealt / 1e3:,.1f} kB of dealer material a party; {links}; "
           "the two servers must not collude and see the weights")
    return ModeAdvice("mpc", "costly" if by_link["LAN"] > HE_SLOW_S else "yes",
                      by_link["loopback"], why,
                      f"one input run in this process ({_seconds(compute)} of compute, "
                      "dealer included) plus rounds x round trip and bytes / bandwidth "
                      "per link: " + ", ".join(f"{k.name} {k.rtt_s * 1e3:g} ms, "
                                               f"{k.bytes_per_s * 8 / 1e6:,.0f} Mbit/s"
                                               for k in LINKS))


def _plain_seconds(compiled, x: np.ndarray) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        compiled.run(x, "plain", head=False)
        best = min(best, time.perf_counter() - t)
    return best


def advise(compiled) -> list[ModeAdvice]:
    """One :class:`ModeAdvice` per mode for ``compiled`` (a ``CompiledModel``)."""
    result, source = compiled.result, compiled.result.source
    x = _probe(compiled)
    with np.errstate(all="ignore"):       # a timing probe: its values are not used
        plain = _plain_seconds(compiled, x)
        return _advise(compiled, result, source, x, plain)


def _probe(compiled) -> np.ndarray:
    """One input to time: the top of the calibrated input's range everywhere (for a text
    model, the largest token id and a full attention mask), inside the range HE takes."""
    lo_hi = compiled.result.extents.get(compiled.result.source.input.name, (0.0, 0.0))
    x = np.full((1, *compiled.input_shape), float(lo_hi[1]))
    clip = getattr(compiled.input_range, "clip", None)
    return x if clip is None else clip(x, warn=False)


def _advise(compiled, result, source, x: np.ndarray, plain: float) -> list[ModeAdvice]:
    he_refusal = (result.he_refusal[1] if result.he_refusal else "") \
        or _refused(source, "simulate")
    sim = _refused(source, "simulate")
    tee = _refused(source, "tee")
    return [
        ModeAdvice("plain", "yes", plain, "the reference: no privacy, the server sees "
                   "inputs and outputs", "measured here, best of 3"),
        ModeAdvice("simulate", "no" if sim else "yes", None if sim else plain,
                   sim or "HE's polynomial numerics in floats: accuracy before paying for "
                   "HE, no privacy", "about plain's time"),
        _he(result, he_refusal),
        _mpc(source, _refused(source, "mpc"), x),
        ModeAdvice("tee", "no" if tee else "yes", None if tee else plain + TEE_OVERHEAD_S,
                   tee or "about plain's time plus one sealed round trip; needs an "
                   "attested enclave and trusts its vendor",
                   f"plain's measured time + {TEE_OVERHEAD_S * 1e3:g} ms (README's "
                   "veil compare run)"),
    ]

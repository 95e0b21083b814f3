"""Two parties in one process: a pair of in-memory channels and a runner.

For tests and for measuring a protocol's rounds and bytes without processes; the
networked parties (next step) implement the same :class:`~.protocols.Channel`.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import numpy as np

from ...errors import VeilError


class LocalChannel:
    """One end of an in-memory link; counts rounds and bytes sent."""

    def __init__(self, outbox: queue.Queue, inbox: queue.Queue, timeout: float) -> None:
        self._out, self._in, self._timeout = outbox, inbox, timeout
        self.rounds = 0
        self.bytes_sent = 0

    def exchange(self, data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data)
        self._out.put(data.copy())
        self.rounds += 1
        self.bytes_sent += data.nbytes
        try:
            peer = self._in.get(timeout=self._timeout)
        except queue.Empty:
            raise VeilError("the other party did not answer in time") from None
        if peer.shape != data.shape or peer.dtype != data.dtype:
            raise VeilError("the other party sent a message of the wrong shape")
        return peer


def channel_pair(timeout: float = 30.0) -> tuple[LocalChannel, LocalChannel]:
    a, b = queue.Queue(), queue.Queue()
    return LocalChannel(a, b, timeout), LocalChannel(b, a, timeout)


def run_parties(fn: Callable[[int, LocalChannel, Any], Any], inputs: tuple[Any, Any],
                timeout: float = 30.0) -> tuple[tuple[Any, Any], tuple[LocalChannel, ...]]:
    """Run ``fn(party, channel, input)`` for both parties in threads; return both results
    and both channels (for their round and byte counts). A failure in either is raised."""
    chans = channel_pair(timeout)
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def target(p: int) -> None:
        try:
            results[p] = fn(p, chans[p], inputs[p])
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(p,), daemon=True) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if errors:
        raise errors[0]
    return (results[0], results[1]), chans


def run_graph(graph, xs: np.ndarray, cmp: str = "circuit", timeout: float = 120.0
              ) -> tuple[np.ndarray, tuple[LocalChannel, ...]]:
    """A graph lowered for MPC (``evaluator.lower_for_mpc``; or its ``Program``) on a
    batch ``xs`` of the model's own inputs, both parties in this process: the client's
    encoding (token ids one-hot, ``compiler.passes.encode_input``) and sharing, the
    dealer's material for every layer at once, both runs, and the decoded outputs
    (batch, *output shape) with the two channels (their rounds and bytes)."""
    from ...compiler.passes import encode_input
    from . import evaluator as ev
    from .fixed import decode, encode
    from .prg import Prg
    from .protocols import reconstruct, share

    prog = graph if isinstance(graph, ev.Program) else ev.Program(graph)
    g = prog.graph
    prg = Prg()
    s0, s1 = share(encode(encode_input(g, xs), prog.frac_bits), prg)
    m0, m1 = ev.layer_material(prog.layers, len(xs), prg, prog.frac_bits, cmp=cmp)
    (o0, o1), chans = run_parties(lambda p, ch, inp: ev.evaluate(p, ch, prog, *inp),
                                  ((s0, m0), (s1, m1)), timeout=timeout)
    out = decode(reconstruct(o0, o1), ev.output_frac_bits(g, prog.frac_bits))
    return out.reshape((len(xs),) + g.output_shape), chans

"""The execution modes of veil, listed once.

Every other list of modes (the IR's compile targets, ``CompiledModel.run``, the export
folder, ``veil compare``, ``veil serve`` and the CLI's choices) is derived from
:class:`Mode` here. Like :mod:`veil.errors` this module sits at the bottom of the
stack: it imports nothing of veil's but the error types.
"""
from __future__ import annotations

import enum
from typing import Iterable

from .errors import ModeError


class Mode(str, enum.Enum):
    """How to run a compiled model, in rising cost."""

    PLAIN = "plain"        # the original float model
    SIMULATE = "simulate"  # HE's polynomial model in floats: predicts HE accuracy
    TEE = "tee"            # sealed to an attested enclave process
    MPC = "mpc"            # additive shares between two parties and a dealer
    HE = "he"              # full CKKS round trip through client and server roles


#: every mode, in :class:`Mode`'s order
MODES: tuple[str, ...] = tuple(m.value for m in Mode)
#: modes computed in the caller's process, with no server behind them
LOCAL: tuple[str, ...] = (Mode.PLAIN.value, Mode.SIMULATE.value)
#: modes with a server (or servers): what an export folder holds and ``veil serve`` fronts
SERVED: tuple[str, ...] = tuple(m for m in MODES if m not in LOCAL)


def as_mode(mode: str | Mode) -> Mode:
    """``mode`` as a :class:`Mode`; ModeError naming the choices when it is none."""
    try:
        return Mode(mode)
    except ValueError:
        raise ModeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}") from None


def parse_modes(modes: str | Iterable[str], allowed: Iterable[str] = MODES,
                what: str = "modes") -> tuple[str, ...]:
    """A comma-separated string or an iterable of mode names, deduplicated in order.

    Raises:
        ModeError: empty, or a name outside ``allowed`` (``what`` names the option).
    """
    allowed = tuple(getattr(m, "value", m) for m in allowed)
    items = modes.split(",") if isinstance(modes, str) else modes
    out = tuple(dict.fromkeys(str(getattr(m, "value", m)).strip() for m in items))
    out = tuple(m for m in out if m)
    bad = [m for m in out if m not in allowed]
    if bad or not out:
        raise ModeError(f"{what}: choose some of {', '.join(allowed)}, not {list(out)}")
    return out

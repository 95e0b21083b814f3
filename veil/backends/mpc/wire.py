"""What the MPC processes say to each other: message kinds, limits, the model file,
and the checked form of a client's request. Shared by the dealer, the parties, the
client and the HTTP service's MPC front (``veil/service/mpc.py``)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ...errors import InputError, MpcError, SerializationError
from ...ir import Graph
from ...ir.serialize import graph_from_json, graph_to_json
from .. import sockets as so
from . import tickets
from .evaluator import lower_for_mpc

log = logging.getLogger("veil.mpc")

# message kinds
MATERIAL_REQUEST, MATERIAL, ERROR = 1, 2, 3
CLIENT_REQUEST, CLIENT_RESULT = 10, 11
TICKET_REQUEST, TICKET = 12, 13

MAX_INPUTS = 4096               # inputs in one client request
MAX_PENDING = 1024              # client requests a party holds before refusing more
MAX_PER_CLIENT = 32             # shares party 1 holds for one client tag
ORPHAN_S = 2.0                  # idle seconds a share waits for its partner
STALE_TIMEOUTS = 4              # a confirmed request never begun this many timeouts: dropped
QUERY_INTERVAL_S = 0.02         # party 0 asks party 1 about new requests at most this often
QUERY_MAX = 256                 # request ids in one PEER_QUERY
SWEEP_S = 0.1
LINK_GRACE_S = 1.0              # party 0 waits this long for its links before refusing
PEER_HELLO, PEER_BEGIN, PEER_READY, PEER_DATA = 20, 21, 22, 23
PEER_QUERY, PEER_HAVE = 24, 25

_ROLE_TEXT = {"party0": "party 0", "party1": "party 1", "dealer": "the MPC dealer"}

DEFAULT_TIMEOUT = 10.0
# Single-input material sets each party keeps ready (the offline phase, done ahead).
PREFETCH = 8
# Bytes of prefetched whole material sets a party may hold; beyond, it streams layers.
POOL_LIMIT = 64 << 20
MAX_CLIENT_BYTES = 64 << 20
MODEL_FILE = "mpc-model"


class _Unreachable(MpcError):
    """A link to another role failed; ``role`` names it (party0, party1, dealer)."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


# -- model files --------------------------------------------------------------------------
def save_model(graph: Graph, directory: str | os.PathLike) -> Path:
    """Write the MPC form of ``graph`` (batch norms folded, affine chains as DENSE)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lowered = lower_for_mpc(graph)
    doc, arrays = graph_to_json(lowered)
    np.savez(d / f"{MODEL_FILE}.npz", **arrays)
    (d / f"{MODEL_FILE}.json").write_text(json.dumps({"graph": doc}))
    return d


def load_model(directory: str | os.PathLike) -> Graph:
    d = Path(directory)
    try:
        doc = json.loads((d / f"{MODEL_FILE}.json").read_text())
        with np.load(d / f"{MODEL_FILE}.npz", allow_pickle=False) as z:
            # arrays read one at a time as the graph takes them (its nodes keep their
            # own copies): the weights are never in memory twice (VGG-16: 1.1 GB)
            graph = graph_from_json(doc["graph"], z)
        return lower_for_mpc(graph)
    except (OSError, KeyError, ValueError) as exc:
        raise SerializationError(f"no readable MPC model in {d}: {exc}") from exc


#: the most bytes of one party's share in one request: a transformer's one-hot input is
#: 31 MB per text at 128 tokens, so its requests carry fewer texts
MAX_SHARE_BYTES = MAX_CLIENT_BYTES - (1 << 20)


def max_request_batch(shape) -> int:
    """Inputs per request for a shared input of ``shape``: ``MAX_INPUTS``, fewer when
    their shares would pass ``MAX_SHARE_BYTES``."""
    per = 8 * int(np.prod(shape))
    return max(1, min(MAX_INPUTS, MAX_SHARE_BYTES // max(per, 1)))


def input_contract(directory: str | os.PathLike) -> dict:
    """What a client must send for the MPC model saved in ``directory``, read from its
    JSON alone (not the weights): ``shape`` of the shared input and, for a transformer
    whose token ids the client one-hot encodes, the INPUT node's ``onehot`` and
    ``source_shape`` (``compiler.passes.onehot_encode``)."""
    d = Path(directory)
    try:
        first = json.loads((d / f"{MODEL_FILE}.json").read_text())["graph"]["nodes"][0]
        attrs = first["attrs"]
        out = {"shape": [int(v) for v in first["shape"]]}
        out["max_batch"] = max_request_batch(out["shape"])
        if attrs.get("onehot"):
            out["onehot"] = attrs["onehot"]
            out["source_shape"] = [int(v) for v in attrs["source_shape"]]
        return out
    except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
        raise SerializationError(f"no readable MPC model in {d}: {exc}") from exc


def read_client_request(body, input_shape: tuple[int, ...],
                        frac_bits: int) -> tuple[bytes, np.ndarray, bytes | None]:
    """(request id, share, ticket or None) of a client's request to a party, checked:
    SerializationError for its form, InputError when it does not fit the model's input
    or the parties' fixed-point scale. Party 0's front (the HTTP service) checks with
    it too."""
    arrays = so.unpack_arrays(body)
    try:
        rid, share, frac = arrays["request_id"], arrays["share"], arrays["frac_bits"]
    except KeyError as exc:
        raise SerializationError(f"a party request lacks {exc}") from None
    ticket = arrays.get("ticket")
    if set(arrays) - {"ticket"} != {"request_id", "share", "frac_bits"} or \
            rid.dtype != np.uint8 or rid.shape != (16,) or frac.dtype != np.uint64 or \
            frac.shape != (1,) or (ticket is not None and (
                ticket.dtype != np.uint8 or ticket.shape != (tickets.TICKET_LEN,))):
        raise SerializationError("a party request is request_id (16 bytes), share, "
                                 "frac_bits and, for party 1, its ticket")
    if share.dtype != np.uint64 or share.shape[1:] != tuple(input_shape) or \
            not 1 <= share.shape[0] <= MAX_INPUTS:
        raise InputError(f"the share has shape {share.shape}; this model takes (n, "
                         f"{', '.join(map(str, input_shape))}) with 1 <= n <= {MAX_INPUTS}")
    if int(frac[0]) != frac_bits:
        raise InputError(f"inputs must be encoded with {frac_bits} fractional bits, "
                         f"not {int(frac[0])}")
    return bytes(rid), share, None if ticket is None else bytes(ticket)


def _steps_key(steps, batch: int) -> str:
    return hashlib.sha256(json.dumps([steps, batch]).encode()).hexdigest()



"""``veil`` command line. MPC processes for now; compile/export/serve come with the service.

    veil mpc-setup KEYS_DIR
    veil mpc-dealer --keys KEYS_DIR [--listen HOST:PORT]
    veil mpc-node --party 0|1 --keys KEYS_DIR --model MODEL_DIR --dealer HOST:PORT
                  [--listen HOST:PORT] [--peer HOST:PORT | --peer-listen HOST:PORT]
                  [--cmp circuit|fss] [--frac-bits F] [--prefetch N]
                  [--batch-size B] [--prefetch-batch M]

Each server prints one line ``veil-mpc <role> listening on HOST:PORT`` (and party1
``... peer on HOST:PORT``) once it accepts connections, so port 0 can be used.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="veil", description="veil: private inference.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("mpc-setup", help="create the MPC roles' static keys in a folder")
    s.add_argument("keys", help="folder for party0/party1/dealer keys and public.json")
    d = sub.add_parser("mpc-dealer", help="run the dealer (correlated randomness)")
    d.add_argument("--keys", required=True, help="folder made by mpc-setup")
    d.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    d.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    n = sub.add_parser("mpc-node", help="run one of the two computing parties")
    n.add_argument("--party", type=int, choices=(0, 1), required=True)
    n.add_argument("--keys", required=True, help="folder made by mpc-setup")
    n.add_argument("--model", required=True, help="folder written by save_model")
    n.add_argument("--dealer", type=_address, required=True)
    n.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                   help="address for clients")
    n.add_argument("--peer", type=_address, help="party0: party1's peer address")
    n.add_argument("--peer-listen", type=_address, default=("127.0.0.1", 0),
                   help="party1: address for party0")
    n.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    n.add_argument("--cmp", choices=("circuit", "fss"), default="circuit",
                   help="comparisons as binary circuits (default: little computation and "
                        "dealer material, 8 rounds per ReLU layer; for fast networks) or "
                        "as function secret sharing (2 rounds; for slow networks); both "
                        "parties must agree")
    n.add_argument("--frac-bits", type=int, default=20,
                   help="fixed-point fractional bits (both parties and clients agree)")
    n.add_argument("--prefetch", type=int, default=8,
                   help="single-input material sets fetched from the dealer ahead")
    n.add_argument("--batch-size", type=int, default=64,
                   help="a batch size whose material is also fetched ahead")
    n.add_argument("--prefetch-batch", type=int, default=2,
                   help="material sets for --batch-size inputs kept ready (0: on demand)")
    return ap


def _single_threaded_blas(argv: list[str] | None) -> None:
    """Restart this process with OPENBLAS_NUM_THREADS=1 unless it is set: the parties'
    float64 limb products are small, and two parties' BLAS thread pools spinning
    against each other on a 2-core machine stalled the online phase by up to 80 ms.
    numpy reads the variable when it loads, so it must be set before the process starts."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    os.execve(sys.executable, [sys.executable, "-m", "veil",
                               *(sys.argv[1:] if argv is None else argv)], env)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("mpc-node", "mpc-dealer"):
        _single_threaded_blas(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    from .backends.mpc import service, transport

    if args.command == "mpc-setup":
        print(f"keys written to {transport.setup(args.keys)}")
        return 0
    if args.command == "mpc-dealer":
        dealer = service.Dealer(transport.Identity.load(args.keys, "dealer"), args.listen,
                                timeout=args.timeout)
        print("veil-mpc dealer listening on %s:%d" % dealer.address, flush=True)
        dealer.serve_forever()
        return 0
    if args.party == 0 and args.peer is None:
        print("mpc-node --party 0 needs --peer (party1's peer address)", file=sys.stderr)
        return 2
    node = service.Party(args.party, transport.Identity.load(args.keys, f"party{args.party}"),
                         service.load_model(args.model), args.listen, args.dealer,
                         peer=args.peer, peer_listen=args.peer_listen, timeout=args.timeout,
                         prefetch=args.prefetch, frac_bits=args.frac_bits, cmp=args.cmp,
                         batch_size=args.batch_size, prefetch_batch=args.prefetch_batch)
    print(f"veil-mpc party{args.party} listening on %s:%d" % node.address, flush=True)
    if node.peer_address:
        print("veil-mpc party1 peer on %s:%d" % node.peer_address, flush=True)
    node.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

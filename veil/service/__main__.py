"""``python -m veil.service EXPORT... --store DIR --listen HOST:PORT``: serve exports."""
from __future__ import annotations

import argparse
import logging

from .app import ServiceConfig, add_limit_args, limit_options
from .options import add_ops_args, add_search_args, indexes_of
from .run import serve


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen takes HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veil.service", description=__doc__)
    ap.add_argument("exports", nargs="*", help="export folders (veil export)")
    ap.add_argument("--store", required=True, help="directory for sessions and API keys")
    ap.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8000),
                    help="HOST:PORT (port 0: any free port; default 127.0.0.1:8000)")
    ap.add_argument("--ttl", type=float, default=24 * 3600.0, help="session idle TTL (s)")
    ap.add_argument("--disk-budget", type=int, default=8 << 30,
                    help="bytes of stored evaluation keys")
    ap.add_argument("--memory-budget", type=int, default=2 << 30,
                    help="bytes of loaded OpenFHE sessions (estimated)")
    add_limit_args(ap)
    ap.add_argument("--he-workers", type=int, default=2,
                    help="HE worker processes (OpenFHE runs only in them)")
    ap.add_argument("--worker-timeout", type=float, default=300.0,
                    help="seconds an HE request may run in a worker before it is restarted")
    add_ops_args(ap, parse_listen)
    add_search_args(ap)
    ap.add_argument("--log-level", default="WARNING",
                    help="stderr's level (the store's logs/service.log has INFO)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServiceConfig(exports=args.exports, store_dir=args.store, session_ttl_s=args.ttl,
                           disk_budget_bytes=args.disk_budget,
                           memory_budget_bytes=args.memory_budget, he_workers=args.he_workers,
                           worker_timeout_s=args.worker_timeout, indexes=indexes_of(args),
                           search_workers=args.search_workers, **limit_options(args))
    serve(config, *args.listen, metrics_listen=args.metrics_listen,
          tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

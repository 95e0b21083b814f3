"""Command-line options shared by ``veil serve`` and ``python -m veil.service``.

Kept free of heavy imports (FastAPI, uvicorn, prometheus_client) so ``veil --help``
stays fast."""
from __future__ import annotations

from typing import Callable


def add_ops_args(parser, address: Callable[[str], tuple[str, int]]) -> None:
    """``--tls-cert``, ``--tls-key`` and ``--metrics-listen`` (parsed with ``address``)."""
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain); "
                        "needs --tls-key")
    parser.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    parser.add_argument("--metrics-listen", type=address, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by "
                        "default; no API key: bind it to a private interface, never the "
                        "public one)")

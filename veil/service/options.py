"""Command-line options shared by ``veil serve`` and ``python -m veil.service``.

Kept free of heavy imports (FastAPI, uvicorn, prometheus_client) so ``veil --help``
stays fast."""
from __future__ import annotations

from typing import Callable


def index_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--index`` (a name of letters, digits, ``_.-``)."""
    import argparse
    import re

    name, sep, path = text.partition("=")
    if not sep or not path or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise argparse.ArgumentTypeError(f"--index takes NAME=PATH (an index file of `veil "
                                         f"index build`), not {text!r}")
    return name, path


def add_search_args(parser) -> None:
    """``--index NAME=PATH`` (repeatable) and ``--search-workers``."""
    parser.add_argument("--index", type=index_spec, action="append", default=[],
                        metavar="NAME=PATH", help="serve this search index (a file of "
                        "`veil index build`) under NAME for encrypted queries; repeatable")
    parser.add_argument("--search-workers", type=int, default=1,
                        help="worker processes scoring encrypted queries; each holds every "
                        "index's encoded blocks (default 1, two threads each)")


def indexes_of(args) -> dict[str, str]:
    """The ``--index`` options as a name -> path dict; a name given twice is refused."""
    out: dict[str, str] = {}
    for name, path in args.index:
        if name in out:
            from ..errors import InputError

            raise InputError(f"two indexes are named {name!r}")
        out[name] = path
    return out


def add_ops_args(parser, address: Callable[[str], tuple[str, int]]) -> None:
    """``--tls-cert``, ``--tls-key`` and ``--metrics-listen`` (parsed with ``address``)."""
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain); "
                        "needs --tls-key")
    parser.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    parser.add_argument("--metrics-listen", type=address, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by "
                        "default; no API key: bind it to a private interface, never the "
                        "public one)")

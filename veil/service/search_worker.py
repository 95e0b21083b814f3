"""One search worker process: ``python -m veil.service.search_worker --fd N --index K ...``.

Started by :class:`veil.service.workers.HEWorkers` (``module=`` this one) for the
indexes of ``veil serve --index``, never by hand. OpenFHE parses the queries here, not
in the HTTP process, with the same supervision as the HE workers (a crash fails one
request). It loads each ``--serve NAME=PATH`` index, encodes its blocks as CKKS
plaintexts (:class:`~veil.backends.he.openfhe_search.BlockScorer`, up to
``--memory-budget`` bytes of them, least recently used dropped beyond), and answers:

* ``search``: header ``index`` (a served name), ``blocks`` (block numbers, each once);
  parts ``0..m-1`` the query's ciphertexts -> parts ``0..len(blocks)-1`` the encrypted
  scores of those blocks, in order. The query is checked against the index's template
  before OpenFHE reads it (wrong dimension, foreign parameters, tampered bytes, mixed
  keys: typed errors).

Nothing about a query is logged: not its bytes, its tag, its blocks or its scores.
"""
from __future__ import annotations

import argparse
import os
import threading

from ..errors import InputError, NotFoundError, SerializationError
from .he_worker import run_worker


class SearchWorker:
    """The scorers of one worker process, by index name."""

    def __init__(self, specs: list[str], memory_budget: int) -> None:
        from ..backends.he.openfhe_search import BlockScorer     # imports OpenFHE: here only
        from ..compiler.params import SearchParams
        from ..search.index import Index

        self.scorers = {}
        share = max(1, memory_budget // max(1, len(specs)))
        for spec in specs:
            name, _, path = spec.partition("=")
            index = Index.load(path)
            self.scorers[name] = BlockScorer(SearchParams.from_dict(index.params),
                                             index.matrix(), cache_bytes=share,
                                             threads=int(os.environ.get("VEIL_SEARCH_THREADS",
                                                                        "2")))

    def prepare(self) -> None:
        """Encode every index's blocks ahead of the first queries (they would be
        encoded on first use anyway): run in the background once the worker is up."""
        for scorer in self.scorers.values():
            scorer.prepare()

    def handle(self, header: dict, parts: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
        if header.get("op") != "search":
            raise SerializationError(f"unknown search worker request {header.get('op')!r}")
        scorer = self.scorers.get(str(header.get("index")))
        if scorer is None:
            raise NotFoundError("no such index")
        blocks = header.get("blocks")
        if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
            raise InputError("blocks must be a list of block numbers")
        query = [parts[str(i)] for i in range(len(parts)) if str(i) in parts]
        if len(query) != len(parts):
            raise SerializationError("query parts must be named 0, 1, ...")
        replies = scorer.score(query, blocks)
        return {"ok": True}, {str(i): r for i, r in enumerate(replies)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veil.service.search_worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--serve", action="append", default=[],
                    help="NAME=PATH: a served index's name and file")
    ap.add_argument("--memory-budget", type=int, required=True)
    args = ap.parse_args(argv)
    return run_worker(f"search-worker-{args.index}", args.fd,
                      lambda: SearchWorker(args.serve, args.memory_budget),
                      ready=lambda worker: threading.Thread(
                          target=worker.prepare, name="prepare", daemon=True).start())


if __name__ == "__main__":
    raise SystemExit(main())

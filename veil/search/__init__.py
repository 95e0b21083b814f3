"""Private semantic search: an encrypted query against a server's embedding index.

* :mod:`veil.search.index` -- :class:`~veil.search.index.Index` (vectors, ids, block
  layout, optional k-means clusters), ``build_index``, ``embed_texts`` (MiniLM-L6),
  the index file (``veil index build``);
* :mod:`veil.search.engine` -- :class:`~veil.search.engine.Searcher` (``plain``,
  ``he``, ``tee`` in this process) and :class:`~veil.search.engine.QueryClient` (the
  client's half of encrypted search, used by the SDK).

The CKKS kernel is :mod:`veil.backends.he.openfhe_search`; the service routes are
:mod:`veil.service.search`, the SDK's ``veil.Client(url, index=NAME).search(...)``.
"""
from __future__ import annotations

from .engine import MODES, QueryClient, SearchResult, Searcher, plan_blocks
from .index import Index, Layout, TextEmbedder, build_index, embed_texts, kmeans

__all__ = ["Index", "Layout", "MODES", "QueryClient", "SearchResult", "Searcher",
           "TextEmbedder", "build_index", "embed_texts", "kmeans", "plan_blocks"]

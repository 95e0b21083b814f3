"""Encrypted search for ``veil.Client(url, index=NAME)``: :class:`SearchMode`.

The client fetches the index's public description and layout once (ids, the document
at each block slot, centroids), embeds a text query here (MiniLM-L6, ``veil.text``, for
an index built from texts), encrypts it under a secret key that never leaves this
object (:class:`~veil.search.engine.QueryClient`), sends the ciphertexts and the blocks
it wants, and ranks the decrypted scores here. The service sees neither the query nor
the scores.
"""
from __future__ import annotations

import io

import numpy as np

from ..errors import InputError, SerializationError
from ..search.engine import QueryClient, SearchResult, check_k, plan_blocks
from ..search.index import MINILM, Layout
from ..service.protocol import BATCH_KIND
from ..service.search import QUERY_KIND
from ..wire import pack, unpack


class SearchMode:
    """Searches of one served index (see the module docstring)."""

    def __init__(self, client, index: str) -> None:
        self.client, self.name = client, index
        self.info = client._call("GET", f"/v1/indexes/{index}")
        blob = client._call("GET", f"/v1/indexes/{index}/layout", expect="bytes")
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            self.ids = [str(i) for i in arrays.pop("ids")]
            self.layout = Layout.from_arrays(int(self.info["slots"]), arrays)
        except (ValueError, KeyError, OSError) as exc:
            raise SerializationError(f"the layout of index {index!r} is malformed: "
                                     f"{exc}") from None
        self.query = QueryClient(self.info, self.layout, self.ids)
        self.last_cost: dict = {}
        self._embedder = None

    def embed(self, text: str) -> np.ndarray:
        """A text query's embedding, computed here with the index's model."""
        if self.info.get("model") != MINILM:
            raise InputError(f"index {self.name!r} was built from vectors, not texts: "
                             "search it with a vector")
        if self._embedder is None:
            from ..search.index import TextEmbedder

            self._embedder = TextEmbedder()
        return self._embedder([text])[0]

    def search(self, query, k: int = 10, *, probe: int | None = None,
               decoys: int = 0) -> SearchResult:
        k = check_k(k)
        vector = self.query.key_vector(self.embed(query) if isinstance(query, str)
                                       else query)
        blocks = plan_blocks(self.layout, vector, probe, decoys)
        cts = self.query.key.encrypt(vector, self.query.dim)
        body = pack(QUERY_KIND, {str(i): c for i, c in enumerate(cts)},
                    {"blocks": blocks, "fingerprint": self.info["fingerprint"]})
        reply = self.client._call("POST", f"/v1/indexes/{self.name}/search",
                                  content=body, expect="bytes")
        _, parts = unpack(reply, BATCH_KIND)
        replies = [parts.get(str(i)) for i in range(len(parts))]
        if len(replies) != len(blocks) or None in replies:
            raise SerializationError("the service sent a malformed search answer")
        out = self.query.rank(replies, blocks, k)
        out.cost = {"bytes_up": len(body), "bytes_down": len(reply), "blocks": len(blocks)}
        self.last_cost = out.cost
        return out

    def close(self) -> None:
        self.query.close()

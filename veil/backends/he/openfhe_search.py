"""Encrypted nearest-neighbour scoring: one CKKS query against a plaintext index.

The client's query ``q`` (dimension ``d``) is encrypted; the server holds the index
``D`` (``n x d``, plaintext) and returns ``D q`` encrypted, which only the client can
read. It is a ciphertext-by-plaintext matrix-vector product and nothing else: no
activation, no bootstrapping, no rotation and no evaluation key.

Packing (column packing with complex slots). The context uses OpenFHE's COMPLEX CKKS
data type, so a slot holds a complex number. The client sends ``ceil(d / 2)``
ciphertexts; ciphertext ``j`` holds ``q[2j] + i q[2j+1]`` in every slot. The index is
cut into blocks of ``slots`` documents; for block ``b`` the server keeps one plaintext
per ``j`` whose slot ``s`` holds ``D[s, 2j] - i D[s, 2j+1]`` (document ``b*slots + s``).
Since ``(a + ib)(u - iv) = (au + bv) + i(bu - av)``, the real part of
``sum_j ct_j * pt_bj`` is the score of document ``s`` over all ``d`` coordinates; the
imaginary part is discarded by the client. Per block: ``d/2`` plaintext products and
additions and one rescale, for ``slots`` documents (half the products of real packing).

Parameters (:class:`SearchParams`): ring 2^12 (2048 slots), a 60-bit first modulus and
one 40-bit scaling modulus (Q = 100 bits, under the 109 bits HE-standard 128-bit
security allows at 2^12 without special primes: BV key switching, which is never
used). Queries are fresh at two towers; products are at scale 2^80 and are rescaled to
one tower (2^40) before they leave, so a reply is a one-tower ciphertext, 32.5 bytes per
document. Error: the rescale's rounding dominates, about ``sqrt(N) * ||s|| / 2^40``
per score (measured below 1e-7 on unit vectors, :mod:`tests.test_search`); the
client also encrypts with its secret key (symmetric CKKS), whose noise is smaller than
public-key encryption's.

Untrusted bytes: the server checks every query ciphertext against a template compiled
from its own fresh ciphertext (:mod:`.validate`) before OpenFHE sees it; all of one
query's ciphertexts must carry one key tag.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ...compiler.params import SearchParams
from ...errors import EngineError, InputError, KeyMismatchError, SerializationError
from ..inputs import as_vector
from .native import release_native_memory
from .openfhe_native import (_SECURITY, deserialize_ciphertext, native_call, ofhe,
                             serialize_ciphertext)
from .validate import BlobChecker, TemplateError, compile_checker

_HEX = re.compile(rb"[0-9a-f]+")


def search_context(params: SearchParams):
    """The CryptoContext of ``params`` (OpenFHE shares one per parameter set)."""
    p = ofhe.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(1)
    p.SetScalingModSize(params.scaling_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetSecurityLevel(_SECURITY[params.security])
    p.SetRingDim(params.ring_dim)
    p.SetBatchSize(params.slots)
    p.SetScalingTechnique(ofhe.FIXEDMANUAL)
    p.SetKeySwitchTechnique(ofhe.BV)
    p.SetCKKSDataType(ofhe.COMPLEX)
    try:
        cc = ofhe.GenCryptoContext(p)
    except RuntimeError as exc:
        raise EngineError(f"OpenFHE rejected the search parameters {params}: {exc}") from exc
    if cc.GetRingDimension() != params.ring_dim:
        raise EngineError(f"OpenFHE chose ring {cc.GetRingDimension()} for {params}")
    for feature in (ofhe.PKE, ofhe.LEVELEDSHE):
        cc.Enable(feature)
    return cc


class QueryKey:
    """The client's side: a CKKS secret key (it never leaves this object), query
    encryption and score decryption. One key serves any number of queries."""

    def __init__(self, params: SearchParams) -> None:
        self.params = params
        self.cc = search_context(params)
        self._keys = native_call(EngineError, "key generation failed", self.cc.KeyGen)
        self.tag = str(self._keys.secretKey.GetKeyTag())

    def encrypt(self, vector, dim: int | None = None) -> list[bytes]:
        """``ceil(dim / 2)`` ciphertexts of ``vector`` (column packing, see the module
        docstring), encrypted under the secret key."""
        v = as_vector(vector, len(vector) if dim is None else dim)
        if v.shape[0] % 2:
            v = np.append(v, 0.0)
        slots = self.params.slots
        out = []
        for j in range(v.shape[0] // 2):
            pt = self.cc.MakeCKKSPackedPlaintext([complex(v[2 * j], v[2 * j + 1])] * slots)
            ct = native_call(EngineError, "encryption failed", self.cc.Encrypt,
                             self._keys.secretKey, pt)
            out.append(serialize_ciphertext(ct))
        return out

    def decrypt(self, replies: Sequence[bytes], count: int) -> np.ndarray:
        """The first ``count`` scores of the reply ciphertexts (in block order)."""
        slots = self.params.slots
        if len(replies) * slots < count:
            raise SerializationError(f"{len(replies)} reply ciphertexts cannot hold "
                                     f"{count} scores")
        out = np.empty(len(replies) * slots)
        for i, blob in enumerate(replies):
            ct = deserialize_ciphertext(bytes(blob))
            if str(ct.GetKeyTag()) != self.tag:
                raise KeyMismatchError("a reply was not computed on this key's query")
            pt = native_call(SerializationError, "a reply could not be decrypted",
                             self.cc.Decrypt, self._keys.secretKey, ct)
            pt.SetLength(slots)
            out[i * slots:(i + 1) * slots] = np.real(pt.GetCKKSPackedValue())
        return out[:count]

    def close(self) -> None:
        self._keys = None
        release_native_memory()


def fresh_template(params: SearchParams):
    """A fresh query ciphertext from a throwaway key (then dropped): its bytes (what an
    honest client's ciphertexts look like, coefficients and tag aside), its tag, and the
    ciphertext object itself."""
    client = QueryKey(params)
    try:
        pt = client.cc.MakeCKKSPackedPlaintext([0j] * params.slots)
        ct = native_call(EngineError, "encryption failed", client.cc.Encrypt,
                         client._keys.secretKey, pt)
        return serialize_ciphertext(ct), client.tag, ct
    finally:
        client.close()


class BlockScorer:
    """The server's side: the index's blocks encoded as plaintexts, and scoring.

    ``matrix`` is ``(n, d)``; block ``b`` covers rows ``b*slots .. (b+1)*slots - 1``
    (the last one zero-padded). Blocks are encoded on first use and kept while they fit
    ``cache_bytes`` (least recently used go first); :meth:`prepare` encodes ahead.
    ``threads`` score blocks in parallel (OpenFHE releases the GIL while it computes).
    """

    def __init__(self, params: SearchParams, matrix: np.ndarray, *, threads: int = 2,
                 cache_bytes: int = 8 << 30) -> None:
        m = np.asarray(matrix)
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.floating) or not np.isfinite(m).all():
            raise InputError("the index must be a finite (n, d) matrix")
        if m.shape[1] % 2:
            m = np.concatenate([m, np.zeros((m.shape[0], 1), m.dtype)], axis=1)
        self.params, self.dim, self.count = params, int(matrix.shape[1]), int(m.shape[0])
        self.cc = search_context(params)
        self._matrix = m
        self.blocks = max(1, -(-self.count // params.slots))
        self.pairs = m.shape[1] // 2
        self.threads = max(1, int(threads))
        # one plaintext: two towers of ring_dim words
        self.block_bytes = self.pairs * 2 * params.ring_dim * 8
        self._cap = max(1, int(cache_bytes) // self.block_bytes)
        self._cache: dict[int, list] = {}
        self._lock = threading.Lock()
        template, tag, self._own = fresh_template(params)
        try:
            self._checker: BlobChecker = compile_checker("query ciphertext", template, tag,
                                                         params.ring_dim)
        except TemplateError as exc:
            raise EngineError(f"cannot build query checks with this OpenFHE: {exc}") from exc
        self.query_bytes = self._checker.length

    # -- the index's plaintexts ---------------------------------------------------------
    def _encode(self, b: int) -> list:
        slots = self.params.slots
        rows = self._matrix[b * slots:(b + 1) * slots].astype(np.float64)
        if rows.shape[0] < slots:
            rows = np.concatenate([rows, np.zeros((slots - rows.shape[0], rows.shape[1]))])
        cols = rows[:, 0::2] - 1j * rows[:, 1::2]          # (slots, pairs)
        return [self.cc.MakeCKKSPackedPlaintext(cols[:, j].tolist())
                for j in range(self.pairs)]

    def _block(self, b: int) -> list:
        with self._lock:
            pts = self._cache.pop(b, None)
            if pts is not None:
                self._cache[b] = pts           # most recently used last
                return pts
        pts = self._encode(b)
        with self._lock:
            self._cache[b] = pts
            while len(self._cache) > self._cap:
                self._cache.pop(next(iter(self._cache)))
        return pts

    def prepare(self, blocks: Sequence[int] | None = None) -> int:
        """Encode ``blocks`` (default: all that fit the cache) now; returns how many
        are cached."""
        todo = list(range(self.blocks)) if blocks is None else list(blocks)
        for b in todo[:self._cap]:
            self._block(b)
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.block_bytes

    # -- queries ------------------------------------------------------------------------
    def check(self, query: Sequence[bytes]) -> str:
        """Refuse a malformed query before OpenFHE reads it; returns its key tag."""
        if len(query) != self.pairs:
            raise InputError(f"this index takes queries of {self.dim} dimensions "
                             f"({self.pairs} ciphertexts); got {len(query)} ciphertexts")
        first = memoryview(query[0])
        if first.nbytes != self._checker.length:
            self._checker.check(first, "0" * self._checker.tag_length)   # says why
        at = self._checker.tag_offsets[0]
        tag = bytes(first[at:at + self._checker.tag_length])
        if not _HEX.fullmatch(tag):
            raise SerializationError("the query ciphertext has a malformed key tag")
        for blob in query:
            try:
                self._checker.check(blob, tag.decode("ascii"))
            except KeyMismatchError:
                raise KeyMismatchError("the query's ciphertexts were made under different "
                                       "keys") from None
        return tag.decode("ascii")

    def _adopt(self, ct, tag: str):
        """``ct`` as the sum of a zero made in this process and itself. Arithmetic on
        ciphertexts OpenFHE has just deserialized runs about 5x slower than on ones made
        in-process (measured: a plaintext product 200 us instead of 36 us at ring 2^12,
        an addition 175 us instead of 17 us; ``Compress``, which re-binds the HE
        sessions' inputs to their context, does not help here); the sum takes its first
        operand's in-process form, and the value is the client's (adding zero)."""
        zero = self.cc.EvalSub(self._own, self._own)
        zero.SetKeyTag(tag)
        return native_call(EngineError, "scoring failed", self.cc.EvalAdd, zero, ct)

    def score(self, query: Sequence[bytes], blocks: Sequence[int] | None = None
              ) -> list[bytes]:
        """One reply ciphertext per block in ``blocks`` (default: all, in order)."""
        todo = list(range(self.blocks)) if blocks is None else [int(b) for b in blocks]
        if any(not 0 <= b < self.blocks for b in todo):
            raise InputError(f"this index has blocks 0..{self.blocks - 1}")
        tag = self.check(query)
        cts = [self._adopt(deserialize_ciphertext(bytes(blob)), tag) for blob in query]

        def one(b: int) -> bytes:
            pts = self._block(b)
            acc = native_call(EngineError, "scoring failed", self.cc.EvalMult, cts[0], pts[0])
            for ct, pt in zip(cts[1:], pts[1:]):
                self.cc.EvalAddInPlace(acc, self.cc.EvalMult(ct, pt))
            self.cc.RescaleInPlace(acc)
            return serialize_ciphertext(acc)

        if self.threads == 1 or len(todo) == 1:
            return [one(b) for b in todo]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(one, todo))

"""The client-side tokenizer of all-MiniLM-L6-v2 (needs ``tokenizers``, not torch).

Texts become the model's input array ``(B, 2, seq_len)`` float64: row 0 the WordPiece
token ids (``[CLS] ... [SEP]``, zero-padded on the right, truncated to ``seq_len``
tokens including the two special ones), row 1 the attention mask (1 for every real
token, ``[CLS]`` and ``[SEP]`` included, 0 for padding). That is what the Hugging Face
tokenizer of the model gives with ``padding="max_length", truncation=True,
max_length=seq_len`` (tests/test_text.py checks it). The ids are below 2**15, exact in
float64 (and float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from . import TextDependencyError, model_dir

DEFAULT_SEQ_LEN = 128
MAX_SEQ_LEN = 512          # the model's position embeddings


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) \
            or not 2 <= seq_len <= MAX_SEQ_LEN:
        raise InputError(f"seq_len must be an int in [2, {MAX_SEQ_LEN}], got {seq_len!r}")
    return int(seq_len)


class Tokenizer:
    """WordPiece tokenizer of all-MiniLM-L6-v2, from the model's ``tokenizer.json``.

    Args:
        seq_len: the default length of :meth:`encode`'s output (128).
        path: a ``tokenizer.json``; the installed model's by default.

    Raises:
        TextDependencyError: ``tokenizers`` or the model package is not installed.
    """

    def __init__(self, seq_len: int = DEFAULT_SEQ_LEN,
                 path: str | Path | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise TextDependencyError("veil.text's tokenizer needs the 'tokenizers' "
                                      "package: pip install tokenizers (it comes with "
                                      "transformers)") from None
        self.seq_len = _check_seq_len(seq_len)
        self.path = Path(path) if path is not None else model_dir() / "tokenizer.json"
        self._tok = _HFTokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._truncation = None
        self.pad_id = 0

    def _ids(self, texts: list[str], seq_len: int) -> list[list[int]]:
        if self._truncation != seq_len:
            self._tok.enable_truncation(max_length=seq_len)
            self._truncation = seq_len
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def encode(self, texts: list[str] | str, seq_len: int | None = None) -> np.ndarray:
        """Token ids and attention masks of ``texts``: float64 ``(B, 2, seq_len)``
        (``B = 1`` for one string).

        Raises:
            InputError: ``texts`` is not a string or a list of strings, or ``seq_len``
                is not in [2, 512].
        """
        seq_len = self.seq_len if seq_len is None else _check_seq_len(seq_len)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a string or a list of strings")
        out = np.zeros((len(texts), 2, seq_len), dtype=np.float64)
        for i, ids in enumerate(self._ids(texts, seq_len)):
            out[i, 0, :len(ids)] = ids
            out[i, 1, :len(ids)] = 1.0
        return out

    __call__ = encode


#: the tokenizers a text model may name (``veil_text["tokenizer"]``)
TOKENIZERS = ("all-MiniLM-L6-v2",)


def tokenizer_for(spec) -> Tokenizer:
    """The tokenizer a model's ``veil_text`` spec names (``{"tokenizer", "seq_len"}``)."""
    try:
        name, seq_len = spec["tokenizer"], spec["seq_len"]
    except (TypeError, KeyError):
        raise InputError(f"a text spec is {{'tokenizer', 'seq_len'}}, not {spec!r}") from None
    if name not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {name!r}; veil has {', '.join(TOKENIZERS)}")
    return Tokenizer(int(seq_len))

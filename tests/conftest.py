import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="session")
def digits_cnn():
    """The demo's digits CNN, trained once per test session (about 3 s)."""
    from models import trained_digits_cnn

    return trained_digits_cnn()


@pytest.fixture(scope="session")
def compiled_cnn(digits_cnn):
    import veil

    model, (xtr, xte, ytr, yte) = digits_cnn
    return veil.compile(model, xtr)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

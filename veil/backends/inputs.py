"""The one input contract of veil: what a caller may pass as model inputs, in every mode.

:func:`as_inputs` is the single place that decides it, for ``compiled.run`` (every mode),
the SDK (``Client.predict``/``classify``/``encrypt``/``infer_batch`` in he, tee and
mpc), the HE :class:`~veil.deploy.client.ModelClient` and ``veil predict``:

- one sample of the model's input shape is ONE input (``single=True``); so is a flat
  vector of exactly that many values when the input shape has several axes (the SDK
  always took it so);
- an array ``(B, *input_shape)`` with ``B >= 1`` is a batch (``single=False``), a batch
  of one included;
- anything else is refused with one :class:`~veil.errors.InputError` whose wording is
  the same in every mode: a wrong shape (a 0-d scalar included), an empty batch,
  non-numeric values, NaN or infinity.

A mode may cap a batch (one HE ciphertext, one sealed TEE message, one MPC request):
``max_batch`` refuses larger ones with the same wording everywhere. :func:`check_batch`
is the batch-only form that backends apply to what arrives on their wire.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def _shape_text(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def shape_error(got: tuple[int, ...], shape: tuple[int, ...]) -> InputError:
    """The refusal of an input of shape ``got`` by a model of input shape ``shape``."""
    return InputError(f"input has shape {tuple(got)}; this model was compiled for {shape} "
                      f"(one input) or a batch (B, {_shape_text(shape)})")


def _numeric(x) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input is not numeric: {exc}") from None


def _empty_error(shape: tuple[int, ...]) -> InputError:
    return InputError(f"the batch is empty: give one input of shape {shape} or a batch "
                      f"(B, {_shape_text(shape)}) with B >= 1")


def _checked(batch: np.ndarray, shape: tuple[int, ...], max_batch: int | None) -> np.ndarray:
    if max_batch is not None and len(batch) > max_batch:
        raise InputError(f"a batch here holds at most {max_batch} inputs, not {len(batch)}: "
                         "use infer_batch (or predict), which splits it")
    if not np.isfinite(batch).all():
        raise InputError("input contains NaN or infinity")
    return batch


def as_vector(x, dim: int) -> np.ndarray:
    """One input of shape ``(dim,)`` (a search query): :func:`as_inputs`' contract, a
    batch of one allowed and larger ones refused."""
    batch, _ = as_inputs(x, (dim,))
    if len(batch) != 1:
        raise InputError(f"one vector at a time, not a batch of {len(batch)}")
    return batch[0]


def as_inputs(x, input_shape, *, max_batch: int | None = None) -> tuple[np.ndarray, bool]:
    """``(batch, single)``: ``x`` as a float64 batch of shape ``(B, *input_shape)``,
    and whether the caller gave one input (so one output goes back, not a batch).

    Raises:
        InputError: the wording of the module docstring's refusals, the same in every
            mode.
    """
    shape = tuple(int(d) for d in input_shape)
    arr = _numeric(x)
    if arr.ndim >= 1 and len(arr) == 0 and arr.shape != shape:    # [], (0, *shape)
        raise _empty_error(shape)
    if arr.shape == shape:
        batch, single = arr[None], True
    elif arr.ndim == 1 and len(shape) > 1 and arr.size == math.prod(shape):
        batch, single = arr.reshape((1, *shape)), True
    elif arr.ndim == len(shape) + 1 and arr.shape[1:] == shape:
        batch, single = arr, False
    else:
        raise shape_error(arr.shape, shape)
    return _checked(batch, shape, max_batch), single


def check_batch(xs, input_shape: tuple[int, ...], max_batch: int | None = None) -> np.ndarray:
    """A float64 batch of shape ``(n, *input_shape)``, 1 <= n <= max_batch, all finite:
    :func:`as_inputs` for what must already be a batch (a backend's wire)."""
    shape = tuple(int(d) for d in input_shape)
    arr = _numeric(xs)
    if arr.ndim >= 1 and len(arr) == 0:
        raise _empty_error(shape)
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape:
        raise shape_error(arr.shape, shape)
    return _checked(arr, shape, max_batch)

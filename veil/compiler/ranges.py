"""The calibrated input range: per-feature bounds on what a model's inputs may be.

HE's polynomial activations are accurate only on the ranges they were fitted on, and
those come from the calibration batch; an input far outside what calibration showed
drives them off their range, where a polynomial diverges from the function it stands
for. So the HE client refuses such inputs (or clamps them when asked: ``clip``), and
``simulate``, which predicts HE, does exactly the same with the same functions here.

The bounds (:meth:`InputRange.calibrate`) come at one of three granularities:

- per feature (``per = "element"``) when a sample is a flat vector of at most
  :data:`PER_ELEMENT_MAX` values: tabular features, whose scales differ (one
  breast-cancer feature spans 0.05-0.16, another 140-2500);
- per index of the first axis (``per = "channel"``) when a sample has two axes or more:
  an image's channels (a text model's token ids and mask). The positions of a channel
  share one scale and a convolution shares its weights across them, so a position's
  own extremes add little but false refusals: per-pixel bounds from 256 Fashion-MNIST
  training images refuse 58 of the first 500 test images (5 from 2000 images), the
  channel's bounds none. It also keeps the manifest small;
- one pair for every value (``per = "model"``, the only range before per-feature
  bounds) for a flat vector of more than :data:`PER_ELEMENT_MAX` values, to keep the
  manifest small.

Each feature's (channel's) [min, max] over the calibration batch is widened on each
side by ``margin`` times its width (the margin of the activation ranges). A feature
constant over the calibration batch has no width of its own: it is widened by
``margin`` times the width of the whole batch (all features together, the single
range before per-feature bounds), or by ``margin * 1e-6`` when the whole batch is one
constant (as before). Its range stays narrow, but no narrower than the spread the
model saw elsewhere.

A model that fits nothing over a range (no polynomial activation, no bootstrap: a
linear model whose sigmoid is its client-side output head) computes every input
exactly under HE: its bounds are not enforced (``enforced``, the manifest's
``range_enforced: false``), so nothing is refused or clamped.

They travel in the key manifest's ``input`` entry (:meth:`InputRange.to_manifest`):
``range`` keeps the overall ``[lo, hi]`` pair (what older clients check) and
``bounds`` = ``{"per": "element" | "channel", "lo": [...], "hi": [...]}`` holds the
per-feature lists, flattened in C order. A manifest without ``bounds`` (written before
them) gives one pair for every feature (``per = "model"``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import BundleError, InputClippedWarning, InputRangeError

PER_ELEMENT_MAX = 4096     # flat samples with more values get one pair for all
MIN_WIDTH = 1e-6           # the width of a calibration batch that is one constant
PER = ("element", "channel", "model")
_LISTED = 5                # rows / features a message names before "..."


@dataclass(frozen=True, eq=False)
class InputRange:
    """Bounds ``lo <= x <= hi`` for every value of a sample of shape ``shape``.

    ``lo`` and ``hi`` broadcast to ``shape``: of ``shape`` itself (``per="element"``),
    of shape ``(C, 1, ...)`` (``"channel"``) or scalars (``"model"``).
    """

    lo: np.ndarray
    hi: np.ndarray
    shape: tuple[int, ...]
    per: str
    # False: the HE model fits nothing over a range (affine layers only, its output
    # head on the client), so it computes any input exactly and nothing is refused or
    # clamped; the bounds stay for information
    enforced: bool = True

    # -- making and storing ------------------------------------------------------------
    @classmethod
    def calibrate(cls, calibration: np.ndarray, margin: float, enforced: bool = True
                  ) -> "InputRange":
        """The bounds of a calibration batch ``(B, *shape)``, widened by ``margin``."""
        cal = np.asarray(calibration, dtype=np.float64)
        shape = tuple(cal.shape[1:])
        per = ("channel" if len(shape) >= 2 else
               "element" if int(np.prod(shape)) <= PER_ELEMENT_MAX else "model")
        kept = {"element": range(1, cal.ndim), "channel": (1,), "model": ()}[per]
        axes = tuple(a for a in range(cal.ndim) if a not in kept)
        lo, hi = (f(cal, axis=axes, keepdims=True)[0] for f in (np.min, np.max))
        if per == "model":
            lo, hi = lo.reshape(()), hi.reshape(())
        width = hi - lo
        floor = max(float(cal.max() - cal.min()), MIN_WIDTH)
        pad = margin * np.where(width > 0, width, floor)
        return cls(lo - pad, hi + pad, shape, per, enforced)

    @classmethod
    def from_manifest(cls, entry: dict) -> "InputRange":
        """The bounds of a manifest's ``input`` entry (``bounds`` or the old pair)."""
        try:
            shape = tuple(int(d) for d in entry["shape"])
            bounds = entry.get("bounds")
            enforced = bool(entry.get("range_enforced", True))
            if bounds is None:
                lo, hi = (float(v) for v in entry["range"])
                return cls(np.asarray(lo), np.asarray(hi), shape, "model")
            per = bounds["per"]
            sizes = {"element": int(np.prod(shape)), "channel": shape[0] if shape else 0}
            if per not in sizes:
                raise ValueError(f"bounds per {per!r}")
            view = shape if per == "element" else (shape[0],) + (1,) * (len(shape) - 1)
            lo, hi = (np.asarray(bounds[k], dtype=np.float64) for k in ("lo", "hi"))
            if lo.shape != (sizes[per],) or hi.shape != (sizes[per],):
                raise ValueError(f"{sizes[per]} bounds expected per side")
            if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
                raise ValueError("bounds must be finite with lo <= hi")
            return cls(lo.reshape(view), hi.reshape(view), shape, per, enforced)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the manifest's input range is malformed: {exc}") from None

    def to_manifest(self) -> dict:
        """``range`` (the overall pair) and, with per-feature bounds, ``bounds``."""
        out = {"range": list(self.overall)}
        if not self.enforced:
            out["range_enforced"] = False
        if self.per != "model":
            out["bounds"] = {"per": self.per, "lo": [float(v) for v in self.lo.ravel()],
                             "hi": [float(v) for v in self.hi.ravel()]}
        return out

    @property
    def overall(self) -> tuple[float, float]:
        """The smallest single ``(lo, hi)`` pair that holds every feature's bounds."""
        return float(np.min(self.lo)), float(np.max(self.hi))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``lo`` and ``hi`` for every value of one sample (arrays of ``shape``)."""
        return np.broadcast_to(self.lo, self.shape), np.broadcast_to(self.hi, self.shape)

    # -- checking and clipping ---------------------------------------------------------
    def beyond(self, batch: np.ndarray) -> np.ndarray:
        """Boolean mask of ``batch`` ``(n, *shape)``: True where a value is out of the
        calibrated bounds (enforced or not)."""
        return (batch < self.lo) | (batch > self.hi)

    def outside(self, batch: np.ndarray) -> np.ndarray:
        """Boolean mask of ``batch`` ``(n, *shape)``: True where a value is out of range
        and the range is enforced (what is refused, or clamped with ``clip``)."""
        mask = self.beyond(batch)
        return mask if self.enforced else np.zeros_like(mask)

    def check(self, batch: np.ndarray) -> None:
        """Raise :class:`InputRangeError` if a value of ``batch`` is out of range."""
        mask = self.outside(batch)
        if mask.any():
            raise self._error(batch, mask)

    def clip(self, batch: np.ndarray, *, warn: bool = True) -> np.ndarray:
        """``batch`` clamped into the bounds; with ``warn``, an
        :class:`InputClippedWarning` counts the values and rows that changed."""
        mask = self.outside(batch)
        if not mask.any():
            return batch
        if warn:
            rows = np.flatnonzero(mask.reshape(len(batch), -1).any(axis=1))
            warnings.warn(f"clipped {int(mask.sum())} input values in {len(rows)} of "
                          f"{len(batch)} rows ({_listed(rows)}) to the model's calibrated "
                          "input range; their outputs are the model's on the clipped "
                          "inputs", InputClippedWarning, stacklevel=3)
        return np.clip(batch, self.lo, self.hi)

    def _error(self, batch: np.ndarray, mask: np.ndarray) -> InputRangeError:
        where = np.argwhere(mask)                 # (row, *feature) in C order
        rows = tuple(int(r) for r in np.unique(where[:, 0]))
        features = tuple(sorted({tuple(int(i) for i in w[1:]) for w in where}))
        first = tuple(where[0])
        lo, hi = (float(b[first[1:]]) for b in self.bounds())
        more = (f" ({len(where)} values out of range in all: rows {_listed(rows)}; "
                f"features {_listed([_feature(f) for f in features])})"
                if len(where) > 1 else "")
        return InputRangeError(
            f"input row {first[0]}, feature {_feature(first[1:])}: value "
            f"{float(batch[first]):.6g} is outside the calibrated range [{lo:.6g}, "
            f"{hi:.6g}]{more}. HE's polynomial activations are only accurate on the "
            "range calibration showed: pass clip=True to clamp inputs into it, or compile "
            "again with calibration data that covers these inputs",
            rows=rows, features=features)


def _feature(index) -> str:
    """A feature's index as a message names it: ``12`` flat, ``(0, 5, 3)`` otherwise."""
    index = tuple(int(i) for i in index)
    return str(index[0]) if len(index) == 1 else str(index)


def _listed(items) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:_LISTED]) + (", ..." if len(items) > _LISTED else "")

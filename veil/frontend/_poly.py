"""Modules that declare their own polynomial (trained polynomial activations).

A module opts in by defining ``veil_chebyshev()``, returning ``(coeffs, lo, hi)``: the
Chebyshev coefficients (numpy convention) of the function it computes, on [lo, hi].
Such a module becomes one ``POLY`` node with exactly those coefficients, so the
compiled polynomial is the trained one (same degree, same function) and the
compiler's activation fitting never touches it. ``veil.finetune.PolyAct`` is the
implementation veil ships; the protocol is duck-typed so that the frontend does not
import a layer above it.

torch.fx would otherwise trace *into* such a module (its Chebyshev recurrence
multiplies two different tensors, which veil cannot express), so tracing uses a
tracer that keeps these modules as leaves.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..ir import Op
from ._builder import GraphBuilder, Site

#: Name of the method a module defines to be compiled as its own polynomial.
PROTOCOL = "veil_chebyshev"


def is_poly_module(module: Any) -> bool:
    """True when ``module`` declares its polynomial through :data:`PROTOCOL`."""
    return callable(getattr(module, PROTOCOL, None))


def handler(module: Any) -> Callable[[GraphBuilder, Site, Any, str], str] | None:
    """The module handler for a polynomial module, or None for any other module."""
    return poly_module if is_poly_module(module) else None


def poly_module(b: GraphBuilder, site: Site, module: Any, x: str) -> str:
    """One POLY node carrying the module's own Chebyshev series on its own domain."""
    try:
        coeffs, lo, hi = getattr(module, PROTOCOL)()
        coeffs = np.asarray(coeffs, dtype=np.float64)
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError) as exc:
        raise site.error(f"{PROTOCOL}() must return (coeffs, lo, hi): {exc}") from exc
    if coeffs.ndim != 1 or coeffs.size < 2:
        raise site.error(f"{PROTOCOL}() returned coefficients of shape {coeffs.shape}; "
                         "expected a 1-D series of degree >= 1")
    if not (np.all(np.isfinite(coeffs)) and np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise site.error(f"{PROTOCOL}() returned a non-finite series or an empty domain "
                         f"[{lo}, {hi}]")
    attrs = {"coeffs": tuple(coeffs.tolist()), "lo": lo, "hi": hi,
             "source": getattr(module, "veil_source", "poly")}
    return b.add(site.node, Op.POLY, [x], attrs)


def symbolic_trace(model: Any) -> Any:
    """``torch.fx.symbolic_trace`` that keeps polynomial modules as leaf calls."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            return is_poly_module(m) or super().is_leaf_module(m, qualname)

    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)

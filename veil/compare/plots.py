"""PNG plots of a comparison (matplotlib, optional: ``pip install 'veil[compare]'``).

Four figures, each with one group of bars per workload and one bar per mode:
latency (p50 bar, p95 whisker, log scale), throughput (log scale), bytes on the wire
per single-input inference (client->server, server->client, MPC's party-to-party and
dealer traffic; log scale) and accuracy next to plain's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..modes import SERVED

COLORS = {"plain": "#7f7f7f", "simulate": "#bcbd22", "tee": "#2ca02c", "mpc": "#1f77b4",
          "he": "#d62728"}
HATCHES = ("", "//", "..", "xx")      # several bars of one mode (bytes up, down, ...)


def available() -> str | None:
    """None when matplotlib can be used, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'veil[compare]')"
    return None


def _bars(ax, workloads, values, log=True, errors=None):
    """Grouped bars: ``values[w][mode]`` (None: skipped)."""
    modes = list(dict.fromkeys(m for w in workloads for m in values[w]))
    width = 0.8 / max(len(modes), 1)
    seen: dict[str, int] = {}
    for j, m in enumerate(modes):
        kind = m.split()[0]
        hatch = HATCHES[seen.get(kind, 0) % len(HATCHES)]
        seen[kind] = seen.get(kind, 0) + 1
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(workloads))]
        ys = [np.nan if values[w].get(m) is None else values[w][m] for w in workloads]
        err = None
        if errors is not None:
            err = [[0] * len(workloads),
                   [max(errors[w][m] - y, 0) if y == y and errors[w].get(m) else 0
                    for w, y in zip(workloads, ys)]]
        ax.bar(xs, ys, width, label=m, yerr=err, color=COLORS.get(kind), capsize=3,
               hatch=hatch, edgecolor="white")
    ax.set_xticks(range(len(workloads)), workloads)
    if log:
        ax.set_yscale("log")
    # outside the axes, to the right: inside, "best" still lands on a bar when every
    # position holds one (the accuracy plot's bars all reach ~1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3, which="both")


def _traffic(modes: dict) -> dict:
    t = {}
    for m, r in modes.items():
        if m in SERVED:
            t[f"{m} up"], t[f"{m} down"] = r["bytes_up"], r["bytes_down"]
        if m == "mpc":
            t["mpc parties"] = r["party_bytes_per_input"]
            t["mpc dealer"] = r["dealer_bytes_per_input"]
    return t


def write(result: dict, out: Path) -> list[str]:
    """Write the plots into ``out`` and return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ws = [w["name"] for w in result["workloads"]]
    by = {w["name"]: w["modes"] for w in result["workloads"]}

    def per(key: str, scale: float = 1.0) -> dict:
        return {w: {m: None if r[key] is None else r[key] * scale
                    for m, r in by[w].items()} for w in ws}
    figures = (
        ("latency.png", "Single-input latency, end to end",
         "ms per input (p50 bar, p95 whisker; log)",
         dict(values=per("latency_p50_s", 1e3), errors=per("latency_p95_s", 1e3))),
        ("throughput.png", f"Throughput, batches of {result['config']['batch']} (HE: "
         "see the report)", "inputs / s (log)", dict(values=per("throughput_per_s"))),
        ("bytes.png", "Bytes on the wire", "bytes per single-input inference (log)",
         dict(values={w: _traffic(by[w]) for w in ws})),
        ("accuracy.png", "Accuracy", "accuracy on the same inputs",
         dict(values=per("accuracy"), log=False)),
    )
    names = []
    for name, title, ylabel, kw in figures:
        fig = figure(plt, ws, title, ylabel, kw, accuracy=name == "accuracy.png")
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def figure(plt, workloads: list[str], title: str, ylabel: str, kw: dict, *,
           accuracy: bool = False):
    """One plot's figure (the caller saves and closes it)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if any(kw["values"].values()):
        _bars(ax, workloads, **kw)
    ax.set(title=title, ylabel=ylabel)
    if accuracy:
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    return fig

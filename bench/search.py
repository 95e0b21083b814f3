"""Private semantic search (issue 21): cost of an encrypted query, and its quality.

    python bench/search.py [--sizes 10000,100000,1000000] [--dim 384] [--queries 3]
                           [--clusters-1m] [--real N] [--tee-max 100000] [--threads 2]

Cost (synthetic corpora of unit vectors, ``--sizes`` x ``--dim``, seed 0): for each size
a flat index, its blocks encoded once (``prepare``, timed, with the plaintexts' memory),
then ``--queries`` encrypted top-10 searches in this process: the client's encryption,
the server's scoring of every block (the time targets are about; ``--threads``
threads, OpenFHE releasing the GIL), the client's decryption and ranking, the bytes up
(query ciphertexts) and down (one ciphertext per block), evaluation-key bytes (none
exist), and whether the top-10 equals plaintext's. Plain (numpy) and, up to
``--tee-max`` documents, the TEE variant (the index compiled as one MatMul and run in a
local enclave; sealed request and answer) are timed beside. ``--clusters-1m`` adds the
clustered 1M index (k-means into n / 2048 clusters; a query probes the 8 clusters whose
centroids are nearest, hidden among 8 random decoys): server time with the blocks
encoded (a served index encodes all of them once it is up) and on first use, bytes down.

``--service N`` times N documents end to end through ``veil serve --index`` and the SDK.

Quality (``--real N``): the first N short fortunes (Debian ``fortunes``) embedded with
MiniLM-L6, 50 other fortunes as queries: recall@10 of the encrypted exact scan against
plaintext's exact top-10 (must be 1), and of clustered searches (sqrt(N) clusters, each
document in its nearest 1 or 2 (``spill``) clusters, probe 1, 2, 4, 8) against it.

Tiptoe's published figures (SOSP 2023) sit beside. Writes bench/results/search.json and
bench/results/search.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results"

TARGETS = {100_000: (1.0, 5.0), 1_000_000: (10.0, 40.0)}     # server s, MB down
CLUSTERED_TARGET = (2.0, 10.0)
KEY_TARGET_MB = 64
TIPTOE = ("Tiptoe (Henzinger et al., SOSP 2023), published: 360 M documents, about 145 "
          "core-seconds of server time and about 57 MiB of traffic per query (clustered; "
          "about 0.4 core-microseconds per document)")


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 100_000):
        part = rng.standard_normal((min(100_000, n - i), d)).astype(np.float32)
        out[i:i + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def cost_row(n: int, args) -> dict:
    from veil.backends.he.openfhe_search import BlockScorer, QueryKey
    from veil.compiler.params import SearchParams
    from veil.search import Searcher, build_index
    from veil.search.engine import top_k

    p = SearchParams()
    vectors = unit_vectors(n, args.dim)
    index = build_index(vectors, normalize=False)
    base = rss_mb()
    t = time.perf_counter()
    scorer = BlockScorer(p, index.matrix(), threads=args.threads)
    scorer.prepare()
    prepare_s = time.perf_counter() - t
    row = {"n": n, "dim": args.dim, "blocks": scorer.blocks, "prepare_s": prepare_s,
           "plaintext_mb": scorer.cached_bytes / 2 ** 20, "rss_growth_mb": rss_mb() - base}
    key = QueryKey(p)
    queries = unit_vectors(args.queries, args.dim, seed=1)
    enc, server, dec, plain_s, same = [], [], [], [], []
    docs = index.layout.docs(range(scorer.blocks))
    for q in queries:
        t0 = time.perf_counter()
        query = key.encrypt(q)
        t1 = time.perf_counter()
        replies = scorer.score(query)
        t2 = time.perf_counter()
        got = top_k(key.decrypt(replies, len(docs)), docs, 10, index.ids)
        t3 = time.perf_counter()
        ref = top_k(vectors.astype(np.float64) @ q, np.arange(n), 10, index.ids)
        plain_s.append(time.perf_counter() - t3)
        enc.append(t1 - t0), server.append(t2 - t1), dec.append(t3 - t2)
        same.append(got.ids == ref.ids)
    row.update({"encrypt_s": float(np.median(enc)), "server_s": float(np.median(server)),
                "server_s_all": server, "decrypt_rank_s": float(np.median(dec)),
                "plain_s": float(np.median(plain_s)),
                "up_mb": sum(len(c) for c in query) / 2 ** 20,
                "down_mb": sum(len(r) for r in replies) / 2 ** 20, "keys_mb": 0.0,
                "top10_equal": f"{sum(same)}/{len(same)}",
                "server_us_per_doc": float(np.median(server)) / n * 1e6})
    key.close()
    del scorer, replies, query
    gc.collect()
    if n <= args.tee_max:
        s = Searcher(index)
        s.search(queries[0], 10, "tee")              # compiles and starts the enclave
        t = time.perf_counter()
        outs = [s.search(q, 10, "tee") for q in queries]
        row["tee_s"] = (time.perf_counter() - t) / len(queries)
        row["tee_equal"] = all(o.ids == s.search(q, 10, "plain").ids
                               for o, q in zip(outs, queries))
        s.close()
    return row


def clustered_row(n: int, args) -> dict:
    from veil.search import Searcher, build_index

    vectors = unit_vectors(n, args.dim)
    t = time.perf_counter()
    index = build_index(vectors, normalize=False, clusters=max(1, n // 2048))
    build_s = time.perf_counter() - t
    s = Searcher(index, threads=args.threads)
    client, scorer = s.client(), s.scorer()
    queries = unit_vectors(args.queries + 1, args.dim, seed=2)
    cold, warm, asked, down = [], [], [], []
    for q in queries:
        blocks = client.plan(q, probe=8, decoys=8)
        query = client.encrypt(q)
        t = time.perf_counter()
        scorer.score(query, blocks)                 # blocks encoded on first use
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        replies = scorer.score(query, blocks)       # encoded: a server after `prepare`
        warm.append(time.perf_counter() - t)
        assert client.rank(replies, blocks, 10).ids
        asked.append(len(blocks))
        down.append(sum(len(r) for r in replies))
    row = {"n": n, "clusters": len(index.layout.cluster_blocks), "build_s": build_s,
           "blocks_total": index.layout.blocks, "probe": 8, "decoys": 8,
           "warm_server_s": float(np.median(warm)), "cold_server_s": float(np.median(cold)),
           "blocks_asked": float(np.median(asked)),
           "down_mb": float(np.median(down)) / 2 ** 20,
           "up_mb": sum(len(c) for c in query) / 2 ** 20}
    s.close()
    return row


def service_row(n: int, args) -> dict:
    """End to end through ``veil serve --index`` on loopback and the SDK: the latency a
    user sees (embedding aside), with the 24 MB upload and the worker hop."""
    import subprocess
    import tempfile

    from veil.sdk import Client
    from veil.search import build_index
    from veil.service.auth import KeyStore

    vectors = unit_vectors(n, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        build_index(vectors, normalize=False).save(Path(tmp) / "i.npz")
        keys = KeyStore(Path(tmp) / "store")
        token = keys.create("bench")
        keys.close()
        proc = subprocess.Popen(
            [sys.executable, "-m", "veil.service", "--index", f"docs={tmp}/i.npz",
             "--store", f"{tmp}/store", "--listen", "127.0.0.1:0",
             "--memory-budget", str(16 << 30)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        try:
            url = proc.stdout.readline().split()[-1]
            with Client(url, index="docs", api_key=token, timeout=600) as c:
                queries = unit_vectors(args.queries + 1, args.dim, seed=3)
                c.search(queries[0], 10)       # blocks encoded (the worker's start-up)
                times, costs = [], []
                for q in queries[1:]:
                    t = time.perf_counter()
                    costs.append(c.search(q, 10).cost)
                    times.append(time.perf_counter() - t)
        finally:
            proc.terminate()
            proc.wait(60)
    return {"n": n, "end_to_end_s": float(np.median(times)), "times": times,
            "up_mb": costs[0]["bytes_up"] / 2 ** 20,
            "down_mb": costs[0]["bytes_down"] / 2 ** 20}


def quality(n: int, args) -> dict:
    from veil.search import Searcher, build_index
    from veil.search.index import MINILM, embed_texts
    from veil.text.datasets import fortunes

    texts = fortunes(n + 50)
    t = time.perf_counter()
    vectors = embed_texts(texts, seq_len=64)
    embed_s = time.perf_counter() - t
    docs, queries = vectors[:n], vectors[n:]
    flat = Searcher(build_index(docs, model=MINILM))
    clusters = max(2, int(round(np.sqrt(n))))
    spills = (1, 2)
    clustered = {m: Searcher(build_index(docs, model=MINILM, clusters=clusters, spill=m))
                 for m in spills}
    probes = (1, 2, 4, 8)
    he, recall = [], {(m, p): [] for m in spills for p in probes}
    for q in queries:
        # documents by row (fortunes repeat: ids could not tell two copies apart)
        ref = set(flat.search(q, 10, "plain").docs.tolist())
        he.append(len(ref & set(flat.search(q, 10, "he").docs.tolist())) / 10)
        for m, p in recall:
            got = clustered[m].search(q, 10, "he", probe=p).docs.tolist()
            recall[m, p].append(len(ref & set(got)) / 10)
    blocks = {m: clustered[m].index.layout.blocks for m in spills}
    for s in (flat, *clustered.values()):
        s.close()
    return {"corpus": f"{n} fortunes (Debian fortunes, at most 160 characters)",
            "queries": len(queries), "model": MINILM, "embed_s": embed_s,
            "recall_he_exact": float(np.mean(he)), "clusters": clusters,
            "blocks": {str(m): b for m, b in blocks.items()},
            "recall_he_clustered": {f"spill {m}, probe {p}": float(np.mean(v))
                                    for (m, p), v in recall.items()}}


def markdown(doc: dict) -> str:
    lines = [f"# search ({doc['date']})", "", f"`{doc['command']}`", "",
             "Encrypted top-10 search of one query (MiniLM-sized, "
             f"{doc['dim']} dimensions) against a plaintext index on this 2-core machine, "
             "CKKS ring 2^12 (column packing on complex slots: 192 query ciphertexts, one "
             "reply ciphertext per 2048 documents, no evaluation key). Server time is the "
             f"scoring of every block with {doc['threads']} threads; the client's "
             "encryption and decryption are listed apart.", "",
             "| documents | server s (target) | MB down (target) | MB up | eval keys MB "
             "| client encrypt s | client decrypt+rank s | plain s | tee s | top-10 = plain "
             "| encode once s | plaintexts MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["cost"]:
        st, dt = TARGETS.get(r["n"], (None, None))
        tee = f"{r['tee_s']:.3f}" if "tee_s" in r else "—"
        lines.append(
            f"| {r['n']:,} | {r['server_s']:.3f}" + (f" ({st:g})" if st else "") +
            f" | {r['down_mb']:.2f}" + (f" ({dt:g})" if dt else "") +
            f" | {r['up_mb']:.1f} | {r['keys_mb']:.0f} ({KEY_TARGET_MB}) "
            f"| {r['encrypt_s']:.3f} | {r['decrypt_rank_s']:.3f} | {r['plain_s']:.4f} | {tee} "
            f"| {r['top10_equal']} | {r['prepare_s']:.1f} | {r['plaintext_mb']:.0f} |")
    for r in doc.get("clustered", []):
        st, dt = CLUSTERED_TARGET
        lines += ["", f"Clustered {r['n']:,}: {r['clusters']} k-means clusters "
                  f"({r['blocks_total']} blocks, built in {r['build_s']:.0f} s); a query asks "
                  f"for the blocks of its {r['probe']} nearest clusters and {r['decoys']} "
                  "random decoys (the server sees 16 clusters, not which 8 are meant).", "",
                  "| server s, blocks encoded (target) | server s, blocks encoded on first "
                  "use | blocks asked | MB down (target) | MB up |",
                  "|---|---|---|---|---|",
                  f"| {r['warm_server_s']:.3f} ({st:g}) | {r['cold_server_s']:.3f} | "
                  f"{r['blocks_asked']:.0f} | {r['down_mb']:.2f} ({dt:g}) | "
                  f"{r['up_mb']:.1f} |"]
    for r in doc.get("service", []):
        lines += ["", f"Served ({r['n']:,} documents): `veil serve --index` on loopback and "
                  "the SDK's `Client(url, index=...).search(vector, 10)`, end to end "
                  f"(client encryption, {r['up_mb']:.1f} MB up, the worker, "
                  f"{r['down_mb']:.2f} MB down, decryption and ranking): median "
                  f"{r['end_to_end_s']:.2f} s."]
    q = doc.get("quality")
    if q:
        lines += ["", f"Quality: {q['corpus']}, {q['queries']} other fortunes as queries, "
                  f"embedded with {q['model']} ({q['embed_s']:.0f} s). Recall@10 against "
                  "plaintext's exact top-10 (documents by row):", "",
                  "| search | recall@10 |", "|---|---|",
                  f"| encrypted exact scan | {q['recall_he_exact']:.3f} |"]
        for name, v in q["recall_he_clustered"].items():
            m = name.split(",")[0].split()[1]
            lines.append(f"| encrypted, {q['clusters']} clusters ({q['blocks'][m]} blocks), "
                         f"{name} | {v:.3f} |")
    lines += ["", f"Anchor: {TIPTOE}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tee-max", type=int, default=100_000)
    ap.add_argument("--clusters-1m", action="store_true")
    ap.add_argument("--real", type=int, default=0)
    ap.add_argument("--service", type=int, default=0,
                    help="also time N documents end to end through veil serve --index")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--merge", action="store_true",
                    help="keep the parts of OUT/search.json this run does not measure")
    args = ap.parse_args(argv)
    out = Path(args.out)
    command = "python bench/search.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc = {"dim": args.dim, "threads": args.threads, "cost": [], "tiptoe": TIPTOE}
    if args.merge and (out / "search.json").exists():
        doc = json.loads((out / "search.json").read_text())
        command = f"{doc['command']}; then {command}"
    doc.update({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command})
    for n in (int(s) for s in args.sizes.split(",") if s):
        row = cost_row(n, args)
        print(json.dumps({k: v for k, v in row.items() if k != "server_s_all"}), flush=True)
        doc["cost"] = sorted([r for r in doc["cost"] if r["n"] != n] + [row],
                             key=lambda r: r["n"])
        gc.collect()
    if args.clusters_1m:
        row = clustered_row(1_000_000, args)
        print(json.dumps(row), flush=True)
        doc["clustered"] = [row]
    if args.service:
        doc["service"] = [service_row(args.service, args)]
        print(json.dumps(doc["service"][0]), flush=True)
    if args.real:
        doc["quality"] = quality(args.real, args)
        print(json.dumps(doc["quality"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(doc, indent=1))
    (out / "search.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``veil`` command line.

    veil --version
    veil compare [MODEL --data DATA] [--modes plain,simulate,tee,mpc,he] [--n N]
                 [--out DIR] [--mlflow DIR]
    veil compile MODEL --calibration DATA [--eval DATA] [--json FILE]
    veil export MODEL --calibration DATA OUT [--name N] [--modes tee,mpc,he]
                [--encrypted-weights [--owner-bundle DIR]] [--tee-keys DIR]
    veil keys create NAME --store DIR [LIMITS] [--owner MODEL]... | list --store DIR
              | set-limits ID|NAME --store DIR [LIMITS] [--reset] | revoke ID --store DIR
        LIMITS: [--rate R] [--burst B] [--max-sessions N] [--max-key-bytes BYTES]
                [--max-uploads N] [--max-concurrent N] [--max-channels N]
    veil serve EXPORT... --store DIR [--listen HOST:PORT]
               [--tls-cert PEM --tls-key PEM] [--metrics-listen HOST:PORT]
               [--tee-attester-key DIR | --tee-enclave HOST:PORT]
               [--mpc-keys DIR [--mpc-parties P0,P1]] [--allow-insecure]
               [--body-timeout S] [--header-timeout S] [--max-inflight-he|tee|mpc N]
               [--he-workers N] [--worker-timeout S] [--max-key-upload BYTES]
               [--max-weights-upload BYTES] [--index NAME=PATH]... [--search-workers N]
    veil predict URL --model NAME --mode he|tee|mpc --input DATA [--out FILE]
                 [--policy FILE] [--mpc-keys DIR] [--clip] [--allow-insecure]
    veil weights-request URL --model NAME --out FILE     # client: session + public key
    veil index build --texts FILE | --vectors FILE.npy --out INDEX [--ids FILE]
                     [--clusters C] [--no-normalize]
    veil search URL --index NAME --text TEXT | --vector FILE.npy [-k K]
                [--probe P [--decoys D]] [--ca PEM]
    veil owner upload-weights URL --bundle DIR --request FILE   # model owner

A model exported with --encrypted-weights is served without its weights: the client
runs ``weights-request`` and hands the file to the model owner out of band; the owner
(a key made with ``keys create --owner MODEL``) encrypts its weights under the client's
public key and uploads them to that session; then ``predict`` works as usual.

MODEL is an .onnx file or a torch module saved whole (.pt, with --trust-pickle); DATA is
.npy (inputs) or .npz (x, and y for accuracy). compile and export take --input-shape,
--layout, --degree, --activation-bits, --output (an ONNX graph's output), --server-head
and --insecure-test-params. A final softmax / sigmoid and a classifier's labels are computed
by the client after decryption (the output head); predict prints the predicted classes.
serve writes what it serves and any INSECURE reasons to stderr, its JSON-lines request log
to DIR/logs/service.log, and Prometheus metrics only on --metrics-listen (no API key:
a private interface); predict trusts an https service's CA from SSL_CERT_FILE.

The processes behind the modes, run by ``serve`` or by hand:

    veil mpc-setup KEYS_DIR                       # role keys, public.json, ticket.key
    veil mpc-dealer --keys KEYS_DIR [--listen HOST:PORT]
    veil mpc-node --party 0|1 --keys KEYS_DIR --model MODEL_DIR --dealer HOST:PORT
                  [--listen HOST:PORT] [--peer HOST:PORT | --peer-listen HOST:PORT]
                  [--cmp circuit|fss] [--frac-bits F] [--prefetch N]
                  [--batch-size B] [--prefetch-batch M] [--memory-budget MIB]
                  [--stream-above MIB] [--spool DIR] [--spool-sets N]

    veil tee-attester-setup DIR                   # INSECURE software attester key
    veil tee-export MODEL.onnx --input-shape 1,8,8 EXPORT_DIR [--encrypt-keys KEYS_DIR]
    veil tee-policy EXPORT_DIR --attester DIR [--allow-insecure] [--max-age S] --out FILE
    veil tee-key-release --keys KEYS_DIR --policy FILE [--listen HOST:PORT]
    veil tee-serve EXPORT_DIR --attester-key DIR [--key-release HOST:PORT]
                   [--listen HOST:PORT] [--plaintext-baseline]

Each server prints one line ``veil-mpc <role> listening on HOST:PORT`` (and party1
``... peer on HOST:PORT``) or ``veil-tee <role> ... listening on HOST:PORT`` once it
accepts connections, so port 0 can be used. A TEE server with the software attester or
the plaintext baseline says INSECURE in that line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .modes import SERVED


def _address(text: str) -> tuple[str, int]:
    from .backends.sockets import parse_address
    from .errors import InputError

    try:
        return parse_address(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}")
    return value


def _index_parsers(sub) -> None:
    """``veil index build`` and ``veil search`` (encrypted search, :mod:`veil.search`)."""
    i = sub.add_parser("index", help="build a search index for `veil serve --index`")
    isub = i.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build", help="embed documents (or take vectors) into an index file")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="a UTF-8 text file, one document per line, embedded "
                     "here with MiniLM-L6 (all-MiniLM-L6-v2, veil.text)")
    src.add_argument("--vectors", help="an .npy file of precomputed vectors (n, d)")
    b.add_argument("--ids", help="a text file of document ids, one per line (default: "
                   "the line or row numbers)")
    b.add_argument("--clusters", type=int, default=0,
                   help="k-means clusters for probed searches (default 0: a flat index, "
                   "exact scans only)")
    b.add_argument("--spill", type=int, default=1,
                   help="with --clusters: put each document in its N nearest clusters "
                   "(better recall for probed searches, N times the blocks; default 1)")
    b.add_argument("--no-normalize", action="store_true",
                   help="keep vectors as given (default: unit norm, cosine scores)")
    b.add_argument("--out", required=True, help="the index file to write (.npz)")
    s = sub.add_parser("search", help="search a served index with an encrypted query")
    s.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    s.add_argument("--index", required=True, help="the index name (GET /v1/indexes)")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="the query text (embedded here, never sent)")
    q.add_argument("--vector", help="an .npy file holding the query vector")
    s.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    s.add_argument("--probe", type=int, help="a clustered index: score only the blocks "
                   "of this many clusters nearest the query")
    s.add_argument("--decoys", type=int, default=0, help="with --probe: also ask for this "
                   "many random clusters, so the server cannot tell which are probed")
    s.add_argument("--ca", help="PEM certificate authorities of an https service")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    ap = argparse.ArgumentParser(prog="veil", description="veil: private inference.")
    ap.add_argument("--version", action="version", version=f"veil {__version__}",
                    help="print veil's version and exit")
    sub = ap.add_subparsers(dest="command", required=True)
    from .compare.cli import add_parser as add_compare

    add_compare(sub)
    _service_parsers(sub)
    s = sub.add_parser("mpc-setup", help="create the MPC roles' static keys in a folder")
    s.add_argument("keys", help="folder for party0/party1/dealer keys, public.json (for "
                   "clients) and ticket.key (for party 0, party 1 and the service only)")
    d = sub.add_parser("mpc-dealer", help="run the dealer (correlated randomness)")
    d.add_argument("--keys", required=True, help="folder made by mpc-setup")
    d.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                   help="HOST:PORT for the parties (port 0: any free port, printed)")
    d.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    d.add_argument("--memory-budget", type=float, default=2048.0,
                   help="MiB this process may use; larger layer requests are refused")
    n = sub.add_parser("mpc-node", help="run one of the two computing parties")
    n.add_argument("--party", type=int, choices=(0, 1), required=True,
                   help="which party: 0 (fronted by the service) or 1")
    n.add_argument("--keys", required=True, help="folder made by mpc-setup")
    n.add_argument("--model", required=True, help="folder written by save_model")
    n.add_argument("--dealer", type=_address, required=True,
                   help="the dealer's HOST:PORT (its listening line)")
    n.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                   help="address for clients")
    n.add_argument("--peer", type=_address, help="party0: party1's peer address")
    n.add_argument("--peer-listen", type=_address, default=("127.0.0.1", 0),
                   help="party1: address for party0")
    n.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    n.add_argument("--cmp", choices=("circuit", "fss"), default="circuit",
                   help="comparisons as binary circuits (default: little computation and "
                        "dealer material, 5 rounds per ReLU layer; for fast networks) or "
                        "as function secret sharing (2 rounds; for slow networks); both "
                        "parties must agree")
    n.add_argument("--frac-bits", type=int, default=20,
                   help="fixed-point fractional bits (both parties and clients agree)")
    n.add_argument("--prefetch", type=int, default=8,
                   help="single-input material sets fetched from the dealer ahead")
    n.add_argument("--batch-size", type=int, default=64,
                   help="a batch size whose material is also fetched ahead")
    n.add_argument("--prefetch-batch", type=int, default=2,
                   help="material sets for --batch-size inputs kept ready (0: on demand)")
    n.add_argument("--memory-budget", type=float, default=2048.0,
                   help="MiB this process may use: a model over it is refused at start, "
                        "a batch over it per request (estimated from the graph)")
    n.add_argument("--stream-above", type=float, default=256.0,
                   help="MiB: a layer whose material is larger streams from the dealer "
                        "chunk by chunk as it runs instead of being held whole (fewer "
                        "bytes held, more rounds)")
    n.add_argument("--spool", metavar="DIR",
                   help="keep whole single-input material sets too large for memory here, "
                        "fetched from the dealer while idle (the offline phase run ahead; "
                        "a request then only computes); one unlinked file per set, freed "
                        "when used")
    n.add_argument("--spool-sets", type=int, default=1,
                   help="how many sets --spool keeps ready (each about the model's material "
                        "per input, e.g. 1.3 GiB for EfficientNet-B0)")
    _tee_parsers(sub)
    return ap


def _compile_args(p) -> None:
    p.add_argument("model", help=".onnx file, a torch module saved whole (.pt/.pth), or a "
                   "model veil ships: minilm[:SEQ_LEN] (MiniLM-L6 sentence embeddings), "
                   "minilm-grain[:SEQ_LEN] (its Reuters grain classifier)")
    p.add_argument("--calibration", required=True,
                   help=".npy or .npz (x) of representative inputs, shape (B, *input); "
                   "for a text model, a .txt file of texts, one per line")
    p.add_argument("--input-shape", type=_shape, help="per sample, e.g. 1,8,8 (default: "
                   "the calibration data's)")
    p.add_argument("--layout", choices=("latency", "throughput"), default="latency",
                   help="HE: fewest rotations per input, or most inputs per ciphertext")
    p.add_argument("--degree", type=int, help="HE: Chebyshev degree of every activation "
                   "(default: each activation's smallest that meets --activation-bits)")
    p.add_argument("--activation-bits", type=int, default=None,
                   help="HE: each activation's polynomial keeps its max error within "
                   "2^-BITS of its output span, at degree 27 at most (default 8)")
    p.add_argument("--output", help="ONNX: which of the graph's outputs (e.g. a scikit-learn "
                   "classifier's 'label' or 'probabilities'; default: its scores)")
    p.add_argument("--server-head", action="store_true",
                   help="keep a final softmax/sigmoid on the server (default: the client "
                   "computes the output head, exactly, after decryption)")
    p.add_argument("--insecure-test-params", action="store_true",
                   help="HE: small INSECURE parameters (tests only; recorded everywhere)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a .pt/.pth torch pickle (runs code from the file)")


def _service_parsers(sub) -> None:
    c = sub.add_parser("compile", help="compile a model and print its HE report")
    _compile_args(c)
    c.add_argument("--eval", help=".npz (x, y) to predict HE accuracy on (default: the "
                   "calibration file when it has y)")
    c.add_argument("--json", help="also write the report as JSON here")
    e = sub.add_parser("export", help="compile and write one export folder for all modes")
    _compile_args(e)
    e.add_argument("out", help="export folder (its name is the model's name by default)")
    e.add_argument("--name", help="the model's name in the service")
    e.add_argument("--modes", default=",".join(SERVED),
                   help=f"comma-separated: {', '.join(SERVED)}")
    e.add_argument("--encrypted-weights", action="store_true",
                   help="HE: server bundle without weights (sent encrypted per client)")
    e.add_argument("--owner-bundle", help="with --encrypted-weights: also write the model "
                   "owner's HE server bundle, WITH its plaintext weights, to this folder "
                   "(keep it off the host; `veil owner upload-weights --bundle` reads it)")
    e.add_argument("--tee-keys", help="TEE: encrypt the enclave bundle; key written here")
    _keys_parsers(sub)
    _weights_parsers(sub)
    s = sub.add_parser("serve", help="serve export folders over HTTP (HE, TEE, MPC)")
    s.add_argument("exports", nargs="*", help="folders written by `veil export` (none when "
                   "only --index is served)")
    s.add_argument("--store", required=True,
                   help="folder for sessions, evaluation keys, API keys and logs")
    s.add_argument("--listen", type=_address, default=("127.0.0.1", 8000),
                   help="HOST:PORT to serve on (default 127.0.0.1:8000; port 0: any free "
                   "port, announced on stdout)")
    s.add_argument("--ttl", type=float, default=24 * 3600.0,
                   help="seconds an HE session lives unused (default one day)")
    s.add_argument("--disk-budget", type=int, default=20 << 30,
                   help="bytes of evaluation keys kept on disk (LRU eviction)")
    s.add_argument("--memory-budget", type=int, default=8 << 30,
                   help="bytes of evaluation keys kept loaded in memory (LRU)")
    s.add_argument("--tee-attester-key", help="start each enclave with this INSECURE "
                   "software attester (folder of tee-attester-setup)")
    s.add_argument("--tee-key-release", help="key-release service HOST:PORT (encrypted "
                   "enclave bundles)")
    s.add_argument("--tee-enclave", help="use a running enclave at HOST:PORT instead")
    s.add_argument("--mpc-keys", help="folder of mpc-setup: its public keys authenticate "
                   "party 0; without --mpc-parties its private keys start the dealer, "
                   "party 1 and party 0 here (development: all roles on one machine)")
    s.add_argument("--mpc-parties", help="use running parties instead: P0HOST:PORT,"
                   "P1HOST:PORT")
    s.add_argument("--mpc-frac-bits", type=int, default=20,
                   help="MPC fixed-point fractional bits of the parties started here or "
                   "of --mpc-parties (all must agree; default 20)")
    s.add_argument("--he-workers", type=int, default=2,
                   help="HE worker processes: OpenFHE runs only in them, so a crash on a "
                   "hostile input fails one request, not the service (default 2)")
    s.add_argument("--worker-timeout", type=float, default=300.0,
                   help="seconds an HE request may run in a worker before the worker is "
                   "restarted (default 300)")
    s.add_argument("--allow-insecure", action="store_true",
                   help="serve exports with INSECURE test parameters (refused otherwise)")
    s.add_argument("--max-key-upload", type=int,
                   help="largest evaluation-key upload in bytes, streamed to disk (default "
                   "1 GiB; a bootstrapped ResNet-20's keys are 17.3 GB)")
    s.add_argument("--max-weights-upload", type=int,
                   help="largest upload of a model owner's encrypted weights in bytes, "
                   "streamed to disk (default 1 GiB)")
    s.add_argument("--body-timeout", type=float, help="seconds a request body may take, "
                   "plus its size at 1 MB/s (default 30)")
    s.add_argument("--header-timeout", type=float, help="close connections whose request "
                   "headers take longer than this many seconds (default 10)")
    for mode, n in (("he", 4), ("tee", 16), ("mpc", 16)):
        s.add_argument(f"--max-inflight-{mode}", type=int,
                       help=f"{mode} requests computed at once (default {n})")
    s.add_argument("--store-url", help="keep HE sessions and their keys in this "
                   "PostgreSQL database (postgresql://...), shared by every service "
                   "process and Ray replica using it; default: SQLite in --store")
    s.add_argument("--ray", metavar="ADDRESS", help="serve on the Ray cluster at ADDRESS "
                   "(`ray start --head` prints it): HE evaluation and enclaves run as Ray "
                   "Serve replicas, the same HTTP API on --listen (needs veil[scale])")
    s.add_argument("--replicas", type=int, default=1,
                   help="with --ray: HE replicas, and enclave replicas per TEE model "
                   "(default 1)")
    s.add_argument("--replica-cpus", type=float, default=1.0,
                   help="with --ray: CPUs Ray reserves for each replica (default 1)")
    s.add_argument("--he-threads", type=int, default=1,
                   help="with --ray: OpenFHE threads in each HE replica (default 1)")
    s.add_argument("--tee-threads", type=_positive, help="with --ray: the model runtime's "
                   "threads in each enclave replica (default: --replica-cpus, at least 1)")
    from .service.options import add_ops_args, add_search_args

    add_ops_args(s, _address)
    add_search_args(s)
    _index_parsers(sub)
    p = sub.add_parser("predict", help="run inputs through a served model with the SDK")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model's name in the service "
                   "(GET /v1/models lists them)")
    p.add_argument("--mode", choices=SERVED, default="he",
                   help="how inputs are protected: he (encrypted), tee (sealed to an "
                   "attested enclave) or mpc (secret-shared); default he")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help=".npy inputs or .npz (x, y): an array of exactly the "
                     "model's input shape is one input, (B, *input_shape) a batch")
    src.add_argument("--text", action="append",
                     help="a text for a text model (repeatable); tokenized here, with the "
                          "tokenizer the model was exported with")
    src.add_argument("--texts", help="a file of texts for a text model, one per line")
    p.add_argument("--out", help="write the model's outputs here (.npy; its output head, e.g. a "
                   "final softmax, computed on this machine)")
    p.add_argument("--api-key", help="default: the VEIL_API_KEY environment variable")
    p.add_argument("--policy", help="tee: the policy file of `veil tee-policy`")
    p.add_argument("--mpc-keys", help="mpc: folder with the deployment's public.json")
    p.add_argument("--allow-insecure", action="store_true",
                   help="he: accept a model exported with INSECURE test parameters "
                   "(tests only)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="inputs sent per request (default 64)")
    p.add_argument("--clip", action="store_true",
                   help="he: clamp inputs into the model's calibrated input range (per "
                        "feature, from its client bundle) on this machine before "
                        "encrypting, and say how many values and rows changed; without "
                        "it an input outside the range is refused, naming its row and "
                        "feature (tee and mpc compute any input exactly: no --clip)")


#: ``veil keys`` limit options: flag -> (Limits field, type)
LIMIT_FLAGS = {"--rate": ("rate", float), "--burst": ("burst", int),
               "--max-sessions": ("max_sessions", int),
               "--max-key-bytes": ("max_key_bytes", int),
               "--max-uploads": ("max_uploads", int),
               "--max-concurrent": ("max_concurrent", int),
               "--max-channels": ("max_channels", int)}


def _weights_parsers(sub) -> None:
    """``veil weights-request`` (client) and ``veil owner upload-weights`` (model owner)."""
    w = sub.add_parser("weights-request", help="client: write what the model owner needs "
                       "to upload encrypted weights for your HE session")
    w.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    w.add_argument("--model", required=True, help="the model's name in the service")
    w.add_argument("--out", required=True, help="write the request here (session id, "
                   "model and your public key; nothing secret): give it to the model owner")
    w.add_argument("--api-key", help="your client key; default: the VEIL_API_KEY "
                   "environment variable")
    w.add_argument("--key-dir", help="where your keys and session persist (default "
                   "~/.veil, which predict uses too)")
    w.add_argument("--allow-insecure", action="store_true",
                   help="accept a model with INSECURE test parameters (tests only)")
    o = sub.add_parser("owner", help="model owner: upload weights encrypted for a client")
    actions = o.add_subparsers(dest="action", required=True)
    u = actions.add_parser("upload-weights", help="encrypt your weights under the public "
                           "key of a client's weights request and upload them to its session")
    u.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    u.add_argument("--bundle", required=True, help="your HE server bundle with plaintext "
                   "weights (export --owner-bundle DIR)")
    u.add_argument("--request", required=True,
                   help="the client's weights request file (veil weights-request)")
    u.add_argument("--api-key", help="a model owner's key (keys create NAME --owner MODEL); "
                   "default: the VEIL_API_KEY environment variable")


def _keys_parsers(sub) -> None:
    """``veil keys ACTION``: one subparser per action, so options may come before or
    after the positional (``keys create --store DIR NAME`` works)."""
    k = sub.add_parser("keys", help="API keys of the service's clients")
    k.add_argument("--store", dest="store_top", help=argparse.SUPPRESS)
    actions = k.add_subparsers(dest="action", required=True)
    helps = {"create": "make a key (printed once)", "list": "list keys and their limits",
             "set-limits": "change a key's limits (next request)",
             "revoke": "revoke a key and delete its sessions"}
    for action, text in helps.items():
        a = actions.add_parser(action, help=text)
        if action == "create":
            a.add_argument("name", help="the client's name")
            a.add_argument("--owner", action="append", metavar="MODEL",
                           help="a model owner's key: it may upload encrypted weights for "
                                "MODEL (repeatable); default: a client key")
        elif action != "list":
            a.add_argument("name", metavar="ID", help="the key id (or its unique name)")
        a.add_argument("--store", help="the service's store folder")
        if action in ("create", "set-limits"):
            for flag, (field, kind) in LIMIT_FLAGS.items():
                a.add_argument(flag, dest=f"limit_{field}", type=kind,
                               metavar={"rate": "R", "burst": "B",
                                        "max_key_bytes": "BYTES"}.get(field, "N"),
                               help=f"this key's {field.replace('_', ' ')} (default: the "
                                    "service's)")
        if action == "set-limits":
            a.add_argument("--reset", action="store_true",
                           help="forget the key's own limits before applying these")
        if action == "revoke":
            a.add_argument("--store-url", help="the service's PostgreSQL session store "
                           "(its `veil serve --store-url`), where the key's sessions are "
                           "deleted; default: the SQLite store in --store")


def _single_threaded_blas(argv: list[str] | None) -> None:
    """Restart this process with OPENBLAS_NUM_THREADS=1 unless it is set: the servers'
    matrix products are small, and BLAS thread pools spinning against each other on a
    2-core machine stalled the MPC online phase by up to 80 ms.
    numpy reads the variable when it loads, so it must be set before the process starts."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    os.execve(sys.executable, [sys.executable, "-m", "veil",
                               *(sys.argv[1:] if argv is None else argv)], env)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,8,8, got {text!r}") from None


def _tee_parsers(sub) -> None:
    a = sub.add_parser("tee-attester-setup",
                       help="create an INSECURE software attester key (development only)")
    a.add_argument("dir", help="folder for the attester's key (created)")
    e = sub.add_parser("tee-export", help="export an ONNX model as an enclave bundle")
    e.add_argument("model", help="ONNX file")
    e.add_argument("--input-shape", type=_shape, required=True, help="per sample, e.g. 1,8,8")
    e.add_argument("out", help="export folder")
    e.add_argument("--encrypt-keys", help="encrypt the bundle; write its key to this folder")
    e.add_argument("--runtime", choices=("onnxruntime", "torch", "interpreter"),
                   default="onnxruntime", help="the enclave's model runtime")
    p = sub.add_parser("tee-policy", help="write a client policy for an exported bundle")
    p.add_argument("export", help="folder written by tee-export, or by `veil export` "
                   "(its tee/ subfolder is used)")
    p.add_argument("--attester", required=True, help="folder made by tee-attester-setup")
    p.add_argument("--allow-insecure", action="store_true",
                   help="accept the INSECURE software attester (development only)")
    p.add_argument("--max-age", type=float, default=300.0, help="seconds evidence stays valid")
    p.add_argument("--out", required=True, help="the policy file to write (give it to "
                   "clients: `veil predict --policy`)")
    k = sub.add_parser("tee-key-release", help="release model keys to attested enclaves")
    k.add_argument("--keys", required=True, help="folder of model keys (tee-export)")
    k.add_argument("--policy", required=True, help="file written by tee-policy")
    k.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                   help="HOST:PORT for enclaves (port 0: any free port, printed)")
    k.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    t = sub.add_parser("tee-serve", help="run the enclave (sealed inference)")
    t.add_argument("export", help="folder written by tee-export")
    t.add_argument("--attester", default="software", choices=("software", "sev-snp", "tdx"),
                   help="who vouches for the enclave (software: INSECURE, development)")
    t.add_argument("--attester-key", help="software attester: folder of tee-attester-setup")
    t.add_argument("--key-release", type=_address, help="key-release service (encrypted "
                   "bundles)")
    t.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                   help="HOST:PORT for clients (port 0: any free port, printed)")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds per message")
    t.add_argument("--evidence-ttl", type=int, default=300, help="seconds evidence is valid")
    t.add_argument("--threads", type=_positive, help="the model runtime's threads per "
                   "model run (default: its own)")
    t.add_argument("--parallel", type=_positive, help="model runs at once; other requests "
                   "wait their turn (default: one per connection)")
    t.add_argument("--plaintext-baseline", action="store_true",
                   help="INSECURE: serve unsealed, no attestation (benchmarks only)")


def _announce(line: str) -> None:
    """A server's ready line: on stdout for its launcher, and logged (stderr, which
    ``veil serve`` keeps in ``STORE/logs/<model>-<role>.log``), so a child's log says
    when it started and where, not only what went wrong."""
    print(line, flush=True)
    logging.getLogger("veil.cli").info("%s (pid %d)", line, os.getpid())


def _tee_bundle(folder: str) -> str:
    """The TEE bundle folder of ``folder``: itself (``veil tee-export``), or the ``tee/``
    subfolder of a ``veil export`` folder (which has the export index)."""
    from .deploy.export import INDEX, read_export

    if (Path(folder) / INDEX).is_file():
        info = read_export(folder)
        if "tee" not in info.modes:
            from .errors import InputError

            raise InputError(f"{folder} is exported for {', '.join(info.modes)}, not tee: "
                             "export it with --modes including tee")
        return str(info.path("tee"))
    return folder


def _tee(args) -> int:
    from .backends.tee import attest, bundle, keyrelease, service

    if args.command == "tee-attester-setup":
        print(f"INSECURE software attester key written to "
              f"{attest.SoftwareAttester.create(args.dir)}")
        return 0
    if args.command == "tee-export":
        from .frontend import to_graph

        out = bundle.export_model(to_graph(args.model, args.input_shape), args.out,
                                  args.encrypt_keys, args.runtime)
        print(f"exported to {out.directory}; measurement {out.measurement}"
              + (f"; model key {out.key_id}" if out.key_id else ""))
        return 0
    if args.command == "tee-policy":
        policy = attest.Policy(frozenset({bundle.measure(_tee_bundle(args.export))}),
                               (attest.TrustedAttester.load(args.attester),),
                               args.max_age, args.allow_insecure)
        print(f"policy written to {policy.save(args.out)}")
        return 0
    if args.command == "tee-key-release":
        krs = keyrelease.KeyReleaseService(args.keys, attest.Policy.load(args.policy),
                                           args.listen, args.timeout)
        _announce("veil-tee key-release listening on %s:%d" % krs.address)
        krs.serve_forever()
        return 0
    if args.plaintext_baseline:
        srv = service.PlaintextServer(bundle.load_model(args.export), args.listen, args.timeout,
                                      bundle.load_runtime(args.export), args.threads,
                                      args.parallel)
        role = "plaintext-baseline (INSECURE: unsealed, benchmarks only)"
    else:
        srv = service.Enclave(args.export, attest.load_attester(args.attester,
                                                                args.attester_key or "."),
                              args.listen, args.key_release, args.timeout, args.evidence_ttl,
                              args.threads, args.parallel)
        role = "enclave" + (" (INSECURE software attester)" if srv.insecure else "")
    _announce(f"veil-tee {role} listening on %s:%d" % srv.address)
    srv.serve_forever()
    return 0


#: the SDK's keyword arguments that its errors name, and ``veil predict``'s flags for them
SDK_FLAGS = {"allow_insecure=True": "--allow-insecure", "policy=": "--policy FILE",
             "mpc_keys=": "--mpc-keys DIR", "api_key=": "--api-key"}


def _as_flags(message: str) -> str:
    """An SDK error message as the command line says it: flags for keyword arguments."""
    for argument, flag in SDK_FLAGS.items():
        message = message.replace(f"pass {argument}", f"pass {flag}") \
                         .replace(f"needs {argument}", f"needs {flag}")
    return message


_COMMANDS = ("compile", "export", "keys", "serve", "predict", "weights-request", "owner",
             "index", "search")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("mpc-node", "mpc-dealer", "tee-serve"):
        _single_threaded_blas(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)      # one line per request
    if args.command == "compare":
        from .compare.cli import run

        return run(args)
    if args.command in _COMMANDS:
        from . import commands
        from .errors import VeilError

        if args.command == "index":
            args.command = "index-build"
        if args.command == "keys":
            args.store = args.store or args.store_top
            if not args.store:
                print(f"veil keys {args.action} needs --store DIR", file=sys.stderr)
                return 2
            args.id = getattr(args, "name", None)
        try:
            return getattr(commands, f"{args.command.replace('-', '_')}_cmd")(args)
        except VeilError as exc:
            print(f"veil {args.command}: {_as_flags(str(exc))}", file=sys.stderr)
            return 1
    if args.command.startswith("tee-"):
        from .errors import VeilError

        try:
            return _tee(args)
        except VeilError as exc:
            print(f"veil {args.command}: {exc}", file=sys.stderr)
            return 1
    from .backends.mpc import service, transport

    if args.command == "mpc-setup":
        print(f"keys written to {transport.setup(args.keys)}")
        return 0
    if args.command == "mpc-dealer":
        dealer = service.Dealer(transport.Identity.load(args.keys, "dealer"), args.listen,
                                timeout=args.timeout,
                                memory_budget=int(args.memory_budget * 2**20))
        _announce("veil-mpc dealer listening on %s:%d" % dealer.address)
        dealer.serve_forever()
        return 0
    if args.party == 0 and args.peer is None:
        print("mpc-node --party 0 needs --peer (party1's peer address)", file=sys.stderr)
        return 2
    from .errors import ResourceError

    try:
        node = service.Party(
            args.party, transport.Identity.load(args.keys, f"party{args.party}"),
            service.load_model(args.model), args.listen, args.dealer, peer=args.peer,
            peer_listen=args.peer_listen, timeout=args.timeout, prefetch=args.prefetch,
            frac_bits=args.frac_bits, cmp=args.cmp, batch_size=args.batch_size,
            prefetch_batch=args.prefetch_batch,
            memory_budget=int(args.memory_budget * 2**20), name=args.model,
            stream_above=int(args.stream_above * 2**20), spool=args.spool,
            spool_sets=args.spool_sets)
    except ResourceError as exc:        # the model does not fit: say so, allocate nothing
        print(f"veil mpc-node: {exc}", file=sys.stderr)
        return 1
    _announce(f"veil-mpc party{args.party} listening on %s:%d" % node.address)
    if node.peer_address:
        _announce("veil-mpc party1 peer on %s:%d" % node.peer_address)
    node.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

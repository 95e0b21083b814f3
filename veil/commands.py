"""The user-facing commands behind ``veil compile | export | serve | predict | keys``,
and for encrypted weights ``veil weights-request | owner upload-weights``.

``cli.py`` parses; this module does the work, with rich progress for the long steps
(compiling, exporting, starting processes, batched predictions). Data files are ``.npy``
(one array) or ``.npz`` (``x`` and optionally ``y``), always loaded without pickles.
Models are ``.onnx`` files, or a whole torch module saved with ``torch.save(model)``:
loading that runs a pickle, so only load files you made yourself (``--trust-pickle``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

from .backends.inputs import as_inputs
from .errors import InputClippedWarning, InputError


def _progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    transient=False, console=_console())


def _console():
    from rich.console import Console

    return Console(stderr=True)


def load_data(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) from a .npy or .npz file (no pickles)."""
    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise InputError(f"{p}: an .npz data file holds an array named 'x' "
                                     f"(and optionally 'y'); it has {z.files}")
                return np.asarray(z["x"], np.float64), (np.asarray(z["y"]) if "y" in z.files
                                                       else None)
        return np.asarray(np.load(p, allow_pickle=False), np.float64), None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read data from {p}: {exc}") from None


#: models veil ships, by name (``NAME`` or ``NAME:SEQ_LEN``): the MiniLM-L6 sentence
#: encoder and the Reuters-21578 grain classifier on it (``veil.text``)
BUILTIN_MODELS = ("minilm", "minilm-grain")


def load_model(path: str | os.PathLike, trust_pickle: bool = False):
    """An ONNX path (converted lazily by the frontend), a torch module file, or one of
    :data:`BUILTIN_MODELS`."""
    name, _, seq = str(path).partition(":")
    if name in BUILTIN_MODELS:
        from .text.head import load_classifier
        from .text.minilm import load_minilm

        try:
            seq_len = int(seq) if seq else 128
        except ValueError:
            raise InputError(f"{path}: the sequence length after ':' is a number") from None
        return (load_minilm if name == "minilm" else load_classifier)(seq_len)
    p = Path(path)
    if p.suffix == ".onnx":
        if not p.is_file():
            raise InputError(f"no such model file: {p}")
        return str(p)
    if p.suffix in (".pt", ".pth"):
        if not trust_pickle:
            raise InputError(f"{p} is a torch pickle: loading it runs code from the file. "
                             "Pass --trust-pickle if you made it yourself, or export the "
                             "model to ONNX")
        import torch

        model = torch.load(p, weights_only=False, map_location="cpu")
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"{p} holds a {type(model).__name__}, not an nn.Module "
                             "(save the whole model with torch.save(model, path))")
        return model.eval()
    raise InputError(f"models are .onnx files or torch modules saved as .pt/.pth, not {p}")


def _read_texts(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read texts from {path}: {exc}") from None
    texts = [t for t in (line.strip() for line in lines) if t]
    if not texts:
        raise InputError(f"{path} holds no texts")
    return texts


def _compile_options(args) -> dict:
    opts = {"layout": args.layout, "insecure_test_params": args.insecure_test_params}
    if args.degree is not None:
        opts["degree"] = args.degree
    if args.activation_bits is not None:
        opts["activation_bits"] = args.activation_bits
    if args.input_shape is not None:
        opts["input_shape"] = args.input_shape
    if args.output is not None:
        opts["output"] = args.output
    if args.server_head:
        opts["client_head"] = False
    return opts


def _calibration(path: str, model) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibration inputs: .npy/.npz arrays, or for a text model (``veil_text``) a .txt
    file of texts, one per line, tokenized with the model's tokenizer."""
    spec = getattr(model, "veil_text", None)
    if str(path).endswith(".txt"):
        if not spec:
            raise InputError(f"{path}: texts calibrate text models only")
        from .text.tokenize import tokenizer_for

        return tokenizer_for(spec).encode(_read_texts(path)), None
    return load_data(path)


def compile_cmd(args) -> int:
    from .model import compile as compile_model

    model = load_model(args.model, args.trust_pickle)
    x, y = _calibration(args.calibration, model)
    labels_x, labels_y = (load_data(args.eval) if args.eval else (x, y))
    with _console().status("compiling (calibrating ranges, fitting polynomials, choosing "
                           "CKKS parameters)"):
        compiled = compile_model(model, x, **_compile_options(args))
        report = compiled.report(labels_x if labels_y is not None else None, labels_y)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, default=float))
        print(f"report written to {args.json}")
    return 0


def export_cmd(args) -> int:
    from .model import export_model

    model = load_model(args.model, args.trust_pickle)
    x, _ = _calibration(args.calibration, model)
    owner = getattr(args, "owner_bundle", None)
    if owner and not args.encrypted_weights:
        raise InputError("--owner-bundle goes with --encrypted-weights (without it the "
                         "export's own bundle holds the weights)")
    options = _compile_options(args)
    with _console().status(f"exporting for {args.modes}"):
        if owner:       # one compile for both bundles: the owner's must match the host's
            from .model import compile as compile_model

            options["compiled"] = compile_model(model, x, **options)
        info = export_model(model, x, args.out,
                            name=args.name, modes=args.modes,
                            encrypted_weights=args.encrypted_weights, tee_keys=args.tee_keys,
                            **options)
        if owner:
            options["compiled"].server_bundle().save(owner)
            print(f"  the model owner's bundle (plaintext weights) is in {owner}")
    print(f"exported {info.name!r} to {info.directory} for {', '.join(info.modes)}")
    if "tee" in info.modes:
        print(f"  tee measurement {info.index['tee']['measurement']}"
              + (" (bundle encrypted; key in --tee-keys)" if info.index["tee"]["encrypted"]
                 else ""))
    if "he" in info.modes:
        print(f"  he model id {info.index['he']['model_id']}, "
              f"{info.index['he']['lanes']} inputs per ciphertext")
    return 0


def _limit_args(args) -> dict:
    return {k[len("limit_"):]: v for k, v in vars(args).items()
            if k.startswith("limit_") and v is not None}


def keys_cmd(args) -> int:
    """``veil keys create|list|set-limits|revoke``; revoking also deletes the key's
    sessions and their key files (safe while the service runs: the store is opened
    without its crash recovery, which would delete uploads in progress)."""
    from .service.auth import KeyStore
    from .service.store import open_store

    store = KeyStore(args.store)
    try:
        if args.action == "create":
            token = store.create(args.name, _limit_args(args),
                                 owner_of=getattr(args, "owner", None))
            print(token)
            print("(shown once: the store keeps only its hash)", file=sys.stderr)
        elif args.action == "list":
            for row in store.list():
                print(json.dumps(row, default=str))
        elif args.action == "set-limits":
            kid = store.resolve(args.id)
            own = store.set_limits(kid, _limit_args(args), reset=args.reset)
            print(f"limits of {kid}: {json.dumps(own)} (the others: the service's defaults)")
        else:
            kid = store.resolve(args.id)
            store.revoke(kid)
            sessions = open_store(args.store, getattr(args, "store_url", None),
                                  recover=False)
            try:
                dropped = sessions.delete_owner(kid)
            finally:
                sessions.close()
            print(f"revoked {kid}; deleted {len(dropped)} sessions")
    finally:
        store.close()
    return 0


def serve_cmd(args) -> int:
    from .deploy.export import read_export
    from .deploy import processes
    from .service.app import insecure_reasons, refuse_insecure
    from .service.options import indexes_of
    from .service.run import serve

    indexes = indexes_of(args)
    if not args.exports and not indexes:
        raise InputError("nothing to serve: give export folders and/or --index NAME=PATH")
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into an exception so
    # the children below are stopped by the `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    infos = [read_export(d) for d in args.exports]
    names = [i.name for i in infos]
    if len(set(names)) != len(names):
        raise InputError(f"two exports have the same name: {names}")
    refuse_insecure(insecure_reasons(infos), args.allow_insecure)   # before any child starts
    store = Path(args.store)
    if args.ray:
        if indexes:
            raise InputError("--ray serves HE and TEE models; serve search indexes "
                             "(--index) without --ray")
        return _serve_ray(args, infos, store)
    backends: dict[str, dict] = {i.name: {} for i in infos}
    procs = processes.Processes(store / "logs")
    try:
        with _console().status("starting enclaves and MPC parties") as status:
            for info in infos:
                if "tee" in info.modes:
                    status.update(f"{info.name}: enclave")
                    if args.tee_enclave:
                        backends[info.name]["tee"] = processes.connect_tee(args.tee_enclave)
                    elif args.tee_attester_key:
                        backends[info.name]["tee"] = procs.tee(
                            info, attester_key=args.tee_attester_key,
                            key_release=args.tee_key_release)
                    else:
                        raise InputError(f"{info.name} has the tee mode: give "
                                         "--tee-attester-key DIR (start an enclave) or "
                                         "--tee-enclave HOST:PORT (a running one)")
                if "mpc" in info.modes:
                    status.update(f"{info.name}: MPC dealer and parties")
                    if not args.mpc_keys:
                        raise InputError(f"{info.name} has the mpc mode: give --mpc-keys "
                                         "DIR (folder of mpc-setup), and --mpc-parties "
                                         "P0,P1 for parties that run elsewhere")
                    if args.mpc_parties:
                        p0, p1 = args.mpc_parties.split(",")
                        backends[info.name]["mpc"] = processes.connect_mpc(
                            p0, p1, args.mpc_keys, frac_bits=args.mpc_frac_bits)
                    else:
                        backends[info.name]["mpc"] = procs.mpc(
                            info, args.mpc_keys, frac_bits=args.mpc_frac_bits)
        config = _service_config(args, infos, store, backends, indexes)
        notes = (["enclaves are vouched for by the software attester (--tee-attester-key): "
                  "no hardware protects them"]
                 if args.tee_attester_key and not args.tee_enclave
                 and any("tee" in i.modes for i in infos) else [])
        serve(config, *args.listen, metrics_listen=args.metrics_listen,
              tls_cert=args.tls_cert, tls_key=args.tls_key, insecure_notes=notes)
    finally:
        procs.close()
    return 0


def _serve_ray(args, infos, store: Path) -> int:
    """`veil serve --ray ADDRESS`: the same API on a Ray cluster (veil.service.scale)."""
    if any("mpc" in i.modes for i in infos):
        raise InputError("--ray serves HE and TEE models; serve MPC models without --ray "
                         "(each party's operator scales its own party: docs/ARCHITECTURE.md)")
    if args.tee_enclave and any("tee" in i.modes for i in infos):
        raise InputError("--ray starts an enclave in each replica: give "
                         "--tee-attester-key DIR, not --tee-enclave")
    try:
        from .service.scale import ScaleOptions, serve_on_ray
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Serve ({exc}): pip install 'veil[scale]'") from None
    options = ScaleOptions(args.ray, replicas=args.replicas, replica_cpus=args.replica_cpus,
                           he_threads=args.he_threads, tee_threads=args.tee_threads)
    config = _service_config(args, infos, store, {i.name: {} for i in infos})
    serve_on_ray(config, options, *args.listen, attester_key=args.tee_attester_key,
                 key_release=args.tee_key_release, tls_cert=args.tls_cert,
                 tls_key=args.tls_key)
    return 0


def _service_config(args, infos, store: Path, backends: dict, indexes: dict | None = None):
    """The ServiceConfig of `veil serve`'s options."""
    from .service.app import ServiceConfig, default_body_limits

    tuning = {field: value for field, value in (
        ("body_timeout_s", args.body_timeout), ("header_timeout_s", args.header_timeout),
        ("max_inflight_he", args.max_inflight_he),
        ("max_inflight_tee", args.max_inflight_tee),
        ("max_inflight_mpc", args.max_inflight_mpc)) if value is not None}
    uploads = {kind: value for kind, value in (
        ("keys", args.max_key_upload),
        ("weights", getattr(args, "max_weights_upload", None))) if value is not None}
    if uploads:
        tuning["max_body_bytes"] = {**default_body_limits(), **uploads}
    return ServiceConfig(exports=[i.directory for i in infos], store_dir=store,
                         session_ttl_s=args.ttl, disk_budget_bytes=args.disk_budget,
                         memory_budget_bytes=args.memory_budget, backends=backends,
                         he_workers=args.he_workers, worker_timeout_s=args.worker_timeout,
                         allow_insecure=args.allow_insecure, store_url=args.store_url,
                         indexes=indexes or {}, search_workers=args.search_workers,
                         **tuning)


def _say_clipped(x: np.ndarray, input_range) -> None:
    """``veil predict --clip``: how many values and rows of ``x`` the HE client clamps
    (row numbers of the whole input, not of one batch)."""
    try:
        batch = np.asarray(x, dtype=np.float64).reshape((len(x), *input_range.shape))
    except ValueError:
        return                            # a wrong shape: the client's error says so
    outside = input_range.outside(batch).reshape(len(batch), -1)
    rows = np.flatnonzero(outside.any(axis=1))
    if len(rows):
        listed = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        print(f"--clip: {int(outside.sum())} values in {len(rows)} of "
              f"{len(batch)} inputs (rows {listed}) clamped into the calibrated input "
              "range", file=sys.stderr)


def _needed_flags(args) -> None:
    """Refuse a mode's missing option by its flag (the SDK would name its argument)."""
    if args.mode == "tee" and not args.policy:
        raise InputError("--mode tee needs --policy FILE: the file of `veil tee-policy` "
                         "(which enclave measurements and attesters you trust), from "
                         "whoever vouches for the deployment")
    if args.mode == "mpc" and not args.mpc_keys:
        raise InputError("--mode mpc needs --mpc-keys DIR: the folder with the "
                         "deployment's public.json (from `veil mpc-setup`)")


def _predict_batches(client, x, args, bar) -> list:
    """The outputs of ``x`` in batches of ``--batch-size``, advancing ``bar``; on an
    error the bar's task is removed, so no frozen spinner stays above the message."""
    task = bar.add_task(f"{args.mode}: {len(x)} inputs", total=len(x))
    outs = []
    try:
        for i in range(0, len(x), args.batch_size):
            outs.append(client.infer_batch(x[i:i + args.batch_size]))
            bar.update(task, advance=len(outs[-1]))
    except BaseException:
        bar.remove_task(task)
        raise
    return outs
def weights_request_cmd(args) -> int:
    """``veil weights-request``: this client's session id and public key, for the owner."""
    from .sdk import Client

    options = {"key_dir": args.key_dir} if args.key_dir else {}
    with Client(args.url, args.model, "he", api_key=args.api_key,
                allow_insecure=args.allow_insecure, **options) as client:
        blob = client.mode.weights_request()
        sid = client.mode.session_id
    Path(args.out).write_bytes(blob)
    print(f"weights request for session {sid[:8]}… written to {args.out}: give it to the "
          "model owner (it holds your public key, nothing secret)")
    return 0


def owner_cmd(args) -> int:
    """``veil owner upload-weights``: encrypt and upload for one client's session."""
    from .sdk.owner import ModelOwner

    with ModelOwner(args.url, args.bundle, api_key=args.api_key) as owner:
        answer = owner.upload_weights(Path(args.request).read_bytes())
    print(f"encrypted weights uploaded to session {answer['session'][:8]}… "
          f"({answer['size']} bytes stored with it)")
    return 0


def predict_cmd(args) -> int:
    from .sdk import Client

    if args.clip and args.mode != "he":
        raise InputError("--clip clamps inputs into the calibrated range of the he mode's "
                         "client bundle; tee and mpc compute any input exactly")
    texts = args.text or (_read_texts(args.texts) if args.texts else None)
    x, y = (None, None) if texts else load_data(args.input)
    _needed_flags(args)
    options = {"progress": True} if args.mode == "he" else {}   # key generation and upload
    if args.clip:
        options["clip"] = True
    if args.mode == "he" and args.allow_insecure:
        options["allow_insecure"] = True
    if args.mode == "tee":
        options["policy"] = args.policy
    if args.mode == "mpc":
        options["mpc_keys"] = args.mpc_keys
    with Client(args.url, args.model, args.mode, api_key=args.api_key, **options) as client:
        if texts:
            x = client.tokenize(texts)        # on this machine: the service sees shares
        # the input contract (veil.backends.inputs): a file of exactly the input shape
        # is ONE input, (B, *input_shape) a batch
        x, _ = as_inputs(x, client.info()["input_shape"])
        with _progress() as bar, warnings.catch_warnings():
            if args.clip:           # one count over all inputs instead of one per batch
                _say_clipped(x, client.mode.input_range)
                warnings.simplefilter("ignore", InputClippedWarning)
            outs = _predict_batches(client, x, args, bar)
        head = client.head             # the output head, computed here (veil.ir.head)
    out = head.scores(np.concatenate(outs))
    if args.out:
        np.save(args.out, out)
        print(f"outputs written to {args.out}")
    classes = head.predict(out)
    if y is not None:
        print(f"accuracy {np.mean(classes == y):.4f} on {len(y)} labelled inputs")
    elif not args.out:
        print(json.dumps(classes.tolist()))
    return 0


def index_build_cmd(args) -> int:
    """``veil index build``: texts (embedded here with MiniLM-L6) or vectors -> an index."""
    from .search.index import MINILM, build_index, embed_texts

    model = None
    if args.texts:
        texts = [line.strip() for line in
                 Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise InputError(f"{args.texts} has no documents (one per line)")
        vectors, model = embed_texts(texts), MINILM
    else:
        try:
            vectors = np.load(args.vectors, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {args.vectors} as an .npy array: {exc}") from None
    ids = None
    if args.ids:
        ids = [line.rstrip("\n") for line in
               Path(args.ids).read_text(encoding="utf-8").splitlines()]
    index = build_index(vectors, ids, clusters=args.clusters, spill=args.spill, model=model,
                        normalize=not args.no_normalize)
    index.save(args.out)
    print(f"wrote {args.out}: {index.count} documents of {index.dim} dimensions, "
          f"{index.layout.blocks} blocks"
          + (f", {len(index.layout.cluster_blocks)} clusters" if index.clustered else ""))
    return 0


def search_cmd(args) -> int:
    """``veil search``: an encrypted query against a served index; prints the top k."""
    from .sdk import Client

    query = args.text
    if query is None:
        try:
            query = np.load(args.vector, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {args.vector} as an .npy array: {exc}") from None
    with Client(args.url, index=args.index, ca=args.ca) as client:
        result = client.search(query, args.k, probe=args.probe, decoys=args.decoys)
    for doc, score in zip(result.ids, result.scores):
        print(f"{score:.6f}\t{doc}")
    return 0

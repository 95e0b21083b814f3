"""The enclave's model bundle: export (optionally encrypted at rest), measure, load.

An export folder holds ``tee-model.json`` (format, versions, shapes, the model runtime
and its dtype, whether the model is encrypted and under which key id) and
``tee-model.bin`` (a :mod:`veil.wire` envelope with the graph as JSON and its arrays as
``.npz``; nothing pickled). The graph is the TEE target's lowering
(:func:`veil.compiler.targets.lower`: the ops checked, batch norms folded; convolutions
stay convolutions), run in the enclave by a native runtime (``executor.py``).

Encrypted at rest: ``tee-model.bin`` is AES-256-GCM under a random 32-byte model key
(associated data: a label and the key id). The key goes to a separate folder, mode 0600,
for the key-release service (``keyrelease.py``); the enclave receives it only after the
service has checked its evidence.

The measurement is SHA-256 over canonical JSON of: the veil version, a digest of every
``.py`` file of the ``veil`` package (path and contents), the numpy version, the model
runtime's name, dtype and installed version, and the digests of both bundle files. The model developer computes it with the same function
(``veil tee-policy``) to write the clients' policy.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..._files import write_private
from ... import wire
from ..._version import __version__
from ...compiler.targets import lower
from ...errors import BundleError, GraphError, SerializationError, TEEError
from ...ir import Graph
from ...ir.serialize import graph_from_json, graph_to_json
from .executor import RuntimeSpec, check_kernels, runtime_version

MANIFEST = "tee-model.json"
MODEL = "tee-model.bin"
FORMAT = "veil-tee-model"
_MODEL_AAD = b"veil/tee/model/v1\x00"


@dataclass(frozen=True)
class Export:
    """What :func:`export_model` wrote."""

    directory: Path
    measurement: str
    key_id: str | None


def model_key_path(key_dir: str | os.PathLike, key_id: str) -> Path:
    return Path(key_dir) / f"model-{key_id}.key"


def compile_for_tee(graph: Graph) -> Graph:
    """The enclave's graph: the TEE target's exact lowering (batch norms folded into
    the layers before them; every other op as it is, run natively).

    Raises:
        UnsupportedOperation: an op the TEE target does not accept.
    """
    return lower(graph, "tee")[0]


def _kernels(runtime: str):
    if runtime == "onnxruntime":
        from .onnx_kernels import KERNELS
    elif runtime == "torch":
        from .torch_kernels import KERNELS
    else:
        from ...ir.ops import REGISTRY as KERNELS
    return KERNELS


def export_model(graph: Graph, directory: str | os.PathLike,
                 key_dir: str | os.PathLike | None = None,
                 runtime: RuntimeSpec | str | None = None) -> Export:
    """Write the enclave bundle of ``graph`` to ``directory``.

    Args:
        graph: the model as IR (``veil.frontend.to_graph``).
        directory: the export folder (created).
        key_dir: when given, the bundle is encrypted with a fresh model key written
            there (mode 0600) for ``veil tee-key-release``.
        runtime: the enclave's model runtime (a :class:`RuntimeSpec` or a runtime name
            with its default dtype); default onnxruntime, float32.

    Returns:
        The folder, its measurement and the model key id (None when not encrypted).

    Raises:
        UnsupportedOperation: an op the TEE target or the runtime cannot run.
        TEEError: the runtime is unknown or not installed (the measurement names its
            version).
    """
    spec = runtime if isinstance(runtime, RuntimeSpec) else \
        RuntimeSpec.default_for(runtime) if runtime else RuntimeSpec()
    lowered = compile_for_tee(graph)
    check_kernels(lowered, _kernels(spec.name), spec.name)
    runtime_version(spec.name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc, arrays = graph_to_json(lowered)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = wire.pack("tee-model", {"graph": json.dumps(doc).encode(), "arrays": buf.getvalue()},
                     {"veil": __version__})
    key_id = None
    if key_dir is not None:
        key, key_id = AESGCM.generate_key(256), secrets.token_hex(16)
        path = model_key_path(key_dir, key_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, key)
        nonce = secrets.token_bytes(12)
        blob = nonce + AESGCM(key).encrypt(nonce, blob, _MODEL_AAD + key_id.encode())
    (d / MODEL).write_bytes(blob)
    (d / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "version": 1, "veil": __version__, "encrypted": key_id is not None,
        "key_id": key_id, "runtime": spec.to_json(), "input_shape": list(lowered.input_shape),
        "output_shape": list(lowered.output_shape)}, indent=1))
    measurement = measure(d)
    if key_id is not None:   # the key-release service gives this key to this measurement only
        model_key_path(key_dir, key_id).with_suffix(".json").write_text(
            json.dumps({"key_id": key_id, "measurement": measurement}))
    return Export(d, measurement, key_id)


def read_manifest(directory: str | os.PathLike) -> dict:
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"no readable TEE bundle in {directory}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != 1:
        raise BundleError(f"{directory} is not a version-1 TEE bundle (veil tee-export)")
    return manifest


def code_digest() -> str:
    """SHA-256 over every ``.py`` file of the veil package (relative path and bytes)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def measure(directory: str | os.PathLike) -> str:
    """The enclave's measurement for the bundle in ``directory`` (sha256 hex)."""
    d = Path(directory)
    read_manifest(d)
    try:
        files = {name: hashlib.sha256((d / name).read_bytes()).hexdigest()
                 for name in (MANIFEST, MODEL)}
    except OSError as exc:
        raise BundleError(f"incomplete TEE bundle in {d}: {exc}") from None
    spec = load_runtime(d)
    doc = {"veil": __version__, "code": code_digest(), "numpy": np.__version__,
           "runtime": dict(spec.to_json(), version=runtime_version(spec.name)),
           "bundle": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def load_runtime(directory: str | os.PathLike) -> RuntimeSpec:
    """The runtime the bundle in ``directory`` names (bundles from before runtimes were
    recorded ran the interpreter).

    Raises:
        BundleError: no bundle, or a malformed runtime entry.
    """
    try:
        return RuntimeSpec.from_json(read_manifest(directory).get("runtime"))
    except TEEError as exc:
        raise BundleError(f"{directory}: {exc}") from None


def load_model(directory: str | os.PathLike, model_key: bytes | None = None) -> Graph:
    """The enclave's graph; ``model_key`` (from key release) opens an encrypted bundle.

    Raises:
        BundleError: missing or malformed files, an encrypted bundle without its key,
            or a key that does not open it.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    try:
        blob = (d / MODEL).read_bytes()
    except OSError as exc:
        raise BundleError(f"incomplete TEE bundle in {d}: {exc}") from None
    if manifest["encrypted"]:
        if model_key is None:
            raise BundleError("this bundle is encrypted; the enclave needs its key from "
                              "the key-release service (--key-release HOST:PORT)")
        try:
            blob = AESGCM(model_key).decrypt(blob[:12], blob[12:],
                                             _MODEL_AAD + str(manifest["key_id"]).encode())
        except (InvalidTag, ValueError):
            raise BundleError("the released key does not open this model bundle") from None
    try:
        _, parts = wire.unpack(blob, "tee-model")
        with np.load(io.BytesIO(parts["arrays"]),
                     allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        graph = graph_from_json(json.loads(parts["graph"].decode()), arrays)
    except (SerializationError, GraphError, KeyError, ValueError, OSError) as exc:
        raise BundleError(f"the TEE model in {d} is malformed: {exc}") from None
    if list(graph.input_shape) != manifest["input_shape"]:
        raise BundleError("the TEE model does not match its manifest")
    return graph

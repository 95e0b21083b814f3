"""Server and client bundles: what the model developer hands to each role.

``server/`` holds the lowered graph, its weights, the CKKS parameters and the key
manifest; no key material. ``client/`` holds the parameters, the manifest, and how to
lay inputs into slots and read outputs back; no weights. Both are JSON + npz with a
format version and the library versions, checked on load.

:func:`max_input_bytes` and :meth:`ServerBundle.summary` need neither the graph nor
OpenFHE: the HTTP service sizes and routes requests with them, while only its worker
processes load the model.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._version import __version__
from ..compiler.plan import CKKSParams
from ..compiler.ranges import InputRange
from ..errors import BundleError, GraphError
from ..ir import Graph
from ..ir.serialize import graph_from_json, graph_to_json
from ..wire import fingerprint

BUNDLE_FORMAT = 1
SERVER_KIND, CLIENT_KIND = "veil-server-bundle", "veil-client-bundle"


def library_versions() -> dict:
    from importlib import metadata

    out = {"veil": __version__, "python": platform.python_version()}
    for lib in ("openfhe", "numpy"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def _check_header(data: dict, kind: str, where: Path) -> None:
    if data.get("kind") != kind:
        raise BundleError(f"{where} is not a {kind}")
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where} has bundle format {data.get('format')}; this veil "
                          f"reads format {BUNDLE_FORMAT}: re-export it with veil {__version__}")
    libs = data.get("libraries", {})
    ours = library_versions()
    if libs.get("openfhe") != ours["openfhe"]:
        raise BundleError(f"{where} was exported with OpenFHE {libs.get('openfhe')}, this "
                          f"process has {ours['openfhe']}; ciphertexts would not interoperate")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing: export the model with compiled.export()") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is unreadable: {exc}") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ClientBundle:
    params: CKKSParams
    manifest: dict

    @cached_property
    def model_id(self) -> str:
        """The manifest's fingerprint, hashed once: the bundle is frozen and nothing
        in veil mutates a manifest after it is built."""
        return fingerprint(self.manifest)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["output"]["shape"])

    @cached_property
    def input_range(self) -> InputRange:
        """The calibrated input range, per feature (one pair for every feature in a
        bundle written before per-feature bounds): :mod:`veil.compiler.ranges`."""
        return InputRange.from_manifest(self.manifest["input"])

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        doc = {"kind": CLIENT_KIND, "format": BUNDLE_FORMAT, "libraries": library_versions(),
               "insecure_test_params": self.params.insecure_test_params,
               "params": self.params.to_dict(), "manifest": self.manifest}
        _write_atomic(d / "client.json", json.dumps(doc, indent=1).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ClientBundle":
        path = Path(directory) / "client.json"
        data = _read_json(path)
        _check_header(data, CLIENT_KIND, path)
        try:
            bundle = cls(CKKSParams.from_dict(data["params"]), data["manifest"])
            bundle.input_range                      # malformed bounds: refused here
            return bundle
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{path} is malformed: {exc}") from exc
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None


def max_input_bytes(params: CKKSParams, manifest: dict) -> int:
    """Most bytes of one encrypted request (``ServerSession.run``) for this model.

    A fresh ciphertext is 2 polynomials x ring x (depth + 1) towers x 8 bytes; a request
    is one of them (lanes) or one per feature. Anything larger is refused before it is
    read, so a client cannot make the server buffer arbitrary bytes."""
    entry = manifest["input"]
    width = len(entry["gather"]) if "gather" in entry else int(np.prod(entry["shape"]))
    one = 2 * params.ring_dim * (params.mult_depth + 1) * 8 + 4096
    return one * max(1, width) + (1 << 16)


def _zeros_like(value):
    """A weight of the same shape, all zero (a sparse matrix keeps its structure, which
    the model's architecture already tells, and loses its values)."""
    if sp.issparse(value):
        out = sp.csr_array(value, copy=True)
        out.data[:] = 0.0
        return out
    return np.zeros_like(value)


@dataclass(frozen=True)
class ServerSummary:
    """What a server bundle says about its requests, without its graph and weights."""

    params: CKKSParams
    manifest: dict
    weights: str = "plain"

    @cached_property
    def model_id(self) -> str:
        """The manifest's fingerprint, hashed once: the bundle is frozen and nothing
        in veil mutates a manifest after it is built."""
        return fingerprint(self.manifest)

    @property
    def max_input_bytes(self) -> int:
        return max_input_bytes(self.params, self.manifest)


@dataclass(frozen=True)
class ServerBundle:
    graph: Graph
    params: CKKSParams
    manifest: dict
    weights: str = "plain"   # "encrypted": the graph's weights are zeros; see deploy.owner

    @cached_property
    def model_id(self) -> str:
        """The manifest's fingerprint, hashed once: the bundle is frozen and nothing
        in veil mutates a manifest after it is built."""
        return fingerprint(self.manifest)

    def without_weights(self) -> "ServerBundle":
        """The host's copy for encrypted-weight mode: every weight replaced by zero."""
        nodes = [n.replace(params={k: _zeros_like(v) for k, v in n.params.items()})
                 for n in self.graph.nodes]
        return ServerBundle(self.graph.with_nodes(nodes), self.params, self.manifest,
                            "encrypted")

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        graph_doc, arrays = graph_to_json(self.graph)
        doc = {"kind": SERVER_KIND, "format": BUNDLE_FORMAT, "libraries": library_versions(),
               "insecure_test_params": self.params.insecure_test_params,
               "params": self.params.to_dict(), "manifest": self.manifest,
               "weights": self.weights, "graph": graph_doc}
        tmp = d / "weights.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, d / "weights.npz")
        _write_atomic(d / "model.json", json.dumps(doc, indent=1).encode())

    @property
    def max_input_bytes(self) -> int:
        return max_input_bytes(self.params, self.manifest)

    @staticmethod
    def summary(directory: str | os.PathLike) -> ServerSummary:
        """The parameters and manifest of the bundle in ``directory`` (its ``model.json``
        only, checked like :meth:`load`); BundleError if unreadable."""
        path = Path(directory) / "model.json"
        data = _read_json(path)
        _check_header(data, SERVER_KIND, path)
        try:
            params, manifest = CKKSParams.from_dict(data["params"]), data["manifest"]
            max_input_bytes(params, manifest)        # the manifest describes its input
            return ServerSummary(params, manifest, data.get("weights", "plain"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path} is malformed: {exc}") from exc

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ServerBundle":
        d = Path(directory)
        data = _read_json(d / "model.json")
        _check_header(data, SERVER_KIND, d / "model.json")
        try:
            with np.load(d / "weights.npz", allow_pickle=False) as arrays:
                graph = graph_from_json(data["graph"], {k: arrays[k] for k in arrays.files})
            return cls(graph, CKKSParams.from_dict(data["params"]), data["manifest"],
                       data.get("weights", "plain"))
        except (OSError, ValueError, KeyError, TypeError, GraphError) as exc:
            raise BundleError(f"server bundle in {d} is malformed: {exc}") from exc

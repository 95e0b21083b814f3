"""One export folder per model, holding what each mode's server needs.

Layout (``write_export``; ``veil.model.export_model`` compiles a model and writes it)::

    EXPORT/veil-export.json   {"format": 1, "name", "modes", "input_shape", "output_shape",
                               "veil", "he": {"model_id", "lanes", "weights"},
                               "tee": {"measurement", "encrypted"},
                               "head": the output head clients compute (veil.ir.head)}
    EXPORT/he/server/          server bundle (graph, weights, manifest; no keys)
    EXPORT/he/client/          client bundle (parameters, manifest, layouts; no weights)
    EXPORT/tee/                enclave bundle (``backends/tee/bundle.py``), optionally
                               encrypted with a model key written to ``tee_keys``
    EXPORT/mpc/                the MPC form of the graph (``backends/mpc/service.py``)

``veil serve EXPORT...`` serves each folder as one model (named by ``name``);
``read_export`` checks the index before anything else is loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..errors import BundleError, ModeError
from ..ir import Graph
from ..modes import SERVED, parse_modes
from .bundle import ClientBundle, ServerBundle

INDEX = "veil-export.json"
FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ExportInfo:
    """What ``veil-export.json`` says about an export folder."""

    directory: Path
    name: str
    modes: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    index: dict

    def path(self, mode: str) -> Path:
        if mode not in self.modes:
            raise ModeError(f"model {self.name!r} was not exported for mode {mode!r} "
                            f"(it has {', '.join(self.modes)})")
        return self.directory / mode


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BundleError(f"model names are 1-64 letters, digits, '.', '_' or '-' "
                          f"(starting with a letter or digit), not {name!r}")
    return name


def check_modes(modes) -> tuple[str, ...]:
    """Export modes (a comma-separated string or names): some of ``SERVED``."""
    return parse_modes(modes, SERVED, "export modes")


def write_export(directory: str | os.PathLike, graph: Graph, *, name: str | None = None,
                 modes=SERVED, he: tuple[ServerBundle, ClientBundle] | None = None,
                 encrypted_weights: bool = False,
                 tee_keys: str | os.PathLike | None = None,
                 text: dict | None = None) -> ExportInfo:
    """Write the export folder of ``graph`` (the model's source graph).

    ``veil.model.export_model`` compiles a model and calls this; the model's layer
    passes down what the folder holds, so nothing here imports it.

    Args:
        name: the model's name in the service (default: the folder's name).
        modes: some of :data:`veil.modes.SERVED`.
        he: the compiled model's server and client bundles (``CompiledModel.
            server_bundle()`` / ``client_bundle()``); needed for ``he``.
        encrypted_weights: HE server bundle without weights (the model owner sends
            encrypted weights per client).
        tee_keys: encrypt the enclave bundle; its model key is written here (0600).
        text: a text model's tokenizer (``{"tokenizer": ..., "seq_len": ...}``, the
            model's ``veil_text``): clients tokenize texts with it (``veil.text``).
    """
    d = Path(directory)
    name = check_name(name or d.name)
    modes = check_modes(modes)
    if "he" in modes and he is None:
        raise ModeError("exporting for 'he' needs the compiled model's bundles (he=...)")
    index = {"format": FORMAT, "name": name, "modes": list(modes), "veil": __version__,
             "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape)}
    if text:
        index["text"] = {"tokenizer": str(text["tokenizer"]), "seq_len": int(text["seq_len"])}
    if graph.head is not None and not graph.head.empty:
        index["head"] = graph.head.to_dict()      # the client's part (veil.ir.head)
    d.mkdir(parents=True, exist_ok=True)
    if "he" in modes:
        server, client = he
        (server.without_weights() if encrypted_weights else server).save(d / "he" / "server")
        client.save(d / "he" / "client")
        index["he"] = {"model_id": client.model_id,
                       "lanes": int(client.manifest.get("lanes", 1)),
                       "weights": "encrypted" if encrypted_weights else "plaintext"}
    if "tee" in modes:
        from ..backends.tee.bundle import export_model as export_tee

        ex = export_tee(graph, d / "tee", tee_keys)
        index["tee"] = {"measurement": ex.measurement, "encrypted": ex.key_id is not None}
    if "mpc" in modes:
        from ..backends.mpc.service import save_model

        save_model(graph, d / "mpc")
    (d / INDEX).write_text(json.dumps(index, indent=1))
    return read_export(d)


def read_export(directory: str | os.PathLike) -> ExportInfo:
    """The export index of ``directory``; BundleError when it is missing or malformed."""
    d = Path(directory)
    try:
        index = json.loads((d / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise BundleError(f"{d}: export format {index.get('format')!r} is not {FORMAT}")
        modes = check_modes(index["modes"])
        info = ExportInfo(d, check_name(index["name"]), modes,
                          tuple(int(v) for v in index["input_shape"]),
                          tuple(int(v) for v in index["output_shape"]), index)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{d} is not a veil export folder ({INDEX}): {exc}") from None
    missing = [m for m in modes if not (d / m).is_dir()]
    if missing:
        raise BundleError(f"{d}: the index lists {missing} but the folders are missing")
    return info

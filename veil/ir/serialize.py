"""Graph <-> (JSON-able dict, named arrays). Arrays go to .npz files, never pickles.

A sparse parameter (a large DENSE node's matrix) is stored as its CSR arrays
(``name/key.data``, ``.indices``, ``.indptr`` and ``.shape``) and listed under the
node's ``sparse`` keys; it is rebuilt and checked on load.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import GraphError
from .graph import Graph, Node, Op


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def graph_to_json(graph: Graph) -> tuple[dict, dict[str, np.ndarray]]:
    nodes, arrays = [], {}
    for n in graph.nodes:
        nodes.append({"name": n.name, "op": n.op.value, "inputs": list(n.inputs),
                      "shape": list(n.shape),
                      "attrs": {k: _jsonable(v) for k, v in n.attrs.items()},
                      "params": sorted(n.params)})
        for key, arr in n.params.items():
            if sp.issparse(arr):
                nodes[-1].setdefault("sparse", []).append(key)
                csr = sp.csr_array(arr)
                for part in ("data", "indices", "indptr"):
                    arrays[f"{n.name}/{key}.{part}"] = getattr(csr, part)
                arrays[f"{n.name}/{key}.shape"] = np.asarray(csr.shape, dtype=np.int64)
            else:
                arrays[f"{n.name}/{key}"] = np.asarray(arr)
    data = {"nodes": nodes, "output": graph.output}
    if graph.head is not None and not graph.head.empty:
        data["head"], head_arrays = graph.head.to_json()
        arrays.update({f"head:{k}": v for k, v in head_arrays.items()})
    return data, arrays


def _frozen(a) -> np.ndarray:
    """A loaded array as float64, read-only: the node takes it without a copy when it
    was loaded as float64 already (its own memory, nobody else holds it)."""
    out = np.asarray(a, dtype=np.float64)
    if out is a and not (isinstance(a, np.ndarray) and a.flags.owndata):
        out = out.copy()
    out.setflags(write=False)
    return out


def _csr(arrays, prefix: str) -> sp.csr_array:
    """A CSR matrix from its stored arrays, its indices checked against its shape."""
    rows, cols = (int(v) for v in np.asarray(arrays[f"{prefix}.shape"]))
    indices = np.asarray(arrays[f"{prefix}.indices"])
    indptr = np.asarray(arrays[f"{prefix}.indptr"])
    data = _frozen(arrays[f"{prefix}.data"])
    if (indptr.shape != (rows + 1,) or indices.shape != data.shape or indptr[0] != 0
            or indptr[-1] != data.size or np.any(np.diff(indptr) < 0)
            or (indices.size and (indices.min() < 0 or indices.max() >= cols))):
        raise ValueError(f"sparse parameter {prefix} is inconsistent")
    return sp.csr_array((data, indices, indptr), shape=(rows, cols))


class _Prefixed:
    """The arrays under ``prefix`` (a head's, stored beside its graph's)."""

    def __init__(self, arrays, prefix: str) -> None:
        self.arrays, self.prefix = arrays, prefix

    def __getitem__(self, key: str):
        return self.arrays[self.prefix + key]


def graph_from_json(data: dict, arrays) -> Graph:
    """Rebuild and verify a graph; raises GraphError on anything malformed."""
    try:
        nodes = []
        for d in data["nodes"]:
            sparse = set(d.get("sparse", ()))
            params = {k: (_csr(arrays, f"{d['name']}/{k}") if k in sparse
                          else _frozen(arrays[f"{d['name']}/{k}"])) for k in d["params"]}
            nodes.append(Node(str(d["name"]), Op(d["op"]), tuple(d["inputs"]),
                              tuple(d["shape"]), dict(d["attrs"]), params))
        head = None
        if data.get("head") is not None:
            from .head import Head

            head = Head.from_json(data["head"], _Prefixed(arrays, "head:"))
        return Graph(tuple(nodes), str(data["output"]), head)
    except (KeyError, TypeError, ValueError) as exc:
        raise GraphError(f"serialized graph is malformed: {exc}") from exc

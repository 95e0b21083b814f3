"""Graph <-> (JSON-able dict, named arrays). Arrays go to .npz files, never pickles."""
from __future__ import annotations

from typing import Any

import numpy as np

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
            arrays[f"{n.name}/{key}"] = np.asarray(arr)
    return {"nodes": nodes, "output": graph.output}, arrays


def _frozen(a) -> np.ndarray:
    """A loaded array as float64, read-only: the node takes it without a copy when it
    was loaded as float64 already (its own memory, nobody else holds it)."""
    out = np.asarray(a, dtype=np.float64)
    if out is a and not (isinstance(a, np.ndarray) and a.flags.owndata):
        out = out.copy()
    out.setflags(write=False)
    return out


def graph_from_json(data: dict, arrays) -> Graph:
    """Rebuild and verify a graph; raises GraphError on anything malformed."""
    try:
        nodes = []
        for d in data["nodes"]:
            params = {k: _frozen(arrays[f"{d['name']}/{k}"]) for k in d["params"]}
            nodes.append(Node(str(d["name"]), Op(d["op"]), tuple(d["inputs"]),
                              tuple(d["shape"]), dict(d["attrs"]), params))
        return Graph(tuple(nodes), str(data["output"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise GraphError(f"serialized graph is malformed: {exc}") from exc

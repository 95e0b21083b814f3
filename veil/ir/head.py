"""Output heads: the tail of a model that the client computes, after decryption.

A classifier's last Softmax / Sigmoid / LogSoftmax (and what a converter stacks after
it: the ``1 - p`` column of a binary classifier, scikit-learn's L1 normalization, its
class labels) needs no secret and costs a server the most: under CKKS a polynomial of
high degree fitted over a wide range (degree 27 over [-44, 41] for one sigmoid, error
0.2), under MPC an exponential and a reciprocal. The client computes it exactly and for
free once it holds the logits. :func:`split_head` cuts a graph at its head; the server
runs the graph up to the logits, the client runs :attr:`Head.graph` with the plaintext
interpreter (float64: the same numbers in every mode).

A :class:`Head` also knows how the model decides a class (:meth:`Head.predict`): the
largest score, or for one output column a threshold (0 for a logit or a decision
function, 1/2 for a probability), mapped to the classifier's labels when it has some.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GraphError
from .ops import Op

# The ops a head starts with, and those it may continue with (no weights that
# matter, nothing that mixes samples). A head is cut only at a START op.
START_OPS = frozenset({Op.SIGMOID, Op.SOFTMAX, Op.LOGSOFTMAX, Op.NORMALIZE, Op.FLOAT32})
TAIL_OPS = START_OPS | frozenset({Op.AFFINE, Op.BATCHNORM, Op.CONCAT, Op.ADD, Op.SUB,
                                  Op.MUL, Op.RESHAPE, Op.GATHER, Op.SLICE})
RETURNS = ("scores", "labels")
HEAD_INPUT = "head_input"
MAX_HEAD_VALUES = 1 << 16     # a head's constants (heads are a few ops on the logits)


@dataclass(frozen=True)
class Head:
    """What the client does with the server's output.

    Attributes:
        graph: the client's part (an IR graph whose input is the server's output), or
            None when the server's output is the model's output.
        labels: the classifier's class labels (ints or strings), index i for score i;
            None: the class is the index.
        returns: ``"scores"`` (the model's output array) or ``"labels"`` (the user chose
            a classifier's label output: :meth:`finish` returns labels).
    """

    graph: Any = None
    labels: tuple | None = None
    returns: str = "scores"
    # set by __post_init__: 0.5 when the model's output is one probability
    threshold: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.returns not in RETURNS:
            raise GraphError(f"head returns {self.returns!r}; one of {RETURNS}")
        if self.labels is not None:
            labels = tuple(v.item() if isinstance(v, np.generic) else v for v in self.labels)
            if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in labels):
                raise GraphError("class labels must be ints or strings")
            object.__setattr__(self, "labels", labels)
        last = (self.graph.node(self.graph.output).op if self.graph is not None else None)
        object.__setattr__(self, "threshold", 0.5 if last is Op.SIGMOID else 0.0)

    @property
    def empty(self) -> bool:
        return self.graph is None and self.labels is None and self.returns == "scores"

    def ops(self) -> list[str]:
        """The client's ops, in order (for reports)."""
        return [] if self.graph is None else [n.op.value for n in self.graph.nodes[1:]]

    def scores(self, server_out: np.ndarray) -> np.ndarray:
        """The model's output scores from the server's output batch (B, ...)."""
        if self.graph is None:
            return np.asarray(server_out, dtype=np.float64)
        from .interpreter import run

        return run(self.graph, np.asarray(server_out, dtype=np.float64))

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Each row's class (its label when the classifier has labels) from the model's
        output scores (B, ...): the largest score, or with one score per row
        ``score > threshold``."""
        flat = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
        if flat.shape[1] == 1:
            index = (flat[:, 0] > self.threshold).astype(np.int64)
        else:
            index = flat.argmax(axis=1)
        if self.labels is None:
            return index
        if index.size and int(index.max()) >= len(self.labels):
            raise GraphError(f"{flat.shape[1]} scores but {len(self.labels)} class labels")
        return np.asarray(self.labels)[index]

    def classify(self, server_out: np.ndarray) -> np.ndarray:
        """Each row's class from the server's output batch (:meth:`predict` of
        :meth:`scores`)."""
        return self.predict(self.scores(server_out))

    def finish(self, server_out: np.ndarray) -> np.ndarray:
        """The model's output from the server's: scores, or labels when ``returns`` is
        ``"labels"``."""
        return self.classify(server_out) if self.returns == "labels" else \
            self.scores(server_out)

    # -- serialization (JSON + arrays, no pickle) ----------------------------------------
    def to_json(self) -> tuple[dict, dict[str, np.ndarray]]:
        from .serialize import graph_to_json

        data: dict = {"returns": self.returns,
                      "labels": None if self.labels is None else list(self.labels)}
        arrays: dict[str, np.ndarray] = {}
        if self.graph is not None:
            data["graph"], arrays = graph_to_json(self.graph)
        return data, arrays

    def to_dict(self) -> dict:
        """Plain JSON (the head's few constants as lists): an export's index, the
        service's model description."""
        data, arrays = self.to_json()
        data["arrays"] = {k: {"shape": list(np.shape(v)),
                              "values": np.asarray(v, dtype=np.float64).ravel().tolist()}
                          for k, v in arrays.items()}
        return data

    @staticmethod
    def from_dict(data: dict) -> "Head":
        """The head of :meth:`to_dict` (from a file or a service: checked, verified)."""
        try:
            arrays = {str(k): np.asarray(v["values"], dtype=np.float64).reshape(
                          [int(d) for d in v["shape"]])
                      for k, v in dict(data.get("arrays") or {}).items()}
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise GraphError(f"serialized head is malformed: {exc}") from exc
        if sum(a.size for a in arrays.values()) > MAX_HEAD_VALUES:
            raise GraphError(f"a serialized head holds more than {MAX_HEAD_VALUES} values")
        return Head.from_json(data, arrays)

    @staticmethod
    def from_json(data: dict, arrays) -> "Head":
        from .serialize import graph_from_json

        try:
            graph = graph_from_json(data["graph"], arrays) if data.get("graph") else None
            labels = data.get("labels")
            return Head(graph, None if labels is None else tuple(labels),
                        str(data.get("returns", "scores")))
        except (KeyError, TypeError, AttributeError) as exc:
            raise GraphError(f"serialized head is malformed: {exc}") from exc


def run_model(graph, x: np.ndarray) -> np.ndarray:
    """The model's output on a batch: the interpreter's, then the head's (what
    ``CompiledModel.run(x, "plain")`` returns)."""
    from .interpreter import run

    out = run(graph, x)
    return out if graph.head is None else graph.head.finish(out)


def check_head(head: Head, server_shape: tuple[int, ...]) -> None:
    """The head reads what the server computes; raise GraphError otherwise."""
    if head.graph is not None and head.graph.input_shape != tuple(server_shape):
        raise GraphError(f"the head reads {head.graph.input_shape}, the graph outputs "
                         f"{tuple(server_shape)}")


def _ancestors(graph, name: str) -> set[str]:
    by_name = {n.name: n for n in graph.nodes}
    seen, todo = set(), [name]
    while todo:
        cur = todo.pop()
        if cur not in seen:
            seen.add(cur)
            todo.extend(by_name[cur].inputs)
    return seen


def _cut(graph):
    """The earliest START node whose tail is a valid head, with the tail's names."""
    live = _ancestors(graph, graph.output)
    for node in graph.nodes:
        if node.name not in live or node.op not in START_OPS:
            continue
        (source,) = node.inputs
        tail = live - _ancestors(graph, source)
        nodes = [n for n in graph.nodes if n.name in tail]
        if all(n.op in TAIL_OPS and set(n.inputs) <= tail | {source} for n in nodes):
            return source, nodes
    return None


def split_head(graph, *, labels=None, returns: str = "scores"):
    """``graph`` cut at its output head: the server's graph, whose :attr:`head` holds
    the client's part (and ``labels`` / ``returns``). A graph without one keeps all its
    nodes. Pure: ``graph`` is not modified."""
    from .graph import Graph, Node

    if graph.head is not None:
        if graph.head.graph is not None:
            return graph                   # split already (an ONNX export's frontend)
        labels = labels if labels is not None else graph.head.labels
        returns = returns if returns != "scores" else graph.head.returns
    found = _cut(graph)
    if found is None:
        return Graph(graph.nodes, graph.output, Head(None, labels, returns))
    source, tail = found
    keep = _ancestors(graph, source)
    server = tuple(n for n in graph.nodes if n.name in keep)
    src = next(n for n in server if n.name == source)
    client = [Node(HEAD_INPUT, Op.INPUT, (), src.shape, {"shape": src.shape})]
    client += [n.replace(inputs=tuple(HEAD_INPUT if i == source else i for i in n.inputs))
               for n in tail]
    head = Head(Graph(tuple(client), graph.output), labels, returns)
    return Graph(server, source, head)


def merge_head(graph, head: Head):
    """``graph`` with its head's ops appended (computed by the server again), under
    ``head`` (which must have no graph of its own)."""
    from .graph import Graph

    old = graph.head
    if old is None or old.graph is None:
        return Graph(graph.nodes, graph.output, head)
    moved = tuple(n.replace(inputs=tuple(graph.output if i == HEAD_INPUT else i
                                         for i in n.inputs)) for n in old.graph.nodes[1:])
    return Graph(graph.nodes + moved, old.graph.output, head)

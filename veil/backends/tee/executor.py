"""The enclave's model runtimes: an IR graph run at native speed.

Three runtimes, each a kernel table keyed by :class:`~veil.ir.Op` (one entry per op,
like the registry); the ``tee`` compile target accepts exactly the ops they all
implement (``tests/test_tee_runtime.py`` checks both directions):

- ``onnxruntime`` (the default, pinned in the ``tee`` extra): the graph is translated to
  ONNX inside the enclave (``onnx_kernels.py``) and run by onnxruntime's CPU provider,
  float32. Chosen by measurement (``bench/results/tee_zoo.md``): on ResNet-18 and
  MobileNetV2 at 224x224 with 2 threads it was the fastest at batch 1 and 8 (1.8x or
  more over torch float32, 6x or more over the interpreter, on a shared 2-core
  machine) with half torch's peak memory or less (the enclave never loads torch).
- ``torch`` (``veil[torch]``): eager torch kernels (``torch_kernels.py``), float32 or
  float64 (the float64 one agrees with the reference to rounding, at several times the
  cost).
- ``interpreter``: the IR's numpy reference interpreter (float64; the specification,
  and the runtime before this one).

The plaintext baseline server runs the same runtime as the enclave, so their difference
is sealing alone. The bundle's manifest names the runtime and dtype; the measurement
covers them and the installed runtime's version (``bundle.measure``).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Mapping

import numpy as np

from ...errors import TEEError, UnsupportedOperation
from ...ir import Graph, Node, Op, interpreter

RUNTIMES = ("onnxruntime", "torch", "interpreter")
DEFAULT_RUNTIME = "onnxruntime"
DTYPES = {"onnxruntime": ("float32",), "torch": ("float32", "float64"),
          "interpreter": ("float64",)}
_PACKAGES = {"onnxruntime": "onnxruntime", "torch": "torch", "interpreter": "numpy"}
_EXTRAS = {"onnxruntime": "veil[tee]", "torch": "veil[torch]", "interpreter": "veil"}


@dataclass(frozen=True)
class RuntimeSpec:
    """Which runtime runs a bundle, and in which precision."""

    name: str = DEFAULT_RUNTIME
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.name not in RUNTIMES:
            raise TEEError(f"unknown TEE runtime {self.name!r}; runtimes: {', '.join(RUNTIMES)}")
        if self.dtype not in DTYPES[self.name]:
            raise TEEError(f"the {self.name} runtime runs {' or '.join(DTYPES[self.name])}, "
                           f"not {self.dtype}")

    @classmethod
    def default_for(cls, name: str) -> "RuntimeSpec":
        if name not in RUNTIMES:
            raise TEEError(f"unknown TEE runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
        return cls(name, DTYPES[name][0])

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_json(cls, doc) -> "RuntimeSpec":
        if doc is None:          # bundles written before runtimes were recorded
            return cls("interpreter", "float64")
        try:
            return cls(str(doc["name"]), str(doc["dtype"]))
        except (KeyError, TypeError):
            raise TEEError("the bundle's runtime entry is malformed") from None


def runtime_version(name: str) -> str:
    """The installed version of runtime ``name``'s package (without importing it).

    Raises:
        TEEError: the package is not installed (the message names the extra).
    """
    try:
        return metadata.version(_PACKAGES[name])
    except KeyError:
        raise TEEError(f"unknown TEE runtime {name!r}") from None
    except metadata.PackageNotFoundError:
        raise TEEError(f"the {name!r} TEE runtime is not installed: "
                       f"pip install '{_EXTRAS[name]}'") from None


class Plan:
    """A graph as a list of steps over value slots; each value is dropped after its
    last reader."""

    def __init__(self, steps: list, output: int) -> None:
        self.steps, self.output = steps, output

    def run(self, x):
        values = {0: x}
        for fn, ins, slot, drop in self.steps:
            values[slot] = fn([values[i] for i in ins])
            for i in drop:
                del values[i]
        return values[self.output]


def check_kernels(graph: Graph, kernels: Mapping[Op, object], runtime: str) -> None:
    """Raise UnsupportedOperation naming the first node ``kernels`` has no entry for."""
    for node in graph.nodes:
        if node.op not in kernels:
            raise UnsupportedOperation(f"{node.op.value} node {node.name!r} has no kernel in "
                                       f"the enclave's {runtime} runtime")


def build_plan(graph: Graph, make: Callable[[Node], Callable], kernels: Mapping[Op, object],
               runtime: str) -> Plan:
    """``make(node)`` for every node after the input, wired into a :class:`Plan`."""
    check_kernels(graph, kernels, runtime)
    slot = {n.name: i for i, n in enumerate(graph.nodes)}
    last = {}
    for i, node in enumerate(graph.nodes):
        for s in node.inputs:
            last[s] = i
    steps = []
    for i, node in enumerate(graph.nodes[1:], start=1):
        drop = sorted({slot[s] for s in node.inputs if last[s] == i and s != graph.output})
        steps.append((make(node), [slot[s] for s in node.inputs], i, drop))
    return Plan(steps, slot[graph.output])


class InterpreterExecutor:
    """The numpy reference interpreter, float64."""

    name, dtype = "interpreter", "float64"

    def __init__(self, graph: Graph, dtype: str = "float64", threads: int | None = None):
        self.graph = graph

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        return interpreter.run(self.graph, xs)


def make_executor(graph: Graph, spec: RuntimeSpec | None = None,
                  threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An executor for ``graph``: called on a float64 batch (B, *input_shape), it returns
    the float64 outputs. ``threads`` caps the runtime's intra-op threads (None: its
    default).

    Raises:
        TEEError: the runtime is not installed.
        UnsupportedOperation: the graph has an op the runtime has no kernel for.
    """
    spec = spec or RuntimeSpec()
    runtime_version(spec.name)
    if spec.name == "onnxruntime":
        from .onnx_kernels import OnnxRuntimeExecutor
        return OnnxRuntimeExecutor(graph, spec.dtype, threads)
    if spec.name == "torch":
        from .torch_kernels import TorchExecutor
        return TorchExecutor(graph, spec.dtype, threads)
    return InterpreterExecutor(graph, spec.dtype, threads)

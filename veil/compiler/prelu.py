"""HE's rewrite of a PReLU with a slope per channel into ops it has kernels for.

A polynomial replaces one function of x; a PReLU with different slopes per channel is
one function per channel. It is exactly a x + (1 - a) relu(x), a per channel: two
per-channel scalings (affine, so they join the dense layers around them) of x and of
a ReLU (fitted like any other), and an ADD of equal shapes. A PReLU with one slope (or
the same slope everywhere) is one function and stays, fitted directly.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node, Op
from .passes import PassNote


def _split(node: Node) -> list[Node]:
    """The nodes computing ``node`` (a per-channel PRELU); the sum keeps its name."""
    slope = node.params["slope"]
    zero = np.zeros_like(slope)
    x, shape = node.inputs[0], node.shape
    lin = Node(f"{node.name}/linear", Op.BATCHNORM, (x,), shape, {},
               {"scale": slope, "shift": zero})
    relu = Node(f"{node.name}/relu", Op.RELU, (x,), shape)
    rest = Node(f"{node.name}/rest", Op.BATCHNORM, (relu.name,), shape, {},
                {"scale": 1.0 - slope, "shift": zero})
    return [lin, relu, rest, Node(node.name, Op.ADD, (lin.name, rest.name), shape)]


def split_prelu(graph: Graph) -> tuple[Graph, PassNote]:
    """Every PRELU whose slopes differ between channels becomes a x + (1 - a) relu(x)
    (exact); one with a single slope value keeps one slope and stays a PRELU."""
    note = PassNote("split_prelu")
    out: list[Node] = []
    for node in graph.nodes:
        slope = node.params.get("slope") if node.op is Op.PRELU else None
        if slope is None:
            out.append(node)
        elif np.all(slope == slope[0]):
            out.append(node if slope.size == 1 else node.replace(params={"slope": slope[:1]}))
        else:
            out.extend(_split(node))
            note.messages.append(f"prelu {node.name!r} with {slope.size} channel slopes "
                                 "written as a * x + (1 - a) * relu(x)")
    return graph.with_nodes(out), note

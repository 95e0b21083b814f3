"""Small graph IR and its plaintext reference interpreter. Imports nothing else of veil's."""
from .graph import ACTIVATIONS, AFFINE_OPS, Graph, Node, Op, infer_shape, make_node, verify
from .interpreter import cheb_eval, eval_node, run

__all__ = ["ACTIVATIONS", "AFFINE_OPS", "Graph", "Node", "Op", "cheb_eval", "eval_node",
           "infer_shape", "make_node", "run", "verify"]

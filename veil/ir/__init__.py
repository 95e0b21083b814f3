"""Small graph IR, its op registry and its plaintext reference interpreter.

Imports nothing else of veil's but the error types and the list of modes.
"""
from .graph import ACTIVATIONS, AFFINE_OPS, Graph, Node, infer_shape, make_node, verify
from .interpreter import activation_fn, cheb_eval, eval_node, run
from .ops import REGISTRY, TARGETS, Op, OpDef, opdef, ops_for, ops_with

__all__ = ["ACTIVATIONS", "AFFINE_OPS", "Graph", "Node", "Op", "OpDef", "REGISTRY",
           "TARGETS", "activation_fn", "cheb_eval", "eval_node", "infer_shape",
           "make_node", "opdef", "ops_for", "ops_with", "run", "verify"]

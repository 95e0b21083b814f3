"""Affine ops as sparse matrices, built from their parameters, never from a dense probe.

:func:`veil.compiler.passes.linearize` finds a small chain's matrix by running the
chain on the identity, which costs (inputs x outputs) memory: 2 GiB for one 16x32x32
convolution of a CIFAR ResNet. A convolution's matrix has only ``C_in/groups * kh * kw``
non-zeros per output, so this module writes each affine op's matrix from its kernel
geometry (the im2col index map of Chellapilla et al. 2006, one weight per (output,
tap)) and composes a chain by sparse products. The diagonal method reads non-zeros
only (:func:`veil.compiler.dense.nonzeros`), so a layer then costs memory in its
non-zeros and the diagonals it occupies, whatever its size.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import CompileError
from ..ir import Node, Op
from ..ir import kernels as k


def _conv(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    w, bias = node.params["weight"], node.params["bias"]
    groups = int(node.attrs["groups"])
    c_in, h, wd = in_shape
    c_out, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = (node.attrs["stride"], node.attrs["padding"],
                                    node.attrs["dilation"])
    _, ho, wo = node.shape
    co, ci, ky, kx, oy, ox = np.meshgrid(np.arange(c_out), np.arange(cg), np.arange(kh),
                                         np.arange(kw), np.arange(ho), np.arange(wo),
                                         indexing="ij", sparse=True)
    iy, ix = oy * sh + ky * dh - ph, ox * sw + kx * dw - pw
    channel = (co // (c_out // groups)) * cg + ci
    shape = np.broadcast_shapes(co.shape, ci.shape, ky.shape, kx.shape, oy.shape, ox.shape)
    inside = np.broadcast_to((iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd), shape)
    rows = np.broadcast_to((co * ho + oy) * wo + ox, shape)[inside]
    cols = np.broadcast_to((channel * h + iy) * wd + ix, shape)[inside]
    vals = np.broadcast_to(w[:, :, :, :, None, None], shape)[inside]
    m = sp.csr_array((vals, (rows, cols)), shape=(c_out * ho * wo, c_in * h * wd))
    return m, np.repeat(bias, ho * wo)


def _avgpool(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    """Per channel, output (y, x) averages its window with the kernel's own divisor."""
    c, h, wd = in_shape
    a = node.attrs
    x = np.zeros((1, 1, h, wd))
    kernel, stride, (ph, pw), extra, (ho, wo) = k._pool_geometry(x, a)
    # the divisor of each output cell: the kernel's averages of ones over the window
    # cells that count, divided out of the kernel's average of the in-input cells
    inside = k.windows(k._pad_hw(np.ones((1, 1, h, wd)), ph, pw, 0.0, extra), kernel,
                       stride).sum(axis=(-1, -2))[0, 0, :ho, :wo]
    mean_of_ones = k.avgpool2d([np.ones((1, 1, h, wd))], a, {})[0, 0]
    weight = mean_of_ones / inside                     # 1 / count per output cell
    (kh, kw), (sh, sw) = kernel, stride
    ch, ky, kx, oy, ox = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw),
                                     np.arange(ho), np.arange(wo), indexing="ij")
    iy, ix = oy * sh + ky - ph, ox * sw + kx - pw
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd)
    rows = ((ch * ho + oy) * wo + ox)[ok]
    cols = ((ch * h + iy) * wd + ix)[ok]
    vals = np.broadcast_to(weight, ok.shape)[ok]
    return (sp.csr_array((vals, (rows, cols)), shape=(c * ho * wo, c * h * wd)),
            np.zeros(c * ho * wo))


def _global_pool(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    c, h, wd = in_shape
    cols = np.arange(c * h * wd)
    m = sp.csr_array((np.full(cols.size, 1.0 / (h * wd)), (cols // (h * wd), cols)),
                     shape=(c, cols.size))
    return m, np.zeros(c)


def _batchnorm(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    per = int(np.prod(in_shape[1:]))
    scale = np.repeat(node.params["scale"], per)
    return sp.diags_array(scale, format="csr"), np.repeat(node.params["shift"], per)


def _reshape(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    n = int(np.prod(in_shape))
    return sp.eye_array(n, format="csr"), np.zeros(n)


def _linear(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    w, b = node.params["weight"], node.params["bias"]
    rows = int(np.prod(in_shape[:-1]))
    m = sp.kron(sp.eye_array(rows), sp.csr_array(w), format="csr")
    return sp.csr_array(m), np.tile(b, rows)


def nonzero_bound(node: Node, in_shape) -> int:
    """At most how many non-zeros ``node``'s matrix holds (before building it)."""
    out = int(np.prod(node.shape))
    if node.op is Op.CONV2D:
        return out * int(np.prod(node.params["weight"].shape[1:]))
    if node.op is Op.AVGPOOL2D:
        return out * int(np.prod(node.attrs["kernel"]))
    if node.op is Op.LINEAR:
        return int(np.prod(in_shape[:-1])) * node.params["weight"].size
    if node.op is Op.DENSE:
        m = node.params["matrix"]
        return m.nnz if sp.issparse(m) else m.size
    return int(np.prod(in_shape))


def _dense(node: Node, in_shape) -> tuple[sp.csr_array, np.ndarray]:
    # a copy: a node's sparse params are frozen (read-only), and the chain's matrix is
    # cleaned in place
    return sp.csr_array(node.params["matrix"], copy=True), np.asarray(node.params["bias"])


BUILDERS = {Op.CONV2D: _conv, Op.AVGPOOL2D: _avgpool, Op.GLOBALAVGPOOL: _global_pool,
            Op.BATCHNORM: _batchnorm, Op.RESHAPE: _reshape, Op.LINEAR: _linear,
            Op.DENSE: _dense}


def chain_matrix(chain: list[Node], in_shape: tuple[int, ...]
                 ) -> tuple[sp.csr_array, np.ndarray]:
    """The sparse matrix and bias of ``chain`` (each node reads the one before; the
    first reads a value of ``in_shape``): y = M_k (... (M_1 x + b_1) ...) + b_k."""
    matrix, bias, shape = None, None, in_shape
    for node in chain:
        build = BUILDERS.get(node.op)
        if build is None:
            raise CompileError(f"{node.op.value} node {node.name!r} has no sparse lowering; "
                               "only convolutions, pooling, batch norms, reshapes and "
                               "linear layers lower at this size")
        m, b = build(node, shape)
        matrix = m if matrix is None else sp.csr_array(m @ matrix)
        bias = b if bias is None else m @ bias + b
        shape = node.shape
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix, np.asarray(bias, dtype=np.float64)

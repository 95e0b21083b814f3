"""Transformer ops on shares: the MPC kernels of MATMUL, SOFTMAX, LAYERNORM, RECIPROCAL
and the local ones (SLICE, TRANSPOSE, AFFINE, REDUCESUM), registered in
:data:`veil.backends.mpc.evaluator.KERNELS` like every other op (GELU and TANH are
:class:`~veil.backends.mpc.evaluator.Tail` corrections there).

Values are fixed point with f = 20 fractional bits in Z_(2^64); every product is a
Beaver product (dealer triples) followed by a one-round faithful truncation, every
comparison the circuit comparison of ``protocols``. Constructions and errors (the
float forms; ``tests/test_mpc_transformer.py`` checks each op against the reference
kernel over its calibrated range):

- MATMUL of two shared matrices: matrix Beaver triples (SecureML, Mohassel and Zhang,
  S&P 2017, Sec. 4.2): one round opening X - A and Y - B, then one truncation. Exact up
  to the truncation's ulp. When both operands are affine layers' results reaching it
  only through reshapes and transposes (attention's Q K^T, ``Program.half_bits``), the
  layers truncate to f/2 = 10 bits instead and the product, at f bits, needs no
  truncation: each score within 2^-10 (|q|_1 + |k|_1) more (the operands' rounding;
  MiniLM's scores read the 1/sqrt(d) scale folded into Q).
- SOFTMAX over the last axis (CrypTen's construction, Knott et al., NeurIPS 2021, with
  a polynomial exponential): the row maximum by a tree of max(a, b) = b + ReLU(a - b)
  (log2 L levels, coarse comparisons on 40 bits opened narrow: the max may fall short
  by levels * 2^-4, which the shift invariance absorbs, see ``MAX_BITS``),
  d = x - max clamped to d' = max(d, -16) (one coarse ReLU, letting d down to -17
  through: exp(-16) = 1.1e-7 is below the fixed point's 2^-20, and an additive mask of
  -10^4 would otherwise leave the exponential's domain), then exp(d') = p(z)^2 with p
  a degree-12 fit of exp(d/2) in z = d/8 + 1 (``chains.exp_chain``: the tails'
  Paterson-Stockmeyer evaluation as one masked chain, every product local, six
  openings, at ``SOFTMAX_CHAIN_BITS`` = 14 fractional bits and p squared from f/2:
  26 bytes a value where f bits took 42; within 1.2e-6 as a float formula,
  ``chains.exp_error`` in fixed point, 7.6e-3 at d = 1 and 3.5e-3 for d <= 0:
  probabilities within (E_i + p_i
  sum E) / (S - sum E) for entry errors E and a row sum S at
  least its max entry's exp(d) >= 1). The sum's reciprocal (below) and each row scaled
  by it (:func:`_scale_rows`: one matrix triple, the reciprocal opened once a row);
  when the softmax's only reader is a MATMUL taking it as its left operand
  (attention's P V), the rows of the product are scaled instead, (e V) / sum e: the
  same value, on n values a row instead of the softmax's k (32 and 128 in MiniLM),
  its rows' e V below 2^22 (the truncation's bound: sum e <= k e^(levels/16)).
- RECIPROCAL 1/s for s in [lo, hi] (the node's calibrated range): the binade of s from
  comparisons with every power of two in the range (one batch), y0 = 0.75 2^-e as a
  public linear combination of the comparison bits (2^-e telescopes over them), so
  s y0 is in [0.75, 1.5); then five Newton steps y <- y (2 - s y), the relative error
  squaring each step: 0.5^32, below the fixed point's 2^-20 absolute.
- LAYERNORM over the last axis: x - mean as (D x - sum x) / D, one truncation per
  entry (the rounding of 1/D then scales the row, which the normalization cancels);
  the variance from its square, local (the masked chain "tsq": the truncation's
  result is a public part plus a dealt mask, ABY2.0's masked wires); its inverse
  square root like the reciprocal (binade by comparisons, y0 = sqrt(2/3) 2^(-e/2),
  v y0^2 in [2/3, 4/3), four Newton steps y <- y (3 - v y^2) / 2, the error
  e -> 0.75 e^2: 3e-10) at 28 fractional bits (a residual sum read only by the layer
  norm arrives untruncated, at 2f bits, and its centering truncates it: ``_centering``;
  |x| < 2^21 / D real there),
  then each row scaled by it (:func:`_scale_rows`) and the public affine. The variance
  range is [2^-10, 2^12] by default: below it the normalization is too small (a
  constant row, where x - mean ~ 0 anyway).
- GELU(x) = ReLU(x) - q(min(|x|, e)), q ~ t Phi(-t) of degree 12 on [0, 5.02], e =
  5.02 - 2^-4 (``evaluator.tail_scale``: 512 / 102, so z + 1 = 102 t / 2^8; the
  piecewise form PUMA uses, Dong et al. 2023, with the ReLU as the main piece, its
  comparison leaving out the bits below 2^-14: an error below 2^-15 near 0;
  beyond e the fit's value there stands for the tail, both below 2e-6; the chain
  at ``evaluator.TAIL_CHAIN_BITS`` = 10 fractional bits, p at 2c = f with no last
  truncation, 18 bytes a value where f bits took 36, within 7.6e-3 more,
  ``evaluator.tail_chain_error``, 1.9e-3 measured);
  TANH(x) = (2 s - 1)(1 - 2 p(min(|x|, e))), p ~ sigma(-2t): both in
  ``evaluator.Tail``, whose comparisons and power truncations open narrow (5 and 6
  bytes, not 8).
- SLICE, TRANSPOSE, REDUCESUM: local. AFFINE (x * scale + shift, constants): local, one
  truncation unless the scale is one.
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedOperation
from ...ir import Op
from .evaluator import Kernel, Run, Step, _no_steps, _scaled, max_tree, tree_widths

#: the row max's comparisons: on 40 ring bits (|a - b| < 2^18 real, an additive mask of
#: -10^4 included), opened narrow (5 bytes), the tree leaving out the bits below 2^-4
#: real: each level may keep the smaller of two values within 2^-4, so the "max" falls
#: short of the true one by at most levels * 2^-4 (0.44 at 128 entries), which softmax's
#: shift invariance absorbs (d = x - max <= 0.44: e^d below 2; the row sum below
#: ``_sum_bound``)
MAX_BITS = 40
MAX_PRECISION = 4
#: the clamp of d at -16 (exp(-16) = 1.1e-7, below the fixed point's 2^-20): on 36 ring
#: bits (|d + 16| < 2^14 real, an additive mask of -10^4 included), its tree leaving out
#: the bits below 2^0 real: the clamp lets d in [-17, -16) through, inside the
#: exponential's domain (``chains.EXP_LO``)
EXP_CLAMP = 16.0
CLAMP_BITS = 36
CLAMP_COARSE = 0
#: softmax's exponential chain's fractional bits (``chains.exp_chain``; ELU's runs at
#: f): 26 bytes a value where f bits took 42 (p squared from f/2 bits, so p^2 needs no
#: truncation), each exp within 7.6e-3 (``chains.exp_error``)
SOFTMAX_CHAIN_BITS = 14
RECIP_NEWTON = 5
RSQRT_NEWTON = 4
#: the variance range LayerNorm's inverse square root assumes (MiniLM-L6 on the
#: benchmark's texts: 0.004 to 128)
VAR_RANGE = (2.0 ** -10, 2.0 ** 12)


def _rows(shape) -> tuple[int, int]:
    last = int(shape[-1])
    return int(np.prod(shape)) // last, last


def _lead(shape) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64))


# -- local ops ------------------------------------------------------------------------------
def _slice(run: Run, node, args):
    a = node.attrs
    index = [slice(None)] * args[0].ndim
    index[int(a["axis"]) % (args[0].ndim - 1) + 1] = slice(int(a["start"]), int(a["stop"]))
    return args[0][tuple(index)]


def _transpose(run: Run, node, args):
    return np.transpose(args[0], (0,) + tuple(int(i) + 1 for i in node.attrs["perm"]))


def _reducesum(run: Run, node, args):
    rank = args[0].ndim - 1
    return args[0].sum(axis=tuple(int(i) % rank + 1 for i in node.attrs["axes"]),
                       keepdims=bool(node.attrs["keepdims"]), dtype=np.uint64)


def _unit_scale(node) -> bool:
    return bool(np.all(node.params["scale"] == 1.0))


def _affine_steps(prog, node):
    return [] if _unit_scale(node) else [Step("trunc", prog.size(node))]


def _affine(run: Run, node, args):
    x, f = args[0], run.f
    if _unit_scale(node):
        return x + run.public(_scaled(node.params["shift"], f))[None]
    y = x * run.prog.param(node, "scale", f)[None] + \
        run.public(_scaled(node.params["shift"], 2 * f))[None]
    return run.trunc(np.ascontiguousarray(y))


def _embed(run: Run, node, args):
    raise UnsupportedOperation(
        f"embedding {node.name!r} reached the parties: lower the graph for mpc first "
        "(compiler pass onehot_embeddings; the client one-hot encodes the ids)")


# -- products of shared matrices ------------------------------------------------------------
def _matmul_dims(prog, node) -> tuple[int, int, int, int]:
    sx = prog.shapes[node.inputs[0]]
    m, n = node.shape[-2], node.shape[-1]
    return _lead(node.shape) or 1, m, sx[-1], n


def _matmul_steps(prog, node):
    g, m, k, n = _matmul_dims(prog, node)
    steps = [Step("matmul", g * m * n, dims=(g, m, k, n))]
    if node.name not in prog.exact_products:    # operands at f/2 bits: none
        steps.append(Step("trunc", g * m * n))
    if node.name in prog.normalizes:            # an unnormalized softmax's rows
        steps += [_row_scaling(g * m, n), Step("trunc", g * m * n)]
    return steps


def _matmul(run: Run, node, args):
    """X @ Y; when X is an unnormalized softmax (``Program.normalizes``: e = exp(x -
    max), each row's 1/sum e left aside), (e @ Y) with each row scaled by its
    reciprocal afterwards, the same product: the scaling and its truncation run on the
    n values of the product's row instead of the k of the softmax's (SOFTMAX -> MATMUL
    in attention: 32 where it was 128)."""
    g, m, k, n = _matmul_dims(run.prog, node)
    b = args[0].shape[0]
    lead = tuple(node.shape[:-2])
    x = np.broadcast_to(args[0], (b,) + lead + args[0].shape[-2:]).reshape(b * g, m, k)
    y = np.broadcast_to(args[1], (b,) + lead + args[1].shape[-2:]).reshape(b * g, k, n)
    z = run.matmul(np.ascontiguousarray(x), np.ascontiguousarray(y))
    if node.name not in run.prog.exact_products:
        z = run.trunc(z)
    source = run.prog.normalizes.get(node.name)
    if source is not None:
        inv = run.row_scales.pop(source)
        z = run.trunc(_scale_rows(run, z.reshape(b * g * m, n), inv))
    return z.reshape((b,) + tuple(node.shape))


def _row_scaling(rows: int, last: int) -> Step:
    """The material of :func:`_scale_rows`: a (rows, last, 1) by (rows, 1, 1) matrix
    triple."""
    return Step("matmul", rows * last, dims=(rows, last, 1, 1))


def _scale_rows(run: Run, x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x * s for shared x (rows, last) and one shared s per row (rows, 1), untruncated:
    a Beaver product whose triple's b is one value per row (a matrix triple with
    k = n = 1, SecureML's matrix Beaver triples), so s - b is opened once per row, not
    once per entry as an elementwise product with s broadcast would: 8 bytes an entry
    and 8 a row, where the elementwise product sent 16 an entry."""
    rows, last = x.shape
    out = run.matmul(np.ascontiguousarray(x).reshape(rows, last, 1),
                     np.ascontiguousarray(s).reshape(rows, 1, 1))
    return out.reshape(rows, last)


# -- range-reduced Newton iterations -------------------------------------------------------
def _binade_thresholds(lo: float, hi: float) -> list[int]:
    """The powers 2^j (j0 < j <= j1) that split [lo, hi] into binades."""
    j0, j1 = int(np.floor(np.log2(lo))), int(np.floor(np.log2(hi)))
    return list(range(j0 + 1, j1 + 1))


def _binade_steps(n: int, lo: float, hi: float) -> list[Step]:
    js = _binade_thresholds(lo, hi)
    return [Step("drelu", n * len(js))] if js else []


def _binade_guess(run: Run, s: np.ndarray, lo: float, hi: float, g,
                  bits: int = 0) -> np.ndarray:
    """g(e) at ``bits`` fractional bits (default f) for the binade e of s (s in
    [2^e, 2^(e+1)), f bits): g(j0) plus, for every threshold 2^j that s reaches,
    g(j) - g(j - 1) (public multiples of the comparison bits; local after one batch of
    comparisons)."""
    f, bits = run.f, bits or run.f
    js = _binade_thresholds(lo, hi)
    j0 = int(np.floor(np.log2(lo)))
    out = np.broadcast_to(run.public(_scaled(g(j0), bits)), s.shape).copy()
    if not js:
        return out
    signs = run.drelu(np.concatenate([s.ravel() - run.public(_scaled(2.0 ** j, f))
                                      for j in js])).reshape((len(js),) + s.shape)
    for i, j in enumerate(js):
        out += signs[i] * _scaled(g(j) - g(j - 1), bits)
    return out


def _recip_steps(n: int, lo: float, hi: float) -> list[Step]:
    return _binade_steps(n, lo, hi) + [Step("mul", n), Step("trunc", n)] * (2 * RECIP_NEWTON)


def _reciprocal_of(run: Run, s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """1 / s at f bits for s in [lo, hi] (f bits)."""
    y = _binade_guess(run, s, lo, hi, lambda e: 0.75 * 2.0 ** -e)
    two = run.public(_scaled(2.0, run.f))
    for _ in range(RECIP_NEWTON):
        t = run.trunc(run.mul(s, y))
        y = run.trunc(run.mul(y, two - t))
    return y


#: fractional bits of the inverse square root: 1/sqrt(v) is as small as 2^-6 on the
#: variance range, where f = 20 bits would leave it 6e-5 relative precision
RSQRT_BITS = 28


#: fractional bits of the variance the Newton steps read: at f = 20 a variance of 2^-10
#: keeps 10 significant bits
VAR_BITS = 26


def _rsqrt_steps(n: int, lo: float, hi: float, f: int) -> list[Step]:
    per = [Step("mul", n), Step("trunc", n, RSQRT_BITS), Step("mul", n),
           Step("trunc", n, RSQRT_BITS), Step("mul", n), Step("trunc", n, VAR_BITS + 1)]
    return _binade_steps(n, lo, hi) + per * RSQRT_NEWTON


def _rsqrt_of(run: Run, v: np.ndarray, v_hi: np.ndarray, lo: float, hi: float
              ) -> np.ndarray:
    """1 / sqrt(v) at ``RSQRT_BITS`` fractional bits for v in [lo, hi]: the binade from
    ``v`` (f bits, inside the comparisons' range), the Newton steps on ``v_hi`` (the
    same variance at ``VAR_BITS``). A step y (3 - v y^2) / 2 as (v y) y, never y^2
    alone (at 2^-12 it would keep 16 significant bits); every product stays below
    2^60, and the step's halving rides on its last truncation."""
    big = RSQRT_BITS
    y = _binade_guess(run, v, lo, hi, lambda e: np.sqrt(2.0 / 3.0) * 2.0 ** (-e / 2), big)
    three = run.public(_scaled(3.0, VAR_BITS))
    for _ in range(RSQRT_NEWTON):
        vy = run.trunc(run.mul(v_hi, y), shift=big)              # sqrt(v), VAR_BITS
        t = run.trunc(run.mul(vy, y), shift=big)                 # v y^2, VAR_BITS
        y = run.trunc(run.mul(y, three - t), shift=VAR_BITS + 1)  # 28 bits
    return y


def _recip_node_steps(prog, node):
    return _recip_steps(prog.size(node), float(node.attrs["lo"]), float(node.attrs["hi"]))


def _reciprocal(run: Run, node, args):
    return _reciprocal_of(run, args[0], float(node.attrs["lo"]), float(node.attrs["hi"]))


# -- softmax --------------------------------------------------------------------------------
def _sum_bound(last: int) -> float:
    """The largest row sum of exp(x - max) when the max may fall short by
    levels * 2^-MAX_PRECISION (every entry then below e^that)."""
    return float(last) * float(np.exp(len(tree_widths(last)) * 2.0 ** -MAX_PRECISION))


def _softmax_steps(prog, node):
    rows, last = _rows(node.shape)
    n = rows * last
    f = prog.frac_bits
    steps = [Step("relu", rows * k, width=MAX_BITS, drop=max(1, f - MAX_PRECISION))
             for k in tree_widths(last)]
    steps += exp_steps(n, f, SOFTMAX_CHAIN_BITS)
    steps += _recip_steps(rows, 0.5, _sum_bound(last))
    if node.name not in prog.normalizes.values():
        steps += [_row_scaling(rows, last), Step("trunc", n)]
    return steps


def exp_steps(n: int, frac_bits: int, bits: int = 0) -> list[Step]:
    """The material of :func:`_exp_nonpositive` on n values: the clamp, the chain (at
    ``bits`` fractional bits, ``chains.chain_bits``)."""
    return [Step("relu", n, width=CLAMP_BITS, drop=frac_bits + CLAMP_COARSE),
            Step("texp", n, bits)]


def _exp_nonpositive(run: Run, d: np.ndarray, bits: int = 0) -> np.ndarray:
    """exp(d) at f bits for shared d <= 0 (f bits; up to 1 above 0 after a coarse max,
    down to -2^14 with a masked entry): the clamp max(d, -16), coarse (d in [-17, -16)
    passes), then ``chains.exp_chain`` on [-17, 1] (the module docstring)."""
    lim = run.public(_scaled(EXP_CLAMP, run.f))
    d = run.relu(np.ascontiguousarray(d + lim)) - lim            # max(d, -16)
    return run.exp(d, bits)


def _softmax(run: Run, node, args):
    x = args[0]
    rows, last = _rows(x.shape[1:])
    b = x.shape[0]
    x = x.reshape(b * rows, last)
    mx = max_tree(run, x)
    e = _exp_nonpositive(run, x - mx, SOFTMAX_CHAIN_BITS)
    s = e.sum(axis=-1, keepdims=True, dtype=np.uint64)
    inv = _reciprocal_of(run, s, 0.5, _sum_bound(last))
    if node.name in run.prog.normalizes.values():     # the matrix product scales
        run.row_scales[node.name] = inv
        return e.reshape((b,) + tuple(node.shape))
    p = run.trunc(_scale_rows(run, e, inv))
    return p.reshape((b,) + tuple(node.shape))


# -- layer norm -----------------------------------------------------------------------------
def _centering(prog, node) -> tuple[int, float]:
    """(the centering's shift, rho): on an f-bit input, (D x - sum x) / D at 2f bits
    truncated by f (rho = 1); on a 2f-bit input (a residual sum left untruncated,
    ``Program.deferred``), D x - sum x itself truncated by f + s, s = ceil(log2 D):
    rho (x - mean) with rho = D / 2^s in (1/2, 1], one truncation where the sum's and
    the centering's took two. The normalization cancels rho; the variance is rho^2
    times the row's, so eps and the variance range are scaled by rho^2."""
    last = int(node.shape[-1])
    if node.inputs[0] not in prog.deferred:
        return 0, 1.0
    s = max(1, int(np.ceil(np.log2(last))))
    return prog.frac_bits + s, last / 2.0 ** s


def _layernorm_steps(prog, node):
    rows, last = _rows(node.shape)
    n = rows * last
    f = prog.frac_bits
    shift, rho = _centering(prog, node)
    lo, hi = (v * rho * rho for v in VAR_RANGE)
    return ([Step("tsq", n, shift), Step("trunc", rows),
             Step("trunc", rows), Step("trunc", rows, 2 * f - VAR_BITS),
             Step("trunc", rows)] + _rsqrt_steps(rows, lo, hi, f)
            + [_row_scaling(rows, last), Step("trunc", n, RSQRT_BITS), Step("trunc", n)])


def _layernorm(run: Run, node, args):
    x = args[0]
    f = run.f
    rows, last = _rows(x.shape[1:])
    b = x.shape[0]
    x = x.reshape(b * rows, last)
    inv_d = _scaled(1.0 / last, f)
    shift, rho = _centering(run.prog, node)
    # x - mean as (D x - sum x) / D: the rounding of 1/D scales a whole row alike, which
    # the normalization cancels (on the mean it would be an offset: 2e-3 on a row of
    # variance 2^-10 beside a mean of 9); on a 2f-bit input, rho (x - mean) with no
    # 1/D at all (``_centering``). c and c^2 from one opening
    # (``chains.trunc_square``: c is a public part plus a dealt mask, so its square is
    # local)
    centered = np.uint64(last) * x - x.sum(axis=-1, keepdims=True, dtype=np.uint64)
    c, c2 = run.trunc_square(centered if shift else centered * inv_d, shift)
    total = c2.sum(axis=-1, keepdims=True, dtype=np.uint64)                 # 2f bits
    eps = float(node.attrs["eps"]) * rho * rho
    var = run.trunc(run.trunc(total) * inv_d) + run.public(_scaled(eps, f))
    var_hi = run.trunc(run.trunc(total, shift=2 * f - VAR_BITS) * inv_d) \
        + run.public(_scaled(eps, VAR_BITS))
    y = _rsqrt_of(run, var, var_hi, *(v * rho * rho for v in VAR_RANGE))
    z = run.trunc(_scale_rows(run, c, y), shift=RSQRT_BITS)
    out = z * run.prog.param(node, "weight", f)[None] + \
        run.public(_scaled(node.params["bias"], 2 * f))[None]
    return run.trunc(np.ascontiguousarray(out)).reshape((b,) + tuple(node.shape))


KERNELS = {
    Op.SLICE: Kernel(_no_steps, _slice),
    Op.TRANSPOSE: Kernel(_no_steps, _transpose),
    Op.REDUCESUM: Kernel(_no_steps, _reducesum),
    Op.AFFINE: Kernel(_affine_steps, _affine),
    Op.EMBED: Kernel(_no_steps, _embed),
    Op.MATMUL: Kernel(_matmul_steps, _matmul),
    Op.RECIPROCAL: Kernel(_recip_node_steps, _reciprocal),
    Op.SOFTMAX: Kernel(_softmax_steps, _softmax),
    Op.LAYERNORM: Kernel(_layernorm_steps, _layernorm),
}

"""Slow, literal numpy references for the LRP rules of shared/lrp-math.md.

Every linear op is implemented naively (loops over output and kernel positions, vectorized over the
batch only), its dense matrix ``M`` is built by applying it to unit vectors, and each rule is then applied
on ``M`` exactly as the formula table reads. Because every entry of ``M`` is either 0 or one weight entry,
``M(f(W)) = f(M(W))`` for element-wise ``f`` with ``f(0) = 0`` (W+, W-, W + γW+, W²); the flat rule's
all-ones weight is the exception (``f(0) = 1``), so its matrix is built from a ones kernel instead.

Import from tests as ``from oracles import ...`` (pytest puts the rootdir-less ``tests/`` on sys.path).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

# --- naive linear ops (single precision of thought: everything in float64) -------------------------


def _spatial(x_shape, w_shape):
    return x_shape[2:], w_shape[2:]


def conv_nd(x, w, b=None, strides=None, pads=None, dilations=None, group=1):
    """ONNX Conv: x [N, C, *S], w [M, C/group, *K], pads [begin..., end...]."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c = x.shape[:2]
    sp, ks = _spatial(x.shape, w.shape)
    nd = len(sp)
    s = strides or [1] * nd
    d = dilations or [1] * nd
    p = pads or [0] * (2 * nd)
    m = w.shape[0]
    cg, mg = c // group, m // group
    out_sp = [(sp[i] + p[i] + p[nd + i] - ((ks[i] - 1) * d[i] + 1)) // s[i] + 1 for i in range(nd)]
    y = np.zeros((n, m, *out_sp))
    for o in itertools.product(*[range(v) for v in out_sp]):
        for k in itertools.product(*[range(v) for v in ks]):
            i = [o[a] * s[a] + k[a] * d[a] - p[a] for a in range(nd)]
            if not all(0 <= i[a] < sp[a] for a in range(nd)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *i)]  # [N, cg]
                ws = w[(slice(g * mg, (g + 1) * mg), slice(None), *k)]  # [mg, cg]
                y[(slice(None), slice(g * mg, (g + 1) * mg), *o)] += xs @ ws.T
    if b is not None:
        y += np.asarray(b, np.float64).reshape([1, -1] + [1] * nd)
    return y


def conv_transpose_nd(x, w, b=None, strides=None, pads=None, dilations=None, group=1, output_padding=None):
    """ONNX ConvTranspose: x [N, C, *S], w [C, M/group, *K]; out = s(in-1) + op + (k-1)d + 1 - pb - pe."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    n, c = x.shape[:2]
    sp, ks = _spatial(x.shape, w.shape)
    nd = len(sp)
    s = strides or [1] * nd
    d = dilations or [1] * nd
    p = pads or [0] * (2 * nd)
    op = output_padding or [0] * nd
    mg = w.shape[1]
    m = mg * group
    cg = c // group
    out_sp = [s[i] * (sp[i] - 1) + op[i] + (ks[i] - 1) * d[i] + 1 - p[i] - p[nd + i] for i in range(nd)]
    y = np.zeros((n, m, *out_sp))
    for i in itertools.product(*[range(v) for v in sp]):
        for k in itertools.product(*[range(v) for v in ks]):
            o = [i[a] * s[a] + k[a] * d[a] - p[a] for a in range(nd)]
            if not all(0 <= o[a] < out_sp[a] for a in range(nd)):
                continue
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *i)]  # [N, cg]
                ws = w[(slice(g * cg, (g + 1) * cg), slice(None), *k)]  # [cg, mg]
                y[(slice(None), slice(g * mg, (g + 1) * mg), *o)] += xs @ ws
    if b is not None:
        y += np.asarray(b, np.float64).reshape([1, -1] + [1] * nd)
    return y


def gemm(a, bmat, c=None, alpha=1.0, beta=1.0, trans_a=0, trans_b=0):
    """ONNX Gemm ``alpha * A' B' + beta * C`` with explicit loops over the output."""
    a, bmat = np.asarray(a, np.float64), np.asarray(bmat, np.float64)
    a = a.T if trans_a else a
    bmat = bmat.T if trans_b else bmat
    y = np.zeros((a.shape[0], bmat.shape[1]))
    for r in range(a.shape[0]):
        for q in range(bmat.shape[1]):
            y[r, q] = alpha * np.dot(a[r], bmat[:, q])
    if c is not None:
        y = y + beta * np.asarray(c, np.float64)
    return y


def matmul(x, w):
    """ONNX MatMul of x [..., K] with a 2-d weight [K, M], looping over the leading positions."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    lead = x.shape[:-1]
    y = np.zeros((*lead, w.shape[1]))
    for idx in itertools.product(*[range(v) for v in lead]):
        y[idx] = x[idx] @ w
    return y


# --- a linear layer as a dense matrix ------------------------------------------------------------


@dataclass
class Layer:
    """``z = f(x; W) + b`` for one sample: ``apply(X, W)`` maps a batch [B, *in_shape] (no bias);
    ``bias_out`` is the bias broadcast to one sample's output (``None``: no bias); ``w_ones`` is the
    weight whose every entry is 1 (the flat rule's weight, with the op's structure)."""

    apply: Callable
    weight: np.ndarray
    in_shape: tuple
    bias_out: np.ndarray | None = None
    w_ones: np.ndarray | None = None

    @property
    def n_in(self) -> int:
        return int(np.prod(self.in_shape))

    def dense(self, weight=None) -> np.ndarray:
        """The [out, in] matrix of ``x -> f(x; weight)``: ``f`` applied to every unit vector."""
        eye = np.eye(self.n_in).reshape(self.n_in, *self.in_shape)
        cols = self.apply(eye, self.weight if weight is None else weight)
        return cols.reshape(self.n_in, -1).T

    def out_shape(self) -> tuple:
        return self.apply(np.zeros((1, *self.in_shape)), self.weight).shape[1:]

    def bias_flat(self) -> np.ndarray:
        """The bias broadcast over one sample's output, flat (zeros without a bias)."""
        shape = self.out_shape()
        if self.bias_out is None:
            return np.zeros(int(np.prod(shape)))
        return np.broadcast_to(np.asarray(self.bias_out, np.float64), shape).reshape(-1)

    def forward(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        z = self.apply(x, self.weight)
        return z if self.bias_out is None else z + self.bias_out


# --- stabilizers and the rules on dense matrices ------------------------------------------------


def sign0(z):
    return np.where(z >= 0, 1.0, -1.0)


def stab(z, eps: float, kind: str = "sign"):
    """lrp-math.md stabilizers on one sample's denominator vector."""
    if kind == "sign":
        return z + eps * sign0(z)
    if kind == "clip":
        return sign0(z) * np.maximum(np.abs(z), eps)
    if kind == "norm-scale":
        return z + eps * np.sqrt(np.mean(z * z)) * sign0(z)
    raise ValueError(kind)


def safe_div(r, den):
    """``r / den`` with 0 where ``den`` is exactly 0."""
    den = np.asarray(den, np.float64)
    return np.where(den == 0, 0.0, r / np.where(den == 0, 1.0, den))


def rule_dense(rule: str, M, b, x, R, *, eps=1e-6, stabilizer="sign", zero_bias=False, gamma=0.25, alpha=2.0,
               beta=1.0, low=None, high=None, M1=None):
    """Relevance at the input of ``z = M x + b`` for one sample (all vectors flat), literally as in
    lrp-math.md. ``M1``: dense matrix of the all-ones weight (flat); ``low``/``high``: input-shaped bounds."""
    M, b, x, R = (np.asarray(v, np.float64) for v in (M, b, x, R))
    pos = lambda v: np.maximum(v, 0)
    neg = lambda v: np.minimum(v, 0)
    bb = np.zeros_like(b) if zero_bias else b  # bias inside denominators
    q = lambda den: safe_div(R, stab(den, eps, stabilizer))
    xp, xn, Mp, Mn = pos(x), neg(x), pos(M), neg(M)
    if rule == "epsilon":
        return x * (M.T @ q(M @ x + bb))
    if rule == "zplus":
        c = q(Mp @ xp + Mn @ xn + pos(bb))
        return xp * (Mp.T @ c) + xn * (Mn.T @ c)
    if rule == "alpha-beta":
        cp = q(Mp @ xp + Mn @ xn + pos(bb))
        cn = q(Mn @ xp + Mp @ xn + neg(bb))
        out = alpha * (xp * (Mp.T @ cp) + xn * (Mn.T @ cp))
        if beta:
            out = out - beta * (xp * (Mn.T @ cn) + xn * (Mp.T @ cn))
        return out
    if rule == "gamma":
        Mu, Md = M + gamma * Mp, M + gamma * Mn
        bu, bd = bb + gamma * pos(bb), bb + gamma * neg(bb)
        z = M @ x + b  # the plain forward output decides the mask
        cu = np.where(z > 0, 1.0, 0.0) * q(Mu @ xp + Md @ xn + bu)
        cd = np.where(z < 0, 1.0, 0.0) * q(Md @ xp + Mu @ xn + bd)
        return xp * (Mu.T @ cu) + xn * (Md.T @ cu) + xp * (Md.T @ cd) + xn * (Mu.T @ cd)
    if rule == "sign-norm":  # each output's relevance to the contributions of its sign (γ → ∞ of gamma)
        z = M @ x + b
        cp = np.where(z > 0, 1.0, 0.0) * q(Mp @ xp + Mn @ xn + pos(bb))
        cn = np.where(z < 0, 1.0, 0.0) * q(Mn @ xp + Mp @ xn + neg(bb))
        return xp * (Mp.T @ cp) + xn * (Mn.T @ cp) + xp * (Mn.T @ cn) + xn * (Mp.T @ cn)
    if rule == "zbox":
        lo, hi = (np.asarray(v, np.float64).reshape(-1) for v in (low, high))
        c = q(M @ x - Mp @ lo - Mn @ hi)
        return x * (M.T @ c) - lo * (Mp.T @ c) - hi * (Mn.T @ c)
    if rule == "flat":
        M1 = np.asarray(M1, np.float64)
        return M1.T @ q(M1 @ np.ones(M1.shape[1]))
    if rule == "wsquare":
        M2 = M * M
        return M2.T @ q(M2 @ np.ones(M.shape[1]) + bb * bb)
    raise ValueError(rule)


def relevance(layer: Layer, rule: str, x, R, **kw) -> np.ndarray:
    """Relevance at the input of ``layer`` for a batch ``x`` [N, *in_shape] and seed ``R`` [N, *out]."""
    x = np.asarray(x, np.float64)
    M = layer.dense()
    b = layer.bias_flat()
    M1 = layer.dense(layer.w_ones) if rule == "flat" else None
    low, high = kw.pop("low", 0.0), kw.pop("high", 1.0)
    low = np.broadcast_to(np.asarray(low, np.float64), layer.in_shape) if rule == "zbox" else None
    high = np.broadcast_to(np.asarray(high, np.float64), layer.in_shape) if rule == "zbox" else None
    out = [rule_dense(rule, M, b, xs.reshape(-1), Rs.reshape(-1), low=low, high=high, M1=M1, **kw)
           for xs, Rs in zip(x, np.asarray(R, np.float64))]
    return np.stack(out).reshape(x.shape)

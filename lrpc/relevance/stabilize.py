"""Stabilized division ``R / stab(z)`` lowered to ONNX ops (shared by every rule with a denominator).

Signs and masks are built with Cast(compare) and arithmetic, not ``Where``: onnxruntime's CPU ``Where`` with a
broadcast operand is much slower than Cast + Mul on activation-sized tensors (docs/performance.md#lowering-choices)."""
from __future__ import annotations

import numpy as np

from ..graph import const_value, is_const
from ..rules import Rule


def indicator(b, op: str, z):
    """1.0 where ``op(z, 0)`` holds, else 0.0 (op: Greater, Less, Equal: the comparisons every runtime has)."""
    return b.op("Cast", [b.op(op, [z, b.const(0.0)], dtype=bool)], {"to": _onnx_type(b.dtype)})


def complement(b, m):
    """``1 - m`` of a 0/1 mask ``m``."""
    return b.op("Sub", [b.const(1.0), m])


def sign(b, z):
    """``sign(z)`` (0 at 0) as Clip(z · f · f, -1, 1) with f² at least the inverse of the smallest subnormal
    (float32: f = 2^75): every nonzero value is then at least 1 in magnitude (or ±inf) and the Clip gives exactly
    ±1. onnxruntime's ``Sign`` kernel is not vectorized: slower than these three passes
    (docs/performance.md#lowering-choices)."""
    tiny = np.finfo(b.dtype).smallest_subnormal
    big = b.const(2.0 ** int(np.ceil(-np.log2(float(tiny)) / 2)))
    t = b.mul(b.mul(z, big), big)
    if int(b.graph.opset) >= 11:
        return b.op("Clip", [t, b.const(-1.0), b.const(1.0)])
    return b.op("Clip", [t], {"min": -1.0, "max": 1.0})


def quotient(b, R, z, rule: Rule, rank: int | None, known: str | None = None, shifted: bool = False):
    """``R / stab(z)`` with the rule's stabilizer; a zero denominator passes zero, never NaN.

    ``known`` (sign stabilizer only) lets the emitter skip the sign test: "nonneg" when z >= 0 everywhere
    (then stab(z) = z + eps), "positive" when z > 0 wherever the quotient is used (R != 0 and the group's
    mask is 1: then max(z, 0) + eps equals stab(z) there and is a safe nonzero divisor elsewhere);
    "nonpos" / "negative" likewise with z <= 0 / z < 0 and min(z, 0) - eps. (For "nonpos", z = 0 divides
    by -eps instead of +eps: all of that output's terms are then zero, so the quotient only meets zeros.)
    ``shifted``: the emitter already added ±eps to z (in a bias, at no cost): max(z + eps, eps) is
    max(z, 0) + eps in one op."""
    eps = rule.eps
    if known and rule.stabilizer == "sign" and eps > 0:
        # max(z, 0) also guards a mathematically non-negative z that float rounding pushed below 0
        if known in ("nonpos", "negative"):
            den = b.op("Min", [z, b.const(-eps)]) if shifted else b.add(b.op("Min", [z, b.const(0.0)]), b.const(-eps))
        else:  # (Relu, not Max(z, 0): onnxruntime keeps Relu in its blocked NCHWc layout and fuses it into the Conv)
            den = b.op("Max", [z, b.const(eps)]) if shifted else b.add(b.relu(z), b.const(eps))
        return b.op("Div", [R, den])
    less = indicator(b, "Less", z)  # sign0(z) = 1 - 2 * less (zero counts as positive)
    if rule.stabilizer == "clip":
        mag = b.op("Max", [b.op("Abs", [z]), b.const(eps)])
        den = b.mul(mag, b.add(b.mul(less, b.const(-2.0)), b.const(1.0)))
    else:
        if rule.stabilizer == "norm-scale":
            if rank is None:
                raise ValueError("norm-scale stabilizer needs the rank of the denominator")
            # the root mean square of z / max|z|, times max|z|: z² itself overflows float32 from |z| ~ 1e19
            # (the tiny floor keeps an all-zero z at 0 / tiny = 0, not 0 / 0)
            top = b.op("Max", [b.reduce_max(b.op("Abs", [z]), list(range(1, rank))),
                               b.const(float(np.finfo(b.dtype).tiny))])
            unit = b.op("Div", [z, top])
            rms = b.mul(b.op("Sqrt", [b.reduce_mean(b.mul(unit, unit), list(range(1, rank)))]), top)
            e = b.mul(rms, b.const(eps))
            den = b.add(z, b.mul(e, b.add(b.mul(less, b.const(-2.0)), b.const(1.0))))
        elif eps == 0:
            den = z
        else:
            den = b.add(b.add(z, b.const(eps)), b.mul(less, b.const(-2.0 * eps)))
    if eps == 0 or rule.stabilizer == "norm-scale":
        # a zero denominator: divide by 1 instead, then zero the result (no inf * 0 = NaN)
        zero = indicator(b, "Equal", den)
        return b.mul(b.op("Div", [R, b.add(den, zero)]), complement(b, zero))
    return b.op("Div", [R, den])


def own_quotient(ctx, R, z, rule: Rule, k: float = 1.0):
    """``R / stab(k z)`` (sign stabilizer) without a sign test, where the relevance arriving is ``R = t ⊙ m``
    (:meth:`lrpc.emit.Context.factors_of`) and ``t = c z`` for a constant nonzero scalar ``c``: ``t`` is ``z`` itself,
    a Mul of ``z`` by a constant scalar (or a Div by one), or ``z`` clamped at the lowest finite value by a softmax
    rule (``ctx.clamps``: ``c = 1``; where the clamp acts, ``z = -inf``, that rule's ``m`` is 0). Then, for k > 0,
    ``t / stab(k z) = (c / k) |t| / (|t| + |c| ε / k)`` (that offset at least the smallest subnormal number, so that
    t = 0 gives 0 as the stabilizer's zero denominator does), and with ε = 0 it is ``(c / k) [t ≠ 0]``. One Abs per
    ``t`` (shared), an Add and a Div (ε = 0: a compare) and the products: the tensors ``z`` and its sign are not
    read. None where this does not apply."""
    f = ctx.factors_of(R)
    if rule.stabilizer != "sign" or f is None or not k > 0:
        return None
    t, m = f
    c = _multiple(ctx, t, z)
    if c is None:
        return None
    b = ctx.b
    key = ("abs", t.name)
    if key not in ctx.cache:
        ctx.cache[key] = b.op("Abs", [t])
    a = ctx.cache[key]
    if rule.eps > 0:
        e = max(abs(c) * rule.eps / k, float(np.finfo(b.dtype).smallest_subnormal))
        q = b.op("Div", [a, b.add(a, b.const(e))])
    else:
        q = indicator(b, "Greater", a)
    return b.mul(m, q if c / k == 1.0 else b.mul(q, b.const(c / k)))


def scalar_of(w, x) -> bool:
    """``w`` is a constant with one value that broadcasts to ``x`` without adding axes (a product keeps x's shape)."""
    return (is_const(w) and const_value(w).size == 1
            and (x.shape is None and const_value(w).ndim == 0 or x.shape is not None
                 and const_value(w).ndim <= len(x.shape)))


def _multiple(ctx, t, z) -> float | None:
    """``c`` where ``t = c z`` (see :func:`own_quotient`), else None."""
    if t is z or ctx.clamps.get(t.name) == z.name:
        return 1.0
    node = t.inputs[0] if t.inputs else None
    if node is None or len(node.inputs) != 2:
        return None
    if node.op == "Mul" and any(i is z for i in node.inputs):
        other = node.inputs[1] if node.inputs[0] is z else node.inputs[0]
    elif node.op == "Div" and node.inputs[0] is z:
        other = node.inputs[1]
    else:
        return None
    if not scalar_of(other, z):
        return None
    value = float(const_value(other).reshape(()))
    if value == 0.0 or not np.isfinite(value):
        return None
    return value if node.op == "Mul" else 1.0 / value


# sign-norm's two groups: the parts of that sign, the outputs where z has it (indicator op), the denominator's sign
SIGN_GROUPS = (("+", "Greater", "nonneg"), ("-", "Less", "nonpos"))


def sign_message(b, R, den, z, rule: Rule, rank: int | None, mask: str, known: str, quiet: bool):
    """The message of one sign-norm group (:data:`SIGN_GROUPS`): ``R / stab(den)`` where ``mask(z, 0)`` holds, 0
    elsewhere. ``quiet``: R = 0 wherever z <= 0 (behind a ReLU), so the positive group needs no mask."""
    c = quotient(b, R, den, rule, rank, known)
    if not (quiet and mask == "Greater"):
        c = b.mul(c, indicator(b, mask, z))
    return c


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(dtype)

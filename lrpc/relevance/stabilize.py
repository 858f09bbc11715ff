"""Stabilized division ``R / stab(z)`` lowered to ONNX ops (shared by every rule with a denominator)."""
from __future__ import annotations

from ..rules import Rule


def quotient(b, R, z, rule: Rule, rank: int | None):
    """``R / stab(z)`` with the rule's stabilizer; a zero denominator passes zero, never NaN."""
    eps = rule.eps
    nonneg = b.op("GreaterOrEqual", [z, b.const(0.0)], dtype=bool)
    if rule.stabilizer == "clip":
        mag = b.op("Max", [b.op("Abs", [z]), b.const(eps)])
        den = b.op("Where", [nonneg, mag, b.op("Neg", [mag])])
    else:
        if rule.stabilizer == "norm-scale":
            if rank is None:
                raise ValueError("norm-scale stabilizer needs the rank of the denominator")
            rms = b.op("Sqrt", [b.reduce_mean(b.mul(z, z), list(range(1, rank)))])
            e = b.mul(rms, b.const(eps))
            shift = b.op("Where", [nonneg, e, b.op("Neg", [e])])
        else:
            shift = b.op("Where", [nonneg, b.const(eps), b.const(-eps)])
        den = b.add(z, shift)
    q = b.op("Div", [R, den])
    if eps == 0 or rule.stabilizer == "norm-scale":
        q = b.op("Where", [b.op("Equal", [den, b.const(0.0)], dtype=bool), b.const(0.0), q])
    return q

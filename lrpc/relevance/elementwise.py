"""Element-wise layers: activations (one op, or several: passes/activation_regions.py) pass relevance unchanged;
residual sums split it in proportion to each branch's contribution (norm rule, ``R_i = x_i * R / stab(Σ x)``), or
among the branches of the output's sign (sign-norm)."""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError, where
from ..graph import const_value, is_const
from . import EXACT, declare, register
from .linear import unbroadcast
from .stabilize import SIGN_GROUPS, complement, indicator, own_quotient, quotient, sign_message

SMOOTH = "a smooth activation gets the pass rule (relevance passes unchanged, the gradient is scaled)"


@register("Relu", nonneg=True, gradient=EXACT)
@register("LeakyRelu", "PRelu", "ThresholdedRelu", "Clip", gradient=EXACT)
@register("Identity", "Dropout", keeps_nonneg=True, routes=True, gradient=EXACT)
@register("Sigmoid", "Softplus", "HardSigmoid", nonneg=True, gradient=SMOOTH)
@register("Tanh", "Gelu", "Elu", "Selu", "Celu", "Softsign", "Mish", "HardSwish", gradient=SMOOTH)
@register("LRN", keeps_nonneg=True, gradient="LRN gets the pass rule (its Jacobian is not the identity)")
def pass_through(ctx, node, R_out):
    """Pass: the activation's input gets the relevance of its output, element for element."""
    return [R_out[0]] + [None] * (len(node.inputs) - 1)


@register("lrpc.activation")  # (emit.ACTIVATION: no ONNX op type has a dot)
def activation(ctx, node, R_out):
    """An activation written as several element-wise ops (passes/activation_regions.py; ``node`` makes its output):
    identity, the activation's input gets the relevance of its output."""
    return [R_out[0]]


declare("Abs", "Exp", nonneg=True)  # (no propagator: inside activation regions)


@register("Sum", category="sum", keeps_nonneg=True, gradient=EXACT)
def residual_sum(ctx, node, R_out):
    rule = ctx.rule(node)
    if rule.on_sums is None:
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a sum "
                               "(use norm, sign-norm or epsilon)")
    z = node.outputs[0]
    rank = len(z.shape) if z.shape is not None else None
    addends = _addends(ctx, node)
    if rule.on_sums == "sign":
        return _sign_split(ctx, node, addends, rule, R_out[0], rank)
    # behind a ReLU the relevance is zero wherever the sum is <= 0: the sign test can go
    c = own_quotient(ctx, R_out[0], z, rule)
    if c is None:
        c = quotient(ctx.b, R_out[0], z, rule, rank, "positive" if ctx.no_relevance_below_zero(z) else None)
    fixed = [_fixed(ctx, x) for x in node.inputs]
    if ctx.audit:  # (an operand that is a constant for the rules is a bias)
        b, consts = ctx.b, [a for a, f in zip(addends, fixed) if f]
        bias = b.mul(c, b.sum(consts)) if consts else None
        if consts and not all(is_const(x) for x, f in zip(node.inputs, fixed) if f):  # (a computed mask may hold
            bias = b.op("Where", [b.op("IsNaN", [bias], dtype=bool), b.const(0.0), bias])  # -inf: c is 0 there)
        ctx.account(node, b.mul(c, b.sum([a for a, f in zip(addends, fixed) if not f])), bias,
                    b.mul(R_out[0], indicator(b, "Equal", z)))
    return [None if f else unbroadcast(ctx.b, ctx.product(a, c), x, z)
            for x, a, f in zip(node.inputs, addends, fixed)]


def _addends(ctx, node) -> list:
    """What a sum adds: its operands; for a difference ``a - b`` (explained as a Sum or a :data:`BIAS_SUM`, see
    emit.op_of) ``a`` and ``-b``."""
    if node.op != "Sub":
        return list(node.inputs)
    a, x = node.inputs
    return [a, ctx.b.const(-const_value(x)) if is_const(x) else ctx.b.op("Neg", [x])]


BIAS_SUM = "lrpc.bias_sum"  # what emission explains a Sum of one computed tensor and constants for the rules as


@register(BIAS_SUM, category="scale", keeps_nonneg=True, gradient=EXACT)
def bias_sum(ctx, node, R_out):
    """A sum of one tensor that depends on the explained input and addends that do not (position and token-type
    embeddings computed from the ids): an element-wise bias add, as where the addend is stored (category scale).
    pass sends all relevance to the computed operand; a rule for sums (epsilon) leaves the addends their share."""
    rule = ctx.rule(node)
    if rule.is_pass:
        z = node.outputs[0]
        return [None if _fixed(ctx, x) else unbroadcast(ctx.b, R_out[0], x, z) for x in node.inputs]
    return residual_sum(ctx, node, R_out)


def _fixed(ctx, x) -> bool:
    """``x`` is a constant for the rules (a bias of the sum): a constant, or no function of the explained input
    (BERT's token-type and position embeddings)."""
    return is_const(x) or x.name not in ctx.live


def _sign_split(ctx, node, addends, rule, R, rank):
    """sign-norm on a sum: where z > 0 the positive parts share R (``R_i = x_i+ R / Σ x_k+``), where z < 0 the
    negative parts (``R_i = x_i- R / Σ x_k-``); constant operands (biases) take their part of the denominators and
    keep it. A branch statically >= 0 has no negative part; behind a ReLU (R = 0 where z <= 0) the negative
    group is left out."""
    b, z = ctx.b, node.outputs[0]

    def part(x, sign: str):
        if is_const(x):
            v = (np.maximum if sign == "+" else np.minimum)(const_value(x), 0.0)
            return b.const(v.astype(b.dtype)) if np.any(v) else None
        if ctx.nonneg(x):
            return x if sign == "+" else None
        return b.relu(x) if sign == "+" else b.op("Min", [x, b.const(0.0)])

    quiet = ctx.no_relevance_below_zero(z)
    shares, accounts = [None] * len(node.inputs), []
    for sign, mask, known in SIGN_GROUPS:
        parts = [part(a, sign) for a in addends]
        if (sign == "-" and quiet) or all(p is None for p in parts):
            continue
        den = b.sum([p for p in parts if p is not None])
        c = sign_message(b, R, den, z, rule, rank, mask, known, quiet)
        for i, (x, p) in enumerate(zip(node.inputs, parts)):
            if p is not None and not _fixed(ctx, x):
                shares[i] = b.sum([shares[i], unbroadcast(b, ctx.product(p, c), x, z)])
        if ctx.audit:
            accounts.append((mask, c, den, [p for x, p in zip(node.inputs, parts) if p is not None and _fixed(ctx, x)]))
    if ctx.audit:
        kept = b.sum([b.mul(c, b.op("Sub", [den, b.sum(consts)]) if consts else den) for _, c, den, consts in accounts])
        bias = b.sum([b.mul(c, b.sum(consts)) for _, c, _, consts in accounts if consts])
        passed = b.sum([b.mul(indicator(b, mask, z), complement(b, indicator(b, "Equal", den)))
                        for mask, _, den, _ in accounts])
        ctx.account(node, kept if kept is not None else b.zeros_like(R), bias,
                    R if passed is None else b.mul(R, complement(b, passed)))
    return shares

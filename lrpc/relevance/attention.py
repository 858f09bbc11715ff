"""Attention: a MatMul of two computed tensors (Q·Kᵀ, A·V) and a Softmax inside the graph, under AttnLRP's rules
(Achtibat et al. 2024) or CP-LRP's (Ali et al. 2022: the attention probabilities are constants).

MatMul ``y = a · b`` (epsilon): ``n = R / stab(k y)``, ``R_a = a ⊙ (n · bᵀ)``, ``R_b = b ⊙ (aᵀ · n)`` over the last two
axes (batch axes broadcast back), ``k`` the number of operands that carry relevance: 2 splits it 50/50 (AttnLRP);
an operand that is a constant for the rules (no function of the explained input, or a softmax under the
``constant`` rule) gets none and ``k = 1``: the epsilon rule of the linear map of the other operand.
Softmax ``s = softmax(x)`` (taylor): ``R_x = x ⊙ (R - s ⊙ Σ_axis R)``, with x taken as 0 where s = 0 (masked
positions, x = -inf); under ``constant`` no relevance enters it."""
from __future__ import annotations

from ..errors import UnsupportedError, where
from ..graph import is_const
from . import EXACT, register
from .linear import LAYOUT
from .stabilize import quotient

MATMUL = "lrpc.matmul"  # what emission explains a MatMul of two computed tensors as (emit.op_of)


@register(MATMUL, category="matmul",
          gradient="a product of two computed tensors: its rule splits the relevance between the factors")
def matmul(ctx, node, R_out):
    rule = ctx.rule(node)
    if rule.on_sums != "share":
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a MatMul of two computed "
                               "tensors (use epsilon)")
    b, (x, w), y = ctx.b, node.inputs, node.outputs[0]
    if any(t.shape is None or len(t.shape) < 2 for t in (x, w, y)):
        raise UnsupportedError(f"{where(node)}: a MatMul of two computed tensors needs operands of known rank >= 2")
    live = [not _constant_for_rules(ctx, t) for t in (x, w)]
    if not any(live):
        return [None, None]
    n = quotient(b, R_out[0], y if sum(live) == 1 else b.mul(y, b.const(2.0)), rule, len(y.shape))
    r_x = _to_operand(b, b.mul(x, b.op("MatMul", [n, _swap_last(b, w)])), x, y) if live[0] else None
    r_w = _to_operand(b, b.mul(w, b.op("MatMul", [_swap_last(b, x), n])), w, y) if live[1] else None
    return [r_x, r_w]


@register("Softmax", category="softmax", nonneg=True, gradient=EXACT)
def softmax(ctx, node, R_out):
    rule = ctx.rule(node)
    if rule.constant:
        return [None]
    if "softmax" not in (rule.layers or ()):
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a Softmax "
                               "(use taylor or constant)")
    b, x, s, R = ctx.b, node.inputs[0], node.outputs[0], R_out[0]
    x = b.op("Where", [b.op("Equal", [s, b.const(0.0)], dtype=bool), b.const(0.0), x])
    r_x = b.mul(x, b.op("Sub", [R, b.mul(s, b.reduce_sum(R, [int(node.attrs.get("axis", -1))]))]))
    if ctx.audit:  # the expansion's remainder s − J x is its bias: what R_x does not carry is absorbed by design
        ctx.account(node, r_x, b.op("Sub", [R, r_x]))
    return [r_x]


def _constant_for_rules(ctx, t) -> bool:
    """``t`` carries no relevance: a constant, no function of the explained input, or (moved by layout ops, or
    through an activation region: the exporters' ``Where(IsNaN(s), 0, s)``) the output of a softmax under the
    ``constant`` rule (CP-LRP)."""
    if is_const(t) or t.name not in ctx.live:
        return True
    regions = ctx.canon.activations
    while t.inputs and (t.inputs[0].op in LAYOUT or t.inputs[0].name in regions):
        n = t.inputs[0]
        if n.name in regions:
            if "tensors" not in ctx.cache:  # (the forward's tensors by name)
                ctx.cache["tensors"] = ctx.b.graph.tensors()
            t = ctx.cache["tensors"][regions[n.name]]
        else:
            t = next(i for i in n.inputs if not is_const(i))
    n = t.inputs[0] if t.inputs else None
    rule = ctx.rule_of(n) if n is not None else None
    return rule is not None and rule.constant


def _swap_last(b, t):
    rank = len(t.shape)
    return b.op("Transpose", [t], {"perm": [*range(rank - 2), rank - 1, rank - 2]})


def _to_operand(b, r, x, y):
    """``r`` (``y``'s batch axes, ``x``'s last two) summed over the batch axes along which ``x`` was broadcast."""
    xs, ys = list(x.shape), list(y.shape)
    lead = len(ys) - len(xs)
    axes = list(range(lead)) + [lead + i for i in range(len(xs) - 2) if xs[i] == 1 and ys[lead + i] != 1]
    if not axes:
        return r
    r = b.reduce_sum(r, axes, keepdims=1)
    return b.op("Reshape", [r, b.shape_of(x)]) if lead else r

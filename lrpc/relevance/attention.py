"""Attention: a MatMul of two computed tensors (Q·Kᵀ, A·V) and a Softmax inside the graph, under AttnLRP's rules
(Achtibat et al. 2024) or CP-LRP's (Ali et al. 2022: the attention probabilities are constants).

MatMul ``y = a · b`` (epsilon): ``n = R / stab(k y)``, ``R_a = a ⊙ (n · bᵀ)``, ``R_b = b ⊙ (aᵀ · n)`` over the last two
axes (batch axes broadcast back), ``k`` the number of operands that carry relevance: 2 splits it 50/50 (AttnLRP);
an operand that is a constant for the rules (no function of the explained input, or a softmax under the
``constant`` rule) gets none and ``k = 1``: the epsilon rule of the linear map of the other operand.
An Einsum of two computed tensors (``bhid,bhjd->bhij``, MaxViT's attention) is the same bilinear map written as
one equation: ``R_a = a ⊙ einsum(n, b)``, ``R_b = b ⊙ einsum(a, n)`` with the adjoint equations.
Softmax ``s = softmax(x)`` (taylor): ``R_x = x ⊙ (R - s ⊙ Σ_axis R)``, 0 where s = 0 (masked positions, x = -inf:
the bracket is 0 there, and x is clamped to the lowest finite value so that the product is 0, not NaN); under
``constant`` no relevance enters it."""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError, where
from ..graph import is_const
from . import EXACT, register
from .linear import LAYOUT, einsum_equation
from .stabilize import own_quotient, quotient

MATMUL = "lrpc.matmul"  # what emission explains a MatMul of two computed tensors as (emit.op_of)
EINSUM = "lrpc.einsum"  # ... and an Einsum of two computed tensors


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
    n = _message(ctx, R_out[0], y, rule, sum(live), len(y.shape))
    a, c = (_probabilities_again(ctx, t) for t in (x, w))
    r_x = _to_operand(ctx, a, b.op("MatMul", [n, _swap_last(b, c)]), x, y) if live[0] else None
    r_w = _to_operand(ctx, c, b.op("MatMul", [_swap_last(b, a), n]), w, y) if live[1] else None
    return [r_x, r_w]


@register("Softmax", category="softmax", nonneg=True, gradient=EXACT)
def softmax(ctx, node, R_out):
    rule = ctx.rule(node)
    if rule.constant:
        return [None]
    if "softmax" not in (rule.layers or ()):
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a Softmax "
                               "(use taylor or constant)")
    b, R = ctx.b, R_out[0]
    x, s = _clamped_scores(ctx, node), _probabilities_again(ctx, node.outputs[0])
    r_x = ctx.product(x, b.op("Sub", [R, b.mul(s, b.reduce_sum(R, [int(node.attrs.get("axis", -1))]))]))
    if ctx.audit:  # the expansion's remainder s − J x is its bias: what R_x does not carry is absorbed by design
        ctx.account(node, r_x, b.op("Sub", [R, r_x]))
    return [r_x]


@register(EINSUM, category="matmul",
          gradient="a product of two computed tensors: its rule splits the relevance between the factors")
def einsum(ctx, node, R_out):
    """An Einsum of two computed tensors under the MatMul rule (epsilon, split between the live operands)."""
    rule = ctx.rule(node)
    if rule.on_sums != "share":
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to an Einsum of two computed "
                               "tensors (use epsilon)")
    b, (x, w), y = ctx.b, node.inputs, node.outputs[0]
    sx, sw, sy = bilinear_terms(node)
    live = [not _constant_for_rules(ctx, t) for t in (x, w)]
    if not any(live):
        return [None, None]
    rank = len(y.shape) if y.shape is not None else None
    n = _message(ctx, R_out[0], y, rule, sum(live), rank)
    a, c = (_probabilities_again(ctx, t) for t in (x, w))
    r_x = ctx.product(a, b.op("Einsum", [n, c], {"equation": f"{sy},{sw}->{sx}"})) if live[0] else None
    r_w = ctx.product(c, b.op("Einsum", [a, n], {"equation": f"{sx},{sy}->{sw}"})) if live[1] else None
    return [r_x, r_w]


def bilinear_terms(node) -> tuple[str, str, str]:
    """The subscripts of an Einsum of two operands whose adjoints are Einsums again: no diagonal, every index of an
    operand also in the other or in the output, an ellipsis only where it spans the same dims in all three."""
    eq, terms, out = einsum_equation(node)
    if len(terms) != 2 or len(node.inputs) != 2:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}' has an LRP rule only with two operands")
    sa, sb = terms
    bare = [t.replace("...", "") for t in (sa, sb, out)]
    if any(len(t) != len(set(t)) for t in bare):
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}': repeated subscripts (a diagonal) have no LRP rule")
    lost = [c for i, j, k in ((0, 1, 2), (1, 0, 2)) for c in bare[i] if c not in bare[j] + bare[k]]
    if lost:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}': index '{lost[0]}' of one operand is summed away alone "
                               "(a sum inside the product) has no LRP rule")
    if "..." in eq:
        def span(t, s):  # the dims the ellipsis stands for
            p = s.index("...")
            return None if t.shape is None or "..." not in s else list(t.shape)[p:len(t.shape) - len(s) + p + 3]

        spans = [span(t, s) for t, s in zip((*node.inputs, node.outputs[0]), (sa, sb, out))]
        if spans[0] is None or any(s != spans[0] for s in spans):
            raise UnsupportedError(f"{where(node)}: Einsum '{eq}': an ellipsis has an LRP rule only where it spans "
                                   "the same known dims in both operands and the output")
    return sa, sb, out


def _message(ctx, R, y, rule, live: int, rank):
    """``R / stab(k y)``, k the number of operands that carry relevance (:func:`own_quotient` where it applies)."""
    k = float(live)
    n = own_quotient(ctx, R, y, rule, k)
    if n is None:
        b = ctx.b
        n = quotient(b, R, y if k == 1.0 else b.mul(y, b.const(k)), rule, rank)
    return n


def _clamped_scores(ctx, node):
    """A Softmax's input clamped to the lowest finite value: where s = 0 (x = -inf, a masked position) the taylor
    rule's bracket is exactly 0, and a finite x there makes its product 0 (one pass instead of a compare and a
    Where). Built once per Softmax."""
    key = ("clamped", node.name)
    if key not in ctx.cache:
        b = ctx.b
        clamped = ctx.cache[key] = b.op("Max", [node.inputs[0], b.const(float(np.finfo(b.dtype).min))])
        ctx.clamps[clamped.name] = node.inputs[0].name
    return ctx.cache[key]


def _probabilities_again(ctx, t):
    """``t`` itself, or where it is the output of a Softmax under the taylor rule (possibly through a Cast to its own
    type, an Identity), that softmax computed again from its clamped input, which the rule reads anyway: the same
    values (bit for bit unless a row is all -inf), and the forward's probabilities are free as soon as the forward
    has used them. onnxruntime merges identical nodes (common-subexpression elimination): a Softmax of the clamped
    input is not the forward's, so it stays a second one, run where the backward needs it, and the attention-sized
    tensors kept from the forward to the backward are one fewer per layer. (Under cp-lrp the rule reads no input, so
    the forward's probabilities are kept.)"""
    n = t.inputs[0] if t.inputs else None
    while n is not None and (n.op == "Identity" or (n.op == "Cast" and n.inputs[0].dtype == t.dtype)):
        n = n.inputs[0].inputs[0] if n.inputs[0].inputs else None
    rule = ctx.rule_of(n) if n is not None and n.op == "Softmax" else None
    if rule is None or rule.constant:
        return t
    key = ("probabilities", n.name)
    if key not in ctx.cache:
        again = ctx.cache[key] = ctx.b.op("Softmax", [_clamped_scores(ctx, n)], dict(n.attrs))
        again.shape = n.outputs[0].shape
    return ctx.cache[key]


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


def _to_operand(ctx, a, m, x, y):
    """``a ⊙ m`` (``y``'s batch axes, ``x``'s last two; ``a`` is ``x`` or its probabilities computed again) summed
    over the batch axes along which ``x`` was broadcast; where there are none, remembered as a product (the layer
    making ``x`` then sees its own output times a message)."""
    xs, ys = list(x.shape), list(y.shape)
    lead = len(ys) - len(xs)
    axes = list(range(lead)) + [lead + i for i in range(len(xs) - 2) if xs[i] == 1 and ys[lead + i] != 1]
    if not axes:
        return ctx.product(a, m)
    b = ctx.b
    r = b.reduce_sum(b.mul(a, m), axes, keepdims=1)
    return b.op("Reshape", [r, b.shape_of(x)]) if lead else r

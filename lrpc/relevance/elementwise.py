"""Element-wise layers: activations (one op, or several: passes/activation_regions.py) pass relevance unchanged;
residual sums split it in proportion to each branch's contribution (norm rule, ``R_i = x_i * R / stab(Σ x)``)."""
from __future__ import annotations

from ..errors import UnsupportedError, where
from ..graph import is_const
from . import register
from .linear import unbroadcast
from .stabilize import quotient

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
               "HardSigmoid", "HardSwish", "Mish", "LRN", "Identity", "Dropout", "Celu", "ThresholdedRelu")


@register(*ACTIVATIONS)
def pass_through(ctx, node, R_out):
    """Pass: the activation's input gets the relevance of its output, element for element."""
    return [R_out[0]] + [None] * (len(node.inputs) - 1)


@register("Activation")
def activation(ctx, node, R_out):
    """An activation written as several element-wise ops (passes/activation_regions.py; ``node`` makes its output):
    identity, the activation's input gets the relevance of its output."""
    return [R_out[0]]


@register("Sum")
def residual_sum(ctx, node, R_out):
    rule = ctx.rule(node)
    if rule.name not in ("norm", "epsilon"):
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a sum (use norm or epsilon)")
    z = node.outputs[0]
    rank = len(z.shape) if z.shape is not None else None
    # behind a ReLU the relevance is zero wherever the sum is <= 0: the sign test can go
    c = quotient(ctx.b, R_out[0], z, rule, rank, "positive" if ctx.no_relevance_below_zero(z) else None)
    return [None if is_const(x) else unbroadcast(ctx.b, ctx.product(x, c), x, z) for x in node.inputs]

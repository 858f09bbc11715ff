"""Normalization layers (LayerNormalization, InstanceNormalization, GroupNormalization) with their standard deviation
held constant, as AttnLRP does: ``y = w ⊙ (x - mean(x)) / sigma + b`` (mean and sigma over the normalized axes of
each sample, instance or group) is then a linear map of ``x`` whose adjoint is ``c -> centre(w ⊙ c / sigma)``
(centre: minus the mean over those axes). The linear emitter lowers the layer's rule through it: epsilon is
AttnLRP's LayerNorm rule ``v = w ⊙ R / stab(y) / sigma``, ``R_x = x ⊙ (v - mean(v))``; the bias keeps its share."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import Builder, const_value, is_const
from ..passes.norm_affine import NORMALIZATIONS
from ..rules import RULES as ALL_RULES
from ..rules import make_rule
from . import register
from .linear import View, emit_rule

# the rules it takes: the others need the positive part of the (centring) matrix, which w does not give
RULES = tuple(name for name in ALL_RULES if make_rule(name).plain_weights and make_rule(name).layers is None)


class NormView(View):
    """``z = w ⊙ centre(x) / sigma + b``, sigma a constant. ``groups``: GroupNormalization's group count (statistics
    over ``[N, groups, -1]``), else None (over ``axes`` of ``x`` itself); ``inv_sigma`` broadcasts over that layout."""

    def __init__(self, ctx, node, x, w, bias, axes: list[int], groups: int | None, inv_sigma):
        super().__init__(ctx, node, x, w, bias)
        self.axes, self.groups, self.inv_sigma = axes, groups, inv_sigma

    def forward(self, x, w, bias):
        """``w ⊙ centre(x) / sigma (+ bias)`` of the layer's own input: the bias-free output that denominators without
        biases (zero_bias) take. (Only the rules of RULES reach the emitter: they need no other forward.)"""
        if x is not self.x:
            raise UnsupportedError(f"{where(self.node)}: a normalization layer takes only the rules {', '.join(RULES)}")
        b = self.b
        u = _grouped(b, x, self.groups)
        u = b.mul(b.op("Sub", [u, b.reduce_mean(u, self.axes)]), self.inv_sigma)
        u = b.mul(u if self.groups is None else b.op("Reshape", [u, b.shape_of(self.x)]), w)
        return u if bias is None else b.add(u, bias)

    def without_bias(self):  # (no forward of its own: the layer's output minus its bias)
        return self.z if self.bias is None else self.b.op("Sub", [self.z, self.bias_for_output(self.bias)])

    def adjoint(self, c, w):
        b = self.b
        u = _grouped(b, b.mul(c, w), self.groups)
        u = b.mul(u, self.inv_sigma)
        u = b.op("Sub", [u, b.reduce_mean(u, self.axes)])
        return u if self.groups is None else b.op("Reshape", [u, b.shape_of(self.x)])


@register("RMSNormalization", gradient="RMSNorm gets the identity over the layer (AttnLRP: 1/rms held constant)")
def rms_normalization(ctx, node, R_out):
    """ONNX's RMSNormalization (opset 23): AttnLRP's identity over the layer, ``R_x = R`` (the scale's share
    included: epsilon on the scale's Mul, as a written-out RMSNorm gets it, is the identity up to the stabilizer)."""
    return [R_out[0]] + [None] * (len(node.inputs) - 1)


@register(*NORMALIZATIONS, category="normalization", keeps_category=True,  # (a bias Add norm_affine could not fold)
          gradient="a normalization's rule holds its standard deviation constant (AttnLRP), the gradient does not")
def normalization(ctx, node, R_out):
    """The layer under its rule (category ``normalization``: epsilon in every composite)."""
    rule = ctx.rule(node)
    view = norm_view(ctx, node)
    if not rule.plain_weights:
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a normalization layer "
                               f"(use {', '.join(RULES)})")
    r = R_out[0] if rule.is_pass else emit_rule(ctx, view, rule, R_out[0])
    return [r] + [None] * (len(node.inputs) - 1)


def norm_view(ctx, node) -> NormView:
    """The :class:`NormView` of a normalization node; UnsupportedError where the rule cannot take it (scale or bias
    computed in the graph, statistics over the batch axis, relevance reaching its Mean/InvStdDev outputs)."""
    x, ins = node.inputs[0], node.inputs
    params = [t for t in ins[1:3] if t.name]
    if not all(is_const(t) for t in params):
        raise UnsupportedError(f"{where(node)}: {node.op} with a scale or bias computed in the graph has no LRP rule "
                               "(only constant scale and bias)")
    if any(t.outputs for t in node.outputs[1:]):
        raise UnsupportedError(f"{where(node)}: {node.op} whose Mean/InvStdDev outputs are used has no LRP rule")
    if x.shape is None:
        raise UnsupportedError(f"{where(node)}: cannot resolve the rank of its input '{x.name}'")
    b, rank = ctx.b, len(x.shape)
    eps = float(node.attrs.get("epsilon", 1e-5))
    scale, bias = (const_value(ins[i]).astype(np.float64) if len(ins) > i and ins[i].name else None for i in (1, 2))
    if node.op == "LayerNormalization":
        axis = int(node.attrs.get("axis", -1)) % rank
        if axis == 0:
            raise UnsupportedError(f"{where(node)}: LayerNormalization over the batch axis (axis 0) mixes the samples")
        axes = list(range(axis, rank))
        own = np.dtype(x.dtype) == np.float32 == b.dtype  # (InvStdDev is float32 under the default stash_type)
        inv = _inv_std_output(ctx, node) if own else _inv_std(b, x, axes, eps)
        return NormView(ctx, node, x, ins[1], ins[2] if bias is not None and np.any(bias) else None, axes, None, inv)
    channels = x.shape[1] if rank > 2 else None
    if not isinstance(channels, (int, np.integer)):
        raise UnsupportedError(f"{where(node)}: {node.op} needs a rank >= 3 input with a static channel dim "
                               f"(got {x.shape})")
    groups = int(node.attrs["num_groups"]) if node.op == "GroupNormalization" else None
    shape = [channels] + [1] * (rank - 2)
    w = b.const(scale.reshape(shape).astype(b.dtype))
    bias = b.const(bias.reshape(shape).astype(b.dtype)) if np.any(bias) else None
    axes = [2] if groups is not None else list(range(2, rank))
    return NormView(ctx, node, x, w, bias, axes, groups, _inv_std(b, _grouped(b, x, groups), axes, eps))


def _grouped(b, t, groups: int | None):
    """``t`` [N, C, ...] as [N, groups, C/groups * ...] (GroupNormalization's statistics), or as it is."""
    return t if groups is None else b.op("Reshape", [t, b.ints([0, groups, -1])])


def _inv_std(b, x, axes: list[int], eps: float):
    """``1 / sqrt(var(x) + eps)`` over ``axes`` (keepdims), computed in the graph; in float32 for narrower float
    types (a float16 square overflows past |x - mean| = 256, as onnxruntime's own normalizations avoid)."""
    if b.dtype.itemsize >= 4:
        d = b.op("Sub", [x, b.reduce_mean(x, axes)])
        return b.op("Reciprocal", [b.op("Sqrt", [b.add(b.reduce_mean(b.mul(d, d), axes), b.const(eps))])])
    wide = Builder(b.graph, np.float32, b.name("float32"))
    inv = _inv_std(wide, wide.op("Cast", [x], {"to": onnx.TensorProto.FLOAT}), axes, eps)
    return b.op("Cast", [inv], {"to": onnx.helper.np_dtype_to_tensor_dtype(b.dtype)})


def _inv_std_output(ctx, node):
    """LayerNormalization's own InvStdDev output (added to the forward node; its Mean output stays omitted)."""
    outs = node.outputs
    if len(outs) < 3 or not outs[2].name:
        while len(outs) < 2:
            outs.append(gs.Variable.empty())
        inv = gs.Variable(ctx.b.name("inv_std"), dtype=np.float32)
        if len(outs) < 3:
            outs.append(inv)
        else:
            outs[2] = inv
    return outs[2]

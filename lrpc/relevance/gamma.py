"""Generalized gamma on inputs of either sign in one formula: one extra forward and two adjoints per layer.

The rule (rules.gamma) sends ``x+ ⊙ (Wupᵀc↑ + Wdownᵀc↓) + x- ⊙ (Wdownᵀc↑ + Wupᵀc↓)`` down, with
``c↑ = [z>0] R / stab(z↑)``, ``c↓ = [z<0] R / stab(z↓)``, ``z↑ = z + γ(P + b+)``, ``z↓ = z + γ(N + b-)`` and
``P = W+x+ + W-x-`` (the positive contributions), ``N = W-x+ + W+x-``. With ``P + N = Wx`` and
``P - N = |W||x|``: ``z↑ = (1+γ/2)z + (γ/2)(|W||x| + |b|)`` where z > 0, and ``z↓`` the same with the sign
of z on the second term where z < 0. So ``stab(z↕) = sign(z) (1+γ/2) D`` with

    D = |z| + k (|W||x| + |b|) + e,   k = γ / (2 + γ),   e = eps / (1 + γ/2)

(clip: ``max(|z| + k(|W||x| + |b|), e)``), never below e. With ``q = R / D`` the messages are
``c↑ + c↓ = sign(z) q / (1+γ/2)`` and ``c↑ - c↓ = [z≠0] q / (1+γ/2)``, and since ``W± = (W ± |W|)/2``::

    R_in = x ⊙ Wᵀ(sign(z) q) + k |x| ⊙ |W|ᵀ([z≠0] q)

One forward (``|x|`` with ``k|W|``, bias ``k|b| + e``) instead of four and two adjoints instead of four; no
compares, casts or masks beyond one sign(z). Behind a ReLU (no relevance where z <= 0) both messages are ``q``;
where the relevance arriving is ``z ⊙ c`` (a residual branch) they are ``|z| c / D`` and ``z c / D``. The
values equal the rule's up to round-off: the γ terms come from ``|W||x|`` and ``z - b`` instead of ``W±x±``;
where z > 0, ``P + b+ > |N| + |b-|``, so the error of ``|W||x| = P - N`` (at most u(P + |N|), u the unit
round-off) stays within 2u of ``D`` whatever γ (the same where z < 0)."""
from __future__ import annotations

import numpy as np

from ..graph import const_value
from .stabilize import complement, sign


def signed_gamma(ctx, view, rule, R):
    """``R_in`` of the gamma rule by the formula above; None where it does not apply (other rules and
    stabilizers, γ = 0 or eps = 0, biases left out of the denominators) or where the emitter's own lowering
    needs no more work (a non-negative input whose relevance vanishes where z <= 0: one forward, one adjoint)."""
    g = rule.gamma
    if (not g > 0 or rule.stabilizer not in ("sign", "clip") or not rule.eps > 0
            or (rule.zero_bias and view.bias is not None)):
        return None
    nonneg, quiet = ctx.nonneg(view.x), ctx.no_relevance_below_zero(view.z)
    if nonneg and quiet:
        return None
    b, x, z = ctx.b, view.x, view.z
    k, e = g / (2.0 + g), rule.eps / (1.0 + g / 2.0)
    ax = x if nonneg else b.op("Abs", [x])
    aw = _abs_weight(ctx, view, k)
    offset = k * np.abs(const_value(view.bias).astype(np.float64)) if view.bias is not None else 0.0
    az = b.op("Abs", [z])
    if rule.stabilizer == "sign":  # e rides in the bias: D is |z| plus one Conv over |x|
        den = b.add(az, view.forward(ax, aw, view.constant_bias(offset + e)))
    else:
        bias = view.constant_bias(offset) if view.bias is not None else None
        den = b.op("Max", [b.add(az, view.forward(ax, aw, bias)), b.const(e)])
    factors, s = ctx.factors_of(R), None
    if factors is not None and factors[0] is z:  # R = z ⊙ c: sign(z) R = |z| c, [z≠0] R = z c
        q = b.op("Div", [factors[1], den])
        m1, m2 = b.mul(q, az), b.mul(q, z)
    elif quiet:  # R = 0 wherever z <= 0: sign(z) = [z≠0] = 1 wherever it matters
        m1 = m2 = b.op("Div", [R, den])
    else:
        s = sign(b, z)
        m1 = b.mul(b.op("Div", [R, den]), s)
        m2 = b.mul(m1, s)
    if ctx.audit:  # (where z = 0 both masks drop the relevance arriving: R ⊙ (1 - s²))
        zero = None if s is None else b.mul(R, complement(b, b.mul(s, s)))
        _account(ctx, view, m1, m2, ax, aw, offset, zero)
    if nonneg:  # x = |x|: one product
        return ctx.product(x, b.add(view.adjoint(m1, view.w), view.adjoint(m2, aw)))
    return b.add(ctx.product(x, view.adjoint(m1, view.w)), b.mul(ax, view.adjoint(m2, aw)))


def _account(ctx, view, m1, m2, ax, aw, offset, zero) -> None:
    """The layer's accounts (:meth:`lrpc.emit.Context.account`): it passes on ``m1 ⊙ f(x; W) + m2 ⊙ f(|x|; k|W|)``
    (what the two adjoints send down, summed), its biases take ``m1 ⊙ b + m2 ⊙ k|b|`` (the rule's
    ``c↑ b↑ + c↓ b↓`` in the scaled messages), and where z = 0 neither mask passes relevance on (``zero``: None
    where the relevance arriving vanishes there)."""
    b = ctx.b
    kept = b.add(b.mul(m1, view.without_bias()), b.mul(m2, view.forward(ax, aw, None)))
    bias = None
    if view.bias is not None:
        bias = b.add(b.mul(m1, view.bias_for_output(view.bias)),
                     b.mul(m2, view.bias_for_output(view.constant_bias(offset))))
    ctx.account(view.node, kept, bias, zero)


def _abs_weight(ctx, view, k: float):
    """``k |W|`` (constant-folded at session start for a stored weight), built once per weight."""
    key = ("k|W|", view.w.name, k)
    if key not in ctx.cache:
        b = ctx.b
        ctx.cache[key] = b.mul(b.op("Abs", [view.w]), b.const(k))
    return ctx.cache[key]

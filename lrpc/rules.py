"""LRP rules as data (docs/rules.md says what each rule computes).

A rule on a linear layer ``z = W x + b`` is a list of *groups*. Each group has terms
``(input variant, weight variant, bias variant, sign)``; its denominator is
``d = stab(sum_t sign_t * f(input_t; W_t) + bias)``, its message is
``c = coef * mask(z) * R / d``, and the relevance it sends down is
``sum_t sign_t * input_t * W_tᵀ c``. The emitter (relevance/linear.py) lowers this for any
linear op through the op's adjoint. No graph code lives here.

Variants:
- inputs: ``x``, ``x+`` (max(x,0)), ``x-`` (min(x,0)), ``ones`` (a tensor of ones; the input factor of the
  numerator is then left out, as in zennit's flat/w-square), ``low``, ``high`` (z-box bounds).
- weights: ``W``, ``W+``, ``W-``, ``Wup`` (W + γW+), ``Wdown`` (W + γW-), ``W2`` (W²), ``ones``.
- biases: ``b``, ``b+``, ``b-``, ``bup`` (b + γb+), ``bdown`` (b + γb-), ``b2`` (b²), or None.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np

STABILIZERS = ("sign", "clip", "norm-scale")
DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class Term:
    input: str
    weight: str
    bias: str | None = None
    sign: float = 1.0


@dataclass(frozen=True)
class Group:
    terms: tuple[Term, ...]
    coef: float = 1.0
    mask: str | None = None  # "z>0" / "z<0": keep only outputs where the plain forward z has that sign
    above_z: bool = False  # the denominator is z plus non-negative terms (if biases are kept): > 0 where z > 0
    below_z: bool = False  # the denominator is z plus non-positive terms (if biases are kept): < 0 where z < 0


@dataclass(frozen=True)
class Rule:
    """A named rule with its parameters; ``groups`` is empty for ``pass``."""

    name: str
    groups: tuple[Group, ...] = ()
    eps: float = DEFAULT_EPS
    stabilizer: str = "sign"
    zero_bias: bool = False
    params: dict = field(default_factory=dict, compare=False, hash=False)
    # how it splits a parameter-free sum or reduction: "share" (in proportion to the terms), "sign" (among the terms
    # of the output's sign); None: it does not apply there
    on_sums: str | None = None
    own_output: bool = False  # where R = z ⊙ c (z the layer's own output) its masks and sign tests fold into z
    layers: tuple[str, ...] | None = None  # the only categories it applies to (None: linear layers, on_sums)
    splits: bool = False  # a product of computed factors gives each the same share (not in proportion)
    constant: bool = False  # the layer's output is a constant for the rules: no relevance enters it

    @property
    def is_pass(self) -> bool:
        return not self.groups and self.layers is None

    @property
    def gamma(self) -> float:
        """The γ of its ``Wup``/``Wdown`` variants (0 for rules without them)."""
        return float(self.params.get("gamma", 0.0))

    @property
    def plain_weights(self) -> bool:
        """Every term weighs with ``W`` itself (no W+, W², ones): a linear map known only by its forward and
        adjoint (a normalization's centring) can lower it."""
        return all(t.weight == "W" for g in self.groups for t in g.terms)

    def describe(self) -> str:
        ps = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({ps})" if ps else self.name

    def bias(self, name: str | None) -> str | None:
        return None if self.zero_bias else name


def epsilon(epsilon: float = DEFAULT_EPS, **kw) -> Rule:
    return Rule("epsilon", (Group((Term("x", "W", "b"),), above_z=True),), eps=epsilon, params={"epsilon": epsilon},
                on_sums="share", own_output=True, **kw)


def zplus(**kw) -> Rule:
    return Rule("zplus", (Group((Term("x+", "W+", "b+"), Term("x-", "W-"))),), **kw)


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, **kw) -> Rule:
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
        raise ValueError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1 (got alpha={alpha}, beta={beta})")
    pos = Group((Term("x+", "W+", "b+"), Term("x-", "W-")), coef=alpha)
    neg = Group((Term("x+", "W-", "b-"), Term("x-", "W+")), coef=-beta)
    groups = (pos, neg) if beta != 0 else (pos,)
    return Rule("alpha-beta", groups, params={"alpha": alpha, "beta": beta}, **kw)


def gamma(gamma: float = 0.25, **kw) -> Rule:
    """Generalized (sign-aware) gamma; equals classic LRP-γ for x ≥ 0 and z > 0. γ ≥ 0: the denominators
    z↑ = z + γz⁺ and z↓ = z + γz⁻ then keep the sign of z, which the emitter relies on."""
    if not gamma >= 0:
        raise ValueError(f"gamma needs gamma >= 0 (got gamma={gamma})")
    up = Group((Term("x+", "Wup", "bup"), Term("x-", "Wdown")), mask="z>0", above_z=True)
    down = Group((Term("x+", "Wdown", "bdown"), Term("x-", "Wup")), mask="z<0", below_z=True)
    return Rule("gamma", (up, down), params={"gamma": gamma}, own_output=True, **kw)


def sign_norm(**kw) -> Rule:
    """Each output's relevance split among the contributions of its own sign: ``x+W+ + x-W- + b+`` where z > 0,
    ``x+W- + x-W+ + b-`` where z < 0 (generalized gamma as γ → ∞). Conserves (up to biases), keeps each share
    between 0 and the output's relevance, and, on a sum or an average pool (weights ≥ 0) of non-negative
    inputs, equals the norm rule: the stable norm rule for sums whose branches have both signs."""
    up = Group((Term("x+", "W+", "b+"), Term("x-", "W-")), mask="z>0", above_z=True)
    down = Group((Term("x+", "W-", "b-"), Term("x-", "W+")), mask="z<0", below_z=True)
    return Rule("sign-norm", (up, down), on_sums="sign", **kw)


def zbox(low=0.0, high=1.0, **kw) -> Rule:
    """low/high: scalar, per-channel list, or a nested list shaped like one input sample."""
    terms = (Term("x", "W"), Term("low", "W+", sign=-1.0), Term("high", "W-", sign=-1.0))
    return Rule("zbox", (Group(terms),), params={"low": low, "high": high}, **kw)


def flat(**kw) -> Rule:
    return Rule("flat", (Group((Term("ones", "ones"),)),), **kw)


def wsquare(**kw) -> Rule:
    return Rule("wsquare", (Group((Term("ones", "W2", "b2"),)),), **kw)


def norm(**kw) -> Rule:
    """Proportional split for parameter-free layers (sums, average pools): epsilon without bias. It is zero_bias
    epsilon wherever it meets a layer with a bias (a normalization's, through a rule file): its denominator is ``Wx``
    computed by a forward of its own, and not known to exceed z."""
    return Rule("norm", (Group((Term("x", "W"),), above_z=True),), on_sums="share", **{**kw, "zero_bias": True})


def pass_(**kw) -> Rule:
    kw.pop("eps", None)
    kw.pop("stabilizer", None)
    return Rule("pass", (), **{k: v for k, v in kw.items() if k == "zero_bias"})


def taylor(**kw) -> Rule:
    """AttnLRP's softmax rule (a Taylor expansion at the input): ``R_x = x ⊙ (R - s ⊙ Σ_axis R)``, 0 where s = 0."""
    return Rule("taylor", layers=("softmax",))


def constant(**kw) -> Rule:
    """CP-LRP's attention probabilities: the softmax output is a constant, no relevance enters it; a product with it
    is a linear map of its other operand."""
    return Rule("constant", layers=("softmax",), constant=True)


def split(**kw) -> Rule:
    """AttnLRP's gated products (SwiGLU's ``silu(gate) ⊙ up``): each factor gets half of the product's relevance,
    ``R_a = R_b = R / 2``; a factor that does not depend on the explained input gets none (the other gets all)."""
    return Rule("split", layers=("gate",), splits=True)


# name -> (factory, parameter names it takes from the user)
RULES = {
    "epsilon": (epsilon, ("epsilon",)),
    "zplus": (zplus, ()),
    "alpha-beta": (alpha_beta, ("alpha", "beta")),
    "gamma": (gamma, ("gamma",)),
    "zbox": (zbox, ("low", "high")),
    "flat": (flat, ()),
    "wsquare": (wsquare, ()),
    "norm": (norm, ()),
    "sign-norm": (sign_norm, ()),
    "pass": (pass_, ()),
    "taylor": (taylor, ()),
    "constant": (constant, ()),
    "split": (split, ()),
}


def make_rule(name: str, params: dict | None = None, *, eps: float = DEFAULT_EPS, stabilizer: str = "sign",
              zero_bias: bool = False) -> Rule:
    """Build rule ``name``; ``params`` holds its own parameters, ``eps`` the stabilizer's epsilon."""
    if name not in RULES:
        raise ValueError(f"unknown rule '{name}' (known: {', '.join(RULES)})")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"unknown stabilizer '{stabilizer}' (known: {', '.join(STABILIZERS)})")
    factory, names = RULES[name]
    params = dict(params or {})
    unknown = set(params) - set(names)
    if unknown:
        raise ValueError(f"rule '{name}' takes no parameter(s) {', '.join(sorted(unknown))}")
    eps = number("the stabilizer's eps", eps, minimum=0.0)
    if not isinstance(zero_bias, bool):
        raise ValueError(f"zero_bias must be true or false (got {zero_bias!r})")
    for key in ("epsilon", "gamma", "alpha", "beta"):  # (the rules check their own ranges: gamma >= 0, …)
        if key in params:
            params[key] = number(key, params[key], minimum=0.0 if key == "epsilon" else None)
    if name == "zbox":
        check_bounds(params.get("low", 0.0), params.get("high", 1.0))
    common = {"stabilizer": stabilizer, "zero_bias": zero_bias}
    if name != "epsilon":
        common["eps"] = eps
    return factory(**params, **common)


def number(what: str, value, minimum: float | None = None) -> float:
    """``value`` as a float: a finite real number (not a bool), at least ``minimum``; ValueError otherwise."""
    try:
        finite = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    except OverflowError:  # (an int past float's range)
        finite = False
    if not finite:
        raise ValueError(f"{what} must be a finite number (got {_shown(value)})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum:g} (got {value!r})")
    return float(value)


def _shown(value) -> str:
    """``repr(value)`` for a message, at most 40 characters (an int of thousands of digits has no repr)."""
    try:
        text = repr(value)
    except ValueError:  # (an int past Python's digit limit for text, or a list holding one)
        return (f"an integer of {value.bit_length()} bits" if isinstance(value, int)
                else f"a {type(value).__name__} of huge integers")
    return text if len(text) <= 40 else text[:37] + "..."


def check_bounds(low, high) -> None:
    """ValueError unless the z-box bounds (numbers or nested lists of them) are finite, and low <= high wherever they
    meet (they broadcast against each other and the input)."""
    arrays = []
    for what, v in (("low", low), ("high", high)):
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            a = None
        if a is None or a.size == 0 or isinstance(v, bool) or not np.all(np.isfinite(a)):
            raise ValueError(f"zbox {what} must be finite numbers: a number or a (nested) list (got {_shown(v)})")
        arrays.append(a)
    # as the emitter reads them: a 1-d list of several values is one per channel, against another bound given
    # as one sample's shape [C, *spatial]
    rank = max(a.ndim for a in arrays)
    arrays = [a.reshape(-1, *[1] * (rank - 1)) if a.ndim == 1 and a.size > 1 else a for a in arrays]
    try:
        above = np.any(arrays[0] > arrays[1])
    except ValueError:  # shapes that do not broadcast: the compile names the layer
        above = False
    if above:
        raise ValueError(f"zbox low must not exceed high (low={_shown(low)}, high={_shown(high)})")


def with_options(rule: Rule, **changes) -> Rule:
    return replace(rule, **changes)


def weight_basis(variant: str, gamma: float = 0.0) -> dict[str, float]:
    """A weight variant as a linear combination of basis weights. W- = W - W+, so every sign variant
    is a mix of ``W`` and ``W+``: the emitter then runs one forward and one adjoint per basis (and
    reuses the layer's own output for ``W``) instead of one per variant."""
    return {
        "W": {"W": 1.0},
        "W+": {"W+": 1.0},
        "W-": {"W": 1.0, "W+": -1.0},
        "Wup": {"W": 1.0, "W+": gamma},
        "Wdown": {"W": 1.0 + gamma, "W+": -gamma},
    }.get(variant, {variant: 1.0})

"""Composites: which rule each layer gets. Data only; the emitter asks :func:`assign_rules`.

Layer categories (decided by the emitter from the canonical graph):
``conv`` (Conv, ConvTranspose), ``dense`` (Gemm, MatMul), ``avgpool`` (a Conv made from an average pool),
``resize`` (a Resize/Upsample lowered to MatMuls), ``sum`` (residual Sum), ``scale`` (element-wise affine:
standalone BatchNormalization, Mul/Add by a constant), ``normalization`` (LayerNormalization, InstanceNormalization,
GroupNormalization, and a bias Add after one that could not fold into it; epsilon: AttnLRP's rule, the standard
deviation held constant), ``matmul`` (a MatMul of two computed tensors: attention's Q·Kᵀ and A·V), ``softmax``
(a Softmax inside the graph that is not a gate: attention's probabilities), ``gate`` (an element-wise Mul of two
computed tensors that is no activation: a squeeze-and-excitation gate, SwiGLU's ``silu(gate) ⊙ up``; ``pass``: the
signal gets all, the gate none; ``split``: 50/50). Every composite gives matmul and softmax AttnLRP's rules unless it
names others (cp-lrp: the probabilities are constants); gates get pass unless it names split (attnlrp).
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from . import rules as R
from .errors import InputError

# (sum: Options.sum_rule)
BASE = {"avgpool": "norm", "resize": "norm", "sum": "norm", "scale": "pass", "normalization": "epsilon",
        "matmul": "epsilon", "softmax": "taylor", "gate": "pass"}
SUM_RULES = tuple(name for name in R.RULES if R.make_rule(name).on_sums)  # the rules a residual sum takes
CATEGORIES = ("conv", "dense", *BASE)


@dataclass(frozen=True)
class Composite:
    name: str
    layers: dict  # category -> rule name
    first: tuple | None = None  # (categories, rule name) for the first such layer in execution order
    doc: str = ""
    params: dict = field(default_factory=dict)  # category -> its rule's parameters (over the shared options)

    def rule(self, options: Options, name: str, category: str) -> R.Rule:
        """Rule ``name`` for a layer of ``category``: the options' parameters, then the composite's for the category
        (those the rule takes)."""
        takes = R.RULES.get(name, (None, ()))[1]
        return options.rule(name, {k: v for k, v in self.params.get(category, {}).items() if k in takes})


COMPOSITES = {c.name: c for c in [
    Composite("epsilon-gamma-box", {"conv": "gamma", "dense": "epsilon"}, (("conv",), "zbox"),
              "z-box on the first Conv, gamma on other Convs, epsilon on dense layers"),
    Composite("epsilon-plus", {"conv": "zplus", "dense": "epsilon"}, None,
              "z-plus on Convs, epsilon on dense layers"),
    Composite("epsilon-plus-flat", {"conv": "zplus", "dense": "epsilon"}, (("conv", "dense"), "flat"),
              "flat on the first Conv/dense layer, z-plus on Convs, epsilon on dense layers"),
    Composite("epsilon-alpha2-beta1", {"conv": "alpha-beta", "dense": "epsilon"}, None,
              "alpha-beta(2,1) on Convs, epsilon on dense layers"),
    Composite("epsilon-alpha2-beta1-flat", {"conv": "alpha-beta", "dense": "epsilon"}, (("conv", "dense"), "flat"),
              "flat on the first Conv/dense layer, alpha-beta(2,1) on Convs, epsilon on dense layers"),
    Composite("epsilon", {"conv": "epsilon", "dense": "epsilon"}, None, "epsilon everywhere (LRP-0 with --epsilon 0)"),
    Composite("deep-taylor", {"conv": "zplus", "dense": "zplus"}, (("conv", "dense"), "zbox"),
              "deep Taylor preset: z-box on the first layer, z-plus above"),
    # transformers: epsilon on every linear layer, constant addend and residual sum (a constant takes its share)
    Composite("attnlrp", {"conv": "epsilon", "dense": "epsilon", "scale": "epsilon", "sum": "epsilon",
                          "gate": "split"}, None,
              "AttnLRP: epsilon on linear layers and sums, attention MatMuls and gated products split 50/50, "
              "softmax Taylor rule"),
    Composite("cp-lrp", {"conv": "epsilon", "dense": "epsilon", "scale": "epsilon", "sum": "epsilon",
                         "softmax": "constant", "gate": "pass"}, None,
              "CP-LRP: as attnlrp, attention probabilities and gates constant (relevance flows through the values "
              "and the gated signal)"),
    # vision transformers: CP attention with gamma on the linear layers and a near-positive gamma on the patch conv
    Composite("cp-lrp-vit", {"conv": "gamma", "dense": "gamma", "scale": "epsilon", "sum": "epsilon",
                             "softmax": "constant", "gate": "pass"}, None,
              "CP-LRP for vision transformers: gamma(100) on the patch convolution, gamma(0.05) on linear layers",
              {"conv": {"gamma": 100.0}, "dense": {"gamma": 0.05}}),
]}


@dataclass
class Options:
    """Rule parameters shared by every layer (command-line flags)."""

    epsilon: float = R.DEFAULT_EPS  # the epsilon rule's epsilon
    stabilizer_eps: float = R.DEFAULT_EPS  # epsilon of every other rule's stabilizer
    stabilizer: str = "sign"
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: object = 0.0  # z-box bounds: scalar, per-channel list or input-shaped nested list
    high: object = 1.0
    zero_bias: bool = False
    maxpool: str = "winner"  # MaxPool relevance: "winner" (first arg-max, as torch) or "split" (ties share equally)
    sum_rule: str | None = None  # rule of residual sums (where a rule file names none), over the composite's own:
    # "norm" (zennit's, the CNN composites'), "sign-norm" (stable where branches of both signs nearly cancel: RepVGG,
    # pre-activation sums) or "epsilon" (attnlrp's and cp-lrp's); None: the composite's

    def rule(self, name: str, overrides: dict | None = None) -> R.Rule:
        """Build rule ``name`` with parameters from these options, then ``overrides``."""
        _, names = R.RULES.get(name, (None, ()))
        params = {k: getattr(self, k) for k in names}
        params.update(overrides or {})
        eps = params.pop("stabilizer_eps", self.stabilizer_eps)
        zero_bias = params.pop("zero_bias", self.zero_bias)
        stabilizer = params.pop("stabilizer", self.stabilizer)
        return R.make_rule(name, params, eps=eps, stabilizer=stabilizer, zero_bias=zero_bias)


@dataclass
class UserRule:
    rule: str
    op: str | None = None
    name: str | None = None
    category: str | None = None
    params: dict = field(default_factory=dict)

    def matches(self, node_name: str, ops: tuple, category: str) -> bool:
        """``ops``: the node's op type now and before canonization (a rank-2 MatMul is a Gemm now)."""
        return ((self.op is None or self.op in ops) and (self.category is None or self.category == category)
                and (self.name is None or fnmatch.fnmatchcase(node_name, self.name)))


@dataclass
class RuleSet:
    """A composite plus user overrides: everything :func:`assign_rules` needs."""

    composite: Composite
    options: Options = field(default_factory=Options)
    user: list[UserRule] = field(default_factory=list)


def get_composite(name: str) -> Composite:
    if name not in COMPOSITES:
        raise InputError(f"unknown composite '{name}' (known: {', '.join(COMPOSITES)}; or a .json/.toml rule file)")
    return COMPOSITES[name]


def load_ruleset(spec: str, options: Options | None = None) -> RuleSet:
    """``spec`` is a composite name or a path to a JSON/TOML rule file."""
    options = options or Options()
    if not isinstance(spec, (str, Path)):
        raise InputError(f"rules: expected a composite name, a rule file's path or a RuleSet, got {spec!r}")
    spec = str(spec)
    if not spec.endswith((".json", ".toml")):
        return _validated(RuleSet(get_composite(spec), options))
    p = Path(spec)
    if not p.is_file():
        raise InputError(f"{p}: rule file not found")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot parse rule file: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: a rule file is a table with 'composite' and 'rules'")
    extra = set(data) - {"composite", "rules"}
    if extra:
        raise InputError(f"{p}: unknown key(s) {', '.join(sorted(extra))} (a rule file has 'composite' and 'rules')")
    if not isinstance(data.get("composite", ""), str):
        raise InputError(f"{p}: 'composite' must be a composite's name (got {data['composite']!r})")
    composite = get_composite(data.get("composite", "epsilon"))
    if not isinstance(data.get("rules", []), list):
        raise InputError(f"{p}: 'rules' must be a list of tables (got {data['rules']!r})")
    user = []
    for i, entry in enumerate(data.get("rules", [])):
        if not isinstance(entry, dict) or "rule" not in entry:
            raise InputError(f"{p}: rules[{i}] needs a 'rule' key")
        extra = set(entry) - {"rule", "op", "name", "category", "params"}
        if extra:
            raise InputError(f"{p}: rules[{i}] has unknown key(s) {', '.join(sorted(extra))}")
        bad = next((k for k in ("rule", "op", "name", "category") if k in entry and not isinstance(entry[k], str)),
                   None)
        if bad is not None:
            raise InputError(f"{p}: rules[{i}]: '{bad}' must be a string (got {entry[bad]!r})")
        if entry.get("category", CATEGORIES[0]) not in CATEGORIES:
            raise InputError(f"{p}: rules[{i}]: unknown category '{entry['category']}' "
                             f"(known: {', '.join(CATEGORIES)})")
        if not isinstance(entry.get("params", {}), dict):
            raise InputError(f"{p}: rules[{i}]: 'params' must be a table of parameters "
                             f"(got {entry['params']!r})")
        u = UserRule(entry["rule"], entry.get("op"), entry.get("name"), entry.get("category"),
                     dict(entry.get("params", {})))
        try:
            options.rule(u.rule, u.params)
        except (ValueError, TypeError) as e:
            raise InputError(f"{p}: rules[{i}]: {e}") from None
        user.append(u)
    return _validated(RuleSet(composite, options, user))


def _validated(ruleset: RuleSet) -> RuleSet:
    """Build every rule the composite can hand out once, so bad parameters fail before compiling."""
    comp = ruleset.composite
    if ruleset.options.maxpool not in ("winner", "split"):
        raise InputError(f"maxpool must be 'winner' or 'split' (got {ruleset.options.maxpool!r})")
    if ruleset.options.sum_rule is not None and ruleset.options.sum_rule not in SUM_RULES:
        raise InputError(f"sum_rule must be one of {', '.join(SUM_RULES)} (got {ruleset.options.sum_rule!r})")
    names = {(r, c) for c, r in comp.layers.items()} | {(r, c) for c, r in BASE.items()}
    names |= {(comp.first[1], c) for c in comp.first[0]} if comp.first else set()
    for name, cat in sorted(names):
        try:
            comp.rule(ruleset.options, name, cat)
        except (ValueError, TypeError) as e:
            raise InputError(f"--rules {comp.name}: {e}") from None
    return ruleset


def assign_rules(layers: list[tuple[str, tuple, str]], ruleset: RuleSet) -> dict[str, R.Rule]:
    """Map each ``(node name, (op type, original op type), category)`` (in execution order) to its rule."""
    comp, opts = ruleset.composite, ruleset.options
    out: dict[str, R.Rule] = {}
    first_done = comp.first is None
    for name, ops, cat in layers:
        user = next((u for u in ruleset.user if u.matches(name, ops, cat)), None)
        is_first = not first_done and cat in comp.first[0]
        first_done = first_done or is_first
        if user is not None:
            out[name] = opts.rule(user.rule, user.params)
        elif is_first:
            out[name] = comp.rule(opts, comp.first[1], cat)
        else:
            rule = (cat == "sum" and opts.sum_rule) or comp.layers.get(cat) or BASE.get(cat, "pass")
            out[name] = comp.rule(opts, rule, cat)
        if out[name].layers is not None and cat not in out[name].layers:
            raise InputError(f"node '{name}' ({ops[0]}): rule '{out[name].name}' applies only to "
                             f"{', '.join(out[name].layers)} layers (this one is {cat})")
    return out


def describe() -> str:
    """Text for ``lrpc rules``."""
    lines = ["Composites (--rules NAME):"]
    for c in COMPOSITES.values():
        lines.append(f"  {c.name:28s} {c.doc}")
    lines.append("  every composite: norm on residual sums and average pools, epsilon on normalization layers")
    lines.append("  (LayerNorm, InstanceNorm, GroupNorm; the standard deviation held constant, as AttnLRP), pass on")
    lines.append("  activations, standalone BatchNorm and element-wise affine layers; --sum-rule sign-norm for "
                 "residual")
    lines.append("  sums whose branches have both signs and nearly cancel (RepVGG, pre-activation sums); AttnLRP's")
    lines.append("  rules on attention (MatMul of two computed tensors: epsilon split 50/50; softmax: taylor), unless")
    lines.append("  the composite names others (attnlrp, cp-lrp: epsilon on sums and element-wise affine layers); pass")
    lines.append("  on gated products (the signal gets all, the gate none; in gated MLPs the activation's factor is")
    lines.append("  the gate), split 50/50 under attnlrp")
    lines.append("")
    lines.append(f"Layer categories (for rule files): {', '.join(CATEGORIES)}")
    lines.append("")
    lines.append("Rules (for rule files) and their parameters:")
    for name, (_, names) in R.RULES.items():
        lines.append(f"  {name:12s} {', '.join(names) or '-'}")
    lines.append("")
    lines.append(f"Stabilizers (--stabilizer): {', '.join(R.STABILIZERS)}")
    return "\n".join(lines)

"""Emission: walk the canonical graph backwards, ask the registry for each node's relevance
propagator, wire the relevance tensors, add the seed input and the relevance outputs."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import composites, contract
from .contract import AUDIT, SEED, TARGET, input_relevance_names
from .errors import InputError, UnsupportedError, op_type, unsupported
from .graph import Builder, Canonical, const_nonneg, const_value, export_model, float_dtype, is_const, node_inputs
from .recompute import recompute_kept
from .relevance import facts, propagator
from .relevance.attention import EINSUM, MATMUL
from .relevance.elementwise import BIAS_SUM
from .relevance.linear import GATE, gate_operand
from .schedule import order_for_runtime


class Context:
    """What propagators see: the builder, the rule of each layer, static sign facts."""

    def __init__(self, canon: Canonical, builder: Builder, rules: dict, nonneg: set, options: composites.Options):
        self.canon, self.b, self._rules, self._nonneg = canon, builder, rules, nonneg
        self.options = options
        self.cache: dict = {}  # derived tensors shared between propagators (e.g. flipped weights)
        self.factors: dict = {}  # relevance tensor name -> (x, c) where it was built as x ⊙ c
        self.audit = False  # whether rules account for the relevance they absorb (:meth:`account`)
        self.provider = "cpu"  # what the graph is lowered for (contract.PROVIDERS)
        self.accounts: dict = {}  # node name -> {kind: tensor} (AUDIT)
        self.live: set = set()  # names of the tensors that depend on the explained inputs
        self.seed = None  # the relevance the backward starts from (shaped like the explained output)
        self.clamps: dict = {}  # a softmax rule's input clamped at the lowest finite value (name) -> the input's name

    def account(self, node, kept, bias=None, zero=None) -> None:
        """Record, as tensors shaped like (or broadcasting to) the layer's output, the relevance its rule passes
        on by its own arithmetic (messages times numerators, computed with forward ops: the adjoints must send exactly
        that down), the share its biases take, and the relevance arriving where its denominator is 0 (no numerator
        can carry it). The rest of what arrives is the stabilizer's."""
        self.accounts[node.name] = {k: t for k, t in zip(AUDIT, (kept, bias, zero)) if t is not None}

    def product(self, x, c):
        """``x ⊙ c``, remembered as such: a consumer may use the factors instead (see
        :meth:`factors_of`); a product nobody reads is dropped at the end of emission."""
        r = self.b.mul(x, c)
        self.factors[r.name] = (x, c, r)
        return r

    def factors_of(self, r):
        """(x, c) when the relevance tensor ``r`` is ``x ⊙ c`` (a linear rule's output, a residual sum's
        share), else None. Rules that divide by a function of ``x`` use them to skip masks and passes."""
        f = self.factors.get(r.name) if r is not None else None
        return f[:2] if f is not None else None

    def drop_unread_products(self):
        outputs = {id(t) for t in self.b.graph.outputs}
        for x, c, r in self.factors.values():
            if not r.outputs and r.inputs and id(r) not in outputs:
                node = r.inputs[0]
                node.inputs.clear()
                node.outputs.clear()
                self.b.graph.nodes.remove(node)

    def rule(self, node):
        return self._rules[node.name]

    def rule_of(self, node):
        """The rule of ``node``, None for a node without one (no category)."""
        return self._rules.get(node.name)

    def nonneg(self, t) -> bool:
        return t.name in self._nonneg

    def no_relevance_below_zero(self, t) -> bool:
        """True when the relevance reaching ``t`` is statically zero wherever ``t <= 0``."""
        return t.name in self.quiet_below_zero


ACTIVATION = "lrpc.activation"  # what the output node of an activation written as several ops is explained as


def op_of(canon: Canonical, node) -> str:
    """The op ``node`` is explained as: its type, :data:`ACTIVATION` for the node making the output of an
    activation written as several element-wise ops (see passes/activation_regions.py), ``MATMUL`` (``EINSUM``) for
    a MatMul (an Einsum) of two computed tensors (attention: relevance/attention.py), ``GATE`` for an element-wise
    Mul of two that both depend on the explained input (a gated product: relevance/linear.py), ``BIAS_SUM`` for a Sum
    of which one operand does, or a Sub of two computed tensors of which one does (a bias add:
    relevance/elementwise.py), ``Sum`` for a Sub of two that both do (a residual sum of ``a`` and ``-b``), or
    ``domain::type``
    for an op of another domain (which no propagator takes: a custom op is never mistaken for a standard one)."""
    if node.name in canon.activations:
        return ACTIVATION
    if node.op == "MatMul" and not any(is_const(t) for t in node.inputs):
        return MATMUL
    if node.op == "Einsum" and len(node.inputs) == 2 and not any(is_const(t) for t in node.inputs):
        return EINSUM
    if node.op == "Mul" and len(node.inputs) == 2 and not any(is_const(t) for t in node.inputs) and \
            (canon.live is None or all(t.name in canon.live for t in node.inputs)):
        return GATE  # (a factor no function of the explained input, as RoPE's computed cos, is a constant's scale)
    if node.op == "Sum" and canon.live is not None and sum(t.name in canon.live for t in node.inputs) == 1:
        return BIAS_SUM  # (addends no function of the explained input, as computed positions, are a bias)
    if node.op == "Sub" and canon.live is not None and not any(is_const(t) for t in node.inputs):
        live = sum(t.name in canon.live for t in node.inputs)  # (a - b as a + (-b): relevance/elementwise.py)
        if live == 1:
            return BIAS_SUM  # (a - m with a mask m computed from other inputs: a bias add of -m; or m - a)
        if live == 2:
            return "Sum"  # (pool(x) - x, PoolFormer's token mixer: a residual sum of the two)
    return op_type(node)


def inputs_of(canon: Canonical, node, tensors: dict) -> list:
    """The tensors ``node``'s propagator returns relevance for: its inputs, or an activation region's input."""
    x = canon.activations.get(node.name)
    return node.inputs if x is None else [tensors[x]]


def category(canon: Canonical, node) -> str | None:
    """The composite category of a node (see composites.py), None for nodes without a rule: its op's, or that of
    the op a pass made it from where the category survives the rewrite (a pool made a depthwise Conv)."""
    before = facts(canon.origin.get(node.name))
    return before.category if before.keeps_category else facts(op_of(canon, node)).category


def emit(canon: Canonical, ruleset: composites.RuleSet, layerwise: str | None = None,
         seed: str = "input", for_provider: str = "cpu", explain_at: str | None = None) -> onnx.ModelProto:
    """Return the augmented model: forward graph + relevance backward (see README, 'compiled graph').

    ``layerwise="sums"`` adds, for every layer with a rule (and MaxPool), outputs
    ``relevance_sum_in/<node>`` and ``relevance_sum_out/<node>``: per-sample sums of the relevance the
    layer receives at its outputs and sends to its inputs, so a table shows where conservation breaks.
    ``layerwise="full"`` adds those and ``relevance_in/<node>``: the relevance sent to the layer's (first) input.

    ``seed="input"``: the seed is the graph input ``relevance_seed``; ``seed="top1"``: it is made in the
    graph, one-hot at each sample's highest explained output, which the output ``relevance_target``
    (int64 [N], flat index per sample) names: logits and relevance in one run, with only the model's
    own inputs to feed; ``seed="switch"``: both, chosen per run by the bool input ``lrpc/top1`` (false unless fed).
    ``for_provider="cuda"``: MaxPool's backward from its arg-max indices and a scatter (onnxruntime's CUDA
    provider runs them on the GPU), recorded in the metadata. ``explain_at``: the float tensor relevance is
    explained at (output ``relevance`` shaped like it) instead of the float inputs; a model of token ids is
    explained at its token embedding (output ``relevance_tokens``: summed over the hidden axis, see
    :func:`sources`).
    The nodes are ordered for onnxruntime's scheduler (:mod:`lrpc.schedule`)."""
    if layerwise not in (None, "sums", "full"):
        raise InputError(f"layerwise must be 'sums' or 'full', got {layerwise!r}")
    if seed not in contract.SEED_MODES:
        raise InputError(f"seed must be 'input', 'top1' or 'switch', got {seed!r}")
    if for_provider not in contract.PROVIDERS:
        raise InputError(f"for_provider must be one of {', '.join(contract.PROVIDERS)}, got {for_provider!r}")
    graph = canon.graph
    tensors = graph.tensors()
    explained = tensors[canon.explained]
    dtype = float_dtype(graph)
    inputs, depends, nodes = relevance_path(canon, explain_at)
    kind = sources(canon, explain_at)[1]
    # each node with a rule as assign_rules takes it: (name, (op, op before the passes), category)
    described = [(n.name, (n.op, canon.origin.get(n.name, n.op)), c) for n in nodes if (c := category(canon, n))]
    gates = [d for d in described if d[2] == "gate"]
    splits = {k for k, r in composites.assign_rules(gates, ruleset).items() if r.splits}  # (both get some)
    reached = _reached(canon, nodes, explained, tensors, splits)
    missing = [n for n in nodes
               if n.name in canon.refused or (n.name in reached and propagator(op_of(canon, n)) is None)]
    if missing:
        raise unsupported(missing, canon.refused)
    # (a Softmax no relevance reaches weighs a gate, as split attention's in CNNs: no layer with a rule)
    layers = [d for d in described if d[1][0] != "Softmax" or d[0] in reached]
    rules = composites.assign_rules(layers, ruleset)
    builder = Builder(graph, dtype)
    ctx = Context(canon, builder, rules, _nonneg(graph, canon.weight_signs), ruleset.options)
    ctx.audit = layerwise is not None
    ctx.provider = for_provider
    ctx.live = depends
    ctx.quiet_below_zero = _quiet_below_zero(nodes, explained, rules, ctx)

    start = ctx.seed = gs.Variable(SEED, dtype=dtype, shape=explained.shape)
    if seed != "top1":
        graph.inputs.append(start)  # (top1: nodes made after the export produce it, see seed_in_graph)
    incoming: dict[str, list] = {explained.name: [start]}
    extra: list = []  # layerwise outputs (name, tensor, shape)
    layer_table: list = []
    total: dict[str, object] = {}

    def relevance(t):
        if t.name not in total:
            parts = incoming.get(t.name)
            factors = [ctx.factors_of(r) for r in parts or []]
            if len(factors) > 1 and all(f is not None and f[0] is factors[0][0] for f in factors):
                # x ⊙ c1 + x ⊙ c2 = x ⊙ (c1 + c2): one Mul (the per-part products go unread)
                total[t.name] = ctx.product(factors[0][0], builder.sum([f[1] for f in factors]))
            else:
                total[t.name] = builder.sum(parts) if parts else None
        return total[t.name]

    silent = []  # nodes no relevance reaches (e.g. a squeeze-and-excitation branch behind its gate)
    for node in reversed(nodes):
        r_out = [relevance(t) for t in node.outputs]
        if all(r is None for r in r_out):
            silent.append(node)
            continue
        r_in = propagator(op_of(canon, node))(ctx, node, r_out)
        for t, r in zip(inputs_of(canon, node, tensors), r_in):
            if r is not None and t.name in depends:
                incoming.setdefault(t.name, []).append(r)
        if layerwise and (category(canon, node) or facts(node.op).reported or node.name in ctx.accounts):
            sent = [(t, r) for t, r in zip(inputs_of(canon, node, tensors), r_in)
                    if r is not None and t.name in depends]
            if layerwise == "full":
                t, r = sent[0] if sent else (node.inputs[0], builder.zeros_like(node.inputs[0]))
                extra.append((f"{contract.LAYER_IN}{node.name}", r, t.shape))
            extra.append((f"{contract.SUM_OUT}{node.name}", _per_sample_sum(builder, r_out), ["batch"]))
            extra.append((f"{contract.SUM_IN}{node.name}", _per_sample_sum(builder, [r for _, r in sent]), ["batch"]))
            for kind, t in ctx.accounts.get(node.name, {}).items():
                extra.append((f"{contract.ACCOUNT.format(kind)}{node.name}", _per_sample_sum(builder, [t]), ["batch"]))
            layer_table.append({"name": node.name, "op": canon.origin.get(node.name, node.op),
                                "rule": rules[node.name].describe() if node.name in rules else "route"})

    for t in inputs:
        r = relevance(t)
        r = builder.zeros_like(t) if r is None else r
        name, shape = contract.RELEVANCE if len(inputs) == 1 else f"{contract.RELEVANCE}_{t.name}", t.shape
        if kind == "tokens":  # per token: summed over the hidden axis
            name, shape = contract.TOKENS, None if t.shape is None else t.shape[:-1]
            r = builder.op("ReduceSum", [r, builder.ints([-1])], {"keepdims": 0})
        out = gs.Variable(name, dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node("Identity", f"lrp/output/{name}", inputs=[r], outputs=[out]))
        graph.outputs.append(out)
    for name, r, shape in extra:
        out = gs.Variable(name, dtype=r.dtype or dtype, shape=shape)
        graph.nodes.append(gs.Node("Identity", f"lrp/output/{name}", inputs=[r], outputs=[out]))
        graph.outputs.append(out)
    ctx.drop_unread_products()
    for node in silent:
        _restore_global_pool(node)
    meta = {contract.EXPLAINED: explained.name, contract.RULES: _rules_summary(rules), contract.SEED_MODE: seed}
    if layerwise:
        import json

        meta[contract.LAYERS] = json.dumps(list(reversed(layer_table)))  # execution order
    if for_provider != "cpu":
        meta[contract.PROVIDER] = for_provider
    model = export_model(canon, meta)
    recompute_kept(model.graph, lambda n: n.name.startswith("lrp/"), SEED, depends)
    del model.graph.value_info[:]  # runtimes infer these; keeping them only grows the file
    if seed != "input":
        batch = [explained.shape[0]] if explained.shape else None
        seed_in_graph(model, explained.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), batch,
                      switch=seed == "switch")
    order_for_runtime(model.graph, SEED)
    return model


def top1_nodes(explained: str, elem: int, seed: str, prefix: str) -> list:
    """ONNX nodes making ``seed`` (element type ``elem``, shaped like ``explained``) one-hot at each sample's
    arg-max of ``explained`` (flattened per sample; first index on ties, as numpy) and ``relevance_target``
    that index (int64 [N]); dynamic dims work. The arg-max is taken on the explained tensor (logits before a
    final Softmax/Sigmoid), so where a sigmoid saturates several outputs to 1.0 the logits decide. Used by
    ``compile(seed="top1")`` and ``compile(seed="switch")``."""
    from onnx import TensorProto, helper

    t = lambda name: prefix + name  # noqa: E731
    ints = lambda name, value, dims: helper.make_node(  # noqa: E731
        "Constant", [], [t(name)], value=helper.make_tensor(t(name), TensorProto.INT64, dims, value))
    nodes = [
        helper.make_node("Flatten", [explained], [t("flat")], axis=1),
        helper.make_node("ArgMax", [t("flat")], [t("best")], axis=1, keepdims=1, select_last_index=0),
        helper.make_node("Shape", [t("flat")], [t("dims")]),
        ints("one", [1], []), ints("zero", [0], []), ints("axis1", [1], [1]),
        helper.make_node("Gather", [t("dims"), t("one")], [t("size")], axis=0),
        helper.make_node("Range", [t("zero"), t("size"), t("one")], [t("index")]),
        helper.make_node("Equal", [t("index"), t("best")], [t("hot")]),  # [M] against [N, 1]: [N, M]
        helper.make_node("Cast", [t("hot")], [t("hotf")], to=elem),
        helper.make_node("Shape", [explained], [t("shape")]),
        helper.make_node("Reshape", [t("hotf"), t("shape")], [seed]),
        helper.make_node("Squeeze", [t("best"), t("axis1")], [TARGET]),
    ]
    for n in nodes:  # named, as every node lrpc makes (profiles and error messages name nodes)
        n.name = prefix + n.output[0].rsplit("/", 1)[-1]
    return nodes


def seed_in_graph(model: onnx.ModelProto, explained: str, elem: int, batch: list | None = None,
                  switch: bool = False) -> None:
    """Make ``relevance_seed`` in ``model`` (:func:`top1_nodes`, placed right after ``explained`` is made) and
    add the output ``relevance_target`` after the input-relevance outputs. ``switch``: ``relevance_seed`` stays an
    input and the relevance starts from ``Where(lrpc/top1, the top-1 seed, relevance_seed)``, ``lrpc/top1`` a bool
    input that is false unless fed (an initializer of that name), so a runtime that feeds only the seed (as for a
    seed-input graph) gets the fed seed's relevance."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    made, extra = SEED, []
    if switch:
        made, chosen = "lrp/top1/seed", "lrp/top1/chosen"
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == SEED:
                    n.input[i] = chosen
        extra = [helper.make_node("Where", [contract.SWITCH, made, SEED], [chosen], name="lrp/top1/switch")]
        g.input.append(helper.make_tensor_value_info(contract.SWITCH, TensorProto.BOOL, []))
        g.initializer.append(numpy_helper.from_array(np.array(False), contract.SWITCH))
    nodes = list(g.node)
    at = next(i for i, n in enumerate(nodes) if explained in n.output) + 1
    del g.node[:]
    g.node.extend(nodes[:at] + top1_nodes(explained, elem, made, "lrp/top1/") + extra + nodes[at:])
    outputs = list(g.output)
    at = max(i for i, o in enumerate(outputs) if o.name in input_relevance_names([o.name])) + 1
    del g.output[:]
    g.output.extend(outputs[:at] + [onnx.helper.make_tensor_value_info(TARGET, onnx.TensorProto.INT64, batch)]
                    + outputs[at:])




def _quiet_below_zero(nodes: list, explained, rules: dict, ctx: Context) -> set[str]:
    """Tensors whose relevance is zero wherever their value is <= 0 (then a gamma layer's ``z<0`` group
    carries nothing). Holds behind a ReLU whose output only feeds rules that multiply by a non-negative
    input (R_in = x ⊙ …), sums of such inputs, MaxPool winners, data movement of such tensors and gated
    products of them (``y = t ⊙ g``, a squeeze-and-excitation gate g >= 0: where t <= 0 also y <= 0, and
    whatever rule the product has, the relevance of t at an element is a multiple of y's there). A Clip whose
    lower bound is 0 (ReLU6) is a ReLU here."""
    tensors = ctx.b.graph.tensors()
    readers: dict[str, list] = {}  # tensor -> the nodes on the path that get relevance from it (an activation
    for n in nodes:                # region's output node reads the region's input, not its own inputs)
        for t in inputs_of(ctx.canon, n, tensors):
            readers.setdefault(t.name, []).append(n)
    quiet: set[str] = set()

    def consumer_ok(c, t) -> bool:
        # (an activation region's output node is none of these: see its pass)
        if (c.op == "Relu" or facts(c.op).routes or (c.op == "Clip" and _clips_at_zero(c))
                or (op_of(ctx.canon, c) == GATE and _gated(c, t))):
            return all(o.name in quiet for o in c.outputs if o.outputs or o.name == explained.name)
        rule = rules.get(c.name)
        if rule is None or rule.layers is not None or not ctx.nonneg(t):  # (taylor, split: not x times a message)
            return False
        if c.op == "Sum":
            return not rule.is_pass  # (a bias sum under pass hands its output's relevance on as it is)
        return not rule.is_pass and all(term.input in ("x", "x+", "x-") for g in rule.groups for term in g.terms)

    for node in reversed(nodes):
        for t in node.outputs:
            users = readers.get(t.name, [])
            if t.name != explained.name and users and all(consumer_ok(c, t) for c in users):
                quiet.add(t.name)
    return quiet


def _clips_at_zero(node) -> bool:
    """A Clip with the constant lower bound 0: where its input is <= 0 its output is 0."""
    lo = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
    return lo is not None and is_const(lo) and bool(np.all(const_value(lo) == 0))


def _gated(node, t) -> bool:
    """``node`` (a Mul, not an activation region's) is a gated product (``y = t ⊙ g``, linear.gate_operand) and
    ``t`` its non-gate operand."""
    gate = _gate_of(node)
    return gate is not None and gate.name != t.name and t.name in [i.name for i in node.inputs]


def _gate_of(node, activations=None):
    """The gate operand of ``node`` where it is a gated product (a Mul of two computed tensors, one a gate:
    linear.gate_operand; ``activations``: activation regions' output nodes, which gate last), else None."""
    if node.op != "Mul" or len(node.inputs) != 2 or any(is_const(i) for i in node.inputs):
        return None
    try:
        return gate_operand(node, activations)
    except UnsupportedError:
        return None


def _inside_activations(canon: Canonical, graph: gs.Graph, tensors: dict) -> set[str]:
    """Names of the nodes inside activation regions (all but the node making the output): they get no relevance."""
    made = {t.name: n for n in graph.nodes for t in n.outputs}
    nodes = {n.name: n for n in graph.nodes}
    inside: set[str] = set()
    for head, x in canon.activations.items():
        todo = [t for t in nodes[head].inputs if t.name in made and t.name != x]
        while todo:
            node = made[todo.pop().name]
            if node.name not in inside:
                inside.add(node.name)
                todo += [t for t in node.inputs if t.name in made and t.name != x]
    return inside


def _restore_global_pool(node) -> None:
    """A global average pool that passes/avgpool_to_conv.py made a depthwise Conv (so that rules apply to it) but
    that no relevance reaches becomes a GlobalAveragePool again: onnxruntime runs that faster than the Conv
    (one per squeeze-and-excitation block). Only the exact form: kernel = the input's spatial size, no pads,
    stride 1, weights all 1/K, bias 0."""
    if node.op != "Conv" or len(node.inputs) < 2 or not is_const(node.inputs[1]):
        return
    x, w = node.inputs[0], node.inputs[1]
    k = list(node.attrs.get("kernel_shape", []))
    if x.shape is None or list(x.shape[2:]) != k or w.shape is None or list(w.shape[:2]) != [x.shape[1], 1]:
        return
    if any(node.attrs.get("pads", [0])) or any(v != 1 for v in node.attrs.get("strides", [1])):
        return
    if len(node.inputs) > 2 and (not is_const(node.inputs[2]) or np.any(const_value(node.inputs[2]))):
        return
    if not np.all(const_value(w) == np.asarray(1.0 / np.prod(k), const_value(w).dtype)):
        return
    node.op, node.attrs, node.inputs = "GlobalAveragePool", {}, [x]


def _per_sample_sum(b: Builder, tensors: list):
    """Σ over all non-batch axes of each tensor, added up: one value per sample."""
    sums = [b.op("ReduceSum", [b.op("Flatten", [t], {"axis": 1}), b.ints([1])], {"keepdims": 0})
            for t in tensors if t is not None]
    return b.sum(sums) if sums else b.const(np.zeros(1))


def relevance_path(canon: Canonical, explain_at: str | None = None) -> tuple[list, set, list]:
    """The tensors relevance is explained at (:func:`sources`), the names of the tensors that depend on them, and
    the nodes relevance flows through: those between a source and the explained tensor, in execution order, less
    the inner nodes of activation regions."""
    graph = canon.graph
    tensors = graph.tensors()
    explained = tensors[canon.explained]
    inputs, kind = sources(canon, explain_at)
    depends = _depends_on(graph, inputs)
    canon.live = depends
    if explained.name not in depends:
        what = {"inputs": "any float input", "tokens": f"the token embedding '{inputs[0].name}'",
                "at": f"the tensor '{explain_at}'"}[kind]
        raise InputError(f"the explained output '{explained.name}' does not depend on {what}")
    inside = _inside_activations(canon, graph, tensors)
    return inputs, depends, [n for n in _on_path(graph, explained, depends) if n.name not in inside]


def sources(canon: Canonical, explain_at: str | None = None) -> tuple[list, str]:
    """Where relevance is explained: ``(tensors, kind)``. ``explain_at`` names a float tensor ("at"); else the
    float graph inputs ("inputs") but a decoder's key/value cache (:func:`contract.is_cache_input`); else, for a model
    of token ids, the token embedding ("tokens"): the Gather of a constant table by an integer graph input
    (``input_ids`` where several, else the largest table). Position and token-type embeddings, masks and the cache
    then depend on no source: constants for the rules."""
    graph = canon.graph
    if explain_at is not None:
        t = graph.tensors().get(explain_at)
        if t is None:
            raise InputError(f"explain_at: the model has no tensor '{explain_at}' (after canonization)")
        if t.dtype is None or not np.issubdtype(np.dtype(t.dtype), np.floating) or is_const(t):
            raise InputError(f"explain_at: tensor '{explain_at}' is not a computed float tensor")
        return [t], "at"
    inputs = [t for t in graph.inputs if t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating)
              and not contract.is_cache_input(t.name)]
    if inputs:
        return inputs, "inputs"
    ids = {t.name for t in graph.inputs if t.dtype is not None and np.dtype(t.dtype).kind in "iu"}
    tables = [n for n in graph.nodes if n.op == "Gather" and int(n.attrs.get("axis", 0)) == 0
              and is_const(n.inputs[0]) and n.inputs[0].shape is not None and len(n.inputs[0].shape) == 2
              and np.issubdtype(np.dtype(n.inputs[0].dtype), np.floating) and id_input(n.inputs[1]) in ids]
    if not tables:
        cache = " besides its key/value cache" if any(contract.is_cache_input(t.name) for t in graph.inputs) else ""
        raise InputError(f"the model has no float input to explain{cache} (integer/string inputs only, and no "
                         "embedding Gather of a constant table by an integer input)")
    named = [n for n in tables if id_input(n.inputs[1]) == "input_ids"]
    word = named[0] if named else max(tables, key=lambda n: n.inputs[0].shape[0])
    return [word.outputs[0]], "tokens"


ID_PRESERVING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity")


def id_input(t) -> str | None:
    """The graph input whose values the index tensor ``t`` holds (reshaped or cast: GPT-2 views ``input_ids`` before
    its embedding), or None; indices computed from an input (positions from a mask's CumSum) hold none."""
    while not isinstance(t, gs.Constant) and t.inputs:
        node = t.inputs[0]
        if node.op not in ID_PRESERVING:
            return None
        t = node.inputs[0]
    return None if isinstance(t, gs.Constant) else t.name


def _reached(canon: Canonical, nodes: list, explained, tensors: dict, splits: set = frozenset()) -> set[str]:
    """The names of the nodes relevance reaches: all on its path but those that only feed gates (a gated product's
    gate operand gets none: relevance.linear.gate_operand), which need no propagator (split attention's Softmax);
    under ``split`` (the gated products named in ``splits``) both factors get relevance."""
    carrying, reached = {explained.name}, set()
    for node in reversed(nodes):
        if not any(t.name in carrying for t in node.outputs):
            continue
        reached.add(node.name)
        ins = inputs_of(canon, node, tensors)
        # (an activation region's Mul reads one input)
        gate = _gate_of(node, canon.activations) if len(ins) == 2 and node.name not in splits else None
        carrying.update(t.name for t in ins if t is not gate)
    return reached


def _depends_on(graph: gs.Graph, inputs) -> set[str]:
    dep = {t.name for t in inputs}
    for node in graph.nodes:
        if node.op in ("Shape", "Size"):  # their outputs are shape integers, not values: no relevance flows there
            continue
        if any(t.name in dep for t in node_inputs(node)):  # subgraphs (If/Loop) read outer tensors too
            dep.update(t.name for t in node.outputs)
    return dep


def _on_path(graph: gs.Graph, explained, depends: set[str]) -> list:
    """Nodes between a float input and the explained tensor, in execution order."""
    need = {explained.name}
    for node in reversed(graph.nodes):
        if any(t.name in need for t in node.outputs):
            need.update(t.name for t in node_inputs(node) if t.name in depends)
    return [n for n in graph.nodes
            if any(t.name in need for t in n.outputs) and any(t.name in depends for t in node_inputs(n))]


def _nonneg(graph: gs.Graph, weight_signs: dict) -> set[str]:
    """Tensors statically known to be >= 0 (their x- terms vanish); ``weight_signs``: see const_nonneg."""
    pos: set[str] = set()

    def ok(t) -> bool:
        return t.name in pos or (is_const(t) and const_nonneg(t, weight_signs))

    for node in graph.nodes:
        data = [t for t in node.inputs if t.name and not (is_const(t) and np.dtype(t.dtype).kind in "iu")]
        if facts(node.op).nonneg:
            yes = True
        elif node.op == "Clip":
            lo = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
            yes = (lo is not None and is_const(lo) and bool(np.all(const_value(lo) >= 0))) or ok(node.inputs[0])
        elif facts(node.op).keeps_nonneg:
            yes = bool(data) and all(ok(t) for t in data)
        else:
            yes = False
        if yes:
            pos.update(t.name for t in node.outputs[:1])
    return pos


def _rules_summary(rules: dict) -> str:
    import json

    return json.dumps({k: v.describe() for k, v in rules.items()})

"""The ``gradient`` check of ``lrpc check``: LRP-0 against directional derivatives of the forward, no framework.

With LRP-0 (the epsilon rule with epsilon 0 on every linear layer, norm with epsilon 0 on sums and pools) and the
seed one-hot × the explained value, the backward of a piecewise-linear model is gradient × input: ``R = x ⊙ ∇F``
with ``F = Σ s ⊙ explained`` (``s`` the one-hot seed). For a direction ``v = x ⊙ u`` (``u`` standard normal, so
``v`` is 0 wherever ``x`` is: no division by ``x``) that is ``⟨∇F, v⟩ = ⟨R, u⟩``, which is compared with the finite
difference ``(F(x + t v) − F(x)) / t`` (:func:`steps`) of a copy of the forward whose switches are frozen at ``x``
(:func:`make_probe`): every ReLU / LeakyReLU / PReLU / ThresholdedReLU keeps the on/off pattern it has at ``x`` and
every MaxPool its arg-max. That copy is affine and equals ``F`` on the linear region around ``x``, so its difference
quotient is the directional derivative for any step: only float32 round-off is left. Plain central differences
``(F(x + hv) − F(x − hv)) / 2h`` of the model itself cannot do that: a step that stays in one linear region is below
float32 resolution on any real network (kinks are crossed above it, round-off dominates below it), too coarse to
see a relevance 1% off (docs/check.md#the-gradient-check). The
probe is built from the compiled LRP-0 graph's forward (the canonical graph, whose outputs the ``forward`` check
compares with the original model's)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import composites
from .contract import is_cache_input

PREFIX = "lrpc_check/probe/"
SHAPES = ("Shape", "Size")  # their outputs are shapes, not values of the input
# the tolerance is at least this many machine epsilons of the model's float type: float16 relevance and forwards are
# good to ~1e-3, so only errors above 2e-2 are seen there
ROUNDOFF = 20


def ruleset() -> composites.RuleSet:
    """LRP-0: composite epsilon with epsilon = stabilizer_eps = 0 (norm on sums and pools), MaxPool to the arg-max,
    and the epsilon rule (not pass) on element-wise affine layers (standalone BatchNorm, a constant Add):
    ``x s R / (x s + t)`` is their gradient × input, pass (``R``) is not where ``t ≠ 0``."""
    options = composites.Options(epsilon=0.0, stabilizer_eps=0.0, maxpool="winner")
    return composites.RuleSet(composites.get_composite("epsilon"), options,
                              [composites.UserRule("epsilon", category="scale")])


def float_inputs(model: onnx.ModelProto, skip: str) -> list[str]:
    """The explained float inputs (a decoder's key/value cache is not one), less ``skip``."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    return [i.name for i in model.graph.input if i.name != skip and i.type.tensor_type.elem_type in floats
            and not is_cache_input(i.name)]


def _forward(model: onnx.ModelProto, explained: str, inputs: list[str], shapes: bool = False) -> tuple[list, set]:
    """The nodes ``explained`` is computed from (graph order) and the tensors among their outputs that depend on a
    float input (``shapes``: through a Shape or Size too; their outputs are shapes, not values of the input)."""
    need, nodes = {explained}, []
    for n in reversed(model.graph.node):
        if any(o in need for o in n.output):
            nodes.append(n)
            need.update(i for i in n.input if i)
    nodes.reverse()
    moved = set(inputs)
    for n in nodes:
        if (shapes or n.op_type not in SHAPES) and any(i in moved for i in n.input):
            moved.update(o for o in n.output if o)
    return nodes, moved


def blocker(model: onnx.ModelProto, explained: str, inputs: list[str]) -> str | None:
    """Why LRP-0 is not gradient × input on this model (None where it is): the first node, in graph order, between
    a float input and the explained tensor whose propagator is not the gradient's."""
    from .relevance import EXACT, facts  # (the propagator registry: loaded with the compiler, not with lrpc.check)

    if not inputs:
        return ("the model has no float input (token ids): relevance is explained at the embedding output, which "
                "finite differences of the forward cannot probe")
    nodes, moved = _forward(model, explained, inputs)
    for n in nodes:
        computed = [i for i in n.input if i in moved]
        if not computed or n.op_type in SHAPES:
            continue
        at = f"node '{n.name}' ({n.op_type})"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return f"{at} has a subgraph"
        if n.op_type == "Sub":
            if n.input[0] in moved or _constant(model, n.input[0]) is None:
                continue  # (a - b: the sum of a and -b; m - a with m computed from other inputs: a bias add)
            return f"{at}: a constant minus a computed tensor is explained as an activation of it (identity rule)"
        # (the registry's facts: exact for positively homogeneous activations, f(z) = z f'(z), and for linear
        # layers, sums, pools and routing, linear maps with exact adjoints)
        why = facts(n.op_type).gradient or "no LRP-0 = gradient identity is known for this op"
        if why != EXACT:
            return f"{at}: {why}"
        if n.op_type in ("Mul", "Add", "Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum") and len(computed) > 1:
            why = {"Mul": "a gated product or an activation written out as several ops (x * f(x)): one factor gets "
                          "no relevance, the gradient flows through both",
                   "Add": "a merge inside an activation written out as several ops: the identity rule is not the "
                          "gradient"}.get(n.op_type,
                                          "a product of two computed tensors: its rule splits the relevance "
                                          "between the factors (or sends it through one), the gradient does not")
            return f"{at}: {why}"
        if n.op_type == "Clip" and not _relu_like(model, n):
            return f"{at}: a Clip other than max(x, 0) (ReLU6, ...) gets the pass rule: relevance passes where " \
                   "the gradient is 0"
        if n.op_type == "PRelu" and len(computed) > 1:
            return f"{at}: a computed slope"
    return None


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _clip_bounds(model: onnx.ModelProto, node) -> tuple[float | None, float | None]:
    """(min, max) of a Clip (None: absent or infinite; NaN: computed)."""
    out = []
    for i in (1, 2):
        name = node.input[i] if len(node.input) > i else ""
        value = _constant(model, name) if name else None
        v = None if not name else float("nan") if value is None else float(value.reshape(-1)[0])
        out.append(None if v is not None and np.isinf(v) else v)
    return out[0], out[1]


def _relu_like(model: onnx.ModelProto, node) -> bool:
    """A Clip that is max(x, 0) or the identity: f(z) = z f'(z), so pass is its gradient × input."""
    low, high = _clip_bounds(model, node)
    return high is None and low in (None, 0.0)


SWITCHES = ("Relu", "LeakyRelu", "PRelu", "ThresholdedRelu")


def _switch(model: onnx.ModelProto, node) -> bool:
    return node.op_type in SWITCHES or (node.op_type == "Clip" and _clip_bounds(model, node)[0] == 0.0)


def references(model: onnx.ModelProto, explained: str, inputs: list[str]) -> list[str]:
    """The tensors at ``x`` that the probe (:func:`make_probe`) reads, in graph order: each switch's input and each
    MaxPool's arg-max indices (given an output for them where it has none). The compiled model computes them."""
    nodes, moved = _forward(model, explained, inputs)
    refs = []
    for n in nodes:
        if n.op_type == "MaxPool" and n.input[0] in moved:
            if len(n.output) < 2 or not n.output[1]:  # (the emitter adds them where relevance reaches the pool)
                del n.output[1:]
                n.output.append(f"{PREFIX}{n.name}/indices")
            refs.append(n.output[1])
        elif _switch(model, n) and n.input[0] in moved:
            refs.append(n.input[0])
    return refs


def make_probe(model: onnx.ModelProto, explained: str, inputs: list[str], seed_name: str) -> dict[str, str]:
    """Turn the compiled ``model`` (in place; its initializers untouched) into the probe: a copy of the forward up to
    ``explained`` for the inputs ``PREFIX + name`` (``inputs``: the float ones) whose switches are frozen at ``x``:
    they read :func:`references` (inputs of the probe under their own names, fed with their values at ``x``). Its
    other inputs are the model's other inputs (integer ones). Output: ``PREFIX + explained``. Returns
    {input: probe input}."""
    g = model.graph
    elem = next(i.type.tensor_type.elem_type for i in g.input if i.name == seed_name)
    refs = references(model, explained, inputs)
    nodes, moved = _forward(model, explained, inputs, shapes=True)
    new = lambda t: PREFIX + t if t in moved else t  # noqa: E731
    kept: list = []
    numbers = itertools.count()

    def const(value, dtype=helper.tensor_dtype_to_np_dtype(elem)) -> str:
        name = f"{PREFIX}const{next(numbers)}"
        kept.append(helper.make_node("Constant", [], [name], name=name,
                                     value=numpy_helper.from_array(np.asarray(value, dtype), name)))
        return name

    def node(op, ins, out, **attrs) -> str:
        kept.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    for n in nodes:
        if not any(i in moved for i in n.input):  # (constants: kept as they are)
            kept.append(n)
            continue
        x, y = n.input[0], n.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if _switch(model, n):  # Where(x > threshold at x, the copy's x, what the copy's x gives when off)
            threshold = const(attrs.get("alpha", 1.0) if n.op_type == "ThresholdedRelu" else 0.0)
            on = node("Greater", [x, threshold], f"{PREFIX}{y}/on")
            if n.op_type == "LeakyRelu":
                off = node("Mul", [new(x), const(attrs.get("alpha", 0.01))], f"{PREFIX}{y}/off")
            elif n.op_type == "PRelu":
                off = node("Mul", [new(x), new(n.input[1])], f"{PREFIX}{y}/off")
            else:
                off = const(0.0)
            node("Where", [on, new(x), off], new(y))
        elif n.op_type == "MaxPool":  # the copy's x at the arg-max at x (flat indices over the whole tensor)
            flat = node("Reshape", [new(x), const([-1], np.int64)], f"{PREFIX}{y}/flat")
            node("Gather", [flat, n.output[1]], new(y), axis=0)
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = PREFIX + n.name
            copy.input[:] = [new(i) for i in n.input]
            copy.output[:] = [new(o) for o in n.output]
            kept.append(copy)
    del g.node[:]
    g.node.extend(kept)
    probes = {name: PREFIX + name for name in inputs}
    ints = {n.output[1] for n in nodes if n.op_type == "MaxPool"}
    declared = []
    for i in g.input:
        if i.name != seed_name and (i.name not in probes or i.name in refs):  # (a switch right on an input reads it)
            declared.append(_copy(i, i.name))
        if i.name in probes:
            declared.append(_copy(i, probes[i.name]))
    names = {d.name for d in declared}
    declared += [helper.make_tensor_value_info(r, onnx.TensorProto.INT64 if r in ints else elem, None)
                 for r in refs if r not in names]
    del g.input[:]
    g.input.extend(declared)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(PREFIX + explained, elem, None)])
    return probes


def expose(model: onnx.ModelProto, names: list[str], seed_name: str) -> None:
    """``names`` (tensors of the model's float type, or MaxPool indices) as graph outputs too, in place; graph inputs
    and outputs are left as they are."""
    g = model.graph
    elem = next(i.type.tensor_type.elem_type for i in g.input if i.name == seed_name)
    ints = {n.output[1] for n in g.node if n.op_type == "MaxPool" and len(n.output) > 1}
    there = {i.name for i in g.input} | {o.name for o in g.output}
    g.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.INT64 if t in ints else elem, None)
                    for t in dict.fromkeys(names) if t not in there)


def _copy(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def directions(feeds: dict, inputs: list[str], count: int, seed: int) -> list[dict]:
    """``count`` seeded standard normal ``u`` per float input (float64, shaped like it)."""
    rng = np.random.default_rng([seed, 0x6AD])
    return [{n: rng.standard_normal(np.shape(feeds[n])) for n in inputs} for _ in range(count)]


def steps(dtype) -> tuple[float, ...]:
    """Step sizes t of ``(F(x + t v) − F(x)) / t``, tried in turn until the run stays finite. The probe is affine, so
    any t gives the derivative; a large one makes the difference dominate the value at x, whose float32 round-off
    it would carry otherwise (a freshly initialized GoogLeNet's logits are their biases plus a tiny part from the
    input: it needs t = 1e12; docs/check.md#the-gradient-check). float32 holds t = 1e12 times activations up to
    1e26. float16 overflows from 65504: t = 1."""
    return (1.0,) if np.dtype(dtype) == np.float16 else (1e12, 1e6, 1.0)


def relative_error(fd: np.ndarray, lin: np.ndarray) -> float:
    """``‖fd − lin‖ / max(‖fd‖, ‖lin‖)`` (0 when both vanish: a constant output)."""
    scale = max(float(np.linalg.norm(fd)), float(np.linalg.norm(lin)))
    return float(np.linalg.norm(fd - lin)) / scale if scale > 0 else 0.0

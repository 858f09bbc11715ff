"""Activations written as several element-wise ops (SiLU as ``x * Sigmoid(x)``, GELU's Erf and Tanh forms, Mish,
hard-swish as ``x * relu6(x + 3) / 6``, torch's thresholded Softplus, ...) are ONE activation of their input.

A region is a set of element-wise nodes with one computed input ``x`` and one output ``y`` that nothing outside
reads in between; it is recorded in ``canon.activations`` (name of the node making ``y`` -> name of ``x``). The
emitter explains that node as an ``Activation`` of ``x`` (identity rule: ``R_x = R_y``); the region's inner nodes
get no relevance and need no propagator. The graph is not changed.

Regions are formed only where needed: around a merge of two tensors computed from the same ``x`` (``x * f(x)``)
or an element-wise op lrpc has no rule for (Erf, Pow, Exp, ...). A product of tensors computed from different
tensors (a squeeze-and-excitation gate ``x * sigmoid(conv(pool(x)))``) is no region: it stays a gated product.

RMSNorm written out (Llama, Qwen, Gemma: ``x * 1/sqrt(mean(x^2) + eps)`` by Pow or Mul, ReduceMean, Add, Sqrt,
Reciprocal or Div, Cast) is a region too, though not element-wise: AttnLRP's identity over the layer (``R_x = R``;
the weight's Mul after it is a layer of its own). So are the other norms written out that scale a tensor by a
function of its own L2 norm: ``F.normalize`` (``x / max(||x||, eps)``, Swin V2's cosine attention) and ConvNeXt V2's
global response normalization (``x * G / (mean(G) + eps)``, ``G = ||x||`` over the spatial axes): the scale held
constant, as LayerNorm's σ."""
from __future__ import annotations

import numpy as np

from ..errors import op_type
from ..graph import Canonical, const_value, is_const
from ..relevance import propagator  # (the registry says which single ops have a rule of their own)

UNARY = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Exp", "Log", "Softplus",
         "Softsign", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Mish", "ThresholdedRelu", "Neg", "Abs", "Sqrt",
         "Reciprocal", "Sin", "Cos", "Sign", "Identity", "Not", "IsNaN", "IsInf"}
# no activation on their own: a region of such ops without a merge (x·f(x), Where, ...) is left alone (refused);
# sin and cos alone are activations (SIREN) and get the identity rule like any other
NOT_ALONE = {"Sign", "Abs", "Reciprocal", "Not", "IsNaN", "IsInf"}
MERGING = {"Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Where", "Greater", "Less", "GreaterOrEqual",
           "LessOrEqual", "Equal", "And", "Or"}

# the ops of an RMSNorm's ``1/rms(x)`` branch, and of the other norms' scales (``||x||`` clamped and broadcast)
RMS_OPS = {"Pow", "Mul", "Div", "Add", "Sqrt", "Reciprocal", "ReduceMean", "Cast", "ReduceL2", "ReduceSum", "Max",
           "Clip", "Expand", "Shape"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceL2"}

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    root: dict[str, str] = {}  # output of an element-wise node -> the one tensor it is a function of
    members: dict[str, object] = {}  # those outputs -> their nodes, in execution order
    for node in graph.nodes:
        ins = _computed(node)
        if ins and _elementwise(node, ins):
            roots = {root.get(t.name, t.name) for t in ins}
            if len(roots) == 1:
                root[node.outputs[0].name] = roots.pop()
                members[node.outputs[0].name] = node
    # the ops that need a region: merges (x * f(x), also x * x) and single ops without a rule of their own
    cores = [name for name, n in members.items() if _merges(n) or propagator(n.op) is None]
    core_set = set(cores)
    outputs = {t.name for t in graph.outputs}
    found, claimed = _rms_norms(graph, canon.origin)  # (claimed: outputs of the nodes regions have taken)
    again = True
    while again:  # last core first: its region takes the cores it reads; where it cannot, earlier ones try alone
        again = False
        for name in reversed(cores):
            if name in claimed:
                continue
            head = members[name]
            nodes, x = _region(head, members, core_set, claimed, order)
            inner = [n.outputs[0] for n in nodes if n is not head]
            taken = {id(n) for n in nodes}
            if x is None or _kind(x) != "f" or _kind(head.outputs[0]) != "f" or any(
                    t.name in outputs or any(id(r) not in taken for r in t.outputs) for t in inner):
                continue  # two inputs, not float, or an intermediate read outside: no single activation
            if not any(_merges(n) for n in nodes) and any(n.op in NOT_ALONE for n in nodes):
                continue  # (sign(x), |x| or 1/x alone: no activation lrpc knows a rule for)
            claimed.update(n.outputs[0].name for n in nodes)
            found[head.name] = x.name
            again = True
    changed = found != canon.activations
    canon.activations = found
    return changed


def _rms_norms(graph, origin: dict) -> tuple[dict, set]:
    """RMSNorms (and L2 norms) written out: ``{head: x}`` for each node ``head = x * r`` (or ``x / r``) whose ``r``
    is computed from ``x`` alone by :data:`RMS_OPS` with a reduction on the way (or the Conv avgpool_to_conv made of
    a ReduceMean), a square of ``x`` and a root (Sqrt, or ReduceL2 of ``x``, which is both), and read by nothing
    else, and the outputs of the nodes those regions take."""
    def mean(n) -> bool:
        return origin.get(n.name, n.op) in REDUCTIONS

    made = {t.name: n for n in graph.nodes for t in n.outputs}
    outputs = {t.name for t in graph.outputs}
    found: dict[str, str] = {}
    claimed: set[str] = set()
    for head in graph.nodes:
        if head.op not in ("Mul", "Div") or len(_computed(head)) != 2 or len(head.inputs) != 2:
            continue
        for x, r in ((head.inputs[0], head.inputs[1]), (head.inputs[1], head.inputs[0])):
            if head.op == "Div" and x is not head.inputs[0]:
                continue
            nodes, todo, ok = {}, [r], True
            while todo and ok:
                t = todo.pop()
                n = made.get(t.name)
                if t.name == x.name or n is None or n.name in nodes:
                    ok = n is not None or t.name == x.name
                    continue
                ok = (n.op in RMS_OPS or mean(n)) and len(n.outputs) == 1 and t.name not in outputs
                nodes[n.name] = n
                todo += _computed(n)
            inner = {n.outputs[0].name for n in nodes.values()}
            ops = [n.op for n in nodes.values()]
            inverted = "Reciprocal" in ops or "Div" in ops  # (1/rms: the head multiplies; rms: it divides)
            l2 = any(n.op == "ReduceL2" and n.inputs[0].name == x.name for n in nodes.values())
            if (ok and any(mean(n) for n in nodes.values()) and ("Sqrt" in ops or l2)
                    and inverted == (head.op == "Mul") and (l2 or any(_squares(n, x) for n in nodes.values()))
                    and not inner & claimed
                    and all(c is head or c.name in nodes for t in nodes.values() for c in t.outputs[0].outputs)):
                found[head.name] = x.name
                claimed |= inner | {head.outputs[0].name}
                break
    return found, claimed


def _squares(node, x) -> bool:
    """``node`` is ``x²``: ``Pow(x, 2)`` or ``Mul(x, x)``."""
    if node.op == "Mul":
        return [t.name for t in node.inputs] == [x.name, x.name]
    p = node.inputs[1] if node.op == "Pow" and len(node.inputs) == 2 else None
    return (p is not None and node.inputs[0].name == x.name and is_const(p)
            and bool(np.all(const_value(p) == 2.0)))


def _region(head, members: dict, cores: set, claimed: set, order: dict):
    """(nodes, x): the element-wise nodes between ``head`` and the closest tensor ``x`` that every core op above
    ``head`` reads through; x is None where ``head`` is a function of two tensors no free node joins."""
    def free(t) -> bool:  # made by an element-wise node that no region has taken
        return t.name in members and t.name not in claimed

    def core_above(t) -> bool:  # a free core op makes t or a tensor t is computed from
        todo, seen = [t], set()
        while todo:
            u = todo.pop()
            if free(u) and u.name not in seen:
                if u.name in cores:
                    return True
                seen.add(u.name)
                todo += _computed(members[u.name])
        return False

    frontier, nodes = {head.outputs[0].name: head.outputs[0]}, []
    while len(frontier) > 1 or core_above(next(iter(frontier.values()))):
        t = max(frontier.values(), key=lambda t: order[id(members[t.name])] if free(t) else -1)
        if not free(t):
            return nodes, None
        del frontier[t.name]
        nodes.append(members[t.name])
        frontier.update((i.name, i) for i in _computed(members[t.name]))
    return nodes, next(iter(frontier.values()))


def _merges(node) -> bool:
    """Whether ``node`` combines two computed tensors (or one with itself: ``x * x``)."""
    return sum(not is_const(t) for t in node.inputs if t.name) > 1


def _computed(node) -> list:
    """The node's non-constant inputs, each once (``x * x`` reads ``x``)."""
    seen: dict[str, object] = {}
    for t in node.inputs:
        if t.name and not is_const(t):
            seen.setdefault(t.name, t)
    return list(seen.values())


def _kind(t) -> str:
    return np.dtype(t.dtype).kind if t.dtype is not None else "?"


def _elementwise(node, ins: list) -> bool:
    """An element-wise op on float (or bool) tensors whose output has the shape of each computed input (constants
    may broadcast over it, not widen it)."""
    if op_type(node) not in UNARY | MERGING or len(node.outputs) != 1:
        return False
    out = node.outputs[0]
    try:
        if any(t.dtype is None or np.dtype(t.dtype).kind not in "fb" for t in (out, *ins)):
            return False
    except TypeError:  # a type numpy does not know
        return False
    return out.shape is not None and all(t.shape is not None and list(t.shape) == list(out.shape) for t in ins)

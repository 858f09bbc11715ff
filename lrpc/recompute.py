"""Forward tensors computed again inside the backward instead of kept from the forward.

The backward reads some forward tensors: a layer's input (its rule's ``t ⊙ message``), a layer's output (its
stabilizer), attention scores and operands. Many of them are cheap functions of others the backward keeps anyway:
the GELU or SiLU output between two dense layers is a function of the dense output before it; the queries, keys and
values are slices and transposes of the packed projection's output; the attention scores are the product of the
scaled queries and keys; a LayerNorm's output is a function of the residual stream it reads. Each such tensor ``t``
is copied into the backward: its chain of forward ops, made from the kept tensors through ``Max(z, g)``, placed
right before the first backward node that needs it, so the forward's ``t`` is freed after its last forward reader.
Tensors that do not depend on the explained input (masks, positions) are read as they are. No tensor is kept that
was not kept before. ``g`` is ``-inf``, made from one element of the relevance the backward holds where the copy goes
(``Min(-inf, r[0])``): the ``Max`` changes no value, it keeps onnxruntime's common-subexpression elimination from
merging the copy back into the forward's chain, and the dependency keeps any runtime from running the copy before the
backward reaches it (onnxruntime runs the nodes its optimizers create, such as the Split it makes of three Gathers, as
soon as their inputs exist: every layer's copy would be held through the whole backward).

A chain is copied only where it holds one of the ops in ``WORTH``: a chain of ReLUs and additions costs a pass more
per layer (mobile nets at batch 8 up to 8% slower) where memory is rarely what limits. Measured:
docs/performance.md#memory."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Exp",
               "Softplus", "Sqrt", "Pow", "Clip", "Gelu", "Max", "Min", "Cast", "Sum", "Where", "Equal", "Not"}
LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # no data moved
MOVES = {"Transpose", "Gather", "Slice"}  # data moved
INDEXED = LAYOUT | MOVES  # their inputs after the first (shapes, axes, indices) are read as the forward made them
ROWS = {"Softmax", "LayerNormalization"}  # (scale and bias constants)
WORTH = {"Erf", "Tanh", "Sigmoid", "Exp", "Softplus", "Gelu"} | MOVES | ROWS | {"MatMul"}
LONGEST = 32  # ops in a chain copied
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}  # (onnxruntime: no bfloat16 Max)


def recompute_kept(graph: onnx.GraphProto, is_backward, seed: str, live) -> None:
    """Rewrite ``graph`` in place as the module docstring says; ``is_backward(node)``: the node belongs to the
    relevance pass; ``seed``: the tensor the relevance starts from; ``live``: the names of the forward tensors that
    depend on the tensors it ends at."""
    nodes = list(graph.node)
    made = {o: n for n in nodes if not is_backward(n) for o in n.output}
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    fixed = {x for n in nodes for x in n.input if x not in live}  # (masks, positions: read as they are, like constants)
    values = [*graph.value_info, *graph.input, *graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in values if v.type.tensor_type.HasField("shape")}
    first_reader: dict[str, int] = {}  # (a Shape reads no data: with static shapes onnxruntime folds it)
    first_any: dict[str, int] = {}  # (where a copy goes: before its first reader, Shapes included)
    for k, n in enumerate(nodes):
        if is_backward(n):
            for x in n.input:
                if x in made:
                    first_any.setdefault(x, k)
                    if n.op_type != "Shape":
                        first_reader.setdefault(x, k)
    outputs = {o.name for o in graph.output}
    order = {id(n): k for k, n in enumerate(nodes)}

    def cheap(n) -> bool:
        data = [i for i, x in enumerate(n.input) if x in live]
        if n.op_type == "MatMul":  # (of two computed tensors: with a weight it is a dense layer, not cheap)
            return data == [0, 1] and _widens(shapes.get(n.input[0]), shapes.get(n.input[1]))
        if n.op_type in INDEXED:
            return data[:1] == [0]
        if n.op_type in ROWS:
            return data == [0]
        return n.op_type in ELEMENTWISE

    def chain(t):
        """The forward nodes making ``t`` from tensors the backward reads (graph order) and those tensors; None where
        ``t`` is not made so."""
        if made.get(t) is None or not cheap(made[t]) or made[t].output[0] != t:  # (not a LayerNorm's statistics)
            return None
        ops, sources, todo = {}, set(), [t]
        while todo:
            n = made[todo.pop()]
            if id(n) in ops:
                continue
            if len(ops) == LONGEST or not cheap(n):
                return None
            ops[id(n)] = n
            for i, y in enumerate(n.input):
                if not y or y in fixed or (i > 0 and n.op_type in INDEXED):
                    continue
                if y in first_reader:
                    sources.add(y)
                elif y in made:
                    todo.append(y)
                else:  # (a backward tensor)
                    return None
        if not sources or any(types.get(z) not in FLOATS for z in sources):
            return None
        return sorted(ops.values(), key=lambda n: order[id(n)]), sources

    found = {t: c for t in sorted(set(first_reader) - outputs) if (c := chain(t)) is not None}
    chains = {t: c for t, c in found.items() if any(n.op_type in WORTH for n in c[0])}
    while more := {t: c for t, c in found.items() if t not in chains and c[1] <= chains.keys()}:
        chains |= more  # (reshapes of a copy: free)
    if not chains:
        return
    at = {t: first_any[t] for t in chains}  # where each copy goes: before its first reader, copies included
    for t in sorted(chains, key=lambda t: -order[id(made[t])]):  # readers' copies before their sources'
        for z in chains[t][1]:
            if z in chains:
                at[z] = min(at[z], at[t])
    carried = _carried(nodes, seed)
    copies: dict[str, str] = {}
    inserted: dict[int, list] = {}
    gates: dict[tuple, str] = {}

    def constant(name: str, value, dtype) -> str:
        if name not in constants:
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
            constants.add(name)
        return name

    def lowest(p: int, elem: int, new: list) -> str:
        """-inf of type ``elem``, made from the relevance the backward holds at node ``p`` (see the module
        docstring): one element of it, min'ed with -inf."""
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        inf = constant(f"lrp/recompute/-inf/{elem}", -np.inf, dtype)
        here = itertools.chain(nodes[p].input, carried[p])
        r = next((x for x in here if x in carried[-1] and types.get(x) == elem), None)
        if r is None:
            return inf
        if (r, elem) not in gates:
            name = f"lrp/recompute/gate/{r}"
            new += [helper.make_node("Reshape", [r, constant("lrp/recompute/flat", [-1], np.int64)], [f"{name}/flat"],
                                     name=f"{name}/flat"),
                    helper.make_node("Slice", [f"{name}/flat", constant("lrp/recompute/0", [0], np.int64),
                                               constant("lrp/recompute/1", [1], np.int64)], [f"{name}/one"],
                                     name=f"{name}/one"),
                    helper.make_node("ReduceMin", [f"{name}/one"], [f"{name}/scalar"], name=f"{name}/scalar",
                                     keepdims=0),
                    helper.make_node("Min", [inf, f"{name}/scalar"], [name], name=name)]
            gates[r, elem] = name
        return gates[r, elem]

    for t in sorted(chains, key=lambda t: (at[t], order[id(made[t])])):  # sources' copies first
        ops, sources = chains[t]
        again, new = {}, []
        for z in sorted(sources):
            if z in copies:
                again[z] = copies[z]
                continue
            again[z] = f"lrp/recompute/{t}/{z}"
            new.append(helper.make_node("Max", [z, lowest(at[t], types[z], new)], [again[z]],
                                        name=f"lrp/recompute/{t}/max/{z}"))
        for n in ops:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"lrp/recompute/{t}/{n.name or n.output[0]}"
            copy.input[:] = [again.get(x, x) for x in n.input]
            for j, o in enumerate(n.output):
                if o:
                    again[o] = copy.output[j] = f"lrp/recompute/{t}/{o}"
            new.append(copy)
        inserted.setdefault(at[t], []).extend(new)
        copies[t] = again[t]
    for n in nodes:
        if is_backward(n):
            n.input[:] = [copies.get(x, x) for x in n.input]
    del graph.node[:]
    for k, n in enumerate(nodes):
        graph.node.extend(inserted.get(k, []))
        graph.node.append(n)


def _widens(a: list | None, b: list | None) -> bool:
    """Whether a product of ``[.., M, K]`` and ``[.., K, N]`` is bigger than both (attention scores from queries and
    keys: computed again, it saves more than it costs; the probabilities times the values are not): K known and
    smaller than M and N (a dimension not known counts as bigger, a sequence length)."""
    if not a or not b or len(a) < 2 or len(b) < 2 or not a[-1]:
        return False
    return all(d is None or d > a[-1] for d in (a[-2], b[-1]))


def _carried(nodes: list, seed: str) -> list:
    """Per node position, the tensors made from ``seed`` by the nodes before it, latest first (each list a view of
    one growing list, reversed lazily); the last item: the set of all such tensors."""
    reached, made, before = {seed}, [seed], []
    for n in nodes:
        before.append(_Latest(made, len(made)))
        if any(x in reached for x in n.input):
            outs = [o for o in n.output if o]
            reached.update(outs)
            made.extend(outs)
    return [*before, reached]


class _Latest:
    """``made[:end]``, iterated latest first."""

    def __init__(self, made: list, end: int):
        self.made, self.end = made, end

    def __iter__(self):
        return (self.made[k] for k in range(self.end - 1, -1, -1))

"""Element-wise activations computed again inside the backward instead of kept from the forward.

A layer's rule reads the layer's input ``t`` (the product ``t ⊙ message``) and the layer before reads its own output
``z`` (its stabilizer). Where ``t`` is made from ``z`` alone by element-wise ops with constants and layout ops, one
of them a smooth activation's (a GELU or SiLU between two dense layers), both would stay alive from the forward to
the backward. Instead the backward's readers of ``t`` read a copy of that chain of ops made from ``Max(z, -inf)``:
the same values, computed where the backward needs them, and the forward's ``t`` is freed after its last forward
reader. (The ``Max`` with ``-inf`` changes no value; it keeps onnxruntime's common-subexpression elimination from
merging the copy back into the forward's chain.) Measured: docs/performance.md#memory."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Exp",
               "Softplus", "Sqrt", "Pow", "Clip", "Gelu", "Max", "Min"}
LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # (their other inputs are constants: no data moved)
# a chain is copied where it holds one of these (GELU, SiLU, Mish, tanh): ReLU-like chains between convolutions
# cost more time copied (an element-wise pass more per layer, mobile nets at batch 8 up to 8% slower) than they
# save where memory is not what limits
SMOOTH = {"Erf", "Tanh", "Sigmoid", "Exp", "Softplus", "Gelu"}
LONGEST = 8  # ops in a chain copied
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}  # (onnxruntime: no bfloat16 Max)


def recompute_activations(graph: onnx.GraphProto, is_backward) -> None:
    """Rewrite ``graph`` in place as the module docstring says; ``is_backward(node)``: the node belongs to the
    relevance pass. Each copy goes right before the first backward node that reads the chain's output."""
    nodes = list(graph.node)
    made = {o: n for n in nodes if not is_backward(n) for o in n.output}
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    first_reader: dict[str, int] = {}
    for k, n in enumerate(nodes):
        if is_backward(n):
            for x in n.input:
                if x in made:
                    first_reader.setdefault(x, k)
    outputs = {o.name for o in graph.output}
    order = {id(n): k for k, n in enumerate(nodes)}

    def link(x) -> bool:  # a forward tensor a chain may go through
        n = made.get(x)
        return n is not None and x not in first_reader and n.op_type in ELEMENTWISE | LAYOUT

    def chain(t):
        """The forward nodes making ``t`` from one tensor ``z`` that the backward reads (graph order), and ``z``;
        None where ``t`` is not made so."""
        if made.get(t) is None or made[t].op_type not in ELEMENTWISE | LAYOUT:
            return None
        ops, sources, todo = {}, set(), [t]
        while todo:
            n = made[todo.pop()]
            if id(n) in ops:
                continue
            if len(ops) == LONGEST:
                return None
            ops[id(n)] = n
            for i, y in enumerate(n.input):
                if not y or y in constants:
                    continue
                if n.op_type in LAYOUT and i > 0:  # (a computed shape or axes)
                    return None
                if link(y):
                    todo.append(y)
                else:
                    sources.add(y)
        z = sources.pop() if len(sources) == 1 else None
        if (z is None or z not in first_reader or types.get(z) not in FLOATS
                or not any(n.op_type in SMOOTH for n in ops.values())):
            return None
        return sorted(ops.values(), key=lambda n: order[id(n)]), z

    copies: dict[str, str] = {}
    inserted: dict[int, list] = {}
    for t in sorted(set(first_reader) - outputs, key=lambda t: (first_reader[t], t)):
        found = chain(t)
        if found is None:
            continue
        ops, z = found
        lowest = f"lrp/recompute/-inf/{types[z]}"
        if lowest not in constants:
            graph.initializer.append(numpy_helper.from_array(
                np.array(-np.inf, helper.tensor_dtype_to_np_dtype(types[z])), lowest))
            constants.add(lowest)
        again = {z: f"lrp/recompute/{t}/{z}"}
        new = [helper.make_node("Max", [z, lowest], [again[z]], name=f"lrp/recompute/{t}/max")]
        for n in ops:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"lrp/recompute/{t}/{n.name or n.output[0]}"
            copy.input[:] = [again.get(x, x) for x in n.input]
            for j, o in enumerate(n.output):
                again[o] = copy.output[j] = f"lrp/recompute/{t}/{o}"
            new.append(copy)
        inserted.setdefault(first_reader[t], []).extend(new)
        copies[t] = again[t]
    if not copies:
        return
    for n in nodes:
        if is_backward(n):
            n.input[:] = [copies.get(x, x) for x in n.input]
    del graph.node[:]
    for k, n in enumerate(nodes):
        graph.node.extend(inserted.get(k, []))
        graph.node.append(n)


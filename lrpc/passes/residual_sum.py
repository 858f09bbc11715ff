"""Residual merges: ``Add`` of two non-constant tensors becomes ``Sum``, the op the norm rule explains
(each branch receives relevance in proportion to its contribution). ``Add`` with a constant stays an
element-wise bias. A chain of sums, ``(a + b) + c`` as exporters write a three-branch merge (RepVGG), becomes
one ``Sum(a, b, c)``: each branch then gets its share of the whole sum (for the norm rule the same split, without
the intermediate ``a + b`` in a denominator, where it may be near 0; sign-norm splits by the signs of the
branches, not of their partial sums)."""
from __future__ import annotations

import numpy as np

from ..graph import Canonical, is_const

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    changed = False
    for node in canon.graph.nodes:
        if node.op == "Add" and not any(is_const(t) for t in node.inputs) and not _integer(node.outputs[0]):
            canon.origin.setdefault(node.name, node.op)
            node.op = "Sum"
            changed = True
    return _merge_chains(canon) or changed


def _merge_chains(canon: Canonical) -> bool:
    """Sum(Sum(a, b), c) -> Sum(a, b, c) where the inner sum's output feeds only the outer one (and is no graph
    output): the inner node is left without consumers and dropped."""
    graph, changed = canon.graph, False
    outputs = {t.name for t in graph.outputs}
    for node in reversed(graph.nodes):  # (from the output: a chain folds into its last sum in one sweep)
        if node.op != "Sum":
            continue
        while True:
            inner = next((t.inputs[0] for t in node.inputs if len(t.outputs) == 1 and t.name not in outputs and t.inputs
                          and t.inputs[0].op == "Sum" and t.inputs[0] is not node), None)
            if inner is None:
                break
            ins, branches, t = list(node.inputs), list(inner.inputs), inner.outputs[0]
            at = next(i for i, x in enumerate(ins) if x is t)
            inner.inputs.clear()
            inner.outputs.clear()
            node.inputs.clear()
            node.inputs.extend(ins[:at] + branches + ins[at + 1:])
            changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _integer(t) -> bool:
    """Shape arithmetic (int64 Add) must stay Add: Sum only takes float types."""
    try:
        return t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.integer)
    except TypeError:  # a dtype numpy does not know (bfloat16): a float
        return False

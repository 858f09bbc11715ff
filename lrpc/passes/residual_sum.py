"""Residual merges: ``Add`` of two non-constant tensors becomes ``Sum``, the op the norm rule explains
(each branch receives relevance in proportion to its contribution). ``Add`` with a constant stays an
element-wise bias."""
from __future__ import annotations

from ..graph import Canonical, is_const


def run(canon: Canonical) -> bool:
    changed = False
    for node in canon.graph.nodes:
        if node.op == "Add" and not any(is_const(t) for t in node.inputs):
            node.op = "Sum"
            changed = True
    return changed

"""Residual merges: ``Add`` of two non-constant tensors becomes ``Sum``, the op the norm rule explains
(each branch receives relevance in proportion to its contribution). ``Add`` with a constant stays an
element-wise bias."""
from __future__ import annotations

import numpy as np

from ..graph import Canonical, is_const


def run(canon: Canonical) -> bool:
    changed = False
    for node in canon.graph.nodes:
        if node.op == "Add" and not any(is_const(t) for t in node.inputs) and not _integer(node.outputs[0]):
            canon.origin.setdefault(node.name, node.op)
            node.op = "Sum"
            changed = True
    return changed


def _integer(t) -> bool:
    """Shape arithmetic (int64 Add) must stay Add: Sum only takes float types."""
    try:
        return t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.integer)
    except TypeError:  # a dtype numpy does not know (bfloat16): a float
        return False

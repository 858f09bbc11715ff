"""The element-wise affine after a normalization joins it: a constant Mul/Add that alone reads the output of a
LayerNormalization / InstanceNormalization / GroupNormalization folds into its scale and bias where the op can hold
its values (LayerNormalization: constant across the axes it does not normalize; the others: one value per channel).
A constant bias Add it cannot fold (GroupNorm exported as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add:
a per-channel affine after per-group statistics), reached through data movement and constant Muls, is marked as the
normalization's (``canon.origin`` = its op type): it then takes the normalization rule (epsilon: the bias keeps its
share) instead of the scale category's pass."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import MOVES, Canonical, channel_vector, const_value, is_const, only_consumer

# (canonical: version 21 of the last)
NORMALIZATIONS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "GroupNormalization" and canon.opset < 21:  # (onnx's checker refuses the deprecated version 18)
            canon.refuse(node, UnsupportedError(
                f"{where(node)}: GroupNormalization below opset 21 (version 18, deprecated: one scale per group) is "
                "not supported; export at opset 21, or below 18 (Reshape, InstanceNormalization)"))
            continue
        if node.op in NORMALIZATIONS and node.outputs:
            while fold_following(graph, node):
                changed = True
            bias = _bias_add_after(graph, node)
            if bias is not None and canon.origin.get(bias.name) != node.op:
                canon.origin[bias.name] = node.op
                changed = True
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def fold_following(graph: gs.Graph, node) -> bool:
    """Fold the constant Mul/Add that alone reads ``node``'s output into its scale and bias, if its values fit."""
    nxt = only_consumer(graph, node.outputs[0])
    c = _constant_operand(nxt, node.outputs[0]) if nxt is not None and nxt.op in ("Mul", "Add") else None
    x = node.inputs[0]
    if c is None or x.shape is None or any(not t.name or not is_const(t) for t in node.inputs[1:2]):
        return False
    if len(node.inputs) > 2 and node.inputs[2].name and not is_const(node.inputs[2]):
        return False
    rank, scale = len(x.shape), const_value(node.inputs[1])
    bias = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale)
    if node.op == "LayerNormalization":
        axis = int(node.attrs.get("axis", -1)) % rank
        part = over_axes(c, rank, list(range(axis, rank)), x.shape[axis:])
        if part is None:
            return False
        scale, bias = (np.broadcast_to(v.astype(np.float64), part.shape) for v in (scale, bias))
    else:
        part = channel_vector(c, rank, x.shape[1], axis=1) if isinstance(x.shape[1], (int, np.integer)) else None
        if part is None:
            return False
        scale, bias = scale.astype(np.float64), bias.astype(np.float64)
    if nxt.op == "Mul":
        scale, bias = scale * part, bias * part
    else:
        bias = bias + part
    dtype = const_value(node.inputs[1]).dtype
    node.inputs[1] = gs.Constant(f"{node.name}/scale", np.ascontiguousarray(scale.astype(dtype)))
    bias = gs.Constant(f"{node.name}/bias", np.ascontiguousarray(bias.astype(dtype)))
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)
    out = nxt.outputs[0]  # (not rewire_output: a LayerNormalization keeps its other outputs)
    nxt.outputs.clear()
    nxt.inputs.clear()
    node.outputs[0] = out
    return True


def over_axes(c, rank: int, axes: list[int], dims) -> np.ndarray | None:
    """Constant ``c`` (broadcast against a rank-``rank`` tensor) as an array of shape ``dims`` (the sizes of ``axes``)
    when it varies only along ``axes``, else None (also when ``dims`` are not static)."""
    c = np.asarray(c, np.float64)
    if c.ndim > rank or any(not isinstance(d, (int, np.integer)) for d in dims):
        return None
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(full.shape[i] != 1 for i in range(rank) if i not in axes):
        return None
    try:
        return np.broadcast_to(full.reshape([full.shape[i] for i in axes]), [int(d) for d in dims])
    except ValueError:
        return None


def _constant_operand(node, t):
    """The constant float operand of a two-input ``node`` whose other operand is ``t``, else None."""
    others = [i for i in node.inputs if i is not t]
    if len(node.inputs) != 2 or len(others) != 1 or not is_const(others[0]):
        return None
    c = const_value(others[0])
    return c if np.issubdtype(c.dtype, np.floating) else None


def _bias_add_after(graph: gs.Graph, node):
    """The constant Add reached from ``node``'s output through data movement and constant Muls (each the only
    reader of the tensor before it), or None."""
    t = node.outputs[0]
    while True:
        nxt = only_consumer(graph, t)
        if nxt is None or not nxt.outputs:
            return None
        if nxt.op == "Add" and _constant_operand(nxt, t) is not None:
            return nxt
        if not (nxt.op in MOVES or (nxt.op == "Mul" and _constant_operand(nxt, t) is not None)):
            return None
        t = nxt.outputs[0]

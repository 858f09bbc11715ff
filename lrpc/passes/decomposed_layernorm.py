"""A LayerNorm written out as ``(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps)`` (ReduceMean, Sub, Pow or Mul,
ReduceMean, Add, Sqrt, Div or Reciprocal + Mul: torch's legacy export below opset 17, hand-written channels-first
LayerNorms as in the original ConvNeXt code) becomes one LayerNormalization node: over trailing axes as it is, over
other axes between two Transposes that move them last. The constant Mul/Add right after it fold into the node's
scale and bias where they vary only along the normalized axes."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import Canonical, const_value, is_const, only_consumer, producer, shape_advice
from .norm_affine import over_axes

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for node in list(graph.nodes):
        if node.op in ("Div", "Mul") and len(node.inputs) == 2 and node.outputs:
            try:  # (refused before anything is changed; the reason names the pattern's ReduceMean)
                found = _match(node)
                if found is not None:
                    _rewrite(graph, node, *found)
                    changed = True
            except UnsupportedError as e:
                canon.refuse(node, e)
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _match(node):
    """``(x, axes, eps, first ReduceMean)`` when ``node`` divides ``x - mean(x)`` by ``sqrt(var(x) + eps)``,
    else None."""
    a, b = node.inputs
    if node.op == "Mul":  # (x - mean) * Reciprocal(sigma)
        recip = [t for t in (a, b) if _made_by(t, "Reciprocal")]
        if len(recip) != 1:
            return None
        a, b = (b, a) if recip[0] is a else (a, b)
        b = producer(b).inputs[0]
    if not _made_by(b, "Sqrt") or not _made_by(producer(b).inputs[0], "Add"):
        return None
    add = producer(producer(b).inputs[0])
    eps = [t for t in add.inputs if is_const(t)]
    var = [t for t in add.inputs if not is_const(t)]
    if len(eps) != 1 or len(var) != 1 or const_value(eps[0]).size != 1 or not _made_by(var[0], "ReduceMean"):
        return None
    mean_sq = producer(var[0])
    sq = producer(mean_sq.inputs[0])
    if sq is None or not (sq.op == "Mul" and sq.inputs[0] is sq.inputs[1] or sq.op == "Pow" and _is_two(sq.inputs[1])):
        return None
    centred = [_centring(a), _centring(sq.inputs[0])]
    if None in centred or centred[0] != centred[1]:  # (the same x, the same mean)
        return None
    x, mean = centred[0]
    if x.shape is None:
        return None
    axes = _axes(mean, len(x.shape))
    if axes is None or axes != _axes(mean_sq, len(x.shape)):
        return None
    if 0 in axes:
        raise UnsupportedError(f"{where(mean)}: a normalization over the batch axis (axes {axes}) mixes the samples")
    return x, axes, float(const_value(eps[0]).reshape(-1)[0]), mean


def _centring(t):
    """``(x, ReduceMean node)`` when ``t = Sub(x, ReduceMean(x))``, else None."""
    sub = producer(t)
    if sub is None or sub.op != "Sub" or not _made_by(sub.inputs[1], "ReduceMean"):
        return None
    mean = producer(sub.inputs[1])
    return (sub.inputs[0], mean) if mean.inputs[0] is sub.inputs[0] else None


def _axes(node, rank: int) -> list[int] | None:
    """The sorted axes a keepdims ReduceMean averages over (None: not a constant list, or keepdims=0)."""
    if node.attrs.get("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1].name:
        if not is_const(node.inputs[1]):
            return None
        axes = const_value(node.inputs[1]).reshape(-1).tolist()
    else:
        axes = node.attrs.get("axes")
    if not axes:  # (every axis, the batch included)
        return None if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({int(v) % rank for v in axes})


def _made_by(t, op: str) -> bool:
    return producer(t) is not None and producer(t).op == op


def _is_two(t) -> bool:
    return is_const(t) and const_value(t).size == 1 and float(const_value(t).reshape(-1)[0]) == 2.0


def _rewrite(graph: gs.Graph, div, x, axes: list[int], eps: float, mean) -> None:
    rank = len(x.shape)
    dims = [x.shape[a] for a in axes]
    if any(not isinstance(d, (int, np.integer)) for d in dims):
        raise UnsupportedError(f"{where(mean)}: a LayerNorm over axes {axes} of dynamic size {x.shape}; "
                               f"{shape_advice(x)}")
    dtype = np.dtype(x.dtype)
    scale, bias = np.ones(dims), np.zeros(dims)
    out, folded = div.outputs[0], []
    while True:  # the affine after it (constant Mul/Add varying only along the normalized axes)
        nxt = only_consumer(graph, out)
        c = [t for t in nxt.inputs if t is not out] if nxt is not None and nxt.op in ("Mul", "Add") else []
        part = over_axes(const_value(c[0]), rank, axes, dims) if len(c) == 1 and is_const(c[0]) else None
        if part is None:
            break
        scale, bias = (scale * part, bias * part) if nxt.op == "Mul" else (scale, bias + part)
        out, folded = nxt.outputs[0], folded + [nxt]
    for n in [div] + folded:  # (the rest of the pattern goes with graph.cleanup)
        n.outputs.clear()
        n.inputs.clear()
    k = rank - len(axes)
    perm = [i for i in range(rank) if i not in axes] + axes
    name = div.name + "/layernorm"
    # (stash_type stays 1: onnxruntime and onnx's reference compute float64 statistics in float64 with it, and the
    # spec has no float64 stash type)
    attrs = {"axis": k, "epsilon": eps}
    params = [gs.Constant(f"{name}/scale", scale.astype(dtype)), gs.Constant(f"{name}/bias", bias.astype(dtype))]
    if perm == list(range(rank)):
        graph.nodes.append(gs.Node("LayerNormalization", name, attrs, [x, *params], [out]))
        return
    moved = gs.Variable(f"{name}/in", dtype=dtype)
    normed = gs.Variable(f"{name}/out", dtype=dtype)
    graph.nodes.append(gs.Node("Transpose", f"{name}/to_last", {"perm": perm}, [x], [moved]))
    graph.nodes.append(gs.Node("LayerNormalization", name, attrs, [moved, *params], [normed]))
    graph.nodes.append(gs.Node("Transpose", f"{name}/back", {"perm": [int(i) for i in np.argsort(perm)]}, [normed],
                               [out]))

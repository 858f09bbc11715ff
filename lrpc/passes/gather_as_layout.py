"""A Gather that reads every element of a flat tensor once, in the order of a transposed view, becomes Reshape (and
Transpose): dynamo exports ``aten.as_strided`` as ``Gather(Reshape(x, [-1]), indices)`` with constant indices
``Σ i_k · stride_k`` (ConvNeXt's head restrides its pooled [N, C, 1, 1] map before LayerNorm2d's permute). As layout
ops, the passes that look through layout (LayerNorm, gates) see through it and relevance is routed by the existing
adjoints. Other Gathers with constant indices keep their own propagator (relevance/structural.py)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Canonical, const_value, is_const, producer

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph, changed = canon.graph, False
    for node in list(graph.nodes):
        if node.op != "Gather" or not is_const(node.inputs[1]) or is_const(node.inputs[0]):
            continue  # (on rank-1 data, axis is 0 or -1: the same)
        data, out = node.inputs[0], node.outputs[0]
        if data.shape is None or len(data.shape) != 1 or not isinstance(data.shape[0], (int, np.integer)):
            continue
        if data.dtype is None or np.dtype(data.dtype).kind != "f":  # (shape arithmetic stays as it is)
            continue
        layout = transposed_view(const_value(node.inputs[1]), int(data.shape[0]))
        if layout is None:
            continue
        source, perm = layout
        flat = producer(data)  # Reshape(x, [-1]) read by this Gather only: reshape x itself
        if flat is not None and flat.op in ("Reshape", "Flatten") and len(data.outputs) == 1 \
                and data not in graph.outputs:
            data = flat.inputs[0]
        moved = _reshape(graph, node, data, source, out if perm is None else None)
        if perm is not None:
            graph.nodes.append(gs.Node("Transpose", f"{node.name}/transpose", {"perm": perm}, [moved], [out]))
        node.inputs.clear()
        node.outputs.clear()
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def transposed_view(indices: np.ndarray, n: int) -> tuple[list[int], list[int] | None] | None:
    """(source shape, perm) with ``Transpose(Reshape(flat, source), perm) == flat[indices]`` for every flat tensor of
    ``n`` elements (perm None: the Reshape alone), or None where ``indices`` do not take each element once in the
    order of a transposed view."""
    idx = np.asarray(indices)
    if idx.ndim == 0 or idx.size != n or idx.dtype.kind not in "iu":
        return None
    idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
    origin = idx[(0,) * idx.ndim]
    strides = [int(idx[tuple(1 if j == k else 0 for j in range(idx.ndim))] - origin) if d > 1 else 0
               for k, d in enumerate(idx.shape)]
    order = sorted(range(idx.ndim), key=lambda k: -strides[k])  # source axes, outermost first (stable)
    source = [int(idx.shape[k]) for k in order]
    perm = [int(p) for p in np.argsort(order)]
    if not np.array_equal(np.transpose(np.arange(n).reshape(source), perm), idx):
        return None
    moved = [k for k in order if idx.shape[k] > 1]  # size-1 axes may sit anywhere: a Reshape alone where the rest keep
    if moved == sorted(moved):                      # their order
        return [int(d) for d in idx.shape], None
    return source, perm


def _reshape(graph: gs.Graph, node, x, shape: list[int], out):
    out = out if out is not None else gs.Variable(f"{node.name}/view", dtype=x.dtype, shape=shape)
    target = gs.Constant(f"{node.name}/shape", np.asarray(shape, np.int64))
    graph.nodes.append(gs.Node("Reshape", f"{node.name}/reshape", {}, [x, target], [out]))
    return out

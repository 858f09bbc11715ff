"""Cleanup: unique node names, constant subgraphs folded into initializers, Identity/Dropout removed."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import Canonical, bypass, is_const, quiet_folding

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = _name_nodes(graph)
    changed |= _copy_dims(graph)
    changed |= _fold_constants(graph)
    for node in list(graph.nodes):
        if node.op == "Identity":
            changed |= bypass(graph, node)
        elif node.op == "Dropout":
            try:
                _check_dropout(node)
            except UnsupportedError as e:  # it stays
                canon.refuse(node, e)
                continue
            changed |= bypass(graph, node)
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _name_nodes(graph: gs.Graph) -> bool:
    seen, changed = set(), False
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}" if f"{node.op}_{i}" not in seen else f"{node.op}_{i}_{id(node)}"
            changed = True
        seen.add(node.name)
    return changed


def _fold_constants(graph: gs.Graph) -> bool:
    before = len(graph.nodes)
    if not any(_foldable(n) for n in graph.nodes):
        return False
    logging.getLogger("ModelImporter").setLevel(logging.ERROR)
    with quiet_folding():
        graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
    return len(graph.nodes) != before


def _foldable(node) -> bool:
    """A node constant folding removes: a Constant, a node of constant inputs, or the Shape/Size of a tensor whose
    shape is static (TF 'same' padding computes its pads from Shape(x): each level folds once the shapes above it
    are known)."""
    if node.op in ("Shape", "Size") and node.inputs and node.inputs[0].shape is not None:
        return all(isinstance(d, (int, np.integer)) for d in node.inputs[0].shape)
    return node.op == "Constant" or (node.inputs and all(is_const(t) or t.name == "" for t in node.inputs))


def _copy_dims(graph: gs.Graph) -> bool:
    """A Reshape target built as Concat(..., Unsqueeze(Gather(Shape(t), i)), ...) (torch ``x.view(x.size(0), -1)``
    with a dynamic batch) gets 0 (copy the input's dim) for piece i when dim i of t is dim i of the Reshape's
    input: the target becomes a constant and shape inference can resolve a -1 next to the dynamic dim."""
    changed = False
    for node in graph.nodes:
        x, target = node.inputs[0] if node.inputs else None, node.inputs[1] if len(node.inputs) > 1 else None
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) or is_const(target) or x.shape is None:
            continue
        cat = target.inputs[0] if target.inputs else None
        if cat is None or cat.op != "Concat" or len(target.outputs) != 1:  # 0 means "copy" to a Reshape only
            continue
        pos = 0
        for i, piece in enumerate(list(cat.inputs)):
            dim = _shape_dim(piece)
            if (dim is not None and dim[1] == pos < len(x.shape) and isinstance(x.shape[pos], str)
                    and dim[0].shape[pos] == x.shape[pos]):
                cat.inputs[i] = gs.Constant(f"{cat.name}/copy_dim{pos}", np.zeros(1, np.int64))
                changed = True
            size = 1 if dim is not None else np.asarray(piece.values).size if is_const(piece) else None
            if size is None:
                break
            pos += size
    return changed


def _shape_dim(piece):
    """(t, i) if ``piece`` is Unsqueeze(Gather(Shape(t), i)) with a scalar constant i, else None."""
    chain = []
    for op in ("Unsqueeze", "Gather", "Shape"):
        prod = piece.inputs[0] if piece.inputs else None
        if prod is None or prod.op != op:
            return None
        chain.append(prod)
        piece = prod.inputs[0]
    _, gather, shape = chain
    idx = gather.inputs[1]
    if not is_const(idx) or np.asarray(idx.values).size != 1 or gather.attrs.get("axis", 0) != 0:
        return None
    t = shape.inputs[0]
    if t.shape is None or shape.attrs.get("start", 0) != 0:
        return None
    return t, int(np.asarray(idx.values).reshape(-1)[0]) % len(t.shape)


def _check_dropout(node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise UnsupportedError(f"{where(node)}: the Dropout mask output is used; only inference Dropout is supported")
    if len(node.inputs) > 2 and is_const(node.inputs[2]) and bool(np.asarray(node.inputs[2].values)):
        raise UnsupportedError(f"{where(node)}: Dropout in training mode cannot be explained")

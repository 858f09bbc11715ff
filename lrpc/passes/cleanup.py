"""Cleanup: unique node names, constant subgraphs folded into initializers, Identity/Dropout removed."""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import Canonical, bypass, is_const


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = _name_nodes(graph)
    changed |= _fold_constants(graph)
    for node in list(graph.nodes):
        if node.op == "Identity":
            changed |= bypass(graph, node)
        elif node.op == "Dropout":
            _check_dropout(node)
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
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
    return len(graph.nodes) != before


def _foldable(node) -> bool:
    return node.op == "Constant" or (node.inputs and all(is_const(t) or t.name == "" for t in node.inputs))


def _check_dropout(node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise UnsupportedError(f"{where(node)}: the Dropout mask output is used; only inference Dropout is supported")
    if len(node.inputs) > 2 and is_const(node.inputs[2]) and bool(np.asarray(node.inputs[2].values)):
        raise UnsupportedError(f"{where(node)}: Dropout in training mode cannot be explained")

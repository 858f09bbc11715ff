"""Find the explained tensor: the chosen graph output, walked back through a final Softmax/LogSoftmax
(logits are explained) or Sigmoid (segmentation/multi-label: the pre-activation is explained), also where
element-moving ops surround the squasher (onnx's version converter writes an old ``Softmax(axis=1)`` on a
rank-4 tensor as ``Flatten -> Softmax -> Reshape``; torch's exporter before opset 13 a softmax over a
non-last axis as ``Transpose -> Softmax -> Transpose``). The explained tensor has the graph output's shape
and element order, since targets are read off that output and the seed is shaped like it: the moves after
the squasher are applied again, to its input (a copy of them in the graph). The squasher stays, so the
original output is still produced. Metadata ``lrpc.output`` names that graph output, so runtimes can read
targets off it."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..errors import InputError
from ..graph import MOVES, Canonical, producer

SQUASHERS = ("Softmax", "LogSoftmax", "Sigmoid")

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    outputs, output = {t.name: t for t in canon.graph.outputs}, canon.output
    if output is None:
        t = canon.graph.outputs[0]
    elif output in outputs:
        t = outputs[output]
    else:
        raise InputError(f"--output {output}: the model has no output of that name (outputs: {', '.join(outputs)})")
    canon.metadata["lrpc.output"] = t.name  # the scores users see: lrpc.Session reads targets off them
    moves = []  # the element-moving nodes between the squasher and the output, output side first
    node = producer(t)
    while node is not None and node.op in MOVES:
        moves.append(node)
        node = producer(node.inputs[0])
    if node is not None and node.op in SQUASHERS:
        while node is not None and node.op in SQUASHERS:
            t = node.inputs[0]
            node = producer(t)
        t = _moved(canon, t, moves)
    changed = canon.explained != t.name
    canon.explained = t.name
    return changed


def _moved(canon: Canonical, t, moves: list):
    """``t`` moved as ``moves`` (output side first) move the squasher's output: new nodes reading ``t``."""
    for node in reversed(moves):
        out = node.outputs[0]
        moved = gs.Variable(f"lrpc/logits/{out.name}", dtype=out.dtype, shape=out.shape)
        canon.graph.nodes.append(gs.Node(node.op, f"lrpc/logits/{node.name}", dict(node.attrs),
                                         [t] + list(node.inputs[1:]), [moved]))
        t = moved
    return t

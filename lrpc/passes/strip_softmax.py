"""Find the explained tensor: the chosen graph output, walked back through a final Softmax/LogSoftmax
(logits are explained) or Sigmoid (segmentation/multi-label: the pre-activation is explained). The node
stays in the graph, so the original output is still produced. Metadata ``lrpc.output`` names that graph
output, so runtimes can read targets off it."""
from __future__ import annotations

from ..errors import InputError
from ..graph import Canonical, producer

SQUASHERS = ("Softmax", "LogSoftmax", "Sigmoid")


def run(canon: Canonical, output: str | None = None) -> bool:
    outputs = {t.name: t for t in canon.graph.outputs}
    if output is None:
        t = canon.graph.outputs[0]
    elif output in outputs:
        t = outputs[output]
    else:
        raise InputError(f"--output {output}: the model has no output of that name (outputs: {', '.join(outputs)})")
    canon.metadata["lrpc.output"] = t.name  # the scores users see: lrpc.Session reads targets off them
    node = producer(t)
    while node is not None and node.op in SQUASHERS:
        t = node.inputs[0]
        node = producer(t)
    changed = canon.explained != t.name
    canon.explained = t.name
    return changed

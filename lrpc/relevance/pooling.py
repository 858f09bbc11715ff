"""MaxPool: winner-take-all. Relevance of each output goes to the arg-max of its window (the first one on
ties, like torch's gradient), via MaxPool's Indices output and ScatterElements(reduction="add"), so
overlapping windows accumulate instead of overwriting (MaxUnpool would lose relevance)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from . import register


@register("MaxPool")
def maxpool(ctx, node, R_out):
    b = ctx.b
    if node.attrs.get("storage_order", 0):
        raise UnsupportedError(f"{where(node)}: MaxPool with storage_order=1 is not supported")
    if len(node.outputs) < 2:
        node.outputs.append(gs.Variable(f"{node.name}/indices", dtype=np.int64))
    x, idx = node.inputs[0], node.outputs[1]
    flat = b.ints([-1])
    zeros = b.op("Reshape", [b.zeros_like(x), flat])
    scattered = b.op("ScatterElements", [zeros, b.op("Reshape", [idx, flat], dtype=np.int64), b.op("Reshape", [R_out[0], flat])],
                     {"axis": 0, "reduction": "add"})
    return [b.reshape_like(scattered, x)]

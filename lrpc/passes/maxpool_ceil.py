"""MaxPool ceil_mode -> explicit end pads where onnxruntime and ONNX shape inference disagree.

With ceil_mode, onnxruntime (like torch) drops a last window that would start in the end padding;
ONNX shape inference before opset 22 keeps it. The disagreement gives the seed and every later static
shape one cell too many and makes the full model check fail. Floor mode with end pads that exactly
cover the windows onnxruntime keeps computes the same output (pad cells are -inf in MaxPool), and both
agree on its shape."""
from __future__ import annotations

from ..graph import Canonical

CHANGES_SHAPES = True  # (an inferred pool output shape: shapes below the pool are stale at once)


def run(canon: Canonical) -> bool:
    changed = False
    for node in canon.graph.nodes:
        a = node.attrs
        x = node.inputs[0] if node.inputs else None
        if (node.op != "MaxPool" or not a.get("ceil_mode", 0)
                or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")):
            continue
        if x.shape is None or any(not isinstance(v, int) for v in x.shape[2:]):
            continue
        n, nd = list(x.shape[2:]), len(x.shape) - 2
        k = list(a["kernel_shape"])
        s, d = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
        pads = list(a.get("pads", [0] * 2 * nd))
        span = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
        kept = [-(-(n[i] + pads[i] + pads[nd + i] - span[i]) // s[i]) + 1 for i in range(nd)]  # shape inference's
        drop = [(o - 1) * s[i] >= n[i] + pads[i] for i, o in enumerate(kept)]
        end = [max(0, (o - drop[i] - 1) * s[i] + span[i] - n[i] - pads[i]) for i, o in enumerate(kept)]
        if any(drop) and all(e < k[i] for i, e in enumerate(end)):  # onnxruntime needs pads < kernel
            a["pads"], a["ceil_mode"] = pads[:nd] + end, 0
            changed = True
    return changed

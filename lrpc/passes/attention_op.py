"""ONNX's ``Attention`` op (opset 23: torch's dynamo export of ``scaled_dot_product_attention``) written out as the
ops lrpc explains, in the form of the op's definition: heads split from 3-D inputs (Reshape, Transpose), past
key/value joined by Concat, ``Q·sqrt(scale)`` and ``K·sqrt(scale)``, grouped-query heads repeated (Unsqueeze, Expand,
Reshape), ``MatMul(Q, Kᵀ)``, softcap (Div, Tanh, Mul), the mask and the causal bias added (a boolean mask as
``Where(mask, 0, -inf)``), Softmax, ``MatMul(·, V)``. The attention products and the softmax then get their rules
(relevance/attention.py). Refused: the ``qk_matmul_output`` output, padding lengths (``nonpad_kv_seqlen``), sliding
windows, a mask narrower than the keys, shapes the decomposition needs but cannot read."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import Builder, Canonical

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    changed = False
    for node in list(canon.graph.nodes):
        if node.op == "Attention" and node.domain in (None, "", "ai.onnx"):
            try:
                _check(node)
            except UnsupportedError as e:
                canon.refuse(node, e)
                continue
            for name in _decompose(canon.graph, node):
                canon.origin[name] = "Attention"
            changed = True
    if changed:
        canon.graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _check(node) -> None:
    ins, outs, attrs = node.inputs, node.outputs, node.attrs

    def given(i):
        return len(ins) > i and bool(ins[i].name)

    def why(what):
        return UnsupportedError(f"{where(node)}: {what} has no decomposition in lrpc")

    if len(outs) > 3 and outs[3].name:
        raise why("the qk_matmul_output output")
    if given(6):
        raise why("nonpad_kv_seqlen (padding lengths)")
    if given(4) != given(5):
        raise why("past_key without past_value (or the reverse)")
    if int(attrs.get("left_window_size", -1)) >= 0 or int(attrs.get("right_window_size", -1)) >= 0:
        raise why("a sliding window")
    q, k, v = ins[:3]
    if any(t.shape is None or len(t.shape) not in (3, 4) or len(t.shape) != len(q.shape) for t in (q, k, v)):
        raise why("Q, K, V of unknown rank or not all of rank 3 or 4")
    if len(q.shape) == 3 and ("q_num_heads" not in attrs or "kv_num_heads" not in attrs):
        raise why("3-D inputs without q_num_heads and kv_num_heads")
    if len(q.shape) == 3 and not all(isinstance(t.shape[2], (int, np.integer)) for t in (q, k, v)):
        raise why("3-D inputs of dynamic hidden size")
    if not all(isinstance(t.shape[-1], (int, np.integer)) for t in (q, k, v)) or (len(q.shape) == 4 and not all(
            isinstance(t.shape[1], (int, np.integer)) for t in (q, k))):
        raise why("a dynamic head size or head count")
    causal = int(attrs.get("is_causal", 0))
    if causal and not all(isinstance(d, (int, np.integer)) for d in _lengths(node)):
        raise why("a causal mask over dynamic sequence lengths")
    if given(3):
        m, total = ins[3], _lengths(node)[1]
        if m.shape is None or m.shape[-1] != total:
            raise why(f"a mask whose last axis ({None if m.shape is None else m.shape[-1]}) is not the keys' "
                      f"({total})")


def _lengths(node):
    """(query length, key length after the past keys)."""
    q, k = node.inputs[0], node.inputs[1]
    axis = 1 if len(q.shape) == 3 else 2
    past = node.inputs[4] if len(node.inputs) > 4 and node.inputs[4].name else None
    total = k.shape[axis]
    if past is not None:
        p = None if past.shape is None else past.shape[2]
        total = p + total if isinstance(p, (int, np.integer)) and isinstance(total, (int, np.integer)) else None
    return q.shape[axis], total


def _decompose(graph: gs.Graph, node) -> list[str]:
    """Write ``node`` out before removing it; the names of the MatMuls and the Softmax it becomes."""
    ins, attrs = node.inputs, node.attrs
    q, k, v = ins[:3]
    dtype = np.dtype(q.dtype)
    b = Builder(graph, dtype, node.name)
    three_d = len(q.shape) == 3
    if three_d:
        q_heads, kv_heads = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        q, k, v = (b.op("Transpose", [b.op("Reshape", [t, b.ints([0, 0, h, t.shape[2] // h])])], {"perm": [0, 2, 1, 3]})
                   for t, h in ((q, q_heads), (k, kv_heads), (v, kv_heads)))
        head = ins[0].shape[2] // q_heads
    else:
        q_heads, kv_heads, head = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    present = [k, v]
    if len(ins) > 4 and ins[4].name:
        present = [b.op("Concat", [past, t], {"axis": 2}) for past, t in zip(ins[4:6], (k, v))]
    for out, t in zip(node.outputs[1:3], present):  # (present_key, present_value)
        if out.name:
            graph.nodes.append(gs.Node("Identity", b.name("present"), inputs=[t], outputs=[out]))
    k, v = present
    scale = attrs.get("scale")
    root = b.const(np.sqrt(1.0 / np.sqrt(head) if scale is None else float(scale)))
    q, k = b.mul(q, root), b.mul(k, root)
    if q_heads != kv_heads:  # each key/value head serves q_heads / kv_heads consecutive query heads
        reps = q_heads // kv_heads
        sizes = [t.shape[-1] // (kv_heads if three_d else 1) for t in ins[1:3]]
        k, v = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, b.ints([2])]), b.ints([1, 1, reps, 1, 1])]),
                                 b.ints([0, q_heads, -1, int(d)])]) for t, d in zip((k, v), sizes))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], {"perm": [0, 1, 3, 2]})], hint="qk")
    named = [scores.inputs[0].name]
    cap = float(attrs.get("softcap", 0.0) or 0.0)
    if cap > 0:
        scores = b.mul(b.op("Tanh", [b.op("Div", [scores, b.const(cap)])]), b.const(cap))
    bias = None
    mask = ins[3] if len(ins) > 3 and ins[3].name else None
    if mask is not None:
        bias = mask if np.dtype(mask.dtype) != np.bool_ else b.op("Where", [mask, b.const(0.0), b.const(-np.inf)])
    if int(attrs.get("is_causal", 0)):
        s, total = (int(d) for d in _lengths(node))
        allowed = np.arange(total)[None, :] <= np.arange(s)[:, None] + (total - s if len(ins) > 4 and ins[4].name
                                                                         else 0)
        causal = b.const(np.where(allowed, 0.0, -np.inf))
        bias = causal if bias is None else b.add(bias, causal)
    if bias is not None:
        scores = b.add(scores, bias)
    probs = b.op("Softmax", [scores], {"axis": -1})
    named.append(probs.inputs[0].name)
    if mask is not None:  # (a row every key of which is masked: probabilities 0, as the op defines, not NaN)
        probs = b.op("Where", [b.op("IsNaN", [probs], dtype=np.bool_), b.const(0.0), probs])
    y = node.outputs[0]
    if three_d:
        out = b.op("MatMul", [probs, v], hint="av")
        named.append(out.inputs[0].name)
        out = b.op("Transpose", [out], {"perm": [0, 2, 1, 3]})
        graph.nodes.append(gs.Node("Reshape", b.name("merge"), inputs=[out, b.ints([0, 0, -1])], outputs=[y]))
    else:
        graph.nodes.append(gs.Node("MatMul", b.name("av"), inputs=[probs, v], outputs=[y]))
        named.append(graph.nodes[-1].name)
    node.inputs.clear()
    node.outputs.clear()
    return named

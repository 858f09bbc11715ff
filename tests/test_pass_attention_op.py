"""ONNX's Attention op written out (passes/attention_op.py): the canonized graph computes what onnxruntime's
Attention kernel computes (float32), its structure is the op's definition, the pass reaches a fixed point, and
what it cannot write out stays an Attention node, refused by name. The relevance of the written-out form is in
tests/test_transformer_ops.py."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import lrpc
from graph_builders import canonize, init, make_model, ops, roles
from lrpc.passes import attention_op


def _attention(attrs, shapes, mask=None, opset=23):
    names = ["q", "k", "v"] + (["mask"] if mask is not None else [])
    nodes = [helper.make_node("Tanh", [n], [n + "_t"]) for n in "qkv"]
    nodes.append(helper.make_node("Attention", [n + "_t" if n in "qkv" else n for n in names], ["y"], name="attn",
                                  **attrs))
    out = list(shapes[0][:-1]) + [shapes[2][-1] * (attrs.get("q_num_heads", 1) // attrs.get("kv_num_heads", 1))
                                  if len(shapes[0]) == 3 else shapes[2][-1]]
    inits = [init("mask", mask)] if mask is not None else []
    return make_model(nodes, list(zip("qkv", shapes)), [("y", out)], inits, opset=opset, ir=10)


@pytest.mark.parametrize("attrs,shapes", [
    ({}, [(2, 4, 5, 3), (2, 4, 6, 3), (2, 4, 6, 2)]),
    ({"is_causal": 1, "scale": 0.5}, [(2, 4, 5, 3), (2, 2, 5, 3), (2, 2, 5, 2)]),
    ({"q_num_heads": 4, "kv_num_heads": 2, "softcap": 3.0}, [(2, 5, 12), (2, 6, 6), (2, 6, 4)]),
])
def test_attention_is_written_out_as_its_definition(attrs, shapes):
    model = _attention(attrs, shapes)
    result, canon = canonize(model)
    counts = ops(result)
    assert "Attention" not in counts and counts["Softmax"] == 1 and counts["MatMul"] == 2
    grouped = shapes[0][1] != shapes[1][1] if len(shapes[0]) == 4 else attrs["q_num_heads"] != attrs["kv_num_heads"]
    assert counts["Expand"] == (2 if grouped else 0)
    assert sorted(roles(result).values()) == ["Attention"] * 3
    assert not attention_op.run(canon)  # (a fixed point)


def test_attention_with_a_float_mask_and_grouped_heads():
    rng = np.random.default_rng(0)
    mask = rng.standard_normal((5, 5)).astype(np.float32)
    model = _attention({"is_causal": 1}, [(1, 4, 5, 3), (1, 2, 5, 3), (1, 2, 5, 3)], mask)
    result, _ = canonize(model)
    assert ops(result)["Expand"] == 2 and "Attention" not in ops(result)


def test_attention_that_cannot_be_written_out_stays_and_is_refused():
    """A sliding window (a later opset's attribute): the node stays, canonize and compile name it."""
    model = _attention({"q_num_heads": 2, "kv_num_heads": 2}, [(1, 5, 4), (1, 5, 4), (1, 5, 4)])
    model.graph.node[-1].attribute.append(helper.make_attribute("left_window_size", 2))
    for run in (lrpc.canonize, lambda m: lrpc.compile(m, "attnlrp")):
        with pytest.raises(lrpc.UnsupportedError, match=r"'attn' \(Attention\).*sliding window"):
            run(model)


def test_attention_with_past_and_present_keys():
    """Past keys/values joined by Concat (bottom-right causal mask), present keys/values still graph outputs."""
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"],
                            name="attn", is_causal=1)
    shapes = {"q": (1, 2, 3, 4), "k": (1, 2, 3, 4), "v": (1, 2, 3, 4), "pk": (1, 2, 2, 4), "pv": (1, 2, 2, 4)}
    model = make_model([node], list(shapes.items()), [("y", (1, 2, 3, 4)), ("present_k", (1, 2, 5, 4)),
                                                      ("present_v", (1, 2, 5, 4))], opset=23, ir=10)
    result, _ = canonize(model)
    assert "Attention" not in ops(result) and ops(result)["Concat"] == 2

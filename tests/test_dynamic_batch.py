"""Routing on a symbolic batch: a ViT's class token (a constant expanded to the batch and concatenated in front of the
patches) and ``qkv[0]``-style indexing of a tensor whose batch is not its first axis compile without fixed input
shapes. Oracle: the epsilon rule with eps 0 (LRP-0) of the linear model they feed, in float64 numpy, and the same
compile with the batch fixed; the class token's share is booked as a bias (conservation closes)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from conftest import rel_l2, run_onnx
from lrpc.contract import layer_sums

RNG = np.random.default_rng(0)


def _model(nodes, x_shape, inits, out_shape):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _class_token_model():
    """y = flatten(concat(expand(cls), x)) · W for x [N, 4, 8]."""
    inits = {"cls": RNG.standard_normal((1, 1, 8)).astype(np.float32),
             "W": RNG.standard_normal((40, 3)).astype(np.float32),
             "tail": np.array([1, 8], np.int64), "s0": np.array([0], np.int64), "s1": np.array([1], np.int64),
             "flat": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Slice", ["sx", "s0", "s1"], ["n"]),
             helper.make_node("Concat", ["n", "tail"], ["shape"], axis=0),
             helper.make_node("Expand", ["cls", "shape"], ["cls_n"]),
             helper.make_node("Concat", ["cls_n", "x"], ["tokens"], axis=1, name="prepend"),
             helper.make_node("Reshape", ["tokens", "flat"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    return _model(nodes, ["N", 4, 8], inits, ["N", 3]), inits


def _lrp0(a, W, seed):
    """Relevance of the inputs ``a`` [N, K] of ``y = a · W`` under LRP-0."""
    y = a @ W
    return a * ((seed / y) @ W.T)


def _run(model, x, seed, **kw):
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, **kw)
    return run_onnx(compiled, {"x": x, "relevance_seed": seed}), compiled


def test_class_token_concat_on_a_symbolic_batch():
    model, inits = _class_token_model()
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    seed = np.eye(3, dtype=np.float32)[[0, 2]]
    got, _ = _run(model, x, seed)
    a = np.concatenate([np.broadcast_to(inits["cls"], (2, 1, 8)), x], axis=1).reshape(2, -1).astype(np.float64)
    want = _lrp0(a, inits["W"].astype(np.float64), seed)
    assert rel_l2(got["relevance"], want.reshape(2, 5, 8)[:, 1:]) < 1e-4
    fixed, _ = _run(model, x, seed, input_shapes={"x": [2, 4, 8]})
    assert rel_l2(got["relevance"], fixed["relevance"]) < 1e-6


def test_class_token_share_is_booked_as_a_bias():
    model, inits = _class_token_model()
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, layerwise="sums")
    y = run_onnx(model, {"x": x})["y"]
    seed = (np.eye(3, dtype=np.float32)[[0, 2]] * y).astype(np.float32)
    outs = run_onnx(compiled, {"x": x, "relevance_seed": seed})
    rows = {row["name"]: row for row, *_ in layer_sums(compiled, outs)}
    cls_share = float(np.sum(_lrp0(np.concatenate([np.broadcast_to(inits["cls"], (2, 1, 8)), x], 1).reshape(2, -1),
                                   inits["W"], seed).reshape(2, 5, 8)[:, 0]))
    assert np.isclose(rows["prepend"]["bias"], cls_share, rtol=1e-4)
    assert np.isclose(rows["prepend"]["kept"] + rows["prepend"]["bias"], float(seed.sum()), rtol=1e-4)
    assert np.isclose(float(outs["relevance"].sum()) + cls_share, float(seed.sum()), rtol=1e-4)


@pytest.mark.parametrize("index", [1, [2, 0]])
def test_gather_of_slots_before_the_symbolic_batch(index):
    """x [3, N, 4] (q, k, v stacked before the batch), y = x[index] · W: a slot (a contiguous range: zero padding
    around the relevance) or a permutation of slots (a scatter)."""
    W = RNG.standard_normal((4, 2)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["x", "i"], ["k"], axis=0), helper.make_node("MatMul", ["k", "W"], ["y"])]
    out = ["N", 2] if np.ndim(index) == 0 else [2, "N", 2]
    model = _model(nodes, [3, "N", 4], {"i": np.array(index, np.int64), "W": W}, out)
    x = RNG.standard_normal((3, 2, 4)).astype(np.float32)
    k = x[index].astype(np.float64)
    seed = RNG.uniform(0.5, 1.0, (*k.shape[:-1], 2)).astype(np.float32)
    got, _ = _run(model, x, seed)
    want = np.zeros((3, 2, 4))
    want[index] = k * ((seed / (k @ W)) @ W.T)
    assert rel_l2(got["relevance"], want) < 1e-4


@pytest.mark.parametrize("t", [1, 3])
def test_expand_of_a_symbolic_dim_sums_the_copies_found_at_run_time(t):
    """Expand of x [2, T, 1, 5] to [2, 3, 4, 5] (T symbolic: broadcast where it is 1 at run time, a copy where it is
    3), then a linear layer: LRP-0 at x = the epsilon rule's relevance at the Expand's output summed over the axes
    actually broadcast (float64)."""
    w = RNG.standard_normal((5, 6))
    g = helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["m"]), helper.make_node("MatMul", ["m", "W"],
                                                                                                ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, "T", 1, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                          [numpy_helper.from_array(np.array([2, 3, 4, 5], np.int64), "shape"),
                           numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x, seed = RNG.standard_normal((2, t, 1, 5)), RNG.standard_normal((2, 3, 4, 6))
    got = run_onnx(lrpc.compile(m, "epsilon", epsilon=0.0, stabilizer_eps=0.0), {"x": x, "relevance_seed": seed})
    moved = np.broadcast_to(x, (2, 3, 4, 5))
    spread = moved * ((seed / (moved @ w)) @ w.T)
    want = spread.sum(axis=(1, 2) if t == 1 else 2, keepdims=True)
    assert rel_l2(got["relevance"], want) < 1e-12

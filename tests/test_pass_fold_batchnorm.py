"""BatchNormalization folds into the Conv/ConvTranspose/Gemm before it (passes/fold_batchnorm.py): structure and
numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

from collections import Counter

import pytest
from onnx import helper

from graph_builders import (
    attrs,
    bn_node,
    bn_params,
    canonize,
    init,
    make_model,
    make_rng,
    nodes_of,
    ops,
    rand,
)


def test_bn_folds_into_conv():
    rng = make_rng(10)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             bn_node("c", "y", "bn", eps=1e-3)]
    model = make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", 4, 6, 6])], inits)
    result, _ = canonize(model, batches=(1, 3))
    assert ops(result) == Counter({"Conv": 1})
    assert len(nodes_of(result, "Conv")[0].input) == 3


def test_bn_folds_into_conv_without_bias():
    rng = make_rng(11)
    inits = [init("W", rand(rng, 5, 2, 3, 3))] + bn_params(rng, "bn", 5)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], strides=[2, 2], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", [2, 2, 7, 7])], [("y", [2, 5, 3, 3])], inits)
    result, _ = canonize(model, batches=(2,))
    assert ops(result) == Counter({"Conv": 1})


def test_bn_folds_into_grouped_conv_transpose():
    rng = make_rng(12)
    # ConvTranspose W is [C_in, C_out/group, k, k]: 4 in, 2 groups of 3 outputs -> 6 channels
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 6))] + bn_params(rng, "bn", 6)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1],
                              name="deconv"),
             bn_node("c", "y", "bn", eps=1e-3)]
    model = make_model(nodes, [("x", ["N", 4, 5, 5])], [("y", ["N", 6, 9, 9])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"ConvTranspose": 1})
    assert attrs(nodes_of(result, "ConvTranspose")[0])["group"] == 2


@pytest.mark.parametrize("trans_b", [1, 0])
def test_bn_folds_into_gemm(trans_b):
    rng = make_rng(13 + trans_b)
    w = rand(rng, 6, 5) if trans_b else rand(rng, 5, 6)
    inits = [init("W", w), init("B", rand(rng, 6))] + bn_params(rng, "bn", 6)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=trans_b, name="fc"),
             bn_node("g", "y", "bn", eps=1e-3)]
    model = make_model(nodes, [("x", ["N", 5])], [("y", ["N", 6])], inits)
    result, _ = canonize(model, batches=(1, 4))
    assert ops(result) == Counter({"Gemm": 1})
    gemm = nodes_of(result, "Gemm")[0]
    assert attrs(gemm).get("transB") == 1 and attrs(gemm).get("transA", 0) == 0


def test_bn_not_folded_when_conv_output_has_second_consumer():
    rng = make_rng(15)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             bn_node("c", "b", "bn"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["b", "r"], ["y"], name="add")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 5, 5])], inits)
    result, _ = canonize(model)
    assert ops(result)["BatchNormalization"] == 1
    assert ops(result)["Conv"] == 1


def test_bn_not_folded_when_conv_output_is_graph_output():
    rng = make_rng(16)
    inits = [init("W", rand(rng, 4, 3, 3, 3))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("c", ["N", 4, 3, 3]), ("y", ["N", 4, 3, 3])], inits)
    result, _ = canonize(model)
    assert ops(result)["BatchNormalization"] == 1


def test_bn_after_relu_not_folded():
    rng = make_rng(17)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             bn_node("r", "y", "bn", eps=1e-3)]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 5, 5])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1, "Relu": 1, "BatchNormalization": 1})

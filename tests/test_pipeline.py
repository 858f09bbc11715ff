"""The canonization pipeline: passes run to a fixed point, a failing pass is named, old opsets are upgraded, the public
API (paths, protos left unchanged, input shapes), the shipped digits CNN: structure and numerics (forward unchanged
under onnxruntime)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import lrpc
from graph_builders import (
    MODELS,
    assert_close,
    bn_node,
    bn_params,
    canonize,
    canonize_graph,
    feeds_for,
    init,
    make_model,
    make_rng,
    nodes_of,
    ops,
    opset,
    ort_run,
    rand,
    roles,
    vi,
)


def _conv_bn_scale(rng, spatial_bn_first: bool = True):
    """Conv -> BatchNormalization -> Mul(s[C,1,1]) -> Add(t[C,1,1]) -> Relu (Caffe2's SpatialBN + Scale)."""
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("s", rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)),
             init("t", rand(rng, 4, 1, 1))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             bn_node("c", "b", "bn", eps=1e-5),
             helper.make_node("Mul", ["b", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "t"], ["a"], name="shift"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    return make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 5, 5])], inits)


def test_scale_after_batchnorm_folds_once_the_batchnorm_has():
    """The Mul/Add follow the BN, not the Conv: they fold in the round after the BN fold."""
    result, canon = canonize(_conv_bn_scale(make_rng(18)), batches=(1, 3))
    assert ops(result) == Counter({"Conv": 1, "Relu": 1})
    conv = nodes_of(result, "Conv")[0]
    assert len(conv.input) == 3 and conv.output[0] == "a"


def test_nothing_folds_into_a_lowered_pool():
    """A pool lowered to a depthwise Conv keeps its own rule: a BatchNormalization, a constant Mul/Add or a Pad
    after or before it stays (the pool is no linear layer of the model)."""
    rng = make_rng(19)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("s", rng.uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32)),
             init("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Pad", ["r", "p"], ["rp"], name="pad"),
             helper.make_node("AveragePool", ["rp"], ["a"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             bn_node("a", "b", "bn", eps=1e-5),
             helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
             helper.make_node("Mul", ["g", "s"], ["y"], name="scale")]
    model = make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", 4, 1, 1])], inits)
    result, canon = canonize(model, batches=(1, 3))
    assert ops(result) == Counter({"Conv": 3, "Relu": 1, "Pad": 1, "BatchNormalization": 1, "Mul": 1})
    assert roles(result) == {"pool": "AveragePool", "gap": "GlobalAveragePool"}


def test_canonization_that_does_not_settle_is_an_internal_error(monkeypatch):
    import lrpc.passes as passes

    class Restless:  # a pass that reports a change every time
        CHANGES_SHAPES = False

        @staticmethod
        def run(canon):
            return True

    monkeypatch.setattr(passes, "PIPELINE", passes.PIPELINE + (Restless,))
    with pytest.raises(lrpc.UnsupportedError, match=f"did not settle after {passes.MAX_ROUNDS} rounds: passes "
                       "Restless still change the graph"):
        canonize_graph(_conv_bn_scale(make_rng(18)))


def test_a_pass_that_fails_is_named(monkeypatch):
    import lrpc.passes as passes

    class Broken:
        CHANGES_SHAPES = False

        @staticmethod
        def run(canon):
            return {}["missing"]

    monkeypatch.setattr(passes, "PIPELINE", passes.PIPELINE + (Broken,))
    with pytest.raises(RuntimeError, match="canonization pass Broken failed .*: KeyError: 'missing'"):
        canonize_graph(_conv_bn_scale(make_rng(18)))


def _opset9_model(rng, initializers_as_inputs: bool = False, version: int = 9):
    inits = ([init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))] + bn_params(rng, "bn", 4)
             + [init("FW", rand(rng, 5, 4 * 3 * 3)), init("FB", rand(rng, 5))])
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
             bn_node("c", "b", "bn", eps=1e-3),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("Dropout", ["f"], ["d"], ratio=0.25, name="drop"),
             helper.make_node("Gemm", ["d", "FW", "FB"], ["g"], transB=1, name="fc"),
             helper.make_node("Softmax", ["g"], ["y"], axis=1, name="softmax")]
    inputs = [vi("x", ["N", 3, 6, 6])]
    if initializers_as_inputs:
        inputs += [vi(i.name, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "old", inputs, [vi("y", ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
    model.ir_version = 4 if not initializers_as_inputs else 3
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("version", [7, 8, 9])
@pytest.mark.parametrize("initializers_as_inputs", [False, True])
def test_opset9_model_upgraded(initializers_as_inputs, version):
    model = _opset9_model(make_rng(70), initializers_as_inputs, version)
    result, canon = canonize(model, batches=(1, 3))
    assert opset(result) == 17 and result.ir_version >= 8
    o = ops(result)
    assert not o["BatchNormalization"] and not o["Dropout"]
    assert o["Conv"] == 1 and o["Gemm"] == 1 and o["Softmax"] == 1
    assert [i.name for i in result.graph.input] == ["x"]
    assert canon.explained == nodes_of(result, "Softmax")[0].input[0]


def test_digits_cnn():
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    data = np.load(MODELS / "digits_samples.npz")
    images = data["images"]
    feeds = [{"input": images}, {"input": images[:1]}]
    result, canon = canonize(model, feeds=feeds)
    o = ops(result)
    assert not o["BatchNormalization"] and not o["Dropout"] and not o["AveragePool"]
    assert o["Softmax"] == 1 and o["MaxPool"] == 1 and o["Gemm"] == 2
    assert o["Conv"] == 3  # 2 convs + the average pool as a depthwise conv
    assert list(roles(result).values()) == ["AveragePool"]
    softmax = nodes_of(result, "Softmax")[0]
    assert canon.explained == softmax.input[0] and softmax.output[0] == "probabilities"
    probs = ort_run(result, {"input": images})[0]
    # documented: 15 of the 16 samples are classified right, sample 12 is not
    right = probs.argmax(1) == data["labels"]
    assert right.sum() == 15 and not right[12]


def test_a_callers_model_proto_is_left_as_it_was():
    """lrpc.compile / lrpc.canonize of a caller's ModelProto leave it byte for byte as it was: graphsurgeon's export
    named the value tensor of each Constant node (the U-Net has four) in the caller's model."""
    import lrpc

    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "digits_unet.onnx"))
    assert any(n.op_type == "Constant" for n in model.graph.node)
    before = model.SerializeToString()
    lrpc.compile(model, "epsilon")
    lrpc.canonize(model)
    assert model.SerializeToString() == before


def test_input_shapes_take_numpy_integers():
    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"))
    compiled = lrpc.compile(model, "epsilon", input_shapes={"input": np.array([2, 1, 8, 8])})
    dims = [d.dim_value for d in compiled.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 1, 8, 8]


def test_canonize_accepts_a_path(tmp_path):
    rng = make_rng(71)
    inits = [init("W", rand(rng, 4, 3, 3, 3))] + bn_params(rng, "bn", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y", "bn")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 3, 3])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = lrpc.canonize(str(path))
    assert ops(result) == Counter({"Conv": 1})
    f = feeds_for(model)
    assert_close(ort_run(model, f)[0], ort_run(result, f)[0])

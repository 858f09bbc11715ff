"""The explained tensor: a final squasher is found through element-moving ops and its input explained
(passes/strip_softmax.py): structure and numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
from onnx import TensorProto, helper

import lrpc
from graph_builders import (
    assert_close,
    canonize,
    canonize_graph,
    feeds_for,
    init,
    make_model,
    make_rng,
    ops,
    ort_run,
    rand,
)


@pytest.mark.parametrize("squash", ["Softmax", "LogSoftmax", "Sigmoid"])
def test_final_softmax_stays_and_logits_are_explained(squash):
    rng = make_rng(61)
    inits = [init("W", rand(rng, 5, 6)), init("B", rand(rng, 5))]
    attrs = {} if squash == "Sigmoid" else {"axis": -1}
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1, name="fc"),
             helper.make_node(squash, ["logits"], ["prob"], name="squash", **attrs)]
    model = make_model(nodes, [("x", ["N", 6])], [("prob", ["N", 5])], inits)
    result, canon = canonize(model)
    assert ops(result) == Counter({"Gemm": 1, squash: 1})
    assert canon.explained == "logits"
    assert [o.name for o in result.graph.output] == ["prob"]


@pytest.mark.parametrize("squash", ["Softmax", "LogSoftmax", "Sigmoid"])
@pytest.mark.parametrize("moves", ["flatten_reshape", "transpose_both", "transpose_after", "identity_after"])
def test_squasher_behind_element_moves_explains_the_moved_logits(squash, moves):
    """``Flatten -> Softmax -> Reshape`` (onnx's upgrade of an old Softmax(axis=1) on rank 4), ``Transpose -> Softmax
    -> Transpose`` (torch before opset 13), ``Softmax -> Transpose`` and an Identity output: the explained tensor is
    the moves after the squasher applied to its input (output shape and order); the canonical model has no copy."""
    rng = make_rng(64)
    inits = [init("W", rand(rng, 4, 3, 1, 1)), init("B", rand(rng, 4))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["z"], name="conv")]
    attrs = {} if squash == "Sigmoid" else {"axis": -1}
    if moves == "flatten_reshape":
        nodes += [helper.make_node("Shape", ["z"], ["zs"], name="shape"),
                  helper.make_node("Flatten", ["z"], ["zf"], axis=1, name="flatten"),
                  helper.make_node(squash, ["zf"], ["p"], name="squash", **attrs),
                  helper.make_node("Reshape", ["p", "zs"], ["y"], name="reshape")]
        out = ["N", 4, 2, 3]
    elif moves == "transpose_both":
        nodes += [helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 3, 2, 1], name="t1"),
                  helper.make_node(squash, ["zt"], ["p"], name="squash", **attrs),
                  helper.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 1, 3], name="t2")]
        out = ["N", 2, 3, 4]
    else:
        after = ("Transpose", {"perm": [0, 2, 3, 1]}) if moves == "transpose_after" else ("Identity", {})
        nodes += [helper.make_node(squash, ["z"], ["p"], name="squash", **({} if squash == "Sigmoid" else {"axis": 1})),
                  helper.make_node(after[0], ["p"], ["y"], name="move", **after[1])]
        out = ["N", 2, 3, 4] if moves == "transpose_after" else ["N", 4, 2, 3]
    model = make_model(nodes, [("x", ["N", 3, 2, 3])], [("y", out)], inits)
    result, canon = canonize(model, batches=(1, 3))
    assert not any(n.name.startswith("lrpc/") for n in result.graph.node)
    assert canon.explained.startswith("lrpc/logits/")
    explained = canon.graph.tensors()[canon.explained]
    assert explained.shape[1:] == out[1:]
    # the explained tensor holds the logits z moved as the output is: run it with the canonical graph's nodes
    extra = copy.deepcopy(model)
    conv_z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    extra.graph.output.append(conv_z)
    feeds = feeds_for(model, 2)
    z = ort_run(extra, feeds)[1]
    want = {"flatten_reshape": z, "transpose_both": z.transpose(0, 2, 3, 1), "transpose_after": z.transpose(0, 2, 3, 1),
            "identity_after": z}[moves]
    from lrpc.graph import export_model

    exported = export_model(canon)
    exported.graph.output.append(helper.make_tensor_value_info(canon.explained, TensorProto.FLOAT, None))
    assert_close(want, ort_run(exported, feeds)[-1])


def test_moves_without_a_squasher_are_explained_as_they_are():
    rng = make_rng(65)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
             helper.make_node("Transpose", ["z"], ["y"], perm=[0, 2, 3, 1], name="move")]
    model = make_model(nodes, [("x", ["N", 3, 2, 3])], [("y", ["N", 2, 3, 4])], [init("W", rand(rng, 4, 3, 1, 1))])
    _, canon = canonize(model)
    assert canon.explained == "y"


def test_explained_without_softmax_is_the_output():
    rng = make_rng(62)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1, name="fc")]
    model = make_model(nodes, [("x", ["N", 6])], [("y", ["N", 5])],
                       [init("W", rand(rng, 5, 6)), init("B", rand(rng, 5))])
    _, canon = canonize(model)
    assert canon.explained == "y"


def test_explained_output_by_name():
    rng = make_rng(63)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1, name="softmax"),
             helper.make_node("Relu", ["logits"], ["act"], name="relu")]
    model = make_model(nodes, [("x", ["N", 6])], [("prob", ["N", 5]), ("act", ["N", 5])],
                       [init("W", rand(rng, 5, 6)), init("B", rand(rng, 5))])
    assert canonize_graph(copy.deepcopy(model), "act").explained == "act"
    assert canonize_graph(copy.deepcopy(model), "prob").explained == "logits"
    with pytest.raises(lrpc.InputError):
        canonize_graph(copy.deepcopy(model), "nope")

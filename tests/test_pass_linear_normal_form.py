"""Gemm/MatMul/Conv in one normal form: bias in the op, constants folded, auto_pad as pads
(passes/linear_normal_form.py): structure and numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graph_builders import (
    attrs,
    canonize,
    init,
    make_model,
    make_rng,
    nodes_of,
    ops,
    rand,
)


def test_gemm_general_form_normalized():
    rng = make_rng(30)
    # Y = 0.5 * A^T B + 2 * C, A is [in, N], B is [in, out], C is [1, out]
    inits = [init("W", rand(rng, 5, 4)), init("C", rand(rng, 1, 4))]
    nodes = [helper.make_node("Gemm", ["a", "W", "C"], ["y"], transA=1, transB=0, alpha=0.5, beta=2.0, name="fc")]
    model = make_model(nodes, [("a", [5, 3])], [("y", [3, 4])], inits)
    result, _ = canonize(model, batches=(3,))
    gemm = nodes_of(result, "Gemm")[0]
    a = attrs(gemm)
    assert a.get("transB") == 1 and a.get("transA", 0) == 0
    assert a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    consts = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
    assert consts[gemm.input[1]].shape == (4, 5)
    assert consts[gemm.input[2]].shape == (4,)
    assert ops(result) == Counter({"Gemm": 1, "Transpose": 1})


def test_gemm_without_bias_gets_one():
    rng = make_rng(31)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc")]
    model = make_model(nodes, [("x", ["N", 5])], [("y", ["N", 4])], [init("W", rand(rng, 5, 4))])
    result, _ = canonize(model)
    gemm = nodes_of(result, "Gemm")[0]
    assert len(gemm.input) == 3 and attrs(gemm).get("transB") == 1


def test_matmul_add_becomes_gemm():
    rng = make_rng(32)
    inits = [init("W", rand(rng, 6, 4)), init("b", rand(rng, 4))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    model = make_model(nodes, [("x", ["N", 6])], [("y", ["N", 4])], inits)
    result, _ = canonize(model, batches=(1, 5))
    assert ops(result) == Counter({"Gemm": 1})
    gemm = nodes_of(result, "Gemm")[0]
    consts = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
    np.testing.assert_allclose(consts[gemm.input[2]], numpy_helper.to_array(inits[1]), rtol=1e-7)


def test_matmul_bias_first_add_becomes_gemm():
    rng = make_rng(33)
    inits = [init("W", rand(rng, 6, 4)), init("b", rand(rng, 1, 4))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["b", "m"], ["y"], name="bias")]
    model = make_model(nodes, [("x", ["N", 6])], [("y", ["N", 4])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Gemm": 1})


def test_matmul_rank3_becomes_reshaped_gemm_with_bias():
    rng = make_rng(34)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "B"], ["y"], name="bias")]
    model = make_model(nodes, [("x", ["N", 3, 6])], [("y", ["N", 3, 4])],
                       [init("W", rand(rng, 6, 4)), init("B", rand(rng, 4))])
    result, _ = canonize(model)
    assert ops(result) == Counter({"Reshape": 2, "Gemm": 1})


def test_matmul_rank3_with_dynamic_middle_dim_stays_matmul():
    rng = make_rng(34)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [("x", ["N", "T", 6])], [("y", ["N", "T", 4])], [init("W", rand(rng, 6, 4))])
    result, _ = canonize(model)
    assert ops(result) == Counter({"MatMul": 1})


def test_conv_add_mul_constants_fold_into_conv():
    rng = make_rng(35)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4)),
             init("shift", rand(rng, 4, 1, 1)), init("scale", rand(rng, 1, 4, 1, 1) + 2.0)]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Add", ["c", "shift"], ["a"], name="add"),
             helper.make_node("Mul", ["scale", "a"], ["y"], name="mul")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 5, 5])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1})


def test_grouped_conv_transpose_mul_add_constants_fold():
    rng = make_rng(41)
    inits = [init("W", rand(rng, 4, 3, 2, 2)), init("s", rand(rng, 1, 6, 1, 1) + 2.0), init("t", rand(rng, 6, 1, 1))]
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=2, strides=[2, 2], name="deconv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["y"], name="add")]
    model = make_model(nodes, [("x", ["N", 4, 3, 3])], [("y", ["N", 6, 6, 6])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"ConvTranspose": 1})


@pytest.mark.parametrize("auto_pad, out", [("NOTSET", [10, 9]), ("SAME_UPPER", [10, 9]), ("SAME_LOWER", [10, 9]),
                                           ("NOTSET", [12, 11]), ("SAME_UPPER", None), ("SAME_LOWER", None)])
def test_conv_transpose_output_shape_and_auto_pad_become_pads(auto_pad, out):
    # 5 -> natural 11 with k3/s2; [10, 9] needs odd/even total padding, [12, 11] needs output padding
    rng = make_rng(42)
    kw = {"auto_pad": auto_pad} if auto_pad != "NOTSET" else {}
    if out is not None:
        kw["output_shape"] = out
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], strides=[2, 2], name="deconv", **kw)]
    model = make_model(nodes, [("x", ["N", 2, 5, 5])], [("y", ["N", 3] + (out or [10, 10]))],
                       [init("W", rand(rng, 2, 3, 3, 3)), init("B", rand(rng, 3))])
    result, _ = canonize(model, batches=(1, 2))
    a = attrs(nodes_of(result, "ConvTranspose")[0])
    assert "output_shape" not in a and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and "pads" in a


def test_conv_add_of_non_channel_constant_stays():
    rng = make_rng(36)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4)), init("shift", rand(rng, 1, 1, 3, 3))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "shift"], ["y"], name="add")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 3, 3])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1, "Add": 1})


def test_sub_div_by_constants():
    rng = make_rng(37)
    inits = [init("mean", rand(rng, 1, 3, 1, 1)), init("std", rng.uniform(0.5, 2.0, (1, 3, 1, 1)).astype(np.float32)),
             init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4)), init("k", np.float32(1.5))]
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"], name="sub"),
             helper.make_node("Div", ["s", "std"], ["d"], name="div"),
             helper.make_node("Conv", ["d", "W", "B"], ["c"], name="conv"),
             helper.make_node("Sub", ["c", "k"], ["e"], name="sub_after"),
             helper.make_node("Div", ["e", "k"], ["y"], name="div_after")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 3, 3])], inits)
    result, _ = canonize(model)
    o = ops(result)
    assert not o["Sub"] and not o["Div"]
    # the input normalization stays (Add, Mul); the ones after the Conv fold into it
    assert o == Counter({"Add": 1, "Mul": 1, "Conv": 1})


def test_sub_from_constant_stays():
    rng = make_rng(38)
    nodes = [helper.make_node("Sub", ["k", "x"], ["y"], name="sub")]
    model = make_model(nodes, [("x", ["N", 3])], [("y", ["N", 3])], [init("k", rand(rng, 3))])
    result, _ = canonize(model)
    assert ops(result) == Counter({"Sub": 1})


def test_conv_auto_pad_same_upper_gets_explicit_pads():
    rng = make_rng(39)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2], name="conv")]
    model = make_model(nodes, [("x", ["N", 3, 7, 8])], [("y", ["N", 4, 4, 4])], inits)
    result, _ = canonize(model)
    a = attrs(nodes_of(result, "Conv")[0])
    assert "auto_pad" not in a or a["auto_pad"] in (b"NOTSET", "NOTSET")
    # 7 -> 4 with k3 s2: total pad 2 (1,1); 8 -> 4: total pad 1, the extra at the end (SAME_UPPER)
    assert list(a["pads"]) == [1, 0, 1, 1]
    assert list(a["kernel_shape"]) == [3, 3]


def test_conv_auto_pad_same_lower_gets_explicit_pads():
    rng = make_rng(40)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2], name="conv")]
    model = make_model(nodes, [("x", ["N", 2, 8, 5])], [("y", ["N", 3, 4, 3])], [init("W", rand(rng, 3, 2, 2, 3))])
    result, _ = canonize(model)
    a = attrs(nodes_of(result, "Conv")[0])
    assert list(a["pads"]) == [0, 1, 0, 1]

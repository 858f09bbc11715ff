"""Average pools (AveragePool, GlobalAveragePool, ReduceMean over space) become depthwise Convs
(passes/avgpool_to_conv.py): structure and numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from onnx import helper, numpy_helper

from graph_builders import (
    attrs,
    canonize,
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
)


def _check_avgpool_conv(result, canon, c: int, n_convs: int = 1):
    assert not ops(result)["AveragePool"] and not ops(result)["GlobalAveragePool"] and not ops(result)["ReduceMean"]
    convs = [n for n in nodes_of(result, "Conv") if attrs(n).get("group") == c]
    assert len(convs) == n_convs
    meta_roles = roles(result)
    for conv in convs:
        assert meta_roles.get(conv.name) in ("AveragePool", "GlobalAveragePool", "ReduceMean")
        assert canon.origin.get(conv.name) == meta_roles.get(conv.name)
    w = [numpy_helper.to_array(i) for i in result.graph.initializer if i.name == convs[0].input[1]][0]
    assert w.shape[:2] == (c, 1)
    np.testing.assert_allclose(w, 1.0 / np.prod(w.shape[2:]), rtol=1e-7)


AVGPOOLS = {
    "pads_exclude": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    "pads_include": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    "asym_pads_exclude": dict(kernel_shape=[3, 3], strides=[1, 1], pads=[0, 1, 2, 1], count_include_pad=0),
    "ceil_overhang": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "ceil_overhang_pads_include": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                       count_include_pad=1),
    "ceil_overhang_pads_exclude": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1,
                                       count_include_pad=0),
    "stride2_3x3": dict(kernel_shape=[3, 3], strides=[2, 2]),
    "2x2": dict(kernel_shape=[2, 2], strides=[2, 2]),
}


@pytest.mark.parametrize("name", list(AVGPOOLS))
def test_avgpool_becomes_depthwise_conv(name):
    kw = AVGPOOLS[name]
    c, size = 3, 8  # size 8 with 3x3/stride 2: ceil_mode gives an overhanging last window
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", **kw)
    probe = make_model([node], [("x", [1, c, size, size])], [("y", None)], check=False)
    out_shape = list(ort_run(probe, {"x": np.ones([1, c, size, size], np.float32)})[0].shape)
    model = make_model([node], [("x", ["N", c, size, size])], [("y", ["N"] + out_shape[1:])])
    result, canon = canonize(model, batches=(1, 2))
    _check_avgpool_conv(result, canon, c)


def test_avgpool_ceil_overhang_has_border_correction():
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, name="p")
    model = make_model([node], [("x", ["N", 2, 8, 8])], [("y", ["N", 2, 4, 4])])
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1, "Mul": 1})


def test_avgpool_ceil_window_starting_in_padding_is_dropped():
    # 8 + 1 + 1 with k3/s3/ceil: ONNX shape inference declares 4x4, onnxruntime drops the last window
    # (it would start in the end padding) and computes 3x3; the canonical model must check and match ORT
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1],
                            ceil_mode=1, count_include_pad=0, name="pool")
    model = make_model([node], [("x", ["N", 2, 8, 8])], [("y", ["N", 2, 4, 4])])
    f = feeds_for(model, 2)
    assert ort_run(model, f)[0].shape == (2, 2, 3, 3)
    result, canon = canonize(model, feeds=[f])
    _check_avgpool_conv(result, canon, 2)


def test_global_average_pool():
    rng = make_rng(20)
    inits = [init("W", rand(rng, 5, 3, 3, 3)), init("B", rand(rng, 5))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap")]
    model = make_model(nodes, [("x", ["N", 3, 7, 6])], [("y", ["N", 5, 1, 1])], inits)
    result, canon = canonize(model)
    _check_avgpool_conv(result, canon, 5)
    assert ops(result) == Counter({"Conv": 2})


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("op_set", [17, 18])
def test_reduce_mean_over_spatial_axes(op_set, keepdims):
    rng = make_rng(21)
    inits = [init("W", rand(rng, 4, 3, 3, 3)), init("B", rand(rng, 4))]
    if op_set >= 18:
        inits.append(init("axes", np.array([2, 3], np.int64)))
        mean = helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=keepdims, name="mean")
    else:
        mean = helper.make_node("ReduceMean", ["c"], ["y"], axes=[2, 3], keepdims=keepdims, name="mean")
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"), mean]
    out = ["N", 4, 1, 1] if keepdims else ["N", 4]
    model = make_model(nodes, [("x", ["N", 3, 5, 6])], [("y", out)], inits, opset=op_set)
    result, canon = canonize(model, batches=(1, 3))
    _check_avgpool_conv(result, canon, 4)
    assert opset(result) == op_set


def test_reduce_mean_over_channels_stays():
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1, name="mean")
    model = make_model([node], [("x", ["N", 3, 4, 4])], [("y", ["N", 1, 4, 4])])
    result, _ = canonize(model)
    assert ops(result) == Counter({"ReduceMean": 1})

"""Adds of two computed tensors become Sum, the residual sum the sum rules explain (passes/residual_sum.py): structure
and numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

from collections import Counter

import numpy as np
from onnx import helper

from graph_builders import (
    canonize,
    init,
    make_model,
    make_rng,
    nodes_of,
    ops,
    rand,
)


def test_residual_add_becomes_sum():
    rng = make_rng(60)
    inits = [init("W", rand(rng, 3, 3, 3, 3)), init("B", rand(rng, 3)), init("k", rand(rng, 1, 3, 1, 1))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "x"], ["s"], name="residual"),
             helper.make_node("Add", ["s", "k"], ["y"], name="bias")]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 4, 4])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1, "Relu": 1, "Sum": 1, "Add": 1})
    summ = nodes_of(result, "Sum")[0]
    assert summ.name == "residual" and len(summ.input) == 2


def test_integer_add_of_two_tensors_stays_add():
    # shape arithmetic on a dynamic batch: Sum has no int64 kernel, the Add must stay
    inits = [init("i0", np.array([0], np.int64)), init("m1", np.array([-1], np.int64))]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="gather"),
             helper.make_node("Add", ["n", "n"], ["n2"], name="int_add"),
             helper.make_node("Concat", ["n2", "m1"], ["ns"], axis=0, name="concat"),
             helper.make_node("Reshape", ["x", "ns"], ["r"], name="reshape"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["M", "K"])], inits)
    result, _ = canonize(model, batches=(2, 4))
    assert ops(result)["Add"] == 1 and not ops(result)["Sum"]

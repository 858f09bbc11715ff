"""Cleanup: Identity/Dropout removed, constants and static shapes folded, unique names (passes/cleanup.py): structure
and numerics (forward unchanged under onnxruntime)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from graph_builders import (
    assert_close,
    canonize,
    canonize_graph,
    feeds_for,
    init,
    make_model,
    make_rng,
    nodes_of,
    ops,
    ort_run,
    rand,
    vi,
)


def test_identity_and_dropout_removed():
    rng = make_rng(50)
    inits = [init("W", rand(rng, 6, 4)), init("B", rand(rng, 4)), init("ratio", np.array(0.3, np.float32))]
    nodes = [helper.make_node("Identity", ["x"], ["i"], name="id"),
             helper.make_node("Dropout", ["i"], ["d1"], name="drop_attr"),
             helper.make_node("Dropout", ["d1", "ratio"], ["d2"], name="drop_ratio"),
             helper.make_node("Gemm", ["d2", "W", "B"], ["g"], name="fc"),
             helper.make_node("Identity", ["g"], ["g2"], name="id2"),
             helper.make_node("Relu", ["g2"], ["y"], name="relu")]
    model = make_model(nodes, [("x", ["N", 6])], [("y", ["N", 4])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Gemm": 1, "Relu": 1})


def test_dropout_with_mask_output_unused_removed():
    nodes = [helper.make_node("Dropout", ["x", "ratio"], ["d", "mask"], name="drop"),
             helper.make_node("Relu", ["d"], ["y"], name="relu")]
    model = make_model(nodes, [("x", ["N", 5])], [("y", ["N", 5])], [init("ratio", np.array(0.5, np.float32))])
    result, _ = canonize(model)
    assert ops(result) == Counter({"Relu": 1})


def test_identity_producing_graph_output_keeps_output():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Identity", ["r"], ["y"], name="id")]
    model = make_model(nodes, [("x", ["N", 5])], [("y", ["N", 5])])
    result, canon = canonize(model)
    assert [o.name for o in result.graph.output] == ["y"]
    assert canon.explained == "y"


def test_constant_subgraphs_folded():
    rng = make_rng(52)
    w = rand(rng, 4 * 3 * 3 * 3)
    inits = [init("w_flat", w), init("w_shape", np.array([4, 3, 3, 3], np.int64)),
             init("b64", rand(rng, 4, dtype=np.float64)), init("one", np.array([1.0], np.float32))]
    nodes = [helper.make_node("Reshape", ["w_flat", "w_shape"], ["W"], name="reshape_w"),
             helper.make_node("Cast", ["b64"], ["B0"], to=TensorProto.FLOAT, name="cast_b"),
             helper.make_node("Constant", [], ["two"], value=init("two_v", np.array([2.0], np.float32)), name="two_c"),
             helper.make_node("Mul", ["B0", "two"], ["B1"], name="scale_b"),
             helper.make_node("Add", ["B1", "one"], ["B"], name="shift_b"),
             helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    model = make_model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 4, 5, 5])], inits)
    result, _ = canonize(model)
    assert ops(result) == Counter({"Conv": 1})
    conv = nodes_of(result, "Conv")[0]
    consts = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
    assert consts[conv.input[1]].shape == (4, 3, 3, 3) and consts[conv.input[2]].dtype == np.float32


def test_unique_node_names():
    def build(names):
        nodes = [helper.make_node("Relu", ["x"], ["a"], name=names[0]),
                 helper.make_node("Relu", ["a"], ["b"], name=names[1]),
                 helper.make_node("Neg", ["b"], ["y"], name=names[2])]
        return make_model(nodes, [("x", ["N", 3])], [("y", ["N", 3])])

    reference = build(["a", "b", "c"])
    result = lrpc.canonize(build(["", "r", "r"]))  # ORT refuses this one: duplicate names
    onnx.checker.check_model(result, full_check=True)
    names = [n.name for n in result.graph.node]
    assert all(names) and len(set(names)) == len(names)
    f = feeds_for(reference)
    assert_close(ort_run(reference, f)[0], ort_run(result, f)[0])


def _tf_same_net():
    """timm's Conv2dSame (TF 'same' padding: each Pad's pads computed from Shape(x)) on three levels, ReLU, mean and
    Linear."""
    torch = pytest.importorskip("torch")
    from timm.layers import Conv2dSame

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = Conv2dSame(3, 8, 3, stride=2), Conv2dSame(8, 8, 3, stride=2, groups=8)
            self.c3, self.fc = Conv2dSame(8, 6, 3, stride=2), torch.nn.Linear(6, 5)

        def forward(self, x):
            h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
            return self.fc(h.mean((2, 3), keepdim=True).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def test_shapes_of_static_tensors_fold_at_every_level():
    """TF 'same' padding exported by the TorchScript exporter with a static input: the pads of each level are computed
    from Shape(x) of the level above; every level folds (to a fixed point), so the pool's input shape is known.
    Oracle: forward equals torch's, LRP-0 = gradient × input (a ReLU net)."""
    import io
    import warnings

    torch = pytest.importorskip("torch")

    from conftest import rel_l2
    from torch_fixtures import grad_x_input_top1

    net = _tf_same_net()
    x = torch.randn(1, 3, 13, 11, generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"])
    model = onnx.load_from_string(buf.getvalue())
    assert ops(model)["Shape"] >= 3 and ops(model)["Pad"] == 3
    canon = canonize_graph(model)
    assert not [n for n in canon.graph.nodes if n.op in ("Shape", "Pad")]
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    y, seed, want = grad_x_input_top1(net, x)
    out = ort_run(compiled, {"input": x.numpy(), "relevance_seed": seed})
    assert_close(y, out[0])
    assert np.abs(want).sum() > 0 and rel_l2(out[1], want) < 1e-4


def _reshape_to_computed_shape(dims):
    """x -> Conv -> Relu -> Reshape(·, shape input) -> GlobalAveragePool -> Flatten: the pool's input shape depends
    on the int64 input ``shape``; ``dims``: x's dims."""
    rng = make_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["s"], name="reshape"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "t", [vi("x", dims), vi("shape", [4], TensorProto.INT64)], [vi("y", None)],
                              [init("w", rand(rng, 3, 2, 3, 3))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dims, advice", [
    ([1, 2, 4, 4], "shape inference could not infer it, although the model's inputs have static shapes"),
    (["N", 2, 4, "W"], "the model input 'x' has dims ['N', 2, 4, 'W']: fix them with --input-shape x=")])
def test_unknown_shape_advice_names_a_symbolic_input_only_where_there_is_one(dims, advice):
    """An unknown shape asks for --input-shape only where a model input it is computed from has symbolic dims; with
    static inputs the cause is shape inference's, and the error names the node."""
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.compile(_reshape_to_computed_shape(dims), "epsilon")
    msg = str(e.value)
    assert "tensor 's' at node 'gap' (GlobalAveragePool)" in msg and advice in msg and "\n" not in msg
    assert ("--input-shape" in msg) == isinstance(dims[0], str)


def test_folding_is_quiet_from_python(tmp_path, capfd):
    """lrpc.compile of a torchvision ViT exported with a symbolic batch prints nothing: the sessions constant folding
    starts log onnxruntime's optimizer warnings (one per attention) only above warning level, and onnxruntime's
    session class is restored after."""
    torch = pytest.importorskip("torch")
    import onnxruntime

    from models import families

    model, x = families.build("vit")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(model.eval(), x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    capfd.readouterr()
    session_class = onnxruntime.InferenceSession
    lrpc.compile(str(path), "attnlrp")
    assert capfd.readouterr().err == ""
    assert onnxruntime.InferenceSession is session_class

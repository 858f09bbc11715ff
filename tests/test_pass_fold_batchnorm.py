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


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bn_behind_a_reshape_of_a_matmul_folds(exporter, tmp_path):
    """LeViT's LinearNorm, ``bn(linear(x).flatten(0, 1)).reshape_as(...)``: a BatchNorm1d over [B·N, C] behind the
    reshape of a bias-free MatMul folds into it (its scale into the weight's columns, its shift a bias), so the
    layer's rule sees the normalized output; left standalone it got pass and its input's quotient blew the relevance
    up. Oracle: LRP-0 (epsilon, epsilon 0) = gradient × input of the torch module (batch 2), both exporters."""
    torch = pytest.importorskip("torch")
    import numpy as np
    import onnx

    import lrpc
    from conftest import rel_l2, run_onnx
    from models import families

    class LinearNorm(torch.nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.lin, self.bn = torch.nn.Linear(a, b, bias=False), torch.nn.BatchNorm1d(b)

        def forward(self, x):
            y = self.lin(x)
            return self.bn(y.flatten(0, 1)).reshape_as(y)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = LinearNorm(8, 16), LinearNorm(16, 16), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean(1))

    torch.manual_seed(0)
    net = Net().eval().requires_grad_(False)
    for bn in (net.a.bn, net.b.bn):
        bn.running_mean.normal_(0, 2)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.normal_(0, 2)
    x = torch.randn(2, 5, 8)
    path = families.export(net, tmp_path / "levit_block.onnx", x.shape, exporter)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in {n.op_type for n in lrpc.canonize(str(path)).graph.node}
    xt = x.clone().requires_grad_(True)
    y = net(xt)
    k = y.argmax(1)
    y.gather(1, k[:, None]).sum().backward()
    seed = np.zeros(tuple(y.shape), np.float32)
    seed[np.arange(2), k.numpy()] = y.detach().numpy()[np.arange(2), k.numpy()]
    got = run_onnx(lrpc.compile(str(path), "epsilon", epsilon=0.0, stabilizer_eps=0.0),
                   {"input": x.numpy(), "relevance_seed": seed})
    np.testing.assert_allclose(got["logits"], y.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rel_l2(got["relevance"], (xt.grad * xt).detach().numpy()) < 1e-4

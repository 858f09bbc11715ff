"""Depthwise CNNs under z-plus lose relevance by the rule, not by lrpc; ``lrpc check`` accounts for it.

torchvision ShuffleNetV2 x0.5, MnasNet 0.5, MobileNetV3-small (weights=None, 64x64 inputs, BatchNorm statistics
calibrated on random inputs here, BN eps = 0 for zennit). With biases left out of the denominators (zennit's
``zero_params='bias'``, lrpc's ``--zero-bias``) and eps = 1e-12, epsilon-plus keeps 22% (ShuffleNet), 67%
(MnasNet), 92% (MobileNetV3) of the relevance. Oracles: zennit 0.5.1 on the same torch module (per-layer sums and
input relevance, 1e-4); the dense float64 z-plus rule on the first breaking layer, fed with that layer's input and
incoming relevance (1e-4, float32 run); the relevance lost there is the relevance arriving at the outputs whose
z⁺ = W⁺x⁺ + W⁻x⁻ is exactly 0 (a 2x2 map: 4 in-image taps of a 3x3 window, half of them 0 after the ReLU)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
import torchvision
from onnx import helper, numpy_helper
from torch import nn

import lrpc
from conftest import rel_l2
from lrpc.check import run_check
from lrpc.contract import layer_sums
from models import zoo
from oracles import Layer, conv_nd, rule_dense

EPS = 1e-12
SHAPE = (1, 3, 64, 64)
NETS = ("shufflenet_v2_x0_5", "mnasnet0_5", "mobilenet_v3_small")


@torch.no_grad()
def calibrated(name: str) -> nn.Module:
    """``name`` with random weights (seed 0), BatchNorm statistics measured on two random batches, BN eps = 0 (zennit
    keeps a BN's eps when it folds it; lrpc folds it exactly), eval mode, and a global average pool as a module
    (zennit gives it the norm rule, as lrpc does; ``x.mean()`` would pass its gradient)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn((2, *SHAPE[1:]), generator=g))
    for bn in bns:
        bn.running_var.clamp_(min=1e-3)
        bn.eps = 0.0
    model.eval()
    if isinstance(model, torchvision.models.ShuffleNetV2):
        model.gap = nn.AdaptiveAvgPool2d(1)
        model.forward = lambda x: model.fc(torch.flatten(model.gap(model.conv5(model.stage4(model.stage3(
            model.stage2(model.maxpool(model.conv1(x))))))), 1))
    elif isinstance(model, torchvision.models.MNASNet):
        model.gap = nn.AdaptiveAvgPool2d(1)
        model.forward = lambda x: model.classifier(torch.flatten(model.gap(model.layers(x)), 1))
    return model


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """name -> (torch model, exported ONNX path, input)."""
    root, cache = tmp_path_factory.mktemp("depthwise"), {}

    def get(name):
        if name not in cache:
            model = calibrated(name)
            cache[name] = (model, zoo.export(model, root / f"{name}.onnx", SHAPE),
                           torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)))
        return cache[name]

    return get


def _run(model: onnx.ModelProto, feeds: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _top1(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    n = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    logits = _run(model, {"input": x, "relevance_seed": np.zeros((1, n), np.float32)})["logits"]
    seed = np.zeros_like(logits)
    seed[0, logits.argmax()] = 1.0
    return seed


class _Marker(torch.autograd.Function):
    """Identity whose backward records the sum of the gradient (zennit's relevance) reaching it."""

    @staticmethod
    def forward(ctx, x, sums, key):
        ctx.sums, ctx.key = sums, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.sums[ctx.key] = ctx.sums.get(ctx.key, 0.0) + grad.double().sum().item()
        return grad, None, None


def _zennit(model: nn.Module, x: torch.Tensor, seed: np.ndarray):
    """(input relevance, Σ relevance each Conv/Linear sends down, in execution order) of zennit's EpsilonPlus with
    zero_params='bias' and eps 1e-12 (BatchNorm merged; MnasNet's residual adds as zennit Sum modules)."""
    from zennit import composites as zc
    from zennit.attribution import Gradient
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.layer import Sum

    def residual(name, module):
        if isinstance(module, torchvision.models.mnasnet._InvertedResidual) and module.apply_residual:
            return {"forward": lambda t: module.canonizer_sum(torch.stack([module.layers(t), t], dim=-1)),
                    "canonizer_sum": Sum()}
        return None

    sums, order = {}, []

    def mark(module, inputs):
        order.append(module) if module not in order else None
        return (_Marker.apply(inputs[0], sums, id(module)),)

    # (registered before zennit's hooks: each marker sees exactly what the layer's rule sends down)
    hooks = [m.register_forward_pre_hook(mark) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    composite = zc.EpsilonPlus(epsilon=EPS, stabilizer=EPS, zero_params=["bias"],
                               canonizers=[SequentialMergeBatchNorm(), AttributeCanonizer(residual)])
    try:
        with Gradient(model, composite) as attributor:
            _, relevance = attributor(x.clone().requires_grad_(True), torch.from_numpy(seed))
    finally:
        for h in hooks:
            h.remove()
    return relevance.detach().numpy(), [sums.get(id(m), 0.0) for m in order]


@pytest.mark.parametrize("name,kept", [("shufflenet_v2_x0_5", 0.5), ("mnasnet0_5", 0.8)])
def test_zplus_loss_is_zennits(nets, name, kept):
    """lrpc's epsilon-plus with zero biases equals zennit's, layer by layer and at the input (1e-4): the relevance
    z-plus loses on these nets (ShuffleNet 78%, MnasNet 33% here) is the rule's, and zennit loses the same."""
    model, path, x = nets(name)
    compiled = lrpc.compile(path, "epsilon-plus", zero_bias=True, epsilon=EPS, stabilizer_eps=EPS, layerwise="sums")
    seed = _top1(compiled, x.numpy())
    outs = _run(compiled, {"input": x.numpy(), "relevance_seed": seed})
    ref, ref_sums = _zennit(model, x, seed)
    rows = [(row, s_in) for row, s_in, _, _ in layer_sums(compiled, outs) if row["op"] in ("Conv", "Gemm")]
    assert len(rows) == len(ref_sums)
    for (row, s_in), want in zip(rows, ref_sums):
        assert abs(s_in - want) <= 1e-4 * max(abs(want), 1e-3), (row["name"], s_in, want)
    assert rel_l2(outs["relevance"], ref) <= 1e-4
    assert outs["relevance"].sum() < kept  # it does lose that much


def test_zplus_first_break_is_a_depthwise_conv_and_the_dense_rule(nets):
    """ShuffleNet: the first break from the output is a depthwise Conv; there, lrpc's relevance equals the dense
    float64 z-plus rule fed with the layer's own input and incoming relevance (1e-4), and what it loses is exactly
    the relevance arriving at its outputs with z⁺ = 0 (all at outputs whose plain Wx <= 0)."""
    _, path, x = nets("shufflenet_v2_x0_5")
    compiled = lrpc.compile(path, "epsilon-plus", zero_bias=True, epsilon=EPS, stabilizer_eps=EPS, layerwise="full")
    seed = _top1(compiled, x.numpy())
    table = layer_sums(compiled, _run(compiled, {"input": x.numpy(), "relevance_seed": seed}))
    layers = [row["name"] for row, *_ in table]
    first = next(row["name"] for row, _, _, ratio in reversed(table) if abs(ratio - 1) > 1e-3)
    g = compiled.graph
    node = next(n for n in g.node if n.name == first)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = numpy_helper.to_array(next(t for t in g.initializer if t.name == node.input[1])).astype(np.float64)
    assert attrs["group"] == w.shape[0] > 1 and w.shape[1] == 1  # depthwise
    consumer = layers[layers.index(first) + 1]  # (its output feeds only the next 1x1 conv, BN folded in)
    g.output.append(helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    outs = _run(compiled, {"input": x.numpy(), "relevance_seed": seed})
    xin = outs[node.input[0]].astype(np.float64)
    R = outs[f"relevance_in/{consumer}"].astype(np.float64)
    np.testing.assert_allclose(R.sum(), outs[f"relevance_sum_out/{first}"].sum(), rtol=1e-5)
    conv = lambda X, W: conv_nd(X, W, strides=attrs.get("strides"), pads=attrs.get("pads"), group=attrs["group"])
    M = Layer(conv, w, xin.shape[1:]).dense()
    want = rule_dense("zplus", M, np.zeros(M.shape[0]), xin.reshape(-1), R.reshape(-1), eps=EPS, zero_bias=True)
    got = outs[f"relevance_in/{first}"].reshape(-1)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    xv, r = xin.reshape(-1), R.reshape(-1)
    zplus = np.maximum(M, 0) @ np.maximum(xv, 0) + np.minimum(M, 0) @ np.minimum(xv, 0)
    dead = (zplus == 0) & (r != 0)
    assert dead.sum() >= 0.2 * r.size  # 136 of 384 outputs here
    np.testing.assert_allclose(r.sum() - got.sum(), r[dead].sum(), rtol=1e-4)
    assert np.all(M[dead] @ xv <= 0)
    assert np.all((M != 0).sum(1) == 4)  # a 2x2 map: every 3x3 window has 4 in-image taps


@pytest.mark.parametrize("name", NETS)
def test_check_accounts_for_what_the_rules_absorb(nets, name):
    """``lrpc check`` passes on these nets by default (epsilon-gamma-box, biases kept: they absorb, accounted); with
    epsilon-plus, zero biases and eps 1e-12 the relevance z-plus loses is all at zero denominators, as accounted
    layer by layer, and mostly at depthwise convolutions."""
    _, path, _ = nets(name)
    report = run_check(str(path), "epsilon-gamma-box", lrpc.Options(low=-3.0, high=3.0))
    assert report.passed, report.text()
    report = run_check(str(path), "epsilon-plus", lrpc.Options(zero_bias=True, epsilon=EPS, stabilizer_eps=EPS))
    assert report.passed, report.text()
    loss = 1.0 - report.layers[0]["sum_in"]  # (the first layer's input relevance is the model's)
    zero = sum(r["zero"] for r in report.layers)
    assert loss > 0.05 and abs(zero - loss) <= 1e-4
    assert sum(abs(r["bias"]) + abs(r["stabilizer"]) for r in report.layers) <= 1e-4
    onnx_model = onnx.load(str(path))
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in onnx_model.graph.node}
    depthwise = sum(r["zero"] for r in report.layers if groups.get(r["name"], 1) > 1)
    assert depthwise >= 0.85 * zero  # ShuffleNet 100%, MnasNet 90%, MobileNetV3 91% (the rest: narrow 1x1 convs)
    assert groups[max(report.layers, key=lambda r: r["zero"])["name"]] > 1

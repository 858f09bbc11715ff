"""Gated products ``y = x * g`` (squeeze-and-excitation blocks, hard sigmoids written as ``relu6(x + 3) / 6``): the
gate is an input-dependent scale of ``x``. (SiLU exported as ``x * sigmoid(x)`` is one activation of ``x``, not a
gated product: passes/activation_regions.py, tests/test_activations.py.) Oracle: the same network with the gate
frozen to its values for the batch (a Mul by a constant, which lrpc already explains) gives the same relevance, for
every composite and for a rule file that puts epsilon on the Mul; bias-free conservation holds; a product of two
non-gates (or two gates) is refused."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc

N, C, H = 2, 6, 6


def _network(gate_op: str = "Sigmoid", gate_first: bool = False, via_reshape: bool = False, freeze: dict | None = None,
             relu6: bool = False):
    """x -> Conv -> SiLU (h * Sigmoid(h)) -> SE (GAP, 1x1 Conv, Relu, 1x1 Conv, gate, Mul) -> Conv -> GAP -> Gemm.
    ``freeze``: {gate tensor name: values}: those gates become constants (the oracle network)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
    inits = {"w1": w(C, 4, 3, 3), "b1": (0.1 * rng.standard_normal(C)).astype(np.float32),
             "w2": w(3, C, 1, 1), "b2": (0.1 * rng.standard_normal(3)).astype(np.float32),
             "w3": w(C, 3, 1, 1), "b3": (0.1 * rng.standard_normal(C)).astype(np.float32),
             "w4": w(5, C, 3, 3), "w5": w(10, 5), "flat_shape": np.array([N, C, 1, 1], np.int64),
             "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    freeze = freeze or {}
    g = lambda name: name if name not in freeze else f"{name}_frozen"
    # the activation: SiLU (h * Sigmoid(h), a gated product itself) or ReLU6 (a Clip: the SE gate must win)
    act = ([helper.make_node("Clip", ["h", "zero", "six"], ["a"], name="relu6")] if relu6 else
           [helper.make_node("Sigmoid", ["h"], ["silu_gate"], name="silu_sigmoid"),
            helper.make_node("Mul", ["h", g("silu_gate")], ["a"], name="silu_mul")])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], name="conv1"), *act,
             helper.make_node("GlobalAveragePool", ["a"], ["p"], name="se_pool"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["f"], name="se_fc1"),
             helper.make_node("Relu", ["f"], ["r"], name="se_relu"),
             helper.make_node("Conv", ["r", "w3", "b3"], ["e"], name="se_fc2"),
             *([helper.make_node(gate_op, ["e"], ["se_gate0"], name="se_gate")] if gate_op != "relu6" else
               [helper.make_node("Add", ["e", "three"], ["e3"], name="se_add3"),  # hard sigmoid relu6(e + 3) / 6
                helper.make_node("Clip", ["e3", "zero", "six"], ["e6"], name="se_relu6"),
                helper.make_node("Div", ["e6", "six"], ["se_gate0"], name="se_div6")])]
    if via_reshape:  # the gate moved through layout ops before the product
        nodes += [helper.make_node("Flatten", ["se_gate0"], ["se_flat"], name="se_flatten"),
                  helper.make_node("Reshape", ["se_flat", "flat_shape"], ["se_gate1"], name="se_reshape")]
    gate = "se_gate1" if via_reshape else "se_gate0"
    pair = [g(gate), "a"] if gate_first else ["a", g(gate)]
    nodes += [helper.make_node("Mul", pair, ["s"], name="se_mul"),
              helper.make_node("Conv", ["s", "w4"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Relu", ["c"], ["cr"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["cr"], ["q"], name="pool"),
              helper.make_node("Flatten", ["q"], ["fl"], name="flatten"),
              helper.make_node("Gemm", ["fl", "w5"], ["y"], transB=1, name="fc")]
    for name, value in freeze.items():
        inits[f"{name}_frozen"] = value
    graph = helper.make_graph(nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, 4, H, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gate_values(model, x, names):
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"x": x})))


def _relevance(model, x, seed, rules, **options):
    compiled = lrpc.compile(model, rules, **options)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y", "relevance"], {"x": x, "relevance_seed": seed})


@pytest.mark.parametrize("gate_op, gate_first, via_reshape, relu6", [
    ("Sigmoid", False, False, False), ("HardSigmoid", True, False, False), ("Sigmoid", False, True, False),
    ("relu6", False, False, False), ("Sigmoid", False, False, True)],
    ids=["sigmoid", "hardsigmoid-first", "sigmoid-reshaped", "relu6-div6", "relu6-activation-times-sigmoid"])
@pytest.mark.parametrize("rules", ["epsilon-gamma-box", "epsilon", "epsilon-alpha2-beta1", "epsilon-plus-flat",
                                   "mul-epsilon", "mul-flat"])
def test_gated_product_equals_frozen_gate(gate_op, gate_first, via_reshape, relu6, rules, tmp_path):
    model = _network(gate_op, gate_first, via_reshape, relu6=relu6)
    x = np.random.default_rng(1).standard_normal((N, 4, H, H)).astype(np.float32)
    gate = "se_gate1" if via_reshape else "se_gate0"
    gates = [gate]  # (the SiLU is an activation of h in both networks, whatever rule the Mul gets)
    frozen = _network(gate_op, gate_first, via_reshape, freeze=_gate_values(model, x, gates), relu6=relu6)
    seed = np.eye(10, dtype=np.float32)[[3, 7]]
    options = {"low": -3.0, "high": 3.0} if rules == "epsilon-gamma-box" else {}
    if rules.startswith("mul-"):  # a rule file puts epsilon (large) or flat on every Mul: the gate is its scale
        rule = {"rule": "epsilon", "params": {"epsilon": 0.5}} if rules == "mul-epsilon" else {"rule": "flat"}
        spec = tmp_path / "rules.json"
        spec.write_text(json.dumps({"composite": "epsilon", "rules": [{"op": "Mul", **rule}]}))
        rules = str(spec)
        if rule["rule"] == "flat":  # flat on a gate whose batch is symbolic (the frozen one is a constant)
            model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    y, got = _relevance(model, x, seed, rules, **options)
    y_frozen, want = _relevance(frozen, x, seed, rules, **options)
    np.testing.assert_allclose(y, y_frozen, rtol=1e-6, atol=1e-7)
    assert np.abs(want).sum() > 0 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_gated_product_conserves_without_biases():
    model = _network()
    for t in model.graph.initializer:
        if t.name.startswith("b"):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    x = np.random.default_rng(2).standard_normal((N, 4, H, H)).astype(np.float32)
    seed = np.eye(10, dtype=np.float32)[[1, 2]]
    _, r = _relevance(model, x, seed, "epsilon", zero_bias=True, epsilon=1e-9, stabilizer_eps=1e-9)
    np.testing.assert_allclose(r.reshape(N, -1).sum(1, dtype=np.float64), [1.0, 1.0], rtol=1e-4)


@pytest.mark.parametrize("pair, gates", [(["h", "h2"], 0), (["silu_gate", "g2"], 2), (["h", "hc"], 0),
                                         (["h", "h6"], 0)],
                         ids=["relu", "two-gates", "clip-below-zero", "relu6-times-unbounded"])
def test_product_without_exactly_one_gate_is_refused(pair, gates, tmp_path, capsys):
    model = _network()
    g = model.graph
    # (the factors next to h are computed from s, not from h: a product of two functions of h is one activation)
    g.node.extend([helper.make_node("Relu", ["s"], ["h2"], name="relu_h"),
                   helper.make_node("Sigmoid", ["h2"], ["g2"], name="sig_h2"),
                   helper.make_node("Clip", ["s", "minus_one", "six"], ["hc"], name="clip_h"),  # min < 0: no gate
                   helper.make_node("Clip", ["s", "zero", "six"], ["h6"], name="relu6_h"),  # range [0, 6]: no gate
                   helper.make_node("Mul", pair, ["m"], name="odd_mul"),
                   helper.make_node("ReduceMean", ["m"], ["mm"], axes=[1, 2, 3], keepdims=0, name="odd_mean"),
                   helper.make_node("Unsqueeze", ["mm", "one"], ["mu"], name="odd_unsqueeze"),
                   helper.make_node("Add", ["y", "mu"], ["y2"], name="odd_add")])
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "one"),
                          numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one")])
    g.output[0].name = "y2"
    with pytest.raises(lrpc.UnsupportedError, match=rf"odd_mul.*Mul.*gated product.*{gates} operand"):
        lrpc.compile(model, "epsilon")
    # the command line: one line naming the node and op, exit code 2, no output written
    from lrpc import cli

    path, out = tmp_path / "odd.onnx", tmp_path / "odd.lrp.onnx"
    onnx.save(model, str(path))
    capsys.readouterr()
    assert cli.main(["compile", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrpc: error: ") and "'odd_mul' (Mul)" in err[0]
    assert f"{gates} operand(s) are gates" in err[0] and not out.exists()


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_split_attention_softmax_gate_real_export(exporter, tmp_path):
    """timm's SplitAttn (ResNeSt): a softmax over the radix axis, moved by Reshape/Transpose, weighs each branch
    (``x * attn``) before the branches are summed. It is a gate: LRP-0 equals gradient × input of the same torch
    module with the softmax output detached (float32, 1e-4 relative L2)."""
    torch = pytest.importorskip("torch")
    from timm.layers import SplitAttn

    from torch_fixtures import grad_x_input_top1
    pytest.importorskip("torch")
    from models.families import export
    from models.healthy import make_healthy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              SplitAttn(8, 8, radix=2, norm_layer=torch.nn.BatchNorm2d),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    x = torch.randn(1, 3, 8, 8)
    make_healthy(net, x)
    path = export(net, tmp_path / "split_attn.onnx", x.shape, exporter)
    model = onnx.load(str(path))
    assert "Softmax" in {n.op_type for n in model.graph.node}

    net[2].rsoftmax.register_forward_hook(lambda m, i, out: out.detach())
    _, seed, want = grad_x_input_top1(net, x)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["relevance"], {"input": x.numpy(), "relevance_seed": seed})[0]
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err <= 1e-4, f"relative L2 {err:.2e}"


@pytest.mark.parametrize("export", ["legacy17", "dynamo18"])
def test_relu_behind_a_gate_carries_no_relevance_below_zero(export, monkeypatch):
    """Conv -> ReLU -> squeeze-and-excitation (torchvision's, gate after the ReLU) -> Conv, as RegNetY and
    MobileNetV3's ReLU blocks have it: the gated product passes relevance only where the ReLU output is > 0, so the
    convolution before the ReLU gets the cheaper lowering of a layer whose relevance vanishes where z <= 0 (one
    adjoint, no sign test). Oracle: the same compile with the gated products left out of that static analysis."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torchvision.ops import SqueezeExcitation

    from conftest import rel_l2, run_onnx
    from lrpc import emit
    from test_activations import export as to_onnx

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
            self.se1, self.se2 = SqueezeExcitation(8, 4), SqueezeExcitation(8, 4)
            self.c3, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

        def forward(self, x):
            h = self.se2(torch.relu(self.c2(self.se1(torch.relu(self.c1(x))))))
            return self.fc(torch.relu(self.c3(h)).mean((2, 3)))

    x = torch.randn(2, 3, 8, 8)
    model = to_onnx(Net().eval(), x, export)
    feeds = {"input": x.numpy(), "relevance_seed": np.eye(5, dtype=np.float32)[[1, 3]]}

    def compiled():
        return lrpc.compile(model, "epsilon-gamma-box", low=-3.0, high=3.0)

    fast = compiled()
    monkeypatch.setattr(emit, "_gated", lambda node, t: False)
    slow = compiled()
    assert len(fast.graph.node) < len(slow.graph.node)  # (the analysis did take the gated products)
    got, want = (run_onnx(m, feeds, ["relevance"])["relevance"] for m in (fast, slow))
    assert rel_l2(got, want) <= 1e-5, rel_l2(got, want)

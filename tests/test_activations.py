"""Activations written as several element-wise ops are ONE activation of their input (passes/activation_regions.py):
the identity rule ``R_x = R_y`` (zennit and AttnLRP), not a gated product, and their inner ops (Erf, Pow, Tanh,
Softplus, Where, ...) need no rule of their own.

Oracles, for every form as torch 2.14.1 exports it (TorchScript and dynamo exporters, opsets 17, 18, 20):
(1) forward: the compiled graph's logits equal torch's (1e-5 relative max);
(2) LRP-0 (composite "epsilon", epsilon = stabilizer_eps = 0, seed one-hot x logit) = x * x.grad of the same torch
    network with each activation f(x) replaced by ``x * sg(f(x) / x)`` (the "detach" reference), 1e-4 relative L2;
(3) other composites: the same relevance as the network with each activation frozen to ``x * c``, c its
    f(x) / x for the batch (a Mul by a constant, whose rule is pass: identity), 1e-5 relative;
(4) structure: one region per activation, none for activations that are one ONNX op.
Squeeze-and-excitation gates stay gated products (tests/test_gates.py); torchvision's efficientnet_b0 and
mobilenet_v3_small (both exporters) meet (1) and (2) with their SE gates detached too."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
import torch.nn.functional as F
from torch import nn

import lrpc
from conftest import rel_l2, run_onnx
from lrpc.graph import is_const
from lrpc.passes import canonize

SQRT_2_PI = (2.0 / torch.pi) ** 0.5

# name: (the activation as written in torch, {export: an op the export must hold (the written-out form)})
FORMS = {
    "silu": (F.silu, {"legacy17": "Sigmoid", "dynamo18": "Sigmoid"}),
    "gelu_erf": (F.gelu, {"legacy17": "Erf", "legacy18": "Erf", "dynamo17": "Erf", "dynamo18": "Erf",
                          "dynamo20": "Gelu"}),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  {"legacy17": "Tanh", "legacy18": "Tanh", "dynamo17": "Pow", "dynamo18": "Pow", "dynamo20": "Gelu"}),
    "gelu_tanh_pow": (lambda x: 0.5 * x * (1 + torch.tanh(SQRT_2_PI * (x + 0.044715 * torch.pow(x, 3)))),
                      {"legacy17": "Pow", "dynamo18": "Pow"}),
    "mish": (F.mish, {"legacy17": "Softplus", "dynamo18": "Mish"}),
    "mish_written": (lambda x: x * torch.tanh(F.softplus(x)), {"legacy17": "Softplus", "dynamo18": "Where"}),
    "hardswish_relu6": (lambda x: x * F.relu6(x + 3) / 6, {"legacy17": "Clip", "dynamo18": "Clip"}),
    "hardswish_hardtanh": (lambda x: x * F.hardtanh(x + 3, 0, 6) / 6, {"legacy17": "Clip", "dynamo18": "Clip"}),
    "softplus": (F.softplus, {"legacy17": "Softplus", "dynamo18": "Where"}),
    "softplus_log_exp": (lambda x: torch.log(1 + torch.exp(x)), {"legacy17": "Exp", "dynamo18": "Log"}),
    "elu_where": (lambda x: torch.where(x > 0, x, torch.exp(x) - 1), {"legacy17": "Where", "dynamo18": "Exp"}),
    "selu": (F.selu, {"legacy17": "Selu", "dynamo18": "Selu"}),
    "relu_squared": (lambda x: x * F.relu(x), {"legacy17": "Relu", "dynamo18": "Relu"}),
    "sine": (torch.sin, {"legacy17": "Sin"}),  # (SIREN; one op, but one lrpc has no rule of its own for)
}
ONE_OP = {("gelu_erf", "dynamo20"), ("gelu_tanh", "dynamo20"), ("mish", "dynamo18"), ("softplus", "legacy17"),
          ("selu", "legacy17"), ("selu", "dynamo18")}  # exported as one ONNX op (an activation already): no region
CASES = [(form, export) for form, (_, exports) in FORMS.items() for export in exports]


def detached(f):
    """``x * sg(f(x) / x)``: the forward of f, the gradient of the identity rule (0/0 := 0: x = 0 gets none)."""
    def g(x):
        safe = torch.where(x == 0, torch.ones_like(x), x)
        return x * torch.where(x == 0, torch.zeros_like(x), f(x) / safe).detach()
    return g


class Net(nn.Module):
    """Conv -> activation -> strided Conv -> activation -> mean over H, W -> Linear (random biases)."""

    def __init__(self, act):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2), nn.Linear(6, 5)
        self.act = act

    def forward(self, x):
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))


def export(net: nn.Module, x: torch.Tensor, export: str) -> onnx.ModelProto:
    """``export``: "legacy17", "dynamo18", ...: the exporter and the opset."""
    dynamo, opset = export.startswith("dynamo"), int(export[-2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(net, (x,), dynamo=True, opset_version=opset, verbose=False,
                                     input_names=["input"]).model_proto
        buf = io.BytesIO()
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())


def lrp0_and_oracle(net, model, x: np.ndarray, twin):
    """LRP-0 relevance (seed one-hot x logit at each sample's top class), x * x.grad of ``twin`` for the same
    classes, and the compiled graph's logits with torch's."""
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    name = model.graph.input[0].name
    logits = net(torch.from_numpy(x)).detach().numpy()
    top = logits.argmax(1)
    seed = np.zeros_like(logits)
    seed[np.arange(len(x)), top] = logits[np.arange(len(x)), top]
    out = run_onnx(compiled, {name: x, "relevance_seed": seed})
    xt = torch.from_numpy(x).requires_grad_(True)
    twin(xt)[torch.arange(len(x)), torch.from_numpy(top)].sum().backward()
    return out["relevance"], (xt * xt.grad).detach().numpy(), out[model.graph.output[0].name], logits


def _net(form: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(FORMS[form][0]).eval()
    if FORMS[form][0](torch.zeros(1)).item() != 0:
        # f(0) != 0 (softplus): LRP-0 divides f(z) by z, so float32 round-off of a z near 0 is amplified (in any
        # implementation: the oracle's too). Shifted biases keep the pre-activations away from 0.
        with torch.no_grad():
            net.c1.bias += 2.0
            net.c2.bias += 2.0
    return net


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)).numpy()


@pytest.mark.parametrize("form, how", CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_activation_is_identity(form, how):
    net = _net(form)
    model = export(net, torch.from_numpy(X), how)
    ops = {n.op_type for n in model.graph.node}
    assert FORMS[form][1][how] in ops  # the form this case is about
    regions = canonize(model).activations
    assert len(regions) == (0 if (form, how) in ONE_OP else 2)
    twin = Net(detached(FORMS[form][0])).eval()
    twin.load_state_dict(net.state_dict())
    got, want, y, logits = lrp0_and_oracle(net, model, X, twin)
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert np.abs(want).sum() > 0 and rel_l2(got, want) < 1e-4


class Frozen(Net):
    """:class:`Net` with each activation ``x * c``, c a constant (exported as a Mul by an initializer)."""

    def __init__(self, c1: torch.Tensor, c2: torch.Tensor):
        super().__init__(None)
        self.register_buffer("k1", c1)
        self.register_buffer("k2", c2)

    def forward(self, x):
        return self.fc((self.c2(self.c1(x) * self.k1) * self.k2).mean((2, 3)))


@pytest.mark.parametrize("composite", ["epsilon-gamma-box", "epsilon-plus", "epsilon-alpha2-beta1"])
@pytest.mark.parametrize("form, how", [("gelu_erf", "legacy17"), ("gelu_tanh", "dynamo18"),
                                       ("hardswish_relu6", "legacy17"), ("mish_written", "dynamo18")])
def test_activation_explains_like_frozen_ratio(form, how, composite):
    net = _net(form, seed=4)
    xt = torch.from_numpy(X)
    with torch.no_grad():  # each activation's f(x) / x for this batch
        h1 = net.c1(xt)
        h2 = net.c2(net.act(h1))
    frozen = Frozen(net.act(h1) / h1, net.act(h2) / h2).eval()
    frozen.load_state_dict(net.state_dict(), strict=False)
    options = {"low": -3.0, "high": 3.0} if composite == "epsilon-gamma-box" else {}
    out = {}
    seed = np.eye(5, dtype=np.float32)[[1, 3]]
    for key, m in (("model", net), ("frozen", frozen)):
        compiled = lrpc.compile(export(m, xt, how), composite, **options)
        out[key] = run_onnx(compiled, {"input": X, "relevance_seed": seed})
    got, want = out["model"]["relevance"], out["frozen"]["relevance"]
    assert np.abs(want).sum() > 0 and np.all(np.isfinite(got))
    assert rel_l2(got, want) < 1e-5


def test_region_spans_the_activation_only():
    """GELU (legacy: Div, Erf, Add, Mul(x, .), Mul(., 0.5)): the region is x -> the merge Mul; the trailing Mul by
    0.5 and a bias Add before the activation keep their own rules (category scale)."""
    class BiasGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Parameter(torch.randn(4, 1, 1)), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            h = torch.cat([h, h], 1)[:, :4] + self.b  # (the bias cannot fold into the conv)
            return self.fc(F.gelu(h).mean((2, 3)))

    torch.manual_seed(0)
    model = export(BiasGelu().eval(), torch.from_numpy(X), "legacy17")
    canon = canonize(model)
    [(head, x)] = canon.activations.items()
    nodes = {n.name: n for n in canon.graph.nodes}
    assert nodes[head].op == "Mul" and not any(is_const(t) for t in nodes[head].inputs)
    assert nodes[head].outputs[0].outputs[0].op == "Mul"  # the trailing 0.5
    assert x == next(n for n in canon.graph.nodes if n.op == "Add").outputs[0].name  # after the bias Add
    rules = json.loads({p.key: p.value for p in lrpc.compile(model, "epsilon").metadata_props}["lrpc.rules"])
    assert head not in rules and sum(r == "pass" for r in rules.values()) == 2  # bias Add, trailing Mul


def test_intermediate_read_elsewhere_is_no_region():
    """``h * relu(h)`` whose relu(h) is also read by another layer is not one activation: the product of two
    computed tensors without a gate is refused, naming the node."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(x)
            r = F.relu(h)
            return self.fc(torch.cat([(h * r).mean((2, 3)), r.mean((2, 3))], 1))

    model = export(Odd().eval(), torch.from_numpy(X), "legacy17")
    assert canonize(model).activations == {}
    with pytest.raises(lrpc.UnsupportedError, match=r"'/Mul' \(Mul\): Mul of two computed tensors .* 0 operand"):
        lrpc.compile(model, "epsilon")


def test_two_activations_in_a_row_are_one():
    """silu(silu(x)) is one activation of x (one region each time it is applied; relevance as the detach oracle
    with either SiLU detached, the same); where the inner SiLU's output is also read elsewhere, two regions."""
    net = _net("silu")
    net.act = lambda x: F.silu(F.silu(x))
    model = export(net, torch.from_numpy(X), "legacy17")
    canon = canonize(model)
    assert len(canon.activations) == 2 and set(canon.activations.values()) == {
        n.outputs[0].name for n in canon.graph.nodes if n.name in ("/c1/Conv", "/c2/Conv")}
    twin = Net(lambda x: detached(F.silu)(detached(F.silu)(x))).eval()
    twin.load_state_dict(net.state_dict())
    got, want, _, _ = lrp0_and_oracle(net, model, X, twin)
    assert rel_l2(got, want) < 1e-4

    class Twice(nn.Module):  # the inner SiLU's output read by the head too
        def __init__(self, f):
            super().__init__()
            self.conv, self.fc, self.f = nn.Conv2d(3, 4, 3), nn.Linear(8, 2), f

        def forward(self, x):
            s = self.f(self.conv(x))
            return self.fc(torch.cat([self.f(s).mean((2, 3)), s.mean((2, 3))], 1))

    torch.manual_seed(2)
    net, twin = Twice(F.silu).eval(), Twice(detached(F.silu)).eval()
    twin.load_state_dict(net.state_dict())
    model = export(net, torch.from_numpy(X), "legacy17")
    assert len(canonize(model).activations) == 2
    got, want, _, _ = lrp0_and_oracle(net, model, X, twin)
    assert rel_l2(got, want) < 1e-4


# ------------------------------------------------------------------------------------------------ torchvision

def _torchvision_detached(model: nn.Module) -> nn.Module:
    """The detach reference of a torchvision model: SiLU / Hardswish as ``x * sg(f(x) / x)``, SE blocks as
    ``x * sg(scale(x))`` (the gate gets no relevance)."""
    from torchvision.ops.misc import SqueezeExcitation

    for m in model.modules():
        if isinstance(m, SqueezeExcitation):
            m.forward = (lambda se: (lambda x: x * se._scale(x).detach()))(m)
        elif isinstance(m, (nn.SiLU, nn.Hardswish)):  # (not in place: the ratio needs x)
            m.forward = detached(F.silu if isinstance(m, nn.SiLU) else F.hardswish)
    return model


@pytest.mark.parametrize("how", ["legacy17", "dynamo18"])
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
def test_torchvision_gated_models(name, how):
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).numpy()
    model = export(net, torch.from_numpy(x), how)
    twin = _torchvision_detached(getattr(torchvision.models, name)(weights=None).eval())
    twin.load_state_dict(net.state_dict())
    got, want, y, logits = lrp0_and_oracle(net, model, x, twin)
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert np.abs(want).sum() > 0 and rel_l2(got, want) < 1e-4


# ------------------------------------------------------------------------------------------------ per-sample gates

class ScalarGate(nn.Module):
    """Conv -> ReLU -> h * g(h), g one value per sample ([N, 1, 1, 1], or [N, 1] on flattened features) computed
    from h by reductions / linear layers, squashed or not -> Conv -> ReLU -> mean -> Linear."""

    def __init__(self, kind: str, detach: bool = False):
        super().__init__()
        self.kind, self.detach = kind, detach
        self.c1, self.c2, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3), nn.Linear(4, 5)
        self.fc1, self.fc6 = nn.Linear(1, 1), nn.Linear(6, 1)
        self.flat = nn.Linear(96, 5)

    def gate(self, h):
        if self.kind == "mean-linear-sigmoid":
            return torch.sigmoid(self.fc1(h.mean((1, 2, 3)).unsqueeze(1))).view(-1, 1, 1, 1)
        if self.kind == "pool-linear-hardsigmoid":
            return F.hardsigmoid(self.fc6(h.mean((2, 3)))).view(-1, 1, 1, 1)
        if self.kind == "sum-sigmoid":
            return torch.sigmoid(h.sum((1, 2, 3), keepdim=True) * 0.01)
        return h.mean((1, 2, 3), keepdim=True)  # "mean": no squashing gate

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.kind == "flat-linear-sigmoid":  # [N, 96] * [N, 1]
            f = h[:, :, ::2, ::2].flatten(1)
            g = torch.sigmoid(self.fc6(f[:, :6]))
            return self.flat(f * (g.detach() if self.detach else g))
        g = self.gate(h)
        h = h * (g.detach() if self.detach else g)
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("how", ["legacy17", "dynamo18"])
@pytest.mark.parametrize("kind", ["mean-linear-sigmoid", "pool-linear-hardsigmoid", "sum-sigmoid",
                                  "flat-linear-sigmoid"])
def test_per_sample_scalar_gate(kind, how):
    """The gate branch gets no relevance (as a squeeze-and-excitation gate): LRP-0 = x * x.grad with sg(gate)."""
    torch.manual_seed(0)
    net, twin = ScalarGate(kind).eval(), ScalarGate(kind, detach=True).eval()
    twin.load_state_dict(net.state_dict())
    model = export(net, torch.from_numpy(X), how)
    got, want, y, logits = lrp0_and_oracle(net, model, X, twin)
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert np.abs(want).sum() > 0 and rel_l2(got, want) < 1e-4


@pytest.mark.parametrize("how", ["legacy17", "dynamo18"])
def test_per_sample_scalar_without_gate_refused(how):
    model = export(ScalarGate("mean").eval(), torch.from_numpy(X), how)
    with pytest.raises(lrpc.UnsupportedError, match=r"\(Mul\): Mul of two computed tensors has an LRP rule only as a "
                                                    r"gated product .* 0 operand\(s\) are gates") as e:
        lrpc.compile(model, "epsilon")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the pass's guards

def _hand_built(nodes, inits, outputs, x_shape=("batch", 2, 3, 3)):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pass_guards():
    from onnx import helper

    from lrpc.passes import activation_regions

    mk = helper.make_node
    silu = [mk("Sigmoid", ["x"], ["s"], name="sig"), mk("Mul", ["x", "s"], ["y"], name="mul")]
    # a SiLU of x: one region, and a second run changes nothing
    canon = canonize(_hand_built(silu, {}, ["y"]))
    assert canon.activations == {"mul": "x"} and not activation_regions.run(canon)
    # its sigmoid also a graph output: no region (the Mul is a gated product again)
    assert canonize(_hand_built(silu, {}, ["y", "s"])).activations == {}
    # a constant that widens the tensor (x [N, 1, 3, 3] + c [1, 2, 1, 1]): the product is of differently shaped
    # tensors, no element-wise function of x; the Sigmoid is a gate
    wide = [mk("Add", ["x", "c"], ["a"], name="add"), mk("Sigmoid", ["a"], ["s"], name="sig"),
            mk("Mul", ["x", "s"], ["y"], name="mul")]
    model = _hand_built(wide, {"c": np.ones((1, 2, 1, 1))}, ["y"], x_shape=("batch", 1, 3, 3))
    assert canonize(model).activations == {}
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    seed = np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32)
    r = run_onnx(lrpc.compile(model, "epsilon"), {"x": x, "relevance_seed": seed})["relevance"]
    np.testing.assert_allclose(r, seed.sum(1, keepdims=True), rtol=1e-6)  # the gated product's pass rule
    # x * x: one region (an element-wise function of x); x * x from two different tensors: none
    square = [mk("Mul", ["x", "x"], ["y"], name="sq")]
    assert canonize(_hand_built(square, {}, ["y"])).activations == {"sq": "x"}
    two = [mk("Relu", ["x"], ["r"], name="relu"), mk("Neg", ["x"], ["n"], name="neg"),
           mk("MaxPool", ["n"], ["p"], kernel_shape=[1, 1], name="pool"), mk("Mul", ["r", "p"], ["y"], name="mul")]
    assert canonize(_hand_built(two, {}, ["y"])).activations == {"neg": "x"}
    # a NaN guard (Llama exports Where(IsNaN(p), 0, p) after the Softmax): the identity
    guard = [mk("IsNaN", ["x"], ["nan"], name="isnan"), mk("Where", ["nan", "zero", "x"], ["y"], name="where")]
    model = _hand_built(guard, {"zero": 0.0}, ["y"])
    assert canonize(model).activations == {"where": "x"}
    x = np.random.default_rng(2).standard_normal((2, 2, 3, 3)).astype(np.float32)
    seed = np.random.default_rng(3).standard_normal((2, 2, 3, 3)).astype(np.float32)
    got = run_onnx(lrpc.compile(model, "epsilon"), {"x": x, "relevance_seed": seed})["relevance"]
    np.testing.assert_array_equal(got, seed)


def test_relevance_through_a_region_is_seen_by_the_sign_analysis(monkeypatch):
    """A ReLU output ``t`` read by a Conv and by an activation region ``exp(t)·sigmoid(t)`` (0.5 at t = 0): relevance
    reaches ``t`` where it is 0 through the region, so ``t`` (and the Conv output behind it) must not count as
    carrying no relevance where ``t <= 0``. Oracle: the same compile with that static analysis switched off."""
    from onnx import helper, numpy_helper

    from lrpc import emit

    rng = np.random.default_rng(0)

    def w(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    inits = {"W0": w(4, 3, 3, 3), "W1": w(4, 4, 3, 3), "b1": (0.3 * rng.standard_normal(4)).astype(np.float32),
             "Wa": w(4, 4, 3, 3), "Wb": w(4, 4, 3, 3), "Wf": w(5, 4)}
    N = helper.make_node
    nodes = [N("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1] * 4), N("Relu", ["c0"], ["r0"], name="relu0"),
             N("Conv", ["r0", "W1", "b1"], ["z"], name="conv1", pads=[1] * 4), N("Relu", ["z"], ["t"], name="relu1"),
             N("Conv", ["t", "Wa"], ["a"], name="conva", pads=[1] * 4),
             N("Exp", ["t"], ["e"], name="exp"), N("Sigmoid", ["t"], ["s"], name="sig"),
             N("Mul", ["e", "s"], ["y"], name="act"), N("Conv", ["y", "Wb"], ["bb"], name="convb", pads=[1] * 4),
             N("Add", ["a", "bb"], ["m"], name="merge"), N("GlobalAveragePool", ["m"], ["p"], name="gap"),
             N("Flatten", ["p"], ["f"], name="flat"), N("Gemm", ["f", "Wf"], ["o"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("o", 1, [1, 5])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32),
             "relevance_seed": np.eye(5, dtype=np.float32)[[1]]}

    def relevance():
        return run_onnx(lrpc.compile(model, "epsilon-gamma-box", low=-3.0, high=3.0), feeds, ["relevance"])["relevance"]

    got = relevance()
    monkeypatch.setattr(emit, "_quiet_below_zero", lambda *a: set())
    want = relevance()
    assert rel_l2(got, want) <= 1e-6, rel_l2(got, want)


def test_custom_domain_op_is_never_a_standard_one():
    """A node of another domain is not explained by the propagator of a standard op of the same type (nor by lrpc's
    own activation rule): one error naming it with its domain."""
    from onnx import helper, numpy_helper

    w = np.ones((3, 4), np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="mystery", domain="com.example"),
             helper.make_node("Gemm", ["h", "W"], ["o"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 4])],
                          [helper.make_tensor_value_info("o", 1, [2, 3])], [numpy_helper.from_array(w, "W")],
                          value_info=[helper.make_tensor_value_info("h", 1, [2, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                              ir_version=8)
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.compile(model, "epsilon")
    assert str(e.value) == "no relevance propagator for node 'mystery' (com.example::Relu)"


@pytest.mark.parametrize("op, alone", [("Erf", True), ("Tanh", True), ("Cos", True), ("Sign", False), ("Abs", False),
                                       ("Reciprocal", False)])
def test_lone_ops_that_are_no_activation_are_refused(op, alone):
    """A chain of element-wise ops without a merge is one activation (identity) when its ops are activation pieces
    (erf, tanh, cos as in SIREN); sign, |x| and 1/x alone are no activation lrpc has a rule for: refused."""
    nodes = [helper_node("Conv", ["x", "w"], ["c"], "conv", pads=[1, 1, 1, 1]),
             helper_node(op, ["c"], ["a"], "act"), helper_node("GlobalAveragePool", ["a"], ["p"], "gap"),
             helper_node("Flatten", ["p"], ["f"], "flat"), helper_node("Gemm", ["f", "fc"], ["y"], "fc", transB=1)]
    rng = np.random.default_rng(0)
    model = _hand_built(nodes, {"w": rng.standard_normal((4, 2, 3, 3)), "fc": rng.standard_normal((3, 4))}, ["y"])
    if alone:
        x = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
        r = run_onnx(lrpc.compile(model, "epsilon"), {"x": x, "relevance_seed": np.eye(3, dtype=np.float32)[[0, 1]]})
        assert np.isfinite(r["relevance"]).all() and np.abs(r["relevance"]).sum() > 0
    else:
        with pytest.raises(lrpc.UnsupportedError, match=f"node 'act' \\({op}\\)"):
            lrpc.compile(model, "epsilon")


def helper_node(op, ins, outs, name, **attrs):
    return onnx.helper.make_node(op, ins, outs, name=name, **attrs)


@pytest.mark.parametrize("export_as", ["legacy17", "dynamo18"])
def test_relu6_carries_no_relevance_below_zero(export_as, monkeypatch):
    """MobileNetV2's Conv -> ReLU6 -> Conv (a Clip with lower bound 0): where the Clip's input is <= 0 its output is 0
    and gets no relevance, so the convolution before it takes the lowering of a layer whose relevance vanishes
    where z <= 0, as behind a ReLU. Oracle: the same compile with Clip left out of that static analysis. A Clip
    with a positive lower bound (its output > 0 where the input is <= 0) is not taken."""
    from lrpc import emit

    class Net(nn.Module):
        def __init__(self, low):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.c3, self.fc, self.low = nn.Conv2d(8, 8, 1), nn.Linear(8, 5), low

        def forward(self, x):
            h = torch.clamp(self.c2(torch.clamp(self.c1(x), self.low, 6.0)), self.low, 6.0)
            return self.fc(self.c3(h).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    feeds = {"input": x.numpy(), "relevance_seed": np.eye(5, dtype=np.float32)[[1, 3]]}
    for low, taken in ((0.0, True), (0.5, False)):
        model = export(Net(low).eval(), x, export_as)

        def compiled():
            return lrpc.compile(model, "epsilon-gamma-box", low=-3.0, high=3.0)

        with monkeypatch.context() as m:
            fast = compiled()
            m.setattr(emit, "_clips_at_zero", lambda node: False)
            slow = compiled()
        assert (len(fast.graph.node) < len(slow.graph.node)) == taken, low
        got, want = (run_onnx(c, feeds, ["relevance"])["relevance"] for c in (fast, slow))
        assert rel_l2(got, want) <= 1e-5, (low, rel_l2(got, want))

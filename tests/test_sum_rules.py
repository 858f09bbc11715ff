"""Residual sums: the sign-norm rule (``--sum-rule sign-norm``) and chains of Adds merged into one Sum.

sign-norm splits each output's relevance among the branches of its sign: ``R_i = x_i⁺ R / Σ x_k⁺`` where the sum
z > 0, ``R_i = x_i⁻ R / Σ x_k⁻`` where z < 0 (constant operands take their part of the denominator: biases).
Oracles: the formula in float64 numpy on small Sums run with onnx.reference (1e-8), exact conservation with eps = 0,
the norm rule where every branch is >= 0, and on timm's RepVGG-A0 (three-branch pre-activation sums) the relevance
magnitude and lrpc check's accounted conservation."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import lrpc
from lrpc.check import run_check
from lrpc.contract import layer_sums
from lrpc.errors import InputError
from models import zoo

SHAPE = [2, 3, 4, 5]


def _sum_model(n: int, bias: np.ndarray | None, behind_relu: bool, relu_branches: bool = False) -> onnx.ModelProto:
    """Sum of graph inputs b0..b{n-1} (Relu'd if ``relu_branches``) and a constant ``B``; ``behind_relu``: then
    Relu and a 1x1 Conv (its relevance reaches the sum only where z > 0), else the sum is the output."""
    ins = [f"b{i}" for i in range(n)]
    nodes, branches = [], ins
    if relu_branches:
        nodes += [helper.make_node("Relu", [b], [f"r{b}"], name=f"relu_{b}") for b in ins]
        branches = [f"r{b}" for b in ins]
    inits = []
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        branches = branches + ["B"]
    nodes.append(helper.make_node("Sum", branches, ["s" if behind_relu else "y"], name="sum"))
    if behind_relu:
        w = np.random.default_rng(9).normal(size=(4, SHAPE[1], 1, 1))
        inits.append(numpy_helper.from_array(w, "W"))
        nodes += [helper.make_node("Relu", ["s"], ["h"], name="relu"),
                  helper.make_node("Conv", ["h", "W"], ["y"], name="conv")]
    out = [SHAPE[0], 4, *SHAPE[2:]] if behind_relu else SHAPE
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.DOUBLE, SHAPE) for i in ins],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, out)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds) -> dict:
    return dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feeds)))


def _sign_norm(parts: list, R: np.ndarray) -> list:
    """The formula: shares of each part (branches and constants alike)."""
    z = sum(parts)
    p, n = sum(np.maximum(x, 0) for x in parts), sum(np.minimum(x, 0) for x in parts)
    cp = np.where(z > 0, R / np.where(p == 0, 1, p), 0)
    cn = np.where(z < 0, R / np.where(n == 0, 1, n), 0)
    return [np.maximum(x, 0) * cp + np.minimum(x, 0) * cn for x in parts]


@pytest.mark.parametrize("behind_relu", [False, True], ids=["output", "behind_relu"])
def test_sign_norm_sum_against_the_formula(behind_relu):
    """Three branches of both signs and a constant of both signs, float64, eps = 0: each branch's relevance is the
    formula's (1e-8); the shares and the constant's add up to R exactly; each share has R's sign and at most its
    size. Behind a ReLU (R = 0 where z <= 0) the negative group is left out of the graph."""
    rng = np.random.default_rng(0)
    B = rng.normal(size=(1, SHAPE[1], 1, 1)) * 0.5
    model = _sum_model(3, B, behind_relu)
    compiled = lrpc.compile(model, "epsilon", stabilizer_eps=0.0, sum_rule="sign-norm", layerwise="full")
    x = [rng.normal(size=SHAPE) for _ in range(3)]
    seed = rng.normal(size=[SHAPE[0], 4, *SHAPE[2:]] if behind_relu else SHAPE)
    out = _run(compiled, {**{f"b{i}": v for i, v in enumerate(x)}, "relevance_seed": seed})
    R = out["relevance_in/conv"] if behind_relu else seed  # what reaches the sum (the ReLU passes it)
    want = _sign_norm(x + [np.broadcast_to(B, SHAPE)], R)
    for i in range(3):
        np.testing.assert_allclose(out[f"relevance_b{i}"], want[i], rtol=1e-8, atol=1e-12)
        assert np.all(out[f"relevance_b{i}"] * R >= 0) and np.all(np.abs(out[f"relevance_b{i}"]) <= np.abs(R) + 1e-12)
    per = lambda t: t.reshape(len(t), -1).sum(1)
    np.testing.assert_allclose(sum(per(out[f"relevance_b{i}"]) for i in range(3)) + out["relevance_sum_bias/sum"],
                               per(R), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["relevance_sum_bias/sum"], per(want[3]), rtol=1e-8, atol=1e-12)
    plain = lrpc.compile(model, "epsilon", stabilizer_eps=0.0, sum_rule="sign-norm")
    z = next(n.output[0] for n in plain.graph.node if n.name == "sum")  # (the negative group's test reads the sum)
    assert sum(n.op_type == "Less" and z in n.input for n in plain.graph.node) == (0 if behind_relu else 1)


def test_sign_norm_is_norm_on_non_negative_branches():
    """Where every branch is >= 0 (ReLU outputs) and no constant, sign-norm gives the norm rule's relevance."""
    rng = np.random.default_rng(1)
    model = _sum_model(3, None, False, relu_branches=True)
    feeds = {**{f"b{i}": rng.normal(size=SHAPE) for i in range(3)}, "relevance_seed": rng.normal(size=SHAPE)}
    a = _run(lrpc.compile(model, "epsilon", sum_rule="sign-norm"), feeds)
    b = _run(lrpc.compile(model, "epsilon"), feeds)
    for i in range(3):
        np.testing.assert_allclose(a[f"relevance_b{i}"], b[f"relevance_b{i}"], rtol=1e-12, atol=1e-15)


class _Three(nn.Module):
    """RepVGG's merge as torch writes it: conv3x3(x) + conv1x1(x) + bn(x), then a ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.a(x) + self.b(x) + self.bn(x)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_chained_adds_become_one_sum(dynamo, tmp_path):
    """``a + b + c`` (two Adds in both exporters' graphs) is canonized to one three-input Sum: same forward
    (1e-6), the norm rule's relevance as with two Sums (1e-5: the same split, for outputs away from 0), and
    sign-norm splits by the signs of the three branches, not of the partial sum a + b (float32, 1e-4)."""
    import lrpc.passes.residual_sum as residual_sum

    torch.manual_seed(0)
    model = zoo.randomize(_Three(), (1, 3, 6, 6))
    path = zoo.export(model, tmp_path / "three.onnx", (1, 3, 6, 6), dynamo=dynamo)
    canon = lrpc.canonize(str(path))
    sums = [n for n in canon.graph.node if n.op_type == "Sum"]
    assert len(sums) == 1 and len(sums[0].input) == 3
    x = np.random.default_rng(2).normal(size=(1, 3, 6, 6)).astype(np.float32)
    seed = np.random.default_rng(3).normal(size=(1, 2, 6, 6)).astype(np.float32)
    import onnxruntime as ort

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input": x, "relevance_seed": seed})))

    merged = run(lrpc.compile(str(path), "epsilon", layerwise="full"))
    with torch.no_grad():
        np.testing.assert_allclose(merged["logits"], model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    pairwise = residual_sum._merge_chains
    try:
        residual_sum._merge_chains = lambda canon: False
        two = run(lrpc.compile(str(path), "epsilon"))
    finally:
        residual_sum._merge_chains = pairwise
    assert np.linalg.norm(merged["relevance"] - two["relevance"]) <= 1e-5 * np.linalg.norm(two["relevance"])

    compiled = lrpc.compile(str(path), "epsilon", sum_rule="sign-norm", layerwise="full")
    node = next(n for n in compiled.graph.node if n.op_type == "Sum" and not n.name.startswith("lrp"))
    compiled.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
    out = run(compiled)
    with torch.no_grad():
        t = torch.from_numpy(x)
        parts = [model.a(t).numpy(), model.b(t).numpy(), model.bn(t).numpy()]
    relu = next(n for n in compiled.graph.node if n.op_type == "Relu" and not n.name.startswith("lrp"))
    conv = next(n.name for n in compiled.graph.node if n.op_type == "Conv" and relu.output[0] in n.input)
    R = out[f"relevance_in/{conv}"]
    shares = _sign_norm([p.astype(np.float64) for p in parts], R.astype(np.float64))
    got = out[f"relevance_in/{node.name}"]  # the share of the sum's first input: which branch is it?
    first = next(i for i, p in enumerate(parts) if np.allclose(p, out[node.input[0]], rtol=1e-5, atol=1e-6))
    assert np.abs(got - shares[first]).max() <= 1e-4 * np.abs(shares[first]).max()


def test_sum_rule_option_and_rule_file(tmp_path):
    """--sum-rule / Options.sum_rule and a rule file's category "sum" pick sign-norm for every residual sum, over
    the composite's own (norm, or attnlrp's epsilon); a sum rule that does not apply to sums is an input error."""
    model = _sum_model(2, None, True)

    def sum_rule(compiled) -> str:
        return json.loads({p.key: p.value for p in compiled.metadata_props}["lrpc.rules"])["sum"]

    for compiled in (lrpc.compile(model, "epsilon-plus", sum_rule="sign-norm"),
                     lrpc.compile(model, "attnlrp", sum_rule="sign-norm"),
                     lrpc.compile(model, _rule_file(tmp_path, {"category": "sum", "rule": "sign-norm"}))):
        assert sum_rule(compiled) == "sign-norm"
    assert sum_rule(lrpc.compile(model, "epsilon-plus")) == "norm"
    assert sum_rule(lrpc.compile(model, "attnlrp")).startswith("epsilon")
    assert sum_rule(lrpc.compile(model, "attnlrp", sum_rule="norm")) == "norm"
    with pytest.raises(InputError, match="sum_rule must be one of epsilon, norm, sign-norm"):
        lrpc.compile(model, "epsilon-plus", sum_rule="zplus")


def _rule_file(tmp_path, entry) -> str:
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon-plus", "rules": [entry]}))
    return str(spec)


@torch.no_grad()
def _repvgg(tmp_path):
    """timm repvgg_a0 (pretrained=False, 10 classes), BatchNorm statistics calibrated on two random batches."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        model(torch.randn((2, 3, 64, 64), generator=g))
    model.eval()
    return zoo.export(model, tmp_path / "repvgg_a0.onnx", (1, 3, 64, 64))


def test_repvgg_sign_norm_is_bounded_and_conserves(tmp_path):
    """RepVGG-A0 (22 sums, 19 of three branches) under epsilon-gamma-box: with the norm rule Σ|R| at the input is
    ~10⁷ × |Σ seed| (the identity BatchNorm's pass rule hands relevance to zero activations, which reaches sums
    with z <= 0; norm divides by them) and lrpc check fails; with sign-norm it is below 1, every sum sends down
    exactly what arrives (1e-5), and check passes (what is absorbed is the biases')."""
    path = _repvgg(tmp_path)
    x = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(1234)).numpy()
    sizes = {}
    for rule in ("norm", "sign-norm"):
        compiled = lrpc.compile(str(path), "epsilon-gamma-box", low=-3, high=3, sum_rule=rule, layerwise="sums")
        import onnxruntime as ort

        sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {"input": x, "relevance_seed": np.zeros((1, 10), np.float32)})[0]
        seed = np.eye(10, dtype=np.float32)[[logits.argmax()]]
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "relevance_seed": seed})))
        sizes[rule] = float(np.abs(outs["relevance"]).sum(dtype=np.float64))
        if rule == "sign-norm":
            sums = [(row, s_in, s_out) for row, s_in, s_out, _ in layer_sums(compiled, outs) if row["op"] == "Add"]
            assert len(sums) == 22
            for row, s_in, s_out in sums:
                assert abs(s_in - s_out) <= 1e-5 * max(abs(s_out), 1e-3), (row["name"], s_in, s_out)
    assert sizes["norm"] > 1e5 and sizes["sign-norm"] < 1.0, sizes
    assert not run_check(str(path), "epsilon-gamma-box", lrpc.Options(low=-3.0, high=3.0)).passed
    report = run_check(str(path), "epsilon-gamma-box", lrpc.Options(low=-3.0, high=3.0, sum_rule="sign-norm"))
    assert report.passed, report.text()


@pytest.mark.parametrize("op,keepdims", [("ReduceSum", 0), ("ReduceSum", 1), ("ReduceMean", 0)])
def test_sign_norm_on_reductions(op, keepdims, tmp_path):
    """A ReduceSum over channels (category sum: --sum-rule) and a ReduceMean (category avgpool: a rule file) under
    sign-norm: each cell's relevance is the formula's (float64, eps = 0, 1e-8), the cells of the sum's sign share R."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=SHAPE)
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    out_shape = [SHAPE[0], 1, *SHAPE[2:]] if keepdims else [SHAPE[0], *SHAPE[2:]]
    g = helper.make_graph([helper.make_node(op, ["x", "axes"], ["y"], name="reduce", keepdims=keepdims)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, out_shape)], [axes])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    if op == "ReduceSum":
        compiled = lrpc.compile(model, "epsilon", stabilizer_eps=0.0, sum_rule="sign-norm", layerwise="sums")
    else:
        compiled = lrpc.compile(model, _rule_file(tmp_path, {"category": "avgpool", "rule": "sign-norm"}),
                                stabilizer_eps=0.0, layerwise="sums")
    R = rng.normal(size=out_shape)
    out = _run(compiled, {"x": x, "relevance_seed": R})
    Rk = R if keepdims else R[:, None]
    z = x.sum(axis=1, keepdims=True)
    p, n = np.maximum(x, 0).sum(axis=1, keepdims=True), np.minimum(x, 0).sum(axis=1, keepdims=True)
    want = np.maximum(x, 0) * np.where(z > 0, Rk / p, 0) + np.minimum(x, 0) * np.where(z < 0, Rk / n, 0)
    np.testing.assert_allclose(out["relevance"], want, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["relevance_sum_kept/reduce"], R.reshape(len(R), -1).sum(1), rtol=1e-10)

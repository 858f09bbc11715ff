"""Einsum with one constant operand (a linear layer: category dense, every rule through the generic emitter) and
ReduceSum / ReduceMean over any non-batch axes (the norm rule, ``R_i = x_i * R / stab(sum)``).

Oracles: the dense numpy references of tests/oracles.py (the layer's matrix from unit vectors, each rule as the
formula table reads) in float64 at 1e-8; LRP-0 = gradient x input of torch networks exported with both exporters
(1e-4 relative L2); conservation of the parameter-free reductions; refused equations and axes give one line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lrpc
from conftest import rel_l2, run_onnx
from lrpc.composites import Options, RuleSet, UserRule, get_composite
from oracles import Layer, relevance
from test_activations import export, lrp0_and_oracle

N = 2
EPS = 0.3  # large: the stabilizer matters


def _single(op_node, x_shape, inits, z_shape, elem=TensorProto.DOUBLE, opset=18):
    graph = helper.make_graph([op_node], "layer", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("z", elem, z_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _explain(model, x, R, rule, op, **options):
    opts = Options(epsilon=EPS, stabilizer_eps=EPS, **options)
    ruleset = RuleSet(get_composite("epsilon"), opts, [UserRule(rule, op=op)])
    compiled = lrpc.compile(model, ruleset)
    out = run_onnx(compiled, {"x": x, "relevance_seed": R})
    return out["z"], out["relevance"]


# ------------------------------------------------------------------------------------------------ Einsum

EQUATIONS = {  # equation: (x shape, weight shape), x the first operand unless the weight's term comes first
    "bchw,oc->bohw": ((N, 4, 3, 3), (5, 4)),  # a 1x1 convolution
    "...c,dc->...d": ((N, 3, 4), (5, 4)),  # a linear layer on the last axis (torch's F.linear on a sequence)
    "oc,bchw->bohw": ((N, 4, 3, 3), (5, 4)),  # the weight first
    "bnc,cd->bnd": ((N, 3, 4), (4, 5)),
    "bc,cd->bcd": ((N, 4), (4, 3)),  # the input's index kept next to the weight's
    "bchw,c->bhw": ((N, 4, 3, 3), (4,)),  # a channel contraction with a vector
    "bi,ij": ((N, 4), (4, 5)),  # implicit output (bj)
}


def _einsum_model(eq, x_shape, w):
    weight_first = eq.split(",")[0] in ("oc",)
    ins = ["w", "x"] if weight_first else ["x", "w"]
    z = np.einsum(eq, *([w, np.zeros(x_shape)] if weight_first else [np.zeros(x_shape), w]))
    node = helper.make_node("Einsum", ins, ["z"], equation=eq, name="einsum")
    return _single(node, ["batch", *x_shape[1:]], {"w": w}, ["batch", *z.shape[1:]]), weight_first


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "alpha-beta", "flat", "zbox"])
@pytest.mark.parametrize("eq", list(EQUATIONS))
def test_einsum_matches_dense_reference(eq, rule):
    x_shape, w_shape = EQUATIONS[eq]
    rng = np.random.default_rng(len(eq))
    w = rng.standard_normal(w_shape)
    model, weight_first = _einsum_model(eq, x_shape, w)
    x = rng.standard_normal(x_shape)
    apply = (lambda X, W: np.einsum(eq, W, X)) if weight_first else (lambda X, W: np.einsum(eq, X, W))
    layer = Layer(apply, w, x_shape[1:], w_ones=np.ones_like(w))
    R = rng.standard_normal((N, *layer.out_shape()))
    z, got = _explain(model, x, R, rule, "Einsum", low=-2.0, high=2.0)
    np.testing.assert_allclose(z, apply(x, w), rtol=1e-12, atol=1e-12)
    want = relevance(layer, rule, x, R, eps=EPS, gamma=0.25, alpha=2.0, beta=1.0, low=-2.0, high=2.0)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


MATMULS = {  # name: (first operand's shape, second's, which one is the constant)
    "constant_first": ((3, 4), (N, 4, 5), 0),  # a token-mixing matrix times the tokens
    "constant_first_batched": ((N, 3, 4), (N, 4, 5), 0),  # DeBERTa's p2c: relative-position queries times the keys
    "constant_batched": ((N, 3, 4), (N, 4, 5), 1),  # DeBERTa's c2p: the queries times relative-position keys
}


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma"])
@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul_with_a_constant_first_or_batched_is_an_einsum(name, rule):
    """A MatMul whose constant operand comes first or has the batch axes of the other: the Einsum with the same
    letters; relevance = the dense reference of the product (the batch axis here static, as such a constant fixes
    it)."""
    shape_a, shape_b, const = MATMULS[name]
    rng = np.random.default_rng(len(name))
    w = rng.standard_normal((shape_a, shape_b)[const])
    x_shape = (shape_a, shape_b)[1 - const]
    z_shape = np.matmul(np.zeros(shape_a), np.zeros(shape_b)).shape
    ins = ["w", "x"] if const == 0 else ["x", "w"]
    model = _single(helper.make_node("MatMul", ins, ["z"], name="mm"), list(x_shape), {"w": w}, list(z_shape))
    x = rng.standard_normal(x_shape)
    apply = (lambda X, W: np.matmul(W, X)) if const == 0 else (lambda X, W: np.matmul(X, W))
    layer = Layer(apply, w, x_shape[1:], w_ones=np.ones_like(w))
    R = rng.standard_normal(z_shape)
    z, got = _explain(model, x, R, rule, "Einsum")
    np.testing.assert_allclose(z, apply(x, w), rtol=1e-12, atol=1e-12)
    if len(w.shape) == 3:  # (the oracle's layer maps one sample; the constant's batch axis is the samples')
        want = np.concatenate([relevance(Layer(apply, w[i:i + 1], x_shape[1:], w_ones=np.ones_like(w[i:i + 1])),
                                         rule, x[i:i + 1], R[i:i + 1], eps=EPS, gamma=0.25) for i in range(N)])
    else:
        want = relevance(layer, rule, x, R, eps=EPS, gamma=0.25)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("eq, inputs, message", [
    ("bii,ij->bj", ((N, 3, 3), (3, 4)), "repeated subscripts in 'bii'"),
    ("bchw,oc->bo", ((N, 4, 3, 3), (5, 4)), "index 'h' of the input is summed away without the weight"),
    ("bc,bd->b", ((N, 4), None), "summed away alone"),  # (two computed operands: attention's rule, no adjoint here)
    ("bc,cd,de->be", ((N, 4), (4, 3), (3, 2)), "3 operand"),
    ("bc,...dc->bd", ((N, 4), (5, 4)), "ellipsis in the constant operand"),
])
def test_einsum_refused_with_one_line(eq, inputs, message):
    x_shape, *weights = inputs
    rng = np.random.default_rng(0)
    inits = {f"w{i}": rng.standard_normal(s) for i, s in enumerate(weights) if s is not None}
    names = ["x"] + (list(inits) if inits else ["x"])
    out = np.einsum(eq, np.zeros(x_shape), *[np.zeros(s) for s in weights]) if weights[0] is not None else \
        np.einsum(eq, np.zeros(x_shape), np.zeros(x_shape))
    node = helper.make_node("Einsum", names, ["z"], equation=eq, name="odd_einsum")
    model = _single(node, list(x_shape), inits, list(out.shape))
    with pytest.raises(lrpc.UnsupportedError, match="odd_einsum.*Einsum") as e:
        lrpc.compile(model, "epsilon")
    assert message in str(e.value) and "\n" not in str(e.value)


class EinsumNet(nn.Module):
    """Conv -> ReLU -> Einsum 1x1 (``bchw,oc->bohw``) -> ReLU -> mean over H, W -> Einsum linear (``...c,dc->...d``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.w1, self.w2 = nn.Parameter(torch.randn(5, 6) / 2), nn.Parameter(torch.randn(4, 5) / 2)

    def forward(self, x):
        h = F.relu(torch.einsum("bchw,oc->bohw", F.relu(self.conv(x)), self.w1))
        return torch.einsum("...c,dc->...d", h.mean((2, 3)), self.w2)


@pytest.mark.parametrize("how", ["legacy18", "dynamo18"])
def test_einsum_lrp0_is_gradient_times_input(how):
    torch.manual_seed(0)
    net = EinsumNet().eval()
    x = torch.randn(N, 3, 6, 6).numpy()
    model = export(net, torch.from_numpy(x), how)
    assert [n.op_type for n in model.graph.node].count("Einsum") == 2
    got, want, y, logits = lrp0_and_oracle(net, model, x, net)
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert rel_l2(got, want) < 1e-4


# ----------------------------------------------------------------------------------------- ReduceSum / ReduceMean

REDUCTIONS = [  # (axes, keepdims)
    ([1], 1), ([1], 0), ([-3], 1), ([1, 2, 3], 0), ([1, 3], 1), ([2], 0),
]


def _reduce_model(op, axes, keepdims, opset, shape=(N, 4, 3, 5), symbolic=False):
    """``symbolic``: every dim a name (the input's and the output's)."""
    z = np.zeros(shape).sum(axis=tuple(axes), keepdims=bool(keepdims))
    as_input = op == "ReduceSum" or opset >= 18  # ReduceMean takes its axes as an input from opset 18 on
    ins = ["x", "axes"] if as_input else ["x"]
    attrs = {"keepdims": keepdims} if as_input else {"keepdims": keepdims, "axes": axes}
    node = helper.make_node(op, ins, ["z"], name="reduce", **attrs)
    inits = {"axes": np.array(axes, np.int64)} if as_input else {}
    x_dims, z_dims = ["batch", *shape[1:]], ["batch", *z.shape[1:]]
    if symbolic:
        x_dims, z_dims = ["batch", *(f"d{i}" for i in range(1, len(shape)))], ["batch", *(None for _ in z.shape[1:])]
    return _single(node, x_dims, inits, z_dims, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("axes, keepdims", REDUCTIONS)
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reduce_matches_dense_reference(op, axes, keepdims, opset):
    rng = np.random.default_rng(5)
    model = _reduce_model(op, axes, keepdims, opset)
    x = rng.standard_normal((N, 4, 3, 5))
    k = 1.0 if op == "ReduceSum" else 1.0 / np.prod([x.shape[a] for a in axes])
    apply = lambda X, W: W * X.sum(axis=tuple(a % 4 for a in axes), keepdims=bool(keepdims))
    layer = Layer(apply, np.asarray(k), x.shape[1:])
    R = rng.standard_normal((N, *layer.out_shape()))
    for rule in ("norm", "epsilon"):
        z, got = _explain(model, x, R, rule, op)
        np.testing.assert_allclose(z, apply(x, k), rtol=1e-12, atol=1e-12)
        want = relevance(layer, "epsilon", x, R, eps=EPS)  # norm: epsilon's formula on the parameter-free layer
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("axes, keepdims", [([1], 0), ([1, 2, 3], 0), ([2], 1)])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reduce_over_symbolic_dims(op, axes, keepdims):
    """Dims known only at run time (a mean over a symbolic sequence length, as sentence embeddings pool): a mean's
    1/K is read from the input's shape; one compiled graph gives the dense reference at two sizes."""
    rng = np.random.default_rng(6)
    model = _reduce_model(op, axes, keepdims, 18, symbolic=True)
    for shape in ((N, 4, 3, 5), (N, 2, 6, 1)):
        x = rng.standard_normal(shape)
        k = 1.0 if op == "ReduceSum" else 1.0 / np.prod([x.shape[a] for a in axes])
        apply = lambda X, W: W * X.sum(axis=tuple(axes), keepdims=bool(keepdims))  # noqa: E731
        layer = Layer(apply, np.asarray(k), x.shape[1:])
        R = rng.standard_normal((N, *layer.out_shape()))
        for rule in ("norm", "sign-norm"):
            _, got = _explain(model, x, R, rule, op)
            want = relevance(layer, "epsilon" if rule == "norm" else "sign-norm", x, R, eps=EPS)
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_reduce_conserves():
    rng = np.random.default_rng(6)
    x = np.abs(rng.standard_normal((N, 4, 3, 5))) + 0.1
    for op in ("ReduceSum", "ReduceMean"):
        model = _reduce_model(op, [1, 2], 0, 18)
        R = rng.standard_normal((N, 5))
        compiled = lrpc.compile(model, "epsilon", epsilon=1e-12, stabilizer_eps=1e-12)
        got = run_onnx(compiled, {"x": x, "relevance_seed": R})["relevance"]
        np.testing.assert_allclose(got.reshape(N, -1).sum(1), R.sum(1), rtol=1e-9)


def test_reduce_noop_with_empty_axes_is_identity():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["z"], keepdims=1, noop_with_empty_axes=1, name="reduce")
    model = _single(node, ["batch", 3], {"axes": np.zeros(0, np.int64)}, ["batch", 3])
    R = np.random.default_rng(7).standard_normal((N, 3))
    got = run_onnx(lrpc.compile(model, "epsilon"), {"x": np.ones((N, 3)), "relevance_seed": R})["relevance"]
    np.testing.assert_array_equal(got, R)


@pytest.mark.parametrize("op, axes, message", [
    ("ReduceSum", [0, 1], "over the batch axis has no LRP rule"),
    ("ReduceMean", [0], "over the batch axis has no LRP rule"),
])
def test_reduce_over_batch_refused(op, axes, message):
    model = _reduce_model(op, axes, 0, 18)
    with pytest.raises(lrpc.UnsupportedError, match=f"'reduce' \\({op}\\).*{message}"):
        lrpc.compile(model, "epsilon")


def test_reduce_other_rules_refused():
    model = _reduce_model("ReduceSum", [1], 1, 18)
    ruleset = RuleSet(get_composite("epsilon"), Options(), [UserRule("zplus", op="ReduceSum")])
    with pytest.raises(lrpc.UnsupportedError, match=r"'reduce' \(ReduceSum\): rule 'zplus' does not apply"):
        lrpc.compile(model, ruleset)


class ChannelReduceNet(nn.Module):
    """Conv -> ReLU -> sum over channels (keepdim) -> Conv -> ReLU -> mean over channels -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(1, 4, 3), nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        s = F.relu(self.c2(h.sum(1, keepdim=True)))  # [N, 4, 4, 4]
        m = F.relu(self.c3(h)).mean(1)[:, 1:5, 1:5]  # [N, 4, 4]
        return self.fc((s.mean(1) + m).flatten(1))


@pytest.mark.parametrize("how", ["legacy17", "legacy18", "dynamo18"])
def test_channel_reductions_lrp0_is_gradient_times_input(how):
    torch.manual_seed(1)
    net = ChannelReduceNet().eval()
    x = torch.randn(N, 3, 6, 6).numpy()
    model = export(net, torch.from_numpy(x), how)
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceSum" in ops and "ReduceMean" in ops
    got, want, y, logits = lrp0_and_oracle(net, model, x, net)
    np.testing.assert_allclose(y, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert rel_l2(got, want) < 1e-4

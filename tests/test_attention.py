"""Attention under AttnLRP and CP-LRP (relevance/attention.py, composites attnlrp and cp-lrp).

Per op, float64, against the dense formulas (onnx's ReferenceEvaluator): a MatMul of two computed tensors with a
broadcast batch axis (epsilon, then split 50/50), a Softmax with masked (-inf) positions (Taylor rule), CP-LRP's
constant probabilities. End to end: a small pre-LN vision transformer built in torch (patch Conv, class token,
learned positions, 2 blocks of multi-head self-attention + GELU MLP, final LayerNorm, head on the class token;
random weights and biases at unit activation scale), exported with both exporters, compiled with attnlrp and cp-lrp:
relevance = gradient × input of the torch forward with the rules' tensors detached (1e-4 relative L2, float32), and
CP-LRP on the bias-free model conserves. torchvision's VisionTransformer is in tests/test_zoo.py (family "vit")."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import lrpc
from conftest import rel_l2, report_line, run_onnx
from detach_rules import layer_norm, split_matmul

EPS = 0.05  # large enough that the stabilizer shows in the per-op tests


def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


class _Erf(OpRun):
    """Erf in float64 (onnx's reference kernel rounds through float32)."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


_Erf.__name__ = "Erf"


def _run64(model, feeds):
    sess = ReferenceEvaluator(model, new_ops=[_Erf])
    return dict(zip(sess.output_names, sess.run(None, feeds)))


def _model(nodes, inputs, output, shape, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, s) for n, s in inputs],
                          [helper.make_tensor_value_info(output, TensorProto.DOUBLE, shape)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_matmul_of_two_computed_tensors_splits_epsilon_relevance_between_its_operands():
    """y = relu(a) @ tanh(b) with b broadcast over the heads axis: n = R / stab(2y), R_a = a ⊙ (n bᵀ),
    R_b = b ⊙ Σ_heads(aᵀ n); the activations pass relevance."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 1, 5, 6))
    m = _model([helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Tanh", ["b"], ["tb"]),
                helper.make_node("MatMul", ["ra", "tb"], ["y"], name="mm")],
               [("a", [2, 3, 4, 5]), ("b", [2, 1, 5, 6])], "y", [2, 3, 4, 6])
    compiled = lrpc.compile(m, "attnlrp", epsilon=EPS)
    R = rng.standard_normal((2, 3, 4, 6))
    got = _run64(compiled, {"a": a, "b": b, "relevance_seed": R})
    ra, tb = np.maximum(a, 0), np.tanh(b)
    n = R / _stab(2 * (ra @ tb), EPS)
    want_a = ra * (n @ np.swapaxes(tb, -1, -2))
    want_b = tb * (np.swapaxes(ra, -1, -2) @ n).sum(axis=1, keepdims=True)
    assert rel_l2(got["relevance_a"], want_a) < 1e-12
    assert rel_l2(got["relevance_b"], want_b) < 1e-12
    assert "mm" in compiled.metadata_props[[p.key for p in compiled.metadata_props].index("lrpc.rules")].value


def _attention_model():
    """s = softmax(x + mask) over the last axis (mask: -1e30 at some positions, where s is then exactly 0; lrpc refuses
    infinite weights), y = s @ v: attention's A·V."""
    mask = np.zeros((1, 1, 4, 5))
    mask[..., 0, 3:] = -1e30
    mask[..., 2, 0] = -1e30
    nodes = [helper.make_node("Add", ["x", "mask"], ["xm"]), helper.make_node("Softmax", ["xm"], ["s"], axis=-1),
             helper.make_node("Relu", ["v"], ["rv"]), helper.make_node("MatMul", ["s", "rv"], ["y"], name="av")]
    return _model(nodes, [("x", [2, 3, 4, 5]), ("v", [2, 3, 5, 6])], "y", [2, 3, 4, 6],
                  [numpy_helper.from_array(mask, "mask")]), mask


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_softmax_taylor_rule_and_cp_lrp_constant_probabilities(composite):
    """attnlrp: A·V splits, the softmax's input gets R_x = x ⊙ (R_s - s ⊙ Σ R_s), 0 at masked positions (s = 0);
    the mask Add (a constant addend, epsilon) takes its share. cp-lrp: s is a constant, R_v = v ⊙ (sᵀ R / stab(y)),
    no relevance reaches x."""
    rng = np.random.default_rng(1)
    m, mask = _attention_model()
    x, v, R = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 3, 4, 6))
    got = _run64(lrpc.compile(m, composite, epsilon=EPS), {"x": x, "v": v, "relevance_seed": R})
    xm = x + mask
    s = np.exp(xm - xm.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    rv = np.maximum(v, 0)
    y = s @ rv
    if composite == "cp-lrp":
        want_v = rv * (np.swapaxes(s, -1, -2) @ (R / _stab(y, EPS)))
        assert rel_l2(got["relevance_v"], want_v) < 1e-12
        assert not np.any(got["relevance_x"])
        return
    n = R / _stab(2 * y, EPS)
    r_s = s * (n @ np.swapaxes(rv, -1, -2))
    assert rel_l2(got["relevance_v"], rv * (np.swapaxes(s, -1, -2) @ n)) < 1e-12
    r_xm = np.where(s == 0, 0.0, xm) * (r_s - s * r_s.sum(-1, keepdims=True))
    want_x = x * r_xm / _stab(xm, EPS)
    assert np.all(want_x[..., 0, 3:] == 0) and np.all(want_x[..., 2, 0] == 0) and np.all(s[..., 2, 0] == 0)
    assert np.all(np.isfinite(got["relevance_x"]))
    assert rel_l2(got["relevance_x"], want_x) < 1e-12


@pytest.mark.parametrize("mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("scale", [None, ("Mul", 0.5), ("Div", -4.0)], ids=["no_scale", "mul", "div"])
def test_attention_scores_chain(scale, mask):
    """The whole chain s = q·kᵀ, y = s·c (or s / c), m = y + mask, p = softmax(m), o = p·v under attnlrp with a large
    epsilon, float64: the composition of the per-op rules (each layer's epsilon on its own denominator, the Taylor
    rule on the softmax). The backward reads neither the scores s nor, where a scale follows them, anything but the
    scaled (and masked) scores: the tensors the forward drops stay dropped."""
    rng = np.random.default_rng(3)
    shape_q, shape_v = (2, 3, 4, 5), (2, 3, 4, 6)
    mask_value = np.zeros((1, 1, 4, 4))
    mask_value[..., 0, 2:] = -1e30
    nodes, inits, last = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                          helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk")], [], "s"
    if scale is not None:
        nodes.append(helper.make_node(scale[0], ["s", "c"], ["y"], name="scale"))
        inits.append(numpy_helper.from_array(np.array(scale[1]), "c"))
        last = "y"
    if mask:
        nodes.append(helper.make_node("Add", [last, "mask"], ["m"], name="mask"))
        inits.append(numpy_helper.from_array(mask_value, "mask"))
        last = "m"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    model = _model(nodes, [("q", list(shape_q)), ("k", list(shape_q)), ("v", list(shape_v))], "o", list(shape_v),
                   inits)
    q, k, v = (rng.standard_normal(shape) for shape in (shape_q, shape_q, shape_v))
    R = rng.standard_normal(shape_v)
    compiled = lrpc.compile(model, "attnlrp", epsilon=EPS)
    got = _run64(compiled, {"q": q, "k": k, "v": v, "relevance_seed": R})

    s = q @ np.swapaxes(k, -1, -2)
    c = 1.0 if scale is None else scale[1] if scale[0] == "Mul" else 1.0 / scale[1]
    y = s * c
    m = y + mask_value if mask else y
    p = np.exp(m - m.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    n = R / _stab(2 * o, EPS)
    r_p = p * (n @ np.swapaxes(v, -1, -2))
    want_v = v * (np.swapaxes(p, -1, -2) @ n)
    r_m = m * (r_p - p * r_p.sum(-1, keepdims=True))
    r_y = y * r_m / _stab(m, EPS) if mask else r_m  # (the mask Add: epsilon with the mask as its bias)
    r_s = s * c * r_y / _stab(y, EPS) if scale is not None else r_y  # (the scale: epsilon on c·s)
    n_s = r_s / _stab(2 * s, EPS)
    want_q = q * (n_s @ k)
    want_k = k * (np.swapaxes(n_s, -1, -2) @ q)
    for name, want in (("q", want_q), ("k", want_k), ("v", want_v)):
        assert rel_l2(got[f"relevance_{name}"], want) < 1e-12, name
    if scale is not None:
        assert [nd.name for nd in compiled.graph.node if "s" in nd.input] == ["scale"]


@pytest.mark.parametrize("c_shape", [[1], [1, 1, 1]])
def test_scale_by_one_constant_value_of_any_rank(c_shape):
    """h = x·W1, y = h·c (c one value, possibly of higher rank than h: the product gains axes), o = y·W2 under
    epsilon, float64: the composition of the layers' epsilon rules (a scale of higher rank stays a layer of its own;
    its relevance is x ⊙ (m c), not its output ⊙ m, which has the output's axes)."""
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    out_shape = [2, 5] if len(c_shape) == 1 else [1, 2, 5]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"),
             helper.make_node("Mul", ["h", "c"], ["y"], name="scale"),
             helper.make_node("MatMul", ["y", "w2"], ["o"], name="l2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.full(c_shape, 0.5), "c")]
    model = _model(nodes, [("x", [2, 3])], "o", out_shape, inits)
    x, R = rng.standard_normal((2, 3)), rng.standard_normal(out_shape)
    got = _run64(lrpc.compile(model, "attnlrp", epsilon=EPS, stabilizer_eps=EPS), {"x": x, "relevance_seed": R})
    h = x @ w1
    y = 0.5 * h
    o = y @ w2
    r_y = y * ((R / _stab(o, EPS)) @ w2.T)
    if len(c_shape) == 1:  # (a scale that keeps the shape folds into the MatMul before it: one layer, y = x·(c W1))
        want = x * ((r_y / _stab(y, EPS)) @ (0.5 * w1).T)
    else:
        r_h = (y * r_y / _stab(y, EPS)).reshape(2, 4)
        want = x * ((r_h / _stab(h, EPS)) @ w1.T)
    assert rel_l2(got["relevance"], want) < 1e-12


def test_sum_of_two_products_in_float16_at_epsilon_zero():
    """s = x·W1 + x·W2, o = s·W3 in float16 with epsilon 0, small sums (|s| ~ 0.03): the sum's quotient from its own
    output's factor is exact there too (LRP-0 in float64 on the same float16 values, 2e-3)."""
    rng = np.random.default_rng(1)
    w1, w2 = ((rng.standard_normal((16, 32)) * 0.01).astype(np.float16) for _ in range(2))
    w3 = rng.standard_normal((32, 8)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"),
             helper.make_node("MatMul", ["x", "w2"], ["g"], name="l2"),
             helper.make_node("Add", ["h", "g"], ["s"], name="sum"),
             helper.make_node("MatMul", ["s", "w3"], ["o"], name="l3")]
    inits = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 16])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT16, [4, 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.standard_normal((4, 16)) * 0.1).astype(np.float16)
    R = rng.standard_normal((4, 8)).astype(np.float16)
    got = run_onnx(lrpc.compile(model, "attnlrp", epsilon=0.0, stabilizer_eps=0.0), {"x": x, "relevance_seed": R})
    X, W1, W2, W3, S = (a.astype(np.float64) for a in (x, w1, w2, w3, R))
    s = X @ W1 + X @ W2
    c = (S / (s @ W3)) @ W3.T
    want = X * (c @ W1.T) + X * (c @ W2.T)
    assert rel_l2(got["relevance"].astype(np.float64), want) < 2e-3


def _rules_of(compiled) -> dict:
    import json

    return json.loads(next(p.value for p in compiled.metadata_props if p.key == "lrpc.rules"))


def test_cnn_composites_give_attention_attnlrp_rules():
    """Every composite gives a MatMul of two computed tensors epsilon and an attention softmax taylor (as attnlrp);
    its own rules apply elsewhere (the mask Add: pass under epsilon-gamma-box, epsilon under attnlrp)."""
    rng = np.random.default_rng(2)
    m, _ = _attention_model()
    feeds = {"x": rng.standard_normal((2, 3, 4, 5)), "v": rng.standard_normal((2, 3, 5, 6)),
             "relevance_seed": rng.standard_normal((2, 3, 4, 6))}
    ours, theirs = (lrpc.compile(m, c, epsilon=EPS) for c in ("epsilon-gamma-box", "attnlrp"))
    rules = _rules_of(ours)
    assert rules["av"].startswith("epsilon") and "taylor" in rules.values() and "pass" in rules.values()
    assert "pass" not in _rules_of(theirs).values()
    assert rel_l2(_run64(ours, feeds)["relevance_v"], _run64(theirs, feeds)["relevance_v"]) < 1e-14


def test_rule_files_give_attention_only_its_rules(tmp_path):
    """taylor/constant only on softmax layers, only they on softmax layers, only epsilon on a MatMul of two
    computed tensors: each refused in one line naming the node."""
    import json

    m, _ = _attention_model()
    cases = [({"category": "scale", "rule": "taylor"}, lrpc.InputError, "rule 'taylor' applies only to softmax"),
             ({"category": "softmax", "rule": "epsilon"}, lrpc.UnsupportedError, r"\(Softmax\): rule 'epsilon' does "
              "not apply to a Softmax"),
             ({"category": "matmul", "rule": "zplus"}, lrpc.UnsupportedError, r"'av' \(MatMul\): rule 'zplus' does "
              "not apply to a MatMul of two computed tensors")]
    for i, (entry, error, message) in enumerate(cases):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"composite": "attnlrp", "rules": [entry]}))
        with pytest.raises(error, match=message):
            lrpc.compile(m, str(path))


def test_rules_lists_the_attention_composites():
    from lrpc.composites import describe

    text = describe()
    assert all(w in text for w in ("attnlrp", "cp-lrp", "taylor", "constant", "matmul", "softmax"))

# ------------------------------------------------------------------------------------------- end to end (torch)
GRAD_TOL = 1e-4
CONSERVE_TOL = 1e-4
EXPORTS = {"legacy17": {"dynamo": False, "opset": 17}, "dynamo18": {"dynamo": True, "opset": 18}}


def _tiny_vit(bias: bool = True):
    """The small pre-LN vision transformer of this module's docstring; ``mode`` of its forward: None (the plain
    forward, exported), "attnlrp" or "cp-lrp": the forward whose gradient × input is that composite's relevance
    (LayerNorm's sigma, GELU's f(x)/x, one factor of each attention product or CP-LRP's probabilities detached)."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, d: int, heads: int, mlp: int):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
            self.qkv, self.proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
            self.fc1, self.fc2 = nn.Linear(d, mlp, bias=bias), nn.Linear(mlp, d, bias=bias)
            self.heads = heads

        def forward(self, x, mode):
            n, t, d = x.shape
            qkv = self.qkv(_ln(self.ln1, x, mode)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = _mm(q * (d // self.heads) ** -0.5, k.transpose(-2, -1), mode).softmax(-1)
            a = a.detach() if mode == "cp-lrp" else a
            o = (a @ v if mode == "cp-lrp" else _mm(a, v, mode)).transpose(1, 2).reshape(n, t, d)
            x = x + self.proj(o)
            h = self.fc1(_ln(self.ln2, x, mode))
            h = F.gelu(h) if mode is None else h * (F.gelu(h) / h).detach()
            return x + self.fc2(h)

    def _ln(ln, x, mode):
        return ln(x) if mode is None else layer_norm(ln, x)

    def _mm(a, b, mode):
        return a @ b if mode is None else split_matmul(a, b)

    class TinyViT(nn.Module):
        def __init__(self, d=32, heads=2, mlp=64, classes=10):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 8, stride=8, bias=bias)
            self.cls = nn.Parameter(torch.randn(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.5)
            self.blocks = nn.ModuleList([Block(d, heads, mlp) for _ in range(2)])
            self.ln, self.head = nn.LayerNorm(d, bias=bias), nn.Linear(d, classes, bias=bias)
            self.mode = None

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            for blk in self.blocks:
                x = blk(x, self.mode)
            return self.head(_ln(self.ln, x, self.mode)[:, 0])

    torch.manual_seed(0)
    net = TinyViT().eval()
    with torch.no_grad():  # unit-scale activations: fan-in scaled weights, biases of both signs, LayerNorm affine
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return net


def _export(net, path, exporter: str, dtype=None):
    import warnings

    torch = pytest.importorskip("torch")

    kw = EXPORTS[exporter]
    x = torch.zeros(2, 3, 32, 32, dtype=dtype or torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            torch.onnx.export(net, (x,), dynamo=True, opset_version=kw["opset"], input_names=["input"],
                              output_names=["logits"]).save(str(path), external_data=False)
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=kw["opset"], input_names=["input"],
                              output_names=["logits"])
    return onnx.load(str(path))


def _detach_reference(net, x, mode: str):
    """(logits, seed = one-hot × the top-1 logit per sample, gradient × input of the top-1 logits' sum)."""
    torch = pytest.importorskip("torch")

    net.mode = mode
    try:
        xt = torch.from_numpy(x).requires_grad_(True)
        y = net(xt)
        k = y.argmax(1)
        y.gather(1, k[:, None]).sum().backward()
    finally:
        net.mode = None
    seed = np.zeros(tuple(y.shape), x.dtype)
    seed[np.arange(len(k)), k.numpy()] = y.detach().numpy()[np.arange(len(k)), k.numpy()]
    return y.detach().numpy(), seed, (xt.grad * xt).detach().numpy()


@pytest.fixture(scope="module")
def tiny_vit_exports(tmp_path_factory):
    pytest.importorskip("torch")
    root, net = tmp_path_factory.mktemp("tiny_vit"), _tiny_vit()
    return net, {e: _export(net, root / f"{e}.onnx", e) for e in EXPORTS}


@pytest.mark.parametrize("exporter", list(EXPORTS))
@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_tiny_vit_matches_the_detach_reference(tiny_vit_exports, exporter, composite):
    """Relevance of the compiled export = gradient × input of the forward with the rule's tensors detached
    (epsilon 0: the rules themselves, no stabilizer), float32, 1e-4 relative L2."""
    net, models = tiny_vit_exports
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    logits, seed, want = _detach_reference(net, x, composite)
    compiled = lrpc.compile(models[exporter], composite, epsilon=0.0, stabilizer_eps=0.0)
    got = run_onnx(compiled, {"input": x, "relevance_seed": seed})
    assert rel_l2(got["logits"], logits) < 1e-4
    err = rel_l2(got["relevance"], want)
    report_line(f"tiny ViT {exporter} {composite}: relevance vs detach reference rel L2 {err:.1e} (float32)")
    assert err < GRAD_TOL


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_tiny_vit_matches_the_detach_reference_in_float64(tmp_path, exporter):
    """The same in float64 (onnx's ReferenceEvaluator with a float64 Erf: onnxruntime has no float64 Conv/Erf),
    1e-10 relative L2."""
    torch = pytest.importorskip("torch")

    net = _tiny_vit().double()
    model = _export(net, tmp_path / "m.onnx", exporter, torch.float64)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32))
    for composite in ("attnlrp", "cp-lrp"):
        logits, seed, want = _detach_reference(net, x, composite)
        got = _run64(lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0),
                     {"input": x, "relevance_seed": seed})
        assert rel_l2(got["logits"], logits) < 1e-12
        err = rel_l2(got["relevance"], want)
        report_line(f"tiny ViT {exporter} {composite}: relevance vs detach reference rel L2 {err:.1e} (float64)")
        assert err < 1e-10


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_tiny_vit_cp_lrp_conserves_without_biases(tmp_path, exporter):
    """CP-LRP on the bias-free model (LayerNorm without bias, Linear/Conv without bias; the class token and the
    positions are constants and take their share at the residual sum): Σ input relevance = the explained logit
    minus what the constants took; with the positions and the class token zero, the logit itself."""
    torch = pytest.importorskip("torch")

    net = _tiny_vit(bias=False)
    with torch.no_grad():
        net.pos.zero_()
        net.cls.zero_()
    model = _export(net, tmp_path / "m.onnx", exporter)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    logits, seed, _ = _detach_reference(net, x, "cp-lrp")
    compiled = lrpc.compile(model, "cp-lrp", epsilon=1e-9, stabilizer_eps=1e-9)
    got = run_onnx(compiled, {"input": x, "relevance_seed": seed})
    sums = got["relevance"].reshape(2, -1).sum(1, dtype=np.float64)
    err = float(np.max(np.abs(sums - seed.sum(1)) / np.abs(seed.sum(1))))
    report_line(f"tiny ViT {exporter} cp-lrp bias-free: conservation rel error {err:.1e} (float32)")
    assert err < CONSERVE_TOL


def torchvision_vit():
    """torchvision's VisionTransformer, tiny (image 32, patch 8, 2 layers, 2 heads, width 32, MLP 64, 10 classes),
    seeded random weights and biases."""
    torch = pytest.importorskip("torch")
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10).eval()
    with torch.no_grad():  # (torchvision's init zeroes the biases and the head)
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.startswith("heads"):
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return net


def _torchvision_vit_reference(net, mode: str):
    """torchvision's VisionTransformer forward written out with its own parameters, the rule's tensors detached
    (as _tiny_vit's ``mode``): its gradient × input is that composite's relevance."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    def attention(m, x):
        n, t, d = x.shape
        h = m.num_heads
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = split_matmul(q, k.transpose(-2, -1) * (d // h) ** -0.5).softmax(-1)
        o = a.detach() @ v if mode == "cp-lrp" else split_matmul(a, v)
        return m.out_proj(o.transpose(1, 2).reshape(n, t, d))

    def forward(x):
        n = x.shape[0]
        x = net.conv_proj(x).reshape(n, net.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([net.class_token.expand(n, -1, -1), x], dim=1) + net.encoder.pos_embedding
        for blk in net.encoder.layers:
            x = x + attention(blk.self_attention, layer_norm(blk.ln_1, x))
            y = blk.mlp[0](layer_norm(blk.ln_2, x))
            x = x + blk.mlp[3](y * (F.gelu(y) / y).detach())
        return net.heads(layer_norm(net.encoder.ln, x)[:, 0])

    return forward


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_torchvision_vision_transformer_matches_the_detach_reference(tmp_path, exporter):
    """torchvision's VisionTransformer (nn.MultiheadAttention inside), tiny: image 32, patch 8, 2 layers, 2 heads,
    width 32, MLP 64, 10 classes; random biases. attnlrp and cp-lrp against the detach reference, float32, 1e-4."""
    pytest.importorskip("torch")

    net = torchvision_vit()
    check_torchvision_vit(net, _export(net, tmp_path / "vit.onnx", exporter), exporter)


def check_torchvision_vit(net, model, tag: str):
    """attnlrp and cp-lrp relevance of ``model`` (an export of :func:`torchvision_vit`'s ``net``) = the detach
    reference, float32, 1e-4; its logits = the torch model's."""
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    for composite in ("attnlrp", "cp-lrp"):
        xt = torch.from_numpy(x).requires_grad_(True)
        y = _torchvision_vit_reference(net, composite)(xt)
        k = y.argmax(1)
        y.gather(1, k[:, None]).sum().backward()
        seed = np.zeros(tuple(y.shape), np.float32)
        seed[np.arange(2), k.numpy()] = y.detach().numpy()[np.arange(2), k.numpy()]
        got = run_onnx(lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0),
                       {"input": x, "relevance_seed": seed})
        with torch.no_grad():
            assert rel_l2(got["logits"], net(torch.from_numpy(x)).numpy()) < 1e-4
        err = rel_l2(got["relevance"], (xt.grad * xt).detach().numpy())
        report_line(f"torchvision ViT {tag} {composite}: relevance vs detach reference rel L2 {err:.1e} (float32)")
        assert err < GRAD_TOL

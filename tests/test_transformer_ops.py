"""Transformer ops beyond MatMul attention: an Einsum of two computed tensors (attention written as one equation,
MaxViT's), the opset-23 ``Attention`` and ``RMSNormalization`` ops (decomposed by passes/attention_op.py), gated MLPs
with GELU/ReLU (GeGLU, ReGLU) and the routing ops of decoders (Expand for grouped-query attention, Where with a
constant mask, Neg, ReduceMean).

Per op, float64 (onnx's ReferenceEvaluator) against the rule's formula, and against torch autograd of the op with the
rule's tensors detached (gradient × input of the modified forward is the rule's relevance)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import lrpc
from conftest import rel_l2, run_onnx

EPS = 0.05  # large enough that the stabilizer shows


def _stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _model(nodes, inputs, output, shape, inits=(), opset=17, elem=TensorProto.DOUBLE):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
                          [helper.make_tensor_value_info(output, elem, shape)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 23 else 8
    return m


def _run64(model, feeds):
    sess = ReferenceEvaluator(model)
    return dict(zip(sess.output_names, sess.run(None, feeds)))


def _rules_of(compiled) -> dict:
    import json

    return json.loads(next(p.value for p in compiled.metadata_props if p.key == "lrpc.rules"))


# ------------------------------------------------------------------------------------------- Einsum of two tensors
EINSUMS = {  # equation: (a's shape, b's shape, y's shape)
    "bhid,bhjd->bhij": ((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 4, 6)),  # Q·Kᵀ
    "bhij,bhjd->bhid": ((2, 3, 4, 6), (2, 3, 6, 5), (2, 3, 4, 5)),  # A·V
    "B G H I D, B G H J D -> B G H I J": ((1, 2, 2, 3, 4), (1, 2, 2, 5, 4), (1, 2, 2, 3, 5)),  # MaxViT's, as exported
    "...id,...jd->...ij": ((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 4, 6)),
}


def _einsum_model(eq: str):
    sa, sb, sy = EINSUMS[eq]
    nodes = [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("Einsum", ["ra", "tb"], ["y"], name="ein", equation=eq)]
    return _model(nodes, [("a", sa), ("b", sb)], "y", sy, opset=18)


@pytest.mark.parametrize("eq", list(EINSUMS))
def test_einsum_of_two_computed_tensors_splits_epsilon_relevance(eq):
    """y = einsum(relu(a), tanh(b)) under attnlrp: n = R / stab(2y), R_a = a ⊙ einsum(n, b), R_b = b ⊙ einsum(a, n)
    (the adjoint equations); the category is matmul, its rule epsilon."""
    rng = np.random.default_rng(0)
    sa, sb, sy = EINSUMS[eq]
    a, b, R = rng.standard_normal(sa), rng.standard_normal(sb), rng.standard_normal(sy)
    compiled = lrpc.compile(_einsum_model(eq), "attnlrp", epsilon=EPS)
    got = _run64(compiled, {"a": a, "b": b, "relevance_seed": R})
    ra, tb = np.maximum(a, 0), np.tanh(b)
    e = eq.replace(" ", "")
    ia, ib, iy = e.replace("->", ",").split(",")
    n = R / _stab(2 * np.einsum(e, ra, tb))
    assert rel_l2(got["relevance_a"], ra * np.einsum(f"{iy},{ib}->{ia}", n, tb)) < 1e-12
    assert rel_l2(got["relevance_b"], tb * np.einsum(f"{ia},{iy}->{ib}", ra, n)) < 1e-12
    assert _rules_of(compiled)["ein"].startswith("epsilon")


def test_einsum_split_is_the_torch_detach_reference():
    """Gradient × input of 0.5·einsum(a, sg(b)) + 0.5·einsum(sg(a), b) with the seed's quotient R / y held constant
    (epsilon 0) is the compiled relevance."""
    torch = pytest.importorskip("torch")
    eq = "bhid,bhjd->bhij"
    rng = np.random.default_rng(1)
    sa, sb, sy = EINSUMS[eq]
    a, b, R = rng.uniform(0.1, 1, sa), rng.standard_normal(sb), rng.standard_normal(sy)  # (a > 0: y ≠ 0)
    at, bt = torch.from_numpy(np.maximum(a, 0)).requires_grad_(True), torch.from_numpy(np.tanh(b)).requires_grad_(True)
    y = 0.5 * torch.einsum(eq, at, bt.detach()) + 0.5 * torch.einsum(eq, at.detach(), bt)
    (y * torch.from_numpy(R) / y.detach()).sum().backward()
    got = _run64(lrpc.compile(_einsum_model(eq), "attnlrp", epsilon=0.0, stabilizer_eps=0.0),
                 {"a": a, "b": b, "relevance_seed": R})
    assert rel_l2(got["relevance_a"], (at * at.grad).detach().numpy()) < 1e-12
    assert rel_l2(got["relevance_b"], (bt * bt.grad).detach().numpy()) < 1e-12


def test_einsum_with_constant_probabilities_under_cp_lrp():
    """A·V as an Einsum after a Softmax: cp-lrp holds the probabilities constant (all relevance to V, epsilon of the
    linear map of V); attnlrp splits and the softmax's Taylor rule takes its half."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("Relu", ["v"], ["rv"]),
             helper.make_node("Einsum", ["s", "rv"], ["y"], name="av", equation="bhij,bhjd->bhid")]
    m = _model(nodes, [("x", [2, 3, 4, 6]), ("v", [2, 3, 6, 5])], "y", [2, 3, 4, 5], opset=18)
    x, v, R = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 4, 5))
    s = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    rv = np.maximum(v, 0)
    got = _run64(lrpc.compile(m, "cp-lrp", epsilon=EPS), {"x": x, "v": v, "relevance_seed": R})
    assert rel_l2(got["relevance_v"], rv * np.einsum("bhij,bhid->bhjd", s, R / _stab(s @ rv))) < 1e-12
    assert not np.any(got["relevance_x"])
    got = _run64(lrpc.compile(m, "attnlrp", epsilon=EPS), {"x": x, "v": v, "relevance_seed": R})
    n = R / _stab(2 * (s @ rv))
    r_s = s * (n @ np.swapaxes(rv, -1, -2))
    assert rel_l2(got["relevance_x"], x * (r_s - s * r_s.sum(-1, keepdims=True))) < 1e-12


@pytest.mark.parametrize("eq,shapes,message", [
    ("bii,bij->bj", ((2, 3, 3), (2, 3, 4), (2, 4)), "repeated subscripts"),
    ("bik,bjd->bij", ((2, 3, 4), (2, 5, 6), (2, 3, 5)), "summed away alone"),
])
def test_einsum_of_two_computed_tensors_refuses_equations_without_an_adjoint(eq, shapes, message):
    nodes = [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("Einsum", ["ra", "tb"], ["y"], name="ein", equation=eq)]
    m = _model(nodes, [("a", shapes[0]), ("b", shapes[1])], "y", shapes[2], opset=18)
    with pytest.raises(lrpc.UnsupportedError, match=f"'ein' \\(Einsum\\).*{message}"):
        lrpc.compile(m, "attnlrp")


def _einsum_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """MaxViT's two attention Einsums written as MatMul (``…id,…jd->…ij``: with Kᵀ): the same graph in the form
    whose relevance tests/test_attention.py checks against the detach reference."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "").replace(" ", "")
        if n.op_type != "Einsum" or eq not in ("BGHID,BGHJD->BGHIJ", "BGHIJ,BGHJD->BGHID"):
            nodes.append(n)
            continue
        a, b = n.input
        if eq.endswith("IJ"):
            nodes.append(helper.make_node("Transpose", [b], [b + "/T"], perm=[0, 1, 2, 4, 3]))
            b += "/T"
        nodes.append(helper.make_node("MatMul", [a, b], list(n.output), name=n.name))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_maxvit_einsum_attention_equals_its_matmul_form(tmp_path, exporter):
    """torchvision's MaxVit (the zoo's small config, healthy random weights): its block and grid attention's Einsums
    give the relevance of the same graph written with MatMul (attnlrp and cp-lrp, float32, 1e-5 relative L2); the
    compiled forward is the export's and the relevance finite."""
    pytest.importorskip("torch")
    from models import families

    model, x = families.build("maxvit")
    proto = onnx.load(str(families.export(model, tmp_path / "m.onnx", x.shape, exporter)))
    assert sum(n.op_type == "Einsum" for n in proto.graph.node) == 16
    matmul = _einsum_as_matmul(proto)
    assert not any(n.op_type == "Einsum" for n in matmul.graph.node)
    feeds = {"input": x.numpy()}
    y = run_onnx(proto, feeds)["logits"]
    seed = np.zeros_like(y)
    seed[0, y.argmax()] = y.max()
    for composite in ("attnlrp", "cp-lrp"):
        got = run_onnx(lrpc.compile(proto, composite), {**feeds, "relevance_seed": seed})
        want = run_onnx(lrpc.compile(matmul, composite), {**feeds, "relevance_seed": seed})
        assert rel_l2(got["logits"], y) < 1e-5
        assert np.isfinite(got["relevance"]).all() and np.abs(got["relevance"]).sum() > 0
        assert rel_l2(got["relevance"], want["relevance"]) < 1e-5


# ------------------------------------------------------------------------------------------- the Attention op
ATTENTION_CASES = {  # name: (Q, K, V shapes, attributes, mask, past length)
    "4d": ((2, 4, 5, 3), (2, 4, 6, 3), (2, 4, 6, 2), {}, None, 0),
    "4d-gqa-causal": ((2, 4, 5, 3), (2, 2, 5, 3), (2, 2, 5, 2), {"is_causal": 1}, None, 0),
    "3d-gqa-float-mask-scale-softcap": ((2, 5, 12), (2, 6, 6), (2, 6, 4),
                                        {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.25, "softcap": 2.0},
                                        "float", 0),
    "4d-past-causal-bool-mask": ((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), {"is_causal": 1}, "bool", 2),
}


def _attention_model(case: str):
    qs, ks, vs, attrs, mask, past = ATTENTION_CASES[case]
    rng = np.random.default_rng(5)
    names, inputs, inits = ["q", "k", "v"], [("q", qs), ("k", ks), ("v", vs)], []
    total = ks[-2] + past
    if mask == "float":
        inits.append(numpy_helper.from_array(rng.standard_normal((qs[1], total)), "mask"))
    elif mask == "bool":
        allowed = np.ones((1, 1, qs[2], total), bool)
        allowed[..., 0, 0] = False
        inits.append(numpy_helper.from_array(allowed, "mask"))
    names.append("mask" if mask else "")
    if past:
        names += ["prev_k", "prev_v"]
        inputs += [("prev_k", (*ks[:2], past, ks[3])), ("prev_v", (*vs[:2], past, vs[3]))]
    ys = (*qs[:2], qs[1] and vs[-1] * attrs["q_num_heads"] // attrs["kv_num_heads"]) if len(qs) == 3 else \
        (*qs[:3], vs[-1])
    node = helper.make_node("Attention", names, ["y"], name="attn", **attrs)
    return _model([node], inputs, "y", list(ys), inits, opset=23), inits


def _attention_oracle(feeds, R, case, bias):
    """The op's forward and AttnLRP's relevance (epsilon 0) for Q, K, V (and past K/V) by the formulas: the scale
    Muls and softcap pass relevance, the A·V and Q·Kᵀ products split it, the softmax's Taylor rule, the mask's
    Add gives the scores their share ``scores ⊙ R / (scores + bias)``."""
    qs, ks, vs, attrs, _, past = ATTENTION_CASES[case]
    q, k, v = feeds["q"], feeds["k"], feeds["v"]
    heads = (attrs["q_num_heads"], attrs["kv_num_heads"]) if len(qs) == 3 else (qs[1], ks[1])

    def split(t, h):
        return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(0, 2, 1, 3) if len(qs) == 3 else t

    q, k, v = split(q, heads[0]), split(k, heads[1]), split(v, heads[1])
    if past:
        k, v = np.concatenate([feeds["prev_k"], k], 2), np.concatenate([feeds["prev_v"], v], 2)
    root = np.sqrt(attrs.get("scale", 1 / np.sqrt(q.shape[-1])))
    rep = heads[0] // heads[1]
    qr, kr, vr = q * root, np.repeat(k * root, rep, 1), np.repeat(v, rep, 1)
    qk = qr @ np.swapaxes(kr, -1, -2)
    cap = attrs.get("softcap")
    sc = cap * np.tanh(qk / cap) if cap else qk
    x = sc + bias
    s = np.exp(x - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    y = s @ vr
    R4 = split(R, heads[0])
    n = R4 / (2 * y)
    r_s, r_vr = s * (n @ np.swapaxes(vr, -1, -2)), vr * (np.swapaxes(s, -1, -2) @ n)
    r_x = np.where(s == 0, 0.0, x) * (r_s - s * r_s.sum(-1, keepdims=True))
    r_qk = np.where(np.isinf(x), 0.0, sc * r_x / np.where(np.isinf(x), 1.0, x))
    n2 = r_qk / (2 * qk)
    r_q, r_kr = qr * (n2 @ kr), kr * (np.swapaxes(n2, -1, -2) @ qr)

    def merge(r, h, cut=0):  # (repeated heads summed, past split off, heads joined for 3-D inputs)
        r = r.reshape(r.shape[0], h, rep, *r.shape[2:]).sum(2) if h != r.shape[1] else r
        old, r = r[:, :, :cut], r[:, :, cut:]
        return (r.transpose(0, 2, 1, 3).reshape(r.shape[0], r.shape[2], -1) if len(qs) == 3 else r), old

    out = {"relevance_q": merge(r_q, heads[0])[0]}
    (out["relevance_k"], old_k), (out["relevance_v"], old_v) = merge(r_kr, heads[1], past), merge(r_vr, heads[1], past)
    if past:
        out["relevance_prev_k"], out["relevance_prev_v"] = old_k, old_v
    y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1) if len(qs) == 3 else y
    return y, out


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_op_is_decomposed_into_attention_rules(case):
    """ONNX's Attention (opset 23) compiles under attnlrp: the compiled forward is the op's (onnx's reference
    kernel), the relevance of Q, K, V (and earlier K/V given as float inputs) is AttnLRP's by the formulas (float64,
    epsilon 0); no Attention node is left. Named as a decoder's cache (past_*), the earlier K/V are constants: no
    relevance for them, the same for Q, K, V."""
    model, inits = _attention_model(case)
    rng = np.random.default_rng(6)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
             for i in model.graph.input}
    want_y = _run64(model, feeds)["y"]
    R = rng.standard_normal(want_y.shape)
    qs, ks, _, attrs, mask, past = ATTENTION_CASES[case]
    total = ks[-2] + past
    bias = np.zeros((qs[-2] if len(qs) == 4 else qs[1], total))
    if mask == "float":
        bias = bias + numpy_helper.to_array(inits[0])
    elif mask == "bool":
        bias = bias + np.where(numpy_helper.to_array(inits[0]), 0.0, -np.inf)
    if attrs.get("is_causal"):
        i, j = np.arange(bias.shape[-2])[:, None], np.arange(total)[None]
        bias = bias + np.where(j <= i + past, 0.0, -np.inf)
    y, want = _attention_oracle(feeds, R, case, bias)
    assert rel_l2(y, want_y) < 1e-12
    compiled = lrpc.compile(model, "attnlrp", epsilon=0.0, stabilizer_eps=0.0)
    assert "Attention" not in {n.op_type for n in compiled.graph.node}
    got = _run64(compiled, {**feeds, "relevance_seed": R})
    assert rel_l2(got["y"], want_y) < 1e-12
    for name, r in want.items():
        assert rel_l2(got[name], r) < 1e-10, name
    if past:  # the earlier keys and values named as a decoder's cache (past_*): constants, the rest unchanged
        cached = onnx.ModelProto.FromString(model.SerializeToString())
        renamed = {"prev_k": "past_k", "prev_v": "past_v"}
        for t in cached.graph.input:
            t.name = renamed.get(t.name, t.name)
        cached.graph.node[0].input[:] = [renamed.get(n, n) for n in cached.graph.node[0].input]
        out = lrpc.compile(cached, "attnlrp", epsilon=0.0, stabilizer_eps=0.0)
        assert [o.name for o in out.graph.output] == ["y", "relevance_q", "relevance_k", "relevance_v"]
        got = _run64(out, {**{renamed.get(k, k): v for k, v in feeds.items()}, "relevance_seed": R})
        for name in ("relevance_q", "relevance_k", "relevance_v"):
            assert rel_l2(got[name], want[name]) < 1e-10, name


def test_attention_op_refuses_what_it_cannot_write_out():
    """The qk_matmul_output output is refused in one line naming the node."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y", "", "", "qk"], name="attn")
    m = _model([node, helper.make_node("Add", ["y", "y"], ["out"])],
               [("q", [1, 2, 3, 4]), ("k", [1, 2, 3, 4]), ("v", [1, 2, 3, 4])], "out", [1, 2, 3, 4], opset=23)
    m.graph.output.append(helper.make_tensor_value_info("qk", TensorProto.DOUBLE, [1, 2, 3, 3]))
    with pytest.raises(lrpc.UnsupportedError, match="'attn' \\(Attention\\).*qk_matmul_output"):
        lrpc.compile(m, "attnlrp")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_opset23_decoder_exports_with_attention_ops_match_the_detach_reference(tmp_path, name):
    """The dynamo exporter at opset 23 writes scaled_dot_product_attention as ONNX's Attention (and Llama's RMSNorm
    as RMSNormalization, which keeps its identity propagator): the tiny Llama (grouped-query, causal) and GPT-2 of
    tests/test_decoder.py compile under attnlrp and cp-lrp, run in onnxruntime, and their relevance at
    inputs_embeds is the detach reference's (float32, 1e-4 relative L2)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import warnings

    from test_decoder import GRAD_TOL, MODELS, D, T, _reference, _wrapped

    build, forward = MODELS[name]
    net = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapped(net), (torch.zeros(2, T, D),), dynamo=True, opset_version=23,
                          input_names=["inputs_embeds"], output_names=["logits"]).save(str(tmp_path / "m.onnx"),
                                                                                      external_data=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert "Attention" in {n.op_type for n in model.graph.node}
    e = np.random.default_rng(0).standard_normal((2, T, D)).astype(np.float32)
    for composite in ("attnlrp", "cp-lrp"):
        logits, seed, want = _reference(forward, net, e, composite)
        got = run_onnx(lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0),
                       {"inputs_embeds": e, "relevance_seed": seed})
        assert rel_l2(got["logits"], logits) < 1e-4
        assert rel_l2(got["relevance"], want) < GRAD_TOL


# ------------------------------------------------------------------------------------------- GeGLU, ReGLU
GLU_EXPORTS = {"legacy17": {"dynamo": False, "opset_version": 17}, "dynamo18": {"dynamo": True, "opset_version": 18},
               "dynamo20": {"dynamo": True, "opset_version": 20}}  # (opset 20: GELU as one Gelu node)


def _glu_net(act: str):
    """x -> down(f(a(x)) ⊙ b(x)) with f GELU (erf), GELU (tanh) or ReLU; ``mode`` "attnlrp"/"cp-lrp": the forward
    whose gradient × input is that composite's relevance (f(a) = a · sg(f(a)/a); attnlrp splits the product,
    cp-lrp holds the activation's factor constant)."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    f = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}[act]

    class GLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
            self.mode = None

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            if self.mode is None:
                return self.down(f(a) * b)
            g = a * (f(a) / a).detach()
            p = g.detach() * b if self.mode == "cp-lrp" else 0.5 * (g * b.detach()) + 0.5 * (g.detach() * b)
            return self.down(p)

    torch.manual_seed(0)
    return GLU().eval()


@pytest.mark.parametrize("exporter", list(GLU_EXPORTS))
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_geglu_and_reglu_match_the_detach_reference(tmp_path, act, exporter):
    """GeGLU (GELU as Erf arithmetic, tanh arithmetic or a Gelu node) and ReGLU: the activation is ONE activation
    (identity) and its output the gate of the product: attnlrp splits it 50/50, cp-lrp gives the other factor all;
    relevance = the detach reference (float32, 1e-4 relative L2)."""
    torch = pytest.importorskip("torch")
    import warnings

    net, x = _glu_net(act), torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    path, kw = tmp_path / "m.onnx", GLU_EXPORTS[exporter]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            torch.onnx.export(net, (x,), input_names=["input"], output_names=["logits"], **kw).save(
                str(path), external_data=False)
        else:
            torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"], **kw)
    model = onnx.load(str(path))
    for composite in ("attnlrp", "cp-lrp"):
        net.mode = composite
        xt = x.clone().requires_grad_(True)
        y = net(xt)
        net.mode = None
        k = y.argmax(1)
        y.gather(1, k[:, None]).sum().backward()
        seed = np.zeros(tuple(y.shape), np.float32)
        seed[np.arange(3), k.numpy()] = y.detach().numpy()[np.arange(3), k.numpy()]
        compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
        got = run_onnx(compiled, {"input": x.numpy(), "relevance_seed": seed})
        assert rel_l2(got["relevance"], (xt.grad * xt).detach().numpy()) < 1e-4
        assert ("split" if composite == "attnlrp" else "pass") in _rules_of(compiled).values()


def test_erf_gelu_product_is_one_activation_not_a_gate():
    """gelu(a) ⊙ b with GELU written out as ``a · 0.5 · (1 + erf(a / √2))``: under attnlrp R_a = R / 2 (GELU's identity
    after the gate's split). Taking GELU's own product ``a · Φ(a)`` as a gate split too would give
    ``R/4 · (1 + erf/(1 + erf))`` instead (the Φ branch's half through the Add's epsilon share): a different relevance,
    so the recognition is what the test sees."""
    from test_attention import _Erf

    nodes = [helper.make_node("Div", ["a", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["ae"]),
             helper.make_node("Mul", ["ae", "half"], ["gelu"]), helper.make_node("Mul", ["gelu", "b"], ["y"])]
    consts = [numpy_helper.from_array(np.array(v), n) for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0),
                                                                  ("half", 0.5))]
    m = _model(nodes, [("a", [2, 5]), ("b", [2, 5])], "y", [2, 5], consts)
    rng = np.random.default_rng(7)
    a, b, R = (rng.standard_normal((2, 5)) for _ in range(3))
    compiled = lrpc.compile(m, "attnlrp", epsilon=0.0, stabilizer_eps=0.0)
    ev = ReferenceEvaluator(compiled, new_ops=[_Erf])
    got = dict(zip(ev.output_names, ev.run(None, {"a": a, "b": b, "relevance_seed": R})))
    assert rel_l2(got["relevance_a"], R / 2) < 1e-12 and rel_l2(got["relevance_b"], R / 2) < 1e-12
    from math import erf

    e = np.vectorize(erf)(a / np.sqrt(2.0))
    as_gate = R / 4 * (1 + e / (1 + e))
    assert rel_l2(got["relevance_a"], as_gate) > 0.1


# ------------------------------------------------------------------------------------------- routing in decoders
def test_grouped_query_expand_sums_the_copies():
    """repeat_kv: Unsqueeze -> Expand -> Reshape of K [B, kv, T, d] to [B, heads, T, d]: each key/value head gets the
    summed relevance of the query heads it serves."""
    ints = {"ax": [2], "shape": [2, 2, 3, 5, 4], "flat": [2, 6, 5, 4]}
    nodes = [helper.make_node("Tanh", ["k"], ["t"]), helper.make_node("Unsqueeze", ["t", "ax"], ["u"]),
             helper.make_node("Expand", ["u", "shape"], ["e"]), helper.make_node("Reshape", ["e", "flat"], ["y"])]
    m = _model(nodes, [("k", [2, 2, 5, 4])], "y", [2, 6, 5, 4],
               [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in ints.items()])
    rng = np.random.default_rng(8)
    k, R = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 6, 5, 4))
    got = _run64(lrpc.compile(m, "attnlrp"), {"k": k, "relevance_seed": R})
    assert rel_l2(got["relevance"], R.reshape(2, 2, 3, 5, 4).sum(2)) < 1e-14


@pytest.mark.parametrize("composite", ["attnlrp", "epsilon"])
def test_where_with_a_constant_mask_routes_to_the_chosen_branch(composite):
    """Where(c, a, b) with a constant c, b broadcast ([1, 5]), then Neg (a scale by -1: identity): a gets R where c
    holds, b the rest summed over the broadcast axis; a masked fill ``Where(c, a, 0)`` gives a nothing where the
    constant was chosen. Gradient × input of the same graph (LRP-0 of data movement)."""
    rng = np.random.default_rng(9)
    cond = rng.random((2, 5)) > 0.5
    nodes = [helper.make_node("Tanh", ["a"], ["ta"]), helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("Where", ["cond", "ta", "tb"], ["w"]), helper.make_node("Neg", ["w"], ["y"])]
    m = _model(nodes, [("a", [2, 5]), ("b", [1, 5])], "y", [2, 5], [numpy_helper.from_array(cond, "cond")])
    a, b, R = rng.standard_normal((2, 5)), rng.standard_normal((1, 5)), rng.standard_normal((2, 5))
    got = _run64(lrpc.compile(m, composite, epsilon=0.0, stabilizer_eps=0.0), {"a": a, "b": b, "relevance_seed": R})
    assert rel_l2(got["relevance_a"], np.where(cond, R, 0.0)) < 1e-14
    assert rel_l2(got["relevance_b"], np.where(cond, 0.0, R).sum(0, keepdims=True)) < 1e-14
    fill = _model([helper.make_node("Tanh", ["a"], ["ta"]), helper.make_node("Where", ["cond", "ta", "zero"], ["y"])],
                  [("a", [2, 5])], "y", [2, 5], [numpy_helper.from_array(cond, "cond"),
                                                  numpy_helper.from_array(np.array(0.0), "zero")])
    got = _run64(lrpc.compile(fill, composite), {"a": a, "relevance_seed": R})
    assert rel_l2(got["relevance"], np.where(cond, R, 0.0)) < 1e-14


def test_where_with_a_condition_from_the_explained_input_is_refused():
    """Where(a > 0, t, b) with t and b computed from different inputs: no activation of one tensor, no rule (the
    comparison on the path is named)."""
    nodes = [helper.make_node("Greater", ["a", "zero"], ["pos"]), helper.make_node("Tanh", ["a"], ["ta"]),
             helper.make_node("Where", ["pos", "ta", "b"], ["y"], name="w")]
    m = _model(nodes, [("a", [2, 5]), ("b", [2, 5])], "y", [2, 5], [numpy_helper.from_array(np.array(0.0), "zero")])
    with pytest.raises(lrpc.UnsupportedError, match=r"\((Where|Greater)\)"):
        lrpc.compile(m, "attnlrp")


@pytest.mark.parametrize("axis", [1, 2])
def test_reduce_mean_of_a_live_tensor(axis):
    """ReduceMean over the tokens or the hidden axis of a live [B, T, D] tensor: the norm rule, each cell its share
    ``t/K · R / mean`` (epsilon 0)."""
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("ReduceMean", ["t", "axes"], ["y"], keepdims=0)]
    shape = [2, 3] if axis == 1 else [2, 4]
    m = _model(nodes, [("x", [2, 4, 3])], "y", shape, [numpy_helper.from_array(np.array([axis], np.int64), "axes")],
               opset=18)
    x = rng.standard_normal((2, 4, 3))
    t = np.tanh(x)
    y = t.mean(axis)
    R = rng.standard_normal(y.shape)
    got = _run64(lrpc.compile(m, "attnlrp", epsilon=0.0, stabilizer_eps=0.0), {"x": x, "relevance_seed": R})
    assert rel_l2(got["relevance"], t / t.shape[axis] * np.expand_dims(R / y, axis)) < 1e-12


def test_opset23_torchvision_vit_with_attention_ops_matches_the_detach_reference(tmp_path):
    """torchvision's VisionTransformer exported by dynamo at opset 23 (nn.MultiheadAttention becomes ONNX's Attention):
    attnlrp and cp-lrp relevance = the detach reference of tests/test_attention.py (float32, 1e-4 relative L2)."""
    torch = pytest.importorskip("torch")
    import warnings

    from test_attention import check_torchvision_vit, torchvision_vit

    net = torchvision_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, 32, 32),), dynamo=True, opset_version=23, input_names=["input"],
                          output_names=["logits"]).save(str(tmp_path / "vit.onnx"), external_data=False)
    model = onnx.load(str(tmp_path / "vit.onnx"))
    assert "Attention" in {n.op_type for n in model.graph.node}
    check_torchvision_vit(net, model, "dynamo23")


def _masked_scores(form: str) -> onnx.ModelProto:
    """``x W ∓ 3·(1 - mask)`` (a padding mask made from an integer input: no function of the explained x, as
    Funnel's and older BERT exports' ``scores - 1e4·(1 - mask)``), then a second MatMul. ``form``: "sub" (x W - m),
    "sub-first" (m - x W), or the same written as Adds ("add": x W + (-m), "add-first": m + Neg(x W))."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 5)), "W"), numpy_helper.from_array(
        rng.standard_normal((5, 3)), "W2"), numpy_helper.from_array(np.array(1.0), "one"),
             numpy_helper.from_array(np.array(-3.0 if form == "add" else 3.0), "big")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Cast", ["mask"], ["mf"], to=11),
             helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["m"])]
    nodes += {"sub": [helper.make_node("Sub", ["y", "m"], ["z"])],
              "sub-first": [helper.make_node("Sub", ["m", "y"], ["z"])],
              "add": [helper.make_node("Add", ["y", "m"], ["z"])],
              "add-first": [helper.make_node("Neg", ["y"], ["ny"]), helper.make_node("Add", ["m", "ny"], ["z"])]}[form]
    nodes.append(helper.make_node("MatMul", ["z", "W2"], ["out"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 4]),
                                       helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 5])],
                          [helper.make_tensor_value_info("out", TensorProto.DOUBLE, [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("first", [False, True])
def test_difference_with_a_computed_mask_is_a_bias(first):
    """``a - m`` or ``m - a`` with ``m`` computed from another (integer) input: a bias add of ``-m`` (or of ``m`` to
    ``-a``). Oracles: a float64 numpy reference of the epsilon composite at epsilon 0 (epsilon on the products, pass
    on the bias add: ``R_a = R``), gradient × input under attnlrp at epsilon 0 (epsilon on the bias add too), and
    every composite gives the relevance of the same graph written with Add and Neg."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 4))
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], np.int64)
    sub = _masked_scores("sub-first" if first else "sub")
    w = {i.name: numpy_helper.to_array(i) for i in sub.graph.initializer}
    y, m = x @ w["W"], 3.0 * (1.0 - mask)
    z = m - y if first else y - m
    out = z @ w["W2"]
    k = out.argmax(1)
    seed = np.zeros_like(out)
    seed[np.arange(2), k] = out[np.arange(2), k]
    r_z = z * ((seed / out) @ w["W2"].T)  # (LRP-0 of the last MatMul: z ⊙ W2 (R / out))
    want = x * ((r_z / y) @ w["W"].T)  # (the bias add passes R_z to a = x W, whose LRP-0 follows)
    feeds = {"x": x, "mask": mask, "relevance_seed": seed}
    got = _run64(lrpc.compile(sub, "epsilon", epsilon=0.0, stabilizer_eps=0.0), feeds)["relevance"]
    assert rel_l2(got, want) < 1e-12
    # attnlrp's epsilon on the bias add too: at epsilon 0 gradient × input
    got = _run64(lrpc.compile(sub, "attnlrp", epsilon=0.0, stabilizer_eps=0.0), feeds)["relevance"]
    assert rel_l2(got, x * (-1.0 if first else 1.0) * (w["W"] @ w["W2"])[:, k].T) < 1e-12
    add = _masked_scores("add-first" if first else "add")
    for composite in ("epsilon", "attnlrp", "cp-lrp", "epsilon-gamma-box"):
        expected = _run64(lrpc.compile(add, composite, epsilon=0.05, sum_rule="norm"), feeds)["relevance"]
        got = _run64(lrpc.compile(sub, composite, epsilon=0.05, sum_rule="norm"), feeds)["relevance"]
        assert rel_l2(got, expected) < 1e-12, composite


def test_difference_of_two_computed_tensors_is_a_sum():
    """``x W - x V`` (both depend on the explained input, as PoolFormer's ``pool(x) - x``): a residual sum of
    ``x W`` and ``-x V``. Oracles: LRP-0 (epsilon composite at epsilon 0: epsilon on the products, norm on the sum) is
    gradient × input, and every composite gives the relevance of the same graph written as Add of a Neg."""
    rng = np.random.default_rng(13)
    w, v, w2 = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (v, "V"), (w2, "W2"))]

    def model(sub: bool):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["x", "V"], ["u"])]
        nodes += ([helper.make_node("Sub", ["y", "u"], ["z"])] if sub else
                  [helper.make_node("Neg", ["u"], ["nu"]), helper.make_node("Add", ["y", "nu"], ["z"])])
        return _model(nodes + [helper.make_node("MatMul", ["z", "W2"], ["out"])], [("x", [2, 4])], "out", [2, 3],
                      inits)

    x = rng.standard_normal((2, 4))
    out = x @ (w - v) @ w2
    k = out.argmax(1)
    seed = np.zeros_like(out)
    seed[np.arange(2), k] = out[np.arange(2), k]
    feeds = {"x": x, "relevance_seed": seed}
    got = _run64(lrpc.compile(model(True), "epsilon", epsilon=0.0, stabilizer_eps=0.0), feeds)["relevance"]
    assert rel_l2(got, x * ((w - v) @ w2)[:, k].T) < 1e-12
    assert _rules_of(lrpc.compile(model(True), "epsilon"))["Sub_2"].startswith("norm")
    for composite in ("epsilon", "attnlrp", "epsilon-gamma-box"):
        for sum_rule in ("norm", "sign-norm"):
            expected = _run64(lrpc.compile(model(False), composite, sum_rule=sum_rule), feeds)["relevance"]
            got = _run64(lrpc.compile(model(True), composite, sum_rule=sum_rule), feeds)["relevance"]
            assert rel_l2(got, expected) < 1e-12, (composite, sum_rule)

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
from onnx import TensorProto, helper
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

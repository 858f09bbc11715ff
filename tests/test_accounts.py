"""Per-layer relevance accounts (``lrpc.emit.Context.account``, outputs ``relevance_sum_{kept,bias,zero}/<node>`` of
``--layerwise``) and what ``lrpc check`` makes of them.

A layer's rule passes on ``kept`` (its messages times its numerators, computed with forward ops), its biases take
``bias``, the relevance arriving where its denominator is 0 is ``zero`` (no numerator can carry it); the rest of
what arrives is the stabilizer's. Oracle: the dense float64 references of tests/oracles.py, with the bias as one
more input of constant 1 whose weight column is the bias (every rule's bias variant is then that input's term:
b, b+, b-, b + γb±, b²); the ``zero`` share is what the rule loses with eps = 0. Run with onnx.reference in float64,
1e-8 relative. Then: the accounts add up (``Σ in = kept``) on every layer of real networks, and ``lrpc check``
fails where an adjoint is wrong."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lrpc
from lrpc.check import run_check
from lrpc.contract import layer_sums
from oracles import rule_dense, safe_div, stab
from test_rules_oracle import RULES, _on_residual_branch, compile_rule, make_case, run_model

KINDS = ["conv_depthwise", "conv2d_s2_asym", "convT_grouped", "gemm_transB", "matmul_3d"]
ACCOUNT_RULES = ["epsilon", "zplus", "alpha2beta1", "gamma", "sign-norm", "zbox", "flat", "wsquare"]
BIASED = ("epsilon", "zplus", "alpha-beta", "gamma", "sign-norm", "wsquare")  # rules with a bias in the denominator


def dense_accounts(layer, rule: str, x, R, zero_bias: bool, **kw) -> np.ndarray:
    """[N, 3]: (kept, bias, zero) per sample, literally from the dense rule."""
    M, b = layer.dense(), layer.bias_flat()
    low, high = kw.pop("low", None), kw.pop("high", None)
    bounds = {} if rule != "zbox" else {k: np.broadcast_to(np.asarray(v, np.float64), layer.in_shape).reshape(-1)
                                        for k, v in (("low", low), ("high", high))}
    M1 = layer.dense(layer.w_ones) if rule == "flat" else None
    out = []
    for xs, Rs in zip(np.asarray(x, np.float64), np.asarray(R, np.float64)):
        xs, Rs = xs.reshape(-1), Rs.reshape(-1)
        kept = rule_dense(rule, M, b, xs, Rs, zero_bias=zero_bias, M1=M1, **bounds, **kw).sum()
        if rule in BIASED and not zero_bias:  # the bias as an input of constant 1 with weight column b
            Ma, xa = np.hstack([M, b[:, None]]), np.append(xs, 1.0)
            aug = rule_dense(rule, Ma, np.zeros_like(b), xa, Rs, **kw)
            np.testing.assert_allclose(aug[:-1].sum(), kept, rtol=1e-10, atol=1e-12)
            bias = aug[-1]
            passed = rule_dense(rule, Ma, np.zeros_like(b), xa, Rs, **{**kw, "eps": 0.0}).sum()
        else:
            bias = 0.0
            passed = rule_dense(rule, M, b, xs, Rs, zero_bias=zero_bias, M1=M1, **bounds, **{**kw, "eps": 0.0}).sum()
        out.append((kept, bias, Rs.sum() - passed))
    return np.array(out)


def lrpc_accounts(model, outs) -> np.ndarray:
    """[N, 3] of the one layer with a rule: its kept, bias and zero outputs (0 where not reported)."""
    import json as _json

    meta = {p.key: p.value for p in model.metadata_props}
    name = next(layer["name"] for layer in _json.loads(meta["lrpc.layers"]) if layer["rule"] != "route")
    n = len(outs[f"relevance_sum_out/{name}"])
    return np.stack([outs.get(f"relevance_sum_{k}/{name}", np.zeros(n)) for k in ("kept", "bias", "zero")],
                    axis=1), name


@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "zero_bias"])
@pytest.mark.parametrize("rule_id", ACCOUNT_RULES)
@pytest.mark.parametrize("kind", KINDS)
def test_accounts_match_dense(kind, rule_id, zero_bias, tmp_path):
    """On inputs with zeros (a ReLU map: z-plus and alpha-beta meet outputs whose denominator is 0) and biases of
    both signs: the three accounts of one layer against the dense rule, and Σ relevance sent down = kept."""
    _, rule, params, options, oracle_kw = next(r for r in RULES if r[0] == rule_id)
    case = make_case(kind, np.float64)
    model = compile_rule(case, rule, params, {**options, "zero_bias": zero_bias, "layerwise": "sums"}, tmp_path)
    x = np.maximum(case.x, 0.0)
    R = np.random.default_rng(1).normal(size=case.layer.forward(x).shape)
    out = run_model(model, {"x": x, "relevance_seed": R}, np.float64)
    got, name = lrpc_accounts(model, out)
    want = dense_accounts(case.layer, rule, x, R, zero_bias, **oracle_kw)
    scale = np.abs(R).sum(axis=tuple(range(1, R.ndim)))[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * scale.max(), err_msg=f"{kind} {rule_id}")
    np.testing.assert_allclose(out[f"relevance_sum_in/{name}"], got[:, 0], rtol=1e-8, atol=1e-10 * scale.max())
    if (kind, rule_id) == ("conv_depthwise", "zplus"):  # (the case exercises zero denominators)
        assert np.all(want[:, 2] != 0)


@pytest.mark.parametrize("rule_id", ["epsilon", "gamma"])
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "gemm_transB"])
def test_accounts_on_a_residual_branch(kind, rule_id, tmp_path):
    """epsilon and gamma on a layer whose relevance is ``z ⊙ c`` (a branch of a residual sum) take the folded
    form (``_on_own_output``); their accounts against the dense rule, and the sum's own accounts (kept = Σ R,
    no bias, no zero denominator)."""
    name = rule_id
    params = {"epsilon": 0.05} if name == "epsilon" else {"gamma": 0.5}
    case = make_case(kind, np.float64)
    model = _on_residual_branch(case, True, np.float64)
    where = {"op": case.op} if case.op != "MatMul" else {"name": "layer"}
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{**where, "rule": name, "params": params}]}))
    compiled = lrpc.compile(model, str(spec), stabilizer_eps=1e-3, layerwise="sums")
    assert {"Abs", "LeakyRelu"} & {n.op_type for n in compiled.graph.node}  # the folded form runs
    rng = np.random.default_rng(3)
    xr = np.maximum(case.x, 0)
    z = case.layer.forward(xr)
    s = rng.normal(size=z.shape)
    R = rng.normal(size=z.shape)
    out = run_model(compiled, {"x": case.x, "s": s, "relevance_seed": R}, np.float64)
    c = safe_div(R, stab(z + s, 1e-3))
    kw = {"eps": 0.05} if name == "epsilon" else {"eps": 1e-3, "gamma": 0.5}
    want = dense_accounts(case.layer, name, xr, z * c, False, **kw)
    layer = next(n.name for n in compiled.graph.node if n.op_type in ("Conv", "Gemm") and not n.name.startswith("lrp"))
    got = np.stack([out[f"relevance_sum_{k}/{layer}"] if f"relevance_sum_{k}/{layer}" in out else np.zeros(len(R))
                    for k in ("kept", "bias", "zero")], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["relevance_sum_kept/residual"], (c * (z + s)).reshape(len(R), -1).sum(1), rtol=1e-10)
    assert "relevance_sum_bias/residual" not in out and np.all(out["relevance_sum_zero/residual"] == 0)


def test_accounts_of_sum_with_constant_and_mean(tmp_path):
    """A Sum with a constant operand (a bias: its share is the bias account) and a ReduceMean (norm): dense
    float64, eps = 0 (the zero account is the relevance arriving where the sum / mean is exactly 0)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    shape = [2, 3, 4, 4]
    B = rng.normal(size=(1, 3, 1, 1))
    # (Relu of another input: x + relu(x) + B is an activation)
    nodes = [helper.make_node("Relu", ["v"], ["r"], name="relu"),
             helper.make_node("Sum", ["x", "r", "B"], ["s"], name="sum"),
             helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Concat", ["m", "m"], ["y"], name="cat", axis=1)]
    g = helper.make_graph(nodes[:2], "g", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, shape) for n in "xv"],
                          [helper.make_tensor_value_info("s", TensorProto.DOUBLE, shape)],
                          [numpy_helper.from_array(B, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x, v = rng.normal(size=shape), rng.normal(size=shape)
    x[0, 0] = v[0, 0] = 0.0  # 0 + relu(0) + B: the sum is exactly B there; made exactly 0 below
    B2 = B.copy()
    B2[0, 0] = 0.0
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(B2, "B"))
    R = rng.normal(size=shape)
    out = run_model(lrpc.compile(m, "epsilon", epsilon=0.0, stabilizer_eps=0.0, layerwise="sums"),
                    {"x": x, "v": v, "relevance_seed": R}, np.float64)
    z = x + np.maximum(v, 0) + B2
    c = safe_div(R, z)
    per = lambda t: t.reshape(2, -1).sum(1)
    np.testing.assert_allclose(out["relevance_sum_kept/sum"], per(c * (x + np.maximum(v, 0))), rtol=1e-10)
    np.testing.assert_allclose(out["relevance_sum_bias/sum"], per(c * B2), rtol=1e-10)
    np.testing.assert_allclose(out["relevance_sum_zero/sum"], per(R * (z == 0)), rtol=1e-10)
    assert per(R * (z == 0))[0] != 0
    np.testing.assert_allclose(
        out["relevance_sum_kept/sum"] + out["relevance_sum_bias/sum"] + out["relevance_sum_zero/sum"],
        per(R), rtol=1e-10)

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), nodes[2]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, shape)],
                          [helper.make_tensor_value_info("m", TensorProto.DOUBLE, shape[:2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.graph.node[1].CopyFrom(helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="mean", keepdims=0))
    m.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    x[1, 2] = -1.0  # an all-zero window: its mean is 0
    R = rng.normal(size=shape[:2])
    compiled = lrpc.compile(m, "epsilon", epsilon=0.0, stabilizer_eps=0.0, layerwise="sums")
    out = run_model(compiled, {"x": x, "relevance_seed": R}, np.float64)
    mean = np.maximum(x, 0).mean(axis=(2, 3))
    np.testing.assert_allclose(out["relevance_sum_kept/mean"], (safe_div(R, mean) * mean).sum(1), rtol=1e-10)
    np.testing.assert_allclose(out["relevance_sum_zero/mean"], (R * (mean == 0)).sum(1), rtol=1e-10)
    assert out["relevance_sum_zero/mean"][1] != 0


def test_accounts_add_up_on_every_layer(zoo_proto, run_compiled):
    """ResNet-18 (biases kept) under three composites: every layer sends down what its rule passes on (Σ in =
    kept, 1e-5 of Σ seed), and Σ input relevance = Σ seed − Σ absorbed (1e-5)."""
    proto = zoo_proto("resnet18", "legacy")
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    for composite in ("epsilon-gamma-box", "epsilon-plus", "epsilon-alpha2-beta1"):
        model = lrpc.compile(proto, composite, low=-3, high=3, layerwise="sums")
        seed = np.zeros((1, 1000), np.float32)
        seed[0, 7] = 1.0
        outs = run_compiled(model, {"input": x, "relevance_seed": seed})
        rows = layer_sums(model, outs)
        assert any(row["bias"] != 0 for row, *_ in rows)
        for row, s_in, s_out, _ in rows:
            assert abs(s_in - row["kept"]) <= 1e-5, (composite, row["name"], s_in, row["kept"])
        absorbed = sum(s_out - row["kept"] for row, _, s_out, _ in rows)
        assert abs(outs["relevance"].sum(dtype=np.float64) - 1.0 + absorbed) <= 1e-5, composite


def test_check_fails_on_a_wrong_adjoint(monkeypatch):
    """A convolution adjoint that sends 1% too much (a broken route): conservation fails at that layer, while the
    same model passes as it is."""
    from lrpc.relevance import linear

    digits = "models/digits_cnn.onnx"
    assert run_check(digits, "epsilon-plus").passed
    adjoint = linear.ConvView.adjoint

    def wrong(self, c, w):
        out = adjoint(self, c, w)
        return self.b.mul(out, self.b.const(1.01)) if self.node.name == "/body/body.4/Conv" else out

    monkeypatch.setattr(linear.ConvView, "adjoint", wrong)
    report = run_check(digits, "epsilon-plus")
    cons = next(c for c in report.checks if c.name == "conservation")
    assert not cons.passed and "first break (from the output) at layer '/body/body.4/Conv'" in cons.message
    assert [r["name"] for r in report.layers if r["breaks"]] == ["/body/body.4/Conv"]


@pytest.fixture(scope="module")
def arch_cases(tmp_path_factory):
    from test_architectures import Case, _build

    root, cache = tmp_path_factory.mktemp("archs"), {}

    def get(name):
        if name not in cache:
            cache[name] = Case(_build(name, root))
        return cache[name]

    return get


def _arch_names():
    from test_architectures import ALL

    return ALL


@pytest.mark.parametrize("name", _arch_names())
def test_accounts_add_up_on_every_architecture(arch_cases, name):
    """Every model of the architecture suite (tests/test_architectures.py: ReLU CNNs, BatchNorm left standalone,
    gates, activations written as several ops, normalization layers, old opsets, hand-built graph forms), biases kept,
    under epsilon-gamma-box, epsilon-plus and epsilon: each layer sends down what its rule passes on, and Σ input
    relevance = Σ seed − Σ absorbed, to 1e-6 of max(|Σ seed|, Σ|R|) (measured: at most 1.8e-6 / 5.8e-6 absolute)."""
    from lrpc.contract import input_relevance_names
    from test_architectures import _session, one_hot_top1

    case = arch_cases(name)
    y = case.outputs[case.explained_output]
    seed = one_hot_top1(y.reshape(len(y), -1)).reshape(y.shape)
    for composite in ("epsilon-gamma-box", "epsilon-plus", "epsilon"):
        model = lrpc.compile(case.proto, composite, low=-3, high=3, layerwise="sums", output=case.arch.output)
        sess = _session(model)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**case.feeds, "relevance_seed": seed})))
        rows = layer_sums(model, outs)
        size = sum(np.abs(outs[k]).sum(dtype=np.float64) for k in input_relevance_names(outs))
        tol = 1e-6 * max(abs(seed.sum()), size)
        for row, s_in, _, _ in rows:
            assert abs(s_in - row["kept"]) <= tol, (composite, row["name"], s_in, row["kept"])
        absorbed = sum(s_out - row["kept"] for row, _, s_out, _ in rows)
        total = sum(outs[k].sum(dtype=np.float64) for k in input_relevance_names(outs))
        assert abs(total - seed.sum() + absorbed) <= tol, composite

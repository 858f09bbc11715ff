"""Every LRP rule on every linear op kind against the dense-matrix numpy references of tests/oracles.py.

One-layer models (input -> linear op -> output) are built with onnx.helper, compiled with a rule file that
assigns the rule to that op, and run in float64 with onnx.reference (rtol 1e-8) and in float32 with
onnxruntime (1e-4 relative)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose

import lrpc
from lrpc.relevance import linear
from oracles import Layer, conv_nd, conv_transpose_nd, gemm, matmul, relevance, safe_div, stab

ONNX_TYPE = {np.float64: TensorProto.DOUBLE, np.float32: TensorProto.FLOAT}


@dataclass
class Case:
    """A one-layer model and its numpy oracle."""

    model: onnx.ModelProto
    layer: Layer
    x: np.ndarray  # [N, *in_shape]
    op: str
    channels: int  # input channels (axis 1) for per-channel z-box bounds


def _normal(rng, size, dtype):
    """Standard normal values exactly representable in ``dtype`` (the model stores them in ``dtype``)."""
    return rng.normal(size=size).astype(dtype).astype(np.float64)


def _model(op, inputs, attrs, x_shape, y_shape, inits, dtype, extra_nodes=()):
    t = ONNX_TYPE[dtype]
    nodes = [helper.make_node(op, inputs, ["y" if not extra_nodes else "z"], name="layer", **attrs), *extra_nodes]
    graph = helper.make_graph(
        nodes, "one_layer",
        [helper.make_tensor_value_info("x", t, list(x_shape))],
        [helper.make_tensor_value_info("y", t, list(y_shape))],
        [numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv_case(dtype, rng, x_shape, w_shape, group=1, strides=None, pads=None, dilations=None):
    w = _normal(rng, w_shape, dtype)
    b = _normal(rng, w_shape[0], dtype) * 0.5
    x = _normal(rng, x_shape, dtype)
    kw = dict(strides=strides, pads=pads, dilations=dilations, group=group)
    y_shape = conv_nd(x, w, b, **kw).shape
    attrs = {k: v for k, v in dict(strides=strides, pads=pads, dilations=dilations).items() if v}
    attrs.update(group=group, kernel_shape=list(w_shape[2:]))
    model = _model("Conv", ["x", "W", "B"], attrs, x_shape, y_shape, {"W": w, "B": b}, dtype)
    bias_out = b.reshape([-1] + [1] * (len(x_shape) - 2))
    layer = Layer(lambda X, W: conv_nd(X, W, **kw), w, tuple(x_shape[1:]), bias_out, np.ones_like(w))
    return Case(model, layer, x, "Conv", x_shape[1])


def _convt_case(dtype, rng, x_shape, w_shape, group=1, strides=None, pads=None, dilations=None, output_padding=None):
    w = _normal(rng, w_shape, dtype)
    m = w_shape[1] * group
    b = _normal(rng, m, dtype) * 0.5
    x = _normal(rng, x_shape, dtype)
    kw = dict(strides=strides, pads=pads, dilations=dilations, group=group, output_padding=output_padding)
    y_shape = conv_transpose_nd(x, w, b, **kw).shape
    attrs = {k: v for k, v in kw.items() if v and k != "group"}
    attrs.update(group=group)
    model = _model("ConvTranspose", ["x", "W", "B"], attrs, x_shape, y_shape, {"W": w, "B": b}, dtype)
    bias_out = b.reshape([-1] + [1] * (len(x_shape) - 2))
    layer = Layer(lambda X, W: conv_transpose_nd(X, W, **kw), w, tuple(x_shape[1:]), bias_out, np.ones_like(w))
    return Case(model, layer, x, "ConvTranspose", x_shape[1])


def _dense_cases(kind, dtype, rng):
    n, k, m = 3, 10, 6
    x = _normal(rng, (n, k), dtype)
    if kind == "gemm_transB":
        w, b = _normal(rng, (m, k), dtype), _normal(rng, m, dtype) * 0.5
        model = _model("Gemm", ["x", "W", "B"], {"transB": 1}, x.shape, (n, m), {"W": w, "B": b}, dtype)
        layer = Layer(lambda X, W: gemm(X, W, trans_b=1), w, (k,), b, np.ones_like(w))
        return Case(model, layer, x, "Gemm", k)
    if kind == "gemm_alpha_beta":  # Y = alpha * X B + beta * C, C [1, m]: normalized by the compiler
        alpha, beta = -0.75, 1.5  # exact in float32 (ONNX float attributes)
        w, c = _normal(rng, (k, m), dtype), _normal(rng, (1, m), dtype) * 0.5
        model = _model("Gemm", ["x", "W", "C"], {"transA": 0, "transB": 0, "alpha": alpha, "beta": beta},
                       x.shape, (n, m), {"W": w, "C": c}, dtype)
        # the linear map's weight is alpha * B; the flat rule's all-ones weight is a plain ones matrix
        layer = Layer(lambda X, W, a=alpha: gemm(X, W, alpha=a if W is w else 1.0), w, (k,), beta * c.reshape(-1),
                      np.ones_like(w))
        return Case(model, layer, x, "Gemm", k)
    if kind in ("matmul", "matmul_add"):
        w, b = _normal(rng, (k, m), dtype), _normal(rng, m, dtype) * 0.5
        inits, extra = {"W": w}, ()
        if kind == "matmul_add":
            inits["B"] = b
            extra = (helper.make_node("Add", ["z", "B"], ["y"], name="bias"),)
        model = _model("MatMul", ["x", "W"], {}, x.shape, (n, m), inits, dtype, extra)
        layer = Layer(matmul, w, (k,), b if kind == "matmul_add" else None, np.ones_like(w))
        return Case(model, layer, x, "MatMul", k)
    if kind == "matmul_3d":  # rank-3 input: stays a MatMul in the canonical graph
        x = _normal(rng, (2, 3, k), dtype)
        w = _normal(rng, (k, m), dtype)
        model = _model("MatMul", ["x", "W"], {}, x.shape, (2, 3, m), {"W": w}, dtype)
        return Case(model, Layer(matmul, w, (3, k), None, np.ones_like(w)), x, "MatMul", 3)
    raise ValueError(kind)


def make_case(kind: str, dtype, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    if kind == "conv2d_s2_asym":  # stride 2, odd size, TF-SAME-style asymmetric pads
        return _conv_case(dtype, rng, (2, 3, 7, 7), (4, 3, 3, 3), strides=[2, 2], pads=[0, 0, 1, 1])
    if kind == "conv_depthwise":
        return _conv_case(dtype, rng, (2, 4, 6, 5), (4, 1, 3, 3), group=4, pads=[1, 1, 1, 1])
    if kind == "conv_grouped_dilated":
        return _conv_case(dtype, rng, (2, 4, 7, 6), (6, 2, 3, 2), group=2, dilations=[2, 2], pads=[1, 0, 2, 1],
                          strides=[1, 2])
    if kind == "conv_s1_grouped_dilated":  # stride 1: adjoint lowered as a Conv with flipped weights
        return _conv_case(dtype, rng, (2, 4, 7, 6), (6, 2, 3, 2), group=2, dilations=[2, 1], pads=[2, 0, 1, 1])
    if kind == "conv_s1_1xk":  # one group, kernel 1 on one axis: flipped (Transpose, then reversed) on the other only
        return _conv_case(dtype, rng, (2, 3, 5, 6), (4, 3, 1, 3), pads=[0, 1, 0, 0])
    if kind == "conv_s1_pointwise":  # 1x1, two groups: the flip is the group-wise in/out swap alone
        return _conv_case(dtype, rng, (2, 4, 5, 5), (6, 2, 1, 1), group=2)
    if kind == "conv_s1_bigpad":  # pads wider than the kernel: falls back to ConvTranspose
        return _conv_case(dtype, rng, (2, 3, 5, 5), (4, 3, 2, 2), pads=[2, 2, 3, 1])
    if kind == "conv1d":
        return _conv_case(dtype, rng, (2, 3, 11), (5, 3, 4), strides=[3], pads=[1, 2])
    if kind == "convT_s2_outpad":
        return _convt_case(dtype, rng, (2, 3, 4, 5), (3, 4, 3, 3), strides=[2, 2], pads=[1, 0, 1, 1],
                           output_padding=[1, 1])
    if kind == "convT_grouped":
        return _convt_case(dtype, rng, (2, 4, 3, 3), (4, 3, 2, 3), group=2, strides=[2, 1], dilations=[1, 2],
                           pads=[0, 1, 1, 0])
    return _dense_cases(kind, dtype, rng)


OPS = ["conv2d_s2_asym", "conv_depthwise", "conv_grouped_dilated", "conv_s1_grouped_dilated", "conv_s1_1xk",
       "conv_s1_pointwise", "conv_s1_bigpad", "conv1d", "convT_s2_outpad", "convT_grouped",
       "gemm_transB", "gemm_alpha_beta", "matmul", "matmul_add", "matmul_3d"]

# (id, rule name, rule-file params, compile options, oracle keyword arguments)
RULES = [
    ("epsilon", "epsilon", {"epsilon": 0.05}, {}, {"eps": 0.05}),
    ("epsilon0", "epsilon", {"epsilon": 0.0}, {}, {"eps": 0.0}),
    ("zplus", "zplus", {}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
    ("alpha2beta1", "alpha-beta", {"alpha": 2.0, "beta": 1.0}, {"stabilizer_eps": 1e-3},
     {"eps": 1e-3, "alpha": 2.0, "beta": 1.0}),
    ("alpha1beta0", "alpha-beta", {"alpha": 1.0, "beta": 0.0}, {"stabilizer_eps": 1e-3},
     {"eps": 1e-3, "alpha": 1.0, "beta": 0.0}),
    ("alpha1.5beta0.5", "alpha-beta", {"alpha": 1.5, "beta": 0.5}, {"stabilizer_eps": 1e-3},
     {"eps": 1e-3, "alpha": 1.5, "beta": 0.5}),
    ("gamma", "gamma", {"gamma": 0.5}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3, "gamma": 0.5}),
    ("sign-norm", "sign-norm", {}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
    ("zbox", "zbox", {"low": -1.5, "high": 2.0}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3, "low": -1.5, "high": 2.0}),
    ("zbox_channel", "zbox", "per-channel", {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
    ("zbox_full", "zbox", "input-shaped", {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
    ("flat", "flat", {}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
    ("wsquare", "wsquare", {}, {"stabilizer_eps": 1e-3}, {"eps": 1e-3}),
]


def _zbox_bounds(case: Case, kind: str):
    """Per-channel (one value per input channel, axis 1) or input-shaped bounds with low < 0 < high."""
    if kind == "input-shaped":
        rng = np.random.default_rng(7)
        low, high = (np.float32(rng.uniform(0.5, 2.0, case.layer.in_shape)).astype(np.float64) * sign
                     for sign in (-1, 1))
        return {"low": low.tolist(), "high": high.tolist()}, {"low": low, "high": high}
    c = case.channels
    low = [-1.0 - 0.25 * i for i in range(c)]
    high = [0.5 + 0.3 * i for i in range(c)]
    shape = [c] + [1] * (len(case.layer.in_shape) - 1)
    return {"low": low, "high": high}, {"low": np.reshape(low, shape), "high": np.reshape(high, shape)}


def compile_rule(case: Case, rule: str, params: dict, options: dict, tmp_path):
    # rule files match the *canonical* op type, and a rank-2 MatMul(+Add) becomes a Gemm: match by node name
    # there (see test_rule_file_op_matches_rank2_matmul)
    where = {"op": case.op} if case.op != "MatMul" else {"name": "layer"}
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{**where, "rule": rule, "params": params}]}))
    return lrpc.compile(case.model, str(spec), **options)


class ConvTranspose(_RefConvTranspose):
    """onnx.reference's ConvTranspose with group > 1 slices W by output instead of input channels and
    writes one output channel per group (wrong unless depthwise): run each group with group=1 instead."""

    op_domain = ""

    def _run(self, X, W, B=None, group=None, **attrs):
        g = int(group or 1)
        if g == 1:
            return super()._run(X, W, B, group=1, **attrs)
        cg, mg = X.shape[1] // g, W.shape[1]
        parts = [super(ConvTranspose, self)._run(X[:, i * cg:(i + 1) * cg], W[i * cg:(i + 1) * cg],
                                                 None if B is None else B[i * mg:(i + 1) * mg], group=1, **attrs)[0]
                 for i in range(g)]
        return (np.concatenate(parts, axis=1).astype(X.dtype),)


def run_model(model: onnx.ModelProto, feeds: dict, dtype) -> dict:
    if dtype == np.float64:
        sess = ReferenceEvaluator(model, new_ops=[ConvTranspose])
        names = [o.name for o in model.graph.output]
        return dict(zip(names, sess.run(None, feeds)))
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_close(got, want, dtype, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = max(np.max(np.abs(want)), 1e-300)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * scale, err_msg=what)
    else:
        rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
        assert rel < 1e-4, f"{what}: relative L2 error {rel:.2e}"
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale, err_msg=what)


def check(kind, rule_id, dtype, tmp_path, zero_bias=False, stabilizer="sign", seed=0, eps=None, columns=None):
    """``columns``: the seed is zero outside these output columns (last axis)."""
    _, rule, params, options, oracle_kw = next(r for r in RULES if r[0] == rule_id)
    case = make_case(kind, dtype, seed)
    oracle_kw = dict(oracle_kw)
    if params in ("per-channel", "input-shaped"):
        params, bounds = _zbox_bounds(case, params)
        oracle_kw.update(bounds)
    options = {**options, "zero_bias": zero_bias, "stabilizer": stabilizer}
    if eps is not None:  # one stabilizer epsilon for every rule
        params = {k: v for k, v in params.items() if k != "epsilon"}
        options.update(epsilon=eps, stabilizer_eps=eps)
        oracle_kw["eps"] = eps
    model = compile_rule(case, rule, params, options, tmp_path)
    x = case.x.astype(dtype)
    y_want = case.layer.forward(x)
    seed_R = np.random.default_rng(seed + 1).normal(size=y_want.shape)
    if columns is not None:
        seed_R[..., [c for c in range(seed_R.shape[-1]) if c not in columns]] = 0.0
    out = run_model(model, {"x": x, "relevance_seed": seed_R.astype(dtype)}, dtype)
    assert_close(out["y"], y_want, dtype, "forward output")  # also validates the naive op
    want = relevance(case.layer, rule, x, seed_R.astype(dtype), zero_bias=zero_bias, stabilizer=stabilizer,
                     **oracle_kw)
    assert_close(out["relevance"], want, dtype, f"{kind} {rule_id}")
    return out["relevance"], want


@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "zero_bias"])
@pytest.mark.parametrize("rule_id", [r[0] for r in RULES])
@pytest.mark.parametrize("kind", OPS)
def test_rule_float64(kind, rule_id, zero_bias, tmp_path):
    check(kind, rule_id, np.float64, tmp_path, zero_bias=zero_bias)


@pytest.mark.parametrize("rule_id", [r[0] for r in RULES])
@pytest.mark.parametrize("kind", OPS)
def test_rule_float32_onnxruntime(kind, rule_id, tmp_path):
    check(kind, rule_id, np.float32, tmp_path, zero_bias=rule_id in ("zplus", "gamma"))


@pytest.mark.parametrize("columns", [(4,), (0, 2, 5), ()], ids=["one", "three", "none"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("rule_id", [r[0] for r in RULES])
@pytest.mark.parametrize("kind", ["matmul", "matmul_3d"])
def test_rule_on_the_seeded_columns_of_a_wide_layer(kind, rule_id, dtype, columns, tmp_path, monkeypatch):
    """A layer as wide as a vocabulary (here: made so by lowering the threshold) whose output is explained runs its
    rule over the columns the seed is not zero in: the oracle's numbers, with nothing seeded too (a zero seed)."""
    monkeypatch.setattr(linear, "WIDE", 1)
    got, _ = check(kind, rule_id, dtype, tmp_path, columns=columns, zero_bias=rule_id in ("zplus", "gamma"))
    assert got.shape[-1] == 10  # (the input's width: the relevance is the whole input's)
    case = make_case(kind, dtype)
    _, rule, params, options, _ = next(r for r in RULES if r[0] == rule_id)
    if params not in ("per-channel", "input-shaped"):
        assert "NonZero" in {n.op_type for n in compile_rule(case, rule, params, options, tmp_path).graph.node}


STAB_RULES = ["epsilon", "zplus", "alpha2beta1", "gamma", "zbox", "flat", "wsquare"]


@pytest.mark.parametrize("stabilizer", ["sign", "clip", "norm-scale"])
@pytest.mark.parametrize("rule_id", STAB_RULES)
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "convT_grouped", "gemm_alpha_beta", "matmul_3d"])
def test_stabilizers(kind, rule_id, stabilizer, tmp_path):
    """A large epsilon (0.5), so that the stabilizers differ from each other and from no stabilizer."""
    check(kind, rule_id, np.float64, tmp_path, stabilizer=stabilizer, eps=0.5)


def test_stabilizers_differ(tmp_path):
    """The stabilizer tests above would notice a stabilizer being ignored: the three give different numbers."""
    results = [check("gemm_transB", "epsilon", np.float64, tmp_path, stabilizer=s, eps=0.5)[0]
               for s in ("sign", "clip", "norm-scale")]
    assert not np.allclose(results[0], results[1]) and not np.allclose(results[0], results[2])


def test_lrp0_gemm_is_weight_input_product(tmp_path):
    """epsilon = 0 on one Gemm: R_in[n, i] = Σ_j x[n, i] W[j, i] R[n, j] / z[n, j] exactly."""
    case = make_case("gemm_transB", np.float64)
    model = compile_rule(case, "epsilon", {"epsilon": 0.0}, {}, tmp_path)
    x = case.x
    w = case.layer.weight
    b = case.layer.bias_out
    R = np.random.default_rng(5).normal(size=(x.shape[0], w.shape[0]))
    out = run_model(model, {"x": x, "relevance_seed": R}, np.float64)
    z = x @ w.T + b
    want = np.einsum("ni,ji,nj->ni", x, w, R / z)
    np.testing.assert_allclose(out["relevance"], want, rtol=1e-12, atol=1e-14)
    # with zero_bias the layer conserves relevance: sum over inputs = sum over outputs
    model = compile_rule(case, "epsilon", {"epsilon": 0.0}, {"zero_bias": True}, tmp_path)
    rel = run_model(model, {"x": x, "relevance_seed": R}, np.float64)["relevance"]
    np.testing.assert_allclose(rel.sum(axis=1), R.sum(axis=1), rtol=1e-10)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rule_id", ["epsilon0", "zplus", "alpha2beta1", "alpha1beta0", "gamma", "zbox"])
@pytest.mark.parametrize("stabilizer", ["sign", "clip", "norm-scale"])
@pytest.mark.parametrize("bias", ["zero_bias_option", "zero_bias_tensor"])
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "gemm_transB"])
def test_zero_denominator_gives_no_nan(kind, bias, stabilizer, rule_id, dtype, tmp_path):
    """x = 0 everywhere and no bias in the denominators (the zero_bias option, or a bias tensor of zeros):
    every denominator is exactly 0 (all epsilons 0); relevance is 0, never NaN/Inf."""
    _, rule, params, _, _ = next(r for r in RULES if r[0] == rule_id)
    case = make_case(kind, dtype)
    if bias == "zero_bias_tensor":
        b = next(t for t in case.model.graph.initializer if t.name == "B")
        b.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(b)), "B"))
    if rule == "zbox":
        params = {"low": 0.0, "high": 0.0}  # z = Wx - W+l - W-h = 0 as well
    options = {"epsilon": 0.0, "stabilizer_eps": 0.0, "zero_bias": bias == "zero_bias_option", "stabilizer": stabilizer}
    model = compile_rule(case, rule, params, options, tmp_path)
    x = np.zeros_like(case.x).astype(dtype)
    R = np.ones_like(case.layer.forward(case.x)).astype(dtype)
    rel = run_model(model, {"x": x, "relevance_seed": R}, dtype)["relevance"]
    assert np.all(np.isfinite(rel))
    np.testing.assert_array_equal(rel, 0.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "zero_bias"])
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "gemm_transB"])
def test_alpha_beta_zero_region_matches_oracle(kind, zero_bias, dtype, tmp_path):
    """Inputs exactly 0 (sample 0; the top rows of sample 1): without bias, denominators there are exactly 0
    (the negative part divides by min(z, 0) - eps = -eps where the oracle's sign0 takes +eps); all their
    terms are 0, so the relevance still matches."""
    case = make_case(kind, dtype)
    model = compile_rule(case, "alpha-beta", {"alpha": 2.0, "beta": 1.0},
                         {"stabilizer_eps": 1e-3, "zero_bias": zero_bias}, tmp_path)
    x = case.x.astype(dtype).copy()
    x[0] = 0.0
    if x.ndim == 4:
        x[1, :, :2] = 0.0
    R = np.random.default_rng(1).normal(size=case.layer.forward(x).shape).astype(dtype)
    rel = run_model(model, {"x": x, "relevance_seed": R}, dtype)["relevance"]
    want = relevance(case.layer, "alpha-beta", x, R, zero_bias=zero_bias, eps=1e-3, alpha=2.0, beta=1.0)
    assert_close(rel, want, dtype, f"{kind} alpha-beta, zero region")


def test_rule_file_op_matches_rank2_matmul(tmp_path):
    case = make_case("matmul", np.float64)
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{"op": "MatMul", "rule": "zplus"}]}))
    model = lrpc.compile(case.model, str(spec))
    assert json.loads(dict((p.key, p.value) for p in model.metadata_props)["lrpc.rules"])["layer"] == "zplus"


def test_rank3_matmul_add_bias_is_part_of_the_layer(tmp_path):
    dtype = np.float64
    rng = np.random.default_rng(0)
    x, w, b = _normal(rng, (2, 3, 10), dtype), _normal(rng, (10, 6), dtype), _normal(rng, 6, dtype)
    model = _model("MatMul", ["x", "W"], {}, x.shape, (2, 3, 6), {"W": w, "B": b}, dtype,
                   (helper.make_node("Add", ["z", "B"], ["y"], name="bias"),))
    compiled = lrpc.compile(model, "epsilon", epsilon=0.05)
    R = _normal(rng, (2, 3, 6), dtype)
    got = run_model(compiled, {"x": x, "relevance_seed": R}, dtype)["relevance"]
    want = relevance(Layer(matmul, w, (3, 10), b), "epsilon", x, R, eps=0.05)
    assert_close(got, want, dtype, "rank-3 MatMul + Add")


def _on_residual_branch(case: Case, relu_in: bool, dtype) -> onnx.ModelProto:
    """``y = layer(x') + s`` with a second input ``s`` (a residual sum: norm rule), ``x' = Relu(x)`` or ``x``:
    the relevance reaching the layer is ``z ⊙ c`` with its own output ``z``."""
    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    g = m.graph
    last = next(n for n in g.node if "y" in n.output)
    last.output[list(last.output).index("y")] = "zl"
    y_info = g.output[0]
    s_info = helper.make_tensor_value_info("s", y_info.type.tensor_type.elem_type,
                                           [d.dim_value for d in y_info.type.tensor_type.shape.dim])
    g.input.append(s_info)
    g.node.append(helper.make_node("Add", ["zl", "s"], ["y"], name="residual"))
    if relu_in:
        for n in g.node:
            n.input[:] = ["xr" if i == "x" else i for i in n.input]
        g.node.insert(0, helper.make_node("Relu", ["x"], ["xr"], name="relu"))
    return m


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "zero_bias"])
@pytest.mark.parametrize("relu_in", [True, False], ids=["relu_in", "any_in"])
@pytest.mark.parametrize("rule_id", ["epsilon", "gamma", "gamma0", "gamma_stab_clip"])
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "conv_s1_grouped_dilated", "convT_s2_outpad", "gemm_transB",
                                  "matmul_add", "matmul_3d"])
def test_rule_on_residual_branch(kind, rule_id, relu_in, zero_bias, dtype, tmp_path):
    """A layer whose output is one branch of a residual sum receives ``R_z = z ⊙ R / stab(z + s)``: epsilon
    and gamma then fold their masks and sign tests into ``z`` (relevance/linear.py, ``_on_own_output``).
    Against the dense oracle, with inputs of both signs and with a Relu in front (gamma's fast case), outputs
    of both signs (random seed relevance), biases kept or left out of the denominators."""
    name = {"epsilon": "epsilon", "gamma": "gamma", "gamma0": "gamma", "gamma_stab_clip": "gamma"}[rule_id]
    gamma = {"gamma": 0.5, "gamma0": 0.0, "gamma_stab_clip": 0.5}.get(rule_id)
    params = {"epsilon": 0.05} if name == "epsilon" else {"gamma": gamma}
    stabilizer = "clip" if rule_id == "gamma_stab_clip" else "sign"
    eps = 0.05 if name == "epsilon" else 1e-3
    case = make_case(kind, dtype)
    model = _on_residual_branch(case, relu_in, dtype)
    where = {"op": case.op} if case.op != "MatMul" else {"name": "layer"}
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{**where, "rule": name, "params": params}]}))
    compiled = lrpc.compile(model, str(spec), stabilizer_eps=1e-3, zero_bias=zero_bias, stabilizer=stabilizer)
    ops = {n.op_type for n in compiled.graph.node}
    fast = stabilizer == "sign" and (not zero_bias or case.layer.bias_out is None)
    if fast:  # the folded form is what runs (the test would otherwise only see the generic emitter)
        folded = "LeakyRelu" if name == "gamma" and gamma != 0 else "Abs"  # (gamma 0 is epsilon)
        assert folded in ops or (folded == "LeakyRelu" and not relu_in)  # gamma's fold needs an input >= 0

    rng = np.random.default_rng(3)
    x = case.x.astype(dtype)
    xr = np.maximum(x, 0) if relu_in else x
    z = case.layer.forward(xr)
    s = _normal(rng, z.shape, dtype)
    R = rng.normal(size=z.shape).astype(dtype)
    out = run_model(compiled, {"x": x, "s": s.astype(dtype), "relevance_seed": R}, dtype)
    assert_close(out["y"], z + s, dtype, "forward output")
    c = safe_div(np.asarray(R, np.float64), stab(z + s, 1e-3, stabilizer))  # norm rule on the sum
    kw = {"eps": eps, "zero_bias": zero_bias, "stabilizer": stabilizer}
    if gamma is not None:
        kw["gamma"] = gamma
    want = relevance(case.layer, name, xr, z * c, **kw)
    assert_close(out["relevance_x"], want, dtype, f"{kind} {rule_id} on a residual branch")
    assert_close(out["relevance_s"], s * c, dtype, "the other branch")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("zero_bias", [False, True], ids=["bias", "zero_bias"])
@pytest.mark.parametrize("rule_id", ["epsilon", "gamma0", "gamma"])
@pytest.mark.parametrize("kind", ["conv2d_s2_asym", "conv_s1_grouped_dilated", "convT_s2_outpad", "gemm_transB",
                                  "matmul_add", "matmul_3d"])
def test_rule_behind_relu(kind, rule_id, zero_bias, dtype, tmp_path):
    """``y = Relu(layer(x)) + s``: the layer receives ``R_z = Relu(z) ⊙ c`` (zero where z <= 0: the emitter
    drops the z < 0 masks and sign tests there). Against the dense oracle, inputs of both signs, biases kept or
    left out of the denominators. (Folding epsilon's quotient into ``c ⊙ Relu(z) / (Relu(z) + eps)`` gave
    bit-identical relevance at equal speed and no measurable memory change in onnxruntime: not kept.)"""
    name, gamma = ("epsilon", None) if rule_id == "epsilon" else ("gamma", 0.0 if rule_id == "gamma0" else 0.5)
    params = {"epsilon": 0.05} if name == "epsilon" else {"gamma": gamma}
    eps = 0.05 if name == "epsilon" else 1e-3
    case = make_case(kind, dtype)
    model = _on_residual_branch(case, False, dtype)
    add = next(n for n in model.graph.node if n.name == "residual")
    add.input[0] = "zr"
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Relu", ["zl"], ["zr"], name="relu_out"))
    where = {"op": case.op} if case.op != "MatMul" else {"name": "layer"}
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{**where, "rule": name, "params": params}]}))
    compiled = lrpc.compile(model, str(spec), stabilizer_eps=1e-3, zero_bias=zero_bias)

    rng = np.random.default_rng(4)
    x = case.x.astype(dtype)
    z = case.layer.forward(x)
    s = _normal(rng, z.shape, dtype)
    R = rng.normal(size=z.shape).astype(dtype)
    out = run_model(compiled, {"x": x, "s": s.astype(dtype), "relevance_seed": R}, dtype)
    r = np.maximum(z, 0)
    assert_close(out["y"], r + s, dtype, "forward output")
    c = safe_div(np.asarray(R, np.float64), stab(r + s, 1e-3, "sign"))
    kw = {"eps": eps, "zero_bias": zero_bias, "stabilizer": "sign"}
    if gamma is not None:
        kw["gamma"] = gamma
    assert_close(out["relevance_x"], relevance(case.layer, name, x, r * c, **kw), dtype,
                 f"{kind} {rule_id} behind a ReLU")


def test_negative_gamma_is_refused(tmp_path):
    """The emitter relies on z↑ = z + γz⁺ and z↓ = z + γz⁻ keeping the sign of z: γ < 0 is an input error (rule file
    or option), not a silently different rule."""
    case = make_case("conv2d_s2_asym", np.float32)
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon",
                                "rules": [{"op": "Conv", "rule": "gamma", "params": {"gamma": -0.5}}]}))
    with pytest.raises(lrpc.InputError, match=r"gamma >= 0 \(got gamma=-0.5\)"):
        lrpc.compile(case.model, str(spec))
    with pytest.raises(lrpc.InputError, match=r"gamma >= 0"):
        lrpc.compile(case.model, "epsilon-gamma-box", gamma=-0.5)


@pytest.mark.parametrize("composite", ["epsilon", "epsilon-gamma-box"])
def test_backward_reads_the_forward_relu(composite):
    """Denominators behind a ReLU (Relu(z) + eps) read the forward's own Relu output instead of a second Relu of z
    (the relevance itself is checked by test_rule_behind_relu and the zennit parity tests)."""
    import collections
    from pathlib import Path

    compiled = lrpc.compile(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx", composite)
    relus = collections.Counter(n.input[0] for n in compiled.graph.node if n.op_type == "Relu")
    assert relus and max(relus.values()) == 1, relus


@pytest.mark.parametrize("source", ["proto", "file", "handed"])
def test_weights_are_read_once_and_their_signs_reused(source, monkeypatch, tmp_path):
    """The load-time NaN/Inf scan also records each weight's sign, and the sign analysis uses it instead of reading
    the weight again (every read copies the bytes: 0.6 s for VGG16); from a file the scan reads the weights in
    the file's bytes, and no weight is copied out of the ModelProto at all (so too for a ModelProto handed over with
    the bytes it was read from, as lrpc explain does). Here a Conv with non-negative weights on a
    ReLU output makes the next layer's input non-negative, so alpha-beta drops its x- terms there: the facts
    from the scan give the same graph as a fresh read, fewer nodes than no sign facts, and the same relevance."""
    import collections

    from onnx import numpy_helper as nh

    import lrpc.emit
    from lrpc.graph import const_nonneg

    rng = np.random.default_rng(7)
    w1 = np.abs(rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    w2 = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Conv", ["a", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])],
                              [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    reads = collections.Counter()
    real = nh.to_array

    def counting(t, *args, **kwargs):
        reads[t.name] += 1
        return real(t, *args, **kwargs)

    monkeypatch.setattr(nh, "to_array", counting)
    if source != "proto":
        onnx.save(model, tmp_path / "m.onnx")
        model = tmp_path / "m.onnx"
    from lrpc.loaded import load

    src = (lambda: load(model)) if source == "handed" else (lambda: model)  # (a handed one is used up)
    once = 1 if source == "proto" else 0
    scanned = lrpc.compile(src(), "epsilon-alpha2-beta1")
    assert reads["w1"] == once and reads["w2"] == once, reads
    monkeypatch.setattr(lrpc.emit, "const_nonneg", lambda t, known=None: const_nonneg(t))
    reread = lrpc.compile(src(), "epsilon-alpha2-beta1")
    assert reads["w1"] == 2 * once + 1  # (the fresh read: the lookup was what spared it)
    monkeypatch.setattr(lrpc.emit, "const_nonneg", lambda t, known=None: False)
    blind = lrpc.compile(src(), "epsilon-alpha2-beta1")
    ops = lambda m: [n.op_type for n in m.graph.node]
    assert ops(scanned) == ops(reread) and len(ops(blind)) > len(ops(scanned))
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    feeds = {"x": x, "relevance_seed": rng.standard_normal((2, 5, 6, 6)).astype(np.float32)}
    got = [run_model(m, feeds, np.float32)["relevance"] for m in (scanned, blind)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-5 * float(np.abs(got[1]).max()))


def test_norm_scale_is_scale_invariant_past_float32_squares(tmp_path):
    """norm-scale makes eps relative to the root mean square of z, so a bias-free layer's relevance does not change
    when its input is scaled, also where z² overflows float32 (|z| ≥ ~1e19: relevance was all 0). Oracle: the
    same input at scale 1."""
    case = make_case("gemm_transB", np.float32)
    b = next(t for t in case.model.graph.initializer if t.name == "B")
    b.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(b)), "B"))  # (a bias-free layer)
    model = compile_rule(case, "epsilon", {"epsilon": 0.5}, {"stabilizer": "norm-scale"}, tmp_path)
    R = np.random.default_rng(5).normal(size=case.layer.forward(case.x).shape).astype(np.float32)
    want = run_model(model, {"x": case.x.astype(np.float32), "relevance_seed": R}, np.float32)["relevance"]
    assert np.abs(want).max() > 0
    for scale in (1e20, 1e-20):
        got = run_model(model, {"x": (case.x * scale).astype(np.float32), "relevance_seed": R}, np.float32)["relevance"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_zbox_bounds_are_compared_as_the_emitter_reads_them():
    """low/high given one per channel against one sample's shape: compared per channel (numpy broadcasting lined
    the 3 channel values up with the last axis and refused a valid pair); a low above high is refused."""
    from lrpc.rules import make_rule

    high = np.ones((3, 2, 3))
    high[2] = 6.0
    make_rule("zbox", {"low": [0.0, 0.0, 5.0], "high": high.tolist()})
    with pytest.raises(ValueError, match="low must not exceed high"):
        make_rule("zbox", {"low": [0.0, 2.0, 5.0], "high": high.tolist()})

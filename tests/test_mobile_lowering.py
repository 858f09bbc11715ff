"""Lowerings that make mobile nets cheap to explain, against the dense references of tests/oracles.py.

* the adjoint of a strided depthwise convolution as an interleave (ConvTranspose with a 1x1 kernel of ones) and a
  depthwise Conv with the reversed kernel (relevance/depthwise.py): against onnxruntime's ConvTranspose on random
  messages, and as part of every rule against the dense oracle (odd sizes, asymmetric pads, dilation, strides 2
  and 3, 1-d to 3-d);
* generalized gamma on inputs of either sign in one formula (relevance/gamma.py): outputs exactly 0 (both masks
  empty there), the stabilizers, and the graph it makes (no compare / cast chains, three convolutions)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.graph import Builder
from lrpc.relevance import depthwise
from oracles import relevance
from test_rules_oracle import _conv_case, assert_close, compile_rule, run_model

# (x shape, kernel, strides, pads, dilations): odd sizes, asymmetric pads, dilation, strides 2 and 3, 1-d to 3-d;
# channels a multiple of 8 (the lowering's condition, relevance/depthwise.py)
DEPTHWISE = {
    "s2_k3_odd": ((2, 8, 9, 7), (3, 3), [2, 2], [1, 1, 1, 1], None),
    "s2_k5_asym": ((2, 8, 11, 8), (5, 5), [2, 2], [2, 1, 1, 2], None),
    "s3_k3_dil2": ((1, 16, 13, 10), (3, 3), [3, 3], [2, 0, 1, 2], [2, 2]),
    "s2x3_k2x4": ((1, 8, 9, 12), (2, 4), [2, 3], [0, 1, 1, 2], None),
    "s2_k3_nopad": ((2, 8, 8, 8), (3, 3), [2, 2], [0, 0, 0, 0], None),
    "s3_1d": ((2, 8, 14), (4,), [3], [1, 2], None),
    "s2_3d": ((1, 8, 5, 6, 5), (3, 3, 2), [2, 2, 2], [1, 0, 1, 1, 1, 0], [1, 1, 2]),
}


def depthwise_case(name: str, dtype=np.float64, seed: int = 0):
    shape, k, strides, pads, dilations = DEPTHWISE[name]
    c = shape[1]
    return _conv_case(dtype, np.random.default_rng(seed), shape, (c, 1, *k), group=c, strides=strides, pads=pads,
                      dilations=dilations)


def _run_ort(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("name", list(DEPTHWISE))
def test_strided_depthwise_adjoint_equals_conv_transpose(name):
    """The lowering alone, in onnxruntime (float32): interleave + depthwise Conv with the reversed kernel equals
    ConvTranspose of the forward kernel (the adjoint the emitter used before) on a random message."""
    import onnx_graphsurgeon as gs

    shape, k, strides, pads, dilations = DEPTHWISE[name]
    n, c, xs = shape[0], shape[1], list(shape[2:])
    nd = len(xs)
    d = dilations or [1] * nd
    span = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
    zs = [(xs[i] + pads[i] + pads[nd + i] - span[i]) // strides[i] + 1 for i in range(nd)]
    rng = np.random.default_rng(1)
    w = rng.normal(size=(c, 1, *k)).astype(np.float32)
    msg = rng.normal(size=(n, c, *zs)).astype(np.float32)
    out_pad = [xs[i] - ((zs[i] - 1) * strides[i] + span[i] - pads[i] - pads[nd + i]) for i in range(nd)]

    graph = gs.Graph(opset=17)
    cin = gs.Variable("c", dtype=np.float32, shape=list(msg.shape))
    graph.inputs = [cin]
    b = Builder(graph, np.float32)
    flipped = b.const(w[(slice(None), slice(None)) + (slice(None, None, -1),) * nd].copy())
    dw_pads = depthwise.pads_for(xs, zs, list(k), strides, d, pads)
    assert dw_pads is not None
    got_t = depthwise.strided_adjoint(b, cin, flipped, c, list(k), strides, d, dw_pads)
    want_t = b.op("ConvTranspose", [cin, b.const(w)], {"group": c, "kernel_shape": list(k), "strides": strides,
                                                         "pads": pads, "dilations": d, "output_padding": out_pad})
    got_t.dtype = want_t.dtype = np.float32
    graph.outputs = [got_t, want_t]
    got, want = _run_ort(gs.export_onnx(graph), {"c": msg})
    assert got.shape == want.shape == (n, c, *xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_pads_wider_than_the_kernel_keep_conv_transpose():
    """A begin pad beyond the kernel's span would need a negative pad in the correlation: no lowering."""
    assert depthwise.pads_for([7], [4], [2], [2], [1], [2, 1]) is None
    assert depthwise.pads_for([7], [4], [3], [2], [1], [1, 1]) == [1, 1]


RULES = [("epsilon", {"epsilon": 0.05}, {"eps": 0.05}), ("gamma", {"gamma": 0.5}, {"eps": 1e-3, "gamma": 0.5}),
         ("zplus", {}, {"eps": 1e-3}),
         ("alpha-beta", {"alpha": 2.0, "beta": 1.0}, {"eps": 1e-3, "alpha": 2.0, "beta": 1.0})]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("name", list(DEPTHWISE))
def test_strided_depthwise_rules_match_oracle(name, rule, dtype, tmp_path):
    """Every rule's adjoints through the depthwise lowering (no ConvTranspose left in the graph) against the
    dense oracle: float64 with onnx.reference (1e-8), float32 with onnxruntime (1e-4)."""
    rule_name, params, oracle_kw = rule
    case = depthwise_case(name, dtype)
    model = compile_rule(case, rule_name, params, {"stabilizer_eps": 1e-3}, tmp_path)
    convt = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert convt and all(_is_interleave(model, n) for n in convt)
    x = case.x.astype(dtype)
    R = np.random.default_rng(2).normal(size=case.layer.forward(x).shape)
    out = run_model(model, {"x": x, "relevance_seed": R.astype(dtype)}, dtype)
    want = relevance(case.layer, rule_name, x, R.astype(dtype), **oracle_kw)
    assert_close(out["relevance"], want, dtype, f"{name} {rule_name}")


def _is_interleave(model: onnx.ModelProto, node) -> bool:
    """A ConvTranspose with a 1x1 kernel of ones (the interleave), not an adjoint."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = inits.get(node.input[1])
    if w is None:
        consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        w = numpy_helper.to_array(consts[node.input[1]].attribute[0].t) if node.input[1] in consts else None
    return w is not None and set(w.shape[1:]) == {1} and np.all(w == 1)


@pytest.mark.parametrize("channels, pads", [(8, [2, 2, 1, 1]), (6, [1, 1, 1, 1])], ids=["wide_pads", "6_channels"])
def test_conv_transpose_kept_matches_oracle(channels, pads, tmp_path):
    """Pads wider than the kernel, or a channel count onnxruntime's blocked kernels do not take: the ConvTranspose
    stays (no interleave) and the relevance is the oracle's."""
    case = _conv_case(np.float64, np.random.default_rng(0), (2, channels, 7, 7), (channels, 1, 2, 2), group=channels,
                      strides=[2, 2], pads=pads)
    model = compile_rule(case, "epsilon", {"epsilon": 0.05}, {}, tmp_path)
    convt = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert len(convt) == 1 and not _is_interleave(model, convt[0])
    R = np.random.default_rng(2).normal(size=case.layer.forward(case.x).shape)
    out = run_model(model, {"x": case.x, "relevance_seed": R}, np.float64)
    assert_close(out["relevance"], relevance(case.layer, "epsilon", case.x, R, eps=0.05), np.float64, "wide pads")


# --- generalized gamma on inputs of either sign -------------------------------------------------------------


def _gamma_model(case, stabilizer: str, tmp_path):
    return compile_rule(case, "gamma", {"gamma": 0.5}, {"stabilizer_eps": 1e-3, "stabilizer": stabilizer}, tmp_path)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("stabilizer", ["sign", "clip"])
def test_gamma_signed_input_zero_outputs(stabilizer, dtype, tmp_path):
    """Outputs exactly 0 (inputs 0 over whole receptive fields, zero bias): the rule's masks z > 0 and z < 0 are
    both empty there, so they pass nothing even where relevance arrives; elsewhere inputs of both signs."""
    rng = np.random.default_rng(5)
    case = _conv_case(dtype, rng, (2, 3, 9, 8), (4, 3, 3, 3), pads=[1, 1, 1, 1])
    b = next(t for t in case.model.graph.initializer if t.name == "B")
    b.CopyFrom(numpy_helper.from_array(np.zeros(4, dtype), "B"))
    case.layer.bias_out = None
    x = case.x.astype(dtype).copy()
    x[0, :, :5] = 0.0  # rows 0-3 of sample 0's output see only zeros
    model = _gamma_model(case, stabilizer, tmp_path)
    z = case.layer.forward(x)
    assert np.sum(z == 0) >= 4 * 4 * 8 and np.any(z > 0) and np.any(z < 0)
    R = np.random.default_rng(6).normal(size=z.shape)  # relevance also where z = 0
    out = run_model(model, {"x": x, "relevance_seed": R.astype(dtype)}, dtype)
    want = relevance(case.layer, "gamma", x, R.astype(dtype), eps=1e-3, gamma=0.5, stabilizer=stabilizer)
    assert_close(out["relevance"], want, dtype, f"gamma {stabilizer}, zero outputs")


@pytest.mark.parametrize("gamma", [0.25, 0.01, 4.0])
@pytest.mark.parametrize("kind", ["conv", "depthwise_s2", "gemm"])
def test_gamma_signed_input_float32(kind, gamma, tmp_path):
    """float32 round-off of the one-formula denominator (the γ terms from |W||x| and z - b) stays within 1e-4 of
    the dense oracle for small and large γ and biases that dominate some outputs."""
    rng = np.random.default_rng(7)
    if kind == "conv":
        case = _conv_case(np.float32, rng, (2, 6, 8, 8), (8, 6, 3, 3), pads=[1, 1, 1, 1])
    elif kind == "depthwise_s2":
        case = depthwise_case("s2_k5_asym", np.float32, seed=3)
    else:
        from test_rules_oracle import make_case

        case = make_case("gemm_transB", np.float32)
    b = next(t for t in case.model.graph.initializer if t.name == "B")
    big = numpy_helper.to_array(b) * 8.0  # biases of the size of Wx
    b.CopyFrom(numpy_helper.from_array(big.astype(np.float32), "B"))
    case.layer.bias_out = big.astype(np.float64).reshape(np.shape(case.layer.bias_out))
    model = compile_rule(case, "gamma", {"gamma": gamma}, {"stabilizer_eps": 1e-6}, tmp_path)
    x = case.x.astype(np.float32)
    R = np.random.default_rng(8).normal(size=case.layer.forward(x).shape)
    out = run_model(model, {"x": x, "relevance_seed": R.astype(np.float32)}, np.float32)
    want = relevance(case.layer, "gamma", x, R, eps=1e-6, gamma=gamma)
    assert_close(out["relevance"], want, np.float32, f"{kind} gamma={gamma}")


def test_gamma_signed_input_graph(tmp_path):
    """Inputs of either sign: one extra forward and two adjoints (three Convs besides the layer's own), no
    compares, casts, Min/Max or Sign ops; a Relu in front (non-negative input behind no ReLU) the same."""
    case = _conv_case(np.float32, np.random.default_rng(0), (1, 4, 6, 6), (8, 4, 3, 3), pads=[1, 1, 1, 1])
    ops = [n.op_type for n in _gamma_model(case, "sign", tmp_path).graph.node]
    assert ops.count("Conv") == 4, ops
    assert not {"Greater", "Less", "GreaterOrEqual", "Cast", "Min", "Max", "Sign", "Where"} & set(ops), ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sign_is_exact(dtype):
    """stabilize.sign in onnxruntime: ±1 for every nonzero value (subnormals and ±inf included), 0 at ±0."""
    import onnx_graphsurgeon as gs

    from lrpc.relevance.stabilize import sign

    info = np.finfo(dtype)
    values = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny, -3.5, 1.0,
                       info.max, -info.max, np.inf, -np.inf, 1e-30, -2e-38], dtype)
    graph = gs.Graph(opset=17)
    z = gs.Variable("z", dtype=dtype, shape=[len(values)])
    graph.inputs = [z]
    s = sign(Builder(graph, dtype), z)
    s.dtype = dtype
    graph.outputs = [s]
    got = _run_ort(gs.export_onnx(graph), {"z": values})[0]
    np.testing.assert_array_equal(got, np.sign(values))


def test_global_pool_off_the_relevance_path_stays_a_pool():
    """A squeeze-and-excitation block's pool gets no relevance (the gate takes none): it is a GlobalAveragePool again
    in the compiled graph (passes/avgpool_to_conv.py made it a Conv), the pool the relevance goes through stays a
    Conv. The relevance itself is checked against the frozen-gate oracle in tests/test_gates.py."""
    from test_gates import _network

    compiled = lrpc.compile(_network(), "epsilon-gamma-box")
    by_name = {n.name: n.op_type for n in compiled.graph.node}
    assert by_name["se_pool"] == "GlobalAveragePool" and by_name["pool"] == "Conv"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gamma_signed_input_elementwise_scale(dtype, tmp_path):
    """The formula through an element-wise affine layer (Mul by a per-channel constant of both signs): the view's
    forward and adjoint are products, ``|W|`` the constant's magnitude."""
    from oracles import Layer

    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 4, 3, 5)).astype(dtype)
    s = rng.normal(size=(4, 1, 1)).astype(dtype)
    t = ONNX[dtype]
    graph = helper.make_graph([helper.make_node("Mul", ["x", "S"], ["y"], name="scale")], "scale",
                              [helper.make_tensor_value_info("x", t, list(x.shape))],
                              [helper.make_tensor_value_info("y", t, list(x.shape))], [numpy_helper.from_array(s, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec = tmp_path / "rules.json"
    rules = [{"op": "Mul", "rule": "gamma", "params": {"gamma": 0.5}}]
    spec.write_text(json.dumps({"composite": "epsilon", "rules": rules}))
    compiled = lrpc.compile(model, str(spec), stabilizer_eps=1e-3)
    assert not {"Greater", "Less"} & {n.op_type for n in compiled.graph.node}  # the one-formula lowering ran
    R = rng.normal(size=x.shape)
    out = run_model(compiled, {"x": x, "relevance_seed": R.astype(dtype)}, dtype)
    layer = Layer(lambda X, W: X * W, s.astype(np.float64), x.shape[1:])
    assert_close(out["relevance"], relevance(layer, "gamma", x, R, eps=1e-3, gamma=0.5), dtype, "Mul gamma")


ONNX = {np.float64: TensorProto.DOUBLE, np.float32: TensorProto.FLOAT}


def test_gamma_signed_input_accounts_on_mobilenet(tmp_path):
    """``lrpc check`` on torchvision MobileNetV3-small (weights=None, BatchNorm statistics calibrated by
    models/zoo.randomize; HardSwish: gamma layers with inputs of both signs): the layers' accounts (what the
    one-formula lowering passes on, its biases' share) leave nothing unaccounted."""
    torch = pytest.importorskip("torch")
    import torchvision

    from lrpc.check import run_check
    pytest.importorskip("torch")
    from models import zoo

    torch.manual_seed(0)
    model = zoo.randomize(torchvision.models.mobilenet_v3_small(weights=None), (1, 3, 64, 64))
    path = tmp_path / "mv3s.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"])
    report = run_check(str(path), "epsilon-gamma-box", lrpc.Options(low=-3.0, high=3.0))
    assert report.passed, report.text()


def test_gamma_signed_input_accounts_where_z_is_zero(tmp_path):
    """The relevance arriving where z = 0 is the layer's 'zero denominator' account (both masks drop it): ``lrpc
    check`` on Conv (gamma, zero bias, inputs 0 over some receptive fields) -> Sigmoid (which passes relevance to
    z = 0 too: sigmoid(0) = 1/2) -> Gemm finds nothing unaccounted."""
    from lrpc.check import run_check

    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(10, 4 * 9 * 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Sigmoid", ["z"], ["s"], name="sigmoid"),
             helper.make_node("Flatten", ["s"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "F"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(fc, "F")])
    path = tmp_path / "layer.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    spec = tmp_path / "rules.json"
    spec.write_text(json.dumps({"composite": "epsilon", "rules": [{"op": "Conv", "rule": "gamma"}]}))
    x = rng.normal(size=(1, 3, 9, 8)).astype(np.float32)
    x[0, :, :5] = 0.0  # rows 0-3 of z are exactly 0
    report = run_check(str(path), str(spec), inputs={"x": x})
    assert report.passed, report.text()

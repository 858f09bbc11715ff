"""Normalization layers (LayerNormalization, InstanceNormalization, GroupNormalization, LayerNorms written out):
AttnLRP's rule, epsilon on the layer's linear map with the standard deviation held constant:
``v = w ⊙ R / stab(y) / sigma``, ``R_x = x ⊙ (v - mean(v))`` (mean over the normalized axes / group).

Oracles:
* a dense float64 numpy reference of that rule on single layers (the layer's Jacobian with sigma fixed, built on
  unit vectors, and the epsilon rule of tests/oracles.py on it), hand-built graphs run in float64 by onnx's reference
  evaluator: 1e-8 relative L2;
* LRP-0 (epsilon 0, seed g ⊙ y) = gradient × input (x ⊙ ∂Σ g⊙y/∂x) of the torch module with sigma detached
  (models.archs.sigma_detached), on what both exporters emit: 1e-4 relative L2 in float32;
* the canonization passes: forward outputs equal to the original's (1e-5 relative) under onnxruntime.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_instance_normalization import InstanceNormalization
from onnx.reference.ops.op_layer_normalization import LayerNormalization
from torch import nn

import lrpc
from conftest import rel_l2, report_line
from models import archs
from oracles import rule_dense

RNG = np.random.default_rng(7)
SHAPE = (2, 4, 3, 3)  # N, C, H, W
EPS = float(np.float32(1e-3))  # a normalization's epsilon (ONNX attributes are float32)


# ------------------------------------------------------------------------------------------------ helpers

def _graph(nodes, inits: dict, shape=SHAPE, dtype=np.float64, opset: int = 17, extra_inputs=()) -> onnx.ModelProto:
    """Input ``x`` (dynamic batch) -> ``nodes`` -> output ``y``; ``inits``: name -> array."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", elem, ["N", *shape[1:]]), *extra_inputs],
                          [helper.make_tensor_value_info("y", elem, ["N", *shape[1:]])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 19 else 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"{op}_{outputs[0]}", **attrs)


def _params(*shape):
    """A scale (some negative) and a bias."""
    scale = (0.5 + RNG.random(shape)) * np.where(RNG.random(shape) < 0.25, -1.0, 1.0)
    return scale, 0.5 * RNG.standard_normal(shape)


def _written_out_layernorm(axes, scale, bias, eps=EPS, opset=17, square="Pow", divide="Div", dtype=np.float64):
    """(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) * scale + bias over ``axes``, as an exporter writes it."""
    axes_attr = {"axes": list(axes)} if opset < 18 else {}
    axes_in = [] if opset < 18 else ["axes"]
    nodes = [_node("ReduceMean", ["x", *axes_in], ["mu"], keepdims=1, **axes_attr),
             _node("Sub", ["x", "mu"], ["d"]),
             _node("Pow", ["d", "two"], ["d2"]) if square == "Pow" else _node("Mul", ["d", "d"], ["d2"]),
             _node("ReduceMean", ["d2", *axes_in], ["var"], keepdims=1, **axes_attr),
             _node("Add", ["var", "eps"], ["ve"]), _node("Sqrt", ["ve"], ["sd"])]
    if divide == "Div":
        nodes.append(_node("Div", ["d", "sd"], ["n"]))
    else:
        nodes += [_node("Reciprocal", ["sd"], ["inv"]), _node("Mul", ["inv", "d"], ["n"])]
    nodes += [_node("Mul", ["w", "n"], ["wn"]), _node("Add", ["wn", "b"], ["y"])]
    inits = {"two": np.array(2.0, dtype), "eps": np.array(eps, dtype), "w": scale.astype(dtype),
             "b": bias.astype(dtype)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
    return _graph(nodes, inits, dtype=dtype, opset=opset)


def _groupnorm_export(groups, scale, bias, eps=EPS, dtype=np.float64):
    """GroupNorm as both torch exporters write it below opset 21: Reshape [N, G, -1] -> InstanceNormalization (ones,
    zeros) -> Reshape back -> Mul (per channel) -> Add (per channel)."""
    c = SHAPE[1]
    nodes = [_node("Reshape", ["x", "grouped"], ["xg"]),
             _node("InstanceNormalization", ["xg", "ones", "zeros"], ["ng"], epsilon=eps),
             _node("Reshape", ["ng", "back"], ["n"]), _node("Mul", ["n", "w"], ["wn"]),
             _node("Add", ["wn", "b"], ["y"])]
    inits = {"grouped": np.array([0, groups, -1], np.int64), "back": np.array([0, *SHAPE[1:]], np.int64),
             "ones": np.ones(groups, dtype), "zeros": np.zeros(groups, dtype),
             "w": scale.reshape(c, 1, 1).astype(dtype), "b": bias.reshape(c, 1, 1).astype(dtype)}
    return _graph(nodes, inits, dtype=dtype)


def _run(model, feeds: dict, reference: bool = False) -> dict:
    if reference:
        sess = ReferenceEvaluator(model)
        return dict(zip([o.name for o in model.graph.output], sess.run(None, feeds)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _labels(kind: str, sample_shape, axis: int = 0, groups: int = 0) -> np.ndarray:
    """The statistics group of each element of one sample: LayerNorm over sample axes >= ``axis``, one group per
    channel (instance), or ``groups`` groups of channels."""
    if kind == "layer":
        lead = int(np.prod(sample_shape[:axis]))
        return np.broadcast_to(np.arange(lead).reshape(*sample_shape[:axis], *[1] * (len(sample_shape) - axis)),
                               sample_shape)
    c = sample_shape[0]
    per = np.arange(c) // (c // groups) if kind == "group" else np.arange(c)
    return np.broadcast_to(per.reshape(c, *[1] * (len(sample_shape) - 1)), sample_shape)


def dense_rule(x, labels, w, b, eps_norm: float, R, **rule) -> tuple[np.ndarray, np.ndarray]:
    """(forward y, relevance at x) of ``y = w ⊙ (x - mean_g(x)) / sigma_g + b`` per sample, the epsilon rule on the
    dense matrix of that map with sigma held constant (each row: w_i / sigma_g(i) times the centring of its group)."""
    ys, rs = [], []
    lab = labels.reshape(-1)
    same = (lab[:, None] == lab[None, :]).astype(np.float64)
    count = same.sum(1)
    for xs, Rs in zip(np.asarray(x, np.float64), np.asarray(R, np.float64)):
        v = xs.reshape(-1)
        mu = same @ v / count
        sigma = np.sqrt(same @ (v - mu) ** 2 / count + eps_norm)
        M = (np.broadcast_to(w, xs.shape).reshape(-1) / sigma)[:, None] * (np.eye(v.size) - same / count[:, None])
        bias = np.broadcast_to(b, xs.shape).reshape(-1)
        ys.append((M @ v + bias).reshape(xs.shape))
        rs.append(rule_dense("epsilon", M, bias, v, Rs.reshape(-1), **rule).reshape(xs.shape))
    return np.stack(ys), np.stack(rs)


def _check_dense(model, labels, w, b, eps_norm, rule_eps, zero_bias, stabilizer="sign", what=""):
    x = RNG.standard_normal(SHAPE) * 2.0 + 0.5
    R = RNG.standard_normal(SHAPE)
    compiled = lrpc.compile(model, "epsilon", epsilon=rule_eps, stabilizer_eps=rule_eps, zero_bias=zero_bias,
                            stabilizer=stabilizer)
    got = _run(compiled, {"x": x, "relevance_seed": R}, reference=True)
    y, want = dense_rule(x, labels, w, b, eps_norm, R, eps=rule_eps, stabilizer=stabilizer, zero_bias=zero_bias)
    assert rel_l2(got["y"], y) <= 1e-12, "the dense map is not the layer"
    err = rel_l2(got["relevance"], want)
    report_line(f"normalization dense float64 {what:34s} eps={rule_eps:g} zero_bias={zero_bias!s:5s} {stabilizer:10s} "
                f"rel L2 {err:.1e}")
    assert err <= 1e-8, f"relative L2 {err:.2e}"


# ---------------------------------------------------------------------------------------------- dense float64 reference

RULE_CASES = [(0.0, False, "sign"), (0.1, False, "sign"), (0.1, True, "sign"), (0.1, False, "clip"),
              (0.1, False, "norm-scale")]


@pytest.mark.parametrize("rule_eps,zero_bias,stabilizer", RULE_CASES)
@pytest.mark.parametrize("axis", [-1, 1, 2])
def test_layernormalization_dense(axis, rule_eps, zero_bias, stabilizer):
    """LayerNormalization over the last axis, over C, H, W and over H, W; scale and bias shaped as the normalized
    dims."""
    sample = SHAPE[1:]
    k = axis % 4
    scale, bias = _params(*SHAPE[k:])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=axis, epsilon=1e-3)], {"s": scale, "b": bias})
    _check_dense(model, _labels("layer", sample, k - 1), scale, bias, EPS, rule_eps, zero_bias, stabilizer,
                 f"LayerNormalization axis={axis}")


@pytest.mark.parametrize("rule_eps,zero_bias,stabilizer", RULE_CASES)
@pytest.mark.parametrize("form", ["instance", "group"])
def test_instance_and_group_normalization_dense(form, rule_eps, zero_bias, stabilizer):
    c = SHAPE[1]
    if form == "instance":
        scale, bias = _params(c)
        model = _graph([_node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-3)], {"s": scale, "b": bias})
        labels, w, b = _labels("instance", SHAPE[1:]), scale.reshape(c, 1, 1), bias.reshape(c, 1, 1)
    else:  # GroupNormalization-21 (one scale / bias per channel), statistics in float64 (stash_type)
        scale, bias = _params(c)
        model = _graph([_node("GroupNormalization", ["x", "s", "b"], num_groups=2, epsilon=1e-3,
                              stash_type=TensorProto.DOUBLE)], {"s": scale, "b": bias}, opset=21)
        labels, w, b = _labels("group", SHAPE[1:], groups=2), scale.reshape(c, 1, 1), bias.reshape(c, 1, 1)
    _check_dense(model, labels, w, b, EPS, rule_eps, zero_bias, stabilizer, form)


def composed_rule(x, labels, w, b, eps_norm: float, R, eps: float, zero_bias: bool) -> np.ndarray:
    """Relevance at x of a normalization whose affine stays after it (Mul by ``w``, Add ``b``): the Add's epsilon
    (``R_m = m ⊙ R / stab(y)``, stab(m) with zero_bias), the Mul's pass (identity), the normalization's epsilon."""
    y, _ = dense_rule(x, labels, w, b, eps_norm, R, eps=0.0)
    m = y - b
    den = m if zero_bias else y
    R_m = m * R / (den + eps * np.where(den >= 0, 1.0, -1.0))
    return dense_rule(x, labels, 1.0, 0.0, eps_norm, R_m, eps=eps)[1]


AFFINE_SHAPES = {(1,): (4, 1, 1), (3,): (3,), (1, 2): (4, 1, 1), (2, 3): (4, 1, 1)}


@pytest.mark.parametrize("rule_eps,zero_bias", [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("axes", AFFINE_SHAPES)
def test_written_out_layernorm_dense(axes, rule_eps, zero_bias):
    """A LayerNorm written out over the channels (original ConvNeXt), the last axis (legacy export below opset 17),
    C and H, H and W, with an affine after it (per channel; per position of the last axis): one LayerNormalization
    node (between Transposes) whose scale and bias hold the affine where it varies only along the normalized axes.
    A per-channel affine after a normalization over H, W stays a Mul and an Add (the Add with the normalization's
    rule): the composed rule (:func:`composed_rule`), the fused one for eps = 0."""
    w, b = _params(*AFFINE_SHAPES[axes])
    model = _written_out_layernorm(list(axes), w, b)
    ops = [n.op_type for n in lrpc.canonize(model).graph.node]
    assert ops.count("LayerNormalization") == 1 and not {"ReduceMean", "Sqrt", "Div", "Pow"} & set(ops), ops
    labels, idx = np.zeros(SHAPE[1:], np.int64), np.indices(SHAPE[1:])
    for a in range(1, 4):  # the statistics group: the index along the axes not normalized
        if a not in axes:
            labels = labels * SHAPE[a] + idx[a - 1]
    if axes != (2, 3):
        assert "Mul" not in ops and "Add" not in ops, ops
        _check_dense(model, labels, w, b, EPS, rule_eps, zero_bias, what=f"written out axes={list(axes)}")
        return
    assert ops[-2:] == ["Mul", "Add"], ops
    x, R = RNG.standard_normal(SHAPE) * 2.0 + 0.5, RNG.standard_normal(SHAPE)
    got = _run(lrpc.compile(model, "epsilon", epsilon=rule_eps, zero_bias=zero_bias), {"x": x, "relevance_seed": R},
               reference=True)["relevance"]
    want = composed_rule(x, labels, w, b, EPS, R, rule_eps, zero_bias)
    if rule_eps == 0.0:
        assert rel_l2(want, dense_rule(x, labels, w, b, EPS, R, eps=0.0, zero_bias=zero_bias)[1]) <= 1e-12
    assert rel_l2(got, want) <= 1e-8, f"relative L2 {rel_l2(got, want):.2e}"


@pytest.mark.parametrize("rule_eps,zero_bias", [(0.0, False), (0.1, False), (0.1, True)])
def test_groupnorm_export_form_dense(rule_eps, zero_bias):
    """Reshape -> InstanceNormalization -> Reshape -> Mul -> Add: the per-channel affine cannot join the per-group
    InstanceNormalization. Rules per node: the InstanceNormalization's (epsilon, sigma constant), the Mul's (pass:
    identity, exact for a scale), the Add's (epsilon: the bias keeps its share). With eps = 0 that is the rule of the
    whole GroupNorm; with eps > 0 the InstanceNormalization divides by stab(n) of its own output n as well."""
    c, groups = SHAPE[1], 2
    scale, bias = _params(c)
    model = _groupnorm_export(groups, scale, bias)
    compiled = lrpc.compile(model, "epsilon", epsilon=rule_eps, zero_bias=zero_bias)
    rules = json.loads({p.key: p.value for p in compiled.metadata_props}["lrpc.rules"])
    assert rules == {"InstanceNormalization_ng": f"epsilon(epsilon={rule_eps})", "Mul_wn": "pass",
                     "Add_y": f"epsilon(epsilon={rule_eps})"}
    x, R = RNG.standard_normal(SHAPE) * 2.0 + 0.5, RNG.standard_normal(SHAPE)
    got = _run(compiled, {"x": x, "relevance_seed": R}, reference=True)["relevance"]
    w, b = scale.reshape(c, 1, 1), bias.reshape(c, 1, 1)
    labels = _labels("group", SHAPE[1:], groups=groups)
    want = composed_rule(x, labels, w, b, EPS, R, rule_eps, zero_bias)
    if rule_eps == 0.0:
        assert rel_l2(want, dense_rule(x, labels, w, b, EPS, R, eps=0.0, zero_bias=zero_bias)[1]) <= 1e-12
    err = rel_l2(got, want)
    report_line(f"normalization dense float64 {'GroupNorm export form':34s} eps={rule_eps:g} "
                f"zero_bias={zero_bias!s:5s} rel L2 {err:.1e}")
    assert err <= 1e-8, f"relative L2 {err:.2e}"


def test_layernorm_into_a_residual_sum_dense():
    """y = x + LayerNorm(x): the Sum's norm rule hands the LayerNorm R_n = n ⊙ R / stab(y), a product with the
    layer's own output (the emitter's shortcut R_n / stab(n) = c ⊙ |n| / (|n| + eps)); the skip gets x ⊙ R / stab(y)."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], ["n"], axis=-1, epsilon=1e-3),
                    _node("Add", ["x", "n"])],
                   {"s": scale, "b": bias})
    x, R = RNG.standard_normal(SHAPE) * 2.0 + 0.5, RNG.standard_normal(SHAPE)
    labels = _labels("layer", SHAPE[1:], 2)  # (sample axes: the last one normalized)
    for eps in (0.0, 0.1):
        got = _run(lrpc.compile(model, "epsilon", epsilon=eps, stabilizer_eps=eps), {"x": x, "relevance_seed": R},
                   reference=True)
        n, _ = dense_rule(x, labels, scale, bias, EPS, R, eps=0.0)
        y = x + n
        c = R / (y + eps * np.where(y >= 0, 1.0, -1.0))
        want = x * c + dense_rule(x, labels, scale, bias, EPS, n * c, eps=eps)[1]
        assert rel_l2(got["relevance"], want) <= 1e-8, (eps, rel_l2(got["relevance"], want))


def test_norm_rule_is_epsilon_without_the_bias(tmp_path):
    """Rule ``norm`` on a normalization: epsilon with the bias left out of the denominator (zero_bias)."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"s": scale, "b": bias})
    feeds = {"x": RNG.standard_normal(SHAPE), "relevance_seed": RNG.standard_normal(SHAPE)}
    got = _run(lrpc.compile(model, _rule_file(tmp_path, "norm"), stabilizer_eps=0.1), feeds, reference=True)
    want = _run(lrpc.compile(model, "epsilon", epsilon=0.1, zero_bias=True), feeds, reference=True)
    assert rel_l2(got["relevance"], want["relevance"]) <= 1e-12


# ------------------------------------------------------------------------------------------------ conservation

def test_conservation_and_bias_share():
    """eps = 0: Σ R_x = Σ_j (y_j - b_j) / y_j R_j (the bias keeps its share); with zero_bias Σ R_x = Σ R."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1, epsilon=1e-3)], {"s": scale, "b": bias})
    x, R = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
    for zero_bias in (False, True):
        got = _run(lrpc.compile(model, "epsilon", epsilon=0.0, zero_bias=zero_bias), {"x": x, "relevance_seed": R},
                   reference=True)
        share = R if zero_bias else (got["y"] - bias) / got["y"] * R
        sums, want = got["relevance"].reshape(2, -1).sum(1), share.reshape(2, -1).sum(1)
        assert np.allclose(sums, want, rtol=1e-9, atol=0), (zero_bias, sums, want)


# ------------------------------------------------------------------------------------------------ torch exports

class ChannelsLastLayerNormScale(nn.Module):
    """NHWC LayerNorm followed by a per-channel Mul (folds into the node's scale), back to NCHW."""

    def __init__(self):
        super().__init__()
        self.ln = archs._affine(nn.LayerNorm(4, eps=1e-6))
        self.g = nn.Parameter(0.5 + torch.rand(4))

    def forward(self, x):
        return (self.ln(x.permute(0, 2, 3, 1)) * self.g).permute(0, 3, 1, 2)


class Single(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x)


def _torchvision_layernorm2d():
    from torchvision.models.convnext import LayerNorm2d

    return archs._affine(LayerNorm2d(4, eps=1e-6))


def _timm_layernorm2d():
    from timm.layers import LayerNorm2d

    return archs._affine(LayerNorm2d(4))


TORCH_NORMS = {
    "channels_last_layernorm_scale": ChannelsLastLayerNormScale,
    "layernorm_chw": lambda: Single(archs._affine(nn.LayerNorm([4, 5, 5]))),
    "layernorm2d_torchvision": lambda: Single(_torchvision_layernorm2d()),
    "layernorm2d_timm": lambda: Single(_timm_layernorm2d()),
    "layernorm_channels_first": lambda: Single(archs.ChannelsFirstLayerNorm(4)),
    "groupnorm": lambda: Single(archs._affine(nn.GroupNorm(2, 4))),
    "groupnorm_no_affine": lambda: Single(nn.GroupNorm(2, 4, affine=False)),
    "instancenorm_affine": lambda: Single(archs._affine(nn.InstanceNorm2d(4, affine=True))),
}
EXPORTS = {"legacy17": {"opset": 17}, "legacy15": {"opset": 15}, "dynamo": {"opset": None, "dynamo": True},
           "dynamo21": {"opset": 21, "dynamo": True}}


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("name", TORCH_NORMS)
def test_torch_export_lrp0_is_gradient_times_input(name, export, tmp_path):
    """LRP-0 with seed g ⊙ y equals x ⊙ ∂(Σ g ⊙ y)/∂x of the module with sigma detached, for what each exporter
    emits (LayerNormalization with Transposes, the written-out form below opset 17 / by hand, InstanceNormalization,
    GroupNorm's Reshape-InstanceNormalization-Reshape-Mul-Add or GroupNormalization at opset 21)."""
    torch.manual_seed(3)
    module = TORCH_NORMS[name]().eval()
    shape = (2, 4, 5, 5)
    path = archs.export(module, tmp_path / "m.onnx", shape, **EXPORTS[export])
    model = onnx.load(str(path))
    x = archs.example_input(shape, seed=5) * 2.0 + 0.3
    y = _run(model, {"input": x})["logits"]
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    canon_ops = [n.op_type for n in lrpc.canonize(model).graph.node]
    assert not {"ReduceMean", "Sqrt", "Pow", "Div"} & set(canon_ops), canon_ops
    g = RNG.standard_normal(y.shape).astype(np.float32)
    got = _run(compiled, {"input": x, "relevance_seed": g * y})
    assert np.max(np.abs(got["logits"] - y)) <= 1e-5 * np.max(np.abs(y))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = archs.sigma_detached(module)(xt)
    assert np.max(np.abs(yt.detach().numpy() - y)) <= 1e-5 * np.max(np.abs(y)), "twin ≠ export"
    (yt * torch.from_numpy(g)).sum().backward()
    want = (xt.grad * xt).detach().numpy()
    err = rel_l2(got["relevance"], want)
    report_line(f"normalization LRP-0 = grad×input {name:30s} {export:9s} {' '.join(canon_ops):60s} rel L2 {err:.1e}")
    assert err <= 1e-4, f"relative L2 {err:.2e}"


def test_float32_layernorm_uses_its_invstddev(tmp_path):
    """A float32 LayerNormalization gives sigma through its own InvStdDev output: no statistics recomputed."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)],
                   {"s": scale.astype(np.float32), "b": bias.astype(np.float32)}, dtype=np.float32)
    compiled = lrpc.compile(model, "epsilon")
    ln = next(n for n in compiled.graph.node if n.op_type == "LayerNormalization")
    assert len(ln.output) == 3 and ln.output[1] == "" and ln.output[2]
    assert not any(n.op_type == "Sqrt" for n in compiled.graph.node)


@pytest.mark.slow
def test_torchvision_convnext_tiny(tmp_path):
    """torchvision convnext_tiny (random weights, 64x64): its 23 LayerNorms (Transpose-LayerNormalization-Transpose,
    layer scale Mul) and GELUs (Erf arithmetic: one activation) compile; with GELU swapped for ReLU, LRP-0 = gradient
    × input of the sigma-detached twin."""
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.convnext_tiny(weights=None).eval()
    shape = (2, 3, 64, 64)
    path = archs.export(model, tmp_path / "convnext.onnx", shape)
    compiled = lrpc.compile(str(path), "epsilon")
    assert sum(n.op_type == "LayerNormalization" and not n.name.startswith("lrp/") for n in compiled.graph.node) == 23
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.GELU):
                setattr(parent, cname, nn.ReLU())
    with torch.no_grad():  # (layer scale 1e-6 and LayerNorm's ones / zeros would hide the blocks)
        for m in model.modules():
            if hasattr(m, "layer_scale"):
                m.layer_scale.uniform_(0.1, 0.3)
            if isinstance(m, nn.LayerNorm):
                archs._affine(m)
    path = archs.export(model, tmp_path / "convnext_relu.onnx", shape)
    x = archs.example_input(shape)
    y = _run(onnx.load(str(path)), {"input": x})["logits"]
    top = y.argmax(1)
    seed = np.zeros_like(y)
    seed[np.arange(2), top] = y[np.arange(2), top]
    r = _run(lrpc.compile(str(path), "epsilon", epsilon=0.0, stabilizer_eps=0.0), {"input": x, "relevance_seed": seed})
    # the twin in float64: in float32, torch's own gradient of sample 0 is 1.4e-3 (relative L2) off its float64 value
    # (a ReLU at its threshold); lrpc's float32 relevance is 7e-7 off
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    logits = archs.sigma_detached(model.double())(xt)
    logits[torch.arange(2), torch.from_numpy(top)].sum().backward()
    want = (xt.grad * xt).detach().numpy()
    errs = [rel_l2(r["relevance"][i], want[i]) for i in range(2)]
    report_line(f"normalization LRP-0 = grad×input torchvision convnext_tiny (ReLU) max rel L2 {max(errs):.1e}")
    assert max(errs) <= 1e-4, errs


# ------------------------------------------------------------------------------------------------ passes

def test_affine_folds_into_the_node():
    """A constant Mul/Add after LayerNormalization (varying along the normalized axes), InstanceNormalization and
    GroupNormalization (per channel) joins the node's scale and bias; forward unchanged."""
    c = SHAPE[1]
    s4, b4 = (v.astype(np.float32) for v in _params(c))
    s3, b3 = (v.astype(np.float32) for v in _params(SHAPE[-1]))
    m, a = (v.astype(np.float32) for v in _params(c))
    cases = {
        "LayerNormalization": (_node("LayerNormalization", ["x", "s3", "b3"], ["n"], axis=-1), m[:3], a[:3], 17),
        "InstanceNormalization": (_node("InstanceNormalization", ["x", "s4", "b4"], ["n"]), m.reshape(c, 1, 1),
                                  a.reshape(c, 1, 1), 17),
        "GroupNormalization-21": (_node("GroupNormalization", ["x", "s4", "b4"], ["n"], num_groups=2),
                                  m.reshape(c, 1, 1), a.reshape(c, 1, 1), 21),
    }
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    for what, (norm, mul, add, opset) in cases.items():
        model = _graph([norm, _node("Mul", ["n", "m"], ["nm"]), _node("Add", ["a", "nm"], ["y"])],
                       {"s3": s3, "b3": b3, "s4": s4, "b4": b4, "m": mul, "a": add},
                       dtype=np.float32, opset=opset)
        canon = lrpc.canonize(model)
        assert [n.op_type for n in canon.graph.node] == [norm.op_type], what
        want = _run(model, {"x": x})["y"]
        assert np.max(np.abs(_run(canon, {"x": x})["y"] - want)) <= 1e-5 * np.max(np.abs(want)), what


def test_affine_that_does_not_fit_stays_and_its_bias_add_joins_the_normalization():
    """A Mul varying along an axis the LayerNormalization does not normalize stays (pass: identity); the Add after it
    is the normalization's bias (origin LayerNormalization, category normalization: epsilon, not pass)."""
    scale, bias = (v.astype(np.float32) for v in _params(SHAPE[-1]))
    per_row = (0.5 + RNG.random((3, 1))).astype(np.float32)
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], ["n"], axis=-1), _node("Mul", ["n", "m"], ["nm"]),
                    _node("Add", ["nm", "a"], ["y"])],
                   {"s": scale, "b": bias, "m": per_row, "a": np.full((3, 1), 0.7, np.float32)}, dtype=np.float32)
    canon = lrpc.canonize(model)
    assert [n.op_type for n in canon.graph.node] == ["LayerNormalization", "Mul", "Add"]
    origin = json.loads({p.key: p.value for p in canon.metadata_props}["lrpc.origin"])
    assert origin == {"Add_y": "LayerNormalization"}
    for composite in ("epsilon", "epsilon-gamma-box", "epsilon-plus"):
        rules = json.loads({p.key: p.value for p in lrpc.compile(model, composite).metadata_props}["lrpc.rules"])
        assert rules == {"LayerNormalization_n": "epsilon(epsilon=1e-06)", "Mul_nm": "pass",
                         "Add_y": "epsilon(epsilon=1e-06)"}, composite


def test_written_out_layernorm_forms(tmp_path):
    """Square as Mul(d, d), 1/sigma as Reciprocal then Mul, axes as an input (opset 18): one LayerNormalization;
    forward outputs equal (1e-5 relative)."""
    c = SHAPE[1]
    scale, bias = (v.reshape(c, 1, 1) for v in _params(c))
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    for kw in ({"square": "Mul"}, {"divide": "Reciprocal"}, {"opset": 18},
               {"opset": 18, "square": "Mul", "divide": "R"}):
        model = _written_out_layernorm([1], scale, bias, dtype=np.float32, **kw)
        canon = lrpc.canonize(model)
        assert [n.op_type for n in canon.graph.node] == ["Transpose", "LayerNormalization", "Transpose"], kw
        want = _run(model, {"x": x})["y"]
        assert np.max(np.abs(_run(canon, {"x": x})["y"] - want)) <= 1e-5 * np.max(np.abs(want)), kw


def test_written_out_normalization_over_the_batch_axis_is_refused():
    model = _written_out_layernorm([0, 1], np.ones((4, 1, 1)), np.zeros((4, 1, 1)))
    with pytest.raises(lrpc.UnsupportedError, match=r"node 'ReduceMean_mu' \(ReduceMean\): a normalization over the "
                                                    r"batch axis"):
        lrpc.compile(model, "epsilon")


def test_written_out_layernorm_over_dynamic_dims_is_refused():
    model = _written_out_layernorm([2, 3], np.ones((4, 1, 1)), np.zeros((4, 1, 1)))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(lrpc.UnsupportedError,
                       match=r"node 'ReduceMean_mu' \(ReduceMean\): .*dynamic size.*--input-shape"):
        lrpc.compile(model, "epsilon")


# ------------------------------------------------------------------------------------------------ errors, composites

def test_scale_computed_in_the_graph_is_refused():
    """A scale from another graph input (FiLM / adaptive norm) has no rule here: one UnsupportedError naming
    node and op."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"b": bias},
                   extra_inputs=[helper.make_tensor_value_info("s", TensorProto.DOUBLE, [SHAPE[-1]])])
    with pytest.raises(lrpc.UnsupportedError, match=r"node 'LayerNormalization_y' \(LayerNormalization\): "
                                                    r"LayerNormalization with a scale or bias computed in the graph"):
        lrpc.compile(model, "epsilon")
    model = _graph([_node("InstanceNormalization", ["x", "s", "b"])], {"s": np.ones(4)},
                   extra_inputs=[helper.make_tensor_value_info("b", TensorProto.DOUBLE, [4])])
    with pytest.raises(lrpc.UnsupportedError, match=r"node 'InstanceNormalization_y' \(InstanceNormalization\)"):
        lrpc.compile(model, "epsilon")


def test_groupnormalization_18_is_refused():
    """Version 18 (one scale per group) is deprecated: onnx's checker refuses a file holding it (invalid model); a
    ModelProto given to compile gets one line naming every such node (a refusal, listed with the other unsupported
    nodes)."""
    model = _graph([_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2),
                    _node("GroupNormalization", ["g", "s", "b"], num_groups=2)], {"s": np.ones(2), "b": np.zeros(2)},
                   opset=21)
    model.opset_import[0].version = 18
    with pytest.raises(lrpc.UnsupportedError, match=r"node 'GroupNormalization_y' \(GroupNormalization\): "
                                                    r"GroupNormalization below opset 21") as e:
        lrpc.compile(model, "epsilon")
    assert "GroupNormalization_g" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert sorted(e.value.nodes) == ["GroupNormalization_g", "GroupNormalization_y"]


def test_command_line_error_is_one_line(tmp_path):
    """On the command line: exit code 2, one line naming node and op."""
    import subprocess
    import sys

    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"b": bias},
                   extra_inputs=[helper.make_tensor_value_info("s", TensorProto.DOUBLE, [SHAPE[-1]])])
    onnx.save(model, str(tmp_path / "m.onnx"))
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(tmp_path / "m.onnx"), "-o",
                           str(tmp_path / "out.onnx")], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("lrpc: error: ") and "node 'LayerNormalization_y' (LayerNormalization)" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_layernorm_over_the_batch_axis_is_refused():
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=0)],
                   {"s": np.ones(SHAPE[1:]), "b": np.zeros(SHAPE[1:])})
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(lrpc.UnsupportedError,
                       match=r"node 'LayerNormalization_y' \(LayerNormalization\): .*batch axis"):
        lrpc.compile(model, "epsilon")


def test_used_statistics_outputs_are_refused():
    """Relevance would reach the Mean output (it feeds the explained output): no rule for that."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], ["n", "mean"], axis=-1),
                    _node("Add", ["n", "mean"], ["y"])], {"s": scale.astype(np.float32), "b": bias.astype(np.float32)},
                   dtype=np.float32)
    with pytest.raises(lrpc.UnsupportedError,
                       match=r"node 'LayerNormalization_n' \(LayerNormalization\): .*Mean/InvStdDev"):
        lrpc.compile(model, "epsilon")


def _rule_file(tmp_path, rule: str):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"composite": "epsilon-gamma-box",
                                "rules": [{"category": "normalization", "rule": rule}]}))
    return str(path)


def test_rule_file_pass_is_identity(tmp_path):
    """A rule file can give normalization layers pass: R_x = R (the relevance goes through unchanged)."""
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"s": scale, "b": bias})
    x, R = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
    got = _run(lrpc.compile(model, _rule_file(tmp_path, "pass")), {"x": x, "relevance_seed": R}, reference=True)
    assert np.array_equal(got["relevance"], R)


def test_rule_that_does_not_apply_is_refused(tmp_path):
    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"s": scale, "b": bias})
    with pytest.raises(lrpc.UnsupportedError, match=r"node 'LayerNormalization_y' \(LayerNormalization\): rule 'zplus' "
                                                    r"does not apply to a normalization layer"):
        lrpc.compile(model, _rule_file(tmp_path, "zplus"))


def test_every_composite_gives_normalizations_epsilon():
    from lrpc.composites import COMPOSITES, describe

    scale, bias = _params(SHAPE[-1])
    model = _graph([_node("LayerNormalization", ["x", "s", "b"], axis=-1)], {"s": scale, "b": bias})
    for name in COMPOSITES:
        rules = json.loads({p.key: p.value for p in lrpc.compile(model, name).metadata_props}["lrpc.rules"])
        assert rules == {"LayerNormalization_y": "epsilon(epsilon=1e-06)"}, name
    lines = describe().splitlines()
    assert "epsilon on normalization layers" in describe()
    assert any(line.startswith("Layer categories") and "normalization" in line for line in lines)


def _in_float32(kernel):
    """onnx's reference kernel ``kernel`` computing in float32 (as onnxruntime's normalization kernels do)."""
    def run(self, x, *args, **kw):
        return tuple(v.astype(x.dtype) for v in kernel._run(self, x.astype(np.float32), *args, **kw))
    return type(kernel.__name__, (kernel,), {"op_domain": "", "_run": run})


@pytest.mark.parametrize("op", ["InstanceNormalization", "LayerNormalization"])
def test_float16_statistics_do_not_overflow(op):
    """A float16 graph: the standard deviation the backward needs is computed in float32 (squares of deviations past
    256 overflow float16's range), as runtimes' normalization kernels do. Inputs of magnitude ~1000, every other op
    evaluated in float16 (onnx's reference evaluator; onnxruntime's CPU runs most float16 ops in float32 and would
    hide an overflow that a GPU shows); oracle: the float64 dense rule on the same inputs, at float16's precision."""
    c = SHAPE[1]
    scale, bias = _params(c) if op == "InstanceNormalization" else _params(*SHAPE[1:])
    attrs = {"epsilon": 1e-3} if op == "InstanceNormalization" else {"epsilon": 1e-3, "axis": 1}
    model = _graph([_node(op, ["x", "s", "b"], **attrs)], {"s": scale.astype(np.float16), "b": bias.astype(np.float16)},
                   dtype=np.float16)
    x = (RNG.standard_normal(SHAPE) * 1000.0).astype(np.float16)
    R = RNG.standard_normal(SHAPE).astype(np.float16)
    evaluator = ReferenceEvaluator(lrpc.compile(model, "epsilon", epsilon=0.0),
                                   new_ops=[_in_float32(LayerNormalization), _in_float32(InstanceNormalization)])
    got = evaluator.run(["relevance"], {"x": x, "relevance_seed": R})[0]
    assert got.dtype == np.float16
    if op == "InstanceNormalization":
        labels, w, b = _labels("instance", SHAPE[1:]), scale.reshape(c, 1, 1), bias.reshape(c, 1, 1)
    else:
        labels, w, b = _labels("layer", SHAPE[1:], 0), scale, bias
    w, b = (v.astype(np.float16).astype(np.float64) for v in (w, b))
    _, want = dense_rule(x.astype(np.float64), labels, w, b, 1e-3, R.astype(np.float64), eps=0.0)
    err = rel_l2(got.astype(np.float64), want)
    report_line(f"normalization float16 |x| ~ 1000 {op:24s} rel L2 {err:.1e}")
    assert err <= 2e-2, f"relative L2 {err:.2e}"


class _CosineAttention(nn.Module):
    """Swin V2's cosine attention in small: F.normalize of the queries and keys (``x / max(||x||, eps)``, broadcast
    by Expand), their product times a scale, softmax, times the values."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        q, k = nn.functional.normalize(self.q(x), dim=-1), nn.functional.normalize(self.k(x), dim=-1)
        return self.o(((q @ k.transpose(-1, -2) * 5.0).softmax(-1) @ x).mean(1))


class _ResponseNorm(nn.Module):
    """ConvNeXt V2's global response normalization between two 1x1 convolutions: ``G = ||x||`` over the spatial
    axes, ``x + w · x · G / (mean_c(G) + eps) + b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w, self.bias = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5), nn.Parameter(0.1 * torch.randn(1, 8, 1, 1))

    def forward(self, x):
        h = self.a(x)
        g = h.norm(p=2, dim=(2, 3), keepdim=True)
        h = h + self.w * (h * (g / (g.mean(dim=1, keepdim=True) + 1e-6))) + self.bias
        return self.b(h).mean((2, 3))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["cosine_attention", "response_norm"])
def test_l2_normalizations_hold_their_scale_constant(name, exporter, tmp_path):
    """Norms written out that scale a tensor by a function of its own L2 norm (``F.normalize``; ConvNeXt V2's GRN,
    ``x · G / mean(G)``) are one normalization of ``x`` whose scale is held constant (as LayerNorm's σ): relevance
    passes through unchanged. Oracle: gradient × input of the torch module with the norm detached
    (tests/detach_rules.py) equals attnlrp at epsilon 0 (1e-4, float32)."""
    from detach_rules import rules_in_torch
    from models import families

    torch.manual_seed(0)
    model, shape = (_CosineAttention(), (2, 4, 8)) if name == "cosine_attention" else (_ResponseNorm(), (2, 3, 5, 5))
    model.eval().requires_grad_(False)
    x = torch.randn(shape)
    path = families.export(model, tmp_path / "m.onnx", shape, exporter)
    xt = x.clone().requires_grad_(True)
    with rules_in_torch("attnlrp"):
        y = model(xt)
    k = y.argmax(1)
    y.gather(1, k[:, None]).sum().backward()
    seed = np.zeros(tuple(y.shape), np.float32)
    seed[np.arange(len(k)), k.numpy()] = y.detach().numpy()[np.arange(len(k)), k.numpy()]
    compiled = lrpc.compile(str(path), "attnlrp", epsilon=0.0, stabilizer_eps=0.0)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["relevance"], {"input": x.numpy(), "relevance_seed": seed})[0]
    err = rel_l2(got, (xt.grad * xt).detach().numpy())
    report_line(f"{name} {exporter}: attnlrp vs the norm held constant in torch rel L2 {err:.1e} (float32)")
    assert err < 1e-4

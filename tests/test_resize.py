"""Resize -> MatMul chain (passes/resize_to_matmul.py): forward equivalence under onnxruntime for every
mode / coordinate transform, structure, refusals, and relevance against numerical oracles (exact routing
of nearest upsampling, a dense numpy norm rule for linear modes, conservation)."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.graph import ORIGIN_KEY

# --- helpers ---------------------------------------------------------------------------------------

def _resize_model(shape, scales=None, sizes=None, roi=None, opset=17, pre=None, **attrs):
    """x [shape] -> (optional Relu) -> Resize -> y. ``shape`` may hold a symbolic batch ("N")."""
    inits, ins = [], ["xr" if pre else "x", "", "", ""]
    if roi is not None:
        inits.append(numpy_helper.from_array(np.asarray(roi, np.float32), "roi"))
        ins[1] = "roi"
    if scales is not None:
        inits.append(numpy_helper.from_array(np.asarray(scales, np.float32), "scales"))
        ins[2] = "scales"
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"))
        ins[3] = "sizes"
    while ins[-1] == "":
        ins.pop()
    nodes = ([helper.make_node(pre, ["x"], ["xr"], name="pre")] if pre else []) + \
        [helper.make_node("Resize", ins, ["y"], name="resize", **attrs)]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    # give the graph output its (static spatial) shape, as exporters do
    out = _run(model, {"x": np.zeros([1 if isinstance(d, str) else d for d in shape], np.float32)})["y"].shape
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [shape[0] if isinstance(shape[0], str) else out[0], *out[1:]]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _origin(model) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get(ORIGIN_KEY, "{}"))


def _assert_lowered(result, n_matmuls=None):
    ops = [n.op_type for n in result.graph.node]
    assert "Resize" not in ops and "Upsample" not in ops, ops
    origin = _origin(result)
    mms = [n.name for n in result.graph.node if n.op_type == "MatMul"]
    assert mms and all(origin.get(n) == "Resize" for n in mms), (mms, origin)
    if n_matmuls is not None:
        assert len(mms) == n_matmuls, ops


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _check_forward(model, shape, n_matmuls=None, seed=0):
    result = lrpc.canonize(model)
    _assert_lowered(result, n_matmuls)
    x = np.random.default_rng(seed).standard_normal([2 if isinstance(d, str) else d for d in shape]).astype(np.float32)
    want, got = _run(model, {"x": x})["y"], _run(result, {"x": x})["y"]
    assert want.shape == got.shape
    assert _rel(got, want) <= 1e-5, _rel(got, want)
    return result


# --- forward equivalence ---------------------------------------------------------------------------

FORWARD = {
    # torch's nn.Upsample(scale_factor=2) export
    "nearest-x2-asymmetric-floor": dict(scales=[1, 1, 2, 2], mode="nearest",
                                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "nearest-sizes-5to8-half_pixel": dict(sizes=[1, 3, 8, 8], mode="nearest"),  # round_prefer_floor default
    "nearest-sizes-round_prefer_ceil": dict(sizes=[1, 3, 8, 7], mode="nearest", nearest_mode="round_prefer_ceil"),
    "nearest-ceil-align_corners": dict(sizes=[1, 3, 9, 8], mode="nearest", nearest_mode="ceil",
                                       coordinate_transformation_mode="align_corners"),
    "nearest-down-0.5": dict(scales=[1, 1, 0.5, 0.5], mode="nearest"),
    "nearest-only-w": dict(scales=[1, 1, 1, 3], mode="nearest"),
    "linear-x2-half_pixel": dict(scales=[1, 1, 2, 2], mode="linear"),
    "linear-sizes-align_corners": dict(sizes=[1, 3, 8, 9], mode="linear",
                                       coordinate_transformation_mode="align_corners"),
    "linear-1.5-asymmetric": dict(scales=[1, 1, 1.5, 1.5], mode="linear", coordinate_transformation_mode="asymmetric"),
    "linear-pytorch_half_pixel": dict(sizes=[1, 3, 1, 8], mode="linear",
                                      coordinate_transformation_mode="pytorch_half_pixel"),
    "linear-down-half_pixel": dict(sizes=[1, 3, 3, 4], mode="linear"),
    "linear-mixed-up-down": dict(sizes=[1, 3, 9, 3], mode="linear", coordinate_transformation_mode="align_corners"),
    "cubic-half_pixel": dict(scales=[1, 1, 2, 1.5], mode="cubic"),
    "cubic-exclude-outside": dict(sizes=[1, 3, 7, 4], mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
    "tf_crop_and_resize": dict(sizes=[1, 3, 6, 7], roi=[0, 0, 0.2, 0.1, 1, 1, 0.9, 0.8], mode="linear",
                               coordinate_transformation_mode="tf_crop_and_resize"),
}


@pytest.mark.parametrize("name", list(FORWARD))
def test_forward_equivalence_4d(name):
    kw = dict(FORWARD[name])
    model = _resize_model([1, 3, 5, 6], **kw)
    _check_forward(model, [1, 3, 5, 6])


def test_dynamic_batch_with_scales():
    model = _resize_model(["N", 3, 5, 6], scales=[1, 1, 2, 2], mode="linear")
    _check_forward(model, ["N", 3, 5, 6], n_matmuls=2)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_forward_equivalence_3d_and_5d(mode):
    _check_forward(_resize_model([2, 3, 7], scales=[1, 1, 2.5], mode=mode), [2, 3, 7], n_matmuls=1)
    _check_forward(_resize_model([1, 2, 3, 4, 5], sizes=[1, 2, 5, 4, 9], mode=mode,
                                 coordinate_transformation_mode="align_corners"), [1, 2, 3, 4, 5], n_matmuls=2)
    _check_forward(_resize_model([1, 2, 3, 4, 5], scales=[1, 1, 2, 0.5, 1.5], mode=mode), [1, 2, 3, 4, 5], n_matmuls=3)


def test_opset18_19_attributes():
    shape = [1, 2, 6, 8]
    # axes attribute: scales only for the spatial axes
    _check_forward(_resize_model(shape, scales=[2, 1.5], axes=[2, 3], mode="linear", opset=18), shape, n_matmuls=2)
    # antialiased linear downsampling (a wider, still separable filter)
    _check_forward(_resize_model(shape, sizes=[3, 3], axes=[-2, -1], mode="linear", antialias=1, opset=18), shape)
    # one scale for both axes
    _check_forward(_resize_model(shape, sizes=[4, 3], axes=[2, 3], mode="linear", keep_aspect_ratio_policy="not_larger",
                                 opset=18), shape)
    _check_forward(_resize_model(shape, sizes=[9, 10], axes=[2, 3], mode="nearest",
                                 keep_aspect_ratio_policy="not_smaller", opset=18), shape)
    _check_forward(_resize_model(shape, scales=[1, 1, 1.5, 2], mode="linear",
                                 coordinate_transformation_mode="half_pixel_symmetric", opset=19), shape)


@pytest.mark.parametrize("slice_op", ["Shape-end", "Slice"])
def test_sizes_from_the_inputs_own_shape_with_dynamic_batch(slice_op):
    """sizes = Concat(Shape(x)[0:2], const), as torch exports interpolate(size=...) with a dynamic batch."""
    inits = [numpy_helper.from_array(np.array([9, 10], np.int64), "hw")]
    if slice_op == "Shape-end":
        nodes = [helper.make_node("Shape", ["x"], ["nc"], end=2)]
    else:
        inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("s0", 0), ("s2", 2))]
        nodes = [helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Slice", ["sh", "s0", "s2"], ["nc"])]
    nodes += [helper.make_node("Concat", ["nc", "hw"], ["sz"], axis=0),
              helper.make_node("Resize", ["x", "", "", "sz"], ["y"], name="resize", mode="linear")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 9, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = _check_forward(model, ["N", 2, 6, 8], n_matmuls=2)
    assert [n.op_type for n in result.graph.node] == ["MatMul", "Transpose", "MatMul", "Transpose"]


def test_keep_aspect_ratio_rounding_up_is_refused():
    # scale 1.25 on 6 rows gives round(7.5) = 8 rows, which no per-axis Resize with that scale produces
    model = _resize_model([1, 2, 6, 8], sizes=[9, 10], axes=[2, 3], mode="linear",
                          keep_aspect_ratio_policy="not_larger", opset=18)
    _refused(model, "keep_aspect_ratio_policy")


def test_unit_scales_leave_an_identity():
    model = _resize_model([1, 2, 3, 4], scales=[1, 1, 1, 1], mode="linear", pre="Relu")
    result = lrpc.canonize(model)
    assert [n.op_type for n in result.graph.node] == ["Relu", "Identity"]
    x = np.random.default_rng(6).standard_normal([1, 2, 3, 4]).astype(np.float32)
    np.testing.assert_array_equal(_run(result, {"x": x})["y"], np.maximum(x, 0))


def test_matmul_chain_structure():
    """W first (no Transpose), H swapped to the end and back: MatMul, Transpose, MatMul, Transpose."""
    result = _check_forward(_resize_model([1, 3, 5, 6], scales=[1, 1, 2, 2], mode="nearest"), [1, 3, 5, 6])
    assert [n.op_type for n in result.graph.node] == ["MatMul", "Transpose", "MatMul", "Transpose"]
    inits = {i.name: numpy_helper.to_array(i) for i in result.graph.initializer}
    mats = [inits[n.input[1]] for n in result.graph.node if n.op_type == "MatMul"]
    assert sorted(m.shape for m in mats) == [(5, 10), (6, 12)]  # Aᵀ: [in, out]
    for m in mats:  # nearest: one 1 per output column
        assert set(np.unique(m)) <= {0.0, 1.0} and np.all(m.sum(axis=0) == 1)


def test_upsample_opset9_is_upgraded_and_lowered():
    graph = helper.make_graph(
        [helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest", name="up")], "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 8])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    x = np.random.default_rng(1).standard_normal([1, 2, 3, 4]).astype(np.float32)
    result = lrpc.canonize(model)
    _assert_lowered(result, 2)
    np.testing.assert_array_equal(_run(result, {"x": x})["y"], np.repeat(np.repeat(x, 2, axis=2), 2, axis=3))


def test_canonize_is_idempotent_and_compiles():
    model = _resize_model([1, 3, 5, 6], sizes=[1, 3, 8, 9], mode="linear")
    once = lrpc.canonize(model)
    twice = lrpc.canonize(once)
    _assert_lowered(twice, 2)
    compiled = lrpc.compile(once, "epsilon-plus")
    x = np.random.default_rng(2).random([1, 3, 5, 6]).astype(np.float32)
    seed = np.ones([1, 3, 8, 9], np.float32)
    out = _run(compiled, {"x": x, "relevance_seed": seed})
    assert np.allclose(out["y"], _run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert np.isclose(out["relevance"].sum(), seed.sum(), rtol=1e-3)


# --- refusals --------------------------------------------------------------------------------------

def _refused(model, *words):
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.canonize(model)
    msg = str(e.value)
    assert "'resize'" in msg and "(Resize)" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("what, inputs, dtype", [("scales", ["x", "", "s"], TensorProto.FLOAT),
                                                  ("sizes", ["x", "", "", "s"], TensorProto.INT64)])
def test_refuses_non_constant_scales_or_sizes(what, inputs, dtype):
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], mode="nearest", name="resize")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4]),
         helper.make_tensor_value_info("s", dtype, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _refused(model, what, "not a constant")


def test_refuses_batch_or_channel_resize():
    _refused(_resize_model([1, 2, 3, 4], scales=[1, 2, 2, 2], mode="nearest"), "channel")
    _refused(_resize_model([2, 2, 3, 4], scales=[0.5, 1, 2, 2], mode="nearest"), "batch")
    _refused(_resize_model([1, 2, 3, 4], sizes=[1, 4, 6, 8], mode="nearest"), "channel")
    _refused(_resize_model(["N", 2, 3, 4], sizes=[1, 2, 6, 8], mode="linear"), "batch", "dynamic")


def test_refuses_dynamic_spatial_dims():
    _refused(_resize_model([1, 2, "H", "W"], scales=[1, 1, 2, 2], mode="nearest"), "input shape", "'H'")


def test_refuses_non_separable_extrapolation():
    # cells outside the roi get extrapolation_value: an affine, not linear, map
    model = _resize_model([1, 2, 4, 4], sizes=[1, 2, 6, 6], roi=[0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5], mode="linear",
                          coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=7.0)
    _refused(model, "not separable")


# --- relevance -------------------------------------------------------------------------------------

LRP0 = dict(epsilon=0.0, stabilizer_eps=0.0, zero_bias=True)


def _explain(model, x, seed, rules="epsilon", **options):
    compiled = lrpc.compile(model, rules, **(options or LRP0))
    meta = {p.key: p.value for p in compiled.metadata_props}
    described = json.loads(meta["lrpc.rules"])
    assert described and all(v.startswith("norm") for k, v in described.items()), described
    return _run(compiled, {"x": x, "relevance_seed": seed})


def test_nearest_upsampling_routes_relevance_exactly():
    shape = [2, 3, 4, 5]
    model = _resize_model(["N", 3, 4, 5], scales=[1, 1, 2, 2], mode="nearest", pre="Relu",
                          coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    rng = np.random.default_rng(3)
    x = rng.random(shape).astype(np.float32) + 0.1
    seed = rng.standard_normal([2, 3, 8, 10]).astype(np.float32)
    out = _explain(model, x, seed)
    r = out["relevance"].astype(np.float64)
    block = seed.astype(np.float64).reshape(2, 3, 4, 2, 5, 2).sum(axis=(3, 5))
    assert _rel(r, block) <= 1e-5
    for n in range(2):  # conservation per sample
        assert np.isclose(r[n].sum(), seed[n].astype(np.float64).sum(), rtol=1e-4)


def _dense_matrix(model, shape):
    """The resize as a dense matrix [out, in] over one [H, W] plane, from onnxruntime on unit vectors."""
    h, w = shape[2:]
    basis = np.eye(h * w, dtype=np.float32).reshape(h * w, 1, h, w)
    cols = [_run(model, {"x": np.repeat(basis[i:i + 1], shape[1], axis=1)})["y"][0, 0].reshape(-1)
            for i in range(h * w)]
    return np.stack(cols, axis=1).astype(np.float64)


@pytest.mark.parametrize("kw", [
    dict(sizes=[1, 2, 8, 7], mode="linear"),  # half_pixel
    dict(sizes=[1, 2, 8, 7], mode="linear", coordinate_transformation_mode="align_corners"),
    dict(scales=[1, 1, 1.5, 2], mode="linear", coordinate_transformation_mode="asymmetric"),
    dict(sizes=[1, 2, 3, 7], mode="linear"),  # down along H, up along W
    dict(sizes=[1, 2, 8, 7], mode="nearest"),
], ids=["half_pixel", "align_corners", "asymmetric", "down-up", "nearest-5to8"])
def test_relevance_matches_dense_norm_rule(kw):
    shape = [1, 2, 4, 5]
    model = _resize_model(shape, **kw)
    a = _dense_matrix(model, shape)
    rng = np.random.default_rng(4)
    x = (rng.random(shape) + 0.1).astype(np.float32)
    out_shape = _run(model, {"x": x})["y"].shape
    seed = rng.standard_normal(out_shape).astype(np.float32)
    r = _explain(model, x, seed)["relevance"].astype(np.float64)
    want = np.zeros(shape)
    for c in range(shape[1]):  # R_in = x ⊙ Aᵀ(R / (A x))
        xv = x[0, c].astype(np.float64).reshape(-1)
        want[0, c] = (xv * (a.T @ (seed[0, c].astype(np.float64).reshape(-1) / (a @ xv)))).reshape(shape[2:])
    assert _rel(r, want) <= 1e-4, _rel(r, want)
    assert np.isclose(r.sum(), seed.astype(np.float64).sum(), rtol=1e-4)


# --- a small U-Net from torch ----------------------------------------------------------------------

class _UNet(torch.nn.Module):
    def __init__(self, sigmoid: bool = True):
        super().__init__()
        self.sigmoid = sigmoid
        self.enc1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.enc2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.dec2 = torch.nn.Conv2d(16 + 8, 8, 3, padding=1)
        self.enc3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.dec1 = torch.nn.Conv2d(16 + 8, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 1, 1)

    def forward(self, x):
        s1 = torch.relu(self.enc1(x))                                  # [8, 16, 12]
        s2 = torch.relu(self.enc2(torch.nn.functional.max_pool2d(s1, 2)))  # [16, 8, 6]
        s3 = torch.relu(self.enc3(torch.nn.functional.max_pool2d(s2, 2)))  # [16, 4, 3]
        u2 = torch.nn.functional.interpolate(s3, scale_factor=2, mode="nearest")
        d2 = torch.relu(self.dec2(torch.cat([u2, s2[:, :8]], dim=1)))    # [8, 8, 6]
        u1 = torch.nn.functional.interpolate(d2, size=s1.shape[2:], mode="bilinear", align_corners=False)
        d1 = torch.relu(self.dec1(torch.cat([u1, s1, s1], dim=1)[:, :24]))
        y = self.head(d1)
        return torch.sigmoid(y) if self.sigmoid else y


def _export_unet(net):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 16, 12),), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["mask"], dynamic_axes={"x": {0: "N"}, "mask": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def test_unet_compiles_and_keeps_forward():
    torch.manual_seed(0)
    net = _UNet().eval()
    model = _export_unet(net)
    assert sum(n.op_type == "Resize" for n in model.graph.node) == 2
    compiled = lrpc.compile(model, "epsilon-plus")
    assert not any(n.op_type == "Resize" for n in compiled.graph.node)
    origin = _origin(compiled)
    assert sum(v == "Resize" for v in origin.values()) == 4
    rules = json.loads({p.key: p.value for p in compiled.metadata_props}["lrpc.rules"])
    assert all(rules[k].startswith("norm") for k, v in origin.items() if v == "Resize")
    x = np.random.default_rng(5).random([2, 3, 16, 12]).astype(np.float32)
    want = _run(model, {"x": x})["mask"]
    with torch.no_grad():
        assert np.allclose(net(torch.from_numpy(x)).numpy(), want, atol=1e-5)
    seed = want.copy()
    out = _run(compiled, {"x": x, "relevance_seed": seed})
    assert _rel(out["mask"], want) <= 1e-5
    r = out["relevance"]
    assert r.shape == x.shape and np.all(np.isfinite(r)) and np.abs(r).sum() > 0


def test_unet_lrp0_equals_gradient_times_input():
    """ReLU net, winner-take-all MaxPool, norm on the resizes, LRP-0 with biases in the denominators:
    relevance with seed s equals gradient x input with output gradient s / f(x) (lrp-math.md)."""
    torch.manual_seed(1)
    net = _UNet(sigmoid=False).eval()
    model = _export_unet(net)
    rng = np.random.default_rng(7)
    x = rng.random([2, 3, 16, 12]).astype(np.float32)
    seed = rng.random([2, 1, 16, 12]).astype(np.float32)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    out = _run(compiled, {"x": x, "relevance_seed": seed})
    xt = torch.from_numpy(x).double().requires_grad_(True)
    y = net.double()(xt)
    (y * (torch.from_numpy(seed).double() / y).detach()).sum().backward()
    want = (xt.grad * xt).detach().numpy()
    r = out["relevance"].astype(np.float64)
    err = float(np.linalg.norm(r - want) / np.linalg.norm(want))
    assert err <= 1e-5, err


def test_unet_region_mask_seed_explains_the_region():
    """Segmentation: seed = region mask x pre-activation, so LRP-0 equals gradient x input of the region's
    summed logits; a final Sigmoid is skipped (its input is explained)."""
    torch.manual_seed(2)
    net = _UNet(sigmoid=True).eval()
    model = _export_unet(net)
    rng = np.random.default_rng(8)
    x = rng.random([2, 3, 16, 12]).astype(np.float32)
    mask = np.zeros([2, 1, 16, 12], np.float32)
    mask[:, :, 4:10, 3:8] = 1.0
    xt = torch.from_numpy(x).double().requires_grad_(True)
    logits = torch.logit(net.double()(xt), eps=0)  # the pre-activation the compiler explains
    seed = (torch.from_numpy(mask).double() * logits).detach().numpy().astype(np.float32)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    out = _run(compiled, {"x": x, "relevance_seed": seed})
    (logits * torch.from_numpy(mask).double()).sum().backward()
    want = (xt.grad * xt).detach().numpy()
    r = out["relevance"].astype(np.float64)
    assert float(np.linalg.norm(r - want) / np.linalg.norm(want)) <= 1e-4

"""MaxPool relevance, both modes, against literal numpy loops on inputs with ties.

winner: all relevance of a window to its first arg-max in row-major window order (= torch's gradient).
split (``--maxpool split``): shared equally by every cell of the window equal to its maximum; padding and
ceil_mode overhang cells never count. Both conserve relevance exactly."""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
from onnx import TensorProto, helper

import lrpc
from conftest import run_onnx

# name: (input shape, attrs, explicit begin+end pads the reference uses)
CONFIGS = {
    "k2s2": ([2, 3, 6, 6], dict(kernel_shape=[2, 2], strides=[2, 2]), [0, 0, 0, 0]),
    "k3s2-overlap": ([1, 2, 7, 7], dict(kernel_shape=[3, 3], strides=[2, 2]), [0, 0, 0, 0]),
    "k3s2-pad1": ([2, 2, 8, 8], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 1, 1, 1]),
    "k3s1-pad1": ([1, 2, 5, 5], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), [1, 1, 1, 1]),
    "k2s2-ceil-odd": ([1, 2, 5, 7], dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), [0, 0, 0, 0]),
    # onnxruntime drops the last ceil window here (it would start in the end padding)
    "k2s2-ceil-pad-drop": ([1, 2, 5, 5], dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
                           [1, 1, 1, 1]),
    "k3s2-ceil-pad": ([1, 1, 6, 6], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
                      [1, 1, 1, 1]),
    "dilation2": ([1, 2, 8, 7], dict(kernel_shape=[3, 2], dilations=[2, 2], pads=[2, 1, 2, 1]), [2, 1, 2, 1]),
    "asym-pads": ([1, 2, 6, 5], dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 1, 0]), [0, 1, 1, 0]),
    "same-upper": ([1, 2, 6, 6], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), [0, 0, 1, 1]),
    "same-lower": ([1, 2, 6, 6], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"), [1, 1, 0, 0]),
    "1d-k3s2-pad1": ([2, 3, 9], dict(kernel_shape=[3], strides=[2], pads=[1, 1]), [1, 1]),
    "1d-ceil-dil": ([1, 2, 10], dict(kernel_shape=[2], strides=[3], dilations=[2], ceil_mode=1), [0, 0]),
    "3d-mixed": ([1, 2, 5, 6, 5], dict(kernel_shape=[2, 3, 2], strides=[2, 2, 1], pads=[0, 1, 1, 1, 1, 0]),
                 [0, 1, 1, 1, 1, 0]),
    # disjoint windows (compiled for CUDA: a scatter without add): with padding, gaps between windows, dilation, 1-D
    "k2s2-pad1": ([2, 2, 6, 6], dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 1, 1, 1]),
    "k2s3-gaps": ([1, 2, 7, 8], dict(kernel_shape=[2, 2], strides=[3, 3]), [0, 0, 0, 0]),
    "k2s3-dil2": ([1, 2, 8, 8], dict(kernel_shape=[2, 2], strides=[3, 3], dilations=[2, 2]), [0, 0, 0, 0]),
    "1d-k2s2": ([2, 3, 8], dict(kernel_shape=[2], strides=[2]), [0, 0]),
}
# the rest overlap or overhang
DISJOINT = {"k2s2", "k2s2-ceil-pad-drop", "k2s2-pad1", "k2s3-gaps", "k2s3-dil2", "1d-k2s2"}


def out_size(n, k, s, d, pb, pe, ceil):
    span = n + pb + pe - ((k - 1) * d + 1)
    o = (-(-span // s) if ceil else span // s) + 1
    return o - 1 if ceil and (o - 1) * s >= n + pb else o


def reference(x, seed, attrs, pads, mode):
    """Literal loops: (y, relevance) of one MaxPool, float64."""
    x, seed = np.asarray(x, np.float64), np.asarray(seed, np.float64)
    sp, nd = x.shape[2:], x.ndim - 2
    k = attrs["kernel_shape"]
    s, d = attrs.get("strides", [1] * nd), attrs.get("dilations", [1] * nd)
    out = [out_size(sp[i], k[i], s[i], d[i], pads[i], pads[nd + i], attrs.get("ceil_mode", 0)) for i in range(nd)]
    y, r = np.zeros([*x.shape[:2], *out]), np.zeros(x.shape)
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for o in itertools.product(*map(range, out)):
            cells = [p for t in itertools.product(*map(range, k))  # row-major window order
                     if all(0 <= (p := tuple(o[i] * s[i] + t[i] * d[i] - pads[i] for i in range(nd)))[i] < sp[i]
                            for i in range(nd))]
            vals = [x[(n, c, *p)] for p in cells]
            best = max(vals)
            winners = [p for p, v in zip(cells, vals) if v == best]
            winners = winners[:1] if mode == "winner" else winners
            y[(n, c, *o)] = best
            for p in winners:
                r[(n, c, *p)] += seed[(n, c, *o)] / len(winners)
    return y, r


def pool_model(shape, attrs):
    # declare y's shape as onnxruntime computes it: ONNX shape inference keeps a ceil_mode window that
    # starts in the end padding, onnxruntime (and torch) drop it
    probe = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], **attrs)], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    probe = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 8
    y_shape = list(run_onnx(probe, {"x": np.zeros(shape, np.float32)})["y"].shape)
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tied_inputs(shape, rng):
    """Inputs full of ties: small integers, constant regions, all-equal / all-negative (padding) windows."""
    ints = rng.integers(-2, 3, shape).astype(np.float32)
    regions = ints.copy()
    regions[..., : shape[-1] // 2] = 1.0
    return {"ints": ints, "regions": regions, "const": np.full(shape, 3.0, np.float32),
            "negative": -rng.integers(1, 3, shape).astype(np.float32)}


def relevance(compiled, x, seed):
    return run_onnx(compiled, {"x": x, "relevance_seed": seed})


@pytest.mark.parametrize("mode", ["winner", "split"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_loop_reference(name, mode):
    shape, attrs, pads = CONFIGS[name]
    model = pool_model(shape, attrs)
    compiled = lrpc.compile(model, "epsilon", maxpool=mode)
    rng = np.random.default_rng(0)
    for kind, x in tied_inputs(shape, rng).items():
        y_ort = run_onnx(model, {"x": x})["y"]
        seed = rng.standard_normal(y_ort.shape).astype(np.float32)
        y_ref, r_ref = reference(x, seed, attrs, pads, mode)
        np.testing.assert_array_equal(y_ort, y_ref, err_msg=f"{name}/{kind}: reference pooling differs from ORT")
        got = relevance(compiled, x, seed)
        np.testing.assert_array_equal(got["y"], y_ort)
        r = got["relevance"]
        assert np.isfinite(r).all()
        np.testing.assert_allclose(r, r_ref, rtol=1e-6, atol=1e-6, err_msg=f"{name}/{kind}/{mode}")
        # conservation: every window hands all of its relevance to input cells (none to padding)
        assert abs(r.astype(np.float64).sum() - seed.astype(np.float64).sum()) <= 1e-5 * max(1.0, np.abs(seed).sum())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_winner_lowering(name):
    """On the CPU the forward's MaxPool keeps its single output (no Indices: onnxruntime's blocked kernel) and the
    winners come from comparing the input tap by tap with it; compiled for CUDA, MaxPool's indices and a scatter
    (with add where windows overlap). The oracle tests above cover the CPU lowering, test_gpu.py the other."""
    shape, attrs, _ = CONFIGS[name]
    model = pool_model(shape, attrs)
    nodes = lrpc.compile(model, "epsilon").graph.node
    ops = {n.op_type for n in nodes}
    assert not ops & {"MaxUnpool", "ScatterElements", "ScatterND"}
    assert [len(n.output) for n in nodes if n.op_type == "MaxPool"] == [1]
    cuda = lrpc.compile(model, "epsilon", for_provider="cuda")
    scatter = [n for n in cuda.graph.node if n.op_type == "ScatterElements"]
    adds = [a.s for n in scatter for a in n.attribute if a.name == "reduction"]
    assert len(scatter) == 1 and adds == ([] if name in DISJOINT else [b"add"])


def test_split_differs_from_winner_only_on_ties():
    shape, attrs, pads = CONFIGS["k3s2-pad1"]
    rng = np.random.default_rng(1)
    model = pool_model(shape, attrs)
    split, winner = (lrpc.compile(model, "epsilon", maxpool=m) for m in ("split", "winner"))
    x = rng.standard_normal(shape).astype(np.float32)  # no ties
    seed = rng.standard_normal([shape[0], shape[1], 4, 4]).astype(np.float32)
    np.testing.assert_allclose(relevance(split, x, seed)["relevance"], relevance(winner, x, seed)["relevance"],
                               rtol=1e-6, atol=1e-7)  # summation order of overlapping windows differs
    x = np.ones(shape, np.float32)  # every window all tied: split spreads, winner concentrates
    rs, rw = relevance(split, x, seed)["relevance"], relevance(winner, x, seed)["relevance"]
    assert (rs != 0).sum() > (rw != 0).sum()
    np.testing.assert_allclose(rs.sum(), rw.sum(), rtol=1e-5)


TORCH_CASES = [  # torch attrs (symmetric padding only) and the ONNX attrs
    ([2, 3, 6, 6], dict(kernel_size=2, stride=2), dict(kernel_shape=[2, 2], strides=[2, 2])),
    ([1, 2, 7, 7], dict(kernel_size=3, stride=2, padding=1), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)),
    ([1, 2, 5, 5], dict(kernel_size=2, stride=2, ceil_mode=True),
     dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ([1, 2, 8, 8], dict(kernel_size=3, stride=1, padding=1, dilation=2),
     dict(kernel_shape=[3, 3], pads=[1] * 4, dilations=[2, 2])),
    ([1, 2, 5, 5], dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),  # last ceil window dropped
     dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1] * 4, ceil_mode=1)),
]


@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
def test_winner_is_torch_gradient_on_ties(case):
    shape, tattrs, attrs = TORCH_CASES[case]
    compiled = lrpc.compile(pool_model(shape, attrs), "epsilon")  # winner is the default
    rng = np.random.default_rng(case)
    for kind, x in tied_inputs(shape, rng).items():
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.max_pool2d(xt, **tattrs)
        seed = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(torch.tensor(seed, dtype=torch.float64))
        r = relevance(compiled, x, seed)["relevance"]
        np.testing.assert_allclose(r, xt.grad.numpy(), rtol=1e-6, atol=1e-6, err_msg=kind)


def test_cli_flag(tmp_path):
    shape, attrs, pads = CONFIGS["k3s2-pad1"]
    src = tmp_path / "pool.onnx"
    onnx.save(pool_model(shape, attrs), str(src))
    x = tied_inputs(shape, np.random.default_rng(2))["ints"]
    seed = np.random.default_rng(3).standard_normal([shape[0], shape[1], 4, 4]).astype(np.float32)
    for flag, mode in ((["--maxpool", "split"], "split"), ([], "winner")):
        out = tmp_path / f"pool-{mode}.lrp.onnx"
        proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "compile", str(src), "--rules", "epsilon", *flag,
                               "-o", str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        r = relevance(onnx.load(str(out)), x, seed)["relevance"]
        np.testing.assert_allclose(r, reference(x, seed, attrs, pads, mode)[1], rtol=1e-6, atol=1e-6, err_msg=mode)


def test_split_inside_a_network():
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm: Relu zeros make tied windows; LRP-0 with zero_bias conserves."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal([4, 2, 3, 3]).astype(np.float32)
    wd = rng.standard_normal([3, 4 * 3 * 3]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "wd"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(wd, "wd")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = lrpc.compile(model, "epsilon", maxpool="split", epsilon=0.0, zero_bias=True)
    x = np.round(rng.standard_normal([1, 2, 6, 6])).astype(np.float32)
    seed_total = float(run_onnx(model, {"x": x})["y"][0, 1])
    out = relevance(compiled, x, np.array([[0, seed_total, 0]], np.float32))
    assert np.isfinite(out["relevance"]).all()
    np.testing.assert_allclose(out["relevance"].sum(), seed_total, rtol=1e-4)


@pytest.mark.parametrize("mode", ["winner", "split"])
def test_ceil_window_dropped_inside_a_network(mode):
    """A ceil_mode MaxPool whose last window would start in the end padding (onnxruntime drops it, ONNX shape
    inference before opset 22 keeps it) between two Convs: shapes, forward and conservation stay right."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal([3, 2, 3, 3]).astype(np.float32)
    w2 = rng.standard_normal([2, 3, 1, 1]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                              ceil_mode=1),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = lrpc.compile(model, "epsilon", maxpool=mode, epsilon=0.0, zero_bias=True)
    x = np.round(rng.standard_normal([1, 2, 5, 5])).astype(np.float32)
    y = run_onnx(model, {"x": x})["y"]
    out = relevance(compiled, x, y)
    np.testing.assert_array_equal(out["y"], y)
    assert np.isfinite(out["relevance"]).all()
    np.testing.assert_allclose(out["relevance"].sum(), y.sum(), rtol=1e-4)


def test_split_dynamic_batch():
    attrs, pads = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 1, 1, 1]
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = lrpc.compile(model, "epsilon", maxpool="split")
    rng = np.random.default_rng(6)
    for n in (1, 3):
        x = rng.integers(-1, 2, [n, 2, 7, 7]).astype(np.float32)
        seed = rng.standard_normal([n, 2, 4, 4]).astype(np.float32)
        np.testing.assert_allclose(relevance(compiled, x, seed)["relevance"],
                                   reference(x, seed, attrs, pads, "split")[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DISJOINT))
def test_scatter_unpools_for_cuda(name, tmp_path):
    """Compiled for CUDA (``for_provider="cuda"``, recorded in the metadata), the winners come from MaxPool's
    indices and a scatter (no MaxUnpool: onnxruntime has no CUDA kernel for it): the same relevance bit for bit as
    the CPU lowering on tied inputs."""
    shape, attrs, _ = CONFIGS[name]
    compiled = lrpc.compile(pool_model(shape, attrs), "epsilon")
    rewritten = lrpc.compile(pool_model(shape, attrs), "epsilon", for_provider="cuda")
    ops = [n.op_type for n in rewritten.graph.node]
    assert "MaxUnpool" not in ops and "ScatterElements" in ops
    meta = lambda m: {p.key: p.value for p in m.metadata_props}  # noqa: E731
    assert meta(rewritten)["lrpc.provider"] == "cuda" and "lrpc.provider" not in meta(compiled)
    rng = np.random.default_rng(4)
    model = pool_model(shape, attrs)
    for kind, x in tied_inputs(shape, rng).items():
        y = run_onnx(model, {"x": x})["y"]
        seed = rng.standard_normal(y.shape).astype(np.float32)
        np.testing.assert_array_equal(relevance(rewritten, x, seed)["relevance"],
                                      relevance(compiled, x, seed)["relevance"], err_msg=kind)
    with pytest.raises(lrpc.InputError, match="for_provider must be one of cpu, cuda, portable"):
        lrpc.compile(pool_model(shape, attrs), "epsilon", for_provider="gpu")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_winner_disjoint_other_float_types(dtype):
    """float16 and float64 graphs: the same tap-by-tap lowering. Integer inputs and a seed exact in float16: the loop
    reference must match exactly."""
    shape, attrs, pads = CONFIGS["k2s2"]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs)], "pool",
                              [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, [2, 3, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = lrpc.compile(model, "epsilon")
    assert not {n.op_type for n in compiled.graph.node} & {"MaxUnpool", "ScatterElements"}
    rng = np.random.default_rng(5)
    for kind, x in tied_inputs(shape, rng).items():
        seed = rng.integers(-4, 5, [2, 3, 3, 3]).astype(dtype)
        r = relevance(compiled, x.astype(dtype), seed)["relevance"]
        assert r.dtype == dtype
        np.testing.assert_array_equal(r, reference(x, seed, attrs, pads, "winner")[1].astype(dtype), err_msg=kind)

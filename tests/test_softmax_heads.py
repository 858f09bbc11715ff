"""A final softmax behind element moves (issue "a final Softmax that the opset upgrade rewrote").

Real exporter output, upgraded by lrpc where it is older than opset 17:
* torch's exporter before opset 13 writes ``softmax(dim=1)`` of a pooled [N, C, 1, 1] map as
  ``Transpose(0,3,2,1) -> Softmax(axis=3) -> Transpose(0,3,2,1)`` (pooled_softmax-op9 / -op11);
* ``softmax(dim=1).permute(0, 2, 3, 1)`` becomes ``Transpose(0,3,2,1) -> Softmax(axis=3) -> Transpose(0,2,1,3)``
  there (nhwc_softmax-op11) and ``Softmax(axis=1) -> Transpose(0,2,3,1)`` from opset 13 on and with dynamo;
* onnx's version converter writes an opset-9 ``Softmax(axis=1)`` on a rank-4 tensor as
  ``Flatten -> Softmax(axis=-1) -> Reshape(Shape)`` (softmax_axis1_opset9).
The explained tensor is the logits in the graph output's shape and element order (targets are read off the output).
Oracles: the explained tensor = the torch twin's logits (1e-5 relative); LRP-0 (epsilon = stabilizer_eps = 0) of a
one-hot seed = gradient × input of that logit / the logit (1e-4 relative L2), for class indices, ``pixel:Y,X``
on the channels-last output, the graph's own top-1 (compiled ``seed="top1"`` and Session's switch) and
``lrpc explain --npy``; forward outputs unchanged (1e-5)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch

import lrpc
from conftest import rel_l2
from lrpc import cli
from models import archs

LRP0 = {"epsilon": 0.0, "stabilizer_eps": 0.0}
MODELS = ["pooled_softmax-op9", "pooled_softmax-op11", "softmax_axis1_opset9", "nhwc_softmax-op11", "nhwc_softmax",
          "nhwc_softmax-dynamo"]


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("softmax"), {}

    def get(name: str) -> archs.Arch:
        if name not in cache:
            if name in archs.ONNX_BUILDERS:
                cache[name] = archs.ONNX_BUILDERS[name]()
            else:
                family, _, variant = name.partition("-")
                kw = {"opset": int(variant[2:])} if variant.startswith("op") else {}
                kw = {"dynamo": True, "opset": None} if variant == "dynamo" else kw
                cache[name] = archs.torch_arch(family, root, **kw)
        return cache[name]

    return get


def _proto(a: archs.Arch) -> onnx.ModelProto:
    return a.model if isinstance(a.model, onnx.ModelProto) else onnx.load(a.model)


def _run(model: onnx.ModelProto, feeds: dict, names=None) -> dict:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = names or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _grad_x_input_over_logit(a: archs.Arch, index: np.ndarray) -> np.ndarray:
    """LRP-0 of a one-hot seed at flat entry ``index[n]`` of each sample's logits: x ⊙ ∂z/∂x / z (the twin's)."""
    x = torch.from_numpy(a.x.copy()).requires_grad_(True)
    flat = a.twin(x).reshape(len(a.x), -1)
    picked = flat[torch.arange(len(index)), torch.from_numpy(np.asarray(index))]
    picked.sum().backward()
    return (x.grad * x).detach().numpy() / picked.detach().numpy().reshape(-1, *[1] * (a.x.ndim - 1))


def _assert_per_sample(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    errs = [rel_l2(got[i], want[i]) for i in range(len(want))]
    assert max(errs) <= tol, f"relative L2 per sample {errs}"


@pytest.mark.parametrize("name", MODELS)
def test_explained_tensor_is_the_logits_in_the_outputs_order(name, arch):
    a = arch(name)
    compiled = lrpc.compile(_proto(a), "epsilon", **LRP0)
    meta = {p.key: p.value for p in compiled.metadata_props}
    compiled.graph.output.append(onnx.helper.make_tensor_value_info(meta["lrpc.explained"], 1, None))  # (float)
    out_name = meta["lrpc.output"]
    seed = np.zeros(_run(_proto(a), {"input": a.x})[out_name].shape, np.float32)
    got = _run(compiled, {"input": a.x, "relevance_seed": seed})
    want = _run(_proto(a), {"input": a.x})[out_name]
    np.testing.assert_allclose(got[out_name], want, rtol=0, atol=1e-5 * np.abs(want).max())  # forward unchanged
    logits = a.twin(torch.from_numpy(a.x)).detach().numpy()
    explained = got[meta["lrpc.explained"]]
    assert explained.shape == want.shape == logits.shape
    np.testing.assert_allclose(explained, logits, rtol=0, atol=1e-5 * np.abs(logits).max())


@pytest.mark.parametrize("name", ["pooled_softmax-op9", "softmax_axis1_opset9", "nhwc_softmax-op11"])
def test_class_index_target_is_that_logits_explanation(name, arch):
    a = arch(name)
    session = lrpc.Session(lrpc.compile(_proto(a), "epsilon", **LRP0), providers=["CPUExecutionProvider"])
    k = 7 if name != "nhwc_softmax-op11" else 5 * 16 * 4 + 9 * 4 + 2  # flat index of pixel (5, 9), class 2
    e = session.explain(a.x, target=k)
    seed = np.zeros_like(e.output)
    seed.reshape(len(seed), -1)[:, k] = 1.0
    np.testing.assert_array_equal(e.seed, seed)
    np.testing.assert_allclose(e.relevance, session.explain(a.x, seed=seed).relevance, rtol=1e-6, atol=1e-7)
    _assert_per_sample(e.relevance, _grad_x_input_over_logit(a, np.full(len(a.x), k)))


@pytest.mark.parametrize("name", ["nhwc_softmax-op11", "nhwc_softmax", "nhwc_softmax-dynamo"])
def test_pixel_target_on_a_channels_last_output(name, arch):
    """``pixel:Y,X`` reads the predicted class off the [N, H, W, C] output at (Y, X): the seed and the explained
    tensor must share that element order (the logits are transposed like the probabilities)."""
    a = arch(name)
    session = lrpc.Session(lrpc.compile(_proto(a), "epsilon", **LRP0), providers=["CPUExecutionProvider"],
                           channels_last=True)
    e = session.explain(a.x, target="pixel:5,9")
    cls = e.output[:, 5, 9, :].argmax(axis=1)
    seed = np.zeros_like(e.output)
    seed[np.arange(len(cls)), 5, 9, cls] = 1.0
    np.testing.assert_array_equal(e.seed, seed)
    index = np.ravel_multi_index((np.full_like(cls, 5), np.full_like(cls, 9), cls), e.output.shape[1:])
    _assert_per_sample(e.relevance, _grad_x_input_over_logit(a, index))


@pytest.mark.parametrize("name", MODELS)
def test_top1_in_the_graph_is_the_top_logit(name, arch):
    """``seed="top1"`` and ``seed="switch"`` seed each sample's arg-max of the explained logits in the graph, a flat
    index into the graph output (for the dense output checked against the twin's logits in the output's order). A
    ``seed="input"`` graph has no logits to show: Session takes the arg-max of the graph output, the same class where
    the squasher keeps the order of its axis (a classifier's softmax), not across a dense softmax's positions."""
    a = arch(name)
    logits = a.twin(torch.from_numpy(a.x)).detach().numpy().reshape(len(a.x), -1)
    top = logits.argmax(axis=1)
    want = _grad_x_input_over_logit(a, top)
    sessions = {seed: lrpc.Session(lrpc.compile(_proto(a), "epsilon", seed=seed, **LRP0),
                                   providers=["CPUExecutionProvider"]) for seed in ("top1", "switch", "input")}
    for seed, session in sessions.items():
        e = session.explain(a.x)
        if seed == "input":
            top = np.asarray(e.output).reshape(len(a.x), -1).argmax(axis=1)
            want = _grad_x_input_over_logit(a, top)
        np.testing.assert_array_equal(e.target, top)
        _assert_per_sample(e.relevance, want)


@pytest.mark.parametrize("name", ["pooled_softmax-op11", "softmax_axis1_opset9"])
def test_explain_command_on_an_npy_input(name, arch, tmp_path, capsys):
    pytest.importorskip("PIL")
    a = arch(name)
    path = tmp_path / "m.onnx"
    onnx.save(_proto(a), str(path))
    np.save(tmp_path / "x.npy", a.x)
    session = lrpc.Session(lrpc.compile(_proto(a), "epsilon", **LRP0), providers=["CPUExecutionProvider"])
    for target in ("3", "top1"):
        code = cli.main(["explain", str(path), "--npy", str(tmp_path / "x.npy"), "--target", target, "--rules",
                         "epsilon", "--epsilon", "0", "--stabilizer-eps", "0", "--no-cache",
                         "-o", str(tmp_path / "h.png")])
        assert code == 0, capsys.readouterr().err
        want = session.explain(a.x, target=None if target == "top1" else int(target)).relevance
        np.testing.assert_allclose(np.load(tmp_path / "h.npy"), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())

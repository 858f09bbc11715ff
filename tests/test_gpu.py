"""CUDA execution provider: the compiled graph runs there and agrees with the CPU run (skipped without CUDA)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lrpc

ROOT = Path(__file__).resolve().parents[1]
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDAExecutionProvider here")]


@pytest.mark.parametrize("composite", ["epsilon-gamma-box", "epsilon-plus", "epsilon-alpha2-beta1"])
@pytest.mark.parametrize("maxpool", ["winner", "split"])
def test_cuda_matches_cpu(composite, maxpool):
    compiled = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", composite, maxpool=maxpool)
    data = np.load(ROOT / "models" / "digits_samples.npz")
    x, targets = data["images"], data["labels"]
    if maxpool == "winner":
        # digits have constant regions, hence tied maxima; onnxruntime's CUDA MaxPool may pick another tied
        # index than the CPU's first one (measured: 12% relevance difference on one sample). Split mode is
        # provider-independent on ties; winner mode is compared on inputs without ties.
        x = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    gpu = lrpc.Session(compiled, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    p_gpu, r_gpu = gpu.explain(x, target=targets)[:2]
    p_cpu, r_cpu = cpu.explain(x, target=targets)[:2]
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-4, atol=1e-6)
    rel = np.linalg.norm(r_gpu - r_cpu) / np.linalg.norm(r_cpu)
    assert rel < 1e-4, rel
    assert np.isfinite(r_gpu).all()


# gamma/alpha-beta masks and denominators of random-weight ResNets sit near 0 at some outputs, where float32
# summation order (cuDNN vs MLAS) flips signs: compare those loosely, the sign-stable z-plus tightly.
@pytest.mark.parametrize("composite,tol", [("epsilon-plus", 1e-4), ("epsilon-gamma-box", 5e-2)])
def test_cuda_resnet18(tmp_path, composite, tol):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    compiled = lrpc.compile(path, composite, low=-3.0, high=3.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    gpu = lrpc.Session(compiled, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider"
    r_gpu = gpu.explain(x, target=[7]).relevance
    r_cpu = cpu.explain(x, target=[7]).relevance
    assert np.linalg.norm(r_gpu - r_cpu) / np.linalg.norm(r_cpu) < tol  # TF32 off (Session default)


def test_tf32_is_opt_in():
    compiled = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon")
    session = lrpc.Session(compiled, providers=["CUDAExecutionProvider"], tf32=True)
    options = session.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["use_tf32"] == "1" and options["arena_extend_strategy"] == "kSameAsRequested"
    assert lrpc.Session(compiled, providers=["CUDAExecutionProvider"]).session.get_provider_options()[
        "CUDAExecutionProvider"]["use_tf32"] == "0"


def test_io_binding_keeps_outputs_on_the_gpu():
    """run_on_device: inputs already in GPU memory, outputs left there; equal to the CPU run. explain() takes a
    GPU OrtValue as input and returns host arrays equal to the numpy-fed run."""
    compiled = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon-gamma-box", low=0.0, high=1.0)
    x = np.random.default_rng(1).standard_normal((16, 1, 8, 8)).astype(np.float32)
    seed = np.eye(10, dtype=np.float32)[np.arange(16) % 10]
    gpu = lrpc.Session(compiled, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    assert gpu.device == "cuda" and cpu.device == "cpu"
    x_gpu = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    out = gpu.run_on_device({"input": x_gpu}, ort.OrtValue.ortvalue_from_numpy(seed, "cuda", 0))
    assert {v.device_name() for v in out.values()} == {"cuda"}
    want = cpu.run({"input": x}, seed)
    for name, value in out.items():
        np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(gpu.explain(x_gpu).relevance, gpu.explain(x).relevance)


def test_winner_maxpool_backward_stays_on_the_gpu(tmp_path):
    """The winner-mode backward of 2x2 windows: in the default compiled file the tap-by-tap comparison, in a file
    compiled for CUDA MaxPool's indices and a scatter; both run every node on the GPU, without a warning."""
    import json
    import warnings

    from lrpc.runtime import inference_session

    path = ROOT / "models" / "digits_cnn.onnx"
    default = lrpc.compile(path, "epsilon-gamma-box")
    compiled = lrpc.compile(path, "epsilon-gamma-box", for_provider="cuda")
    assert not any(n.op_type == "MaxUnpool" for m in (default, compiled) for n in m.graph.node)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrpc.Session(default, providers=["CUDAExecutionProvider"])
        lrpc.Session(compiled, providers=["CUDAExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    for model, kernels in ((compiled, {"ScatterElements"}), (default, {"SpaceToDepth", "Equal"})):
        session = inference_session(model.SerializeToString(), ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                    profile=str(tmp_path / "profile"))
        session.run(None, {"input": x, "relevance_seed": np.eye(10, dtype=np.float32)[[3, 5]]})
        events = json.load(open(session.end_profiling()))
        placed = {(e["args"]["op_name"], e["args"].get("provider")) for e in events
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
        assert {(k, "CUDAExecutionProvider") for k in kernels} <= placed
        assert not ({op for op, p in placed if p != "CUDAExecutionProvider"}
                    & {"MaxUnpool", "ScatterElements", "ConstantOfShape", "SpaceToDepth", "Equal"})

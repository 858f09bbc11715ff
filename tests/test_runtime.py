"""lrpc.Session's IO-bound runs: results equal onnxruntime's plain run, OrtValue inputs, outputs left on the
session's device (run_on_device), one-line errors for inputs onnxruntime refuses. The CUDA side is in test_gpu.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lrpc
from lrpc.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    compiled = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon-gamma-box", low=0.0, high=1.0)
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"]
    return compiled, lrpc.Session(compiled, providers=["CPUExecutionProvider"]), x


def test_bound_run_equals_plain_onnxruntime(digits):
    compiled, session, x = digits
    seed = np.zeros((len(x), 10), np.float32)
    seed[np.arange(len(x)), np.arange(len(x)) % 10] = 1.0
    plain = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, {"input": x, "relevance_seed": seed})))
    got = session.run({"input": x}, seed)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    on_device = session.run_on_device({"input": ort.OrtValue.ortvalue_from_numpy(x)}, seed, outputs=["relevance"])
    assert list(on_device) == ["relevance"] and isinstance(on_device["relevance"], ort.OrtValue)
    assert on_device["relevance"].device_name() == session.device == "cpu"
    assert not session.session.get_session_options().enable_mem_pattern  # (see runtime.inference_session)
    np.testing.assert_array_equal(on_device["relevance"].numpy(), want["relevance"])


def test_ortvalue_and_strided_inputs_explain_the_same(digits):
    _, session, x = digits
    want = session.explain(x, 3)
    got = session.explain(ort.OrtValue.ortvalue_from_numpy(x), 3)
    np.testing.assert_array_equal(got.relevance, want.relevance)
    np.testing.assert_array_equal(got.output, want.output)
    # a non-contiguous view is copied to a contiguous input that lives through the run
    flipped = np.ascontiguousarray(x[..., ::-1])
    np.testing.assert_array_equal(session.explain(x[..., ::-1], 3).relevance, session.explain(flipped, 3).relevance)
    top = session.explain(ort.OrtValue.ortvalue_from_numpy(x))  # top-1 through the switch, OrtValue input
    np.testing.assert_array_equal(top.relevance, session.explain(x).relevance)


@pytest.mark.parametrize("call,message", [
    (lambda s, x: s.explain(x.astype(np.float64), 3), "could not run the graph on these inputs: .*tensor\\(double\\)"),
    (lambda s, x: s.explain(x[:, :, :5], 3), "could not run the graph on these inputs: .*index: 2 Got: 5 Expected: 8"),
    (lambda s, x: s.explain({"image": x}, 3), "inputs \\['image'\\] given, the model takes \\['input'\\]"),
    (lambda s, x: s.run_on_device({"input": x}, np.zeros((len(x), 10), np.float32), outputs=["logits"]),
     "no output 'logits'"),
    (lambda s, x: s.run_on_device({"input": x}), "a seed is needed"),
])
def test_refused_inputs_are_one_line_input_errors(digits, call, message):
    _, session, x = digits
    with pytest.raises(InputError, match=message) as info:
        call(session, x)
    assert "\n" not in str(info.value)

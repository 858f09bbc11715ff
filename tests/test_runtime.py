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


def test_ortvalue_list_and_dlpack_inputs_explain_the_same(digits):
    _, session, x = digits
    want = session.explain(x, 3)
    got = session.explain(ort.OrtValue.ortvalue_from_numpy(x), 3)
    np.testing.assert_array_equal(got.relevance, want.relevance)
    np.testing.assert_array_equal(got.output, want.output)
    # lists are converted to the input's dtype (seed too), as onnxruntime's plain run does
    seed = np.eye(10, dtype=np.float32)[np.arange(len(x)) % 10]
    np.testing.assert_array_equal(session.run({"input": x.tolist()}, seed.tolist())["relevance"],
                                  session.run({"input": x}, seed)["relevance"])
    top = session.explain(ort.OrtValue.ortvalue_from_numpy(x))  # top-1 through the switch, OrtValue input
    np.testing.assert_array_equal(top.relevance, session.explain(x).relevance)
    torch = pytest.importorskip("torch")
    if hasattr(ort.OrtValue, "from_dlpack"):  # a framework's tensor handed over without a copy
        tensor = torch.from_numpy(x.copy())
        np.testing.assert_array_equal(session.explain(ort.OrtValue.from_dlpack(tensor), 3).relevance, want.relevance)


@pytest.mark.parametrize("call,message", [
    (lambda s, x: s.explain(x.astype(np.float64), 3),
     "input 'input': got double \\[16, 1, 8, 8\\], the model takes float \\['batch', 1, 8, 8\\]"),
    (lambda s, x: s.explain(x[:, :, :5], 3), "input 'input': got float \\[16, 1, 5, 8\\], the model takes"),
    (lambda s, x: s.explain(x[0], 3), "input 'input': got float \\[1, 8, 8\\], the model takes"),
    (lambda s, x: s.run({"input": x}, np.zeros((len(x), 5), np.float32)), "the seed: got float \\[16, 5\\]"),
    (lambda s, x: s.run_on_device({"input": ort.OrtValue.ortvalue_from_numpy(x.astype(np.float64))},
                                  np.zeros((len(x), 10), np.float32)), "input 'input': got double"),
    (lambda s, x: s.explain({"image": x}, 3), "inputs \\['image'\\] given, the model takes \\['input'\\]"),
    (lambda s, x: s.run_on_device({"input": x}, np.zeros((len(x), 10), np.float32), outputs=["logits"]),
     "no output 'logits'"),
    (lambda s, x: s.run_on_device({"input": x}), "a seed is needed"),
    (lambda s, x: s.explain(None, 3), "input 'input': got float \\[\\], the model takes"),
    (lambda s, x: s.explain(x[:0], 3), "input 'input': an empty batch"),
    (lambda s, x: s.explain([["a"]], 3), "input 'input': cannot be read as float"),
    (lambda s, x: s.run({"input": x}, np.zeros((3, 10), np.float32)), "the seed holds 3 samples, input 'input' 16"),
    (lambda s, x: s.explain_topk(x, 0), "top-k: k must be a whole number of at least 1, got 0"),
    (lambda s, x: s.explain_topk(x, -1), "top-k: k must be a whole number of at least 1, got -1"),
])
def test_refused_inputs_are_one_line_input_errors(digits, call, message):
    _, session, x = digits
    with pytest.raises(InputError, match=message) as info:
        call(session, x)
    assert "\n" not in str(info.value)


def test_float16_model_explains_like_its_float32_twin():
    """A float16 graph gets a float16 seed (not float32) and its relevance matches the float32 graph's to float16
    precision (oracle: the same weights in float32)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4))

    def model(dtype, elem):
        g = helper.make_graph([helper.make_node("MatMul", ["a", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                               helper.make_node("MatMul", ["r", "V"], ["out"])], "g",
                              [helper.make_tensor_value_info("a", elem, ["N", 6])],
                              [helper.make_tensor_value_info("out", elem, ["N", 3])],
                              [numpy_helper.from_array(w.astype(dtype), "W"),
                               numpy_helper.from_array(w.T[:, :3].astype(dtype), "V")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    a = rng.standard_normal((5, 6))
    cpu = ["CPUExecutionProvider"]
    half = lrpc.Session(lrpc.compile(model(np.float16, TensorProto.FLOAT16), "epsilon"), providers=cpu)
    full = lrpc.Session(lrpc.compile(model(np.float32, TensorProto.FLOAT), "epsilon"), providers=cpu)
    r16, r32 = half.explain(a.astype(np.float16), 1), full.explain(a.astype(np.float32), 1)
    assert r16.relevance.dtype == np.float16 and r16.seed.dtype == np.float16
    np.testing.assert_allclose(r16.relevance.astype(np.float32), r32.relevance, rtol=2e-2,
                               atol=2e-2 * abs(r32.relevance).max())


def test_bind_keeps_scalars_scalar_and_inputs_alive():
    from onnx import TensorProto, helper

    from lrpc.runtime import bind

    g = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "g",
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    value = ort.OrtValue.ortvalue_from_numpy(np.array(2.5, np.float32))
    binding = bind(session, {"s": np.float32(2.5)}, ["o"], "cpu")
    session.run_with_iobinding(binding)
    assert binding.copy_outputs_to_cpu()[0].shape == ()
    binding = bind(session, {"s": value}, ["o"], "cpu")
    del value  # the binding holds it
    session.run_with_iobinding(binding)
    assert binding.copy_outputs_to_cpu()[0] == np.float32(2.5)


def test_sessions_leave_the_model_as_given(digits):
    """Sessions built at once in several threads from one ModelProto (seed input, seed switch) read it and nothing
    else: the proto's bytes are the same afterwards, and every session explains as the first one."""
    import threading

    compiled, first, x = digits
    switched = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon-gamma-box", low=0.0, high=1.0,
                            seed="switch")
    before = [m.SerializeToString() for m in (compiled, switched)]
    made, errors = [], []

    def build(model):
        try:
            made.append(lrpc.Session(model, providers=["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=build, args=(m,)) for m in (compiled, switched) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 4
    assert [m.SerializeToString() for m in (compiled, switched)] == before
    for session in made:
        np.testing.assert_allclose(session.explain(x[:2]).relevance, first.explain(x[:2]).relevance, rtol=1e-6,
                                   atol=1e-7)


def test_top1_runs_by_seed_mode(digits, monkeypatch):
    """Top-1 (and top-k) targets: one run in a graph compiled with seed "switch" (its in-graph top-1 seed), two in a
    seed-input graph (the scores, then the explanation), and the same relevance either way; the switch file also
    runs as a seed-input graph where only the seed is fed (plain onnxruntime: its switch input defaults to off)."""
    from lrpc.runtime import Session

    compiled, plain, x = digits
    switched = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon-gamma-box", low=0.0, high=1.0,
                            seed="switch")
    assert {p.key: p.value for p in switched.metadata_props}["lrpc.seed"] == "switch"
    session = lrpc.Session(switched, providers=["CPUExecutionProvider"])
    assert session.inputs == plain.inputs and session.outputs == plain.outputs
    runs = []
    real = Session._run
    monkeypatch.setattr(Session, "_run", lambda self, *a, **k: runs.append(self) or real(self, *a, **k))
    got, want = session.explain(x), plain.explain(x)
    assert runs == [session, plain, plain]
    np.testing.assert_array_equal(got.relevance, want.relevance)
    np.testing.assert_array_equal(got.target, want.target)
    runs.clear()
    for a, b in zip(session.explain_topk(x, 3), plain.explain_topk(x, 3)):
        np.testing.assert_array_equal(a.relevance, b.relevance)
        np.testing.assert_array_equal(a.target, b.target)
    assert runs.count(session) == 3 and runs.count(plain) == 4
    seed = np.eye(10, dtype=np.float32)[np.arange(len(x)) % 10]
    raw = ort.InferenceSession(switched.SerializeToString(), providers=["CPUExecutionProvider"])
    fed = dict(zip([o.name for o in raw.get_outputs()], raw.run(None, {"input": x, "relevance_seed": seed})))
    np.testing.assert_array_equal(fed["relevance"], plain.run({"input": x}, seed)["relevance"])


def test_runtime_loads_no_compiler():
    """``import lrpc.runtime`` (and lrpc.check, lrpc.inspect, ``lrpc.Session``) reads the compiled graph's contract
    (lrpc.contract) and loads neither the compiler nor onnx-graphsurgeon; ``import lrpc`` loads nothing more."""
    import subprocess
    import sys

    compiler = ("onnx_graphsurgeon", "lrpc.emit", "lrpc.passes", "lrpc.graph", "lrpc.relevance", "lrpc.compiler")
    for code in ("import lrpc.runtime", "import lrpc.check", "import lrpc.inspect", "import lrpc; lrpc.Session",
                 "from lrpc import Session, Explanation, heatmap, InputError, Options"):
        loaded = subprocess.run([sys.executable, "-c", f"import sys; {code}; print(*sorted(sys.modules))"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert not [m for m in loaded if m.startswith(compiler)], code
    loaded = subprocess.run([sys.executable, "-c", "import sys, lrpc; print(*sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in loaded if m.startswith("lrpc")] == ["lrpc"] and "onnx" not in loaded
    assert lrpc.compile is __import__("lrpc.compiler").compiler.compile and "Session" in dir(lrpc)


def _has_malloc_trim() -> bool:
    import ctypes
    import sys

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")
    except OSError:
        return False


@pytest.mark.skipif(not _has_malloc_trim(), reason="glibc's malloc_trim")
def test_a_session_start_hands_the_memory_it_freed_back(tmp_path):
    """Constant folding at session start makes and frees intermediates (here 48 weights of 1 MiB, each folded
    through Relu, Mul, Add and Transpose, as lrpc's derived weights are); glibc would keep that memory in the
    process. Resident memory right after ``inference_session`` (a fresh process each, oracle: the same start
    with the release switched off) is lower by more than the weights' whole size (measured: ~120 vs ~330 MB)."""
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [numpy_helper.from_array(np.array(0.25, np.float32), "g")], "x"
    for i in range(48):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), w))
        nodes += [helper.make_node("Relu", [w], [f"r{i}"]), helper.make_node("Mul", [f"r{i}", "g"], [f"m{i}"]),
                  helper.make_node("Add", [w, f"m{i}"], [f"a{i}"]),
                  helper.make_node("Transpose", [f"a{i}"], [f"t{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", [x, f"t{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fold.onnx"))
    probe = ("import sys; from lrpc import runtime\n"
             "if sys.argv[2] == 'off': runtime.release_freed_memory = lambda: None\n"
             "s = runtime.inference_session(sys.argv[1], ['CPUExecutionProvider'], 1)\n"
             "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')))")

    def resident_kib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "fold.onnx"), mode], capture_output=True,
                             text=True, check=True).stdout
        return int(out.split()[-1])

    released, kept = resident_kib("on"), resident_kib("off")
    assert released < kept - 48 * 1024, (released, kept)


def test_lists_are_read_in_the_models_dtype(digits):
    """A nested list is converted to the input's dtype (float32 here), not to numpy's default float64."""
    _, session, x = digits
    np.testing.assert_array_equal(session.explain(x[:2].tolist(), 3).relevance, session.explain(x[:2], 3).relevance)


def test_a_seed_without_the_inputs_batch_dim_is_not_checked_against_it():
    """The seed's leading dim is compared with the input's only where both are the same batch dim: an explained
    output flattened over the batch ([M] from x[N, 4]) takes a seed of M values."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
                           helper.make_node("Reshape", ["h", "flat"], ["out"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["M"])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1], np.int64), "flat")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = lrpc.Session(lrpc.compile(model, "epsilon", epsilon=0.0), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    seed = np.zeros(6, np.float32)
    seed[4] = 1.0  # sample 1, output 1
    rel = session.run({"x": x}, seed)["relevance"]
    np.testing.assert_allclose(rel, np.array([[0, 0, 0, 0], x[1] * w[1] / (x[1] @ w[1])]), rtol=1e-6)  # (LRP-0)


def _dense(inputs, out_dims, reshape=None):
    """Gemm (3 -> 6 features... see the callers) built on the fly: ``inputs`` [(name, dims)], the last one feeds the
    Gemm (after an Add of the first where there are two); ``reshape``: the output reshaped to it."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    nodes, x = [], inputs[-1][0]
    if len(inputs) == 2:
        nodes.append(helper.make_node("Add", [inputs[1][0], inputs[0][0]], ["xb"]))
        x = "xb"
    nodes.append(helper.make_node("Gemm", [x, "W"], ["h" if reshape else "out"], transB=1))
    inits = [numpy_helper.from_array(w, "W")]
    if reshape:
        nodes.append(helper.make_node("Reshape", ["h", "shape"], ["out"]))
        inits.append(numpy_helper.from_array(np.array(reshape, np.int64), "shape"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_dims)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return lrpc.Session(lrpc.compile(model, "epsilon"), providers=["CPUExecutionProvider"])


def test_seed_batches_are_checked_only_against_the_same_batch_dim():
    """Same batch dim name: a seed of another batch is one InputError naming both; so with dims named apart by the
    exporter (tf2onnx's unk__1 / unk__2), which compiling names after the input's where shape inference finds them.
    An output flattened over the batch ([N*2, 3] from [N, 8]) and a first input that is not batched take their seeds
    as they are."""
    x = np.ones((2, 8), np.float32)
    same = _dense([("x", ["N", 8])], ["N", 6])
    with pytest.raises(InputError, match="the seed holds 3 samples, input 'x' 2"):
        same.run({"x": x}, np.ones((3, 6), np.float32))
    apart = _dense([("x", ["unk__1", 8])], ["unk__2", 6])  # (compiling names the output's batch after the input's)
    with pytest.raises(InputError, match="the seed holds 3 samples, input 'x' 2"):
        apart.run({"x": x}, np.ones((3, 6), np.float32))
    flat = _dense([("x", ["N", 8])], ["M", 3], reshape=[-1, 3])
    assert flat.run({"x": x}, np.ones((4, 3), np.float32))["relevance"].shape == (2, 8)
    bias_first = _dense([("b", [8]), ("x", ["N", 8])], ["N", 6])
    assert bias_first.run({"b": np.ones(8, np.float32), "x": np.ones((3, 8), np.float32)},
                          np.ones((3, 6), np.float32))["relevance_x"].shape == (3, 8)


def _mlp(path, layers: int = 8, width: int = 1024):
    """A ReLU MLP of MatMuls over [2, 3, width] inputs (a token axis, as in a transformer), saved at ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"z{i}"]), helper.make_node("Relu", [f"z{i}"], [f"a{i}"])]
        x = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 3, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_product_weights_are_held_once(tmp_path):
    """A compiled graph's backward reads each product's weight as it is (no transposed copy), so the forward and the
    backward share it; ``low_memory=True`` turns onnxruntime's prepacking off, which gives each product its own
    packed copy, and its buffer-reuse plan. Oracles: the same graph prepacked (the default) explains the same to
    float32 rounding and holds about the weights' size (32 MiB) more in memory after a run (fresh process each)."""
    import subprocess
    import sys

    import onnx

    from lrpc.runtime import inference_session

    fwd = _mlp(tmp_path / "mlp.onnx")
    compiled = lrpc.compile(onnx.load(str(fwd)), "epsilon", epsilon=1.0)  # (well conditioned: the oracle is rounding)
    onnx.save(compiled, str(tmp_path / "mlp.lrp.onnx"))

    weights = {i.name for i in compiled.graph.initializer if i.name.startswith("w")}
    assert not [n for n in compiled.graph.node if n.op_type == "Transpose" and weights & set(n.input)]

    def prepacks(session) -> bool:
        options = session.get_session_options()
        try:
            packs = options.get_session_config_entry("session.disable_prepacking") != "1"
        except RuntimeError:  # (not set: onnxruntime's default, on)
            packs = True
        assert options.enable_mem_reuse == packs
        return packs

    for model in (compiled, tmp_path / "mlp.lrp.onnx"):  # (a file's weights are then not read in the file)
        assert prepacks(lrpc.Session(model, ["CPUExecutionProvider"]).session)
        assert not prepacks(lrpc.Session(model, ["CPUExecutionProvider"], low_memory=True).session)

    x = np.random.default_rng(1).standard_normal((2, 3, 1024)).astype(np.float32)
    feeds = {"x": x, "relevance_seed": np.ones((2, 3, 1024), np.float32)}
    got = [inference_session(str(tmp_path / "mlp.lrp.onnx"), ["CPUExecutionProvider"], 1, low_memory=low).run(
        ["relevance"], feeds)[0] for low in (True, False)]
    np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-5 * np.abs(got[1]).max())

    probe = ("import sys, numpy as np; from lrpc import runtime\n"
             "s = runtime.inference_session(sys.argv[1], ['CPUExecutionProvider'], 1, low_memory=eval(sys.argv[2]))\n"
             "s.run(None, {'x': np.ones((2, 3, 1024), np.float32), 'relevance_seed': np.ones((2, 3, 1024), "
             "np.float32)})\n"
             "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')))")

    def resident_kib(low_memory: str) -> int:
        return int(subprocess.run([sys.executable, "-c", probe, str(tmp_path / "mlp.lrp.onnx"), low_memory],
                                  capture_output=True, text=True, check=True).stdout.split()[-1])

    shared, packed = resident_kib("True"), resident_kib("False")
    assert shared < packed - 24 * 1024, (shared, packed)  # (measured: 32 MiB less)

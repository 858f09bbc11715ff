"""CLI and error paths: one line on stderr, the right exit code, no traceback, input never modified."""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def lrpc(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(code, err, expected_code=2, contains=""):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lrpc: error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], err


def save_graph(graph, path) -> None:
    """Save a hand-built opset-17 graph as a model."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def tiny_model(path, op="Relu", domain="", weight_values=None, opset=17):
    """input [1,2,4,4] -> Conv(2->3, 3x3) -> op -> output."""
    rng = np.random.default_rng(0)
    w = weight_values if weight_values is not None else rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["y"], ["out"], name="act", domain=domain)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [numpy_helper.from_array(w, "w")])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_compile_writes_runnable_model(tmp_path):
    out = tmp_path / "d.lrp.onnx"
    before = digest(DIGITS)
    code, stdout, err = lrpc("compile", DIGITS, "--rules", "epsilon-plus", "-o", out)
    assert code == 0, err
    assert digest(DIGITS) == before
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it, not mkstemp's 0600
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    assert names_in == ["input", "relevance_seed"] and names_out == ["probabilities", "relevance"]
    data = np.load(ROOT / "models" / "digits_samples.npz")
    x = data["images"]
    plain = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    seed = np.eye(10, dtype=np.float32)[data["labels"]]
    probs, rel = sess.run(None, {"input": x, "relevance_seed": seed})
    np.testing.assert_allclose(probs, plain, rtol=1e-5, atol=1e-6)
    assert rel.shape == x.shape and np.isfinite(rel).all() and np.abs(rel).sum() > 0
    # batches of different targets in one run: each sample's relevance equals its own single run
    single = sess.run(None, {"input": x[3:4], "relevance_seed": seed[3:4]})[1]
    np.testing.assert_allclose(rel[3:4], single, rtol=1e-4, atol=1e-7)


def test_canonize_and_rules(tmp_path):
    code, _, err = lrpc("canonize", DIGITS, "-o", tmp_path / "c.onnx")
    assert code == 0, err
    ops = {n.op_type for n in onnx.load(str(tmp_path / "c.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "AveragePool" not in ops and "Dropout" not in ops
    code, out, _ = lrpc("rules")
    assert code == 0 and "epsilon-gamma-box" in out and "alpha-beta" in out and "norm-scale" in out


def test_missing_file(tmp_path):
    code, _, err = lrpc("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_directory_instead_of_file(tmp_path):
    code, _, err = lrpc("compile", tmp_path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    code, _, err = lrpc("compile", tmp_path / "e.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="empty file")


def test_non_onnx_bytes(tmp_path):
    (tmp_path / "j.onnx").write_bytes(os.urandom(1000))
    code, _, err = lrpc("compile", tmp_path / "j.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="j.onnx")


def test_truncated_model(tmp_path):
    data = DIGITS.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    code, _, err = lrpc("compile", tmp_path / "t.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="t.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(DIGITS.read_bytes())
    before = digest(src)
    code, _, err = lrpc("compile", src, "-o", src)
    one_line_error(code, err, contains="refusing to overwrite")
    assert digest(src) == before


def test_output_folder_missing(tmp_path):
    code, _, err = lrpc("compile", DIGITS, "-o", tmp_path / "no" / "o.onnx")
    one_line_error(code, err, contains="does not exist")


def test_unsupported_custom_op_names_node(tmp_path):
    path = tiny_model(tmp_path / "c.onnx", op="Frobnicate", domain="com.example")
    code, _, err = lrpc("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="node 'act' (com.example::Frobnicate)")


def test_unsupported_standard_op_lists_all(tmp_path):
    # Round and Hardmax have no propagator (an element-wise chain like Erf -> Cos is one activation now)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Round", ["x"], ["e"], name="round"),
             helper.make_node("Hardmax", ["e"], ["c"], name="hardmax"),
             helper.make_node("MatMul", ["c", "w"], ["out"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])], [w])
    save_graph(g, tmp_path / "u.onnx")
    code, _, err = lrpc("compile", tmp_path / "u.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="node 'round' (Round), node 'hardmax' (Hardmax)")


def test_bad_flags():
    """One line each (not argparse's usage text first), pointing to the command's --help."""
    code, _, err = lrpc("compile", DIGITS, "-o", "x.onnx", "--epsilon", "abc")
    one_line_error(code, err, contains="expected a number")
    code, _, err = lrpc("compile", DIGITS, "-o", "x.onnx", "--stabilizer", "foo")
    one_line_error(code, err, contains="invalid choice")
    code, _, err = lrpc("compile", DIGITS)
    one_line_error(code, err, contains="the following arguments are required: -o/--out (see 'lrpc compile --help')")
    code, _, err = lrpc("bogus")
    one_line_error(code, err, contains="invalid choice: 'bogus'")


def test_bad_rule_parameters(tmp_path):
    code, _, err = lrpc("compile", DIGITS, "--rules", "epsilon-alpha2-beta1", "--alpha", "3", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="alpha - beta = 1")
    code, _, err = lrpc("compile", DIGITS, "--rules", "nonsense", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="unknown composite 'nonsense'")


def test_rule_file_errors(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    code, _, err = lrpc("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="cannot parse rule file")
    bad.write_text('{"rules": [{"op": "Conv", "rule": "gamma", "params": {"gama": 1}}]}')
    code, _, err = lrpc("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="takes no parameter(s) gama")
    bad.write_text('{"rules": [{"op": "Conv", "rule": "gamma", "params": {"gamma": -0.5}}]}')
    code, _, err = lrpc("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rules[0]: gamma needs gamma >= 0 (got gamma=-0.5)")
    assert not (tmp_path / "o.onnx").exists()
    code, _, err = lrpc("compile", DIGITS, "--rules", tmp_path / "missing.toml", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rule file not found")


def test_rule_file_toml_overrides(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('composite = "epsilon-plus"\n[[rules]]\nop = "Gemm"\nrule = "pass"\n')
    code, _, err = lrpc("compile", DIGITS, "--rules", rules, "-o", tmp_path / "o.onnx")
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
    assert '"pass"' in meta["lrpc.rules"] and "zplus" in meta["lrpc.rules"]


def test_unknown_output_name(tmp_path):
    code, _, err = lrpc("compile", DIGITS, "--output", "nope", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="--output nope")


def with_external_data(folder) -> Path:
    """The digits model saved in ``folder`` with its weights in ``folder/weights.bin``."""
    onnx.save_model(onnx.load(str(DIGITS)), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return folder / "m.onnx"


def test_external_data_escaping_folder(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = with_external_data(inner)
    (inner / "weights.bin").rename(tmp_path / "weights.bin")  # the data now lies one folder up
    escaping = onnx.load(str(path), load_external_data=False)
    for t in escaping.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    path.write_bytes(escaping.SerializeToString())
    code, _, err = lrpc("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="outside the model's folder")


def test_external_data_missing(tmp_path):
    path = with_external_data(tmp_path)
    (tmp_path / "weights.bin").unlink()
    code, _, err = lrpc("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="missing")


def test_external_data_inside_folder_works(tmp_path):
    code, _, err = lrpc("compile", with_external_data(tmp_path), "-o", tmp_path / "o.onnx")
    assert code == 0, err


def test_integer_inputs_only(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["out"], to=TensorProto.FLOAT, name="cast")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    save_graph(g, tmp_path / "i.onnx")
    code, _, err = lrpc("compile", tmp_path / "i.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no float input")


def test_debug_shows_traceback(tmp_path):
    code, _, err = lrpc("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert code == 2 and "Traceback" in err


def test_python_api_session():
    import lrpc

    compiled = lrpc.compile(DIGITS, "epsilon-gamma-box", low=0.0, high=1.0)
    session = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    assert session.providers == ["CPUExecutionProvider"]
    data = np.load(ROOT / "models" / "digits_samples.npz")
    x = data["images"][:4]
    probs, rel, layers, chosen, seed = session.explain(x, target=[3, 1, 4, 1])
    assert layers == {} and chosen.tolist() == [3, 1, 4, 1] and np.array_equal(seed, np.eye(10)[[3, 1, 4, 1]])
    seed = np.eye(10, dtype=np.float32)[[3, 1, 4, 1]]
    direct = session.run({"input": x}, seed)
    np.testing.assert_array_equal(rel, direct["relevance"])
    np.testing.assert_array_equal(probs, direct["probabilities"])
    top = session.explain(x).relevance  # top-1 targets
    top_seed = np.eye(10, dtype=np.float32)[np.argmax(probs, axis=1)]
    np.testing.assert_array_equal(top, session.run({"input": x}, top_seed)["relevance"])
    with pytest.raises(lrpc.InputError, match="out of range"):
        session.explain(x, target=10)
    with pytest.raises(lrpc.InputError, match="compile it first"):
        lrpc.Session(str(DIGITS))


def _dynamic_spatial_model(path):
    """x [N,2,H,W] -> Conv 3x3 stride 2 (adjoint needs static spatial dims) -> GlobalAveragePool -> Flatten."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["out"], name="flat")]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")])
    save_graph(g, path)
    return path


def test_dynamic_spatial_dims_ask_for_input_shape(tmp_path):
    path = _dynamic_spatial_model(tmp_path / "dyn.onnx")
    code, _, err = lrpc("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="--input-shape")
    code, _, err = lrpc("compile", path, "--input-shape", "x=-1,2,9,7", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    model = onnx.load(str(tmp_path / "o.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 2, 9, 7]  # batch stays dynamic
    x = np.random.default_rng(0).standard_normal((3, 2, 9, 7)).astype(np.float32)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "relevance_seed": np.ones((3, 3), np.float32)})
    np.testing.assert_allclose(got[0], plain, rtol=1e-5, atol=1e-6)
    code, _, err = lrpc("compile", path, "--input-shape", "nope=1,2,9,7", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no input of that name")
    code, _, err = lrpc("compile", path, "--input-shape", "x=1,2", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rank 4")
    code, _, err = lrpc("compile", path, "--input-shape", "x:1,2", "-o", tmp_path / "o.onnx")
    assert code == 2 and "expected NAME=d0,d1" in err


@pytest.mark.parametrize("bad", [(np.nan, np.inf), (np.inf, -np.inf)])
def test_nan_weights_refused(tmp_path, bad):
    """(+inf and -inf: the scan's sum is NaN, which numpy warned about on a second and third stderr line)"""
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    w[0, 0, 0, 0], w[1, 0, 0, 0] = bad
    path = tiny_model(tmp_path / "nan.onnx", weight_values=w)
    code, _, err = lrpc("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="weight 'w' used by node 'conv' (Conv) holds 2 NaN/Inf value(s)")


def test_batchnorm_with_negative_variance_is_refused(tmp_path):
    """sqrt of a negative variance made NaN weights in the compiled model (written, exit code 0)."""
    rng = np.random.default_rng(0)
    stats = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in
             ((np.ones(3), "g"), (np.zeros(3), "b"), (np.zeros(3), "m"), (np.array([1.0, -2.0, 1.0]), "v"))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["out"], name="bn")]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
                               *stats])
    save_graph(graph, tmp_path / "bn.onnx")
    code, _, err = lrpc("compile", tmp_path / "bn.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err,
                   contains="node 'bn' (BatchNormalization): variance + epsilon is not positive in 1 channel(s)")
    assert not (tmp_path / "o.onnx").exists()


def test_a_cycle_is_named_in_one_line(tmp_path):
    """onnx's checker breaks this message over three lines; the node's name and op type are on the third."""
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="add1"), helper.make_node("Relu", ["a"], ["c"], name="r")]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    save_graph(graph, tmp_path / "cycle.onnx")
    code, _, err = lrpc("compile", tmp_path / "cycle.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="input 'c' of node: name: add1 OpType: Add is not output of any previous nodes")


def test_a_string_input_needs_given_inputs(tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["out"], name="id")]
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, [1])])
    save_graph(graph, tmp_path / "s.onnx")
    code, _, err = lrpc("check", tmp_path / "s.onnx")
    one_line_error(code, err,
                   contains="input 'x' is a string input: lrpc makes random numeric inputs only; pass --inputs")


def test_control_flow_on_path_is_unsupported(tmp_path):
    then_g = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 3, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 4, 4])])
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                                        helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")])
    save_graph(g, tmp_path / "if.onnx")
    code, _, err = lrpc("compile", tmp_path / "if.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="node 'branch' (If)")


def test_negative_per_channel_bounds(tmp_path):
    """`--low -2,-1` (negative per-channel list) must parse, and the bounds reach the z-box rule."""
    code, _, err = lrpc("compile", DIGITS, "--low", "-2.5", "--high", "2.5", "-o", tmp_path / "a.onnx")
    assert code == 0, err
    code, _, err = lrpc("compile", DIGITS, "--low", "-2,-1", "--high", "1,2", "-o", tmp_path / "b.onnx")
    one_line_error(code, err, contains="z-box --low has 2 per-channel values but the input of node '/body/body.0/Conv'")
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"][:2]
    seed = np.eye(10, dtype=np.float32)[[0, 1]]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed})[1]
    rules = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}["lrpc.rules"]
    assert "zbox(low=-2.5, high=2.5)" in rules
    assert not np.allclose(run(tmp_path / "a.onnx"), lrpc_default_relevance(x, seed, tmp_path))


def lrpc_default_relevance(x, seed, tmp_path):
    code, _, err = lrpc("compile", DIGITS, "-o", tmp_path / "d.onnx")
    assert code == 0, err
    return ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed})[1]


def _big_model() -> onnx.ModelProto:
    """Conv (weight big enough to be kept in place), ReLU, Conv + BatchNorm (its weight folded: replaced), ReLU,
    Gemm."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 3, 5, 5)).astype(np.float32)  # 4800 values: big enough to be kept in place
    w2 = rng.standard_normal((16, 64, 3, 3)).astype(np.float32)  # folded with the BatchNorm: replaced
    g = rng.standard_normal((10, 16 * 2 * 2)).astype(np.float32)
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("s", rng.random(16) + 0.5), ("b", rng.standard_normal(16)), ("m", rng.standard_normal(16)),
           ("v", rng.random(16) + 0.5))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(g, "g"), *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_compile_from_a_path_builds_in_place_of_the_read_model(tmp_path):
    """A model read from a file is lrpc's own: the export reuses its big weights instead of copying them
    (lrpc/graph.py export_model). The result must equal compiling the same ModelProto (which is never
    modified): same nodes, inputs, outputs, metadata and initializers (by content), and BatchNorm-folded
    weights must replace, not join, the originals."""
    import lrpc as api

    model = _big_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    rng = np.random.default_rng(1)
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    before = model.SerializeToString()
    from_path, from_proto = api.compile(path, "epsilon-plus"), api.compile(model, "epsilon-plus")
    assert model.SerializeToString() == before
    inits = lambda m: {t.name: t.SerializeToString() for t in m.graph.initializer}
    assert inits(from_path) == inits(from_proto)
    # a ModelProto handed over (lrpc explain reads the file itself, then hands it over): built in it too
    handed = onnx.load(str(path))
    from lrpc import compiler, explain
    from lrpc.loaded import LoadedModel

    assert api.compile(LoadedModel(handed, owned=True), "epsilon-plus") is handed
    assert inits(handed) == inits(from_proto) and list(handed.graph.node) == list(from_proto.graph.node)
    seen = []
    real = compiler.compile_loaded
    compiler.compile_loaded = lambda m, *a, **k: seen.append((m, m.owned, m.proto)) or real(m, *a, **k)
    try:
        explain.prepare(path, "epsilon-plus")
        explain.prepare(model, "epsilon-plus")
    finally:
        compiler.compile_loaded = real
    assert seen[0][1] and not seen[1][1] and seen[1][2] is model
    assert model.SerializeToString() == before
    assert inits(from_path)["w"] == numpy_helper.from_array(w, "w").SerializeToString()  # kept as it was
    assert "w2" not in inits(from_path)  # replaced by the BatchNorm-folded weight
    for field in ("node", "input", "output", "value_info"):
        assert list(getattr(from_path.graph, field)) == list(getattr(from_proto.graph, field)), field
    assert list(from_path.metadata_props) == list(from_proto.metadata_props)
    assert from_path.opset_import == from_proto.opset_import and from_path.ir_version == from_proto.ir_version
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    seed = np.eye(10, dtype=np.float32)[[1, 2]]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "relevance_seed": seed})
    for a, b in zip(run(from_path), run(from_proto)):
        np.testing.assert_array_equal(a, b)
    assert inits(api.canonize(path)) == inits(api.canonize(model))


def _rich_model() -> onnx.ModelProto:
    """A model using most fields of ModelProto and GraphProto (around the graph and its initializers)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    b.doc_string = "a bias"
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5], np.float32), "s"),
                                       numpy_helper.from_array(np.array([2], np.int64), "s_i"), [4])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3, 3])], [w, b],
                              doc_string="graph doc",
                              value_info=[helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1])],
                              sparse_initializer=[sparse])
    func = helper.make_function("local", "f", ["a"], ["o"], [helper.make_node("Relu", ["a"], ["o"])],
                                [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func], producer_name="p", producer_version="1", doc_string="model doc",
                              model_version=7, domain="d")
    helper.set_model_props(model, {"k": "v"})
    return model


@pytest.mark.parametrize("case", ["rich", "no initializers", "no graph", "unknown field", "digits compiled"])
def test_saved_bytes_are_serialize_to_string(case, tmp_path):
    """save_model writes the model piece by piece (its weights one at a time, not one buffer of the whole
    file): the file must hold exactly the bytes of SerializeToString."""
    import lrpc as lib
    from lrpc.loaded import LoadedModel

    if case == "digits compiled":
        model = lib.compile(DIGITS, "epsilon-gamma-box")
    else:
        model = _rich_model()
        if case == "no initializers":
            del model.graph.initializer[:]
        elif case == "no graph":
            model.ClearField("graph")
        elif case == "unknown field":  # (field 99 of ModelProto: unknown to this protobuf build, kept as is)
            model = onnx.ModelProto.FromString(model.SerializeToString() + b"\x98\x06\x05")
    pieces = LoadedModel(model).pieces()
    assert b"".join(pieces) == model.SerializeToString()
    assert len(pieces) == (1 if case in ("no graph", "unknown field") else 5 + 2 * len(model.graph.initializer))
    LoadedModel(model).save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()


def test_model_past_the_file_limit_is_refused(tmp_path, monkeypatch):
    """A model past protobuf's 2 GB limit (here: a limit lowered below the digits CNN's size) is a clear error,
    and nothing is written."""
    from lrpc import wire
    from lrpc.errors import UnsupportedError
    from lrpc.loaded import LoadedModel

    model = onnx.load(str(DIGITS))
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", model.ByteSize() - 1)
    with pytest.raises(UnsupportedError, match="an ONNX file holds at most 2 GB"):
        LoadedModel(model).save(tmp_path / "big.onnx")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", model.ByteSize())
    LoadedModel(model).save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").read_bytes() == model.SerializeToString()


def test_raw_weights_are_the_initializers_bytes(tmp_path):
    """raw_weights finds each initializer's bytes in the file as stored (every float width and an integer
    tensor, around doc strings and a sparse initializer); a tensor kept in external data is left out (its bytes
    are not in the file)."""
    from onnx.external_data_helper import convert_model_to_external_data

    from lrpc.wire import raw_weights

    model = _rich_model()
    rng = np.random.default_rng(4)
    for dtype in (np.float16, np.float64, np.int64):
        model.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(6) * 9).astype(dtype),
                                                               f"t_{dtype.__name__}"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty"))
    onnx.save(model, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    raw = raw_weights(data)
    assert [t.name for t in raw] == [i.name for i in model.graph.initializer]
    for init, t in zip(model.graph.initializer, raw):
        assert bytes(t.raw) == numpy_helper.to_array(init).tobytes() and bytes(t.whole) == init.SerializeToString()
        assert bytes(data[slice(*t.field)]).endswith(bytes(t.whole))  # the graph's field: key, length, tensor
        assert [bytes(data[a:b]).endswith(bytes(t.raw)) for a, b in t.raw_fields] == [True]
    big = numpy_helper.from_array(rng.standard_normal(4096).astype(np.float32), "big")
    model.graph.initializer.append(big)
    convert_model_to_external_data(model, location="w.bin", size_threshold=1024)
    onnx.save(model, tmp_path / "ext.onnx")
    data = (tmp_path / "ext.onnx").read_bytes()
    stored = {t.name: t.raw for t in raw_weights(data)}
    assert stored["big"] is None and {t.name: t.whole for t in raw_weights(data)}["big"] is None
    assert bytes(stored["w"]) == numpy_helper.to_array(model.graph.initializer[0]).tobytes()
    import lrpc as lib
    from lrpc.errors import InputError

    assert lib.compile(tmp_path / "ext.onnx", "epsilon") is not None
    stored = np.fromfile(tmp_path / "w.bin", np.float32)
    assert stored.size == 4096  # ("big" alone is past the threshold)
    stored[7] = np.nan  # the scan reads the external tensor from the ModelProto: its NaN is found
    stored.tofile(tmp_path / "w.bin")
    with pytest.raises(InputError, match="weight 'big' holds 1 NaN/Inf value"):
        lib.compile(tmp_path / "ext.onnx", "epsilon")


@pytest.mark.parametrize("command", ["compile", "canonize"])
def test_unchanged_weights_are_written_as_the_files_bytes(command, tmp_path):
    """The weights the result holds as read from the file are written as the file's bytes (views into them, not
    serialized again); a weight a pass changed (w2, folded with the BatchNorm) and small ones are serialized. The
    input was written by protobuf: the output holds the model's SerializeToString exactly, from the CLI too."""
    from lrpc import compiler

    path = tmp_path / "big.onnx"
    onnx.save(_big_model(), str(path))
    if command == "compile":
        loaded = compiler.compile_loaded(path, "epsilon-gamma-box")
    else:
        loaded = compiler.canonize_loaded(path)
    model, pieces = loaded.proto, loaded.pieces()
    views = [onnx.TensorProto.FromString(p) for p in pieces if isinstance(p, memoryview)]
    assert [t.name for t in views] == ["w"] and "w2" not in {t.name for t in model.graph.initializer}
    assert views[0] == next(t for t in onnx.load(str(path)).graph.initializer if t.name == "w")
    w = next(t for t in model.graph.initializer if t.name == "w")
    assert not w.HasField("raw_data")  # read without its data (deferred): never copied out of the file's bytes
    assert b"".join(pieces) == loaded.restored().SerializeToString() and w.HasField("raw_data")
    assert b"".join(loaded.pieces()) == model.SerializeToString()  # (restored: still the file's bytes)
    rules = ["--rules", "epsilon-gamma-box"] if command == "compile" else []
    code, _, err = lrpc(command, path, "-o", tmp_path / "out.onnx", *rules)
    assert code == 0, err
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()


def _odd_file(path) -> tuple[onnx.ModelProto, bytes]:
    """_big_model written to ``path`` with weight w's fields in another order than protobuf writes them, in a second
    ModelProto.graph field (protobuf merges the two): (the model, w's bytes as stored)."""
    from lrpc.wire import key_and_length as _key_and_length

    model = _big_model()
    w = model.graph.initializer[0]
    assert w.name == "w"
    reordered = (_key_and_length(9, len(w.raw_data)) + w.raw_data + bytes([2 << 3, TensorProto.FLOAT])
                 + b"".join(bytes([1 << 3, d]) for d in w.dims) + _key_and_length(8, 1) + b"w")  # (dims < 128)
    assert onnx.TensorProto.FromString(reordered) == w and reordered != w.SerializeToString()
    del model.graph.initializer[0]
    entry = _key_and_length(5, len(reordered)) + reordered
    data = model.SerializeToString() + _key_and_length(7, len(entry)) + entry
    model.graph.initializer.append(w)
    assert onnx.ModelProto.FromString(data) == model
    path.write_bytes(data)
    return model, reordered


def test_weights_are_written_as_stored_in_a_file_protobuf_did_not_write(tmp_path):
    """A file that stores weight w with its fields in another order than protobuf writes them, in a second
    ModelProto.graph field (protobuf merges the two): the same model. The output keeps w's bytes as stored, so
    its bytes differ from SerializeToString's, and it parses to the very same model, from the CLI too."""
    from lrpc import compiler

    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    loaded = compiler.compile_loaded(path, "epsilon")
    got, pieces = loaded.proto, loaded.pieces()
    assert [bytes(p) for p in pieces if isinstance(p, memoryview)] == [reordered]
    assert b"".join(pieces) != got.SerializeToString()
    assert onnx.ModelProto.FromString(b"".join(pieces)) == got
    want = compiler.compile(model, "epsilon")  # (a ModelProto's initializers come in the export's order)
    assert list(got.graph.node) == list(want.graph.node)
    assert {t.name: t for t in got.graph.initializer} == {t.name: t for t in want.graph.initializer}
    code, _, err = lrpc("compile", path, "-o", tmp_path / "out.onnx", "--rules", "epsilon")
    assert code == 0, err
    written = (tmp_path / "out.onnx").read_bytes()
    assert reordered in written and onnx.ModelProto.FromString(written) == got  # (the CLI writes verbatim)


def test_explain_hands_the_files_bytes_over(tmp_path):
    """lrpc explain reads the file and hands model and bytes over to the compile: the weight scan reads the bytes
    (no weight copied out of the proto) and a compile-cache entry keeps the unchanged weights as stored, with the
    graph of a plain compile."""
    from onnx import numpy_helper as nh

    from lrpc import explain

    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    reads = []
    real = nh.to_array
    try:
        nh.to_array = lambda t, *a, **k: reads.append(t.name) or real(t, *a, **k)
        explain.prepare(path, "epsilon", cache=True)
    finally:
        nh.to_array = real
    assert "w" not in reads, reads
    entries = list(Path(os.environ["LRPC_CACHE_DIR"]).glob("*.lrp.onnx"))
    assert len(entries) == 1 and reordered in entries[0].read_bytes()
    import lrpc as lib

    want = lib.compile(model, "epsilon")
    assert onnx.load(str(entries[0])).graph.node == want.graph.node


@pytest.mark.parametrize("seed", ["input", "top1", "switch"])
def test_sessions_get_the_weights_as_stored(seed, tmp_path, monkeypatch):
    """lrpc.Session of a compiled file, and lrpc explain of a plain one, hand onnxruntime the weights still as read as
    the file's bytes (not serialized again; for each seed mode) — a big weight
    read without its data (a file lrpc wrote: one graph field) as a reference to its place in that file, which
    onnxruntime reads itself — and the sessions compute what a session of the same model serialized by protobuf
    computes."""
    import lrpc as lib
    from lrpc import explain, runtime

    given = []
    real = runtime.inference_session
    monkeypatch.setattr(runtime, "inference_session",
                        lambda data, *a, **k: given.append((data, k.get("external_folder"))) or real(data, *a, **k))
    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).tobytes()

    def how(data, folder) -> str:
        if reordered in data:
            return "bytes"
        info = {e.key: e.value for e in next(t for t in onnx.load_from_string(data).graph.initializer
                                             if t.name == "w").external_data}
        if folder is None or not info:
            return "serialized"
        start = int(info["offset"])
        assert (Path(folder) / info["location"]).read_bytes()[start:start + int(info["length"])] == w
        return "file"
    code, _, err = lrpc("compile", path, "-o", tmp_path / "odd.lrp.onnx", "--rules", "epsilon", "--seed", seed)
    assert code == 0, err
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    compiled = tmp_path / "odd.lrp.onnx"
    from lrpc.compiler import compile_loaded

    loaded = compile_loaded(path, "epsilon", seed=seed)
    sessions = {"file": lib.Session(compiled), "explain": explain.prepare(path, "epsilon", seed=seed)[0],
                "explain compiled": explain.prepare(compiled)[0],
                "explain cached": explain.prepare(path, "epsilon", seed=seed, cache=True)[0],  # (written)
                "explain cache hit": explain.prepare(path, "epsilon", seed=seed, cache=True)[0],
                "loaded": lib.Session(loaded), "proto": lib.Session(onnx.load(str(compiled)))}
    from lrpc.runtime import _READS_EXTERNAL_FOLDER

    file = "file" if _READS_EXTERNAL_FOLDER else "bytes"  # (the hand-over: Linux, onnxruntime >= 1.21)
    assert [how(*g) for g in given] == [file, "bytes", file, "bytes", file, "bytes", "serialized"]
    assert loaded.proto is not None and loaded._stored  # (left as given: the caller's model and its file's bytes
    sessions["loaded again"] = lib.Session(loaded)  # stay usable, e.g. a second Session)
    want = sessions["proto"].explain({"x": x})  # (top-1: scores then seed, the switch, or a top1-seeded graph)
    assert np.abs(want.relevance).sum() > 0
    for name in set(sessions) - {"proto"}:
        got = sessions[name].explain({"x": x})
        np.testing.assert_array_equal(got.relevance, want.relevance, err_msg=name)


def test_a_weight_changed_in_place_is_serialized_again(tmp_path):
    """The file's bytes stand for a tensor only while it is the very object loaded, with its name, dims and
    type: one renamed, reshaped or retyped in place is serialized again (lrpc itself never writes into a loaded
    tensor), and so is a new tensor of the same name and shape put in its place."""
    from lrpc import compiler

    path = tmp_path / "big.onnx"
    onnx.save(_big_model(), str(path))
    for change in ("name", "dims", "type", "replaced", "none"):
        loaded = compiler.compile_loaded(path, "epsilon")
        model = loaded.proto
        w = next(t for t in model.graph.initializer if t.name == "w")
        assert loaded.stored_bytes(w) is not None and loaded.stored_bytes(onnx.TensorProto()) is None
        if change == "name":
            w.name = "w_renamed"
        elif change == "dims":
            w.dims[0], w.dims[1] = w.dims[1], w.dims[0]
        elif change == "type":
            w.data_type = TensorProto.INT32
        elif change == "replaced":
            at = next(i for i, t in enumerate(model.graph.initializer) if t is w)
            new = numpy_helper.from_array(-numpy_helper.to_array(loaded.restored() and w), "w")
            model.graph.initializer.insert(at, new)
            del model.graph.initializer[at + 1]
            w = model.graph.initializer[at]
            assert numpy_helper.to_array(w).tobytes() == numpy_helper.to_array(new).tobytes()
        assert not w.HasField("raw_data") or change == "replaced"  # (read without its data: deferred)
        assert (loaded.stored_bytes(w) is None) == (change != "none")
        assert w.HasField("raw_data") == (change != "none")  # a changed deferred weight gets its data back
        pieces = b"".join(loaded.pieces())
        assert pieces == loaded.restored().SerializeToString()


def test_nan_weights_refused_in_a_model_proto():
    """The NaN/Inf scan of a ModelProto handed to lrpc.compile (no file bytes: weights read from the proto)."""
    import lrpc as lib
    from lrpc.errors import InputError

    model = _rich_model()
    values = numpy_helper.to_array(model.graph.initializer[0]).copy()
    values[1, 1, 2, 2] = -np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w"))
    with pytest.raises(InputError, match="weight 'w' used by node 'conv' \\(Conv\\) holds 1 NaN/Inf value"):
        lib.compile(model, "epsilon")


@pytest.mark.parametrize("where", ["model", "tensor"])
def test_unknown_group_fields_fall_back_to_the_proto(where, tmp_path):
    """An (unknown) group field, which protobuf parses and raw_weights does not walk: the weights are read from
    the ModelProto instead, and the compile gives the same graph as from the clean file."""
    import lrpc as lib
    from lrpc.wire import raw_weights

    group = bytes([0x9B, 0x06, 0x9C, 0x06])  # field 99: start group, end group
    model = onnx.load(str(DIGITS))
    if where == "tensor":
        model.graph.initializer[0].ParseFromString(model.graph.initializer[0].SerializeToString() + group)
        data = model.SerializeToString()
    else:
        data = model.SerializeToString() + group
    (tmp_path / "g.onnx").write_bytes(data)
    assert raw_weights(data) == []
    got, want = lib.compile(tmp_path / "g.onnx", "epsilon"), lib.compile(DIGITS, "epsilon")
    assert [n.op_type for n in got.graph.node] == [n.op_type for n in want.graph.node]


def test_cli_past_the_file_limit_is_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's side of the 2 GB refusal (limit lowered in-process): one line naming the limit, exit code 2,
    no output file."""
    from lrpc import wire
    from lrpc.cli import main

    monkeypatch.setattr(wire, "MAX_FILE_BYTES", 1000)
    code = main(["compile", str(DIGITS), "-o", str(tmp_path / "o.onnx")])
    one_line_error(code, capsys.readouterr().err, contains="an ONNX file holds at most 2 GB")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["weight", "input"])
def test_bfloat16_models_are_refused_in_one_line(where, tmp_path):
    """bfloat16 (no numpy type, no rule here) is refused up front, naming the tensor and its user, exit code 2 —
    not an internal error from a pass; the input file is left as it was."""
    bf16 = TensorProto.BFLOAT16
    w = helper.make_tensor("w", bf16 if where == "weight" else TensorProto.FLOAT, [4, 3],
                           np.zeros(12, np.uint16 if where == "weight" else np.float32).tobytes(), raw=True)
    x_type = bf16 if where == "input" else TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast") if where == "input" else
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Gemm", ["xf", "w"] if where == "input" else ["x", "wf"], ["y"], transB=1, name="gemm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "bf16.onnx"
    save_graph(graph, path)
    before = digest(path)
    code, _, err = lrpc("compile", path, "-o", tmp_path / "out.onnx")
    name = "w" if where == "weight" else "x"
    one_line_error(code, err, 2, f"tensor '{name}' used by node 'cast' (Cast) is bfloat16")
    assert digest(path) == before and not (tmp_path / "out.onnx").exists()


def _digits_inputs(path) -> Path:
    np.savez(path, input=np.zeros((1, 1, 8, 8), np.float32))
    return path


@pytest.mark.parametrize("case", ["external data", "rule file", "inputs archive", "report onto rules", "symlink"])
def test_no_output_overwrites_an_input_file(tmp_path, case):
    """Every file a command reads is protected, not just the model: its external data, a rule file, an --inputs
    archive (through any link); refused in one line, exit code 2, the file unchanged."""
    model = tmp_path / "m.onnx"
    model.write_bytes(DIGITS.read_bytes())
    rules = tmp_path / "r.json"
    rules.write_text('{"composite": "epsilon"}')
    inputs = _digits_inputs(tmp_path / "x.npz")
    if case == "external data":
        (tmp_path / "ext").mkdir()
        model = with_external_data(tmp_path / "ext")
        target, argv = tmp_path / "ext" / "weights.bin", ["compile", model, "-o", tmp_path / "ext" / "weights.bin"]
    elif case == "rule file":
        target, argv = rules, ["compile", model, "--rules", rules, "-o", rules]
    elif case == "inputs archive":
        target, argv = inputs, ["check", model, "--inputs", inputs, "--json", inputs]
    elif case == "report onto rules":
        target, argv = rules, ["check", model, "--rules", rules, "--junit", rules]
    else:
        (tmp_path / "link.onnx").symlink_to(model)
        target, argv = model, ["canonize", model, "-o", tmp_path / "link.onnx"]
    before = digest(target)
    code, _, err = lrpc(*argv)
    one_line_error(code, err, contains="refusing to overwrite an input file")
    assert digest(target) == before


def test_output_through_a_symlink_replaces_its_target(tmp_path):
    """A symbolic link at the output path stays a link; the file it points to gets the output."""
    (tmp_path / "real.onnx").write_bytes(b"old")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    code, _, err = lrpc("compile", DIGITS, "-o", tmp_path / "link.onnx")
    assert code == 0, err
    assert (tmp_path / "link.onnx").is_symlink()
    onnx.checker.check_model(onnx.load(str(tmp_path / "real.onnx")))


def test_output_onto_a_fifo_is_written_in_place(tmp_path):
    """A path that is not a regular file (a FIFO here; /dev/null, /dev/stdout alike) is written into, not
    replaced by a regular file."""
    import stat
    import threading

    from lrpc.atomic_write import write_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        write_atomic(b'{"ok": 1}', fifo)
    finally:
        if reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode):
            reader.join(5)
        if reader.is_alive():  # (the pipe was replaced: let the reader's open return)
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert got == [b'{"ok": 1}']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("flags,message", [
    (["--low", "nan"], "zbox low must be finite numbers"),
    (["--rules", "epsilon-alpha2-beta1", "--alpha", "nan"], "alpha must be a finite number (got nan)"),
    (["--gamma", "inf"], "gamma must be a finite number (got inf)"),
    (["--epsilon", "inf"], "epsilon must be a finite number (got inf)"),
    (["--stabilizer-eps", "inf"], "the stabilizer's eps must be a finite number (got inf)"),
    (["--low", "2", "--high", "1"], "zbox low must not exceed high"),
    (["--input-shape", "input=1,2,8,8"], "--input-shape input: dim 1 is 1 in the model, 2 given"),
    (["--input-shape", "input=0,1,8,8"], "--input-shape input: dim 0 must be a positive size or -1"),
])
def test_rule_values_and_shapes_that_cannot_work_are_refused(tmp_path, flags, message):
    """Non-finite or contradictory parameters (they made every relevance NaN, exit code 0) and input shapes that
    contradict the model's fixed dims (the written model did not load): one line, exit code 2, nothing written."""
    code, _, err = lrpc("compile", DIGITS, *flags, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains=message)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("text,message", [
    ('{"rules": 5}', "'rules' must be a list of tables (got 5)"),
    ('{"rulez": []}', "unknown key(s) rulez"),
    ('{"composite": ["a"]}', "'composite' must be a composite's name"),
    ('{"rules": [{"rule": "epsilon", "params": 5}]}', "rules[0]: 'params' must be a table"),
    ('{"rules": [{"rule": "epsilon", "params": {"epsilon": "x"}}]}', "rules[0]: epsilon must be a finite number"),
    ('{"rules": [{"rule": "epsilon", "params": {"epsilon": true}}]}', "rules[0]: epsilon must be a finite number"),
    ('{"rules": [{"rule": "epsilon", "params": {"epsilon": -1}}]}', "rules[0]: epsilon must be at least 0"),
    ('{"rules": [{"rule": "zbox", "params": {"low": {}}}]}', "rules[0]: zbox low must be finite numbers"),
    ('{"rules": [{"rule": "epsilon", "name": 5}]}', "rules[0]: 'name' must be a string (got 5)"),
    ('{"rules": [{"rule": "epsilon", "category": "convv"}]}', "rules[0]: unknown category 'convv'"),
])
def test_rule_files_of_the_wrong_shape_are_one_line(tmp_path, text, message):
    (tmp_path / "r.json").write_text(text)
    code, _, err = lrpc("compile", DIGITS, "--rules", tmp_path / "r.json", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains=message)


def _invalid(path, case):
    """Models that parse and pass onnx's structural checker, but are wrong: each case one defect."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    def out(name="out", rank=4):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"d{i}" for i in range(rank)])

    nodes, outs, opset = [conv], [out(rank=2 if case == "flatten axis" else 4)], 17
    if case == "flatten axis":
        nodes.append(helper.make_node("Flatten", ["y"], ["out"], name="fl", axis=9))
    elif case == "transpose perm":
        nodes.append(helper.make_node("Transpose", ["y"], ["out"], name="tr", perm=[0, 0, 1, 2]))
    elif case == "conv groups":
        nodes = [helper.make_node("Conv", ["x", "w"], ["out"], name="conv", pads=[1, 1, 1, 1], group=2)]
    elif case == "no outputs":
        nodes.append(helper.make_node("Relu", ["y"], ["out"], name="act"))
        outs = []
    elif case == "opset 99":
        nodes.append(helper.make_node("Relu", ["y"], ["out"], name="act"))
        opset = 99
    elif case in ("an output named relevance_score", "an lrp/ tensor"):
        name = "relevance_score" if case == "an output named relevance_score" else "lrp/Add_7"
        nodes.append(helper.make_node("Relu", ["y"], [name], name="act"))
        nodes.append(helper.make_node("Relu", [name], ["out"], name="act2"))
        outs = [out(name if case == "an output named relevance_score" else "out")]
    elif case == "relevance_x inside":  # (one input: its relevance output is 'relevance', no clash)
        nodes.append(helper.make_node("Relu", ["y"], ["relevance_x"], name="act"))
        nodes.append(helper.make_node("Relu", ["relevance_x"], ["out"], name="act2"))
    elif case in ("a name taken", "not UTF-8"):
        nodes.append(helper.make_node("Relu", ["y"], ["relevance" if case == "a name taken" else "out"], name="act@"))
        outs = [out("relevance" if case == "a name taken" else "out")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, [w]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    data = model.SerializeToString()
    if case == "not UTF-8":
        data = data.replace(b"act@", b"act\xfc")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,message", [
    ("flatten axis", "invalid model: (op_type:Flatten, node name: fl)"),
    ("transpose perm", "invalid model: (op_type:Transpose, node name: tr)"),
    ("conv groups", "node 'conv' (Conv): weight [3, 2, 3, 3] with group=2 does not fit the input's 2 channels"),
    ("no outputs", "the model's graph has no outputs"),
    ("opset 99", "the model's opset 99 is newer than the newest this onnx package knows"),
    ("a name taken", "tensor 'relevance': the name is taken by lrpc's relevance inputs and outputs"),
    ("an output named relevance_score", "tensor 'relevance_score': the name is taken by lrpc's relevance"),
    ("an lrp/ tensor", "tensor 'lrp/Add_7': the name is taken by lrpc's relevance"),
    ("not UTF-8", "not a valid ONNX model: node 1 ('Relu') has a name that is not UTF-8 text"),
])
def test_models_that_are_wrong_are_input_errors(tmp_path, case, message):
    """Defects of the input model were internal errors (exit code 3, "please report") or went through: now one line
    saying what is wrong, exit code 2."""
    code, _, err = lrpc("compile", _invalid(tmp_path / "m.onnx", case), "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains=message)


def test_a_compiled_model_is_not_compiled_again(tmp_path):
    assert lrpc("compile", DIGITS, "-o", tmp_path / "c.onnx")[0] == 0
    code, _, err = lrpc("compile", tmp_path / "c.onnx", "-o", tmp_path / "cc.onnx")
    one_line_error(code, err, contains="the model was compiled by lrpc already: compile the original")


def test_a_class_index_out_of_range_is_one_line(tmp_path):
    code, _, err = lrpc("inspect", DIGITS, "--target", "99999999999999999999")
    one_line_error(code, err, contains="99999999999999999999 is out of range")


def test_a_tensor_named_like_another_inputs_relevance_is_fine_with_one_input(tmp_path):
    """relevance_<input> is an output name only where a model has several inputs."""
    code, _, err = lrpc("compile", _invalid(tmp_path / "m.onnx", "relevance_x inside"), "-o", tmp_path / "o.onnx")
    assert code == 0, err


@pytest.mark.parametrize("spelling", ["/dev/stdout", "/dev/../dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "log"])
def test_json_to_a_redirected_stdout_appends_in_place(tmp_path, spelling):
    """--json /dev/stdout (however spelled, or the log file itself) with stdout redirected into a file (>>): the
    report goes where stdout writes, after what was printed; the file is not replaced (a rename through
    /dev/stdout's link replaced it with the report alone)."""
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "check", str(DIGITS), "--rules", "epsilon", "--quiet",
                               "--json", str(log) if spelling == "log" else spelling],
                              stdout=out, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("old\nPASS  supported") and '"passed": true' in text


def test_inspect_never_overwrites_its_mask_file(tmp_path):
    mask = tmp_path / "mask.npy"
    np.save(mask, np.ones((16, 16), np.float32))
    before = digest(mask)
    code, _, err = lrpc("inspect", ROOT / "models" / "digits_unet.onnx", "--target", f"mask:{mask}", "--json", mask)
    one_line_error(code, err, contains="refusing to overwrite an input file (the target file)")
    assert digest(mask) == before


def test_an_integer_without_a_repr_is_named_in_the_message():
    from lrpc.rules import make_rule

    with pytest.raises(ValueError, match="epsilon must be a finite number \\(got an integer of 16610 bits\\)"):
        make_rule("epsilon", {"epsilon": 10**5000})
    with pytest.raises(ValueError, match="zbox low must be finite numbers.*got a list of huge integers"):
        make_rule("zbox", {"low": [0, 10**5000]})


def test_huge_integer_parameters_are_one_line(tmp_path):
    (tmp_path / "r.json").write_text('{"rules": [{"rule": "epsilon", "params": {"epsilon": 1' + "0" * 400 + '}}]}')
    code, _, err = lrpc("compile", DIGITS, "--rules", tmp_path / "r.json", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="epsilon must be a finite number")


def test_output_to_a_full_non_blocking_pipe_waits_for_the_reader():
    """A descriptor inherited in non-blocking mode (a pipe to a slow reader) takes the output as it drains, instead
    of failing with "Resource temporarily unavailable" once the pipe is full."""
    import threading
    import time

    from lrpc.atomic_write import write_atomic

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    data = bytes(range(256)) * 4096  # 1 MiB, 16 pipe buffers
    got = bytearray()

    def drain():
        while len(got) < len(data):
            time.sleep(0.001)
            got.extend(os.read(read_end, 65536))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        write_atomic([data], f"/dev/fd/{write_end}")
        reader.join(30)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert bytes(got) == data


def test_closed_output_pipe_ends_quietly():
    """``lrpc rules | head -1``: once the reader has gone, lrpc stops without an error message (exit 141, as a
    process ended by SIGPIPE)."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "rules"], stdout=write, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_compile_for_cuda_with_a_switch(tmp_path):
    """``--for-provider cuda --seed switch``: no MaxUnpool, a seed input and the bool switch input, the target output,
    both recorded in the metadata; fed only the seed, the file explains as the default compile does."""
    out = tmp_path / "d.cuda.lrp.onnx"
    code, _, err = lrpc("compile", DIGITS, "-o", out, "--for-provider", "cuda", "--seed", "switch")
    assert code == 0, err
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["lrpc.provider"] == "cuda" and meta["lrpc.seed"] == "switch"
    assert "MaxUnpool" not in {n.op_type for n in model.graph.node}
    assert [i.name for i in model.graph.input] == ["input", "relevance_seed", "lrpc/top1"]
    assert [o.name for o in model.graph.output][-1] == "relevance_target"
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"]
    seed = np.eye(10, dtype=np.float32)[np.arange(len(x)) % 10]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed})[1]
    np.testing.assert_array_equal(got, lrpc_default_relevance(x, seed, tmp_path))
    code, _, err = lrpc("compile", DIGITS, "-o", tmp_path / "x.onnx", "--for-provider", "gpu")
    assert code == 2 and "invalid choice" in err

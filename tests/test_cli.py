"""CLI and error paths: one line on stderr, the right exit code, no traceback, input never modified."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_helpers import DIGITS, ROOT, digest, one_line_error, run_cli, save_graph, tiny_model, with_external_data


def test_compile_writes_runnable_model(tmp_path):
    out = tmp_path / "d.lrp.onnx"
    before = digest(DIGITS)
    code, stdout, err = run_cli("compile", DIGITS, "--rules", "epsilon-plus", "-o", out)
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
    code, _, err = run_cli("canonize", DIGITS, "-o", tmp_path / "c.onnx")
    assert code == 0, err
    ops = {n.op_type for n in onnx.load(str(tmp_path / "c.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "AveragePool" not in ops and "Dropout" not in ops
    code, out, _ = run_cli("rules")
    assert code == 0 and "epsilon-gamma-box" in out and "alpha-beta" in out and "norm-scale" in out


def test_missing_file(tmp_path):
    code, _, err = run_cli("compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_directory_instead_of_file(tmp_path):
    code, _, err = run_cli("compile", tmp_path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    code, _, err = run_cli("compile", tmp_path / "e.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="empty file")


def test_non_onnx_bytes(tmp_path):
    (tmp_path / "j.onnx").write_bytes(os.urandom(1000))
    code, _, err = run_cli("compile", tmp_path / "j.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="j.onnx")


def test_truncated_model(tmp_path):
    data = DIGITS.read_bytes()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli("compile", tmp_path / "t.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="t.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_unsupported_custom_op_names_node(tmp_path):
    path = tiny_model(tmp_path / "c.onnx", op="Frobnicate", domain="com.example")
    code, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
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
    code, _, err = run_cli("compile", tmp_path / "u.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="node 'round' (Round), node 'hardmax' (Hardmax)")


def test_bad_flags():
    """One line each (not argparse's usage text first), pointing to the command's --help."""
    code, _, err = run_cli("compile", DIGITS, "-o", "x.onnx", "--epsilon", "abc")
    one_line_error(code, err, contains="expected a number")
    code, _, err = run_cli("compile", DIGITS, "-o", "x.onnx", "--stabilizer", "foo")
    one_line_error(code, err, contains="invalid choice")
    code, _, err = run_cli("compile", DIGITS)
    one_line_error(code, err, contains="the following arguments are required: -o/--out (see 'lrpc compile --help')")
    code, _, err = run_cli("bogus")
    one_line_error(code, err, contains="invalid choice: 'bogus'")


def test_bad_rule_parameters(tmp_path):
    code, _, err = run_cli("compile", DIGITS, "--rules", "epsilon-alpha2-beta1", "--alpha", "3",
                           "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="alpha - beta = 1")
    code, _, err = run_cli("compile", DIGITS, "--rules", "nonsense", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="unknown composite 'nonsense'")


def test_rule_file_errors(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    code, _, err = run_cli("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="cannot parse rule file")
    bad.write_text('{"rules": [{"op": "Conv", "rule": "gamma", "params": {"gama": 1}}]}')
    code, _, err = run_cli("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="takes no parameter(s) gama")
    bad.write_text('{"rules": [{"op": "Conv", "rule": "gamma", "params": {"gamma": -0.5}}]}')
    code, _, err = run_cli("compile", DIGITS, "--rules", bad, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rules[0]: gamma needs gamma >= 0 (got gamma=-0.5)")
    assert not (tmp_path / "o.onnx").exists()
    code, _, err = run_cli("compile", DIGITS, "--rules", tmp_path / "missing.toml", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rule file not found")


def test_rule_file_toml_overrides(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('composite = "epsilon-plus"\n[[rules]]\nop = "Gemm"\nrule = "pass"\n')
    code, _, err = run_cli("compile", DIGITS, "--rules", rules, "-o", tmp_path / "o.onnx")
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o.onnx")).metadata_props}
    assert '"pass"' in meta["lrpc.rules"] and "zplus" in meta["lrpc.rules"]


def test_unknown_output_name(tmp_path):
    code, _, err = run_cli("compile", DIGITS, "--output", "nope", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="--output nope")


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
    code, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="outside the model's folder")


def test_external_data_missing(tmp_path):
    path = with_external_data(tmp_path)
    (tmp_path / "weights.bin").unlink()
    code, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="missing")


def test_external_data_inside_folder_works(tmp_path):
    code, _, err = run_cli("compile", with_external_data(tmp_path), "-o", tmp_path / "o.onnx")
    assert code == 0, err


def test_integer_inputs_only(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["out"], to=TensorProto.FLOAT, name="cast")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    save_graph(g, tmp_path / "i.onnx")
    code, _, err = run_cli("compile", tmp_path / "i.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no float input")


def test_debug_shows_traceback(tmp_path):
    code, _, err = run_cli("--debug", "compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
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
    code, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="--input-shape")
    code, _, err = run_cli("compile", path, "--input-shape", "x=-1,2,9,7", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    model = onnx.load(str(tmp_path / "o.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 2, 9, 7]  # batch stays dynamic
    x = np.random.default_rng(0).standard_normal((3, 2, 9, 7)).astype(np.float32)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "relevance_seed": np.ones((3, 3), np.float32)})
    np.testing.assert_allclose(got[0], plain, rtol=1e-5, atol=1e-6)
    code, _, err = run_cli("compile", path, "--input-shape", "nope=1,2,9,7", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="no input of that name")
    code, _, err = run_cli("compile", path, "--input-shape", "x=1,2", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="rank 4")
    code, _, err = run_cli("compile", path, "--input-shape", "x:1,2", "-o", tmp_path / "o.onnx")
    assert code == 2 and "expected NAME=d0,d1" in err


@pytest.mark.parametrize("bad", [(np.nan, np.inf), (np.inf, -np.inf)])
def test_nan_weights_refused(tmp_path, bad):
    """(+inf and -inf: the scan's sum is NaN, which numpy warned about on a second and third stderr line)"""
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    w[0, 0, 0, 0], w[1, 0, 0, 0] = bad
    path = tiny_model(tmp_path / "nan.onnx", weight_values=w)
    code, _, err = run_cli("compile", path, "-o", tmp_path / "o.onnx")
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
    code, _, err = run_cli("compile", tmp_path / "bn.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err,
                   contains="node 'bn' (BatchNormalization): variance + epsilon is not positive in 1 channel(s)")
    assert not (tmp_path / "o.onnx").exists()


def test_a_cycle_is_named_in_one_line(tmp_path):
    """onnx's checker breaks this message over three lines; the node's name and op type are on the third."""
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="add1"), helper.make_node("Relu", ["a"], ["c"], name="r")]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    save_graph(graph, tmp_path / "cycle.onnx")
    code, _, err = run_cli("compile", tmp_path / "cycle.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="input 'c' of node: name: add1 OpType: Add is not output of any previous nodes")


def test_a_string_input_needs_given_inputs(tmp_path):
    nodes = [helper.make_node("Identity", ["x"], ["out"], name="id")]
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, [1])])
    save_graph(graph, tmp_path / "s.onnx")
    code, _, err = run_cli("check", tmp_path / "s.onnx")
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
    code, _, err = run_cli("compile", tmp_path / "if.onnx", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="node 'branch' (If)")


def test_negative_per_channel_bounds(tmp_path):
    """`--low -2,-1` (negative per-channel list) must parse, and the bounds reach the z-box rule."""
    code, _, err = run_cli("compile", DIGITS, "--low", "-2.5", "--high", "2.5", "-o", tmp_path / "a.onnx")
    assert code == 0, err
    code, _, err = run_cli("compile", DIGITS, "--low", "-2,-1", "--high", "1,2", "-o", tmp_path / "b.onnx")
    one_line_error(code, err, contains="z-box --low has 2 per-channel values but the input of node '/body/body.0/Conv'")
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"][:2]
    seed = np.eye(10, dtype=np.float32)[[0, 1]]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed})[1]
    rules = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}["lrpc.rules"]
    assert "zbox(low=-2.5, high=2.5)" in rules
    assert not np.allclose(run(tmp_path / "a.onnx"), lrpc_default_relevance(x, seed, tmp_path))


def lrpc_default_relevance(x, seed, tmp_path):
    code, _, err = run_cli("compile", DIGITS, "-o", tmp_path / "d.onnx")
    assert code == 0, err
    return ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed})[1]


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
    code, _, err = run_cli("compile", path, "-o", tmp_path / "out.onnx")
    name = "w" if where == "weight" else "x"
    one_line_error(code, err, 2, f"tensor '{name}' used by node 'cast' (Cast) is bfloat16")
    assert digest(path) == before and not (tmp_path / "out.onnx").exists()


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
    code, _, err = run_cli("compile", DIGITS, *flags, "-o", tmp_path / "o.onnx")
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
    code, _, err = run_cli("compile", DIGITS, "--rules", tmp_path / "r.json", "-o", tmp_path / "o.onnx")
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
    code, _, err = run_cli("compile", _invalid(tmp_path / "m.onnx", case), "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains=message)


def test_a_compiled_model_is_not_compiled_again(tmp_path):
    assert run_cli("compile", DIGITS, "-o", tmp_path / "c.onnx")[0] == 0
    code, _, err = run_cli("compile", tmp_path / "c.onnx", "-o", tmp_path / "cc.onnx")
    one_line_error(code, err, contains="the model was compiled by lrpc already: compile the original")


def test_a_class_index_out_of_range_is_one_line(tmp_path):
    code, _, err = run_cli("inspect", DIGITS, "--target", "99999999999999999999")
    one_line_error(code, err, contains="99999999999999999999 is out of range")


def test_a_tensor_named_like_another_inputs_relevance_is_fine_with_one_input(tmp_path):
    """relevance_<input> is an output name only where a model has several inputs."""
    code, _, err = run_cli("compile", _invalid(tmp_path / "m.onnx", "relevance_x inside"), "-o", tmp_path / "o.onnx")
    assert code == 0, err


def test_an_integer_without_a_repr_is_named_in_the_message():
    from lrpc.rules import make_rule

    with pytest.raises(ValueError, match="epsilon must be a finite number \\(got an integer of 16610 bits\\)"):
        make_rule("epsilon", {"epsilon": 10**5000})
    with pytest.raises(ValueError, match="zbox low must be finite numbers.*got a list of huge integers"):
        make_rule("zbox", {"low": [0, 10**5000]})


def test_huge_integer_parameters_are_one_line(tmp_path):
    (tmp_path / "r.json").write_text('{"rules": [{"rule": "epsilon", "params": {"epsilon": 1' + "0" * 400 + '}}]}')
    code, _, err = run_cli("compile", DIGITS, "--rules", tmp_path / "r.json", "-o", tmp_path / "o.onnx")
    one_line_error(code, err, contains="epsilon must be a finite number")


def test_compile_for_cuda_with_a_switch(tmp_path):
    """``--for-provider cuda --seed switch``: no MaxUnpool, a seed input and the bool switch input, the target output,
    both recorded in the metadata; fed only the seed, the file explains as the default compile does."""
    out = tmp_path / "d.cuda.lrp.onnx"
    code, _, err = run_cli("compile", DIGITS, "-o", out, "--for-provider", "cuda", "--seed", "switch")
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
    code, _, err = run_cli("compile", DIGITS, "-o", tmp_path / "x.onnx", "--for-provider", "gpu")
    assert code == 2 and "invalid choice" in err

"""Every unsupported node in one error: nodes a canonization pass refuses (it leaves them as they are and records
why) are listed with the nodes that have no relevance propagator, by ``lrpc.compile``, ``lrpc compile`` (one line,
exit code 2) and ``lrpc check`` (the ``supported`` check fails with the count as its figure, exit code 1)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc

ROOT = Path(__file__).resolve().parents[1]
REFUSED = ("MatMul of a constant with batch axes [{}] and a computed operand with batch axes [{}] (a broadcast "
           "between them has no LRP rule)")
# the pass refusals of the model below, then the one message: with the ops without a propagator
REFUSALS_MM = (f"node 'mm1' (MatMul): {REFUSED.format(2, repr('N'))}; "
               f"node 'mm2' (MatMul): {REFUSED.format(1, 2)}")
MESSAGE = f"{REFUSALS_MM}; no relevance propagator for node 'hardmax' (Hardmax)"


def _model(aux_only: bool = False) -> onnx.ModelProto:
    """x [N, 3, 4] -> MatMul(C1, x) -> Relu -> MatMul(C2, ·) -> Hardmax -> Flatten -> Gemm -> logits (C1, C2 constant
    first operands [2, 3, 3], broadcast over the batch: linear_normal_form refuses them), and a second head
    aux = Gemm(Flatten(x)). ``aux_only``: aux is the first output (the explained one). Runs at N = 2."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((5, 12)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 12)).astype(np.float32), "w2")
    c1, c2 = (numpy_helper.from_array(rng.standard_normal((k, 3, 3)).astype(np.float32), n) for k, n in ((2, "c1"),
                                                                                                         (1, "c2")))
    nodes = [helper.make_node("MatMul", ["c1", "x"], ["g"], name="mm1"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["c2", "r"], ["m"], name="mm2"),
             helper.make_node("Hardmax", ["m"], ["e"], name="hardmax"),
             helper.make_node("Flatten", ["e"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "w1"], ["logits"], transB=1, name="fc"),
             helper.make_node("Flatten", ["x"], ["fx"], axis=1, name="flatten_x"),
             helper.make_node("Gemm", ["fx", "w2"], ["aux"], transB=1, name="aux_fc")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                          outs[::-1] if aux_only else outs, [w1, w2, c1, c2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_compile_lists_pass_refusals_and_missing_propagators_in_one_error():
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.compile(_model(), "epsilon")
    assert str(e.value) == MESSAGE
    assert e.value.nodes == ["mm1", "mm2", "hardmax"]


def test_many_unsupported_nodes_are_counted_past_the_first_eight():
    """Twelve nodes without a propagator (Hardmax, then LpNormalization, alternating): the message names the first
    eight, then counts the rest with their op types; the error still lists all twelve (``.nodes``)."""
    ops = ["Hardmax", "LpNormalization"] * 6
    nodes = [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i, op in enumerate(ops)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("t12", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.compile(m, "epsilon")
    named = ", ".join(f"node 'n{i}' ({op})" for i, op in enumerate(ops[:8]))
    assert str(e.value) == f"no relevance propagator for {named} and 4 more (Hardmax, LpNormalization)"
    assert e.value.nodes == [f"n{i}" for i in range(12)]


def test_canonize_lists_every_refused_node():
    with pytest.raises(lrpc.UnsupportedError) as e:
        lrpc.canonize(_model())
    assert str(e.value) == REFUSALS_MM


def test_a_refused_node_off_the_explained_path_does_not_stop_the_compile():
    """Only what the explained output depends on must be explainable (the forward runs the rest as it is); canonize
    agrees with compile and leaves the refused nodes as they were."""
    m = _model(aux_only=True)
    assert sum(n.op_type == "MatMul" for n in lrpc.canonize(m).graph.node) == 2
    compiled = lrpc.compile(m, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    seed = np.eye(2, dtype=np.float32)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "relevance_seed": seed})))
    np.testing.assert_allclose(got["logits"], want[1], rtol=1e-5, atol=1e-5)
    w2 = numpy_helper.to_array(m.graph.initializer[1])
    # LRP-0 of one bias-free dense layer with seed one-hot: x_i w_ki / z_k
    z = x.reshape(2, -1) @ w2.T
    np.testing.assert_allclose(got["relevance"].reshape(2, -1), x.reshape(2, -1) * w2 / np.diag(z)[:, None],
                               rtol=1e-4, atol=1e-5)


def test_a_refused_conv_is_left_alone_by_later_folds():
    """A Conv whose weight is computed is refused; the per-channel Mul after it must not be folded into it."""
    rng = np.random.default_rng(2)
    s = numpy_helper.from_array(rng.uniform(0.5, 1.5, (3, 1, 1)).astype(np.float32), "s")
    nodes = [helper.make_node("Relu", ["w"], ["wr"], name="weight"),
             helper.make_node("Conv", ["x", "wr"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="scale")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])], [s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    for call in (lambda: lrpc.compile(m, "epsilon"), lambda: lrpc.canonize(m)):
        with pytest.raises(lrpc.UnsupportedError, match=r"^node 'conv' \(Conv\): Conv weight is not a constant$"):
            call()


def test_cli_compile_one_line_exit_2(tmp_path):
    onnx.save(_model(), str(tmp_path / "u.onnx"))
    code, _, err = _cli("compile", tmp_path / "u.onnx", "-o", tmp_path / "o.onnx")
    assert code == 2 and err.strip().splitlines() == [f"lrpc: error: {MESSAGE}"], err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_check_names_all_and_counts_them(tmp_path):
    onnx.save(_model(), str(tmp_path / "u.onnx"))
    code, out, err = _cli("check", tmp_path / "u.onnx", "--rules", "epsilon", "--json", tmp_path / "r.json")
    assert code == 1, out + err
    assert f"FAIL  supported     {MESSAGE}" in out.splitlines()
    report = json.loads((tmp_path / "r.json").read_text())
    supported = next(c for c in report["checks"] if c["name"] == "supported")
    assert (supported["passed"], supported["figure"], supported["message"]) == (False, 3, MESSAGE)
    assert report["passed"] is False


def test_check_supported_figure_is_zero_when_all_are():
    from lrpc.check import run_check

    report = run_check(str(ROOT / "models" / "digits_cnn.onnx"), "epsilon")
    supported = next(c for c in report.checks if c.name == "supported")
    assert (supported.passed, supported.figure) == (True, 0)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


R = np.random.default_rng(3)
# (node, extra graph inputs, initializers, input x shape, output y shape, the reason a pass gives)
REFUSALS = {
    "dropout_training": (helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], name="n"), [],
                         [_const("ratio", np.float32(0.5)), _const("train", np.bool_(True))], ["N", 4], ["N", 4],
                         "Dropout in training mode cannot be explained"),
    "gemm_computed_b": (helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="n"), [("w", [3, 4])], [],
                        ["N", 4], ["N", 3], "Gemm needs a constant weight as second input B"),
    "gemm_computed_c": (helper.make_node("Gemm", ["x", "W", "c"], ["y"], transB=1, name="n"), [("c", [3])],
                        [_const("W", R.standard_normal((3, 4)).astype(np.float32))], ["N", 4], ["N", 3],
                        "Gemm with a non-constant C"),
    "gemm_c_per_row": (helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, name="n"), [],
                       [_const("W", R.standard_normal((3, 4)).astype(np.float32)),
                        _const("C", R.standard_normal((2, 3)).astype(np.float32))], [2, 4], [2, 3],
                       "Gemm bias C of shape (2, 3) is not one value per output"),
    "matmul_vector_weight": (helper.make_node("MatMul", ["x", "W"], ["y"], name="n"), [],
                             [_const("W", R.standard_normal((4,)).astype(np.float32))], ["N", 4], ["N"],
                             "MatMul of a constant needs a computed operand of known rank >= 2 and a constant of rank"),
    "matmul_const_first_2d": (helper.make_node("MatMul", ["W", "x"], ["y"], name="n"), [],
                              [_const("W", R.standard_normal((3, 4)).astype(np.float32))], [4, 5], [3, 5],
                              "MatMul with a constant first operand and a 2-d computed one (it would mix the samples)"),
    "matmul_3d_weight_broadcast": (helper.make_node("MatMul", ["x", "W"], ["y"], name="n"), [],
                                   [_const("W", R.standard_normal((2, 4, 3)).astype(np.float32))], ["N", 2, 4],
                                   ["N", 2, 3], "MatMul of a constant with batch axes [2] and a computed operand with "
                                                "batch axes ['N']"),
    "conv_computed_bias": (helper.make_node("Conv", ["x", "W", "b"], ["y"], name="n"), [("b", [3])],
                           [_const("W", R.standard_normal((3, 2, 1, 1)).astype(np.float32))], ["N", 2, 4, 4],
                           ["N", 3, 4, 4], "Conv bias is not a constant"),
    "conv_same_dynamic": (helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2], name="n"),
                          [], [_const("W", R.standard_normal((3, 2, 3, 3)).astype(np.float32))], ["N", 2, "H", "W"],
                          ["N", 3, "h", "w"], "auto_pad/output_shape needs static spatial input dims"),
    "avgpool_same": (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                                      name="n"), [], [], ["N", 2, 4, 4], ["N", 2, 4, 4],
                     "AveragePool auto_pad=SAME_UPPER is not supported"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_pass_refusal_is_listed_with_its_reason(case):
    """Each guard of a pass: the node stays as it was (the forward is unchanged) and compile and canonize name it
    with the pass's reason, one line."""
    node, extra, inits, x_shape, y_shape, reason = REFUSALS[case]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in extra]
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    for call in (lambda: lrpc.compile(m, "epsilon"), lambda: lrpc.canonize(m)):
        with pytest.raises(lrpc.UnsupportedError) as e:
            call()
        assert str(e.value).startswith(f"node 'n' ({node.op_type}): {reason}"), str(e.value)
        assert "\n" not in str(e.value) and e.value.nodes == ["n"]
    from lrpc.passes import canonize as canonize_graph

    canon = canonize_graph(m)
    assert [n.op for n in canon.graph.nodes] == [node.op_type] and set(canon.refused) == {"n"}


def test_check_supported_figure_of_an_error_naming_no_node_is_one(tmp_path):
    from lrpc.check import run_check

    w = helper.make_tensor("w", TensorProto.BFLOAT16, [3, 4], [0] * 12)
    nodes = [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Gemm", ["x", "wf"], ["y"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "b.onnx"))
    report = run_check(str(tmp_path / "b.onnx"), "epsilon")
    supported = next(c for c in report.checks if c.name == "supported")
    assert (supported.passed, supported.figure) == (False, 1) and "bfloat16" in supported.message

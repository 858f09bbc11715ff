"""`lrpc check` (the CI guard) and per-layer relevance outputs."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import lrpc

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def lrpc_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_check_passes_and_writes_reports(tmp_path):
    code, out, err = lrpc_cli("check", DIGITS, "--rules", "epsilon-plus", "--json", tmp_path / "r.json",
                              "--junit", tmp_path / "r.xml")
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and [c["name"] for c in report["checks"]] == ["supported", "forward", "finite", "conservation"]
    cons = next(c for c in report["checks"] if c["name"] == "conservation")
    assert cons["figure"] < 1e-4
    assert [r["op"] for r in report["layers"]] == ["Conv", "MaxPool", "Conv", "AveragePool", "Gemm", "Gemm"]
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == "0"


def test_check_fails_on_broken_conservation_and_names_the_layer(tmp_path):
    # a huge epsilon on the dense layers absorbs relevance: conservation must fail, at a Gemm
    code, out, _ = lrpc_cli("check", DIGITS, "--rules", "epsilon-plus", "--epsilon", "100", "--junit", tmp_path / "r.xml")
    assert code == 1, out
    assert "FAIL  conservation" in out and "first break (from the output) at layer '/body/body.12/Gemm'" in out
    suite = ET.parse(tmp_path / "r.xml").getroot()
    assert suite.get("failures") == "1"
    assert suite.find("testcase[@name='conservation']/failure") is not None


def test_check_unsupported_op_fails_with_list(tmp_path):
    from onnx import TensorProto, helper

    # (Round and Hardmax: element-wise Erf/Cos chains are one activation now, see passes/activation_regions.py)
    nodes = [helper.make_node("Round", ["x"], ["e"], name="round"), helper.make_node("Hardmax", ["e"], ["y"], name="hardmax")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "u.onnx"))
    code, out, _ = lrpc_cli("check", tmp_path / "u.onnx", "--rules", "epsilon", "--json", tmp_path / "r.json")
    assert code == 1
    assert "node 'round' (Round), node 'hardmax' (Hardmax)" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_check_unusable_input_exit_2(tmp_path):
    code, _, err = lrpc_cli("check", tmp_path / "missing.onnx")
    assert code == 2 and err.startswith("lrpc: error:") and "Traceback" not in err
    (tmp_path / "bad.npz").write_bytes(b"nope")
    code, _, err = lrpc_cli("check", DIGITS, "--inputs", tmp_path / "bad.npz")
    assert code == 2 and "cannot read inputs" in err


def test_check_with_given_inputs(tmp_path):
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"][:3]
    np.savez(tmp_path / "in.npz", input=x)
    code, out, _ = lrpc_cli("check", DIGITS, "--rules", "epsilon-gamma-box", "--inputs", tmp_path / "in.npz", "--quiet")
    assert code == 0, out
    assert "layer (execution order)" not in out


def test_layerwise_sums_match_full_relevance():
    """Per-layer sums are sums of the per-layer relevance tensors; the top layer receives the seed."""
    sums = lrpc.compile(DIGITS, "epsilon-gamma-box", layerwise="sums")
    full = lrpc.compile(DIGITS, "epsilon-gamma-box", layerwise="full")
    data = np.load(ROOT / "models" / "digits_samples.npz")
    x, seed = data["images"][:4], np.eye(10, dtype=np.float32)[data["labels"][:4]] * 2.5
    run = lambda m: dict(zip([o.name for o in m.graph.output],  # noqa: E731
                             ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                             .run(None, {"input": x, "relevance_seed": seed})))
    s, f = run(sums), run(full)
    np.testing.assert_allclose(s["relevance"], f["relevance"], rtol=1e-6)
    for name in [k[len("relevance_in/"):] for k in f if k.startswith("relevance_in/")]:
        np.testing.assert_allclose(s[f"relevance_sum_in/{name}"], f[f"relevance_in/{name}"].reshape(4, -1).sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["relevance_sum_out//body/body.12/Gemm"], seed.sum(1), rtol=1e-6)
    # the first layer's input relevance is the model's relevance
    np.testing.assert_allclose(f["relevance_in//body/body.0/Conv"], f["relevance"], rtol=1e-6)
    layers = json.loads({p.key: p.value for p in sums.metadata_props}["lrpc.layers"])
    assert layers[0] == {"name": "/body/body.0/Conv", "op": "Conv", "rule": "zbox(low=0.0, high=1.0)"}


def _dense(path, dtype, elem):
    """input [N, 6] -> MatMul -> Relu -> MatMul -> [N, 3] in ``dtype``."""
    from onnx import helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((6, 8))  # (check's seeded input switches on 4 of the 8 units)
    g = helper.make_graph([helper.make_node("MatMul", ["input", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "V"], ["out"])], "g",
                          [helper.make_tensor_value_info("input", elem, ["N", 6])],
                          [helper.make_tensor_value_info("out", elem, ["N", 3])],
                          [numpy_helper.from_array(w.astype(dtype), "W"), numpy_helper.from_array(w.T[:, :3].astype(dtype), "V")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_check_float16_and_float64_models(tmp_path):
    """Inputs and seeds in the model's own float type (a float32 seed was refused by onnxruntime: exit code 3)."""
    from onnx import TensorProto

    for dtype, elem in ((np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)):
        code, out, err = lrpc_cli("check", _dense(tmp_path / f"{elem}.onnx", dtype, elem), "--rules", "epsilon",
                                  "--conservation-tol", "1e-2")
        assert code == 0, out + err
        assert "PASS  conservation" in out


def test_check_inputs_that_do_not_fit_the_model_exit_2(tmp_path):
    """A wrong array name, dtype, shape or an empty batch in --inputs: one line naming the array, exit code 2."""
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"][:2]
    cases = {"name": ({"image": x}, "arrays ['image'] given, the model takes ['input']"),
             "dtype": ({"input": x.astype(np.float64)}, "--inputs array 'input': got double [2, 1, 8, 8]"),
             "shape": ({"input": x[:, :, :4]}, "--inputs array 'input': got float [2, 1, 4, 8]"),
             "empty": ({"input": x[:0]}, "--inputs array 'input': an empty batch")}
    for case, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{case}.npz", **arrays)
        code, _, err = lrpc_cli("check", DIGITS, "--inputs", tmp_path / f"{case}.npz")
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (case, err)

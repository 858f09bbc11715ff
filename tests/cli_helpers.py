"""What the command-line tests share: the shipped digits model, running `lrpc` in a subprocess, the one-line error
contract, small models written to files."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def run_cli(*args, cwd=None):
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


def with_external_data(folder) -> Path:
    """The digits model saved in ``folder`` with its weights in ``folder/weights.bin``."""
    onnx.save_model(onnx.load(str(DIGITS)), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return folder / "m.onnx"

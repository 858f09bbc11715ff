"""`lrpc inspect`: the per-layer relevance table (the conservation debugger)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lrpc
from lrpc.composites import Options
from lrpc.inspect import inspect

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def digits_inputs(n=3):
    return {"input": np.load(ROOT / "models" / "digits_samples.npz")["images"][:n]}


def test_table_sums_are_the_layer_relevance_sums():
    feeds = digits_inputs()
    result = inspect(DIGITS, "epsilon-gamma-box", inputs=feeds, target=4)
    # oracle: the same compiled graph's per-layer tensors, summed here
    compiled = lrpc.compile(DIGITS, "epsilon-gamma-box", layerwise="full")
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = np.zeros((3, 10), np.float32)
    seed[:, 4] = 1
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, "relevance_seed": seed})))
    assert [r["op"] for r in result["layers"]] == ["Conv", "MaxPool", "Conv", "AveragePool", "Gemm", "Gemm"]
    for row in result["layers"]:
        r = outs[f"relevance_in/{row['name']}"].astype(np.float64)
        assert np.isclose(row["sum"], r.sum(), rtol=1e-5, atol=1e-7)
        assert np.isclose(row["range"], r.max() - r.min(), rtol=1e-6)
        assert np.isclose(row["ratio_to_seed"], r.sum() / 3.0, rtol=1e-5, atol=1e-7)
    assert np.isclose(result["input_sum"], outs["relevance"].sum(dtype=np.float64), rtol=1e-6)
    assert result["target"] == [4, 4, 4] and result["seed_sum"] == 3.0


def test_conserving_setup_has_no_break_and_no_warning():
    # flat first layer (the digits background is exactly 0), zero biases, tiny stabilizers: conserves
    opts = Options(zero_bias=True, epsilon=1e-9, stabilizer_eps=1e-9)
    result = inspect(DIGITS, "epsilon-plus-flat", opts, inputs=digits_inputs())
    assert result["warning"] is None and result["first_break"] is None
    assert all(abs(r["in_over_out"] - 1) < 1e-4 for r in result["layers"])
    assert abs(result["input_sum"] - result["seed_sum"]) < 1e-4 * result["seed_sum"]


def test_loss_to_biases_alone_is_reported_not_warned():
    """Same setup as above but with biases in the denominators: the input sum misses the seed, and the layers' books
    say the biases took it (by design): no warning, the amounts reported, seed = input + what was absorbed."""
    opts = Options(epsilon=1e-9, stabilizer_eps=1e-9)
    result = inspect(DIGITS, "epsilon-plus-flat", opts, inputs=digits_inputs())
    a = result["absorbed"]
    assert abs(result["input_sum"] - result["seed_sum"]) > 1e-2 * result["seed_sum"]  # biases do absorb here
    assert result["warning"] is None
    assert abs(a["stabilizer"]) < 1e-6 and a["unaccounted"] < 1e-6 and a["bias"] > 1e-2 * result["seed_sum"]
    assert np.isclose(result["seed_sum"] - result["input_sum"], a["bias"] + a["zero"] + a["stabilizer"], rtol=1e-5)


def test_cli_warns_and_names_the_first_break(tmp_path):
    np.savez(tmp_path / "in.npz", **digits_inputs())
    code, out, err = cli("inspect", DIGITS, "--rules", "epsilon-plus", "--epsilon", "100", "--inputs",
                         tmp_path / "in.npz", "--json", tmp_path / "t.json")
    assert code == 0, err
    assert "<- first break" in out and out.count("\n") >= 7
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpc: warning:") and "'/body/body.12/Gemm'" in lines[0]
    assert "stabilizers absorb 99" in lines[0] and "by design" in lines[0]  # (epsilon 100 at the logits)
    assert "absorbed: by biases" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["first_break"] == "/body/body.12/Gemm" and data["layers"][-1]["breaks"]


def test_cli_image_input(tmp_path):
    from PIL import Image

    x = digits_inputs(1)["input"]
    Image.fromarray((x[0, 0] * 255).round().astype(np.uint8)).save(tmp_path / "d.png")
    code, out, err = cli("inspect", DIGITS, "--image", tmp_path / "d.png", "--target", "0",
                         "--json", tmp_path / "t.json")
    assert code == 0, err
    assert json.loads((tmp_path / "t.json").read_text())["target"] == [0]
    code, _, err = cli("inspect", DIGITS, "--image", tmp_path / "missing.png")
    assert code == 2 and err.startswith("lrpc: error:") and "Traceback" not in err


def test_resnet50_gamma_box_relevance_stays_bounded(zoo_onnx):
    """The ResNet-50 instability users report for epsilon-gamma-box: with the generalized gamma and lrpc's
    stabilizers, every layer's relevance sum stays within a small factor of the seed (measured: 0.27 .. 1.73
    of the seed, random weights, 112x112), and nothing explodes or turns non-finite. The residual branches
    carry their share (~0.5) and the sums return to ~1 after each Sum; the input sum is 1.66."""
    pytest.importorskip("torch")
    from models import zoo

    x = zoo.example_input("resnet50").numpy()
    result = inspect(zoo_onnx("resnet50", "legacy"), "epsilon-gamma-box", Options(low=-3.0, high=3.0),
                     inputs={"input": x})
    ratios = np.array([row["ratio_to_seed"] for row in result["layers"]])
    assert len(ratios) >= 60 and np.isfinite(ratios).all()
    assert 0.1 < ratios.min() and ratios.max() < 3.0, (ratios.min(), ratios.max())
    assert max(row["range"] for row in result["layers"]) < 1.0
    assert 0.1 < result["input_sum"] / result["seed_sum"] < 3.0


def test_dense_target_on_the_shipped_unet(tmp_path):
    """Segmentation: the table for every pixel predicted as stroke; the seed sum is that pixel count
    (oracle: onnxruntime's forward of the original model)."""
    unet = ROOT / "models" / "digits_unet.onnx"
    x = np.load(ROOT / "models" / "digits_seg_samples.npz")["images"][:2]
    np.savez(tmp_path / "in.npz", input=x)
    code, out, err = cli("inspect", unet, "--rules", "epsilon-plus", "--target", "class:1", "--inputs",
                         tmp_path / "in.npz", "--json", tmp_path / "t.json")
    assert code == 0, err
    data = json.loads((tmp_path / "t.json").read_text())
    probs = ort.InferenceSession(str(unet), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert data["target"] == "class:1" and data["seed_sum"] == float((probs > 0.5).sum())
    assert [r["op"] for r in data["layers"]][:2] == ["Conv", "MaxPool"] and "Resize" in out
    # biases absorb ~8% (with units that only their bias switches on: z+ on the zero background), by design: the
    # books close, no warning
    a = data["absorbed"]
    assert 0.02 < a["bias"] / data["seed_sum"] < 0.2 and data["warning"] is None and not err
    assert np.isclose(data["seed_sum"] - data["input_sum"], a["bias"] + a["zero"] + a["stabilizer"], rtol=1e-4)


def test_json_report_paths_are_checked(tmp_path):
    code, _, err = cli("inspect", DIGITS, "--json", tmp_path / "missing" / "t.json")
    assert code == 2 and err.strip().count("\n") == 0 and "output folder does not exist" in err, err
    model = tmp_path / "m.onnx"
    model.write_bytes(DIGITS.read_bytes())
    for command in ("inspect", "check"):
        code, _, err = cli(command, model, "--json", model)
        assert code == 2 and "refusing to overwrite an input file (the model)" in err, err
        assert model.read_bytes() == DIGITS.read_bytes()


def test_image_input_from_python_and_check_equal_the_preprocessed_tensor(tmp_path):
    """inspect and check take an image from Python and the command line as explain preprocesses it: the same numbers
    as feeding the preprocessed tensor ((pixel/255 − mean)/std) as inputs."""
    from PIL import Image

    from lrpc.check import run_check

    pixels = (digits_inputs(1)["input"][0, 0] * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "d.png")
    tensor = {"input": ((pixels / 255.0 - 0.5) / 0.25)[None, None].astype(np.float32)}
    by_image = inspect(DIGITS, image=tmp_path / "d.png", mean="0.5", std=[0.25], target=3)
    by_tensor = inspect(DIGITS, inputs=tensor, target=3)
    assert by_image["layers"] == by_tensor["layers"] and by_image["input_sum"] == by_tensor["input_sum"]
    figures = lambda r: [(c.name, c.passed, c.figure) for c in r.checks]
    assert figures(run_check(DIGITS, image=tmp_path / "d.png", mean=0.5, std=0.25)) == \
        figures(run_check(DIGITS, inputs=tensor))
    np.savez(tmp_path / "x.npz", **tensor)
    on_image = cli("check", DIGITS, "--image", tmp_path / "d.png", "--mean", "0.5", "--std", "0.25", "--json",
                   tmp_path / "a.json")
    on_tensor = cli("check", DIGITS, "--inputs", tmp_path / "x.npz", "--json", tmp_path / "b.json")
    assert on_image[0] == on_tensor[0] == 0, on_image[2] + on_tensor[2]
    checks = lambda p: [{k: c[k] for k in ("name", "passed", "figure")} for c in json.loads(p.read_text())["checks"]]
    assert checks(tmp_path / "a.json") == checks(tmp_path / "b.json")


def test_image_preprocessing_errors_are_one_line(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d.png")
    np.savez(tmp_path / "x.npz", **digits_inputs(1))
    for args, says in ((["--preset", "imagenet"], "needs --image"),
                       (["--image", tmp_path / "d.png", "--preset", "imagenet"], "3 values given"),
                       (["--image", tmp_path / "d.png", "--inputs", tmp_path / "x.npz"], "not allowed with"),
                       (["--image", tmp_path / "d.png", "--mean", "0.5"], "go together")):
        for command in ("inspect", "check"):
            code, _, err = cli(command, DIGITS, *args)
            assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (command, args, err)

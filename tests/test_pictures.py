"""The shipped transformer models behind the docs' pictures, and the pictures as faithfulness checks.

models/digits_vit.onnx (a small ViT on upscaled digits) and models/marker_text.onnx (a token classifier whose class
is decided by marker tokens hidden among distractors) are trained by models/digits_vit.py and models/marker_text.py
and explained by docs/make_digits_vit_figure.py and docs/make_marker_text_figure.py. Checked here without torch:
the ViT compiles under attnlrp and cp-lrp, its outputs equal the original's, its relevance is finite, and each of
its layers conserves what its rule conserves; the text model's marker tokens get more relevance than every other
token on every shipped sample (the answer is known, so this is the faithfulness check of the picture). With torch:
the build scripts reproduce the shipped files byte for byte."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
from conftest import rel_l2, report_line
from lrpc.check import run_check

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
VIT, TEXT = MODELS / "digits_vit.onnx", MODELS / "marker_text.onnx"
COMPOSITES = ["attnlrp", "cp-lrp"]
VIT_COMPOSITES = [*COMPOSITES, "cp-lrp-vit"]
# versions the shipped files were made with (the build scripts are deterministic for fixed library versions)
BUILT_WITH = {"torch": "2.14.1", "sklearn": "1.9.1", "onnx": "1.23.2"}


def _vit_samples():
    d = np.load(MODELS / "digits_vit_samples.npz")
    return d["images"], d["labels"]


def _original(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_shipped_models_are_small_and_check():
    for path in (VIT, TEXT):
        assert path.stat().st_size < 1_000_000
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    images, labels = _vit_samples()
    assert images.shape == (16, 1, 32, 32) and images.dtype == np.float32
    assert (_original(VIT, {"input": images}).argmax(1) == labels).sum() >= 15
    text = np.load(MODELS / "marker_text_samples.npz")
    assert (_original(TEXT, {"input_ids": text["input_ids"]}).argmax(1) == text["labels"]).all()


@pytest.mark.parametrize("composite", VIT_COMPOSITES)
def test_digits_vit_compiles_and_explains(composite):
    """Compiled as shipped (a dynamic batch): the logits equal the original's, the relevance per pixel is finite and
    not all zero, the top-1 is the original's arg-max."""
    images, _ = _vit_samples()
    compiled = lrpc.compile(VIT, composite)
    e = lrpc.Session(compiled).explain(images)
    want = _original(VIT, {"input": images})
    assert rel_l2(e.output, want) < 1e-4
    assert e.relevance.shape == images.shape and np.isfinite(e.relevance).all()
    assert (np.abs(e.relevance).reshape(len(images), -1).max(1) > 0).all()
    assert (e.target == want.argmax(1)).all()


def _layer_sums(path: Path, composite: str, feeds: dict, shapes=None):
    compiled = lrpc.compile(path, composite, layerwise="sums", input_shapes=shapes)
    layers = json.loads({p.key: p.value for p in compiled.metadata_props}["lrpc.layers"])
    session = lrpc.Session(compiled)
    return layers, session.run(feeds, session.seed_for(feeds, None))  # every output by name, top-1 seeds


@pytest.mark.parametrize("composite", VIT_COMPOSITES)
def test_digits_vit_layers_conserve_where_the_rule_does(composite):
    """Per layer and sample (--layerwise sums): what a layer sends down plus its biases' share (and relevance at zero
    denominators) is what arrives, up to the stabilizer (1e-3 relative), for every layer except attnlrp's Softmax
    (its Taylor rule does not conserve, by design). Under cp-lrp the probabilities are constants: no Softmax layer."""
    images, _ = _vit_samples()
    layers, sums = _layer_sums(VIT, composite, {"input": images[:4]})
    softmax = [L["name"] for L in layers if L["op"] == "Softmax"]
    assert len(softmax) == (2 if composite == "attnlrp" else 0)  # (CP: the probabilities are constants)
    worst = 0.0
    for L in layers:
        name = L["name"]
        arrived, sent = sums[f"relevance_sum_out/{name}"], sums[f"relevance_sum_in/{name}"]
        absorbed = sum(sums.get(f"relevance_sum_{k}/{name}", 0.0) for k in ("bias", "zero"))
        err = float(np.max(np.abs(sent + absorbed - arrived) / np.maximum(np.abs(arrived), 1e-3)))
        if name in softmax:
            continue
        worst = max(worst, err)
        assert err < 1e-3, (name, err)
    report_line(f"digits ViT {composite}: worst per-layer conservation error {worst:.1e} (Softmax layers excepted)")


@pytest.mark.parametrize("composite", VIT_COMPOSITES)
def test_digits_vit_conserves_by_its_books(composite):
    """The whole ViT under `lrpc check` (accounted conservation, 1e-3): Σ pixel relevance = the seed less the shares
    of the biases, the positions, the class token (a constant: a bias of the Concat that prepends it) and, under
    attnlrp, the remainder of each softmax's Taylor expansion, and the stabilizers'."""
    images, _ = _vit_samples()
    report = run_check(str(VIT), composite, inputs={"input": images[:4]})
    assert report.passed, report.text()


def _token_relevance(composite: str):
    d = np.load(MODELS / "marker_text_samples.npz")
    compiled = lrpc.compile(TEXT, composite)
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance_tokens"]
    e = lrpc.Session(compiled).explain({"input_ids": d["input_ids"]})
    return d, e


@pytest.mark.parametrize("composite", COMPOSITES)
def test_marker_tokens_get_the_most_relevance(composite):
    """The faithfulness check of docs/marker_text_relevance.png: on every shipped sample the model predicts the
    marker's class, and each marker token's relevance for that class exceeds that of every other token ([CLS] and
    the distractors)."""
    d, e = _token_relevance(composite)
    r, markers = e.relevance, d["markers"]
    assert r.shape == d["input_ids"].shape and np.isfinite(r).all()
    assert (e.target == d["labels"]).all()
    margins = [r[i][markers[i]].min() - r[i][~markers[i]].max() for i in range(len(r))]
    report_line(f"marker text {composite}: smallest margin marker - other token {min(margins):.3f}")
    assert min(margins) > 0, margins


def test_marker_text_cp_lrp_conserves():
    """CP-LRP conserves on the text model: Σ token relevance = the seed less the biases' and stabilizers' shares
    (`lrpc check`'s accounted conservation, 1e-3)."""
    d = np.load(MODELS / "marker_text_samples.npz")
    report = run_check(str(TEXT), "cp-lrp", inputs={"input_ids": d["input_ids"]})
    assert report.passed, report.text()


def _run_script(path: Path, out: Path):
    """Import a docs/ figure script by path and run its main() writing to ``out``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out)


@pytest.mark.parametrize("script", ["make_digits_vit_figure.py", "make_marker_text_figure.py"])
def test_figure_scripts_run(tmp_path, script):
    image = pytest.importorskip("PIL.Image")
    out = tmp_path / "figure.png"
    _run_script(ROOT / "docs" / script, out)
    with image.open(out) as im:
        assert im.width > 300 and im.height > 300


@pytest.mark.slow
@pytest.mark.parametrize("script, files", [
    ("marker_text.py", ["marker_text.onnx", "marker_text_samples.npz"]),
    ("digits_vit.py", ["digits_vit.onnx", "digits_vit_samples.npz"]),
])
def test_build_scripts_reproduce_the_shipped_files(tmp_path, script, files):
    """The build scripts are seeded and single-threaded: rerun into another folder, they write the shipped files
    byte for byte (with the library versions those were made with; otherwise only that they run)."""
    torch = pytest.importorskip("torch")
    sklearn = pytest.importorskip("sklearn") if script == "digits_vit.py" else None  # the digits data set
    subprocess.run([sys.executable, str(MODELS / script), str(tmp_path)], check=True, capture_output=True)
    versions = {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__}
    versions["sklearn"] = sklearn.__version__ if sklearn else BUILT_WITH["sklearn"]
    for name in files:
        assert (tmp_path / name).exists()
        if versions == BUILT_WITH:
            assert (tmp_path / name).read_bytes() == (MODELS / name).read_bytes(), name


def test_cp_lrp_vit_is_cp_lrp_with_gamma_per_layer_type(tmp_path):
    """The composite's per-category parameters are data: cp-lrp-vit equals cp-lrp with a rule file giving the patch
    convolution gamma(100) and the linear layers gamma(0.05); the shared --gamma does not reach them."""
    rules = {"composite": "cp-lrp", "rules": [{"category": "conv", "rule": "gamma", "params": {"gamma": 100.0}},
                                              {"category": "dense", "rule": "gamma", "params": {"gamma": 0.05}}]}
    (tmp_path / "vit.json").write_text(json.dumps(rules))
    images, _ = _vit_samples()
    got = [lrpc.Session(lrpc.compile(VIT, spec, **kw)).explain(images[:4]).relevance
           for spec, kw in (("cp-lrp-vit", {}), (str(tmp_path / "vit.json"), {}), ("cp-lrp-vit", {"gamma": 7.0}))]
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])
    assert rel_l2(got[0], lrpc.Session(lrpc.compile(VIT, "cp-lrp")).explain(images[:4]).relevance) > 0.1

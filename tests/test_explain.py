"""Heatmaps (colormaps, symmetric scaling) and `lrpc explain` against Session(compile(...)).explain."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

PIL = pytest.importorskip("PIL")
from PIL import Image

import lrpc
from lrpc import cli
from lrpc.errors import InputError
from lrpc.imaging import colorize, grid, heatmap, overlay

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
SAMPLES = np.load(ROOT / "models" / "digits_samples.npz")

CYAN, BLUE, BLACK, RED, YELLOW, WHITE = ((0, 255, 255), (0, 0, 255), (0, 0, 0), (255, 0, 0), (255, 255, 0),
                                         (255, 255, 255))


# ---------------------------------------------------------------- heatmap ------------------------------------------

@pytest.mark.parametrize("cmap, neg, mid, pos", [
    ("coldnhot", CYAN, BLACK, WHITE),
    ("bwr", BLUE, WHITE, RED),
    ("seismic", (0, 0, 0xD0), (0xD0, 0xD0, 0xD0), (0xD0, 0, 0)),
    ("gray", BLACK, (128, 128, 128), WHITE),
])
def test_colormap_ends_and_middle(cmap, neg, mid, pos):
    rgb = colorize(np.array([[-3.0, 0.0, 3.0]]), cmap)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert tuple(rgb[0, 0]) == neg and tuple(rgb[0, 2]) == pos
    assert np.abs(rgb[0, 1].astype(int) - mid).max() <= 1  # gray's middle is 127.5


def test_coldnhot_hot_and_cold_sides():
    # t = (R / max|R| + 1) / 2: -0.5 -> t 0.25 (blue), 1/3 -> t 2/3 (red), 2/3 -> t 5/6 (yellow)
    rgb = colorize(np.array([[-0.5, 1 / 3, 2 / 3, 1.0]]), "coldnhot")
    assert [tuple(c) for c in rgb[0, :3]] == [BLUE, RED, YELLOW]


def test_symmetric_scaling_uses_max_abs():
    r = np.array([[-1.0, 0.0, 4.0]])
    rgb = colorize(r, "bwr")
    # -1 of max|R| 4 -> t = 0.375: 3/4 of the way from blue to white
    assert tuple(rgb[0, 0]) == (191, 191, 255)
    assert tuple(rgb[0, 1]) == WHITE and tuple(rgb[0, 2]) == RED
    # unaligned: min -> negative end, max -> positive end
    rgb = colorize(r, "bwr", symmetric=False)
    assert tuple(rgb[0, 0]) == BLUE and tuple(rgb[0, 2]) == RED
    # scale invariance
    assert np.array_equal(colorize(r * 1e-7, "coldnhot"), colorize(r, "coldnhot"))


def test_level_saturates_and_degenerate_maps():
    rgb = colorize(np.array([[-0.5, 0.5, 1.0]]), "bwr", level=2.0)
    assert tuple(rgb[0, 0]) == BLUE and tuple(rgb[0, 1]) == RED
    assert np.all(colorize(np.zeros((2, 2)), "coldnhot") == 0)            # all zero -> black (middle)
    assert np.all(colorize(np.full((2, 2), np.nan), "bwr") == 255)        # NaN counts as 0 -> white


def test_heatmap_shapes_and_channel_sum():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((3, 5, 7))
    img = heatmap(r)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), np.asarray(heatmap(r.sum(0))))
    assert np.array_equal(np.asarray(heatmap(r[None])), np.asarray(img))
    with pytest.raises(InputError, match="batch"):
        heatmap(np.zeros((2, 3, 5, 7)))
    with pytest.raises(InputError, match="colormap"):
        heatmap(r, cmap="jet")
    top = lrpc.heatmap(r, cmap="bwr")  # the package-level function (issue 5's lrpc.heatmap(relevance, cmap=...))
    assert isinstance(top, Image.Image) and np.array_equal(np.asarray(top), colorize(r.sum(0), "bwr"))


def test_matches_zennit_palettes():
    zimage = pytest.importorskip("zennit.image")
    x = np.linspace(-1.0, 1.0, 256)[None]  # zennit's palette samples
    for cmap in ("coldnhot", "bwr", "seismic", "gray"):
        ours = colorize(x, cmap)[0].astype(int)
        assert np.abs(ours - zimage.palette(cmap).astype(int)).max() <= 3, cmap


def test_overlay_and_grid():
    base = Image.new("RGB", (8, 8), (10, 20, 30))
    heat = heatmap(np.ones((4, 4)))  # all +max -> white, upscaled to 8x8
    assert np.all(np.asarray(overlay(base, heat, 0.0)) == (10, 20, 30))
    assert np.all(np.asarray(overlay(base, heat, 1.0)) == 255)
    half = np.asarray(overlay(np.zeros((8, 8)), heat, 0.5)).astype(int)
    assert np.abs(half - 128).max() <= 1
    g = grid([heat, heat, heat], cols=2, pad=1)
    assert g.size == (4 * 2 + 1, 4 * 2 + 1)
    assert np.all(np.asarray(g)[5:, 5:] == 255)  # the empty cell is fill


def test_pillow_is_an_optional_extra():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("pillow") for d in meta["dependencies"])
    assert "pillow" in meta["optional-dependencies"]["image"]
    assert "pillow" in meta["optional-dependencies"]["test"]
    code = "import sys, lrpc, lrpc.imaging, lrpc.explain, lrpc.cli; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_pillow_is_one_clear_error(monkeypatch, tmp_path, capsys):
    png = _digit_png(tmp_path, 0)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(InputError, match=r"lrpc\[image\]"):
        heatmap(np.ones((2, 2)))
    code = cli.main(["explain", str(DIGITS), "--image", str(png), "-o", str(tmp_path / "h.png")])
    _one_line(code, capsys, "lrpc[image]")


# ---------------------------------------------------------------- lrpc explain -------------------------------------

def _digit_png(folder: Path, i: int, name: str | None = None) -> Path:
    path = folder / (name or f"digit{i}.png")
    Image.fromarray(np.rint(SAMPLES["images"][i, 0] * 255).astype(np.uint8)).save(path)
    return path


def _read_png(path) -> np.ndarray:
    """The oracle's preprocessing: 8-bit grayscale -> [0, 1] -> [1, 1, H, W]."""
    return (np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)[None, None]


_SESSIONS: dict = {}


def _oracle(x, target=None, **options):
    key = tuple(sorted((k, str(v)) for k, v in options.items()))
    if key not in _SESSIONS:
        _SESSIONS[key] = lrpc.Session(lrpc.compile(str(DIGITS), "epsilon-gamma-box", **options),
                                      providers=["CPUExecutionProvider"])
    return _SESSIONS[key].explain(x, target=target)[:2]


def _one_line(code, capsys, contains=""):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrpc: error: ") and contains in lines[0], err


@pytest.mark.parametrize("target", [None, 3])
def test_explain_png_matches_session(tmp_path, capsys, target):
    png = _digit_png(tmp_path, 0)
    out = tmp_path / "heat.png"
    argv = ["explain", str(DIGITS), "--image", str(png), "-o", str(out)]
    code = cli.main(argv + ([] if target is None else ["--target", str(target)]))
    assert code == 0, capsys.readouterr().err
    relevance = np.load(tmp_path / "heat.npy")
    x = _read_png(png)
    scores, expected = _oracle(x, target, low=0.0, high=1.0)
    assert relevance.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-5)
    pic = Image.open(out)
    assert pic.size == (8, 8) and pic.mode == "RGB"
    assert np.array_equal(np.asarray(pic), colorize(expected[0], "coldnhot"))
    # the most relevant pixel is the colormap's end: white (positive) or cyan (negative)
    r = expected[0, 0]
    k = np.unravel_index(np.abs(r).argmax(), r.shape)
    assert tuple(np.asarray(pic)[k]) == (WHITE if r[k] > 0 else CYAN)
    shown = int(np.argmax(scores)) if target is None else target
    assert f"target {'top1 ' if target is None else ''}{shown} " in capsys.readouterr().out


def test_explain_normalization_sets_zbox_bounds(tmp_path, capsys):
    png = _digit_png(tmp_path, 1)
    out = tmp_path / "heat.png"
    code = cli.main(["explain", str(DIGITS), "--image", str(png), "--mean", "0.5", "--std", "0.25",
                     "--size", "8,8", "--cmap", "bwr", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    x = (_read_png(png) - 0.5) / 0.25
    _, expected = _oracle(x, None, low=-2.0, high=2.0)  # (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    np.testing.assert_allclose(np.load(tmp_path / "heat.npy"), expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(Image.open(out)), colorize(expected[0], "bwr"))


def test_explain_center_crops_to_model_size(tmp_path, capsys):
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 4:12] = np.rint(SAMPLES["images"][2, 0] * 255).astype(np.uint8)
    wide[:, :4] = 255  # cropped away
    wide[:, 12:] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide[:, 4:12]).save(tmp_path / "ref.png")
    assert cli.main(["explain", str(DIGITS), "--image", str(tmp_path / "wide.png"), "-o", str(tmp_path / "a.png")]) == 0
    assert cli.main(["explain", str(DIGITS), "--image", str(tmp_path / "ref.png"), "-o", str(tmp_path / "b.png")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_explain_compiled_model_is_not_recompiled(tmp_path, capsys, monkeypatch):
    compiled = tmp_path / "digits.lrp.onnx"
    onnx.save(lrpc.compile(str(DIGITS), "epsilon-gamma-box"), str(compiled))
    png = _digit_png(tmp_path, 3)

    def no_compile(*a, **k):
        raise AssertionError("recompiled")

    monkeypatch.setattr(lrpc.compiler, "compile", no_compile)
    code = cli.main(["explain", str(compiled), "--image", str(png), "-o", str(tmp_path / "c.png"), "--target", "5"])
    assert code == 0, capsys.readouterr().err
    monkeypatch.undo()
    _, expected = _oracle(_read_png(png), 5, low=0.0, high=1.0)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), expected, rtol=1e-5, atol=1e-5)


def test_explain_directory_one_file_per_image(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    pngs = [_digit_png(src, i) for i in range(3)]
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = cli.main(["explain", str(DIGITS), "--images", str(src), "--overlay", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([f"digit{i}.{e}" for i in range(3) for e in ("png", "npy")])
    for png in pngs:
        _, expected = _oracle(_read_png(png), None, low=0.0, high=1.0)
        np.testing.assert_allclose(np.load(out / f"{png.stem}.npy"), expected, rtol=1e-5, atol=1e-5)
        assert Image.open(out / png.name).size == (8, 8)
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_explain_npy_batch(tmp_path, capsys):
    x = SAMPLES["images"][:4]
    np.save(tmp_path / "x.npy", x)
    code = cli.main(["explain", str(DIGITS), "--npy", str(tmp_path / "x.npy"), "--target", "3", "-o",
                     str(tmp_path / "n.png")])
    assert code == 0, capsys.readouterr().err
    _, expected = _oracle(x, 3, low=0.0, high=1.0)
    np.testing.assert_allclose(np.load(tmp_path / "n.npy"), expected, rtol=1e-5, atol=1e-5)
    assert Image.open(tmp_path / "n.png").size == (8 * 2 + 2, 8 * 2 + 2)  # a 2x2 grid of the 4 heatmaps


def test_explain_low_memory_reaches_the_session(tmp_path, capsys, monkeypatch):
    """--low-memory: the compiled graph runs in a Session(low_memory=True); the relevance is the oracle's."""
    from lrpc import runtime

    started = []

    class Recorded(runtime.Session):
        def __init__(self, *args, **kwargs):
            started.append(kwargs.get("low_memory"))
            super().__init__(*args, **kwargs)

    x = SAMPLES["images"][:2]
    np.save(tmp_path / "x.npy", x)
    _, oracle = _oracle(x, 3, low=0.0, high=1.0)
    monkeypatch.setattr(runtime, "Session", Recorded)
    for flags, expected in (([], False), (["--low-memory"], True)):
        code = cli.main(["explain", str(DIGITS), "--npy", str(tmp_path / "x.npy"), "--target", "3", "--no-cache",
                         "-o", str(tmp_path / "n.png"), *flags])
        assert code == 0, capsys.readouterr().err
        assert started.pop() is expected and not started
        np.testing.assert_allclose(np.load(tmp_path / "n.npy"), oracle, rtol=1e-5, atol=1e-5)


def _bad_png(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"this is not a png")
    return p


@pytest.mark.parametrize("case, contains", [
    ("missing", "no such file"),
    ("empty-dir", "no images"),
    ("not-image", "cannot read image"),
    ("text-file", "cannot read image"),
    ("bad-size", "--size"),
    ("size-mismatch", "differs from the static size"),
    ("bad-target", "--target"),
    ("target-range", "out of range"),
    ("dense-on-classifier", "dense target needs an output"),
    ("bad-batch", "--batch-size"),
    ("overwrite", "refusing to overwrite"),
])
def test_explain_errors_are_one_line(tmp_path, capsys, case, contains):
    png = _digit_png(tmp_path, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    out = ["-o", str(tmp_path / "h.png")]
    argv = {
        "missing": ["--image", str(tmp_path / "nope.png"), *out],
        "empty-dir": ["--images", str(empty), "-o", str(tmp_path / "o")],
        "not-image": ["--image", str(_bad_png(tmp_path)), *out],
        "text-file": ["--image", str(txt), *out],
        "bad-size": ["--image", str(png), "--size", "8x8", *out],
        "size-mismatch": ["--image", str(png), "--size", "16,16", *out],
        "bad-target": ["--image", str(png), "--target", "cat", *out],
        "target-range": ["--image", str(png), "--target", "10", *out],
        "dense-on-classifier": ["--image", str(png), "--target", "pixel:1,2", *out],
        "bad-batch": ["--images", str(tmp_path), "--batch-size", "0", "-o", str(tmp_path / "o")],
        "overwrite": ["--image", str(png), "-o", str(png)],
    }[case]
    before = png.read_bytes()
    _one_line(cli.main(["explain", str(DIGITS), *argv]), capsys, contains)
    assert png.read_bytes() == before
    assert not (tmp_path / "h.png").exists()


def test_explain_error_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrpc.cli", "explain", str(DIGITS), "--image",
                           str(tmp_path / "missing.png"), "-o", str(tmp_path / "h.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.png: no such file" in lines[0], proc.stderr


def test_explain_nhwc_rgb_model(tmp_path, capsys):
    """input [1,6,6,3] (NHWC) -> Transpose -> Conv -> Relu -> Flatten -> Gemm; RGB image, mean/std."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    g = rng.standard_normal((4, 72)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 6, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "nhwc.onnx"
    onnx.save(model, str(path))
    pixels = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)  # H 12, W 9 -> resized to 8x6, cropped to 6x6
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    code = cli.main(["explain", str(path), "--image", str(tmp_path / "rgb.png"), "--layout", "nhwc", "--rules",
                     "epsilon-plus", "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)),
                     "--target", "2", "-o", str(tmp_path / "h.png")])
    assert code == 0, capsys.readouterr().err
    shown = Image.open(tmp_path / "rgb.png").convert("RGB").resize((6, 8), Image.BILINEAR).crop((0, 1, 6, 7))
    x = ((np.asarray(shown, np.float64) / 255.0 - mean) / std)[None].astype(np.float32)
    expected = lrpc.Session(lrpc.compile(model, "epsilon-plus"),
                            providers=["CPUExecutionProvider"]).explain(x, 2).relevance
    relevance = np.load(tmp_path / "h.npy")
    assert relevance.shape == (1, 6, 6, 3)
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "h.png")), colorize(expected[0].sum(-1), "coldnhot"))


def test_explain_topk_is_a_row_of_ranks(tmp_path, capsys):
    png = _digit_png(tmp_path, 2)
    code = cli.main(["explain", str(DIGITS), "--image", str(png), "--target", "top3", "-o", str(tmp_path / "k.png")])
    assert code == 0, capsys.readouterr().err
    session = lrpc.Session(lrpc.compile(str(DIGITS), "epsilon-gamma-box", low=0.0, high=1.0),
                           providers=["CPUExecutionProvider"])
    ranks = session.explain_topk(_read_png(png), 3)
    relevance = np.load(tmp_path / "k.npy")
    assert relevance.shape == (1, 3, 1, 8, 8)
    for i, e in enumerate(ranks):
        np.testing.assert_allclose(relevance[:, i], e.relevance, rtol=1e-5, atol=1e-6)
    pic = np.asarray(Image.open(tmp_path / "k.png"))
    assert pic.shape == (8, 3 * 8 + 2 * 2, 3)
    assert np.array_equal(pic[:, 10:18], colorize(ranks[1].relevance[0, 0]))  # rank 2 is the middle panel
    classes = ",".join(str(int(e.target[0])) for e in ranks)
    assert f"target {classes} ->" in capsys.readouterr().out


def test_explain_directory_in_batches_matches_single_images(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    pngs = [_digit_png(src, i) for i in range(5)]
    out = tmp_path / "out"
    code = cli.main(["explain", str(DIGITS), "--images", str(src), "--batch-size", "2", "--target", "4",
                     "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    for png in pngs:
        _, expected = _oracle(_read_png(png), 4, low=0.0, high=1.0)
        np.testing.assert_allclose(np.load(out / f"{png.stem}.npy"), expected, rtol=1e-5, atol=1e-6)
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_explain_progress_bar_replaces_the_lines(tmp_path, capsys):
    from lrpc.explain import run

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        _digit_png(src, i)
    logged = []
    run(str(DIGITS), tmp_path / "out", images=src, progress=True, log=logged.append)
    err = capsys.readouterr().err
    assert logged == [] and "3/3" in err and err.count("\r") == 3


def _counting_compile(monkeypatch):
    """Count compilations: lrpc.compiler.compile_loaded (compile calls it too; the cache path calls it alone)."""
    import lrpc.compiler  # (import lrpc loads the compiler only when asked for)

    calls = []
    real = lrpc.compiler.compile_loaded

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lrpc.compiler, "compile_loaded", counted)
    return calls


def test_explain_compile_cache(tmp_path, capsys, monkeypatch):
    model = tmp_path / "digits.onnx"
    model.write_bytes(DIGITS.read_bytes())
    png = _digit_png(tmp_path, 1)
    calls = _counting_compile(monkeypatch)
    argv = ["explain", str(model), "--image", str(png), "--target", "3"]
    for i, extra in enumerate([[], [], ["--epsilon", "0.01"], ["--epsilon", "0.01"], ["--no-cache"]]):
        assert cli.main(argv + extra + ["-o", str(tmp_path / f"h{i}.png")]) == 0
    assert len(calls) == 3  # first run, new epsilon, --no-cache
    assert "from the cache" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "h0.npy"), np.load(tmp_path / "h1.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "h0.npy"), np.load(tmp_path / "h4.npy"))
    proto = onnx.load(str(model))
    proto.graph.initializer[0].raw_data = (numpy_helper.to_array(proto.graph.initializer[0]) * 2).tobytes()
    onnx.save(proto, str(model))  # same path, new weights: a new entry
    assert cli.main(argv + ["-o", str(tmp_path / "h5.png")]) == 0
    assert len(calls) == 4
    assert not np.array_equal(np.load(tmp_path / "h0.npy"), np.load(tmp_path / "h5.npy"))
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("x")
    monkeypatch.setenv("LRPC_CACHE_DIR", str(blocked))
    assert cli.main(argv + ["-o", str(tmp_path / "h6.png")]) == 0
    assert "lrpc: warning: compile cache" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "h5.npy"), np.load(tmp_path / "h6.npy"))


def _seg_model(path):
    """x [N,2,5,6] -> Conv 3x3 (3 classes) -> Softmax over channels: a dense prediction."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 6])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3, 5, 6])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return model, w


def test_explain_dense_targets_from_the_command_line(tmp_path, capsys):
    model, w = _seg_model(tmp_path / "seg.onnx")
    x = np.random.default_rng(5).standard_normal((2, 2, 5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:5] = True
    np.save(tmp_path / "mask.npy", mask)
    session = lrpc.Session(lrpc.compile(model, "epsilon", epsilon=0.0), providers=["CPUExecutionProvider"])
    z = session.explain(x, "class:0").output  # probabilities: their arg-max is the logits' arg-max
    for target in ("pixel:3,4", "box:1,2,3,5", f"mask:{tmp_path / 'mask.npy'}", "class:2"):
        code = cli.main(["explain", str(tmp_path / "seg.onnx"), "--npy", str(tmp_path / "x.npy"), "--rules", "epsilon",
                         "--epsilon", "0", "--target", target, "-o", str(tmp_path / "d.png")])
        assert code == 0, capsys.readouterr().err
        # oracle: the seed from numpy's arg-max of the probabilities, pushed through the graph directly
        pred = z.argmax(axis=1)
        where = np.zeros((2, 5, 6), bool)
        if target.startswith("pixel"):
            where[:, 3, 4] = True
        elif target.startswith(("box", "mask")):
            where[:, 1:3, 2:5] = True
        seed = np.stack([where & (pred == c) for c in range(3)], axis=1)
        if target == "class:2":
            seed = np.zeros((2, 3, 5, 6), bool)
            seed[:, 2] = pred == 2
        # LRP-0 without bias on one conv = x * W^T (seed / z): compare with a numpy oracle in float64
        logits = _conv(x.astype(np.float64), w.astype(np.float64))
        want = x * _conv_adjoint(np.where(seed, 1.0 / logits, 0.0), w.astype(np.float64))
        np.testing.assert_allclose(np.load(tmp_path / "d.npy"), want, rtol=1e-4, atol=1e-5)
        assert f"target {target}" in capsys.readouterr().out


def _conv(x, w):
    """3x3 convolution, pads 1, NCHW, float64 (numpy oracle)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2:]
    return sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
               for i in range(3) for j in range(3))


def _conv_adjoint(c, w):
    """The transpose of :func:`_conv` applied to c [N, O, H, W]."""
    h, wd = c.shape[2:]
    out = np.zeros((c.shape[0], w.shape[1], h + 2, wd + 2))
    for i in range(3):
        for j in range(3):
            out[:, :, i:i + h, j:j + wd] += np.einsum("nohw,oc->nchw", c, w[:, :, i, j])
    return out[:, :, 1:-1, 1:-1]


def test_explain_never_overwrites_the_mask_file(tmp_path, capsys):
    model, _ = _seg_model(tmp_path / "seg.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 2, 5, 6), np.float32))
    mask = np.zeros((5, 6), np.uint8)
    mask[1, 1] = 1
    np.save(tmp_path / "region.npy", mask)
    before = (tmp_path / "region.npy").read_bytes()
    code = cli.main(["explain", str(tmp_path / "seg.onnx"), "--npy", str(tmp_path / "x.npy"), "--target",
                     f"mask:{tmp_path / 'region.npy'}", "-o", str(tmp_path / "region.png")])
    _one_line(code, capsys, "refusing to overwrite an input file")
    assert (tmp_path / "region.npy").read_bytes() == before


def test_explain_one_class_per_image_across_batches(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    pngs = [_digit_png(src, i) for i in range(5)]
    classes = [3, 1, 4, 1, 5]
    out = tmp_path / "out"
    code = cli.main(["explain", str(DIGITS), "--images", str(src), "--batch-size", "2", "--target",
                     ",".join(map(str, classes)), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    for png, c in zip(pngs, classes):
        _, expected = _oracle(_read_png(png), c, low=0.0, high=1.0)
        np.testing.assert_allclose(np.load(out / f"{png.stem}.npy"), expected, rtol=1e-5, atol=1e-6)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("target ")[1].split(" ")[0] for line in lines] == list(map(str, classes))
    code = cli.main(["explain", str(DIGITS), "--images", str(src), "--target", "3,1", "-o", str(out)])
    _one_line(code, capsys, "2 class indices for 5 images")


@pytest.mark.parametrize("case, contains", [
    ("shape", "has shape [1, 1, 4, 4], the model expects [?,1,8,8]"),
    ("rank", "the model expects"),
    ("empty", "holds no samples"),
])
def test_explain_npy_errors_are_one_line(tmp_path, capsys, case, contains):
    arrays = {"shape": np.zeros((1, 1, 4, 4), np.float32), "rank": np.zeros((1, 8, 8), np.float32),
              "empty": np.zeros((0, 1, 8, 8), np.float32)}
    np.save(tmp_path / "x.npy", arrays[case])
    _one_line(cli.main(["explain", str(DIGITS), "--npy", str(tmp_path / "x.npy"), "-o", str(tmp_path / "h.png")]),
              capsys, contains)


def test_explain_npy_float64_is_cast(tmp_path, capsys):
    x = SAMPLES["images"][:2].astype(np.float64)  # numpy's default float type
    np.save(tmp_path / "x.npy", x)
    code = cli.main(["explain", str(DIGITS), "--npy", str(tmp_path / "x.npy"), "--target", "2", "-o",
                     str(tmp_path / "h.png")])
    assert code == 0, capsys.readouterr().err
    _, expected = _oracle(x.astype(np.float32), 2, low=0.0, high=1.0)
    np.testing.assert_allclose(np.load(tmp_path / "h.npy"), expected, rtol=1e-5, atol=1e-6)


def test_explain_empty_target_warns(tmp_path, capsys):
    _seg_model(tmp_path / "seg.onnx")
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 5, 6), np.float32))  # equal scores: arg-max 0 everywhere
    z = lrpc.Session(lrpc.compile(str(tmp_path / "seg.onnx"), "epsilon"), providers=["CPUExecutionProvider"])
    probs = z.explain(np.load(tmp_path / "x.npy"), "class:0").output
    absent = [c for c in range(3) if not (probs.argmax(axis=1) == c).any()]
    seeded = [c for c in range(3) if (probs.argmax(axis=1) == c).any()]
    for c, warned in [(c, True) for c in absent] + [(seeded[0], False)]:
        code = cli.main(["explain", str(tmp_path / "seg.onnx"), "--npy", str(tmp_path / "x.npy"), "--target",
                         f"class:{c}", "-o", str(tmp_path / "h.png")])
        err = capsys.readouterr().err
        assert code == 0 and ("selects no output entry" in err) == warned, err
    assert absent, "the test input should leave a class unpredicted"


def test_single_image_keeps_its_line_without_a_bar(tmp_path, capsys):
    from lrpc.explain import run

    logged = []
    run(str(DIGITS), tmp_path / "h.png", image=_digit_png(tmp_path, 0), progress=True, log=logged.append)
    assert len(logged) == 1 and "target top1" in logged[0] and "\r" not in capsys.readouterr().err


def test_compile_cache_keys_on_lrpc_code_and_survives_unsearchable_folders(tmp_path, capsys, monkeypatch):
    from lrpc import cache

    png = _digit_png(tmp_path, 1)
    calls = _counting_compile(monkeypatch)
    argv = ["explain", str(DIGITS), "--image", str(png), "-o", str(tmp_path / "h.png")]
    assert cli.main(argv) == 0 and cli.main(argv) == 0 and len(calls) == 1
    monkeypatch.setattr(cache, "_code_digest", lambda: "another lrpc")  # an edited checkout or a new release
    assert cli.main(argv) == 0 and len(calls) == 2
    entries = list(Path(cache.cache_dir()).glob("*.lrp.onnx"))
    assert len(entries) == 2 and all(e.stat().st_mode & 0o044 for e in entries)  # readable by others (umask 022)
    real = Path.is_file

    def locked(self):
        if "lrpc-cache" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", locked)
    capsys.readouterr()
    assert cli.main(argv) == 0 and len(calls) == 3
    err = capsys.readouterr().err
    assert "lrpc: warning: compile cache" in err and "Permission denied" in err


def test_explain_top1_is_one_run_per_batch(tmp_path, capsys, monkeypatch):
    """The default target compiles the in-graph top-1 seed: one onnxruntime run per batch (a class index:
    also one; a prediction-dependent dense target: two)."""
    from lrpc.runtime import Session

    src = tmp_path / "imgs"
    src.mkdir()
    pngs = [_digit_png(src, i) for i in range(3)]
    runs = []
    real = Session.run
    monkeypatch.setattr(Session, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    assert cli.main(["explain", str(DIGITS), "--images", str(src), "-o", str(tmp_path / "out")]) == 0
    assert len(runs) == 1
    for png in pngs:
        _, expected = _oracle(_read_png(png), None, low=0.0, high=1.0)
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{png.stem}.npy"), expected, rtol=1e-5, atol=1e-6)
    runs.clear()
    assert cli.main(["explain", str(DIGITS), "--images", str(src), "--target", "3", "-o", str(tmp_path / "o3")]) == 0
    assert len(runs) == 1
    compiled = tmp_path / "top1.lrp.onnx"
    assert cli.main(["compile", str(DIGITS), "--seed", "top1", "-o", str(compiled)]) == 0
    capsys.readouterr()
    _one_line(cli.main(["explain", str(compiled), "--image", str(pngs[0]), "--target", "3",
                        "-o", str(tmp_path / "h.png")]),
              capsys, "compiled with seed top1")


def test_explain_directory_skips_unreadable_images_then_fails(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    good = [_digit_png(src, i, f"d{i}.png") for i in (0, 2, 3)]
    (src / "d1.png").write_bytes(b"not a png")  # second in file name order
    out = tmp_path / "out"
    code = cli.main(["explain", str(DIGITS), "--images", str(src), "--batch-size", "2", "--target", "5,6,7,8", "-o",
                     str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 2 and "d1.png: cannot read image" in err[0] and err[0].endswith("; skipped")
    assert err[1] == "lrpc: error: 1 of 4 images could not be read (warnings above); the other 3 were explained"
    assert sorted(p.name for p in out.glob("*.npy")) == ["d0.npy", "d2.npy", "d3.npy"]
    for png, c in zip(good, (5, 7, 8)):  # the class list follows the file name order, the skipped one included
        _, expected = _oracle(_read_png(png), c, low=0.0, high=1.0)
        np.testing.assert_allclose(np.load(out / f"{png.stem}.npy"), expected, rtol=1e-5, atol=1e-6)


def test_explain_never_overwrites_the_model_and_write_errors_are_input_errors(tmp_path, capsys):
    """The model file is an input too (whatever its name), and an output that cannot be written (its .npy path is
    a folder) is one line with exit code 2, no traceback."""
    model = tmp_path / "m.npy"
    model.write_bytes(DIGITS.read_bytes())
    png = _digit_png(tmp_path, 0)
    before = model.read_bytes()
    _one_line(cli.main(["explain", str(model), "--image", str(png), "-o", str(tmp_path / "m.png")]), capsys,
              "refusing to overwrite an input file (the model)")
    assert model.read_bytes() == before
    (tmp_path / "h.npy").mkdir()
    _one_line(cli.main(["explain", str(DIGITS), "--image", str(png), "-o", str(tmp_path / "h.png")]), capsys,
              "is a directory")


def test_explain_refuses_a_zero_standard_deviation(tmp_path, capsys):
    png = _digit_png(tmp_path, 0)
    _one_line(cli.main(["explain", str(DIGITS), "--image", str(png), "--mean", "0.5", "--std", "0", "-o",
                        str(tmp_path / "h.png")]), capsys, "positive standard deviations expected")


def test_preprocessing_options_from_python():
    """The options the command line parses are the Python API's too: presets, text or numbers, one validation."""
    from lrpc.preprocess import IMAGENET_MEAN, IMAGENET_STD, image_size, normalization

    assert normalization("imagenet") == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert normalization(mean="0.5,-1", std=(2, 0.5)) == ([0.5, -1.0], [2.0, 0.5])
    assert normalization() == (None, None)
    assert image_size("8,6") == image_size((8, 6)) == (8, 6) and image_size(8) == image_size("8") == (8, 8)
    for call, says in ((lambda: normalization("imagenet", std=[1]), "cannot be combined"),
                       (lambda: normalization(mean=[0.5]), "go together"),
                       (lambda: normalization(mean=[0], std=[0]), "positive standard deviations"),
                       (lambda: normalization("cifar"), "unknown preset"),
                       (lambda: image_size("8x8"), "--size"), (lambda: image_size((0, 4)), "--size")):
        with pytest.raises(lrpc.InputError, match=says):
            call()

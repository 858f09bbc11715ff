"""Regenerate the figures of README.md and docs/cli.md with `lrpc explain` on the shipped, trained digits models.

    python docs/make_digits_figure.py     (needs pillow)

docs/digits_heatmaps.png: the digits CNN (models/digits.py); rows: 8 test digits, columns: the input, then
one heatmap per composite of `lrpc explain --images DIR --rules C --target top1` (the 8 are classified right).
docs/digits_segmentation.png: the digits U-Net (models/digits_seg.py); rows: 8 test digits, columns: the
input, the true mask, `--target class:1` (every pixel predicted as stroke) per composite, and
`--target box:0,0,8,16` (every position of the upper half, channel 0).
coldnhot: red/yellow/white = positive relevance, blue/cyan = negative, black = none."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from lrpc import cli
from lrpc.imaging import grid

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ["epsilon-gamma-box", "epsilon-plus-flat", "epsilon-alpha2-beta1", "epsilon"]
SEGMENTER = [("epsilon-gamma-box", "class:1"), ("epsilon-plus-flat", "class:1"), ("epsilon-alpha2-beta1", "class:1"),
             ("epsilon-gamma-box", "box:0,0,8,16")]
CELL = 64


def _gray(a):
    from PIL import Image

    return Image.fromarray(np.rint(a * 255).astype(np.uint8)).convert("RGB").resize((CELL, CELL), Image.NEAREST)


def _explain(model: Path, images: Path, out: Path, rules: str, target: str) -> list:
    from PIL import Image

    argv = ["explain", str(model), "--images", str(images), "--rules", rules, "--target", target, "--no-cache",
            "--no-progress", "-o", str(out)]
    print("lrpc " + " ".join(argv[:1] + ["models/" + model.name] + argv[2:3] + ["DIR"] + argv[4:-1] + ["OUT"]))
    assert cli.main(argv) == 0
    return [Image.open(p).resize((CELL, CELL), Image.NEAREST) for p in sorted(out.glob("*.png"))]


def figure(model: Path, images: np.ndarray, columns: list, extra=None) -> object:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i, x in enumerate(images):
            Image.fromarray(np.rint(x[0] * 255).astype(np.uint8)).save(src / f"digit{i}.png")
        maps = [_explain(model, src, Path(tmp) / f"out{k}", rules, target) for k, (rules, target) in enumerate(columns)]
    tiles = []
    for i, x in enumerate(images):
        tiles.append(_gray(x[0]))
        if extra is not None:
            tiles.append(_gray(extra[i, 0]))
        tiles += [m[i] for m in maps]
    return grid(tiles, cols=len(tiles) // len(images))


def main() -> None:
    data = np.load(ROOT / "models" / "digits_samples.npz")
    figure(ROOT / "models" / "digits_cnn.onnx", data["images"][:8], [(c, "top1") for c in CLASSIFIER]).save(
        ROOT / "docs" / "digits_heatmaps.png")
    seg = np.load(ROOT / "models" / "digits_seg_samples.npz")
    figure(ROOT / "models" / "digits_unet.onnx", seg["images"], SEGMENTER, extra=seg["masks"].astype(np.float64)).save(
        ROOT / "docs" / "digits_segmentation.png")


if __name__ == "__main__":
    main()

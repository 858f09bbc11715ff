"""Regenerate docs/digits_vit_heatmaps.png with `lrpc explain` on the shipped, trained digits ViT
(models/digits_vit.py).

    python docs/make_digits_vit_figure.py [OUT.png]     (needs pillow)

Rows: a header naming each column, then 8 test digits (32x32, all classified right). Columns: the input, then per
composite (attnlrp, cp-lrp, cp-lrp-vit) the relevance per pixel and the same summed per 4x4 patch (one patch = one
pixel of the original 8x8 digit), each from `lrpc explain models/digits_vit.onnx --npy X.npy --rules C`.
coldnhot: red/yellow/white = positive relevance, blue/cyan = negative, black = none."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from lrpc import cli
from lrpc.imaging import grid, heatmap

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits_vit.onnx"
COMPOSITES = ["attnlrp", "cp-lrp", "cp-lrp-vit"]
N, PATCH, CELL = 8, 4, 96


def explain(images: np.ndarray, rules: str, tmp: Path) -> np.ndarray:
    """`lrpc explain --npy` of the images (top-1 target); its .npy next to the heatmap holds the relevance."""
    np.save(tmp / "x.npy", images)
    out = tmp / f"{rules}.png"
    argv = ["explain", str(MODEL), "--npy", str(tmp / "x.npy"), "--rules", rules, "--no-cache", "--no-progress",
            "-o", str(out)]
    print("lrpc " + " ".join(["explain", "models/digits_vit.onnx", "--npy", "X.npy"] + argv[4:-1] + ["OUT.png"]))
    assert cli.main(argv) == 0
    return np.load(out.with_suffix(".npy"))


def label(text: str, width: int):
    """A white header tile with the column's name."""
    from PIL import Image, ImageDraw, ImageFont

    tile = Image.new("RGB", (width, 22), "white")
    ImageDraw.Draw(tile).text((width // 2, 11), text, fill="black", anchor="mm", font=ImageFont.load_default(13))
    return tile


def figure(images: np.ndarray):
    from PIL import Image

    def cell(im):
        return im.resize((CELL, CELL), Image.NEAREST)

    with tempfile.TemporaryDirectory() as tmp:
        maps = [explain(images, c, Path(tmp)) for c in COMPOSITES]
    n, _, h, w = images.shape
    cols = 1 + 2 * len(maps)
    header = grid([label(t, CELL) for t in ["input"] + [f"{c}{k}" for c in COMPOSITES for k in ("", " /patch")]],
                  cols=cols)
    tiles = []
    for i in range(n):
        tiles.append(cell(Image.fromarray(np.rint(images[i, 0] * 255).astype(np.uint8)).convert("RGB")))
        for r in maps:
            patches = r[i, 0].reshape(h // PATCH, PATCH, w // PATCH, PATCH).sum((1, 3))
            tiles += [cell(heatmap(r[i, 0])), cell(heatmap(patches))]
    body = grid(tiles, cols=cols)
    out = Image.new("RGB", (body.width, header.height + body.height), "white")
    out.paste(header, (0, 0))
    out.paste(body, (0, header.height))
    return out


def main(out: Path = ROOT / "docs" / "digits_vit_heatmaps.png") -> None:
    data = np.load(ROOT / "models" / "digits_vit_samples.npz")
    figure(data["images"][:N]).save(out)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:2]))

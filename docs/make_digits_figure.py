"""Regenerate docs/digits_heatmaps.png: relevance of the shipped digits CNN for several composites.

    python docs/make_digits_figure.py     (needs pillow)

Rows: 8 test digits (true class explained); columns: the input, then one heatmap per composite (coldnhot:
red/yellow/white = positive relevance, blue/cyan = negative, black = none)."""
from pathlib import Path

import numpy as np

import lrpc
from lrpc.heatmap import grid, heatmap

ROOT = Path(__file__).resolve().parents[1]
COMPOSITES = ["epsilon-gamma-box", "epsilon-plus-flat", "epsilon-alpha2-beta1", "epsilon"]


def main() -> None:
    from PIL import Image

    data = np.load(ROOT / "models" / "digits_samples.npz")
    x, labels = data["images"][:8], data["labels"][:8]
    tiles = []
    rel = {c: lrpc.Session(lrpc.compile(ROOT / "models" / "digits_cnn.onnx", c, low=0.0, high=1.0),
                           providers=["CPUExecutionProvider"]).explain(x, target=labels)[1] for c in COMPOSITES}
    for i in range(len(x)):
        gray = Image.fromarray((x[i, 0] * 255).astype(np.uint8)).convert("RGB")
        tiles.append(gray.resize((64, 64), Image.NEAREST))
        tiles += [heatmap(rel[c][i]).resize((64, 64), Image.NEAREST) for c in COMPOSITES]
    grid(tiles, cols=1 + len(COMPOSITES)).save(ROOT / "docs" / "digits_heatmaps.png")


if __name__ == "__main__":
    main()

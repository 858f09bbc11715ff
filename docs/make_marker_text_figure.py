"""Regenerate docs/marker_text_relevance.png with the Python API on the shipped marker-token classifier
(models/marker_text.py: the class is the colour word hidden among distractor words).

    python docs/make_marker_text_figure.py [OUT.png]     (needs pillow)

One panel per composite (attnlrp, cp-lrp): each row a test sequence, each box a token coloured by its relevance
for the predicted class (`relevance_tokens` of `lrpc.compile(model, composite)` run by `lrpc.Session`; bwr:
red = positive, blue = negative, white = none; each row scaled by its max |R|); the marker tokens, the only ones
that carry the answer, are framed in black."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import lrpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "marker_text.onnx"
COMPOSITES = ["attnlrp", "cp-lrp"]
CLASSES = ["red", "green", "blue", "yellow"]
N, BOX_W, BOX_H, LABEL_W, TITLE_H = 8, 54, 22, 96, 26


def token_relevance(ids: np.ndarray, rules: str) -> tuple[np.ndarray, np.ndarray]:
    """(relevance_tokens [N, T] for each sequence's predicted class, the predicted classes [N])."""
    e = lrpc.Session(lrpc.compile(MODEL, rules)).explain({"input_ids": ids})
    return e.relevance, e.target


def panel(title: str, words: list, relevance: np.ndarray, predicted: np.ndarray, markers: np.ndarray):
    from PIL import Image, ImageDraw, ImageFont

    n, t = relevance.shape
    font, bold = ImageFont.load_default(12), ImageFont.load_default(15)
    im = Image.new("RGB", (LABEL_W + t * BOX_W, TITLE_H + n * (BOX_H + 4)), "white")
    draw = ImageDraw.Draw(im)
    draw.text((4, TITLE_H // 2), title, fill="black", anchor="lm", font=bold)
    for i in range(n):
        y = TITLE_H + i * (BOX_H + 4)
        draw.text((4, y + BOX_H // 2), f"pred: {CLASSES[predicted[i]]}", fill="black", anchor="lm", font=font)
        colors = lrpc.colorize(relevance[i][None], cmap="bwr")[0]  # [T, 3] RGB
        for j in range(t):
            x = LABEL_W + j * BOX_W
            box = (x + 1, y, x + BOX_W - 2, y + BOX_H)
            draw.rectangle(box, fill=tuple(int(c) for c in colors[j]), outline="black" if markers[i, j] else None,
                           width=2)
            draw.text((x + BOX_W // 2, y + BOX_H // 2), words[i][j], fill="black", anchor="mm", font=font)
    return im


def figure(data) -> object:
    from PIL import Image

    ids, markers, vocab = data["input_ids"][:N], data["markers"][:N], [str(v) for v in data["vocab"]]
    words = [[vocab[k] for k in row] for row in ids]
    panels = []
    for rules in COMPOSITES:
        relevance, predicted = token_relevance(ids, rules)
        panels.append(panel(f"{rules}: relevance per token for the predicted class", words, relevance, predicted,
                            markers))
    out = Image.new("RGB", (panels[0].width, sum(p.height for p in panels) + 8 * (len(panels) - 1)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + 8
    return out


def main(out: Path = ROOT / "docs" / "marker_text_relevance.png") -> None:
    figure(np.load(ROOT / "models" / "marker_text_samples.npz")).save(out)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:2]))

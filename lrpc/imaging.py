"""Relevance maps as images: colormaps, heatmaps, overlays and grids.

``colorize`` needs only numpy; ``heatmap``, ``overlay`` and ``grid`` return Pillow images. Pillow is an
optional extra (``pip install 'lrpc[image]'``) imported only when an image is made.

Colormaps follow zennit's built-in ones (``zennit.image.CMAPS``): a colormap maps t in [0, 1] to RGB by
linear interpolation between color stops. With ``symmetric=True`` relevance is scaled by its largest
absolute value so that 0 lands on t = 0.5 (the middle of the colormap), +max|R| on 1 and -max|R| on 0.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

# name -> color stops (t, (r, g, b)), t ascending in [0, 1], colors 0..255. The stops follow zennit's
# definitions, with the middle stop at exactly t = 0.5 so that zero relevance gets exactly the middle color.
COLORMAPS: dict[str, tuple] = {
    # negative: cyan -> blue, zero: black, positive: red -> yellow -> white
    "coldnhot": ((0.0, (0, 255, 255)), (0.25, (0, 0, 255)), (0.5, (0, 0, 0)),
                 (2 / 3, (255, 0, 0)), (5 / 6, (255, 255, 0)), (1.0, (255, 255, 255))),
    # blue -> white -> red
    "bwr": ((0.0, (0, 0, 255)), (0.5, (255, 255, 255)), (1.0, (255, 0, 0))),
    # blue -> light gray -> red, brightness 0xd0
    "seismic": ((0.0, (0, 0, 0xD0)), (0.5, (0xD0, 0xD0, 0xD0)), (1.0, (0xD0, 0, 0))),
    # black -> white
    "gray": ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))),
}


def pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise InputError("Pillow is needed for images: pip install 'lrpc[image]' (or pip install pillow)") from None
    return Image


def _as_map(relevance) -> np.ndarray:
    """A 2-d float map from a [H,W], [C,H,W] or [1,C,H,W] array (channels summed)."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 4:
        if r.shape[0] != 1:
            raise InputError(f"heatmap: expected one sample, got a batch of {r.shape[0]} (index it or use grid)")
        r = r[0]
    if r.ndim == 3:
        r = r.sum(axis=0)
    elif r.ndim == 1:
        r = r[None, :]
    if r.ndim != 2:
        raise InputError(f"heatmap: expected a [H,W], [C,H,W] or [1,C,H,W] array, "
                         f"got shape {tuple(np.shape(relevance))}")
    return r


def normalize(relevance, symmetric: bool = True, level: float = 1.0) -> np.ndarray:
    """Map a relevance map to t in [0, 1] (the colormap's axis).

    symmetric: t = (R / max|R| + 1) / 2, so 0 -> 0.5; otherwise min -> 0 and max -> 1. ``level`` > 1
    saturates earlier (zennit's palette level): t = clip((2t - 1) * level + 1) / 2). An all-zero (or
    constant, when not symmetric) map gives 0.5 everywhere; NaN counts as 0."""
    r = np.nan_to_num(_as_map(relevance), nan=0.0, posinf=0.0, neginf=0.0)
    if symmetric:
        scale = np.abs(r).max() if r.size else 0.0
        v = r / scale if scale > 0 else np.zeros_like(r)
    else:
        lo, hi = (r.min(), r.max()) if r.size else (0.0, 0.0)
        v = 2.0 * (r - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(r)
    return ((v * float(level) + 1.0) / 2.0).clip(0.0, 1.0)


def colorize(relevance, cmap: str = "coldnhot", symmetric: bool = True, level: float = 1.0) -> np.ndarray:
    """The heatmap as a uint8 RGB array [H, W, 3] (numpy only)."""
    if cmap not in COLORMAPS:
        raise InputError(f"unknown colormap '{cmap}' (choose from {', '.join(COLORMAPS)})")
    t = normalize(relevance, symmetric, level)
    stops = COLORMAPS[cmap]
    xs = np.array([s[0] for s in stops])
    colors = np.array([s[1] for s in stops], dtype=np.float64)
    rgb = np.stack([np.interp(t, xs, colors[:, k]) for k in range(3)], axis=-1)
    return np.rint(rgb).clip(0, 255).astype(np.uint8)


def heatmap(relevance, cmap: str = "coldnhot", symmetric: bool = True, level: float = 1.0):
    """A PIL RGB image of a relevance map ([H,W], [C,H,W] or [1,C,H,W]; channels are summed).

    ``cmap``: one of :data:`COLORMAPS` (coldnhot, bwr, seismic, gray). ``symmetric``: scale by max|R| so
    that zero relevance is the colormap's middle (black for coldnhot, white for bwr). ``level``: > 1
    saturates earlier, < 1 uses less of the colormap's range."""
    return pil_image().fromarray(colorize(relevance, cmap, symmetric, level))


def overlay(image, heat, alpha: float = 0.5):
    """Blend ``heat`` (a PIL image or an array for :func:`heatmap`) over ``image`` (PIL image or a uint8/
    [0,1]-float array [H,W] / [H,W,3]); ``alpha`` is the heatmap's weight. The heatmap is resized to the
    image (nearest neighbour, so relevance pixels stay crisp)."""
    Image = pil_image()
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"overlay: alpha must lie in [0, 1], got {alpha}")
    base = _to_pil(image, Image).convert("RGB")
    if not isinstance(heat, Image.Image):
        heat = heatmap(heat)
    heat = heat.convert("RGB")
    if heat.size != base.size:
        heat = heat.resize(base.size, Image.NEAREST)
    return Image.blend(base, heat, alpha)


def grid(images, cols: int | None = None, pad: int = 2, fill=(255, 255, 255)):
    """Tile PIL images (or arrays for :func:`heatmap`) row by row, ``cols`` per row (default
    ceil(sqrt(n))), with ``pad`` pixels of ``fill`` between them; cells have the largest image's size."""
    Image = pil_image()
    tiles = [im if isinstance(im, Image.Image) else heatmap(im) for im in images]
    if not tiles:
        raise InputError("grid: no images")
    cols = max(1, min(int(cols or math.ceil(math.sqrt(len(tiles)))), len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    w = max(t.size[0] for t in tiles)
    h = max(t.size[1] for t in tiles)
    out = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), fill)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        out.paste(tile.convert("RGB"), (c * (w + pad), r * (h + pad)))
    return out


def _to_pil(image, Image):
    if isinstance(image, Image.Image):
        return image
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise InputError(f"overlay: expected an image [H,W] or [H,W,3], got shape {a.shape}")
    return Image.fromarray(a)

"""Pooling windows as index tables (numpy only: the compiler's split MaxPool and ``lrpc check``'s tie count)."""
from __future__ import annotations

import itertools

import numpy as np


def window_table(attrs: dict, spatial: list[int]) -> np.ndarray:
    """int64 [K, *out]: flat input index (row-major over ``spatial``) read by kernel tap j of each output
    window; padding and ceil_mode overhang cells read index prod(spatial), one slot past the input."""
    nd, a = len(spatial), attrs
    k = list(a["kernel_shape"])
    s, d = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    auto = _auto_pad(a)
    span = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
    pb = begin_pads(a, spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-spatial[i] // s[i]) for i in range(nd)]
    else:
        pads = list(a.get("pads", [0] * 2 * nd)) if auto == "NOTSET" else [0] * 2 * nd
        full = [spatial[i] + pads[i] + pads[nd + i] - span[i] for i in range(nd)]
        if a.get("ceil_mode", 0):
            out = [-(-full[i] // s[i]) + 1 for i in range(nd)]
            # onnxruntime (like torch) drops a last window that starts past the input + begin pad
            out = [o - 1 if (o - 1) * s[i] >= spatial[i] + pb[i] else o for i, o in enumerate(out)]
        else:
            out = [f // s[i] + 1 for i, f in enumerate(full)]
    table = np.empty([int(np.prod(k)), *out], np.int64)
    for j, tap in enumerate(itertools.product(*map(range, k))):
        # position of this tap in every window, per axis: o*s + tap*d - pad_begin
        pos = np.meshgrid(*[np.arange(out[i]) * s[i] + tap[i] * d[i] - pb[i] for i in range(nd)], indexing="ij")
        inside = np.all([(p >= 0) & (p < spatial[i]) for i, p in enumerate(pos)], axis=0)
        flat = np.ravel_multi_index([np.clip(p, 0, spatial[i] - 1) for i, p in enumerate(pos)], spatial)
        table[j] = np.where(inside, flat, int(np.prod(spatial)))
    return table


def begin_pads(attrs: dict, spatial: list[int]) -> list[int]:
    """The padding before the input on each spatial axis of a pooling node, ``auto_pad`` resolved."""
    nd, a = len(spatial), attrs
    auto = _auto_pad(a)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        k, s = list(a["kernel_shape"]), list(a.get("strides", [1] * nd))
        d = list(a.get("dilations", [1] * nd))
        total = [max(0, (-(-spatial[i] // s[i]) - 1) * s[i] + (k[i] - 1) * d[i] + 1 - spatial[i]) for i in range(nd)]
        return [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    return list(a.get("pads", [0] * 2 * nd))[:nd] if auto == "NOTSET" else [0] * nd


def _auto_pad(attrs: dict) -> str:
    auto = attrs.get("auto_pad", "NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto

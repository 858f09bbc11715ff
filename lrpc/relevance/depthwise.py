"""The adjoint of a strided depthwise convolution as a depthwise Conv (no ConvTranspose over channel groups).

onnxruntime runs a grouped ConvTranspose group by group (a GEMM and a col2im each); its blocked (NCHWc) depthwise
Conv has no such loop (docs/performance.md#lowering-choices).

The adjoint ``r[i] = Σ_{o,k: o·s + k·d - p = i} w[k] c[o]`` is a stride-1 correlation of ``u`` (``c`` with s - 1
zeros between its values, ``u[o·s] = c[o]``) with the reversed kernel, begin pad ``(K-1)d - p_begin`` and end pad
``H + p_begin - ((H'-1)s + 1)``. The zeros are put in by a ConvTranspose with a 1x1 kernel of ones, the fastest of
the interleaves tried in onnxruntime; the portable lowering interleaves with Unsqueeze, Pad and Reshape instead (IREE
cannot compile a grouped ConvTranspose)."""
from __future__ import annotations

import numpy as np

# onnxruntime runs a depthwise Conv whose channel count is a multiple of 8 in its blocked layout (on an AVX-512
# CPU); other counts go to its generic grouped Conv
BLOCK = 8


def is_depthwise(node) -> bool:
    """A Conv whose every group maps one channel to one channel, with a channel count onnxruntime's blocked
    depthwise kernel takes (a multiple of :data:`BLOCK`). For other counts the depthwise form would run the
    generic grouped Conv over the interleaved message, slower than the ConvTranspose
    (docs/performance.md#lowering-choices)."""
    w = node.inputs[1]
    g = int(node.attrs.get("group", 1))
    return g > 1 and w.shape is not None and w.shape[0] == g and w.shape[1] == 1 and g % BLOCK == 0


def pads_for(xs: list[int], zs: list[int], k: list[int], s: list[int], d: list[int], p: list[int]) -> list[int] | None:
    """Pads of the stride-1 correlation over the interleaved message (begin pads, then end pads); None when one
    would be negative (pads wider than the kernel): the caller keeps the ConvTranspose then."""
    n = len(xs)
    begin = [(k[i] - 1) * d[i] - p[i] for i in range(n)]
    end = [xs[i] + p[i] - ((zs[i] - 1) * s[i] + 1) for i in range(n)]
    return begin + end if min(begin + end) >= 0 else None


def strided_adjoint(b, c, flipped, groups: int, kernel: list[int], strides: list[int], dilations: list[int],
                    pads: list[int], zs: list[int] | None = None):
    """``Wᵀc`` of a depthwise layer (portable: any grouped one) with ``strides`` (not all 1), given its reversed
    kernel ``flipped`` and the pads from :func:`pads_for`. With ``zs`` (the spatial dims of ``c``): interleaved
    without a ConvTranspose."""
    n = len(strides)
    if zs is not None:
        u, dims = c, list(zs)  # (an axis at a time: OpenCV's Pad takes rank 5 at most)
        for i, step in enumerate(strides):
            if step > 1:
                u = interleave_zeros(b, u, 2 + i, step, dims[i], dims[i + 1:])
                dims[i] = (dims[i] - 1) * step + 1
    else:
        ones = b.const(np.ones([groups, 1] + [1] * n))  # (depthwise: a channel per group)
        u = b.op("ConvTranspose", [c, ones], {"kernel_shape": [1] * n, "strides": strides, "group": groups})
    return b.op("Conv", [u, flipped], {"group": groups, "kernel_shape": kernel, "dilations": dilations, "pads": pads})


def interleave_zeros(b, r, axis: int, step: int, size: int, trailing: list[int]):
    """``r`` with ``step - 1`` zeros after each of its ``size`` values along ``axis`` ([.., size, ..] -> [..,
    (size - 1)·step + 1, ..]): a unit axis after it padded to ``step``, the two merged (``trailing``: the static dims
    after ``axis``), the trailing zeros cut."""
    rank = axis + 1 + len(trailing)
    pads = [0] * (rank + 1) * 2
    pads[rank + 1 + axis + 1] = step - 1
    r = b.op("Pad", [b.op("Unsqueeze", [r, b.ints([axis + 1])]), b.ints(pads)])
    r = b.op("Reshape", [r, b.ints([0] * axis + [size * step] + trailing)])
    return b.op("Slice", [r, b.ints([0]), b.ints([(size - 1) * step + 1]), b.ints([axis])])

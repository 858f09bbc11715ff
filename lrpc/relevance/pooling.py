"""MaxPool, two modes (``--maxpool``):

winner (default): relevance of each output goes to the arg-max of its window (the first one on ties, like
torch's gradient). On the CPU the winners come from comparing the input with the forward's output tap by tap
(:func:`_winner_by_taps`; the forward keeps onnxruntime's fast MaxPool kernel, which an Indices output would
replace by a slow one). Compiled for CUDA or for other runtimes, and where a spatial dim is not static, via
MaxPool's Indices output and a scatter: with reduction "add" where windows overlap, so that they accumulate instead
of overwriting.

split: relevance of each output is shared equally by all cells of its window that equal the window's
maximum (LRP Toolbox). Lowered with compile-time index tables instead of a one-hot unfolding Conv: Gather
and Equal copy and compare values bit-exactly on every execution provider (a Conv may round, e.g. TF32
on GPUs, and then no cell would match the max), and padding needs no sentinel arithmetic."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import UnsupportedError, where
from ..graph import const_value, is_const, static_dims
from ..windows import begin_pads, window_table
from . import EXACT, declare, register
from .stabilize import SIGN_GROUPS, complement, indicator, quotient, sign_message

# (passes/avgpool_to_conv.py makes average pools depthwise Convs; GlobalMaxPool has no propagator)
declare("AveragePool", category="avgpool", keeps_category=True, keeps_nonneg=True, gradient=EXACT)
declare("GlobalAveragePool", category="avgpool", keeps_category=True, gradient=EXACT)  # (also one no relevance
# reaches, left as it is: a squeeze-and-excitation branch, where the gate is what stops the identity)
declare("GlobalMaxPool", keeps_nonneg=True)


@register("MaxPool", keeps_nonneg=True, routes=True, reported=True, gradient=EXACT)
def maxpool(ctx, node, R_out):
    if ctx.options.maxpool == "split":
        return _split(ctx, node, R_out)
    b = ctx.b
    r = _winner_by_taps(ctx, node, R_out[0]) if ctx.provider in ("cpu", "portable") else None
    if r is not None:
        return [r]
    if node.attrs.get("storage_order", 0):
        raise UnsupportedError(f"{where(node)}: MaxPool with storage_order=1 is not supported")
    if len(node.outputs) < 2:
        node.outputs.append(gs.Variable(f"{node.name}/indices", dtype=np.int64))
    x, idx = node.inputs[0], node.outputs[1]
    shape = b.shape_of(x)
    # a zero fill and a scatter (no MaxUnpool: onnxruntime's CUDA provider has none); disjoint windows scatter
    # without adding (each index once)
    disjoint = _disjoint(node)
    if ctx.provider == "portable":
        return [_per_plane(b, idx, R_out[0], shape, disjoint)]
    flat = b.ints([-1])
    zeros = b.op("Reshape", [b.zeros(shape), flat])
    scattered = b.op("ScatterElements",
                     [zeros, b.op("Reshape", [idx, flat], dtype=np.int64), b.op("Reshape", [R_out[0], flat])],
                     {"axis": 0} if disjoint else {"axis": 0, "reduction": "add"})
    return [b.op("Reshape", [scattered, shape])]


def _winner_by_taps(ctx, node, R):
    """Winner mode from the forward's own output, without MaxPool's Indices output (onnxruntime computes that in a
    generic kernel many times slower than its blocked MaxPool). Tap by tap in window order, the input at the tap
    that equals the window's maximum takes the relevance still unclaimed: ``c_t = [x_t = y] f_t``, ``f_(t+1) = f_t -
    c_t``, ``f_0 = R`` (the first maximum wins, as with the indices). ``x_t`` and the share ``c_t`` live on the
    input's phase grids (the cells ``≡ φ mod s``: a tap ``t·d`` reads phase ``t·d mod s``, shifted by ``t·d div s``),
    which the padded input splits into (SpaceToDepth, or strided slices) and the relevance interleaves back from
    (a Concat per axis: its copies run in rows, where a 6-D Transpose or DepthToSpace runs element by element).
    Padding cells are NaN, which equals nothing. None where a non-batch dim is not static."""
    b, x, y = ctx.b, node.inputs[0], node.outputs[0]
    if any(t.shape is None or not all(isinstance(v, (int, np.integer)) for v in t.shape[1:]) for t in (x, y)):
        return None
    a = node.attrs
    c, xs, os_ = int(x.shape[1]), [int(v) for v in x.shape[2:]], [int(v) for v in y.shape[2:]]
    n = len(xs)
    k, s = list(a["kernel_shape"]), list(a.get("strides", [1] * n))
    d, p = list(a.get("dilations", [1] * n)), begin_pads(a, xs)
    xdt = np.dtype(x.dtype) if x.dtype is not None else b.dtype
    # phase grids cover every window (a ceil_mode overhang too) and the input, a whole number of strides
    grid = [-(-max(xs[i] + p[i], (os_[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1) // s[i]) for i in range(n)]
    extra = [grid[i] * s[i] - xs[i] - p[i] for i in range(n)]
    xp = x
    if any(p) or any(extra):
        xp = b.op("Pad", [x, b.ints([0, 0, *p, 0, 0, *extra]), b.const(np.nan, xdt)], dtype=xdt)
    axes = b.ints(range(2, 2 + n))
    # SpaceToDepth (channel block φ_h·s + φ_w holds phase (φ_h, φ_w)) where onnxruntime runs it; portable graphs
    # slice with steps (onnx2torch has no SpaceToDepth)
    s2d = n == 2 and s[0] == s[1] > 1 and ctx.provider == "cpu"
    if s2d:
        xp = b.op("SpaceToDepth", [xp], {"blocksize": s[0]}, dtype=xdt)
    phases: dict[tuple, list] = {}
    f = R
    taps = list(np.ndindex(*k))
    to = helper.np_dtype_to_tensor_dtype(b.dtype)
    for j, t in enumerate(taps):
        tau = [t[i] * d[i] for i in range(n)]
        phase, shift = tuple(v % s[i] for i, v in enumerate(tau)), [v // s[i] for i, v in enumerate(tau)]
        if s2d:
            block = phase[0] * s[1] + phase[1]
            xt = b.op("Slice", [xp, b.ints([block * c, *shift]), b.ints([(block + 1) * c, *[shift[i] + os_[i]
                                                                                            for i in range(n)]]),
                                b.ints(range(1, 2 + n))], dtype=xdt)
        else:
            xt = b.op("Slice", [xp, b.ints(tau), b.ints([tau[i] + (os_[i] - 1) * s[i] + 1 for i in range(n)]), axes,
                                b.ints(s)], dtype=xdt)
        share = b.mul(b.op("Cast", [b.op("Equal", [xt, y], dtype=np.bool_)], {"to": to}), f)
        if j + 1 < len(taps):
            f = b.op("Sub", [f, share])
        pads = [0, 0, *shift, 0, 0, *[grid[i] - os_[i] - shift[i] for i in range(n)]]
        phases.setdefault(phase, []).append(b.op("Pad", [share, b.ints(pads)]) if any(pads) else share)
    zero = None
    for phase in np.ndindex(*s):
        if phase not in phases:  # (a stride longer than the window: cells no window reads)
            if zero is None:
                zero = b.mul(b.op("Pad", [R, b.ints([0, 0, *[0] * n, 0, 0, *[g - o for g, o in zip(grid, os_)]])]),
                             b.const(0.0))
            phases[phase] = [zero]
    grids = {phase: b.sum(terms) for phase, terms in phases.items()}
    dims = list(grid)
    for i in reversed(range(n)):  # interleave the phases of axis i: [.., g_i, ..] x s_i -> [.., g_i·s_i, ..]
        if s[i] == 1:
            grids = {ph[:i]: g for ph, g in grids.items()}
            continue
        dims[i] *= s[i]
        grids = {key: b.op("Reshape", [b.op("Concat", [b.op("Unsqueeze", [grids[key + (v,)], b.ints([3 + i])])
                                                       for v in range(s[i])], {"axis": 3 + i}),
                                       b.ints([0, 0, *dims])])
                 for key in {ph[:i] for ph in grids}}
    r = grids[()]
    if dims != xs:
        r = b.op("Slice", [r, b.ints(p), b.ints([p[i] + xs[i] for i in range(n)]), axes])
    return r


def _per_plane(b, idx, r, shape, disjoint: bool):
    """MaxPool's backward scattered within each (sample, channel) plane, whichever way a runtime counts the indices
    (the ONNX spec over the whole input, torch-based runtimes, tinygrad and IREE within each plane): rows of
    ``[N·C, H·W]``, each written at ``idx mod (H·W)``; no Range (tinygrad's DEV=PYTHON computes one on its clang CPU
    device) and no ScatterND (tinygrad loops over its rows in Python). ScatterElements over axis 1, adding where
    windows overlap."""
    plane = b.op("ReduceProd", [b.op("Slice", [shape, b.ints([2]), b.ints([2 ** 62])], dtype=np.int64)],
                 {"keepdims": 1}, dtype=np.int64)
    rows = b.op("Flatten", [b.op("Mod", [idx, plane], dtype=np.int64)], {"axis": 2}, dtype=np.int64)
    scattered = b.op("ScatterElements", [b.op("Flatten", [b.zeros(shape)], {"axis": 2}), rows,
                                         b.op("Flatten", [r], {"axis": 2})],
                     {"axis": 1} if disjoint else {"axis": 1, "reduction": "add"})
    return b.op("Reshape", [scattered, shape])


def _disjoint(node) -> bool:
    """True when no two windows of ``node`` share an input cell (stride >= window span on every axis) and no
    window reaches past the input ((out - 1) * stride - pads + kernel within it: a ceil_mode overhang can)."""
    a, x, y = node.attrs, node.inputs[0], node.outputs[0]
    k = list(a["kernel_shape"])
    n = len(k)
    s, d, p = a.get("strides", [1] * n), a.get("dilations", [1] * n), a.get("pads", [0] * 2 * n)
    if x.shape is None or y.shape is None or not all(isinstance(v, int) for v in [*x.shape[2:], *y.shape[2:]]):
        return False
    return all(s[i] >= (k[i] - 1) * d[i] + 1 and (y.shape[2 + i] - 1) * s[i] - p[i] - p[n + i] + k[i] <= x.shape[2 + i]
               for i in range(n))


def _split(ctx, node, R_out):
    b, x, y = ctx.b, node.inputs[0], node.outputs[0]
    dims = static_dims(x, node, "input shape")
    c, spatial, rank = dims[1], dims[2:], len(dims)
    table = window_table(node.attrs, spatial)
    xdt = np.dtype(x.dtype) if x.dtype is not None else b.dtype
    # channels last, so that each Gather index moves a block of C values (a Gather per element is much slower)
    last = [0, *range(2, rank), 1]

    def cl(t, dtype=None):  # [N, C, *sp] -> [N, 1, *sp, C]
        return b.op("Unsqueeze", [b.op("Transpose", [t], {"perm": last}, dtype=dtype), b.ints([1])], dtype=dtype)

    # patches P[n, j, *out, c] = x at tap j of each window; the extra slot holds NaN, which equals nothing,
    # so padding / ceil overhang cells are never counted as maxima whatever the input values are
    xf = b.op("Reshape", [b.op("Transpose", [x], {"perm": last}, dtype=xdt), b.ints([0, -1, c])], dtype=xdt)
    xf = b.op("Pad", [xf, b.ints([0, 0, 0, 0, 1, 0]), b.const(np.nan, xdt)], dtype=xdt)
    flat = ctx.provider == "portable"
    patches = _gather(b, xf, table, flat, xdt)
    ties = b.op("Cast", [b.op("Equal", [patches, cl(y, xdt)], dtype=np.bool_)],
                {"to": helper.np_dtype_to_tensor_dtype(b.dtype)})
    # Max(., 1): a window with no match (NaN inputs, a window all in padding) must not turn 0/0 into NaN for the
    # whole input
    count = b.op("Max", [b.reduce_sum(ties, [1]), b.const(1.0)])
    share = b.mul(ties, b.op("Div", [cl(R_out[0]), count]))
    # fold back (adjoint of the Gather): each input cell gathers every (tap, window) slot that read it,
    # padded with an always-zero slot, and sums them: a deterministic order, unlike a scatter-add
    inverse = _inverse(table.reshape(-1), int(np.prod(spatial)))
    sf = b.op("Pad", [b.op("Reshape", [share, b.ints([0, -1, c])]), b.ints([0, 0, 0, 0, 1, 0])])
    # ([M, HW] order: the sum runs over an outer axis, which ReduceSum vectorizes; over an inner one it crawls)
    folded = b.reduce_sum(_gather(b, sf, inverse.T.copy(), flat), [1], keepdims=0)
    folded = b.op("Reshape", [folded, b.ints([0, *spatial, c])])
    return [b.op("Transpose", [folded], {"perm": [0, rank - 1, *range(1, rank - 1)]})]


def _gather(b, x, table: np.ndarray, flat: bool, dtype=None):
    """``x`` [N, M, C] gathered along axis 1 at ``table``: [N, *table.shape, C]. ``flat``: a 1-D table and a Reshape
    (tinygrad's Gather of constant indices takes a list of them only)."""
    if not flat:
        return b.op("Gather", [x, b.const(table, np.int64)], {"axis": 1}, dtype=dtype)
    g = b.op("Gather", [x, b.const(table.reshape(-1), np.int64)], {"axis": 1}, dtype=dtype)
    return b.op("Reshape", [g, b.ints([0, *table.shape, -1])], dtype=dtype)


def _inverse(flat: np.ndarray, size: int) -> np.ndarray:
    """int64 [size, M]: for each input cell the positions in ``flat`` that read it, padded with len(flat)."""
    order = np.argsort(flat, kind="stable")
    cell = flat[order]
    counts = np.bincount(flat, minlength=size + 1)
    rank = np.arange(flat.size) - (np.cumsum(counts) - counts)[cell]  # position within the cell's group
    keep = cell < size  # drop the padding slot
    inverse = np.full([size, max(1, int(counts[:size].max()))], flat.size, np.int64)
    inverse[cell[keep], rank[keep]] = order[keep]
    return inverse


@register("ReduceMean", category="avgpool", keeps_category=True, gradient=EXACT)
@register("ReduceSum", category="sum", gradient=EXACT)
def reduce(ctx, node, R_out):
    """A sum or mean the avgpool pass leaves as it is (over channels, over all non-batch axes, over H, W of an NHWC
    tensor: tf2onnx's global pool): norm rule, each summed cell gets its share ``R_i = x_i * R / stab(sum)`` (a
    mean's cells weigh 1/K: ``x_i / K * R / stab(mean)``, the same), broadcast back over the reduced axes."""
    rule = ctx.rule(node)
    if rule.on_sums is None:
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to a {node.op} "
                               "(use norm, sign-norm or epsilon)")
    b, x, z = ctx.b, node.inputs[0], node.outputs[0]
    dims = list(x.shape) if x.shape is not None else static_dims(x, node, "input shape")  # (dims may be symbolic)
    rank = len(dims)
    axes = node.attrs.get("axes")
    if len(node.inputs) > 1 and node.inputs[1].name:
        if not is_const(node.inputs[1]):
            raise UnsupportedError(f"{where(node)}: {node.op} with non-constant axes")
        axes = const_value(node.inputs[1]).reshape(-1).tolist()
    rest = [None] * (len(node.inputs) - 1)
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        return [R_out[0]] + rest  # the identity
    axes = sorted({int(a) % rank for a in axes}) if axes else list(range(rank))
    if 0 in axes:
        raise UnsupportedError(f"{where(node)}: {node.op} over the batch axis has no LRP rule")
    keepdims = node.attrs.get("keepdims", 1)
    if rule.on_sums == "sign":
        return [_sign_split(ctx, node, rule, R_out[0], axes, keepdims, rank, _mean_scale(b, node, axes))] + rest
    c = quotient(b, R_out[0], z, rule, rank if keepdims else rank - len(axes))
    if not keepdims:
        c = b.op("Unsqueeze", [c, b.ints(axes)])
    if ctx.audit:  # (the reduced z, kept or unsqueezed like c: c ⊙ z is what x ⊙ c sums to)
        ctx.account(node, b.mul(c, z if keepdims else b.op("Unsqueeze", [z, b.ints(axes)])), None,
                    b.mul(R_out[0], indicator(b, "Equal", z)))
    scale = _mean_scale(b, node, axes)
    return [b.mul(x, _scaled(b, c, scale))] + rest


def _mean_scale(b, node, axes):
    """A mean's weight of each cell, 1/K (K: the number of cells reduced): a constant where the reduced dims are
    static, else read at run time (a mean over a symbolic sequence length: sentence embeddings); None for a sum."""
    x = node.inputs[0]
    if node.op != "ReduceMean":
        return None
    reduced = [x.shape[a] for a in axes]
    if all(isinstance(d, (int, np.integer)) for d in reduced):
        return b.const(1.0 / float(np.prod(reduced)))
    to = {"to": helper.np_dtype_to_tensor_dtype(np.dtype(b.dtype))}
    size = [b.op("Cast", [b.op("Size", [t], dtype=np.int64)], to) for t in (node.outputs[0], x)]
    return b.op("Div", size)  # (cells out / cells in)


def _scaled(b, t, scale):
    return t if scale is None else b.mul(t, scale)


def _sign_split(ctx, node, rule, R, axes, keepdims, rank, scale):
    """sign-norm on a reduction: where the sum (mean) is > 0 its positive cells share R in proportion, where < 0 its
    negative cells; behind a ReLU (R = 0 where z <= 0) the negative group is left out. ``scale``: see
    :func:`_mean_scale`."""
    b, x, z = ctx.b, node.inputs[0], node.outputs[0]
    quiet = ctx.no_relevance_below_zero(z)
    shares, accounts = [], []
    for sign, mask, known in SIGN_GROUPS:
        if sign == "-" and (quiet or ctx.nonneg(x)):
            continue
        part = x if sign == "+" and ctx.nonneg(x) else b.relu(x) if sign == "+" else b.op("Min", [x, b.const(0.0)])
        den = b.reduce_sum(part, axes, keepdims)
        den = _scaled(b, den, scale)
        c = sign_message(b, R, den, z, rule, rank if keepdims else rank - len(axes), mask, known, quiet)
        if ctx.audit:
            live = complement(b, indicator(b, "Equal", den))  # (a zero denominator passes none)
            accounts.append((b.mul(c, den), b.mul(indicator(b, mask, z), live)))
        c = c if keepdims else b.op("Unsqueeze", [c, b.ints(axes)])
        shares.append(b.mul(part, _scaled(b, c, scale)))
    if ctx.audit:
        passed = b.sum([p for _, p in accounts])
        ctx.account(node, b.sum([k for k, _ in accounts]), None, b.mul(R, complement(b, passed)))
    return b.sum(shares)

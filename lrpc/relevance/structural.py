"""Data movement: relevance is routed exactly as the elements moved (the adjoint of the movement).
Pad drops the relevance of pad cells (they carry none: they are constants); an element copied several times (Expand,
Gather) gets the relevance of all its copies."""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError, where
from ..graph import const_value, is_const, static_dims
from . import EXACT, register
from .depthwise import interleave_zeros
from .linear import unbroadcast

DATA_MOVEMENT = {"keeps_nonneg": True, "routes": True, "gradient": EXACT}  # (facts of every op here)


def _moved(ctx, node, R, move):
    """``move(R)``; where ``R = y ⊙ m`` with ``y`` this node's output (a linear rule's relevance, see
    :meth:`lrpc.emit.Context.factors_of`), ``x ⊙ move(m)`` remembered as a product, so that the layer making ``x``
    still sees its relevance as its own output times a message (its epsilon then needs no sign test)."""
    f = ctx.factors_of(R)
    if f is not None and f[0] is node.outputs[0]:
        return ctx.product(node.inputs[0], move(f[1]))
    return move(R)


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze", **DATA_MOVEMENT)
def reshape(ctx, node, R_out):
    x, y = node.inputs[0], node.outputs[0]
    xs, ys = x.shape, y.shape
    if xs and ys and xs[0] == ys[0] and all(isinstance(d, (int, np.integer)) and d > 0 for d in xs[1:]):
        # a constant target shape that copies the batch dim (0): shape inference keeps its symbolic name, so
        # onnxruntime can prove the relevance tensors of later layers the same shape as the activations
        # (its NCHWc layout then keeps Mul/Add/Sum between convolutions blocked, and fuses Sums into them)
        def move(r):
            return ctx.b.op("Reshape", [r, ctx.b.ints([0, *xs[1:]])])
    else:
        def move(r):
            return ctx.b.reshape_like(r, x)
    return [_moved(ctx, node, R_out[0], move)] + [None] * (len(node.inputs) - 1)


@register("Cast", **DATA_MOVEMENT)
def cast(ctx, node, R_out):
    """A Cast between float types (Llama's RMSNorm casts to float32 and back): relevance passes unchanged."""
    if any(t.dtype is None or np.dtype(t.dtype).kind != "f" for t in (node.inputs[0], node.outputs[0])):
        raise UnsupportedError(f"{where(node)}: a Cast from or to a type other than float carries no relevance")
    return [R_out[0]]


@register("Transpose", **DATA_MOVEMENT)
def transpose(ctx, node, R_out):
    x = node.inputs[0]
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(reversed(range(len(static_dims(x, node)))))
    inverse = list(np.argsort(perm))
    return [_moved(ctx, node, R_out[0], lambda r: ctx.b.op("Transpose", [r], {"perm": [int(i) for i in inverse]}))]


@register("Expand", **DATA_MOVEMENT)
def expand(ctx, node, R_out):
    """Broadcast: each input element gets the sum of its copies' relevance (a ReduceSum over the broadcast axes).
    Where a symbolic input dim may or may not be broadcast (grouped-query attention with a dynamic sequence length),
    the axes are read off the shapes at run time."""
    x, y = node.inputs[0], node.outputs[0]
    if x.shape is not None and y.shape is not None and len(x.shape) <= len(y.shape) and \
            any(not isinstance(d, (int, np.integer)) for d in [*x.shape[1:], *y.shape[1:]]):
        lead = len(y.shape) - len(x.shape)
        if all(isinstance(d, (int, np.integer)) or d == e for d, e in zip(x.shape, y.shape[lead:])):
            return [unbroadcast(ctx.b, R_out[0], x, y), None]  # (each axis known to be broadcast or not)
        return [_unbroadcast_at_run_time(ctx.b, R_out[0], x, lead), None]
    static_dims(x, node, "input shape")
    static_dims(y, node, "output shape")
    return [unbroadcast(ctx.b, R_out[0], x, y), None]


@register("Tile", **DATA_MOVEMENT)
def tile(ctx, node, R_out):
    """Copies of the whole tensor along each axis (constant repeats): each element gets the sum of its copies'
    relevance (the relevance as [r0, d0, r1, d1, ...], summed over the repeat axes; dims read at run time where the
    shapes leave them open)."""
    x, reps = node.inputs
    if not is_const(reps):
        raise UnsupportedError(f"{where(node)}: Tile with computed repeats has no LRP rule")
    r = [int(v) for v in const_value(reps).reshape(-1)]
    b = ctx.b
    if x.shape is not None and all(isinstance(d, (int, np.integer)) for d in x.shape):
        shape = b.ints([v for pair in zip(r, x.shape) for v in pair])
    else:
        whole = b.shape_of(x)
        shape = b.op("Concat", [t for i, k in enumerate(r) for t in (
            b.ints([k]), b.op("Slice", [whole, b.ints([i]), b.ints([i + 1])], dtype=np.int64))], {"axis": 0},
            dtype=np.int64)
    return [b.reduce_sum(b.op("Reshape", [R_out[0], shape]), list(range(0, 2 * len(r), 2)), keepdims=0), None]


def _unbroadcast_at_run_time(b, r, x, lead: int):
    """``r`` summed over its ``lead`` leading axes and over the axes where ``x`` has size 1 and ``r`` not."""
    if lead:
        r = b.reduce_sum(r, list(range(lead)), keepdims=0)
    ones = b.ints([1])
    spread = b.op("And", [b.op("Equal", [b.shape_of(x), ones], dtype=np.bool_),
                          b.op("Not", [b.op("Equal", [b.shape_of(r), ones], dtype=np.bool_)], dtype=np.bool_)],
                  dtype=np.bool_)
    axes = b.op("Reshape", [b.op("NonZero", [spread], dtype=np.int64), b.ints([-1])], dtype=np.int64)
    return b.op("ReduceSum", [r, axes], {"keepdims": 1, "noop_with_empty_axes": 1})


@register("Gather", **DATA_MOVEMENT)
def gather(ctx, node, R_out):
    """Gather: each element of the data gets the relevance of every place it was copied to (ScatterElements with
    reduction add along the gathered axis, or zero padding where constant indices are one contiguous range;
    elements not gathered get none). Indices computed from inputs other than the explained ones (the last token of
    each sequence, found from the ids: a decoder's sequence classification) are read at run time."""
    x, idx = node.inputs
    if x.shape is None:
        raise UnsupportedError(f"{where(node)}: Gather from a tensor of unknown rank")
    if not is_const(idx):
        return [_scattered_at(ctx, node, x, idx, R_out[0]), None]
    dims, rank = list(x.shape), len(x.shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    ind = const_value(idx).astype(np.int64).reshape(-1)
    b = ctx.b
    if isinstance(dims[axis], (int, np.integer)):
        length = int(dims[axis])
        ind = np.where(ind < 0, ind + length, ind)
    else:  # a dynamic axis (an encoder's [CLS] pooling, hidden[:, 0], with a symbolic sequence length): its length
        # read at run time where a negative index or the padding after the gathered range needs it
        length = b.op("Slice", [b.shape_of(x), b.ints([axis]), b.ints([axis + 1])], dtype=np.int64)

    def plus(k: int):  # length + k, a number or a 1-element tensor
        return length + k if isinstance(length, int) else b.op("Add", [length, b.ints([k])], dtype=np.int64)

    # the output's index axes as one (the data's other dims: as known, else read at run time), then the indices
    # broadcast to the relevance's shape
    if all(isinstance(d, (int, np.integer)) for i, d in enumerate(dims) if i not in (0, axis)):
        shape = b.ints([0] * min(axis, 1) + [int(d) for d in dims[1:axis]] + [ind.size] +
                       [int(d) for d in dims[axis + 1:]])
    else:
        shape = _shape_with(b, x, axis, b.ints([ind.size]))
    r = b.op("Reshape", [R_out[0], shape])
    same_sign = ind.size and (np.all(ind >= 0) or np.all(ind < 0))
    if same_sign and np.array_equal(ind, np.arange(ind[0], ind[0] + ind.size)):
        # one contiguous range (q, k or v of a packed projection, the CLS token): zero padding around it, a copy
        # (onnxruntime's CPU ScatterElements is element by element: ~50x slower on ViT-B's attention)
        pads: list = [0] * (2 * rank)
        pads[axis] = int(ind[0]) if ind[0] >= 0 else plus(int(ind[0]))
        pads[rank + axis] = plus(-int(ind[-1]) - 1) if ind[-1] >= 0 else -int(ind[-1]) - 1
        if all(isinstance(v, int) for v in pads):
            padded = b.op("Pad", [r, b.ints(pads)])
            if isinstance(length, int):
                padded.shape = list(x.shape)  # (lets Builder.sum join the pieces of one axis by a Concat)
            return [padded, None]
        pads = b.op("Concat", [b.ints([v]) if isinstance(v, int) else v for v in pads], {"axis": 0}, dtype=np.int64)
        return [b.op("Pad", [r, pads]), None]
    at = b.const(ind.reshape([1] * axis + [-1] + [1] * (rank - axis - 1)), np.int64)
    if np.any(ind < 0):  # (a run-time length: static ones were added above)
        at = b.op("Add", [at, b.op("Mul", [b.const((ind < 0).astype(np.int64).reshape(at.shape), np.int64), length],
                                   dtype=np.int64)], dtype=np.int64)
    at = b.op("Expand", [at, b.shape_of(r)], dtype=np.int64)
    scattered = b.op("ScatterElements", [b.zeros_like(x), at, r], {"axis": axis, "reduction": "add"})
    return [scattered, None]


def _scattered_at(ctx, node, x, idx, R):
    """The relevance ``R`` of ``Gather(x, idx)`` with ``idx`` computed at run time (no function of the explained
    input: :func:`_run_time_indices`), added into zeros shaped like ``x`` at the indices (negative ones count from
    the end, as in Gather)."""
    b, rank = ctx.b, len(x.shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    count = b.op("Reshape", [b.op("Size", [idx], dtype=np.int64), b.ints([1])], dtype=np.int64)
    r = b.op("Reshape", [R, _shape_with(b, x, axis, count)])
    at = b.op("Reshape", [_run_time_indices(ctx, node, idx), b.ints([1] * axis + [-1] + [1] * (rank - axis - 1))],
              dtype=np.int64)
    return b.op("ScatterElements", [b.zeros_like(x), b.op("Expand", [at, b.shape_of(r)], dtype=np.int64), r],
                {"axis": axis, "reduction": "add"})


def _shape_with(b, x, axis: int, size):
    """``x``'s shape read at run time, with ``size`` (a 1-element tensor) in place of its ``axis``."""
    whole, rank = b.shape_of(x), len(x.shape)
    return b.op("Concat", [b.op("Slice", [whole, b.ints([0]), b.ints([axis])], dtype=np.int64), size,
                           b.op("Slice", [whole, b.ints([axis + 1]), b.ints([rank])], dtype=np.int64)],
                {"axis": 0}, dtype=np.int64)


def _run_time_indices(ctx, node, idx):
    """``idx`` as int64, refused where it depends on the explained input (relevance would then pick its own path)."""
    if idx.name in ctx.live:
        raise UnsupportedError(f"{where(node)}: {node.op} with indices computed from the explained input has no LRP "
                               f"rule (indices from other inputs, as token ids, are read at run time)")
    return idx if np.dtype(idx.dtype) == np.int64 else ctx.b.op("Cast", [idx], {"to": 7}, dtype=np.int64)


@register("GatherElements", **DATA_MOVEMENT)
def gather_elements(ctx, node, R_out):
    """GatherElements (DeBERTa's relative-position scores picked per query and key): each element gets the
    relevance of every place it was copied to (ScatterElements with reduction add); computed indices as in
    Gather."""
    x, idx = node.inputs
    b = ctx.b
    at = b.const(const_value(idx).astype(np.int64), np.int64) if is_const(idx) else _run_time_indices(ctx, node, idx)
    return [b.op("ScatterElements", [b.zeros_like(x), at, R_out[0]],
                 {"axis": int(node.attrs.get("axis", 0)), "reduction": "add"}), None]


@register("GatherND", **DATA_MOVEMENT)
def gather_nd(ctx, node, R_out):
    """GatherND (dynamo's advanced indexing ``x[:, [2, 0, 2]]``, or ``x[arange(B), last]`` with indices computed
    from the ids): each element or slice of the data gets the relevance of every copy (ScatterND with reduction
    add); computed indices as in Gather."""
    x, idx = node.inputs
    if int(node.attrs.get("batch_dims", 0)):
        raise UnsupportedError(f"{where(node)}: GatherND with batch_dims is not supported")
    if not is_const(idx):
        k = idx.shape[-1] if idx.shape else None
        if not isinstance(k, (int, np.integer)):
            raise UnsupportedError(f"{where(node)}: GatherND with computed indices of unknown depth")
        b = ctx.b
        at = _run_time_indices(ctx, node, idx)
        sizes = b.op("Slice", [b.shape_of(x), b.ints([0]), b.ints([int(k)])], dtype=np.int64)
        at = b.op("Where", [b.op("Less", [at, b.ints(0)], dtype=bool), b.op("Add", [at, sizes], dtype=np.int64), at],
                  dtype=np.int64)  # (negative indices count from the end)
        return [b.op("ScatterND", [b.zeros_like(x), at, R_out[0]], {"reduction": "add"}), None]
    dims = static_dims(x, node, "input shape")
    ind = const_value(idx).astype(np.int64)
    k = ind.shape[-1]
    if any(not isinstance(d, int) for d in dims[:k]):
        raise UnsupportedError(f"{where(node)}: GatherND along a dynamic axis")
    ind = np.where(ind < 0, ind + np.asarray(dims[:k], np.int64), ind)
    b = ctx.b
    return [b.op("ScatterND", [b.zeros_like(x), b.const(ind, np.int64), R_out[0]], {"reduction": "add"}), None]


@register("Concat", **DATA_MOVEMENT)
def concat(ctx, node, R_out):
    """Each input gets its part of the relevance (sizes along the axis read at run time where the shapes leave them
    open: a ViT's class token concatenated on a dynamic batch)."""
    b, y = ctx.b, node.outputs[0]
    shape = y.shape if y.shape is not None else next((x.shape for x in node.inputs if x.shape is not None), None)
    if shape is None:
        raise UnsupportedError(f"{where(node)}: Concat of tensors of unknown rank")
    axis = int(node.attrs["axis"]) % len(shape)
    known = [x.shape[axis] if x.shape is not None else None for x in node.inputs]
    if all(isinstance(d, (int, np.integer)) for d in known):
        sizes = b.ints([int(d) for d in known])
    else:
        sizes = b.op("Concat", [b.op("Slice", [b.shape_of(x), b.ints([axis]), b.ints([axis + 1])], dtype=np.int64)
                                for x in node.inputs], {"axis": 0}, dtype=np.int64)
    parts = b.op("Split", [R_out[0], sizes], {"axis": axis}, outputs=len(node.inputs))
    parts = parts if isinstance(parts, list) else [parts]
    fixed = [is_const(x) or x.name not in ctx.live for x in node.inputs]
    if ctx.audit and any(fixed):  # a constant part (a ViT's class token) keeps its relevance: a bias
        ctx.account(node, *(b.sum([b.reduce_sum(p, [axis]) for p, f in zip(parts, fixed) if f is side])
                            for side in (False, True)))
    return [None if f else p for f, p in zip(fixed, parts)]


@register("Split", **DATA_MOVEMENT)
def split(ctx, node, R_out):
    b = ctx.b
    axis = int(node.attrs.get("axis", 0))
    pieces = [r if r is not None else b.zeros_like(t) for r, t in zip(R_out, node.outputs)]
    joined = pieces[0] if len(pieces) == 1 else b.op("Concat", pieces, {"axis": axis})
    return [joined] + [None] * (len(node.inputs) - 1)


@register("Slice", **DATA_MOVEMENT)
def slice_(ctx, node, R_out):
    x = node.inputs[0]
    if x.shape is None:
        static_dims(x, node)  # (raises: a rank is needed)
    dims = list(x.shape)  # (only the sliced axes need static sizes: RoPE's halves of a dynamic-length sequence)
    if not all(is_const(t) for t in node.inputs[1:] if t.name):
        raise UnsupportedError(f"{where(node)}: Slice with non-constant starts/ends")
    vals = [const_value(t).astype(np.int64).tolist() if t.name else None for t in node.inputs[1:]] + [None] * 3
    starts, ends, axes, steps = vals[:4]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if any(s < 1 for s in steps):
        raise UnsupportedError(f"{where(node)}: Slice with negative steps is not supported")
    b = ctx.b
    r = R_out[0]
    rank = len(dims)
    cur = list(node.outputs[0].shape) if node.outputs[0].shape is not None else list(dims)
    before, after = [0] * rank, [0] * rank
    for st, en, ax, step in zip(starts, ends, axes, steps):
        ax %= rank
        n = dims[ax]
        if not isinstance(n, (int, np.integer)):
            raise UnsupportedError(f"{where(node)}: Slice along the dynamic axis {ax}")
        n = int(n)
        st = min(max(st + n if st < 0 else st, 0), n)
        en = min(max(en + n if en < 0 else en, 0), n)
        m = len(range(st, en, step))
        if m == 0:
            return [b.zeros_like(x)] + [None] * (len(node.inputs) - 1)
        if step > 1:  # interleave s-1 zeros after each kept element: [.., m, ..] -> [.., (m-1)*s+1, ..]
            if any(not isinstance(d, (int, np.integer)) for d in cur[ax + 1:]):
                static_dims(node.outputs[0], node)  # (raises: the Reshape below needs them)
            r = interleave_zeros(b, r, ax, step, m, [int(d) for d in cur[ax + 1:]])
        cur[ax] = (m - 1) * step + 1  # (the relevance is padded to the input's size at the end)
        before[ax], after[ax] = st, n - st - ((m - 1) * step + 1)
    return [b.op("Pad", [r, b.ints(before + after)], {"mode": "constant"})] + [None] * (len(node.inputs) - 1)


@register("Pad", **DATA_MOVEMENT)
def pad(ctx, node, R_out):
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise UnsupportedError(f"{where(node)}: Pad mode '{mode}' is not supported (only constant)")
    if not is_const(node.inputs[1]):
        raise UnsupportedError(f"{where(node)}: Pad with non-constant pads")
    x = node.inputs[0]
    dims = static_dims(x, node)
    rank = len(dims)
    pads = const_value(node.inputs[1]).astype(np.int64).tolist()
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [int(a) % rank for a in const_value(node.inputs[3]).tolist()]
    k = len(axes)
    if any(p < 0 for p in pads):
        raise UnsupportedError(f"{where(node)}: Pad with negative pads is not supported")
    b = ctx.b
    # only the padded axes: exporters list every axis, the (dynamic) batch one with 0 pads
    padded = [(i, a) for i, a in enumerate(axes) if pads[i] or pads[k + i]]
    if any(not isinstance(dims[a], int) for _, a in padded):
        raise UnsupportedError(f"{where(node)}: Pad along a dynamic axis")
    if not padded:
        return [R_out[0]] + [None] * (len(node.inputs) - 1)
    starts = [pads[i] for i, _ in padded]
    ends = [pads[i] + dims[a] for i, a in padded]
    sliced = b.op("Slice", [R_out[0], b.ints(starts), b.ints(ends), b.ints([a for _, a in padded])])
    return [sliced] + [None] * (len(node.inputs) - 1)


@register("Where", **DATA_MOVEMENT)
def where_(ctx, node, R_out):
    """``Where(c, x, y)`` with a condition that is no function of the explained input (a mask): each branch gets the
    relevance of the elements it was chosen for (a masked fill's constant keeps the rest). A condition computed from
    the explained input makes an activation (passes/activation_regions.py) or is refused here."""
    c, x, y = node.inputs
    if c.name in ctx.live:
        raise UnsupportedError(f"{where(node)}: Where with a condition computed from the explained input is no single "
                               "activation here and has no LRP rule")
    b, z, R = ctx.b, node.outputs[0], R_out[0]
    shares = [None]
    for t, args in ((x, [c, R, b.const(0.0)]), (y, [c, b.const(0.0), R])):
        shares.append(unbroadcast(b, b.op("Where", args), t, z) if t.name in ctx.live else None)
    return shares

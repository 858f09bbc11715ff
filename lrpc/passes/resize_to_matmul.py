"""Resize -> a chain of MatMuls with constant interpolation matrices, one per resized spatial axis.

Nearest (any nearest_mode), linear and cubic Resize with any coordinate_transformation_mode are separable:
along each spatial axis the output is ``A @ x`` for a constant matrix ``A`` [out, in]. The last axis becomes
``MatMul(x, Aᵀ)``; any other axis is swapped to the end with a Transpose first (consecutive swaps are
composed, and one Transpose at the end restores the layout). Each ``A`` is measured by running the
ORIGINAL Resize (same attributes, only that axis resized) in onnxruntime on the identity basis, so the
matrices follow onnxruntime's semantics exactly; the whole chain is then checked against the original
Resize on a random input (a non-separable case, e.g. an extrapolation value, is refused).

The MatMuls keep ``Resize`` in ``canon.origin`` (category ``resize``: norm rule in every composite).
Needs constant scales/sizes (and roi for tf_crop_and_resize), static spatial input dims, and N and C
not resized."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..errors import UnsupportedError, where
from ..graph import IR_FOR_OPSET, Canonical, const_value, is_const, static_dims, toposort

ORIGIN = "Resize"
_PROBE_ATTRS_DROPPED = ("axes", "keep_aspect_ratio_policy")  # the probes give full-rank scales/sizes

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "Resize":
            try:  # (refused before the node is changed)
                _convert(canon, node)
                changed = True
            except UnsupportedError as e:
                canon.refuse(node, e)
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False)
        toposort(graph)
    return changed


def _attr(node, key, default):
    v = node.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _optional(node, i):
    """Input ``i`` if given (an empty name or an empty constant counts as absent)."""
    if len(node.inputs) <= i or not node.inputs[i].name:
        return None
    t = node.inputs[i]
    if is_const(t) and const_value(t).size == 0:
        return None
    return t


def _sizes_value(node, t, x, rank) -> list:
    """The Resize sizes as a list of ints, None where an entry is the input's own dim (``Concat`` of
    constants and ``Slice(Shape(x))`` / ``Shape(x, start, end)`` pieces, as torch exports
    ``interpolate(size=...)`` with a dynamic batch); anything else is refused."""
    if is_const(t):
        return [int(v) for v in const_value(t).astype(np.int64).reshape(-1)]
    parts = t.inputs[0].inputs if t.inputs and t.inputs[0].op == "Concat" else [t]
    out = []
    for p in parts:
        if is_const(p):
            out += [int(v) for v in const_value(p).astype(np.int64).reshape(-1)]
            continue
        idx = _shape_slice(p, x, rank)
        if idx is None or any(i != len(out) + k for k, i in enumerate(idx)):
            raise UnsupportedError(f"{where(node)}: Resize sizes '{t.name}' is not a constant (nor the input's own "
                                   "N, C followed by constants); export with static shapes / a fixed size")
        out += [None] * len(idx)
    return out


def _shape_slice(t, x, rank):
    """The dims of ``x`` that ``t`` holds, if ``t`` is ``Shape(x)`` (optionally sliced), else None."""
    prod = t.inputs[0] if t.inputs else None
    if prod is None:
        return None
    if prod.op == "Shape":
        if prod.inputs[0] is not x:
            return None
        start, end = int(prod.attrs.get("start", 0)), prod.attrs.get("end")
        return list(range(rank))[slice(start, None if end is None else int(end))]
    if prod.op != "Slice" or not all(is_const(v) for v in prod.inputs[1:] if v.name):
        return None
    dims = _shape_slice(prod.inputs[0], x, rank)
    if dims is None:
        return None
    vals = ([const_value(v).astype(np.int64).reshape(-1).tolist() if v.name else None for v in prod.inputs[1:]]
            + [None] * 3)
    starts, ends, axes, steps = vals[:4]
    if len(starts) != 1 or (axes is not None and axes[0] not in (0, -1)) or (steps is not None and steps[0] != 1):
        return None
    return dims[slice(starts[0], ends[0])]


def _convert(canon: Canonical, node) -> None:
    x = node.inputs[0]
    if x.shape is None:
        raise UnsupportedError(f"{where(node)}: the rank of the Resize input '{x.name}' is unknown; "
                               "give the model static shapes")
    rank = len(x.shape)
    if rank < 3:
        raise UnsupportedError(f"{where(node)}: Resize of a rank-{rank} tensor; "
                               "only [N, C, *spatial] inputs are supported")
    dims = static_dims(x, node, "input shape")  # N may be symbolic, everything else static
    spatial = dims[2:]
    mode = _attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise UnsupportedError(f"{where(node)}: Resize mode '{mode}' is not supported (nearest, linear, cubic)")
    ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
    axes = node.attrs.get("axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]

    roi_t, scales_t, sizes_t = _optional(node, 1), _optional(node, 2), _optional(node, 3)
    if scales_t is not None and not is_const(scales_t):
        raise UnsupportedError(f"{where(node)}: Resize scales '{scales_t.name}' is not a constant; "
                               "export with a fixed scale factor")
    given_sizes = _sizes_value(node, sizes_t, x, rank) if scales_t is None and sizes_t is not None else None
    if scales_t is None and sizes_t is None:
        raise UnsupportedError(f"{where(node)}: Resize has neither scales nor sizes")
    roi = None
    if ctm == "tf_crop_and_resize":
        if roi_t is None or not is_const(roi_t):
            raise UnsupportedError(f"{where(node)}: tf_crop_and_resize needs a constant roi")
        given = const_value(roi_t).astype(np.float64).reshape(-1)
        if given.size != 2 * len(axes):
            raise UnsupportedError(f"{where(node)}: roi has {given.size} values for {len(axes)} axes")
        roi = np.concatenate([np.zeros(rank), np.ones(rank)])
        for j, a in enumerate(axes):
            roi[a], roi[rank + a] = given[j], given[len(axes) + j]

    # per-axis scale (for the coordinate transform) and output size, as onnxruntime computes them
    if scales_t is not None:
        given = const_value(scales_t).astype(np.float32).reshape(-1)
        if given.size != len(axes):
            raise UnsupportedError(f"{where(node)}: Resize has {given.size} scales for {len(axes)} axes")
        scales = np.ones(rank, np.float32)
        scales[axes] = given
        for a, what in ((0, "batch"), (1, "channel")):
            if scales[a] != 1.0:
                raise UnsupportedError(f"{where(node)}: Resize scales the {what} axis (scale {scales[a]}); "
                                       "only spatial axes can be resized")
        sizes = None
    else:
        given = given_sizes
        if len(given) != len(axes):
            raise UnsupportedError(f"{where(node)}: Resize has {len(given)} sizes for {len(axes)} axes")
        sizes = list(dims)
        for j, a in enumerate(axes):
            if given[j] is None:  # taken from the input's own shape: that axis keeps its size
                given[j] = dims[a]
                continue
            if a == 0 and not isinstance(dims[0], (int, np.integer)):
                raise UnsupportedError(f"{where(node)}: Resize sizes fix the batch axis to {given[j]} but the batch "
                                       f"dim is dynamic ({dims[0]}); only spatial axes can be resized")
            if a < 2 and int(given[j]) != int(dims[a]):
                what = "batch" if a == 0 else "channel"
                raise UnsupportedError(f"{where(node)}: Resize changes the {what} axis ({dims[a]} -> {given[j]}); "
                                       "only spatial axes can be resized")
            sizes[a] = int(given[j])
        policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
        scales = None
        if policy != "stretch":  # one scale for every listed axis, sizes rounded from it (onnxruntime, spec)
            ratios = [np.float32(1) if sizes[a] == dims[a] else np.float32(sizes[a]) / np.float32(dims[a])
                      for a in axes]
            s = (min if policy == "not_larger" else max)(ratios)
            for a in axes:
                if not isinstance(dims[a], (int, np.integer)):  # a dynamic batch
                    if s != 1:
                        raise UnsupportedError(f"{where(node)}: Resize ({policy}) scales the dynamic batch axis by {s}")
                    continue
                sizes[a] = int(np.floor(np.float32(dims[a]) * s + np.float32(0.5)))
            for a, what in ((0, "batch"), (1, "channel")):
                if a in axes and sizes[a] != dims[a]:
                    raise UnsupportedError(f"{where(node)}: Resize ({policy}) changes the {what} axis "
                                           f"({dims[a]} -> {sizes[a]}); only spatial axes can be resized")
            # the coordinate transform uses s itself: probe with scales (their sizes are floor(in * s))
            if any(int(np.floor(np.float32(dims[a]) * s)) != sizes[a] for a in axes if a >= 2):
                raise UnsupportedError(f"{where(node)}: Resize keep_aspect_ratio_policy={policy} rounds a size up "
                                       f"(scale {float(s):g}); this case is not supported")
            scales = np.ones(rank, np.float32)
            for a in axes:
                if a >= 2:
                    scales[a] = s
            sizes = None

    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    if scales_t is not None:
        check = (const_value(scales_t).astype(np.float32).reshape(-1), None)
    else:  # the original sizes with N = C = 1 (entries taken from the input's shape are filled in above)
        check = (None, np.array([1 if a < 2 else int(v) for a, v in zip(axes, given)], np.int64))
    mats = _matrices(canon, node, rank, spatial, scales, sizes, roi, check)
    resized = [a for a in range(2, rank) if not (mats[a].shape[0] == mats[a].shape[1]
                                                 and np.array_equal(mats[a], np.eye(mats[a].shape[0])))]
    # cheapest first: shrinking axes before growing ones; the last axis first on ties (no Transpose)
    order = sorted(resized, key=lambda a: (mats[a].shape[0] / mats[a].shape[1], -a))
    _build_chain(canon, node, x, rank, order, mats, dtype)


def _matrices(canon, node, rank, spatial, scales, sizes, roi, check) -> dict:
    """``{axis: A [out, in]}`` measured in onnxruntime, verified against the full original Resize."""
    import onnxruntime as ort

    opset = canon.opset
    attrs = {k: v for k, v in node.attrs.items() if k not in _PROBE_ATTRS_DROPPED}
    inits, nodes, inputs, outputs, feeds = [], [], [], [], {}

    def resize(name, shape, scl, siz, rois, node_attrs):
        ins = [f"{name}_x", "", "", ""]
        if rois is not None:
            inits.append(onnx.numpy_helper.from_array(np.asarray(rois, np.float32), f"{name}_roi"))
            ins[1] = f"{name}_roi"
        if scl is not None:
            inits.append(onnx.numpy_helper.from_array(np.asarray(scl, np.float32), f"{name}_scales"))
            ins[2] = f"{name}_scales"
        else:
            inits.append(onnx.numpy_helper.from_array(np.asarray(siz, np.int64), f"{name}_sizes"))
            ins[3] = f"{name}_sizes"
        while ins[-1] == "":
            ins.pop()
        nodes.append(helper.make_node("Resize", ins, [f"{name}_y"], name=name, **node_attrs))
        inputs.append(helper.make_tensor_value_info(f"{name}_x", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None))

    for a in range(2, rank):  # probe: the identity basis along the batch axis, only axis ``a`` resized
        n = spatial[a - 2]
        shape = [n] + [1] * (rank - 1)
        shape[a] = n
        basis = np.zeros(shape, np.float32)
        idx = [np.arange(n), 0] + [0] * (rank - 2)
        idx[a] = np.arange(n)
        basis[tuple(idx)] = 1.0
        feeds[f"probe{a}_x"] = basis
        scl = siz = rois = None
        if scales is not None:
            scl = np.ones(rank, np.float32)
            scl[a] = scales[a]
        else:
            siz = list(shape)
            siz[a] = sizes[a]
        if roi is not None:
            rois = np.concatenate([np.zeros(rank), np.ones(rank)])
            rois[a], rois[rank + a] = roi[a], roi[rank + a]
        resize(f"probe{a}", shape, scl, siz, rois, attrs)

    # the original Resize (all its attributes) on one random sample with N = C = 1
    full = [1, 1, *spatial]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(full).astype(np.float32)
    feeds["check_x"] = sample
    rois = const_value(node.inputs[1]) if roi is not None else None
    resize("check", full, check[0], check[1], rois, dict(node.attrs))

    graph = helper.make_graph(nodes, "resize_probe", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET.get(opset, onnx.IR_VERSION)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = dict(zip([o.name for o in outputs], sess.run(None, feeds)))
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise UnsupportedError(f"{where(node)}: onnxruntime cannot run this Resize as separate axes "
                               f"(mode={_attr(node, 'mode', 'nearest')}): {msg[-1] if msg else e}") from None

    mats = {}
    for a in range(2, rank):
        y = np.moveaxis(results[f"probe{a}_y"], a, -1)  # [in, 1, ..., out]
        mats[a] = y.reshape(y.shape[0], y.shape[-1]).T.astype(np.float64)
    got = sample.astype(np.float64)
    for a in range(2, rank):
        got = np.moveaxis(np.moveaxis(got, a, -1) @ mats[a].T, -1, a)
    want = results["check_y"].astype(np.float64)
    if got.shape != want.shape:
        raise UnsupportedError(f"{where(node)}: Resize output shape {list(want.shape[2:])} cannot be reproduced "
                               f"axis by axis (got {list(got.shape[2:])})")
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if err > 1e-5 * max(1.0, float(np.max(np.abs(sample)))):
        raise UnsupportedError(f"{where(node)}: this Resize (mode={_attr(node, 'mode', 'nearest')}, "
                               "coordinate_transformation_mode="
                               f"{_attr(node, 'coordinate_transformation_mode', 'half_pixel')}) "
                               f"is not separable into per-axis interpolation matrices (deviation {err:.2e})")
    return mats


def _build_chain(canon, node, x, rank, order, mats, dtype) -> None:
    graph = canon.graph
    out = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    cur = list(range(rank))  # cur[p] = the original axis now at position p
    steps = []  # (op, attrs or weight, hint)
    for a in order:
        p = cur.index(a)
        if p != rank - 1:
            perm = list(range(rank))
            perm[p], perm[-1] = perm[-1], perm[p]
            steps.append(("Transpose", perm, f"to_end_{a}"))
            cur = [cur[q] for q in perm]
        steps.append(("MatMul", mats[a], f"axis{a}"))
    if cur != list(range(rank)):
        steps.append(("Transpose", [cur.index(j) for j in range(rank)], "back"))
    if not steps:  # nothing is resized: an Identity keeps the output tensor
        steps.append(("Identity", None, "identity"))
    t = x
    for i, (op, arg, hint) in enumerate(steps):
        name = f"{node.name}/{hint}"
        res = out if i == len(steps) - 1 else gs.Variable(f"{name}_out", dtype=out.dtype)
        if op == "MatMul":
            w = gs.Constant(f"{name}/A", np.ascontiguousarray(arg.T.astype(dtype)))
            graph.nodes.append(gs.Node("MatMul", name, {}, [t, w], [res]))
            canon.origin[name] = ORIGIN
        elif op == "Transpose":
            graph.nodes.append(gs.Node("Transpose", name, {"perm": arg}, [t], [res]))
        else:
            graph.nodes.append(gs.Node("Identity", name, {}, [t], [res]))
        t = res

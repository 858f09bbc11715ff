"""AveragePool / GlobalAveragePool / spatial ReduceMean -> depthwise Conv (group=C, weights 1/k).

Each channel only sees itself, so no rule can leak relevance across channels. Borders where the pool
divides by fewer than k cells (count_include_pad=0 with pads, ceil_mode overhang) are exact: the Conv
is followed by a constant Mul with the per-position correction, measured by running the original pool
on a tensor of ones in onnxruntime. The Conv keeps its original op type in ``canon.origin`` (category
``avgpool``: norm rule in every composite)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import UnsupportedError, where
from ..graph import Canonical, const_value, insert_after, is_const, static_dims, toposort

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for node in list(graph.nodes):
        if (node.op in ("AveragePool", "GlobalAveragePool")
                or (node.op == "ReduceMean" and _spatial_mean(node, canon.opset))):
            try:  # (refused before the node is changed)
                _convert(canon, node)
                changed = True
            except UnsupportedError as e:
                canon.refuse(node, e)
    if changed:
        toposort(graph)
    return changed


def _spatial_mean(node, opset: int) -> bool:
    x = node.inputs[0]
    if x.shape is None or len(x.shape) < 3:
        return False
    rank = len(x.shape)
    axes = node.attrs.get("axes")
    if len(node.inputs) > 1 and node.inputs[1].name:
        if not is_const(node.inputs[1]):
            return False
        axes = const_value(node.inputs[1]).tolist()
    if axes is None:
        return False
    return sorted(a % rank for a in axes) == list(range(2, rank))


def _convert(canon: Canonical, node) -> None:
    graph = canon.graph
    x = node.inputs[0]
    dims = static_dims(x, node, "input shape")
    c, spatial = dims[1], dims[2:]
    nsp = len(spatial)
    a = node.attrs
    if node.op == "AveragePool":
        auto = a.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            raise UnsupportedError(f"{where(node)}: AveragePool auto_pad={auto} is not supported; "
                                   "export with explicit pads")
        k = list(a["kernel_shape"])
        s = list(a.get("strides", [1] * nsp))
        d = list(a.get("dilations", [1] * nsp))
        pads = list(a.get("pads", [0] * (2 * nsp))) if auto == "NOTSET" else [0] * (2 * nsp)
        pb, pe = pads[:nsp], pads[nsp:]
        if a.get("ceil_mode", 0):
            for i in range(nsp):
                kk = (k[i] - 1) * d[i] + 1
                span = spatial[i] + pb[i] + pe[i] - kk
                n_out = -(-span // s[i]) + 1
                if (n_out - 1) * s[i] >= spatial[i] + pb[i]:
                    n_out -= 1
                pe[i] += max((n_out - 1) * s[i] + kk - (spatial[i] + pb[i] + pe[i]), 0)
    else:
        k, s, d, pb, pe = spatial, [1] * nsp, [1] * nsp, [0] * nsp, [0] * nsp
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
    w = np.full([c, 1, *k], 1.0 / float(np.prod(k)), dtype=dtype)
    conv_attrs = {"kernel_shape": k, "strides": s, "dilations": d, "pads": pb + pe, "group": c}
    correction = _correction(node, spatial, conv_attrs, dtype) if node.op == "AveragePool" else None
    keepdims = node.op != "ReduceMean" or node.attrs.get("keepdims", 1)
    out = node.outputs[0]
    if node.op == "AveragePool" and out.shape is not None and len(out.shape) == 2 + nsp:
        # onnxruntime drops a ceil_mode window that starts past the input (ONNX shape inference keeps it):
        # a graph output keeps its declared shape through refresh_shapes, so give it the size the Conv makes
        out.shape = [*out.shape[:2], *[(spatial[i] + pb[i] + pe[i] - (k[i] - 1) * d[i] - 1) // s[i] + 1
                                       for i in range(nsp)]]
    canon.origin[node.name] = node.op
    node.op, node.attrs = "Conv", conv_attrs
    node.inputs = [x, gs.Constant(f"{node.name}/W", w), gs.Constant(f"{node.name}/B", np.zeros(c, dtype))]
    if correction is not None:
        insert_after(graph, node, "Mul", correction, hint="border")
    if not keepdims:
        insert_after(graph, node, "Flatten", None, {"axis": 1})


def _correction(pool, spatial, conv_attrs, dtype) -> np.ndarray | None:
    """K/divisor per output position (None where the pool divides by the full window everywhere)."""
    import onnxruntime as ort

    shape = [1, 1, *spatial]
    k = conv_attrs["kernel_shape"]
    attrs = {kk: v for kk, v in pool.attrs.items()}
    nodes = [helper.make_node("AveragePool", ["x"], ["pool"], **attrs),
             helper.make_node("Conv", ["x", "w"], ["conv"], **{**conv_attrs, "group": 1})]
    w = onnx.numpy_helper.from_array(np.full([1, 1, *k], 1.0 / float(np.prod(k)), np.float32), "w")
    g = helper.make_graph(nodes, "divisor", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("pool", "conv")],
                          [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pool_out, conv_out = sess.run(None, {"x": np.ones(shape, np.float32)})
    if pool_out.shape != conv_out.shape:
        raise UnsupportedError(f"{where(pool)}: cannot express this AveragePool as a Conv "
                               f"(shapes {pool_out.shape} vs {conv_out.shape})")
    big_k = float(np.prod(k))
    valid = np.rint(conv_out.astype(np.float64) * big_k)  # cells inside the input per window
    with np.errstate(divide="ignore", invalid="ignore"):
        divisor = np.where(pool_out != 0, np.rint(valid / pool_out), big_k)
    ratio = big_k / divisor
    if np.allclose(ratio, 1.0, rtol=0, atol=1e-6):
        return None
    return ratio.astype(dtype)

"""Linear normal form: every linear layer becomes Conv / ConvTranspose with explicit pads and a bias
input, Gemm(X, W[out,in], b[out], transB=1, alpha=beta=1), or MatMul(X, W) with X of rank > 2; constant
Sub/Div become Add/Mul; per-channel constant Add/Mul after a linear layer fold into it. A MatMul of two computed
tensors (attention) stays as it is (relevance/attention.py); a MatMul whose constant comes first or has batch axes
becomes the Einsum it is; a layer that cannot take that form (a non-constant Gemm weight) stays as it is, refused
(see Canonical.refuse)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedError, where
from ..graph import (
    Canonical,
    add_bias,
    channel_vector,
    const_value,
    is_const,
    is_layer,
    only_consumer,
    out_channels,
    rewire_output,
    scale_out_channels,
    toposort,
)

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for node in list(graph.nodes):
        try:  # (each refusal is raised before its node is changed, or after changes that keep what it computes)
            if node.op in ("Sub", "Div"):
                changed |= _sub_div(node)
            elif node.op == "Gemm":
                changed |= _gemm(graph, node)
            elif node.op == "MatMul":
                changed |= _matmul(canon, node)
            elif node.op in ("Conv", "ConvTranspose"):
                changed |= _conv_attrs(node)
                changed |= node.op == "Conv" and is_layer(canon, node) and _fold_pad(graph, node)
        except UnsupportedError as e:
            canon.refuse(node, e)
    again = True
    while again:  # fold chains like Conv -> Mul -> Add
        again = False
        for node in list(graph.nodes):
            if node.op in ("Conv", "ConvTranspose", "Gemm") and node.outputs and is_layer(canon, node):
                again |= _fold_following(graph, node)
        changed |= again
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _sub_div(node) -> bool:
    a, b = node.inputs
    if not is_const(b) or is_const(a):
        return False
    v = const_value(b)
    if node.op == "Sub":
        node.op, new = "Add", -v
    else:
        if not np.issubdtype(v.dtype, np.floating):
            return False
        node.op, new = "Mul", (1.0 / v.astype(np.float64)).astype(v.dtype)
    node.inputs[1] = gs.Constant(f"{node.name}/c", np.ascontiguousarray(new).reshape(v.shape))  # (a scalar stays one)
    return True


def _gemm(graph, node) -> bool:
    a = node.inputs[0]
    w = node.inputs[1]
    attrs = node.attrs
    normal = (attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0
              and attrs.get("beta", 1.0) == 1.0 and len(node.inputs) == 3 and is_const(node.inputs[2])
              and const_value(node.inputs[2]).ndim == 1)
    if normal:
        return False
    if not is_const(w) or is_const(a):
        raise UnsupportedError(f"{where(node)}: Gemm needs a constant weight as second input B")
    # a weight already in the normal form (transB, alpha 1) stays the very constant (not read: a weight read
    # without its data is then written as the file's bytes)
    as_is = attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0 and w.shape is not None and len(w.shape) == 2
    if as_is:
        n_out = int(w.shape[0])
    else:
        wv = const_value(w).astype(np.float64)
        if attrs.get("transB", 0) == 0:
            wv = wv.T
        wv = wv * float(attrs.get("alpha", 1.0))
        n_out = wv.shape[0]
    bias = np.zeros(n_out)
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not is_const(node.inputs[2]):
            raise UnsupportedError(f"{where(node)}: Gemm with a non-constant C")
        c = const_value(node.inputs[2]).astype(np.float64) * float(attrs.get("beta", 1.0))
        vec = channel_vector(c, 2, n_out, axis=1)
        if vec is None:
            raise UnsupportedError(f"{where(node)}: Gemm bias C of shape {c.shape} is not one value per output")
        bias = vec
    if attrs.get("transA", 0):
        t = gs.Variable(f"{node.name}/At", dtype=a.dtype)
        graph.nodes.append(gs.Node("Transpose", f"{node.name}/transA", {"perm": [1, 0]}, [a], [t]))
        node.inputs[0] = t
    dtype = np.dtype(w.dtype)
    weight = w if as_is else gs.Constant(f"{node.name}/W", np.ascontiguousarray(wv.astype(dtype)))
    node.inputs = [node.inputs[0], weight, gs.Constant(f"{node.name}/B", bias.astype(dtype))]
    node.attrs = {"transB": 1}
    return True


def _matmul(canon, node) -> bool:
    x, w = node.inputs
    if (is_const(x) and not is_const(w)) or (is_const(w) and not is_const(x) and const_value(w).ndim != 2):
        return _matmul_as_einsum(canon, node)  # (a constant first, or with batch axes)
    if not is_const(w):
        return False  # a product of two computed tensors (attention): relevance/attention.py
    if x.shape is None or len(x.shape) < 2:
        return False
    if len(x.shape) > 2:
        return _matmul_nd(canon, node)
    wv = const_value(w)
    canon.origin.setdefault(node.name, node.op)
    node.op = "Gemm"
    node.attrs = {"transB": 1}
    node.inputs[1] = gs.Constant(f"{node.name}/W", np.ascontiguousarray(wv.T))
    node.inputs.append(gs.Constant(f"{node.name}/B", np.zeros(wv.shape[1], wv.dtype)))
    return True


def _matmul_as_einsum(canon, node) -> bool:
    """A MatMul whose constant is its first operand (a token-mixing matrix times the tokens) or has batch axes
    (DeBERTa's disentangled attention: the relative positions' keys and queries, folded to constants, times the
    queries and keys): the same product as an Einsum with one letter per axis (``xy,byz->bxz``, ``axy,ayz->axz``),
    which the Einsum rule explains. A constant's batch axes must be the computed operand's (a broadcast between
    them is refused); a constant without any is broadcast over them."""
    a, b = node.inputs
    const, x = (a, b) if is_const(a) else (b, a)
    if x.shape is None or len(x.shape) < 2 or len(const.shape) < 2:
        raise UnsupportedError(f"{where(node)}: MatMul of a constant needs a computed operand of known rank >= 2 and "
                               "a constant of rank >= 2")
    if const is a and len(x.shape) == 2:
        raise UnsupportedError(f"{where(node)}: MatMul with a constant first operand and a 2-d computed one (it would "
                               "mix the samples)")
    batch_c, batch_x = list(const.shape[:-2]), list(x.shape[:-2])
    if batch_c and batch_c != batch_x:
        raise UnsupportedError(f"{where(node)}: MatMul of a constant with batch axes {batch_c} and a computed operand "
                               f"with batch axes {batch_x} (a broadcast between them has no LRP rule)")
    batch = "".join(chr(ord("a") + i) for i in range(len(batch_x)))
    terms = [f"{batch if batch_c or t is x else ''}{ij}" for t, ij in ((a, "xy"), (b, "yz"))]
    canon.origin.setdefault(node.name, node.op)
    node.op = "Einsum"
    node.attrs = {"equation": f"{terms[0]},{terms[1]}->{batch}xz"}
    return True


def _matmul_nd(canon, node) -> bool:
    """MatMul of x [N, ..., in] (non-batch dims static) with W [in, out] followed by a bias Add on the last
    axis: Reshape to [-1, in] -> Gemm -> Reshape back, so the bias is part of the layer's rule. (z-box bounds
    of such a first layer then refer to the flattened [N*..., in] input.)"""
    graph = canon.graph
    x, w = node.inputs
    middle = x.shape[1:-1]
    if any(not isinstance(d, (int, np.integer)) for d in middle):
        return False  # stays MatMul: its propagator handles it, without a bias
    wv = const_value(w)
    n_in, n_out = wv.shape
    nxt = only_consumer(graph, node.outputs[0])
    if nxt is None or nxt.op != "Add":
        return False  # no bias: MatMul stays (its propagator is exact without one)
    other = [t for t in nxt.inputs if t is not node.outputs[0]]
    bias = channel_vector(const_value(other[0]), len(x.shape), n_out, axis=len(x.shape) - 1) \
        if len(other) == 1 and is_const(other[0]) else None
    if bias is None:
        return False
    out = nxt.outputs[0]
    nxt.outputs.clear()
    nxt.inputs.clear()
    flat = gs.Variable(f"{node.name}/flat", dtype=x.dtype)
    y2 = gs.Variable(f"{node.name}/gemm", dtype=x.dtype)
    graph.nodes.append(gs.Node("Reshape", f"{node.name}/to2d", {},
                               [x, gs.Constant(f"{node.name}/s2", np.array([-1, n_in], np.int64))], [flat]))
    graph.nodes.append(gs.Node("Reshape", f"{node.name}/back", {},
                               [y2, gs.Constant(f"{node.name}/sN", np.array([-1, *map(int, middle), n_out], np.int64))],
                               [out]))
    canon.origin.setdefault(node.name, node.op)
    node.op, node.attrs = "Gemm", {"transB": 1}
    node.inputs = [flat, gs.Constant(f"{node.name}/W", np.ascontiguousarray(wv.T)),
                   gs.Constant(f"{node.name}/B", bias.astype(wv.dtype))]
    node.outputs = [y2]
    toposort(graph)
    return True


def _conv_attrs(node) -> bool:
    """Explicit kernel_shape and pads (auto_pad / output_shape resolved from static shapes); a bias input."""
    changed = False
    w = node.inputs[1]
    if not is_const(w):
        raise UnsupportedError(f"{where(node)}: {node.op} weight is not a constant")
    shape = list(w.shape)  # graphsurgeon knows it without loading the values
    nsp = len(shape) - 2
    attrs = node.attrs
    if "kernel_shape" not in attrs:
        attrs["kernel_shape"] = shape[2:]
        changed = True
    for key in ("strides", "dilations"):
        attrs.setdefault(key, [1] * nsp)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto not in ("NOTSET", "VALID") or (node.op == "ConvTranspose" and "output_shape" in attrs):
        _explicit_pads(node, auto, nsp)
        changed = True
    elif auto == "VALID":
        attrs["pads"] = [0] * (2 * nsp)
    attrs.pop("auto_pad", None)
    attrs.setdefault("pads", [0] * (2 * nsp))
    if len(node.inputs) < 3 or not node.inputs[2].name:
        node.inputs = list(node.inputs)[:2] + [gs.Constant(f"{node.name}/B",
                                                           np.zeros(out_channels(node), np.dtype(w.dtype)))]
        changed = True
    elif not is_const(node.inputs[2]):
        raise UnsupportedError(f"{where(node)}: {node.op} bias is not a constant")
    return changed


def _fold_pad(graph, node) -> bool:
    """A zero constant Pad of the spatial axes feeding only this Conv becomes the Conv's own pads: the rules that
    look at the input (z-box bounds, flat) then leave padding out as for Conv pads, instead of giving pad cells
    relevance that the Pad's propagator drops (Keras ZeroPadding2D, nn.ZeroPad2d / F.pad before a Conv)."""
    pad = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if pad is None or pad.op != "Pad" or only_consumer(graph, node.inputs[0]) is not node:
        return False
    mode = pad.attrs.get("mode", "constant")
    ins = [t if t.name else None for t in pad.inputs] + [None] * 3
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or not is_const(ins[1]):
        return False
    if ins[2] is not None and (not is_const(ins[2]) or np.any(const_value(ins[2]) != 0)):
        return False
    if ins[3] is not None and not is_const(ins[3]):
        return False
    rank = const_value(node.inputs[1]).ndim
    given = const_value(ins[1]).astype(np.int64).reshape(-1)
    axes = range(rank) if ins[3] is None else [int(a) % rank for a in const_value(ins[3]).reshape(-1)]
    full = np.zeros(2 * rank, np.int64)
    for i, a in enumerate(axes):
        full[a], full[rank + a] = given[i], given[len(given) // 2 + i]
    if np.any(full < 0) or np.any(full[[0, 1, rank, rank + 1]]):  # crops, or padding of batch / channels
        return False
    nsp, own = rank - 2, node.attrs["pads"]
    node.attrs["pads"] = ([int(own[i] + full[2 + i]) for i in range(nsp)]
                          + [int(own[nsp + i] + full[rank + 2 + i]) for i in range(nsp)])
    node.inputs[0] = pad.inputs[0]
    return True


def _explicit_pads(node, auto: str, nsp: int) -> None:
    x, a = node.inputs[0], node.attrs
    k, s, d = a["kernel_shape"], a["strides"], a["dilations"]
    xs = x.shape
    if xs is None or any(not isinstance(v, (int, np.integer)) for v in xs[2:]):
        raise UnsupportedError(f"{where(node)}: auto_pad/output_shape needs static spatial input dims (got {xs})")
    pads_b, pads_e = [], []
    for i in range(nsp):
        n_in, kk = int(xs[2 + i]), (k[i] - 1) * d[i] + 1
        if node.op == "Conv":
            n_out = -(-n_in // s[i])
            total = max((n_out - 1) * s[i] + kk - n_in, 0)
        else:
            n_out = int(a["output_shape"][-nsp + i]) if "output_shape" in a else n_in * s[i]
            op = a.get("output_padding", [0] * nsp)[i]
            total = s[i] * (n_in - 1) + op + kk - n_out
            if total < 0:  # output_shape past the natural size: the extra cells are output padding (at the end)
                a["output_padding"] = [*a.get("output_padding", [0] * nsp)]
                a["output_padding"][i] = op - total
                total = 0
        small, big = total // 2, total - total // 2
        # the odd extra cell goes at the end only for SAME_UPPER (ConvTranspose with output_shape and
        # auto_pad NOTSET puts it at the start, as SAME_LOWER does: ONNX spec and onnxruntime)
        pads_b.append(small if auto == "SAME_UPPER" else big)
        pads_e.append(big if auto == "SAME_UPPER" else small)
    a["pads"] = pads_b + pads_e
    a.pop("output_shape", None)


def _fold_following(graph, node) -> bool:
    """Fold a per-channel constant Mul/Add that alone consumes ``node``'s output."""
    nxt = only_consumer(graph, node.outputs[0])
    if nxt is None or nxt.op not in ("Mul", "Add"):
        return False
    others = [t for t in nxt.inputs if t is not node.outputs[0]]
    if len(others) != 1 or not is_const(others[0]):
        return False
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else (2 if node.op == "Gemm" else None)
    if rank is None:
        return False
    vec = channel_vector(const_value(others[0]), rank, out_channels(node), axis=1)
    if vec is None:
        return False
    if nxt.op == "Mul":
        scale_out_channels(node, vec)
    else:
        add_bias(node, vec)
    rewire_output(graph, nxt, node)
    return True

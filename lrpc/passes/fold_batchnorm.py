"""Fold BatchNormalization into the Conv / ConvTranspose / Gemm right before it (exact for any eps), or into a
MatMul/Gemm behind Reshapes/Flattens that keep its feature axis as the BN's channels (LeViT's
``bn(linear(x).flatten(0, 1)).reshape_as(x)``: BatchNorm1d over [B·N, C]).

Guards (a BN that fails one stays and gets the composite's ``scale`` rule, pass by default):
the producer is a linear layer in normal form (not a pool lowered to a Conv), its output feeds only
this BN (or the reshapes, each read only by the next), all BN parameters are constants, and the BN is in
inference mode (one output)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InputError, where
from ..graph import (
    Canonical,
    add_bias,
    bypass,
    const_value,
    is_const,
    is_layer,
    only_consumer,
    producer,
    rewire_output,
    scale_out_channels,
)

CHANGES_SHAPES = False


def run(canon: Canonical) -> bool:
    graph = canon.graph
    changed = False
    for bn in list(graph.nodes):
        if bn.op == "BatchNormalization" and _foldable(canon, bn):
            lin = producer(bn.inputs[0])
            scale, shift = bn_affine(bn)
            scale_out_channels(lin, scale)
            add_bias(lin, shift)
            rewire_output(graph, bn, lin)
            changed = True
        elif bn.op == "BatchNormalization" and _inference(bn) and bn.outputs[0] not in graph.outputs:
            lin = _behind_reshapes(canon, bn)
            if lin is not None:
                _fold_behind(graph, bn, lin)
                changed = True
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


def _behind_reshapes(canon, bn):
    """The MatMul (constant [in, C] weight) or Gemm whose output reaches ``bn`` through Reshapes/Flattens only, each
    tensor read by the next node alone, where the BN's input is [M, C] and every tensor on the way ends in the same
    C (the reshapes merge or split leading axes only), else None."""
    x = bn.inputs[0]
    if x.shape is None or len(x.shape) != 2 or not isinstance(x.shape[1], (int, np.integer)):
        return None
    channels, t, hops = int(x.shape[1]), x, 0
    while True:
        node = producer(t)
        if node is None or only_consumer(canon.graph, t) is None or t.shape is None or not t.shape:
            return None
        if t.shape[-1] != channels:
            return None
        if node.op in ("Reshape", "Flatten") and hops < 4:
            t, hops = node.inputs[0], hops + 1
            continue
        if hops == 0 or not is_layer(canon, node) or not all(is_const(w) for w in node.inputs[1:]):
            return None
        if node.op == "MatMul" and const_value(node.inputs[1]).ndim == 2:
            return node
        if node.op == "Gemm" and node.attrs.get("transB", 0) == 1:
            return node
        return None


def _fold_behind(graph, bn, lin) -> None:
    """BN's scale into ``lin``'s output columns, its shift as ``lin``'s bias (a MatMul's: an Add after it, which
    linear_normal_form folds with it); the BN then drops out (the reshapes carry the layer's output)."""
    scale, shift = bn_affine(bn)
    if lin.op == "Gemm":
        scale_out_channels(lin, scale)
        add_bias(lin, shift)
    else:
        w = const_value(lin.inputs[1])
        lin.inputs[1] = gs.Constant(f"{lin.name}/W_bn", (w.astype(np.float64) * scale).astype(w.dtype))
        out = lin.outputs[0]
        biased = gs.Variable(f"{lin.name}/unbiased", dtype=out.dtype, shape=out.shape)
        lin.outputs = [biased]
        graph.nodes.append(gs.Node("Add", f"{lin.name}/bn_shift", inputs=[
            biased, gs.Constant(f"{lin.name}/B_bn", shift.astype(w.dtype))], outputs=[out]))
    bypass(graph, bn)


def _inference(bn) -> bool:
    return (len(bn.outputs) == 1 and not bn.attrs.get("training_mode", 0)
            and all(is_const(t) for t in bn.inputs[1:5]))


def bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """BN as ``y = scale * x + shift`` per channel, computed in float64."""
    gamma, beta, mean, var = (const_value(t).astype(np.float64) for t in bn.inputs[1:5])
    spread = var + float(bn.attrs.get("epsilon", 1e-5))
    if not np.all(spread > 0):
        raise InputError(f"{where(bn)}: variance + epsilon is not positive in {int(np.sum(~(spread > 0)))} "
                         f"channel(s): not a valid BatchNormalization")
    scale = gamma / np.sqrt(spread)
    return scale, beta - mean * scale


def _foldable(canon, bn) -> bool:
    lin = producer(bn.inputs[0])
    if lin is None or lin.op not in ("Conv", "ConvTranspose", "Gemm") or not is_layer(canon, lin):
        return False
    if only_consumer(canon.graph, bn.inputs[0]) is not bn:
        return False
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return False
    if not all(is_const(t) for t in bn.inputs[1:5]) or not all(is_const(t) for t in lin.inputs[1:]):
        return False
    return lin.op != "Gemm" or lin.attrs.get("transB", 0) == 1

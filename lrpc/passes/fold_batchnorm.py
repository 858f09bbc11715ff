"""Fold BatchNormalization into the Conv / ConvTranspose / Gemm right before it (exact for any eps).

Guards (a BN that fails one stays and gets the composite's ``scale`` rule, pass by default):
the producer is a linear layer in normal form (not a pool lowered to a Conv), its output feeds only
this BN, all BN parameters are constants, and the BN is in inference mode (one output)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError, where
from ..graph import (
    Canonical,
    add_bias,
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
    graph.cleanup(remove_unused_graph_inputs=False)
    return changed


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

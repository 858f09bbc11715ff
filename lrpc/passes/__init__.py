"""Canonization: the ordered pipeline of passes, each ``run(canon) -> changed`` in a file of its own, run until
none changes anything (a fold one pass makes possible, e.g. a Mul after a BatchNormalization that another pass
folded, happens in the next round). Each pass declares ``CHANGES_SHAPES``: whether it changes the inferred shape of a
tensor it keeps (then shapes are refreshed right after it changes the graph, for the passes after it in the round;
new tensors get theirs after the round). A pass that fails with anything but an lrpc error is named in the error."""
from __future__ import annotations

import onnx

from ..errors import LrpcError, UnsupportedError, one_line
from ..graph import Canonical, import_model, name_output_dims, refresh_shapes, toposort, upgrade_opset
from ..loaded import LoadedModel
from . import (
    activation_regions,
    attention_op,
    avgpool_to_conv,
    cleanup,
    decomposed_layernorm,
    fold_batchnorm,
    gather_as_layout,
    linear_normal_form,
    maxpool_ceil,
    norm_affine,
    residual_sum,
    resize_to_matmul,
    strip_softmax,
)

# (attention_op early: the ops it writes out are what the later passes read; decomposed_layernorm before
# avgpool_to_conv: a LayerNorm over the spatial axes is not a pool; activation_regions last: it records node names,
# which a later pass could replace)
PIPELINE = (cleanup, attention_op, gather_as_layout, maxpool_ceil, linear_normal_form, decomposed_layernorm,
            norm_affine, fold_batchnorm, avgpool_to_conv, resize_to_matmul, residual_sum, activation_regions)
SHAPE_FOLDING = cleanup  # before the rounds, while the graph computes shapes: once per level of shape arithmetic
FINAL = (strip_softmax,)  # once, after the rounds: finds the explained tensor (a second run would copy nodes again)
MAX_ROUNDS = 8  # each round that changes something removes or rewrites nodes for good: real models need 2 or 3


def canonize(model: onnx.ModelProto | LoadedModel, output: str | None = None) -> Canonical:
    """Load a model into a canonical graph (forward outputs unchanged) and find the explained tensor. A ModelProto is
    the caller's (never modified); when lrpc owns the model (``LoadedModel.owned``: read from a file) the export may
    reuse its weights in place."""
    loaded = LoadedModel.of(model)
    model = loaded.proto
    normal = upgrade_opset(model)
    canon = import_model(normal, loaded if normal is model else None)
    if loaded.owned or normal is not model:  # a converted opset is a fresh model too
        canon.source = normal
    canon.output = output
    name_output_dims(canon.graph)
    while any(n.op == "Shape" for n in canon.graph.nodes) and _run(SHAPE_FOLDING, canon):
        # shape computations (torch's x.size() with a dynamic batch) fold a level further once shapes are refreshed
        toposort(canon.graph)
        canon = refresh_shapes(canon)
    for _ in range(MAX_ROUNDS):
        changed = _round(canon)
        if not changed:
            break
        canon = refresh_shapes(canon)  # passes keep the shapes of the tensors they keep; new tensors get theirs here
    else:
        raise UnsupportedError(f"canonization did not settle after {MAX_ROUNDS} rounds: passes "
                               f"{', '.join(changed)} still change the graph (an lrpc bug: please report it with "
                               "the model's graph)")
    for p in FINAL:
        _run(p, canon)
    return canon


def _round(canon: Canonical) -> list[str]:
    """Run every pass once; the names of those that changed the graph. The refusals are those of the last round (a
    node refused early may be rewritten once another pass has changed its inputs)."""
    canon.refused.clear()
    changed = []
    for p in PIPELINE:
        if _run(p, canon):
            toposort(canon.graph)
            changed.append(_name(p))
            if p.CHANGES_SHAPES:
                refresh_shapes(canon)
    return changed


def _run(p, canon: Canonical) -> bool:
    """``p.run(canon)``; an unexpected failure names the pass (lrpc errors, about the model, pass as they are)."""
    try:
        return p.run(canon)
    except (LrpcError, MemoryError):
        raise
    except Exception as e:
        raise RuntimeError(f"canonization pass {_name(p)} failed (an lrpc bug: please report it with the model's "
                           f"graph): {type(e).__name__}: {one_line(e)}") from e


def _name(p) -> str:
    return p.__name__.rsplit(".", 1)[-1]

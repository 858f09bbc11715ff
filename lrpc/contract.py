"""The compiled graph's contract: the inputs, outputs and metadata keys lrpc adds to a model (docs/api.md, "The
compiled graph"), and how the per-layer outputs are read back. Whatever runs a compiled model (Session, check,
inspect, explain) reads the names here; numpy and onnx protos only, so importing it loads no compiler."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx

SEED = "relevance_seed"  # the seed input, shaped like the explained output (seed "input" and "switch")
TARGET = "relevance_target"  # int64 [N]: each sample's top-1 output, flat index (seed "top1" and "switch")
# seed "switch": a bool scalar input, false unless fed; true seeds each sample's top-1 in the graph
SWITCH = "lrpc/top1"
RELEVANCE = "relevance"  # the input relevance; relevance_<input> for each of several float inputs
TOKENS = "relevance_tokens"  # a model of token ids: relevance per token [B, T] (the token embedding's, summed)
SEED_MODES = ("input", "top1", "switch")  # how the seed arrives (compile's ``seed``, metadata SEED_MODE)
# what a graph is lowered for (compile's ``for_provider``, metadata PROVIDER): onnxruntime's CPU or CUDA provider, or
# any ONNX runtime ("portable": ops and attributes the common runtimes implement, constant subgraphs folded)
PROVIDERS = ("cpu", "cuda", "portable")

# per-layer outputs (layerwise), each followed by the node's name
LAYER_IN = "relevance_in/"  # the relevance sent to the layer's (first) input ("full")
SUM_IN = "relevance_sum_in/"  # per-sample sums of that ("sums" and "full")
SUM_OUT = "relevance_sum_out/"  # per-sample sums of the relevance arriving at the layer
AUDIT = ("kept", "bias", "zero")  # per-layer accounts: outputs relevance_sum_<kind>/<node>
ACCOUNT = "relevance_sum_{}/"  # (formatted with the kind)
LAYERWISE_PREFIXES = (LAYER_IN, SUM_IN, SUM_OUT, *(ACCOUNT.format(k) for k in AUDIT))

# metadata_props keys
EXPLAINED = "lrpc.explained"  # the explained tensor
OUTPUT = "lrpc.output"  # the graph output the targets are read from
SEED_MODE = "lrpc.seed"  # one of SEED_MODES
RULES = "lrpc.rules"  # the rule of each layer, JSON
LAYERS = "lrpc.layers"  # layerwise: the layers in execution order with op type and rule, JSON
ORIGIN = "lrpc.origin"  # the op type of nodes a canonization pass rewrote, JSON
PROVIDER = "lrpc.provider"  # "cuda" when compiled for it (absent: the default lowering, fastest on the CPU)


# a decoder's cached keys and values from earlier steps (past_key_values.0.key, past.0.value, past_key_0, ...): float
# inputs that are never explained; relevance goes to the current tokens, the cache is a constant for the rules
CACHE_INPUT = re.compile(r"past([._\d]|key|value)", re.IGNORECASE)


def is_cache_input(name: str) -> bool:
    """Whether graph input ``name`` holds a decoder's key/value cache (:data:`CACHE_INPUT`)."""
    return CACHE_INPUT.match(name) is not None


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def input_relevance_names(outputs) -> list[str]:
    """The outputs holding input relevance: ``relevance`` or ``relevance_<input>`` (not the per-layer
    ``relevance_*/<node>`` outputs, nor ``relevance_target`` of a top1-seeded graph)."""
    return [n for n in outputs if n == RELEVANCE or (n.startswith("relevance_") and "/" not in n and n != TARGET)]


def layer_sums(model: onnx.ModelProto, outs: dict) -> list[tuple[dict, float, float, float]]:
    """Per layer of a ``layerwise`` model's ``lrpc.layers`` (execution order): (row, Σ in, Σ out, in/out),
    the sums over the batch of what the layer sends down and receives (in/out is 1 for 0/0). ``row`` also holds
    the layer's accounts (:meth:`lrpc.emit.Context.account`) where the model has them: ``kept`` (what its rule passes
    on; Σ out for layers that route relevance or pass it unchanged), ``bias``, ``zero`` (0 where not reported)."""
    rows = []
    for layer in json.loads(metadata(model).get(LAYERS, "[]")):
        s_in = float(np.sum(outs[f"{SUM_IN}{layer['name']}"], dtype=np.float64))
        s_out = float(np.sum(outs[f"{SUM_OUT}{layer['name']}"], dtype=np.float64))
        acc = {k: outs.get(f"{ACCOUNT.format(k)}{layer['name']}") for k in AUDIT}
        acc = {k: (s_out if k == "kept" else 0.0) if v is None else float(np.sum(v, dtype=np.float64))
               for k, v in acc.items()}
        layer = {**layer, **acc}
        ratio = s_in / s_out if s_out != 0 else (1.0 if s_in == 0 else float("inf"))
        rows.append((layer, s_in, s_out, ratio))
    return rows

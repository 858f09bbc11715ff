"""``lrpc inspect``: the per-layer relevance table people build by hand to see where conservation breaks.

For one input (an image, an .npz of inputs, or seeded random data) and one seed (one-hot of the target or
of each sample's top-1 output), every layer with a rule (and MaxPool), in execution order: op type, name,
rule, the relevance sum it sends down, max − min of that relevance, its ratio to the seed sum, and its own
in/out ratio; the first layer (from the output) whose in/out ratio leaves 1 by more than the tolerance is
marked, and a warning names the usual remedies when the input relevance sum misses the seed sum."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from . import composites
from .check import random_inputs
from .model_io import load_model

REMEDIES = ("compare with --zero-bias (biases absorb relevance by design); a smaller --epsilon/--stabilizer-eps "
            "where large stabilizers absorb it; the generalized gamma of epsilon-gamma-box and --stabilizer clip or "
            "norm-scale where denominators near 0 explode")


def inspect(path, rules: str = "epsilon-gamma-box", options: composites.Options | None = None,
            inputs: dict | None = None, target=None, tol: float = 1e-3, output: str | None = None,
            input_shapes: dict | None = None, seed: int = 0) -> dict:
    """Return {"layers": [...], "seed_sum", "input_sum", "first_break", "warning"} (sums over the batch)."""
    import onnxruntime as ort

    from .compiler import _with_input_shapes
    from .compiler import compile as compile_model

    options = options or composites.Options()
    model = load_model(path)
    if input_shapes:
        model = _with_input_shapes(model, input_shapes)
    feeds = inputs if inputs is not None else random_inputs(model, seed)
    compiled = compile_model(model, rules, output=output, layerwise="full", **asdict(options))
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    seed_shape = next(i.shape for i in sess.get_inputs() if i.name == "relevance_seed")
    batch = next(iter(feeds.values())).shape[0]
    shape = [d if isinstance(d, int) else batch for d in seed_shape]
    probe = dict(zip(names, sess.run(None, {**feeds, "relevance_seed": np.zeros(shape, np.float32)})))
    first = probe[names[0]].reshape(batch, -1)
    relevance_seed = np.zeros((batch, int(np.prod(shape[1:]))), np.float32)
    classes = first.argmax(axis=1) if target is None else np.broadcast_to(np.asarray(target), (batch,))
    relevance_seed[np.arange(batch), classes] = 1.0
    outs = dict(zip(names, sess.run(None, {**feeds, "relevance_seed": relevance_seed.reshape(shape)})))
    seed_sum = float(relevance_seed.sum())
    layers = []
    meta = {p.key: p.value for p in compiled.metadata_props}
    for layer in json.loads(meta.get("lrpc.layers", "[]")):
        r = outs[f"relevance_in/{layer['name']}"].astype(np.float64)
        s_in = float(np.sum(outs[f"relevance_sum_in/{layer['name']}"], dtype=np.float64))
        s_out = float(np.sum(outs[f"relevance_sum_out/{layer['name']}"], dtype=np.float64))
        local = s_in / s_out if s_out != 0 else (1.0 if s_in == 0 else float("inf"))
        layers.append({**layer, "sum": s_in, "range": float(r.max() - r.min()) if r.size else 0.0,
                       "ratio_to_seed": s_in / seed_sum if seed_sum else float("nan"),
                       "in_over_out": local, "breaks": bool(abs(local - 1.0) > tol)})
    first_break = next((row["name"] for row in reversed(layers) if row["breaks"]), None)
    rel_names = [n for n in names if n == "relevance" or (n.startswith("relevance_") and "/" not in n)]
    input_sum = float(sum(np.sum(outs[n], dtype=np.float64) for n in rel_names))
    miss = abs(input_sum - seed_sum) / max(abs(seed_sum), 1e-30)
    warning = None
    if miss > tol:
        where = f" (first break from the output: layer '{first_break}')" if first_break else ""
        warning = (f"input relevance sums to {input_sum:.6g}, the seed to {seed_sum:.6g}: {100 * miss:.2f}% "
                   f"not conserved{where}. Usual remedies: {REMEDIES}")
    return {"model": str(path), "rules": rules, "target": classes.tolist(), "seed_sum": seed_sum,
            "input_sum": input_sum, "first_break": first_break, "warning": warning, "layers": layers}


def table(result: dict) -> str:
    lines = [f"{'layer (execution order)':44s} {'op':12s} {'rule':24s} {'Σ R':>11s} {'max-min':>10s} {'Σ/seed':>8s} "
             f"{'in/out':>8s}"]
    for row in result["layers"]:
        mark = "  <- first break" if row["name"] == result["first_break"] else ("  <- breaks" if row["breaks"] else "")
        lines.append(f"{row['name'][:44]:44s} {row['op'][:12]:12s} {row['rule'][:24]:24s} {row['sum']:11.5g} "
                     f"{row['range']:10.4g} {row['ratio_to_seed']:8.4f} {row['in_over_out']:8.4f}{mark}")
    lines.append(f"seed Σ {result['seed_sum']:.6g}, input relevance Σ {result['input_sum']:.6g} "
                 f"(targets {result['target']})")
    return "\n".join(lines)

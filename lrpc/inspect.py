"""``lrpc inspect``: the per-layer relevance table people build by hand to see where conservation breaks.

For one input (an image, an .npz of inputs, or seeded random data) and one target (see lrpc.targets: a class, each
sample's top-1, or a dense target such as class:C of a segmentation output), every layer with a rule (and MaxPool), in
execution order: op type, name, rule, the relevance sum it sends down, max − min of that relevance, its ratio to the
seed sum, and its own in/out ratio; the first layer (from the output) whose in/out ratio leaves 1 by more than the
tolerance is marked, and a warning names the usual remedies when the input relevance sum misses the seed sum."""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from . import composites, targets
from .check import model_inputs
from .contract import LAYER_IN, layer_sums
from .loaded import file_identity, load, still_the_file

REMEDIES = ("a smaller --epsilon/--stabilizer-eps where large stabilizers absorb it; the generalized gamma of "
            "epsilon-gamma-box and --stabilizer clip or norm-scale where denominators near 0 explode; --sum-rule "
            "sign-norm where residual sums whose branches have both signs explode (RepVGG); units that only "
            "their bias switches on receive relevance but pass none down (a property of the rules, also with "
            "--zero-bias: the model's own biases decide which units are on)")


def inspect(path, rules: str = "epsilon-gamma-box", options: composites.Options | None = None,
            inputs: dict | None = None, target=None, tol: float = 1e-3, output: str | None = None,
            input_shapes: dict | None = None, seed: int = 0, image=None, **preprocessing) -> dict:
    """Return {"layers": [...], "seed_sum", "input_sum", "first_break", "warning", "bias"} (sums over the
    batch). The input: ``inputs`` ({name: array}), an ``image`` file (preprocessed as by ``lrpc explain``:
    ``preprocessing`` are :func:`lrpc.preprocess.image_inputs`'s keywords), or seeded random data.

    Biases absorb relevance by design. When the input sum misses the seed sum, the same explanation is
    run again with biases left out of every denominator (``--zero-bias``): if that conserves, the loss
    is the biases' (``bias``: {"input_sum", "absorbed", "first_break"}, no warning); otherwise the warning
    names the first layer that breaks without biases, i.e. for another reason (stabilizers, dead units,
    ...). ``first_break`` is always the requested run's."""
    from .compiler import with_input_shapes

    options = options or composites.Options()
    identity = file_identity(path)
    model = load(path).proto  # (its graph inputs: the compiles read the file themselves)
    if input_shapes:
        model = with_input_shapes(model, input_shapes)
    feeds = model_inputs(model, inputs, image, seed, **preprocessing)
    model = None
    target = targets.parse(target)
    compile_args = (path, rules, output, input_shapes)
    layers, seed_sum, input_sum, seed = _layer_table(compile_args, options, feeds, target, tol)
    first_break = _first_break(layers)
    miss = abs(input_sum - seed_sum) / max(abs(seed_sum), 1e-30)
    warning, bias, culprit = None, None, first_break
    if miss > tol:
        if not options.zero_bias:
            free = replace(options, zero_bias=True)
            free_layers, _, free_sum, _ = _layer_table(compile_args, free, feeds, target, tol, seed)
            culprit = _first_break(free_layers)
            bias = {"input_sum": free_sum, "absorbed": free_sum - input_sum, "first_break": culprit}
            miss = abs(free_sum - seed_sum) / max(abs(seed_sum), 1e-30)
        if miss > tol:
            what = "without biases in the denominators, " if bias else ""
            where = f" ({what}the first break from the output is layer '{culprit}')" if culprit else ""
            biases = "" if bias is None else f"; with --zero-bias {bias['input_sum']:.6g}, so not (only) biases"
            warning = (f"input relevance sums to {input_sum:.6g}, the seed to {seed_sum:.6g}{biases}: "
                       f"{100 * miss:.2f}% not conserved{where}. Usual remedies: {REMEDIES}")
    still_the_file(path, identity, "lrpc inspect")
    explained = str(target) if target.kind not in ("index", "top") else \
        np.asarray(seed).reshape(len(seed), -1).argmax(axis=1).tolist()
    return {"model": str(path), "rules": rules, "target": explained, "seed_sum": seed_sum,
            "input_sum": input_sum, "first_break": first_break, "warning": warning, "bias": bias, "layers": layers}


def _first_break(layers: list) -> str | None:
    return next((row["name"] for row in reversed(layers) if row["breaks"]), None)


def _layer_table(compile_args, options, feeds, target, tol, seed=None):
    """(rows, seed sum, input relevance sum, seed) of one compiled run with --layerwise full; the seed is
    made from ``target`` (see :mod:`lrpc.targets`) unless given. ``compile_args``: (path, rules, output, input
    shapes): the model is read as ``lrpc compile`` reads it (its big weights stay in the file, where onnxruntime
    reads them)."""
    session, compiled = _compiled_session(compile_args, options)
    if seed is None:
        seed = session.seed_for(feeds, target)
    outs = session.run(feeds, seed)
    seed_sum = float(np.sum(seed, dtype=np.float64))
    layers = []
    for layer, s_in, _, local in layer_sums(compiled, outs):
        r = outs[f"{LAYER_IN}{layer['name']}"].astype(np.float64)
        layers.append({**layer, "sum": s_in, "range": float(r.max() - r.min()) if r.size else 0.0,
                       "ratio_to_seed": s_in / seed_sum if seed_sum else float("nan"),
                       "in_over_out": local, "breaks": bool(abs(local - 1.0) > tol)})
    input_sum = float(sum(np.sum(outs[n], dtype=np.float64) for n in session.relevance_outputs))
    return layers, seed_sum, input_sum, seed


def _compiled_session(compile_args, options) -> tuple:
    """``(Session, compiled ModelProto)`` of the compile with --layerwise full (the compile's hold on the file's
    bytes ends here: onnxruntime reads the weights itself)."""
    from .compiler import compile_loaded
    from .runtime import Session

    path, rules, output, input_shapes = compile_args
    loaded = compile_loaded(path, rules, output=output, layerwise="full", input_shapes=input_shapes, **asdict(options))
    return Session(loaded, providers=["CPUExecutionProvider"]), loaded.proto


def table(result: dict) -> str:
    lines = [f"{'layer (execution order)':44s} {'op':12s} {'rule':24s} {'Σ R':>11s} {'max-min':>10s} {'Σ/seed':>8s} "
             f"{'in/out':>8s}"]
    for row in result["layers"]:
        mark = "  <- first break" if row["name"] == result["first_break"] else ("  <- breaks" if row["breaks"] else "")
        lines.append(f"{row['name'][:44]:44s} {row['op'][:12]:12s} {row['rule'][:24]:24s} {row['sum']:11.5g} "
                     f"{row['range']:10.4g} {row['ratio_to_seed']:8.4f} {row['in_over_out']:8.4f}{mark}")
    lines.append(f"seed Σ {result['seed_sum']:.6g}, input relevance Σ {result['input_sum']:.6g} "
                 f"(targets {result['target']})")
    if result.get("bias"):
        b = result["bias"]
        brk = f", first break without biases: {b['first_break']}" if b["first_break"] else ""
        lines.append(f"with --zero-bias: input relevance Σ {b['input_sum']:.6g}; "
                     f"biases absorb {b['absorbed']:.6g}{brk}")
    return "\n".join(lines)

"""``lrpc inspect``: the per-layer relevance table people build by hand to see where conservation breaks.

For one input (an image, an .npz of inputs, or seeded random data) and one target (see lrpc.targets: a class, each
sample's top-1, or a dense target such as class:C of a segmentation output), every layer with a rule (and MaxPool), in
execution order: op type, name, rule, the relevance sum it sends down, max − min of that relevance, its ratio to the
seed sum, and its own in/out ratio; the first layer (from the output) whose in/out ratio leaves 1 by more than the
tolerance is marked, and a warning names the usual remedies when the input relevance sum misses the seed sum."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from . import composites, targets
from .check import accounts, model_inputs
from .contract import LAYER_IN
from .loaded import file_identity, load, still_the_file

REMEDIES = ("a smaller --epsilon/--stabilizer-eps where large stabilizers absorb it; the generalized gamma of "
            "epsilon-gamma-box and --stabilizer clip or norm-scale where denominators near 0 explode; --sum-rule "
            "sign-norm where residual sums whose branches have both signs explode (RepVGG)")


def inspect(path, rules: str = "epsilon-gamma-box", options: composites.Options | None = None,
            inputs: dict | None = None, target=None, tol: float = 1e-3, output: str | None = None,
            input_shapes: dict | None = None, seed: int = 0, image=None, **preprocessing) -> dict:
    """Return {"layers": [...], "seed_sum", "input_sum", "first_break", "warning", "absorbed"} (sums over the
    batch). The input: ``inputs`` ({name: array}), an ``image`` file (preprocessed as by ``lrpc explain``:
    ``preprocessing`` are :func:`lrpc.preprocess.image_inputs`'s keywords), or seeded random data.

    ``absorbed``: the relevance the layers' rules keep by design (``bias``, ``zero``: biases, zero denominators),
    their stabilizers keep (``stabilizer``), and what is left over (``unaccounted``: seed − input − the others), as
    :func:`lrpc.check.accounts` books them. A warning is given where stabilizers or the unaccounted part exceed
    ``tol`` of the seed sum; it names the first layer (from the output) that breaks by those books.
    ``first_break`` is the first layer whose in/out ratio leaves 1 by more than ``tol``."""
    from .compiler import with_input_shapes

    options = options or composites.Options()
    identity = file_identity(path)
    model = load(path).proto  # (its graph inputs: the compiles read the file themselves)
    if input_shapes:
        model = with_input_shapes(model, input_shapes)
    feeds = model_inputs(model, inputs, image, seed, **preprocessing)
    model = None
    target = targets.parse(target)
    layers, books, seed = _layer_table((path, rules, output, input_shapes), options, feeds, target, tol)
    seed_sum, input_sum, scale = books.seed_sum, books.total, abs(books.seed_sum)
    absorbed = {k: getattr(books, k) * scale for k in ("bias", "zero", "stabilizer", "unaccounted")}
    warning = None
    if books.figure > tol:
        culprit = books.first_break
        where = f" (the first break from the output is layer '{culprit}')" if culprit else ""
        warning = (f"input relevance sums to {input_sum:.6g}, the seed to {seed_sum:.6g}: stabilizers absorb "
                   f"{100 * abs(books.stabilizer):.2f}% and {100 * books.unaccounted:.2f}% is unaccounted (biases "
                   f"{100 * books.bias:.2f}% and zero denominators {100 * books.zero:.2f}% by design){where}. "
                   f"Usual remedies: {REMEDIES}")
    still_the_file(path, identity, "lrpc inspect")
    explained = str(target) if target.kind not in ("index", "top") else \
        np.asarray(seed).reshape(len(seed), -1).argmax(axis=1).tolist()
    return {"model": str(path), "rules": rules, "target": explained, "seed_sum": seed_sum,
            "input_sum": input_sum, "first_break": _first_break(layers), "warning": warning, "absorbed": absorbed,
            "layers": layers}


def _first_break(layers: list) -> str | None:
    return next((row["name"] for row in reversed(layers) if row["breaks"]), None)


def _layer_table(compile_args, options, feeds, target, tol):
    """(rows, :func:`lrpc.check.accounts`, seed) of one compiled run with --layerwise full, the seed made from
    ``target`` (see :mod:`lrpc.targets`). ``compile_args``: (path, rules, output, input shapes): the model is read
    as ``lrpc compile`` reads it (its big weights stay in the file, where onnxruntime reads them)."""
    session, compiled = _compiled_session(compile_args, options)
    seed = session.seed_for(feeds, target)
    outs = session.run(feeds, seed)
    books = accounts(compiled, outs, seed, tol)
    layers = []
    for row in books.rows:
        r = outs[f"{LAYER_IN}{row['name']}"].astype(np.float64)
        layers.append({**{k: v for k, v in row.items() if k not in ("sum_in", "breaks", "ratio", "absorbed")},
                       "sum": row["sum_in"], "range": float(r.max() - r.min()) if r.size else 0.0,
                       "ratio_to_seed": row["sum_in"] / books.seed_sum if books.seed_sum else float("nan"),
                       "in_over_out": row["ratio"], "breaks": bool(abs(row["ratio"] - 1.0) > tol)})
    return layers, books, seed


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
    a = result["absorbed"]
    lines.append(f"absorbed: by biases {a['bias']:.6g}, at zero denominators {a['zero']:.6g} (by design); by "
                 f"stabilizers {a['stabilizer']:.6g}; unaccounted {a['unaccounted']:.6g}")
    return "\n".join(lines)

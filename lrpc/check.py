"""``lrpc check``: the CI guard. Compiles a model, runs it in onnxruntime on seeded random (or given)
inputs and verifies: every op supported, forward outputs unchanged, relevance finite (in every compile the check
runs), relevance conserved up to what the rules absorb by design (each layer accounts for its biases' share and for
the relevance arriving where its denominator is 0; the layers where relevance goes unaccounted or a stabilizer absorbs
it are named), and LRP-0 equal to the gradient (:mod:`lrpc.gradient`; skipped, with the reason, where the rules are
not the gradient's)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import onnx

from . import composites, gradient
from .contract import EXPLAINED, RELEVANCE, SEED, input_relevance_names, layer_sums, metadata
from .errors import InputError, UnsupportedError, one_line
from .loaded import file_identity, load, still_the_file
from .windows import window_table

DIRECTIONS = 3  # random directions of the gradient check
GRADIENT_TOL = 1e-4


@dataclass
class Check:
    name: str
    passed: bool
    figure: float | None = None  # the measured value (relative error, count, …)
    tolerance: float | None = None
    message: str = ""
    skipped: bool = False  # (passed as well: reports show it apart, JUnit as <skipped/>)


@dataclass
class Report:
    model: str
    rules: str
    checks: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # per-layer sums, execution order
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=1)

    def to_junit(self) -> str:
        failures = sum(not c.passed for c in self.checks)
        skipped = sum(c.skipped for c in self.checks)
        cases = []
        for c in self.checks:
            body = ("" if c.passed and not c.skipped else
                    f"<skipped message={quoteattr(c.message)}/>" if c.skipped else
                    f"<failure message={quoteattr(c.message)}>{escape(c.message)}</failure>")
            props = f"figure={c.figure} tolerance={c.tolerance}"
            cases.append(f'  <testcase classname={quoteattr("lrpc.check." + self.rules)} name={quoteattr(c.name)}>'
                         f"{body}<system-out>{escape(props)}</system-out></testcase>")
        return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name={quoteattr("lrpc check " + self.model)} '
                f'tests="{len(self.checks)}" failures="{failures}" skipped="{skipped}" time="{self.seconds:.3f}">\n'
                + "\n".join(cases) + "\n</testsuite>\n")

    def text(self) -> str:
        state = lambda c: "SKIP" if c.skipped else "PASS" if c.passed else "FAIL"  # noqa: E731
        lines = [f"{state(c)}  {c.name:13s} {c.message}" for c in self.checks]
        if self.layers:
            lines.append("")
            lines.append(f"{'layer (execution order)':48s} {'op':14s} {'rule':26s} {'sum in':>10s} {'sum out':>10s} "
                         f"{'in/out':>8s} {'biases':>10s} {'zero den':>10s} {'stabilizer':>10s}")
            for row in self.layers:
                mark = "  <- breaks" if row.get("breaks") else ""
                lines.append(f"{row['name'][:48]:48s} {row['op'][:14]:14s} {row['rule'][:26]:26s} "
                             f"{row['sum_in']:10.4g} {row['sum_out']:10.4g} {row['ratio']:8.4f} {row['bias']:10.3g} "
                             f"{row['zero']:10.3g} {row['stabilizer']:10.3g}{mark}")
        ran = [c for c in self.checks if not c.skipped]
        skipped = f", {len(self.checks) - len(ran)} skipped" if len(ran) < len(self.checks) else ""
        counts = f"{sum(c.passed for c in ran)}/{len(ran)} checks{skipped}"
        lines.append(f"{'PASSED' if self.passed else 'FAILED'} ({counts})")
        return "\n".join(lines)


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict:
    """Seeded inputs for every graph input: standard normal floats, zeros for integers; batch 1. Token ids (an
    integer input indexing an embedding table) are drawn within the table's rows, attention masks are all ones."""
    from .text import vocabulary_sizes

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    vocab = vocabulary_sizes(model)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if any(d is None for d in dims[1:]):
            raise InputError(f"input '{inp.name}' has dynamic non-batch dims {dims}: pass --inputs file.npz")
        shape = [dims[0] or 1] + dims[1:] if dims else []
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            kind = "a string" if dtype.kind == "O" else dtype.name
            raise InputError(f"input '{inp.name}' is {kind} input: lrpc makes random numeric inputs only; "
                             "pass --inputs file.npz")
        feeds[inp.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else rng.integers(0, vocab[inp.name], shape).astype(dtype) if inp.name in vocab
                           else np.ones(shape, dtype) if "mask" in inp.name.lower() else np.zeros(shape, dtype))
    return feeds


def model_inputs(model: onnx.ModelProto, inputs: dict | None, image=None, seed: int = 0, **preprocessing) -> dict:
    """The feeds of inspect and check: ``inputs`` as given, one ``image`` file preprocessed for ``model``'s first input
    (:func:`lrpc.preprocess.image_inputs`), or seeded random data."""
    if inputs is not None and image is not None:
        raise InputError("give --inputs or --image, not both")
    if image is not None:
        from .preprocess import image_inputs

        return image_inputs(model, image, **preprocessing)
    if any(v not in (None, False, "nchw") for v in preprocessing.values()):
        raise InputError(f"{', '.join(f'--{k}' for k, v in preprocessing.items() if v not in (None, False, 'nchw'))}: "
                         "image preprocessing needs --image")
    return inputs if inputs is not None else random_inputs(model, seed)


def run_check(path: str, rules: str = "epsilon-gamma-box", options: composites.Options | None = None,
              inputs: dict | None = None, rtol: float = 1e-4, conservation_tol: float = 1e-3,
              output: str | None = None, seed: int = 0, input_shapes: dict | None = None,
              gradient_tol: float = GRADIENT_TOL, image=None, **preprocessing) -> Report:
    """Run every check; unusable input raises :class:`InputError`, failing checks go into the report. The input:
    ``inputs`` ({name: array}), an ``image`` file (preprocessed as by ``lrpc explain``: ``preprocessing`` are
    :func:`lrpc.preprocess.image_inputs`'s keywords), or seeded random data (``seed``).

    The model file is read as ``lrpc compile`` and :class:`lrpc.Session` read it (its big weights are never copied
    out of the file: onnxruntime reads them there), compiled three times (as asked; again with per-layer sums and
    accounts for conservation; LRP-0 for the gradient, unless that check is skipped) and run in one onnxruntime
    session at a time (the original, the compiled graph, the conserving one, the LRP-0 one and its probe, each compiled
    only when its turn comes)."""
    from .compiler import compile_loaded

    start = time.perf_counter()
    options = options or composites.Options()
    identity = file_identity(path)
    composites.load_ruleset(rules, options)  # bad rules/parameters: unusable input (exit 2)
    report = Report(model=str(path), rules=rules)
    feeds, names = _inputs(path, input_shapes, inputs, image, seed, preprocessing)

    def compiled(**kw):
        return compile_loaded(path, rules, output=output, input_shapes=input_shapes, **{**asdict(options), **kw})

    try:
        asked = _as_asked(compiled, names, feeds, inputs is not None, options.maxpool == "winner")
    except UnsupportedError as e:
        # figure: how many nodes are unsupported (1 for an error naming none: a bfloat16 weight)
        report.checks.append(Check("supported", False, len(e.nodes) or 1, 0, message=str(e)))
        report.seconds = time.perf_counter() - start
        return report
    report.checks.append(Check("supported", True, 0, 0, "every op on the explained path has a propagator"))
    feeds, seed_t = asked.feeds, asked.seed
    original = _original(path, input_shapes)
    reference = _session(original).run(None, feeds)
    err = max(_rel_err(a, b) for a, b in zip(asked.outputs, reference))
    floor = _roundoff(original, feeds, reference) if err > rtol else 0.0
    del original, reference  # (the file's bytes: read by one session at a time)
    allowed = max(rtol, 2 * floor)
    why = (f": onnxruntime's own graph optimizations change this model's outputs by {floor:.2e}, float32 round-off "
           f"the network amplifies" if allowed > rtol else "")
    report.checks.append(Check("forward", err <= allowed, err, allowed,
                               f"max relative error of the outputs {err:.2e} (tolerance {allowed:.2g}{why})"))
    nonfinite = {"as asked": asked.nonfinite}

    def conservation(opts: composites.Options) -> tuple:
        """(layers, figure, text, NaN/Inf count) of the compile with per-layer sums and accounts under ``opts``."""
        model = compile_loaded(path, rules, output=output, layerwise="sums", input_shapes=input_shapes,
                               **asdict(opts))
        still_the_file(path, identity, "lrpc check")
        csess = _session(model)
        outs = dict(zip([o.name for o in csess.get_outputs()], csess.run(None, {**feeds, SEED: seed_t})))
        return (*_accounted(model.proto, outs, seed_t, conservation_tol), _nonfinite(outs))

    try:  # (the same ops as the first compile's, plus the per-layer sums and accounts)
        report.layers, figure, text, nonfinite["with per-layer sums (conservation)"] = conservation(options)
    except UnsupportedError as e:
        cons_check = Check("conservation", False, message=f"the compile with per-layer sums failed: {e}")
    else:
        passed = figure <= conservation_tol  # (NaN fails)
        first = next((r for r in report.layers[::-1] if r["breaks"]), None)
        note = "" if passed else _absorbed(first, options, conservation_tol,
                                           lambda: conservation(replace(options, stabilizer="norm-scale"))[1])
        cons_check = Check("conservation", passed, figure, conservation_tol, text + note)

    if asked.blocked:
        grad_check = Check("gradient", True, None, gradient_tol,
                           f"skipped: LRP-0 is not the gradient here: {asked.blocked}", skipped=True)
    else:
        grad_check = _gradient_check(path, output, input_shapes, feeds, seed_t * asked.explained.astype(seed_t.dtype),
                                     gradient_tol, seed, nonfinite)
        still_the_file(path, identity, "lrpc check")

    bad = {what: n for what, n in nonfinite.items() if n}
    if bad:
        text = "; ".join(f"{n} in the compile {what}" for what, n in bad.items())
        report.checks.append(Check("finite", False, sum(bad.values()), 0, f"NaN/Inf relevance values: {text}"))
    else:
        report.checks.append(Check("finite", True, 0, 0,
                                   f"all relevance values finite (compiles: {', '.join(nonfinite)})"))
    report.checks += [cons_check, grad_check]
    if asked.ties is not None:
        near, exact, total, pools = asked.ties
        report.checks.append(Check("ties", True, near, None, (
            f"{near} of {total} MaxPool windows ({pools} MaxPool layers, winner-take-all) have their two largest "
            f"values within {NEAR_TIE} ulps ({exact} exactly equal): another runtime or optimization level may send "
            f"their relevance to the other cell; --maxpool split does not depend on it")))
    report.seconds = time.perf_counter() - start
    return report


def _session(model):
    from .runtime import start_session

    return start_session(model, ["CPUExecutionProvider"])


def _roundoff(original, feeds: dict, optimized: list) -> float:
    """How much onnxruntime's own graph optimizations (its BatchNorm and bias folds, fusions) change the original's
    outputs on ``feeds``: the float32 round-off this network amplifies, which canonization's folds may meet too."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    plain = ort.InferenceSession(original.serialized(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    return max(_rel_err(a, b) for a, b in zip(plain, optimized))


def _original(path, input_shapes: dict | None):
    """The model file as read (with ``input_shapes`` set)."""
    from .compiler import with_input_shapes

    original = load(path)
    if input_shapes:
        with_input_shapes(original.proto, input_shapes)
    return original


def _inputs(path, input_shapes, inputs, image, seed, preprocessing) -> tuple[dict, list]:
    """(the feeds: :func:`model_inputs`, the names of the model's outputs)."""
    model = _original(path, input_shapes).proto
    return model_inputs(model, inputs, image, seed, **preprocessing), [o.name for o in model.graph.output]


@dataclass
class _AsAsked:
    feeds: dict  # conformed to the model's inputs
    outputs: list  # the model's outputs
    explained: np.ndarray  # the explained tensor's values
    seed: np.ndarray  # the top-1 seed
    nonfinite: int  # NaN/Inf relevance values under that seed
    blocked: str | None  # what keeps LRP-0 from being the gradient (:func:`lrpc.gradient.blocker`)
    ties: tuple | None  # (windows near a tie, of them exact, windows, MaxPools) of winner-take-all MaxPools


def _as_asked(compiled, names: list, feeds: dict, given: bool, winner: bool) -> _AsAsked:
    """The run of the compile as asked (``compiled()``): its forward outputs (``names``) and explained tensor (zero
    seed), then its relevance under the top-1 seed. ``winner``: MaxPools are winner-take-all (``--maxpool``)."""
    sess, explained, blocked, pools = _exposed(compiled(), winner)
    feeds = _conformed(sess, feeds, given)
    probe = sess.run(names + [explained], {**feeds, SEED: _zero_seed(sess, feeds)})
    seed = _top1_seed(sess, probe[0])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, SEED: seed})))
    return _AsAsked(feeds, probe[:-1], probe[-1], seed, _nonfinite(outs), blocked,
                    _ties(pools, {**feeds, **outs}))


def _exposed(loaded, winner: bool) -> tuple:
    """(session, explained tensor, :func:`lrpc.gradient.blocker`, the forward's MaxPools as (input, attributes) where
    they are ``winner``-take-all, else none) of a compiled model with its explained tensor and those MaxPools' inputs
    made outputs."""
    explained = metadata(loaded.proto)[EXPLAINED]
    blocked = gradient.blocker(loaded.proto, explained, gradient.float_inputs(loaded.proto, SEED))
    pools = [(n.input[0], {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
             for n in loaded.proto.graph.node if winner and n.op_type == "MaxPool" and not n.name.startswith("lrp/")]
    gradient.expose(loaded.proto, [explained, *dict(pools)], SEED)
    return _session(loaded), explained, blocked, pools


NEAR_TIE = 64  # ulps: two window values closer than this (relative to the larger) may swap order in another runtime


def _ties(pools: list, values: dict) -> tuple | None:
    """(windows whose two largest values are within NEAR_TIE ulps, of them exactly equal, windows, MaxPools) over
    the winner-take-all MaxPools (None without one). Windows whose largest value is 0 (after a ReLU) are left out:
    they carry no relevance under rules with an input factor."""
    if not pools:
        return None
    near = exact = total = 0
    for name, attrs in pools:
        x = np.asarray(values[name])
        flat = x.reshape(*x.shape[:2], -1)
        flat = np.concatenate([flat, np.full((*x.shape[:2], 1), -np.inf, x.dtype)], axis=-1)  # (padding reads it)
        table = window_table({k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()},
                             list(x.shape[2:]))
        if len(table) < 2:  # (a 1×1 window has no rival)
            continue
        ranked = np.sort(flat[..., table.reshape(len(table), -1)], axis=2)  # [N, C, K, windows]
        top, second = ranked[:, :, -1].astype(np.float64), ranked[:, :, -2].astype(np.float64)
        live = top != 0
        gap = top - second
        near += int(np.sum(live & (gap <= NEAR_TIE * np.finfo(x.dtype).eps * np.abs(top))))
        exact += int(np.sum(live & (gap == 0)))
        total += int(np.sum(live))
    return near, exact, total, len(pools)


def _gradient_check(path, output, input_shapes, feeds: dict, seed: np.ndarray, tol: float, rng_seed: int,
                    nonfinite: dict) -> Check:
    """LRP-0 relevance against finite differences of the forward with frozen switches (:mod:`lrpc.gradient`):
    relative error of ⟨R, u⟩ against (F(x + t x ⊙ u) − F(x)) / t over DIRECTIONS seeded directions u. Two sessions:
    the LRP-0 compile (relevance, F(x) and the switches' inputs at x), then the probe (one forward per direction)."""
    from .compiler import compile_loaded

    try:
        at, psess, probes = _gradient_sessions(
            lambda: compile_loaded(path, gradient.ruleset(), output=output, input_shapes=input_shapes), feeds, seed)
    except UnsupportedError as e:
        return Check("gradient", False, None, tol, f"the LRP-0 compile failed: {e}")
    except _ProbeFailed as e:
        return Check("gradient", False, None, tol, f"the probe of the forward failed (please report): {e}")
    nonfinite["LRP-0 (gradient)"] = at.nonfinite
    mask = seed != 0  # F: the sum of the explained values at the seeded positions (the seed is one-hot × explained)
    base = float(np.sum(at.explained[mask], dtype=np.float64))
    fd, lin = [], []
    try:
        others = {k: v for k, v in feeds.items() if k not in probes}
        for u in gradient.directions(feeds, at.inputs, DIRECTIONS, rng_seed):
            for step in gradient.steps(seed.dtype):  # (the first whose run stays finite)
                shifted = {probes[n]: (feeds[n] * (1.0 + step * u[n])).astype(feeds[n].dtype) for n in at.inputs}
                value = float(np.sum(psess.run(None, {**others, **at.refs, **shifted})[0][mask], dtype=np.float64))
                if np.isfinite(value):
                    break
            fd.append((value - base) / step)
            lin.append(sum(float(np.sum(at.relevance[n] * u[n])) for n in at.inputs))
    except Exception as e:  # (a bug of the probe, not of the model: failed, and said so, not an internal error)
        return Check("gradient", False, None, tol, f"the probe of the forward failed (please report): {one_line(e)}")
    err = gradient.relative_error(np.array(fd), np.array(lin))
    floor = gradient.ROUNDOFF * float(np.finfo(seed.dtype).eps)  # (float16: 2e-2; float32: 2.4e-6, below any sane tol)
    why = f"; {np.dtype(seed.dtype).name} round-off" if floor > tol else ""
    tol = max(tol, floor)
    return Check("gradient", err <= tol, err, tol,
                 f"LRP-0 relevance ⟨R, u⟩ against finite differences of the forward (switches frozen) along "
                 f"{DIRECTIONS} random directions x ⊙ u: relative error {err:.2e} (tolerance {tol:.3g}{why})")


class _ProbeFailed(Exception):
    pass


@dataclass
class _AtX:
    """The LRP-0 compile's run at the input x."""
    inputs: list  # the float inputs explained
    relevance: dict  # {input: its LRP-0 relevance}, float64
    refs: dict  # {tensor: its value}: the switches' inputs (:func:`lrpc.gradient.references`)
    explained: np.ndarray  # the explained tensor's values
    nonfinite: int  # NaN/Inf relevance values


def _gradient_sessions(compiled, feeds: dict, seed: np.ndarray) -> tuple:
    """(:class:`_AtX`, the probe's session, {input: the probe's input for it}) of the LRP-0 compile
    (``compiled()``)."""
    loaded = compiled()
    at = _lrp0_at_x(loaded, feeds, seed)
    try:
        probes = gradient.make_probe(loaded.proto, metadata(loaded.proto)[EXPLAINED], at.inputs, SEED)
        return at, _session(loaded), probes
    except Exception as e:  # (a bug of the probe, not of the model)
        raise _ProbeFailed(one_line(e)) from e


def _lrp0_at_x(loaded, feeds: dict, seed: np.ndarray) -> _AtX:
    """The LRP-0 compile's relevance, explained values and switches' inputs at x; leaves them exposed as outputs."""
    model = loaded.proto
    explained = metadata(model)[EXPLAINED]
    inputs = gradient.float_inputs(model, SEED)
    refs = gradient.references(model, explained, inputs)
    gradient.expose(model, [explained, *refs], SEED)
    sess = _session(loaded)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, SEED: seed})))
    relevance = {name: outs[RELEVANCE if RELEVANCE in outs else f"{RELEVANCE}_{name}"].astype(np.float64)
                 for name in inputs}
    return _AtX(inputs, relevance, {r: outs[r] if r in outs else feeds[r] for r in refs}, outs[explained],
                _nonfinite(outs))


def _nonfinite(outs: dict) -> int:
    return int(sum((~np.isfinite(outs[k])).sum() for k in input_relevance_names(outs)))


def _absorbed(first: dict | None, options: composites.Options, tol: float, with_norm_scale) -> str:
    """"" or, where an absolute stabilizer outweighs the layer outputs (freshly initialized GoogLeNet, EfficientNet,
    MobileNetV3, MnasNet: fc outputs ~5e-12 from the input against the default eps 1e-6), a note for the failing
    conservation line saying so and naming the flags that fix it. The scale is read off the first layer that breaks
    (from the output): the share k of its relevance that its stabilizer leaves is about |z| / (|z| + eps), so
    |z| ~ eps k / (1 − k). The explained output itself does not show it: GoogLeNet's logits are their biases (0.03).
    The note is given only where the same compile with ``--stabilizer norm-scale`` (``with_norm_scale()``: its
    conservation figure, one more compile and run) conserves."""
    if first is None or options.stabilizer == "norm-scale" or not first["sum_out"]:
        return ""
    kept = 1.0 - first["stabilizer"] / first["sum_out"]
    eps = options.epsilon if first["rule"].startswith("epsilon") else options.stabilizer_eps
    if not (0 < kept < 1 and eps > 0):
        return ""
    fixed = with_norm_scale()
    if not fixed <= tol:
        return ""
    scale = eps * kept / (1 - kept)
    below = 10.0 ** np.floor(np.log10(tol * scale / 10))
    return (f"; the stabilizer absorbs it: that layer's stabilizer leaves {kept:.1e} of its relevance, its outputs "
            f"are ~{scale:.0e} next to eps {eps:g} (vanishing activations, e.g. a freshly initialized net); with "
            f"--stabilizer norm-scale (relative to each layer's outputs) it conserves ({fixed:.1e}), or lower "
            f"--epsilon and --stabilizer-eps to {below:.0e}")


@dataclass
class Accounts:
    """A run's relevance books: Σ relevance = Σ seed − what the layers absorb (biases, zero denominators,
    stabilizers), shares relative to |Σ seed|; what is left over is ``unaccounted`` (a wrong adjoint or route)."""
    rows: list  # per layer (:func:`_layer_rows`)
    total: float  # Σ input relevance
    seed_sum: float
    bias: float
    zero: float
    stabilizer: float
    unaccounted: float
    magnitude: float  # Σ|input relevance| / |Σ seed|

    @property
    def figure(self) -> float:
        """The larger of the unaccounted and the stabilizers' share (NaN if either is: it fails)."""
        parts = (self.unaccounted, abs(self.stabilizer))
        return float("nan") if any(np.isnan(p) for p in parts) else max(parts)

    @property
    def first_break(self) -> str | None:
        """The first layer (from the output) that sends down other than its rule passes on, or whose stabilizer
        absorbs, by more than the tolerance."""
        return next((r["name"] for r in self.rows[::-1] if r["breaks"]), None)


def accounts(model: onnx.ModelProto, outs: dict, seed: np.ndarray, tol: float) -> Accounts:
    """The :class:`Accounts` of a compile with per-layer sums and accounts (``model``) run to ``outs`` from
    ``seed``; a layer breaks where it is off by more than ``tol`` × |Σ seed|."""
    total = float(sum(np.sum(outs[k], dtype=np.float64) for k in input_relevance_names(outs)))
    size = float(sum(np.sum(np.abs(outs[k]), dtype=np.float64) for k in input_relevance_names(outs)))
    seed_sum = float(np.sum(seed, dtype=np.float64))
    scale = max(abs(seed_sum), 1e-30)
    rows = _layer_rows(model, outs, tol * scale)
    part = {k: sum(r[k] for r in rows) / scale for k in ("bias", "zero", "stabilizer", "absorbed")}
    return Accounts(rows, total, seed_sum, part["bias"], part["zero"], part["stabilizer"],
                    abs((total - seed_sum) / scale + part["absorbed"]), size / scale)


def _accounted(model: onnx.ModelProto, outs: dict, seed: np.ndarray, tol: float) -> tuple[list, float, str]:
    """(per-layer rows, figure, message) of :func:`accounts`."""
    a = accounts(model, outs, seed, tol)
    where = f"; first break (from the output) at layer '{a.first_break}'" if a.first_break else ""
    miss = abs(a.total - a.seed_sum) / max(abs(a.seed_sum), 1e-30)
    return a.rows, a.figure, (f"|Σ relevance − Σ seed| / |Σ seed| = {miss:.2e}: absorbed by biases {a.bias:.2e} "
                              f"and at zero denominators {a.zero:.2e} (by design), by stabilizers {a.stabilizer:.2e}; "
                              f"unaccounted {a.unaccounted:.2e} (tolerance {tol:g} for stabilizers and unaccounted)"
                              f"{where}{_magnitude(a.magnitude)}{_bias_driven(a.bias)}")


def _bias_driven(share: float) -> str:
    """A note where the biases take most of the relevance: the explained output is then mostly their sum, not the
    input's doing (a freshly initialized net's logits, a dead input path)."""
    if not abs(share) > 0.5:
        return ""
    part = f"{share:.0%} of the relevance" if abs(share) <= 10 else f"{share:.2g} × the seed's relevance"
    return (f"; the biases take {part}: the explained output is mostly biases, little of it comes from the input "
            f"(--zero-bias leaves them out of the denominators)")


def _magnitude(ratio: float) -> str:
    """A note where the relevance is far larger than the seed: sums of it are then good to float32 round-off only."""
    if not ratio > 1e3:
        return ""
    return (f"; Σ|relevance| is {ratio:.2g} × |Σ seed|: the sums above are float32 round-off of it (where residual "
            f"sums of branches of both signs cancel: --sum-rule sign-norm; the per-layer table shows where it grows)")


def _layer_rows(model: onnx.ModelProto, outs: dict, tol: float) -> list:
    """Per layer: its sums, what it absorbs (``absorbed`` = Σ out − what its rule passes on = ``bias`` + ``zero`` +
    ``stabilizer``) and whether it breaks: sends down more or less than its rule passes on, or its stabilizer
    absorbs, by more than ``tol`` (absolute)."""
    rows = []
    for layer, s_in, s_out, ratio in layer_sums(model, outs):
        absorbed = s_out - layer["kept"]
        stabilizer = absorbed - layer["bias"] - layer["zero"]
        rows.append({**layer, "sum_in": s_in, "sum_out": s_out, "ratio": ratio, "absorbed": absorbed,
                     "stabilizer": stabilizer,
                     "breaks": bool(abs(s_in - layer["kept"]) > tol or abs(stabilizer) > tol)})
    return rows


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if a.size else 0.0


def _seed_shape(sess, feeds):
    shape = next(i.shape for i in sess.get_inputs() if i.name == "relevance_seed")
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    return [d if isinstance(d, int) else batch for d in shape]


def _conformed(sess, feeds: dict, given: bool) -> dict:
    """``feeds`` checked against the session's inputs (but the seed): one InputError naming the array
    (``--inputs``) or input."""
    from .runtime import conform

    specs = {i.name: i for i in sess.get_inputs() if i.name != SEED}
    if sorted(feeds) != sorted(specs):
        raise InputError(f"--inputs: arrays {sorted(feeds)} given, the model takes {sorted(specs)}")
    what = "--inputs array '{}'" if given else "input '{}'"
    return {name: conform(specs[name], value, what.format(name)) for name, value in feeds.items()}


def _seed_dtype(sess):
    from .runtime import NUMPY_TYPES

    return NUMPY_TYPES[next(i.type for i in sess.get_inputs() if i.name == "relevance_seed")]


def _zero_seed(sess, feeds):
    return np.zeros(_seed_shape(sess, feeds), _seed_dtype(sess))


def _top1_seed(sess, first_output):
    """One-hot of each sample's largest value of the first output (any output shape)."""
    shape = _seed_shape(sess, {"x": first_output})
    seed = np.zeros((shape[0], int(np.prod(shape[1:]))), _seed_dtype(sess))
    flat = np.asarray(first_output).reshape(shape[0], -1)
    if flat.shape[1] == seed.shape[1]:
        seed[np.arange(shape[0]), flat.argmax(axis=1)] = 1.0
    else:  # the explained tensor is not shaped like the first output: seed it all
        seed[:] = 1.0
    return seed.reshape(shape)

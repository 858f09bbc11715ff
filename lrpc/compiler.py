"""The pipeline, top to bottom: load -> canonize passes -> emit relevance -> check -> (save)."""
from __future__ import annotations

import contextlib
import numbers

import onnx

from . import composites
from .contract import LAYERWISE_PREFIXES, RELEVANCE, SEED, TARGET, TOKENS
from .emit import emit, relevance_path
from .errors import InputError, LrpcError, UnsupportedError, one_line, unsupported
from .graph import MIN_OPSET, const_value, export_model, is_const, opset_of, quiet_folding
from .loaded import LoadedModel
from .passes import canonize as _canonize
from .structure import check_structure, structure_of_model


def _as_model(model, input_shapes: dict | None = None) -> tuple[LoadedModel, dict]:
    """``(LoadedModel, signs)``: a path is read; a LoadedModel is taken over (an owned one is built in and used up,
    see :meth:`lrpc.loaded.LoadedModel.transfer`); a caller's ModelProto is never modified. ``signs``: see
    :func:`_check_weights`."""
    loaded = LoadedModel.of(model)
    if input_shapes:
        if not loaded.owned:
            loaded = LoadedModel(onnx.ModelProto.FromString(loaded.proto.SerializeToString()), owned=True)
        with_input_shapes(loaded.proto, input_shapes)
    model = loaded.proto
    _refuse_unsupported_floats(model)
    if not model.graph.output:
        raise InputError("the model's graph has no outputs: nothing to explain")
    if opset_of(model) > onnx.defs.onnx_opset_version():
        raise UnsupportedError(f"the model's opset {opset_of(model)} is newer than the newest this onnx package "
                               f"knows ({onnx.defs.onnx_opset_version()})")
    if opset_of(model) < MIN_OPSET:  # the version converter serializes every tensor: with its data
        loaded.restored()
    return loaded, _scan_weights(loaded)


def _refuse_unsupported_floats(model: onnx.ModelProto) -> None:
    """bfloat16 and the 8/4-bit float types have no numpy type (the passes read weights as numpy arrays) and no
    LRP rule here: one UnsupportedError naming the first tensor and its user, not a failure deep in a pass."""
    names = {getattr(onnx.TensorProto, t): t.lower() for t in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                                                               "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1")
             if hasattr(onnx.TensorProto, t)}
    g = model.graph
    typed = [(t.name, t.data_type) for t in g.initializer] + [
        (v.name, v.type.tensor_type.elem_type) for v in list(g.input) + list(g.output)]
    bad = next(((name, names[t]) for name, t in typed if t in names), None)
    if bad is not None:
        at = _used_by(next((n for n in g.node if bad[0] in n.input), None))
        raise UnsupportedError(f"tensor '{bad[0]}'{at} is {bad[1]}: lrpc compiles float32, float64 and float16 "
                               "models (convert the model's weights and inputs first)")


def _used_by(node) -> str:
    """" used by node 'name' (Op)" for an error message about a tensor ("" without a user)."""
    if node is None:
        return ""
    return f" used by node '{node.name}' ({node.op_type})" if node.name else f" used by a {node.op_type} node"


def with_input_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """``model`` with the given graph inputs' dims fixed (a dim given as -1 or None stays as is), in place."""
    if not isinstance(shapes, dict):
        raise InputError(f"input_shapes: expected {{input name: dims}}, got {shapes!r}")
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            raise InputError(f"--input-shape {name}: the model has no input of that name (inputs: {', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise InputError(f"--input-shape {name}: {len(dims)} dims given, the input has rank {len(shape.dim)}")
        for i, (d, v) in enumerate(zip(shape.dim, dims)):
            if v is None or v == -1:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v < 2**31:
                raise InputError(f"--input-shape {name}: dim {i} must be a positive size or -1 (keep it), got {v}")
            if d.HasField("dim_value") and d.dim_value != v:
                raise InputError(f"--input-shape {name}: dim {i} is {d.dim_value} in the model, {v} given")
            d.Clear()
            d.dim_value = int(v)
    return model


def _scan_weights(loaded: LoadedModel) -> tuple[dict, dict]:
    """One look at the float initializers where they are (:meth:`lrpc.loaded.LoadedModel.values`: deferred weights
    in the file's bytes). Returns ``{name: (TensorProto, all values >= 0)}`` (the emitter's sign analysis looks
    weights up there instead of reading them again) and ``{name: message}`` for those holding -inf (a mask's),
    refused where relevance crosses them (:func:`_refuse_nonfinite_on_path`). NaN and +inf are refused here,
    naming tensor and user: they would make every relevance NaN."""
    import numpy as np

    model = loaded.proto
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, node)
    signs, nonfinite = {}, {}
    for init in model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        values = loaded.values(init)
        # a float64 sum of finite float32/16 values cannot overflow: one pass, no temporary array
        with np.errstate(invalid="ignore", over="ignore"):  # (+inf and -inf sum to NaN, quietly)
            total = values.sum(dtype=np.float64)
        if not np.isfinite(total) and not np.all(np.isfinite(values)):
            bad = int((~np.isfinite(values)).sum())
            message = f"weight '{init.name}'{_used_by(users.get(init.name))} holds {bad} NaN/Inf value(s)"
            if np.any(np.isnan(values) | (values == np.inf)):
                raise InputError(message)
            nonfinite[init.name] = message  # -inf only: a mask, maybe
        signs[init.name] = (init, values.size == 0 or bool(values.min() >= 0))
    return signs, nonfinite


def _refuse_nonfinite_on_path(canon, nonfinite: dict, explain_at: str | None) -> None:
    """-inf weights where relevance flows would make it NaN: refuse a constant with -inf read by a node on the
    relevance path, naming it (and its user where it came from the model). Constants off the path (an attention
    mask built from constants or from an integer input) may hold -inf. A constant mask added to attention scores
    (an Add read only by Softmax nodes) may too: its -inf become the lowest finite value, which the Softmax maps
    to the same 0 (the rules' bias terms then stay finite)."""
    if not nonfinite:
        return
    import numpy as np
    import onnx_graphsurgeon as gs

    for node in relevance_path(canon, explain_at)[2]:
        for i, t in enumerate(node.inputs):
            if not t.name or not is_const(t) or np.dtype(t.dtype).kind != "f":
                continue
            v = const_value(t)
            if np.all(np.isfinite(v)):
                continue
            if node.op == "Add" and all(c.op == "Softmax" for c in node.outputs[0].outputs):
                low = np.where(np.isneginf(v), np.finfo(v.dtype).min, v).astype(v.dtype)
                node.inputs[i] = gs.Constant(f"lrpc/finite/{t.name}", low)
                continue
            raise InputError(nonfinite.get(t.name) or f"weight '{t.name}' used by node '{node.name}' ({node.op}) "
                             f"holds {int((~np.isfinite(v)).sum())} -inf value(s) where relevance flows")


def canonize(model, output: str | None = None, input_shapes: dict | None = None) -> onnx.ModelProto:
    """Canonical forward model (BN folded, pools as depthwise convs, …); outputs numerically unchanged.
    ``model``: a path, a ModelProto or a :class:`lrpc.loaded.LoadedModel` (used up).
    ``input_shapes``: {input name: dims} to fix dynamic dims (e.g. spatial ones)."""
    return canonize_loaded(model, output, input_shapes).restored()


def canonize_loaded(model, output: str | None = None, input_shapes: dict | None = None) -> LoadedModel:
    """:func:`canonize`, the result a LoadedModel (see :func:`compile_loaded`)."""
    loaded, (_, nonfinite) = _as_model(model, input_shapes)
    with _blaming_the_input(loaded.proto):
        canon = _canonize(loaded, output)
        refused = [n for n in relevance_path(canon)[2] if n.name in canon.refused] if canon.refused else []
        if refused:  # (nodes relevance must cross, left as they were: the model is not canonical; others may stay)
            raise unsupported(refused, canon.refused)
        _refuse_nonfinite_on_path(canon, nonfinite, None)
        # (a copy of the moves behind a softmax: nothing reads it)
        canon.graph.cleanup(remove_unused_graph_inputs=False)
        result = loaded.transfer(export_model(canon))
        _check(result.proto)
    return result


def compile(model, rules: str | composites.RuleSet = "epsilon-gamma-box", output: str | None = None,
            layerwise: str | None = None, input_shapes: dict | None = None, seed: str = "input",
            for_provider: str = "cpu", explain_at: str | None = None, **options) -> onnx.ModelProto:
    """Compile ``model`` (ModelProto or path; a :class:`lrpc.loaded.LoadedModel` is used up) into forward +
    relevance graph.

    ``rules``: a composite name, a .json/.toml rule file, or a RuleSet. ``options``: fields of
    :class:`lrpc.composites.Options` (epsilon, stabilizer_eps, stabilizer, gamma, alpha, beta, low, high,
    zero_bias, maxpool, sum_rule). ``layerwise``: None, "sums" or "full" (per-layer relevance outputs, see emit).
    ``seed``: "input" (a ``relevance_seed`` graph input) or "top1" (the seed is made in the graph at each
    sample's top-1 output, named by the output ``relevance_target``: one run, no seed to feed) or "switch" (both:
    the seed input, or the top-1 seed where the bool input ``lrpc/top1`` is fed true; lrpc.Session's top-1 targets
    take one run instead of two). ``for_provider``: "cpu" (default; runs anywhere) or "cuda" (MaxPool's
    backward from its arg-max indices and a scatter, which onnxruntime's CUDA provider runs on the GPU).
    ``input_shapes``: {input name: dims} fixing dynamic dims the compiler cannot resolve. ``explain_at``: the name
    of a float tensor to explain at instead of the float inputs (output ``relevance`` shaped like it). A model of
    token ids (no float input) is explained at its token embedding: output ``relevance_tokens`` [B, T]."""
    return compile_loaded(model, rules, output, layerwise, input_shapes, seed, for_provider, explain_at,
                          **options).restored()


def compile_loaded(model, rules: str | composites.RuleSet = "epsilon-gamma-box", output: str | None = None,
                   layerwise: str | None = None, input_shapes: dict | None = None, seed: str = "input",
                   for_provider: str = "cpu", explain_at: str | None = None, **options) -> LoadedModel:
    """:func:`compile`, the result a :class:`lrpc.loaded.LoadedModel`: the weights of the file read that it holds
    unchanged are still the file's bytes (a model read from a path has its big weights deferred: never copied
    into a proto), written as those bytes by its ``save`` and read by onnxruntime in the file
    (:class:`lrpc.Session`). It keeps the file's bytes in memory while it lives."""
    if isinstance(rules, composites.RuleSet):
        ruleset = rules
    else:
        try:
            opts = composites.Options(**options)
        except TypeError as e:
            raise InputError(str(e)) from None
        ruleset = composites.load_ruleset(rules, opts)
    loaded, (signs, nonfinite) = _as_model(model, input_shapes)
    _refuse_reserved_names(loaded.proto)
    if explain_at is not None:
        _check_explain_at(loaded.proto, explain_at)
    with _blaming_the_input(loaded.proto):
        canon = _canonize(loaded, output)
        canon.weight_signs = signs
        _refuse_nonfinite_on_path(canon, nonfinite, explain_at)
        result = loaded.transfer(emit(canon, ruleset, layerwise, seed, for_provider, explain_at))
        if for_provider == "portable":
            result = LoadedModel(_portable(result.restored()), owned=True)
        _check(result.proto)
    return result


def _portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its constant subgraphs computed (by onnxruntime, as graphsurgeon folds them): weight variants
    such as W⁺ become initializers and convolutions of constants (z-box bounds) their results, which some runtimes
    and converters cannot run (OpenCV's DNN, onnx2torch). A weight both a Conv and a ConvTranspose read is given to
    the ConvTranspose as a copy of its own (OpenVINO 2026.4's CPU plugin computes the ConvTranspose wrong with the
    shared one)."""
    import onnx_graphsurgeon as gs

    with quiet_folding():
        graph = gs.import_onnx(model)
        graph.fold_constants(fold_shapes=False).cleanup()
        folded = gs.export_onnx(graph, do_type_check=False)
    folded.ir_version = model.ir_version
    for field in ("metadata_props", "opset_import"):
        del getattr(folded, field)[:]
        getattr(folded, field).extend(getattr(model, field))
    inits = {t.name: t for t in folded.graph.initializer}
    conv_weights = {n.input[1] for n in folded.graph.node if n.op_type == "Conv"}
    for n in folded.graph.node:
        if n.op_type == "ConvTranspose" and n.input[1] in conv_weights and n.input[1] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[n.input[1]])
            copy.name = f"{n.input[1]}/{n.name or n.output[0]}"
            folded.graph.initializer.append(copy)
            n.input[1] = copy.name
    return folded


@contextlib.contextmanager
def _blaming_the_input(model: onnx.ModelProto):
    """An unexpected failure while compiling ``model`` becomes an InputError saying what is wrong with ``model``
    where strict ONNX shape inference finds it invalid (an attribute out of range, weights of the wrong size: the
    model would not run anyway); otherwise it stays an internal error. The check runs only then, on the model's
    structure taken before the compile (which may build in ``model``)."""
    structure = structure_of_model(model)
    try:
        yield
    except LrpcError:
        raise
    except Exception:
        try:
            onnx.shape_inference.infer_shapes(structure, check_type=True, strict_mode=True, data_prop=True)
        except Exception as e:
            raise InputError(f"invalid model: {one_line(e)}") from None
        raise


def _check_explain_at(model: onnx.ModelProto, name: str) -> None:
    """``explain_at`` names a tensor the model computes or takes as input (one InputError line otherwise)."""
    g = model.graph
    if not isinstance(name, str) or not name:
        raise InputError(f"explain_at: expected a tensor name, got {name!r}")
    if name not in {i.name for i in g.input} | {o for n in g.node for o in n.output}:
        raise InputError(f"explain_at: the model has no tensor '{name}'")


def _refuse_reserved_names(model: onnx.ModelProto) -> None:
    """A tensor named like one lrpc adds (``relevance_seed``, ``relevance``, its ``lrp/…`` intermediates, …) would
    clash with it, and a graph output named ``relevance_…`` would be read as input relevance; a model lrpc already
    compiled has them all."""
    g = model.graph
    if any(p.key == "lrpc.rules" for p in model.metadata_props):
        raise InputError("the model was compiled by lrpc already: compile the original")
    reserved = {SEED, TARGET, RELEVANCE, TOKENS}
    reserved |= {f"relevance_{i.name}" for i in g.input} if len(g.input) > 1 else set()
    prefixes = (*LAYERWISE_PREFIXES, "lrpc/", "lrp/")
    names = [i.name for i in g.input] + [t.name for t in g.initializer] + [out for n in g.node for out in n.output]
    clash = next((n for n in names if n in reserved or n.startswith(prefixes)), None)
    clash = clash or next((o.name for o in g.output if o.name.startswith("relevance_")), None)
    if clash is not None:
        raise InputError(f"tensor '{clash}': the name is taken by lrpc's relevance inputs and outputs (rename it)")


def _check(model: onnx.ModelProto) -> None:
    try:
        check_structure(model, full_check=True)
    except Exception as e:  # an internal bug, not a user error: say so
        raise RuntimeError(f"lrpc produced an invalid model (please report): {str(e).splitlines()[0]}") from e

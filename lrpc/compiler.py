"""The pipeline, top to bottom: load -> canonize passes -> emit relevance -> check -> (save)."""
from __future__ import annotations

import contextlib
import numbers
import os
import sys

import onnx

from . import composites
from .contract import LAYERWISE_PREFIXES, RELEVANCE, SEED, TARGET
from .emit import emit, relevance_path
from .errors import InputError, LrpcError, UnsupportedError, one_line, unsupported
from .graph import MIN_OPSET, check_structure, export_model, release_deferred, structure_of_model
from .model_io import read_model, restore
from .passes import canonize as _canonize
from .passes.normalize_opset import opset_of


class Owned:
    """A ModelProto handed over to :func:`compile` by a caller that read it and will not use it again
    (lrpc explain): the export may then build in it and reuse its weights instead of copying them. ``verbatim``:
    its initializers as the file read stores them (:func:`lrpc.model_io.read_model`; its big weights may be
    deferred: read there, never copied into the proto): the weight scan reads them there, and
    :func:`compile_for_save` can write unchanged weights as those bytes. Both are taken over by the compile
    (``verbatim`` is dropped from here)."""

    def __init__(self, proto: onnx.ModelProto, verbatim: dict | None = None):
        self.proto, self.verbatim = proto, verbatim


def _as_model(model, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, bool, dict, dict]:
    """``(ModelProto, owned, signs, verbatim)``: owned when lrpc read or copied it (the export may then reuse its
    weights); a caller's ModelProto is never modified. ``signs``: see :func:`_check_weights`; ``verbatim``: the
    initializers as stored in the file read (:func:`lrpc.model_io.read_model`: big weights deferred, {} for a
    caller's ModelProto)."""
    owned, verbatim = isinstance(model, (str, os.PathLike, Owned)), {}
    if isinstance(model, Owned):
        handed, model, verbatim = model, model.proto, model.verbatim or {}
        handed.verbatim = None
    elif owned:
        model, verbatim = read_model(model)
    elif not isinstance(model, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    if input_shapes:
        model = _with_input_shapes(model if owned else onnx.ModelProto.FromString(model.SerializeToString()),
                                   input_shapes)
        owned = True
    _refuse_unsupported_floats(model)
    if not model.graph.output:
        raise InputError("the model's graph has no outputs: nothing to explain")
    if opset_of(model) > onnx.defs.onnx_opset_version():
        raise UnsupportedError(f"the model's opset {opset_of(model)} is newer than the newest this onnx package "
                               f"knows ({onnx.defs.onnx_opset_version()})")
    if opset_of(model) < MIN_OPSET:  # the version converter serializes every tensor: with its data
        restore(model, verbatim)
    return model, owned, _check_weights(model, verbatim), verbatim


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


def _with_input_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
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


def _check_weights(model: onnx.ModelProto, verbatim: dict) -> dict:
    """NaN/Inf weights would make every relevance NaN: refuse them up front, naming tensor and user.
    ``verbatim``: the initializers as stored in the file read (:func:`lrpc.model_io.read_model`), looked at in place
    (deferred weights have no data elsewhere); others are read from the ModelProto, which copies them (0.6 s for
    VGG16's 528 MB on a 2-core machine). Returns ``{name: (TensorProto, all values >= 0)}`` for the float
    initializers: the emitter's sign analysis looks weights up there instead of reading them again."""
    import numpy as np
    from onnx import helper, numpy_helper

    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, node)
    signs = {}
    for init in model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims, dtype=np.int64))
        entry = verbatim.get(id(init))
        stored = entry.raw if entry is not None and entry.tensor is init else None
        if stored is not None and sys.byteorder == "little" and len(stored) == count * dtype.itemsize:
            values = np.frombuffer(stored, dtype, count)
        else:
            values = numpy_helper.to_array(init)
        # a float64 sum of finite float32/16 values cannot overflow: one pass, no temporary array
        with np.errstate(invalid="ignore", over="ignore"):  # (+inf and -inf sum to NaN, quietly)
            total = values.sum(dtype=np.float64)
        if not np.isfinite(total) and not np.all(np.isfinite(values)):
            bad = int((~np.isfinite(values)).sum())
            raise InputError(f"weight '{init.name}'{_used_by(users.get(init.name))} holds {bad} NaN/Inf value(s)")
        signs[init.name] = (init, values.size == 0 or bool(values.min() >= 0))
    return signs


def canonize(model, output: str | None = None, input_shapes: dict | None = None) -> onnx.ModelProto:
    """Canonical forward model (BN folded, pools as depthwise convs, …); outputs numerically unchanged.
    ``input_shapes``: {input name: dims} to fix dynamic dims (e.g. spatial ones)."""
    return restore(*canonize_for_save(model, output, input_shapes))


def canonize_for_save(model, output: str | None = None,
                      input_shapes: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """:func:`canonize` and the ``verbatim`` weights for :func:`lrpc.model_io.save_model` (see
    :func:`compile_for_save`)."""
    proto, owned, _, verbatim = _as_model(model, input_shapes)
    with _blaming_the_input(proto):
        canon = _canonize(proto, output, owned, verbatim)
        refused = [n for n in relevance_path(canon)[2] if n.name in canon.refused] if canon.refused else []
        if refused:  # (nodes relevance must cross, left as they were: the model is not canonical; others may stay)
            raise unsupported(refused, canon.refused)
        canon.graph.cleanup(remove_unused_graph_inputs=False)  # (a copy of the moves behind a softmax: nothing reads it)
        result = export_model(canon)
        release_deferred(canon)
        _check(result)
    return result, _still_held(result, verbatim)


def compile(model, rules: str | composites.RuleSet = "epsilon-gamma-box", output: str | None = None,
            layerwise: str | None = None, input_shapes: dict | None = None, seed: str = "input",
            for_provider: str = "cpu", **options) -> onnx.ModelProto:
    """Compile ``model`` (ModelProto or path) into forward + relevance graph.

    ``rules``: a composite name, a .json/.toml rule file, or a RuleSet. ``options``: fields of
    :class:`lrpc.composites.Options` (epsilon, stabilizer_eps, stabilizer, gamma, alpha, beta, low, high,
    zero_bias, maxpool, sum_rule). ``layerwise``: None, "sums" or "full" (per-layer relevance outputs, see emit).
    ``seed``: "input" (a ``relevance_seed`` graph input) or "top1" (the seed is made in the graph at each
    sample's top-1 output, named by the output ``relevance_target``: one run, no seed to feed) or "switch" (both:
    the seed input, or the top-1 seed where the bool input ``lrpc/top1`` is fed true; lrpc.Session's top-1 targets
    take one run instead of two). ``for_provider``: "cpu" (default; runs anywhere) or "cuda" (no op that
    onnxruntime's CUDA provider would run on the CPU: MaxPool's backward scatters instead of MaxUnpool).
    ``input_shapes``: {input name: dims} fixing dynamic dims the compiler cannot resolve."""
    return restore(*compile_for_save(model, rules, output, layerwise, input_shapes, seed, for_provider, **options))


def compile_for_save(model, rules: str | composites.RuleSet = "epsilon-gamma-box", output: str | None = None,
                     layerwise: str | None = None, input_shapes: dict | None = None, seed: str = "input",
                     for_provider: str = "cpu", **options) -> tuple[onnx.ModelProto, dict]:
    """:func:`compile` and the ``verbatim`` weights for :func:`lrpc.model_io.save_model`: the weights of the file
    read that the result holds as loaded are written as the file's bytes (VGG16: 1.1-1.4 s of serializing saved).
    They keep the file's bytes in memory until the write (when the result holds any). A model read from a path
    has its big weights deferred (:func:`lrpc.model_io.read_model`): the result's TensorProtos of those hold no
    data, and the result is a model only together with ``verbatim`` (save it with it, serialize it with
    :func:`lrpc.model_io.serialized`, or :func:`lrpc.model_io.restore` it: :func:`compile` does). Valid while the
    result's tensors are not changed in place: save right away (a tensor renamed, reshaped or retyped is noticed,
    new values written into its data are not)."""
    if isinstance(rules, composites.RuleSet):
        ruleset = rules
    else:
        try:
            opts = composites.Options(**options)
        except TypeError as e:
            raise InputError(str(e)) from None
        ruleset = composites.load_ruleset(rules, opts)
    proto, owned, signs, verbatim = _as_model(model, input_shapes)
    _refuse_reserved_names(proto)
    with _blaming_the_input(proto):
        canon = _canonize(proto, output, owned, verbatim)
        canon.weight_signs = signs
        result = emit(canon, ruleset, layerwise, seed, for_provider)
        release_deferred(canon)
        _check(result)
    return result, _still_held(result, verbatim)


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


def _refuse_reserved_names(model: onnx.ModelProto) -> None:
    """A tensor named like one lrpc adds (``relevance_seed``, ``relevance``, its ``lrp/…`` intermediates, …) would
    clash with it, and a graph output named ``relevance_…`` would be read as input relevance; a model lrpc already
    compiled has them all."""
    g = model.graph
    if any(p.key == "lrpc.rules" for p in model.metadata_props):
        raise InputError("the model was compiled by lrpc already: compile the original")
    reserved = {SEED, TARGET, RELEVANCE} | ({f"relevance_{i.name}" for i in g.input} if len(g.input) > 1 else set())
    prefixes = (*LAYERWISE_PREFIXES, "lrpc/", "lrp/")
    names = [i.name for i in g.input] + [t.name for t in g.initializer] + [out for n in g.node for out in n.output]
    clash = next((n for n in names if n in reserved or n.startswith(prefixes)), None)
    clash = clash or next((o.name for o in g.output if o.name.startswith("relevance_")), None)
    if clash is not None:
        raise InputError(f"tensor '{clash}': the name is taken by lrpc's relevance inputs and outputs (rename it)")


def _still_held(model: onnx.ModelProto, verbatim: dict) -> dict:
    """The entries of ``verbatim`` for tensors ``model`` holds: the others (weights a pass replaced, a model whose
    opset was converted) would keep the file's bytes and the tensors read in memory for nothing."""
    held = {id(t) for t in model.graph.initializer}
    return {k: v for k, v in verbatim.items() if k in held}


def _check(model: onnx.ModelProto) -> None:
    try:
        check_structure(model, full_check=True)
    except Exception as e:  # an internal bug, not a user error: say so
        raise RuntimeError(f"lrpc produced an invalid model (please report): {str(e).splitlines()[0]}") from e

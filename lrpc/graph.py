"""Small helpers over onnx-graphsurgeon: the canonical model, constants, static shapes, a node builder."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import contract
from .errors import InputError, UnsupportedError, one_line, where
from .structure import is_big, structure_of_model

# ops that move elements and keep their values
MOVES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")
ORIGIN_KEY = contract.ORIGIN  # metadata_props key keeping the original op type of rewritten nodes
MIN_OPSET = 17
# the smallest IR version that carries each opset (keeps output loadable by older runtimes)
IR_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


@dataclass
class Canonical:
    """A graph being canonized/explained plus what the passes learnt about it."""

    graph: gs.Graph
    origin: dict[str, str] = field(default_factory=dict)  # node name -> op type before a pass rewrote it
    explained: str | None = None  # name of the tensor whose relevance is seeded
    metadata: dict[str, str] = field(default_factory=dict)
    source: onnx.ModelProto | None = None  # the imported model when lrpc owns it (export reuses its weights)
    weight_signs: dict = field(default_factory=dict)  # initializer name -> (TensorProto, all >= 0), see const_nonneg
    # node making an activation written as several ops -> the activation's input (passes/activation_regions.py)
    activations: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # node name -> why a pass left it as it was (one line)
    output: str | None = None  # the graph output to explain (None: the first); passes/strip_softmax.py reads it
    live: set | None = None  # names of the tensors that depend on the explained ones, once known (emit.relevance_path)

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def refuse(self, node, error: Exception) -> None:
        """Record that a pass cannot bring ``node`` into a form with a rule (the node stays as it was): emission
        names it, with the others it cannot explain, in one error."""
        self.refused[node.name] = one_line(error)


class DeferredValues(LazyValues):
    """The values of a weight read without its data (:class:`lrpc.loaded.LoadedModel`): ``load`` reads them in the
    file's bytes; ``held`` is the TensorProto without data (lrpc's export keeps it, and the file's bytes are
    written for it); ``tensor``, what graphsurgeon's exporter takes (constant folding, a constant exported
    anew), is that TensorProto given its data first."""

    def __init__(self, tensor: onnx.TensorProto, loaded):  # (LazyValues' own would read .tensor)
        self.held, self._loaded = tensor, loaded
        self.shape = list(tensor.dims)
        self.dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        self.nbytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))

    @property
    def tensor(self) -> onnx.TensorProto:
        if not self.held.HasField("raw_data"):
            self.held.raw_data = bytes(self._loaded.raw(self.held))
        return self.held

    def load(self) -> np.ndarray:
        raw = self._loaded.raw(self.held)
        return np.frombuffer(raw, self.dtype.newbyteorder("<")).reshape(self.shape).astype(self.dtype)


def _constants(graph: gs.Graph):
    """The constants of ``graph`` and of its nodes' subgraphs (If/Loop/Scan bodies, which read the outer graph's
    weights too)."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            yield t
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _constants(sub)


def _proto_of(lazy: LazyValues) -> onnx.TensorProto:
    """The TensorProto behind ``lazy``, as it is (a deferred weight's without its data)."""
    return lazy.held if isinstance(lazy, DeferredValues) else lazy.tensor


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to opset :data:`MIN_OPSET` when it is older (so every later stage sees one op vocabulary),
    else ``model`` itself."""
    version = opset_of(model)
    if version >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:
        raise InputError(f"cannot upgrade the model from opset {version} to {MIN_OPSET}: {one_line(e)}") from None
    converted.ir_version = max(converted.ir_version, 8)
    return converted


def import_model(model: onnx.ModelProto, loaded=None) -> Canonical:
    """Turn a ModelProto (opset already normalized) into a :class:`Canonical` with shapes inferred. ``loaded``: the
    :class:`lrpc.loaded.LoadedModel` of ``model``: its deferred weights become :class:`DeferredValues`."""
    graph = gs.import_onnx(model)
    # graphsurgeon's export names a lazily held tensor in place: a Constant node's value (unnamed, named as its
    # output once folded) would be renamed in the caller's model. Those values (small) get copies.
    for t in (v for n in graph.nodes for v in n.attrs.values() if isinstance(v, gs.Constant)):
        if type(t._values) is LazyValues:
            copy = onnx.TensorProto()
            copy.CopyFrom(t._values.tensor)
            t._values = LazyValues(copy)
    if loaded is not None:
        for t in _constants(graph):
            lazy = t._values
            if type(lazy) is LazyValues and loaded.deferred(lazy.tensor) is not None:
                t._values = DeferredValues(lazy.tensor, loaded)
    _apply_shapes(graph, inferred_shapes(structure_of_model(model)), only_missing=False)
    meta = {p.key: p.value for p in model.metadata_props}
    origin = json.loads(meta.pop(ORIGIN_KEY, "{}"))
    return Canonical(graph=graph, origin=origin, metadata=meta)


def export_model(canon: Canonical, extra_meta: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export a graph as a checked ModelProto with a conservative IR version.

    When ``canon.source`` is a ModelProto lrpc owns (read from a file by lrpc), its big initializers that
    the graph still uses unchanged stay where they are: the result is built inside ``canon.source``
    instead of copying all the weights (protobuf copies them slowly); ``canon.source``
    is consumed."""
    graph = canon.graph
    kept = _keep_source_weights(canon)
    saved = {c.name: c._values for c in kept}
    for c in kept:  # a placeholder for the export; the source's tensor is used below
        c._values = np.zeros([0], dtype=np.dtype(c.dtype))
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for c in kept:
            c._values = saved[c.name]
    if kept:
        model = _into_source(canon.source, model, set(saved))
        canon.source = None
    model.ir_version = IR_FOR_OPSET.get(canon.opset, onnx.IR_VERSION)
    meta = dict(canon.metadata)
    live = {n.name for n in graph.nodes}
    origin = {k: v for k, v in canon.origin.items() if k in live}
    if origin:
        meta[ORIGIN_KEY] = json.dumps(origin, sort_keys=True)
    meta.update(extra_meta or {})
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    return model


def _keep_source_weights(canon: Canonical) -> list:
    """The graph's big constants that are still the source model's initializers, unchanged and by name."""
    source = canon.source
    if source is None:
        return []
    names = {t.name for t in source.graph.initializer}
    kept = []
    for t in canon.graph.tensors().values():
        values = getattr(t, "_values", None)
        proto = _proto_of(values) if isinstance(t, gs.Constant) and isinstance(values, LazyValues) else None
        if proto is not None and proto.name == t.name and t.name in names and is_big(proto.data_type, proto.dims):
            kept.append(t)
    return kept


def _into_source(source: onnx.ModelProto, model: onnx.ModelProto, kept: set) -> onnx.ModelProto:
    """``model`` rebuilt inside ``source``: the source's initializers named in ``kept`` stay (not copied),
    its others go, and everything else (nodes, inputs, outputs, small initializers, opsets) is the
    exported model's."""
    g, e = source.graph, model.graph
    for k in reversed(range(len(g.initializer))):
        if g.initializer[k].name not in kept:
            del g.initializer[k]
    g.initializer.extend(t for t in e.initializer if t.name not in kept)
    for name in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        del getattr(g, name)[:]
        getattr(g, name).extend(getattr(e, name))
    g.name, g.doc_string = e.name, e.doc_string
    del source.opset_import[:]
    source.opset_import.extend(model.opset_import)
    del source.functions[:]
    source.functions.extend(model.functions)
    source.producer_name, source.producer_version = model.producer_name, model.producer_version
    del source.metadata_props[:]
    return source


def structure_of_graph(graph: gs.Graph) -> onnx.ModelProto:
    """:func:`structure_of_model` of a graphsurgeon graph, without exporting the weights."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as X

    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    inputs = [X.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    inits = []
    for c in consts.values():
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(c.dtype))
        if is_big(dtype, c.shape):
            inputs.append(onnx.helper.make_tensor_value_info(c.name, dtype, list(c.shape)))
        else:
            inits.append(X.export_tensor_proto(c))
    outputs = [X.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    g = onnx.helper.make_graph([X.export_node(n) for n in graph.nodes], "structure", inputs, outputs, inits)
    from onnx_graphsurgeon.exporters.onnx_exporter import update_import_domains

    model = onnx.helper.make_model(g, opset_imports=list(update_import_domains(graph)))
    model.ir_version = IR_FOR_OPSET.get(int(graph.opset), onnx.IR_VERSION)
    return model


# onnx's shape inference (1.23) leaves the output of these untyped, and with it every tensor after them; their
# output has their first input's type and shape, as an Identity's
SHAPE_AS_INPUT = ("GroupNormalization",)


def inferred_shapes(structure: onnx.ModelProto) -> dict:
    """name -> (numpy dtype, dims) from ONNX shape inference (data propagation on); {} if it fails. ``structure`` (a
    copy: :func:`structure_of_model`) has its nodes of :data:`SHAPE_AS_INPUT` made Identities for it."""
    for node in structure.graph.node:
        if node.op_type in SHAPE_AS_INPUT:
            node.op_type, node.domain = "Identity", ""
            del node.input[1:], node.output[1:], node.attribute[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(structure, data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), dims)
    return out


def name_output_dims(graph: gs.Graph) -> None:
    """Graph output dims that the exporter named apart from every input's (torch's legacy exporter with dynamic axes
    on the inputs only: logits ``[MatMulout_dim_0, MatMulout_dim_1, V]``) take the input dims or sizes that shape
    inference finds for them (``[batch, sequence, V]``), so that a seed shaped like the output says what they are."""
    names = {d for t in graph.inputs for d in (t.shape or []) if isinstance(d, str)}

    def apart(d) -> bool:
        return isinstance(d, str) and d not in names

    outputs = [t for t in graph.outputs if t.shape and any(apart(d) for d in t.shape)]
    if not outputs:
        return
    structure = structure_of_graph(graph)
    for vi in structure.graph.output:
        if any(vi.name == t.name for t in outputs):
            vi.type.tensor_type.ClearField("shape")
    shapes = inferred_shapes(structure)
    for t in outputs:
        dims = shapes.get(t.name, (None, None))[1]
        if dims and len(dims) == len(t.shape):
            t.shape = [i if apart(d) and (i in names or (isinstance(i, int) and i > 0)) else d
                       for d, i in zip(t.shape, dims)]


def _apply_shapes(graph: gs.Graph, shapes: dict, only_missing: bool) -> None:
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs if t.shape is not None}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name in shapes and name not in keep and (t.shape is None or not only_missing):
            t.dtype, t.shape = shapes[name]


def refresh_shapes(canon: Canonical) -> Canonical:
    """Re-infer every intermediate shape after a rewrite (passes may leave stale shapes)."""
    graph = canon.graph
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            t.shape = None
    _apply_shapes(graph, inferred_shapes(structure_of_graph(graph)), only_missing=True)
    return canon


FOLDING_LOGS = False  # onnxruntime's warnings from constant folding's sessions (the command line's --debug: shown)


@contextlib.contextmanager
def quiet_folding():
    """onnx-graphsurgeon's constant folding with its log notes and onnxruntime's off (unless ``FOLDING_LOGS``): the
    sessions it starts take no options, and their graph optimizers warn on stderr (a torchvision ViT or Swin: a
    coloured "UnsqueezeElimination cannot remove node" line per attention). onnxruntime's own severity is set per
    session here, so a caller's global setting is left as it was."""
    import onnxruntime
    from onnx_graphsurgeon.logger import G_LOGGER

    session_class = onnxruntime.InferenceSession

    class Quiet(session_class):
        def __init__(self, model, sess_options=None, *args, **kwargs):
            if sess_options is None and not FOLDING_LOGS:
                sess_options = onnxruntime.SessionOptions()
                sess_options.log_severity_level = 3
            super().__init__(model, sess_options, *args, **kwargs)

    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR  # (its notes on large folded tensors)
    onnxruntime.InferenceSession = Quiet
    try:
        yield
    finally:
        onnxruntime.InferenceSession = session_class
        G_LOGGER.severity = severity


def is_const(t) -> bool:
    return isinstance(t, gs.Constant)


def const_value(t) -> np.ndarray:
    return np.asarray(t.values)


def const_nonneg(t, known: dict | None = None) -> bool:
    """All values of constant ``t`` are >= 0. A weight that graphsurgeon still holds lazily is looked up in
    ``known`` ({name: (TensorProto, nonneg)}, the load-time scan) when it is that very TensorProto (so
    unchanged since the scan), else read without being loaded into the graph (loading copies it twice and
    makes the export convert it back)."""
    lazy = getattr(t, "_values", None)
    if isinstance(lazy, LazyValues):
        proto, nonneg = (known or {}).get(_proto_of(lazy).name, (None, None))
        if proto is _proto_of(lazy):
            return nonneg
    values = lazy.load() if isinstance(lazy, LazyValues) else const_value(t)
    return values.size == 0 or bool(values.min() >= 0)  # (NaN: False)


def static_dims(t, node=None, what: str = "shape") -> list:
    """Shape of ``t`` with all non-batch dims as ints (the batch dim as found), or a clear error."""
    shape = t.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[1:]):
        at = node if node is not None else producer(t)
        at = f" at {where(at)}" if at is not None else ""
        raise UnsupportedError(f"cannot resolve the {what} of tensor '{t.name}'{at}: got {shape}; {shape_advice(t)}")
    return [shape[0]] + [int(d) for d in shape[1:]]


def shape_advice(t) -> str:
    """What to do about a shape of ``t`` lrpc needs static and does not know: fix the dims of the model inputs it is
    computed from where some are symbolic (--input-shape); where all are static, the inference is lrpc's limit."""
    seen, todo, dynamic = set(), [t], []
    while todo:
        u = todo.pop()
        if id(u) in seen or is_const(u) or not u.name:
            continue
        seen.add(id(u))
        if u.inputs:
            todo += node_inputs(u.inputs[0])
        elif u.shape is None or any(not isinstance(d, (int, np.integer)) for d in u.shape):
            dynamic.append(u)
    if dynamic:
        u = dynamic[0]
        return (f"the model input '{u.name}' has dims {u.shape}: fix them with --input-shape {u.name}=D0,D1,... "
                "(-1 keeps a dim)")
    return "shape inference could not infer it, although the model's inputs have static shapes"


def float_dtype(graph: gs.Graph) -> np.dtype:
    """The float type relevance is computed in: the first float graph input's, else float32."""
    for t in graph.inputs:
        if t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating):
            return np.dtype(t.dtype)
    return np.dtype(np.float32)


class Builder:
    """Appends nodes to a graph in execution order, with fresh names under a prefix."""

    def __init__(self, graph: gs.Graph, dtype: np.dtype, prefix: str = "lrp"):
        self.graph = graph
        self.dtype = np.dtype(dtype)
        self.prefix = prefix
        self._n = 0
        self._consts: dict[tuple, gs.Constant] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, dtype=None) -> gs.Constant:
        """A constant in the builder's float dtype (or ``dtype``), shared when equal and small."""
        arr = np.asarray(value, dtype=dtype or self.dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        c = gs.Constant(self.name("c"), arr)
        if key is not None:
            self._consts[key] = c
        return c

    def ints(self, value) -> gs.Constant:
        return self.const(np.asarray(value, dtype=np.int64).reshape(-1), dtype=np.int64)

    def op(self, op: str, inputs, attrs=None, outputs: int = 1, dtype=None, hint: str | None = None):
        """Add one node; numbers/arrays among ``inputs`` become constants. Returns the output(s)."""
        ins = []
        for x in inputs:
            if x is None:
                ins.append(gs.Variable.empty())
            elif isinstance(x, gs.Tensor):
                ins.append(x)
            else:
                ins.append(self.const(x))
        h = hint or op
        outs = [gs.Variable(self.name(h), dtype=dtype or self.dtype) for _ in range(outputs)]
        node = gs.Node(op=op, name=self.name(h), attrs=dict(attrs or {}), inputs=ins, outputs=outs)
        self.graph.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    # small vocabulary used by many propagators
    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def relu(self, x):
        """``Relu(x)``: the output of a ReLU the graph already applies to ``x`` (the forward's activation) when
        there is one, else a new one. Saves a pass per layer on runtimes without common-subexpression elimination
        (onnxruntime merges duplicate Relus itself) and keeps the graph smaller."""
        for user in x.outputs:
            if (user.op == "Relu" and user.inputs and user.inputs[0] is x and user.outputs
                    and any(n is user for n in self.graph.nodes)):
                return user.outputs[0]
        return self.op("Relu", [x])

    def sum(self, terms):
        terms = self._joined(t for t in terms if t is not None)
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else self.op("Sum", terms)

    def _joined(self, terms) -> list:
        """``terms`` with the zero paddings of pieces that tile one axis (the relevance of q, k and v sent back to a
        packed projection) made one Concat of the pieces: one tensor instead of a padded copy per piece and their
        sum."""
        terms, pieces = list(terms), {}
        for t in terms:
            p = t.inputs[0] if len(t.inputs) == 1 else None
            if (p is None or p.op != "Pad" or len(p.inputs) != 2 or not isinstance(p.inputs[1], gs.Constant)
                    or p.attrs.get("mode", "constant") != "constant" or not t.shape):
                continue
            pads = p.inputs[1].values.tolist()
            rank = len(pads) // 2
            axes = [a for a in range(rank) if pads[a] or pads[rank + a]]
            if (len(axes) == 1 and rank == len(t.shape) and min(pads) >= 0  # (a negative pad crops: not a piece)
                    and isinstance(t.shape[axes[0]], (int, np.integer))):
                a = axes[0]
                pieces.setdefault((a, tuple(t.shape)), []).append((pads[a], int(t.shape[a]) - pads[rank + a], t))
        for (axis, shape), group in pieces.items():
            group.sort(key=lambda g: g[0])
            if len(group) < 2 or any(hi != lo for (_, hi, _), (lo, _, _) in zip(group, group[1:])):
                continue
            joined = self.op("Concat", [t.inputs[0].inputs[0] for _, _, t in group], {"axis": axis})
            before, after = group[0][0], shape[axis] - group[-1][1]
            if before or after:
                pads = [0] * (2 * len(shape))
                pads[axis], pads[len(shape) + axis] = before, after
                joined = self.op("Pad", [joined, self.ints(pads)])
            joined.shape = list(shape)
            used = {id(t) for _, _, t in group}
            terms = [t for t in terms if id(t) not in used] + [joined]
        return terms

    def shape_of(self, x):
        return self.op("Shape", [x], dtype=np.int64)

    def reshape_like(self, x, like):
        return self.op("Reshape", [x, self.shape_of(like)])

    def zeros(self, shape):
        """Zeros of the builder's dtype, of the shape held by the int64 tensor ``shape``."""
        return self.op("ConstantOfShape", [shape], {"value": onnx.numpy_helper.from_array(np.zeros(1, self.dtype))})

    def zeros_like(self, x):
        return self.zeros(self.shape_of(x))

    def ones_like(self, x):
        return self.op("Expand", [self.const(1.0), self.shape_of(x)])

    def reduce_sum(self, x, axes, keepdims: int = 1):
        return self.op("ReduceSum", [x, self.ints(axes)], {"keepdims": keepdims})

    def reduce_mean(self, x, axes, keepdims: int = 1):
        return self._reduce("ReduceMean", x, axes, keepdims)

    def reduce_max(self, x, axes, keepdims: int = 1):
        return self._reduce("ReduceMax", x, axes, keepdims)

    def _reduce(self, op: str, x, axes, keepdims: int):
        """ReduceMean/ReduceMax: axes as an input from opset 18 on, an attribute before."""
        if int(self.graph.opset) >= 18:
            return self.op(op, [x, self.ints(axes)], {"keepdims": keepdims})
        return self.op(op, [x], {"axes": list(axes), "keepdims": keepdims})


# --- linear-layer helpers shared by the canonization passes -------------------------------------

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def producer(t):
    return t.inputs[0] if t.inputs else None


def is_layer(canon: Canonical, node) -> bool:
    """``node`` is one of the model's linear layers in normal form: not a pool or Resize that a pass lowered to a
    linear op (those keep their own rule: no BatchNormalization, constant Mul/Add or Pad folds into them), nor a
    layer a pass refused (a non-constant weight)."""
    return (node.op in LINEAR_OPS and canon.origin.get(node.name, node.op) in LINEAR_OPS
            and node.name not in canon.refused)


def only_consumer(graph: gs.Graph, t):
    """The single node reading ``t``, or None if several read it or it is a graph output."""
    if t in graph.outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def out_channels(node) -> int:
    w = node.inputs[1]  # (a Constant's shape is known without loading its values)
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * int(node.attrs.get("group", 1))
    return w.shape[0]  # Gemm in normal form: W is [out, in]


def _set_const(node, index: int, value: np.ndarray, hint: str) -> None:
    c = gs.Constant(f"{node.name}/{hint}", np.ascontiguousarray(value))
    if index < len(node.inputs):
        node.inputs[index] = c
    else:
        node.inputs.append(c)


def bias_of(node) -> np.ndarray:
    """The bias of a linear node in normal form (zeros if it has none), float64."""
    n = out_channels(node)
    if len(node.inputs) > 2 and is_const(node.inputs[2]):
        return np.broadcast_to(const_value(node.inputs[2]).astype(np.float64).reshape(-1), (n,)).copy()
    return np.zeros(n)


def scale_out_channels(node, s: np.ndarray) -> None:
    """Multiply output channel k of a Conv/ConvTranspose/Gemm(transB=1) by ``s[k]`` (weights and bias)."""
    w = const_value(node.inputs[1])
    dtype = w.dtype
    w = w.astype(np.float64)
    s = np.asarray(s, np.float64).reshape(-1)
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        shape = w.shape
        w = (w.reshape(g, shape[0] // g, shape[1], *shape[2:])
             * s.reshape(g, 1, shape[1], *([1] * (len(shape) - 2)))).reshape(shape)
    else:
        w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    b = bias_of(node) * s
    _set_const(node, 1, w.astype(dtype), "W")
    _set_const(node, 2, b.astype(dtype), "B")


def add_bias(node, t: np.ndarray) -> None:
    """Add ``t`` (per output channel) to the bias of a linear node in normal form."""
    dtype = const_value(node.inputs[1]).dtype
    _set_const(node, 2, (bias_of(node) + np.asarray(t, np.float64).reshape(-1)).astype(dtype), "B")


def channel_vector(c: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """If constant ``c`` broadcasts over a rank-``rank`` tensor as one value per channel (axis ``axis``),
    return that [channels] vector, else None."""
    c = np.asarray(c)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)


def rewire_output(graph: gs.Graph, old_node, new_producer) -> None:
    """Make ``new_producer`` produce ``old_node``'s output tensor, dropping ``old_node``."""
    out = old_node.outputs[0]
    old_node.outputs.clear()
    old_node.inputs.clear()
    new_producer.outputs = [out]


def bypass(graph: gs.Graph, node, keep_input: int = 0) -> bool:
    """Remove a data-preserving node by pointing its consumers at its input. False if its output
    is a graph output (then the node stays; its propagator passes relevance through)."""
    src, out = node.inputs[keep_input], node.outputs[0]
    if out in graph.outputs:
        return False
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()
    return True


def toposort(graph: gs.Graph) -> None:
    """Stable iterative topological sort (gs.toposort recurses and overflows on long chains)."""
    nodes = list(graph.nodes)
    made = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    order, state = [], {}
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(nodes[i])
                continue
            if state.get(i):
                continue
            state[i] = 1
            stack.append((i, True))
            for t in reversed(node_inputs(nodes[i])):
                j = made.get(id(t))
                if j is not None and not state.get(j):
                    stack.append((j, False))
    graph.nodes = order


def node_inputs(node) -> list:
    ins = list(node.inputs)
    for attr in node.attrs.values():  # outer-scope tensors read by subgraphs
        if isinstance(attr, gs.Graph):
            ins += [t for n in attr.nodes for t in n.inputs]
    return ins


def insert_after(graph: gs.Graph, node, op: str, const: np.ndarray | None, attrs=None, hint: str = "") -> gs.Node:
    """Insert ``op`` between ``node`` and its output tensor: node -> t -> op(t[, const]) -> old output."""
    out = node.outputs[0]
    mid = gs.Variable(f"{node.name}/{hint or op}_in", dtype=out.dtype)
    node.outputs = [mid]
    ins = [mid] + ([gs.Constant(f"{node.name}/{hint or op}_c", const)] if const is not None else [])
    new = gs.Node(op, f"{node.name}/{hint or op}", dict(attrs or {}), ins, [out])
    graph.nodes.append(new)
    return new

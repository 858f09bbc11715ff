"""Loading and saving ONNX models: validation, external data confinement, atomic writes."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import sys
import tempfile
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from .errors import InputError, UnsupportedError, one_line


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model file; every failure is an :class:`InputError` naming the file."""
    return _read(path, defer=False)[0]


def read_model(path: str | os.PathLike, defer: bool = True) -> tuple[onnx.ModelProto, dict]:
    """:func:`load_model` and ``verbatim``: ``{id(TensorProto): Verbatim}``, the model's initializers as the file
    stores them (:func:`verbatim_bytes` writes them as those bytes; {} for text formats and files this reader does
    not walk). The views keep the file's bytes in memory while the dict lives.

    ``defer``: the big float weights' data stay in the file's bytes (:func:`deferred`): their TensorProtos hold
    no data, which protobuf would copy while parsing (VGG16, 528 MB: ~1 s on a 2-core machine; the model then
    parses in a millisecond). The model is then valid only with its ``verbatim``: :func:`serialized_pieces` and
    :func:`save_model` write those weights as the file's bytes, :func:`restore` gives them their data, and lrpc's
    graph import reads them from the bytes (:func:`lrpc.graph.import_model`). Deferred are float32/64/16
    initializers of more than :data:`BIG` elements stored as raw data in the file (not external), on a
    little-endian machine (raw data is little-endian): exactly the weights lrpc's checker and shape inference
    leave out (:func:`lrpc.graph.structure_of_model`), so they never see a tensor without data."""
    return _read(path, defer)


def _read(path, defer: bool) -> tuple[onnx.ModelProto, dict]:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    stored, stripped = [], 0
    try:
        fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix) or "protobuf"
        data, source = _mapped(p) if fmt == "protobuf" and defer else (p.read_bytes(), None)
        if fmt == "protobuf":
            stored, graph = _walk(memoryview(data))
            if defer and graph is not None and sys.byteorder == "little":
                text, stripped = _skeleton(memoryview(data), stored, graph)
        if not stripped and not isinstance(data, bytes):
            data = bytes(data)
        model = onnx.serialization.registry.get(fmt).deserialize_proto(text if stripped else data, onnx.ModelProto())
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning subclasses
        raise InputError(f"{p}: not an ONNX model ({type(e).__name__}: {one_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    _names_are_text(model, p)
    verbatim = _verbatim_of(model, stored, source)
    if stripped and sum(deferred(i, verbatim) is not None for i in model.graph.initializer) != stripped:  # (not seen)
        model, stripped = onnx.load_model_from_string(bytes(data)), 0
        verbatim = _verbatim_of(model, stored, source)
    if stripped:
        for init in model.graph.initializer:  # left out but not a big float weight of the right size: data back
            raw = deferred(init, verbatim)
            if raw is not None and not _deferrable(init, raw):
                restore_tensor(init, raw)
    _load_external_data(model, p.parent.resolve(), p)
    try:
        from .graph import check_structure

        check_structure(model)
    except Exception as e:
        raise InputError(f"{p}: invalid ONNX model: {one_line(e)}") from None
    return model, verbatim


def _names_are_text(model: onnx.ModelProto, p: Path) -> None:
    """InputError where a name in the graph is not valid UTF-8: protobuf parses such a file and hands the name out
    as bytes, which fail later, anywhere."""
    g = model.graph
    for i, n in enumerate(g.node):
        if not all(isinstance(t, str) for t in (n.name, n.op_type, n.domain, *n.input, *n.output)):
            raise InputError(f"{p}: not a valid ONNX model: node {i} ({n.op_type!r}) has a name that is not UTF-8 text")
    for v in (*g.input, *g.output, *g.initializer, *g.value_info):
        if not isinstance(v.name, str):
            raise InputError(f"{p}: not a valid ONNX model: the tensor name {v.name!r} is not UTF-8 text")


def _mapped(p: Path):
    """The file's bytes as a read-only memory map: pages are read as they are used, not copied into memory first
    (VGG16, 553 MB: `lrpc compile` 1.7-2.3 s -> 0.9-1.3 s with deferred weights). The file must not change while
    lrpc reads it (a file cut short under a map is a crash, not an error); lrpc writes every file it writes
    as a new file renamed into place, so its own outputs and cache entries never change a file being read."""
    import mmap

    with open(p, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        at = int(np.frombuffer(mapped, np.uint8).ctypes.data)
        _OWN_MAPS[at] = weakref.ref(mapped, functools.partial(_forget, at))
        return mapped, Source(p.resolve(), _identity(os.fstat(f.fileno())))


# the maps lrpc made (:func:`_mapped`) by start address, for Source.mapped_elsewhere: a weak reference to the map,
# dead from the moment the map is being unmapped (its reference count is 0 then), so that an address counts as
# lrpc's only while lrpc's map is there (the entry itself goes when the map has gone)
_OWN_MAPS: dict[int, weakref.ref] = {}


def _forget(at: int, ref: weakref.ref) -> None:
    if _OWN_MAPS.get(at) is ref:  # (not a newer map at the same address)
        _OWN_MAPS.pop(at, None)


def _lrpcs_map(at: int) -> bool:
    ref = _OWN_MAPS.get(at)
    return ref is not None and ref() is not None


class Source(NamedTuple):
    """The file a model was read from (:func:`read_model`): its resolved path and what identifies the very file
    that was read (device, inode, size, modification time)."""
    path: Path
    identity: tuple

    def unchanged(self) -> bool:
        """The path still names the file that was read."""
        try:
            return _identity(os.stat(self.path)) == self.identity
        except OSError:
            return False

    def mapped_elsewhere(self) -> bool:
        """Something else in this process maps the file (onnxruntime keeps the external data it does not copy
        mapped for the life of the session, which would then depend on the file); lrpc's own live maps of it do
        not count (``lrpc check`` reads a model once for each of its compiles). True when this cannot be told (no
        /proc)."""
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return True
        inode = str(self.identity[1])
        return any(len(f) > 4 and f[4] == inode and not _lrpcs_map(int(f[0].split("-")[0], 16))
                   for f in (line.split(maxsplit=5) for line in lines))


def file_identity(path: str | os.PathLike) -> tuple | None:
    """What identifies the file ``path`` names now (device, inode, size, modification time); None for none."""
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def still_the_file(path: str | os.PathLike, identity: tuple | None, tool: str) -> None:
    """For tools that read a model file more than once (``lrpc check``, ``lrpc inspect``: once per compile): an
    InputError when ``path`` no longer names the file it named when ``identity`` was taken (their results would
    mix two models)."""
    if file_identity(path) != identity:
        raise InputError(f"{path}: the file changed while {tool} read it (it is read once per compile): run it again")


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class StoredTensor(NamedTuple):
    """One initializer as the file lrpc read holds it: views into the file's bytes, no copies."""
    name: str
    raw: memoryview | None  # its raw_data; None for external data or typed fields
    whole: memoryview | None  # the serialized TensorProto; None for external data (loading it changes the proto)
    field: tuple[int, int]  # where its GraphProto.initializer field (key, length, tensor) lies in the file
    raw_fields: tuple  # (start, end) of each of its raw_data fields in the file, key and length included
    raw_at: int | None = None  # where ``raw`` starts in the file


def raw_weights(data: bytes) -> list[StoredTensor]:
    """The main graph's initializers in a serialized ModelProto, in their order (:class:`StoredTensor`: reading
    ``TensorProto.raw_data`` copies the bytes: 0.6 s for VGG16's 528 MB on a 2-core machine). A field given twice
    counts as protobuf counts it: the last one. [] for a file with (unknown) group fields, which this reader does
    not walk: the weights are then read from the ModelProto."""
    return _walk(memoryview(data))[0]


def _walk(view: memoryview) -> tuple[list[StoredTensor], tuple | None]:
    """:func:`raw_weights` and where the file's one ModelProto.graph field lies (``(field start, (graph start,
    graph end))``; None when it is given more than once: protobuf merges those)."""
    out, graphs = [], []
    try:
        graphs = [(at, span) for number, wire, span, at in _fields(view, 0, len(view)) if (number, wire) == (7, 2)]
        for _, graph in graphs:
            for number, wire, tensor, at in _fields(view, *graph):
                if (number, wire) != (5, 2):  # GraphProto.initializer
                    continue
                fields, raws = {}, []
                for n, w, v, f in _fields(view, *tensor):
                    if (n, w) in ((8, 2), (9, 2), (13, 2), (14, 0)):
                        fields[n] = v
                    if (n, w) == (9, 2):
                        raws.append((f, v[1]))
                name = bytes(view[slice(*fields[8])]).decode() if 8 in fields else ""
                external = 13 in fields or fields.get(14) == onnx.TensorProto.EXTERNAL
                raw = view[slice(*fields[9])] if 9 in fields and not external else None
                out.append(StoredTensor(name, raw, None if external else view[slice(*tensor)], (at, tensor[1]),
                                        tuple(raws), fields[9][0] if raw is not None else None))
    except ValueError:
        return [], None
    return out, graphs[0] if len(graphs) == 1 else None


def _skeleton(view: memoryview, stored: list[StoredTensor], graph: tuple) -> tuple[bytes, int]:
    """``(the file's ModelProto without the raw data of its big initializers, how many were left out)``: the
    bytes around them copied, the lengths of the tensors and of the graph that held them made anew."""
    (graph_at, (_, end)), pieces, pos, stripped = graph, [], graph[1][0], 0
    for t in stored:
        if t.raw is None or len(t.raw) <= BIG * 2:  # (float16: 2 bytes an element)
            continue
        (field_at, field_end), tensor = t.field, []
        at = field_end - len(t.whole)
        for raw_at, raw_end in t.raw_fields:
            tensor.append(view[at:raw_at])
            at = raw_end
        tensor.append(view[at:field_end])
        length = sum(map(len, tensor))
        pieces += [view[pos:field_at], _key_and_length(5, length), *tensor]
        pos, stripped = field_end, stripped + 1
    pieces.append(view[pos:end])
    body = b"".join(pieces)
    return b"".join([view[:graph_at], _key_and_length(7, len(body)), body, view[end:]]), stripped


BIG = 4096  # elements; smaller tensors (shape constants, biases) keep their values for data propagation
_DEFERRABLE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2}


def is_big(data_type: int, dims) -> bool:
    """A float tensor of more than :data:`BIG` elements: one the checker and shape inference see as a graph input
    of its shape (:func:`lrpc.graph.structure_of_model`)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return data_type in floats and int(np.prod(list(dims) or [1])) > BIG


def _deferrable(init: onnx.TensorProto, raw: memoryview) -> bool:
    size = _DEFERRABLE.get(init.data_type)
    return (size is not None and is_big(init.data_type, init.dims) and init.data_location == onnx.TensorProto.DEFAULT
            and len(raw) == size * int(np.prod(list(init.dims), dtype=np.int64)) and not _typed(init))


def _typed(init: onnx.TensorProto) -> bool:
    """``init`` holds values in a typed field (the float types' ones)."""
    return bool(len(init.float_data) or len(init.double_data) or len(init.int32_data))


def deferred(init: onnx.TensorProto, verbatim: dict | None) -> memoryview | None:
    """The file's bytes of the data of ``init`` when it was read without them (:func:`read_model`), else None."""
    entry = verbatim.get(id(init)) if verbatim else None
    if entry is None or entry.tensor is not init or entry.raw is None or init.HasField("raw_data"):
        return None
    return entry.raw


def restore(model: onnx.ModelProto, verbatim: dict | None) -> onnx.ModelProto:
    """Give each deferred weight of ``model`` (:func:`read_model`) its data, copied out of the file's bytes (the
    tensors stay the same objects: ``verbatim`` still writes them as the file's bytes). Returns ``model``."""
    for init in model.graph.initializer:
        raw = deferred(init, verbatim)
        if raw is not None:
            restore_tensor(init, raw)
    return model


def restore_tensor(init: onnx.TensorProto, raw: memoryview) -> onnx.TensorProto:
    """``init`` given its data ``raw`` (the file's bytes of a deferred weight) unless it holds data already."""
    if not init.HasField("raw_data"):
        init.raw_data = bytes(raw)
    return init


class Verbatim(NamedTuple):
    """A loaded initializer whose serialization is ``whole``, the file's bytes it was parsed from."""
    tensor: onnx.TensorProto
    whole: memoryview
    name: str
    dims: list
    data_type: int
    raw: memoryview | None  # its raw_data in the file (None: typed fields); the only copy of a deferred weight's
    raw_at: int | None = None  # where ``raw`` starts in the file
    source: Source | None = None  # the file (a memory-mapped read)


def _verbatim_of(model: onnx.ModelProto, stored: list, source: Source | None = None) -> dict:
    """``{id(TensorProto): Verbatim}`` for the initializers of ``model`` found in the file (:func:`raw_weights`):
    those it holds one to one with ``model``'s, by position and name; {} when they do not line up."""
    inits = model.graph.initializer
    if len(stored) != len(inits):
        return {}
    return {id(init): Verbatim(init, t.whole, init.name, list(init.dims), init.data_type, t.raw, t.raw_at, source)
            for init, t in zip(inits, stored) if t.name == init.name and t.whole is not None}


def for_runtime(model: onnx.ModelProto, verbatim: dict | None) -> tuple[bytes, Source | None]:
    """``(bytes, source)``: ``model`` serialized for onnxruntime with its deferred weights (:func:`read_model`) as
    external data in the file they were read from (``source``: its folder is where onnxruntime looks them up,
    :func:`lrpc.runtime.inference_session`), so that onnxruntime reads them from the file once instead of parsing
    them out of a model-sized buffer (VGG16: session start 3.0 -> 1.6 s, peak 3.0 -> 1.9 GB). ``source`` is None
    (and the bytes are :func:`serialized`'s) when the model has no deferred weight, or they do not all come from
    one file that is still the one read, or its name is not UTF-8. The caller checks after the session starts
    that the file is still the one read and that the session does not map it (:class:`Source`)."""
    sources = {verbatim[id(init)].source for init in model.graph.initializer if deferred(init, verbatim) is not None}
    source = sources.pop() if len(sources) == 1 else None
    if source is None or not source.unchanged() or not _utf8(source.path.name):
        return serialized(model, verbatim), None
    return b"".join(serialized_pieces(model, verbatim, external=True)), source


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # (a file name that is not UTF-8: a protobuf string cannot hold it)
        return False


def _external_reference(init: onnx.TensorProto, entry: Verbatim) -> bytes:
    """``init`` (a deferred weight) serialized as external data at its place in the file it was read from."""
    ref = onnx.TensorProto()
    ref.CopyFrom(init)  # (no data to copy)
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", entry.source.path.name), ("offset", entry.raw_at), ("length", len(entry.raw))):
        item = ref.external_data.add()
        item.key, item.value = key, str(value)
    return ref.SerializeToString()


def serialized(model: onnx.ModelProto, verbatim: dict | None = None) -> bytes:
    """``model`` as one bytes object: :func:`serialized_pieces` joined (VGG16: ``SerializeToString`` 2.0-2.7 s, the
    pieces 1.3 s, with ``verbatim`` weights a join of the file's bytes, 0.2-0.3 s)."""
    return b"".join(serialized_pieces(model, verbatim))


def verbatim_bytes(init: onnx.TensorProto, verbatim: dict | None):
    """The file's bytes of ``init`` when it is a tensor in ``verbatim`` (``{id(TensorProto): Verbatim}``, made at
    load time) that is still as loaded, else None. lrpc never writes new values into a loaded TensorProto (a pass
    that changes a weight makes a new tensor, the export keeps only tensors graphsurgeon never loaded: see
    :func:`lrpc.graph.export_model`, and :func:`restore` writes back the file's own bytes), so being that very
    object is being unchanged; name, dims and type are compared as well, which costs nothing (reading
    ``raw_data`` or ``ByteSize()`` would cost as much as serializing it). A deferred weight (:func:`read_model`)
    that changed gets its data here, to be serialized anew."""
    entry = verbatim.get(id(init)) if verbatim else None
    if entry is None or entry.tensor is not init:
        return None
    if (init.name != entry.name or list(init.dims) != entry.dims or init.data_type != entry.data_type
            or init.data_location != onnx.TensorProto.DEFAULT):
        raw = deferred(init, verbatim)
        if raw is not None:
            restore_tensor(init, raw)
        return None
    return entry.whole


def _must_hold_data(init: onnx.TensorProto) -> None:
    """A deferred weight about to be serialized without its data (its ``verbatim`` was not handed over) would
    make a model no runtime loads: say so here."""
    if (not init.HasField("raw_data") and init.data_type in _DEFERRABLE and is_big(init.data_type, init.dims)
            and init.data_location == onnx.TensorProto.DEFAULT and not _typed(init)):
        raise RuntimeError(f"lrpc: weight '{init.name}' was read without its data and is serialized without the "
                           "file's bytes it was read from (please report)")


_EXTERNAL_FILES: dict[Path, frozenset] = {}


def external_data_files(path: str | os.PathLike) -> frozenset:
    """The external data files the model at ``path`` referred to when lrpc last read it (empty if none or never
    read): inputs too, which an output must not overwrite."""
    return _EXTERNAL_FILES.get(Path(path).resolve(), frozenset())


def _load_external_data(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Load external tensors, refusing any location outside the model's folder."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    files = set()
    _EXTERNAL_FILES.pop(path.resolve(), None)
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"{path}: external data of tensor '{tensor.name}' points outside the model's folder: {location}")
        if not target.is_file():
            raise InputError(f"{path}: external data file of tensor '{tensor.name}' is missing: {location}")
        files.add(target)
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as e:
            raise InputError(f"{path}: cannot read external data of tensor '{tensor.name}': {one_line(e)}") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    if files:
        _EXTERNAL_FILES[path.resolve()] = frozenset(files)


MAX_FILE_BYTES = 2**31 - 1  # protobuf's limit on a serialized message


def save_model(model: onnx.ModelProto, path: str | os.PathLike, protect: list[str | os.PathLike] = (),
               verbatim: dict | None = None) -> None:
    """Write ``model`` atomically (temp file + rename); refuse to overwrite any path in ``protect``.
    ``verbatim``: see :func:`serialized_pieces`."""
    write_atomic(lambda: serialized_pieces(model, verbatim), path, protect)


def serialized_pieces(model: onnx.ModelProto, verbatim: dict | None = None, external: bool = False) -> list:
    """``model`` serialized, as pieces to write one after the other: the model and its graph serialized without
    the weights, split where the graph and the initializers go (fields are serialized in field-number order), and
    each initializer serialized on its own. Without ``verbatim`` the pieces are the bytes of ``SerializeToString``,
    exactly: serializing a whole model at once makes one buffer of the file's size and copies it into a bytes
    object (VGG16, 553 MB: 2.0-2.7 s on a 2-core machine, the pieces 1.3 s; `lrpc compile` peak 1.70 -> 1.50 GB).
    Initializers still as read from a file (``verbatim``, see :func:`verbatim_bytes`) are not serialized: the
    file's bytes they were parsed from are written instead (views, no copy: VGG16 1.1-1.4 s -> 0.002 s; the same
    message, and the same bytes for a file protobuf wrote). A model or graph with fields this protobuf build does
    not know is serialized whole. UnsupportedError past 2 GB (the limit of a protobuf file; SerializeToString
    itself would raise ValueError). ``external``: deferred weights as references into their file instead
    (:func:`for_runtime`)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    graph = model.graph
    if not model.HasField("graph") or len(UnknownFieldSet(model)) or len(UnknownFieldSet(graph)):
        return [restore(model, verbatim).SerializeToString()]
    model_head, model_tail = _split_before(_without(model, "graph").SerializeToString(), 7)
    graph_head, graph_tail = _split_before(_without(graph, "initializer").SerializeToString(), 5)
    body = [graph_head]
    for init in graph.initializer:
        tensor = verbatim_bytes(init, verbatim)
        if external and tensor is not None and deferred(init, verbatim) is not None:
            tensor = _external_reference(init, verbatim[id(init)])
        if tensor is None:
            _must_hold_data(init)
            tensor = init.SerializeToString()
        body += [_key_and_length(5, len(tensor)), tensor]
    body.append(graph_tail)
    pieces = [model_head, _key_and_length(7, sum(map(len, body))), *body, model_tail]
    size = sum(map(len, pieces))
    if size > MAX_FILE_BYTES:
        raise UnsupportedError(f"the model to write is {size / 2**30:.2f} GB: an ONNX file holds at most 2 GB")
    return pieces


def _without(message, name: str):
    """A copy of ``message`` without its field ``name`` (that field is not read, so not copied)."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == name:
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(copy, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _split_before(data: bytes, number: int) -> tuple[bytes, bytes]:
    """``data`` (a serialized message) split before its first field numbered above ``number``."""
    pos = next((start for field, _, _, start in _fields(data, 0, len(data)) if field > number), len(data))
    return data[:pos], data[pos:]


def _fields(data, start: int, end: int):
    """``(number, wire type, value, offset)`` of each field of the message serialized in ``data[start:end]``: the
    value of a varint, the ``(start, end)`` of a length-delimited field's bytes, None for fixed-width fields; the
    offset where the field begins."""
    pos = start
    while pos < end:
        key, at = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = (at, at + length), at + length
        elif wire in (1, 5):
            value, at = None, at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, wire, value, pos
        pos = at


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _key_and_length(number: int, length: int) -> bytes:
    """The key of length-delimited field ``number`` and ``length``, as varints."""
    out = bytearray()
    for value in (number << 3 | 2, length):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def write_atomic(data, path: str | os.PathLike, protect=()) -> None:
    """Write ``data`` (bytes, str, a list of bytes pieces, or a callable making one of those once the path is
    checked) to ``path`` through a temp file + rename, with the permissions a plain ``open`` would give (umask
    applied); refuse to overwrite any of ``protect`` (:func:`refuse_inputs`); errors name the path.

    A symbolic link at ``path`` stays: the file it points to is replaced. A path naming one of this process's open
    files (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``) is written to that descriptor, where it stands (a
    redirected stdout keeps what was printed before); another path that is not a regular file (``/dev/null``, a
    FIFO) is written into: there is nothing to replace, and a rename would put a regular file where it was."""
    p = Path(path)
    refuse_inputs(p, protect)
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an output file path")
    descriptor = _descriptor(p)
    special = descriptor is None and p.exists() and not p.is_file()
    if p.is_symlink() and descriptor is None and not special:  # (a dangling link: its target is created)
        p = Path(os.path.realpath(p))
    if not p.parent.exists():
        raise InputError(f"{p.parent}: output folder does not exist")
    if callable(data):
        data = data()
    if isinstance(data, str):
        data = data.encode()
    pieces = data if isinstance(data, list) else [data]
    try:
        if descriptor is not None:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:
                    try:
                        view = view[os.write(descriptor, view):]
                    except BlockingIOError:  # (a non-blocking pipe that is full: wait until it takes more)
                        select.select([], [descriptor], [])
            return
        if special:
            with open(p, "wb") as f:
                for piece in pieces:
                    f.write(piece)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise InputError(f"{p}: cannot write ({e.strerror or type(e).__name__})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                f.write(piece)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        _replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{p}: cannot write ({e.strerror or type(e).__name__})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _descriptor(p: Path) -> int | None:
    """The open file descriptor of this process that ``p`` names, else None: ``/dev/fd/N``, ``/proc/self/fd/N``
    (``thread-self``, this process's pid), or any path to the very file stdout or stderr is (``/dev/stdout``, a
    link to it, the log file stdout is redirected into)."""
    text = os.path.normpath(str(p))
    m = re.fullmatch(r"/(?:dev/fd|proc/(?:self|thread-self|(\d{1,9}))/fd)/(\d{1,9})", text, flags=re.ASCII)
    if text in ("/dev/stdin", "/dev/stdout", "/dev/stderr"):
        return ("/dev/stdin", "/dev/stdout", "/dev/stderr").index(text)
    if m and (m.group(1) is None or int(m.group(1)) == os.getpid()):
        candidates = [int(m.group(2))]
    else:
        candidates = [1, 2]
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    for fd in candidates:
        with contextlib.suppress(OSError):
            open_file = os.fstat(fd)
            if (open_file.st_dev, open_file.st_ino) == (st.st_dev, st.st_ino):
                return fd
    return None


def protected(protect) -> dict:
    """``protect`` (paths or ``(path, what)`` pairs) as ``{(device, inode): (path, what)}`` of the files that
    exist, for :func:`refuse_inputs` (one stat per file, however many outputs are checked against them)."""
    if isinstance(protect, dict):
        return protect
    out = {}
    for entry in protect:
        q, what = entry if isinstance(entry, tuple) else (entry, "the model")
        if q is None:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(q)
            out.setdefault((st.st_dev, st.st_ino), (q, what))
    return out


def refuse_inputs(path: str | os.PathLike, protect) -> None:
    """InputError if ``path`` is one of the files in ``protect`` (through any symbolic or hard link): a
    :func:`protected` dict, or paths and ``(path, what)`` pairs, ``what`` naming the file in the message
    (default "the model")."""
    try:
        st = os.stat(path)
    except OSError:
        return
    hit = protected(protect).get((st.st_dev, st.st_ino))
    if hit is not None:
        raise InputError(f"{Path(path)}: refusing to overwrite an input file ({hit[1]})")


def _replace(tmp: str, path: Path) -> None:
    """``os.replace(tmp, path)``; onto an existing file on Linux as an atomic exchange of the two names (renameat2
    RENAME_EXCHANGE) and the old file's removal. ext4 writes a file's data out before a rename over another file
    (its ``auto_da_alloc`` guard for programs that do not fsync): replacing a 553 MB output cost 1.2-2.1 s more
    than writing a new one. Either way a reader of ``path`` sees the old file or the whole new one; after a power
    loss the new one is as safe as a newly written file (lrpc does not fsync its outputs). Where the exchange is
    not to be had (another system, a file system without it), ``os.replace``."""
    if sys.platform.startswith("linux") and path.exists() and not path.is_symlink() and _exchange(tmp, path):
        with contextlib.suppress(OSError):  # (the new file is in place: this only removes the old one)
            os.unlink(tmp)
        return
    os.replace(tmp, path)


def _exchange(a: str, b: Path) -> bool:
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # (no renameat2 in this C library)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0

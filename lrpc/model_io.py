"""Loading and saving ONNX models: validation, external data confinement, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import onnx

from .errors import InputError, UnsupportedError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model file; every failure is an :class:`InputError` naming the file."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, bytes | None]:
    """:func:`load_model` and the file's bytes when it is a binary protobuf file (None for text formats):
    :func:`raw_weights` finds the weights in them without copying."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    try:
        data = p.read_bytes()
        fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix) or "protobuf"
        model = onnx.serialization.registry.get(fmt).deserialize_proto(data, onnx.ModelProto())
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning subclasses
        raise InputError(f"{p}: not an ONNX model ({type(e).__name__}: {_first_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    _load_external_data(model, p.parent.resolve(), p)
    try:
        from .graph import check_structure

        check_structure(model)
    except Exception as e:
        raise InputError(f"{p}: invalid ONNX model: {_first_line(e)}") from None
    return model, (data if fmt == "protobuf" else None)


class StoredTensor(NamedTuple):
    """One initializer as the file lrpc read holds it: views into the file's bytes, no copies."""
    name: str
    raw: memoryview | None  # its raw_data; None for external data or typed fields
    whole: memoryview | None  # the serialized TensorProto; None for external data (loading it changes the proto)


def raw_weights(data: bytes) -> list[StoredTensor]:
    """The main graph's initializers in a serialized ModelProto, in their order (:class:`StoredTensor`: reading
    ``TensorProto.raw_data`` copies the bytes: 0.6 s for VGG16's 528 MB on a 2-core machine). A field given twice
    counts as protobuf counts it: the last one. [] for a file with (unknown) group fields, which this reader does
    not walk: the weights are then read from the ModelProto."""
    view, out = memoryview(data), []
    try:
        graphs = [span for number, wire, span, _ in _fields(view, 0, len(view)) if (number, wire) == (7, 2)]
        for graph in graphs:  # ModelProto.graph (protobuf merges repeated occurrences)
            for number, wire, tensor, _ in _fields(view, *graph):
                if (number, wire) != (5, 2):  # GraphProto.initializer
                    continue
                fields = {n: v for n, w, v, _ in _fields(view, *tensor) if (n, w) in ((8, 2), (9, 2), (13, 2), (14, 0))}
                name = bytes(view[slice(*fields[8])]).decode() if 8 in fields else ""
                external = 13 in fields or fields.get(14) == onnx.TensorProto.EXTERNAL
                raw = view[slice(*fields[9])] if 9 in fields and not external else None
                out.append(StoredTensor(name, raw, None if external else view[slice(*tensor)]))
    except ValueError:
        return []
    return out


class Verbatim(NamedTuple):
    """A loaded initializer whose serialization is ``whole``, the file's bytes it was parsed from."""
    tensor: onnx.TensorProto
    whole: memoryview
    name: str
    dims: list
    data_type: int


def verbatim_map(model: onnx.ModelProto, data: bytes | None) -> dict:
    """``{id(TensorProto): Verbatim}`` for the initializers of ``model`` found in ``data``, the bytes of the file
    ``model`` was parsed from (:func:`read_model`; None: {}). See :func:`verbatim_of`."""
    return verbatim_of(model, raw_weights(data)) if data is not None else {}


def verbatim_of(model: onnx.ModelProto, stored: list) -> dict:
    """:func:`verbatim_map` from the file's initializers already walked (:func:`raw_weights`): those it holds one
    to one with ``model``'s, by position and name; {} when they do not line up."""
    inits = model.graph.initializer
    if len(stored) != len(inits):
        return {}
    return {id(init): Verbatim(init, t.whole, init.name, list(init.dims), init.data_type)
            for init, t in zip(inits, stored) if t.name == init.name and t.whole is not None}


def serialized(model: onnx.ModelProto, verbatim: dict | None = None) -> bytes:
    """``model`` as one bytes object: :func:`serialized_pieces` joined (VGG16: ``SerializeToString`` 2.0-2.7 s, the
    pieces 1.3 s, with ``verbatim`` weights a join of the file's bytes, 0.2-0.3 s)."""
    return b"".join(serialized_pieces(model, verbatim))


def verbatim_bytes(init: onnx.TensorProto, verbatim: dict | None):
    """The file's bytes of ``init`` when it is a tensor in ``verbatim`` (``{id(TensorProto): Verbatim}``, made at
    load time) that is still as loaded, else None. lrpc never writes into a loaded TensorProto (a pass that changes a
    weight makes a new tensor, and the export keeps only tensors graphsurgeon never loaded: see
    :func:`lrpc.graph.export_model`), so being that very object is being unchanged; name, dims and type are
    compared as well, which costs nothing (reading ``raw_data`` or ``ByteSize()`` would cost as much as
    serializing it)."""
    entry = verbatim.get(id(init)) if verbatim else None
    if (entry is None or entry.tensor is not init or init.name != entry.name or list(init.dims) != entry.dims
            or init.data_type != entry.data_type or init.data_location != onnx.TensorProto.DEFAULT):
        return None
    return entry.whole


def _load_external_data(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Load external tensors, refusing any location outside the model's folder."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"{path}: external data of tensor '{tensor.name}' points outside the model's folder: {location}")
        if not target.is_file():
            raise InputError(f"{path}: external data file of tensor '{tensor.name}' is missing: {location}")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as e:
            raise InputError(f"{path}: cannot read external data of tensor '{tensor.name}': {_first_line(e)}") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


MAX_FILE_BYTES = 2**31 - 1  # protobuf's limit on a serialized message


def save_model(model: onnx.ModelProto, path: str | os.PathLike, protect: list[str | os.PathLike] = (),
               verbatim: dict | None = None) -> None:
    """Write ``model`` atomically (temp file + rename); refuse to overwrite any path in ``protect``.
    ``verbatim``: see :func:`serialized_pieces`."""
    write_atomic(lambda: serialized_pieces(model, verbatim), path, protect)


def serialized_pieces(model: onnx.ModelProto, verbatim: dict | None = None) -> list:
    """``model`` serialized, as pieces to write one after the other: the model and its graph serialized without
    the weights, split where the graph and the initializers go (fields are serialized in field-number order), and
    each initializer serialized on its own. Without ``verbatim`` the pieces are the bytes of ``SerializeToString``,
    exactly: serializing a whole model at once makes one buffer of the file's size and copies it into a bytes
    object (VGG16, 553 MB: 2.0-2.7 s on a 2-core machine, the pieces 1.3 s; `lrpc compile` peak 1.70 -> 1.50 GB).
    Initializers still as read from a file (``verbatim``, see :func:`verbatim_bytes`) are not serialized: the
    file's bytes they were parsed from are written instead (views, no copy: VGG16 1.1-1.4 s -> 0.002 s; the same
    message, and the same bytes for a file protobuf wrote). A model or graph with fields this protobuf build does
    not know is serialized whole. UnsupportedError past 2 GB (the limit of a protobuf file; SerializeToString
    itself would raise ValueError)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    graph = model.graph
    if not model.HasField("graph") or len(UnknownFieldSet(model)) or len(UnknownFieldSet(graph)):
        return [model.SerializeToString()]
    model_head, model_tail = _split_before(_without(model, "graph").SerializeToString(), 7)
    graph_head, graph_tail = _split_before(_without(graph, "initializer").SerializeToString(), 5)
    body = [graph_head]
    for init in graph.initializer:
        tensor = verbatim_bytes(init, verbatim)
        tensor = init.SerializeToString() if tensor is None else tensor
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


def write_atomic(data, path: str | os.PathLike, protect: list[str | os.PathLike] = ()) -> None:
    """Write ``data`` (bytes, str, a list of bytes pieces, or a callable making one of those once the path is
    checked) to ``path`` through
    a temp file + rename, with the permissions a plain ``open`` would give (umask applied); refuse to
    overwrite any path in ``protect``; errors name the path."""
    p = Path(path)
    for q in protect:
        if Path(q).exists() and p.exists() and p.resolve() == Path(q).resolve():
            raise InputError(f"{p}: refusing to overwrite the input model")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an output file path")
    if not p.parent.exists():
        raise InputError(f"{p.parent}: output folder does not exist")
    if callable(data):
        data = data()
    if isinstance(data, str):
        data = data.encode()
    pieces = data if isinstance(data, list) else [data]
    try:
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
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

"""The protobuf wire format of an ONNX file, read and written without protobuf's copies: where the initializers
lie in a file (:func:`raw_weights`), a file's model without the bytes of its big weights (:func:`skeleton`), and a
model serialized as pieces into which the caller splices each initializer's bytes (:func:`serialized_pieces`)."""
from __future__ import annotations

from typing import NamedTuple

import onnx

from .errors import UnsupportedError


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
    ``TensorProto.raw_data`` copies the bytes). A field given twice
    counts as protobuf counts it: the last one. [] for a file with (unknown) group fields, which this reader does
    not walk: the weights are then read from the ModelProto."""
    return walk(memoryview(data))[0]


def walk(view: memoryview) -> tuple[list[StoredTensor], tuple | None]:
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


def skeleton(view: memoryview, stored: list[StoredTensor], graph: tuple, min_bytes: int) -> tuple[bytes, int]:
    """``(the file's ModelProto without the raw data of its initializers of more than ``min_bytes``, how many were
    left out)``: the bytes around them copied, the lengths of the tensors and of the graph that held them made
    anew. ``stored``, ``graph``: :func:`walk`'s."""
    (graph_at, (_, end)), pieces, pos, stripped = graph, [], graph[1][0], 0
    for t in stored:
        if t.raw is None or len(t.raw) <= min_bytes:
            continue
        (field_at, field_end), tensor = t.field, []
        at = field_end - len(t.whole)
        for raw_at, raw_end in t.raw_fields:
            tensor.append(view[at:raw_at])
            at = raw_end
        tensor.append(view[at:field_end])
        length = sum(map(len, tensor))
        pieces += [view[pos:field_at], key_and_length(5, length), *tensor]
        pos, stripped = field_end, stripped + 1
    pieces.append(view[pos:end])
    body = b"".join(pieces)
    return b"".join([view[:graph_at], key_and_length(7, len(body)), body, view[end:]]), stripped


MAX_FILE_BYTES = 2**31 - 1  # protobuf's limit on a serialized message


def splittable(model: onnx.ModelProto) -> bool:
    """:func:`serialized_pieces` can split ``model``: it has a graph, and neither it nor its graph has fields this
    protobuf build does not know (those are serialized whole)."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    return model.HasField("graph") and not len(UnknownFieldSet(model)) and not len(UnknownFieldSet(model.graph))


def serialized_pieces(model: onnx.ModelProto, tensor_bytes=None) -> list:
    """``model`` (:func:`splittable`) serialized, as pieces to write one after the other: the model and its graph
    serialized without the weights, split where the graph and the initializers go (fields are serialized in
    field-number order), and each initializer as ``tensor_bytes(init)`` gives it (default: serialized on its own).
    With the default the pieces are the bytes of ``SerializeToString``, exactly: serializing a whole model at once
    makes one buffer of the file's size and copies it into a bytes object, which the pieces avoid. UnsupportedError
    past 2 GB (the limit of a protobuf file; SerializeToString itself would raise ValueError)."""
    graph = model.graph
    model_head, model_tail = split_before(_without(model, "graph").SerializeToString(), 7)
    graph_head, graph_tail = split_before(_without(graph, "initializer").SerializeToString(), 5)
    body = [graph_head]
    for init in graph.initializer:
        tensor = init.SerializeToString() if tensor_bytes is None else tensor_bytes(init)
        body += [key_and_length(5, len(tensor)), tensor]
    body.append(graph_tail)
    pieces = [model_head, key_and_length(7, sum(map(len, body))), *body, model_tail]
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


def split_before(data: bytes, number: int) -> tuple[bytes, bytes]:
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


def key_and_length(number: int, length: int) -> bytes:
    """The key of length-delimited field ``number`` and ``length``, as varints."""
    out = bytearray()
    for value in (number << 3 | 2, length):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)



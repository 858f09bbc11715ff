"""A model as lrpc reads it (:class:`LoadedModel`, made by :func:`load`): the ModelProto, whose big weights hold no
data, and the file's bytes (memory-mapped, never copied) those weights are read in and written as. Every trick that
keeps a model's weights out of protobuf's copies (so that `lrpc compile` peaks near the file's size, not twice
it) lives here; the compiler, the passes and the commands see ModelProtos and graphsurgeon constants."""
from __future__ import annotations

import functools
import os
import sys
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from . import wire
from .atomic_write import write_atomic
from .errors import InputError, one_line
from .structure import BIG, check_structure, is_big


class LoadedModel:
    """An ONNX model and the file's bytes its initializers were parsed from (none for a caller's ModelProto).

    ``proto``: the ModelProto. Its big float weights read from a file hold no data (*deferred*, :func:`load`): their
    data are the file's bytes only, read in place (:meth:`values`, :meth:`raw`), written as those bytes
    (:meth:`pieces`, :meth:`save`), read by onnxruntime in the file (:meth:`for_runtime`), or copied into the proto
    by :meth:`restored`. ``owned``: lrpc read or copied ``proto``, so a compile may build its result in it and
    reuse its weights (the compile then uses this object up, see :meth:`transfer`).

    An initializer is written as the file's bytes while it is the very TensorProto read, with its name, dims and
    type: lrpc never writes new values into a loaded tensor (a pass that changes a weight makes a new one), and
    reading ``raw_data`` or ``ByteSize()`` to make sure would cost as much as serializing it. Change no tensor's
    values in place while the file's bytes are wanted (a tensor renamed, reshaped or retyped is noticed)."""

    def __init__(self, proto: onnx.ModelProto, owned: bool = False, stored: dict | None = None):
        self.proto, self.owned = proto, owned
        self._stored = stored or {}  # {id(TensorProto): _Stored}, the file's bytes of each initializer read

    @classmethod
    def of(cls, model) -> LoadedModel:
        """``model`` as a LoadedModel: a path is read (:func:`load`), a caller's ModelProto wrapped (not owned:
        never modified), a LoadedModel is itself."""
        if isinstance(model, LoadedModel):
            return model
        if isinstance(model, (str, os.PathLike)):
            return load(model)
        if isinstance(model, onnx.ModelProto):
            return cls(model)
        raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")

    def raw(self, init: onnx.TensorProto) -> memoryview | None:
        """The file's bytes of the raw data of initializer ``init`` (None: not read from a file, typed fields)."""
        entry = self._stored.get(id(init))
        return entry.raw if entry is not None and entry.tensor is init else None

    def deferred(self, init: onnx.TensorProto) -> memoryview | None:
        """:meth:`raw` of ``init`` when it was read without its data and has none yet, else None."""
        return None if init.HasField("raw_data") else self.raw(init)

    def values(self, init: onnx.TensorProto) -> np.ndarray:
        """The values of initializer ``init``, flat: read in place in the file's bytes where they are there (a
        deferred weight's are nowhere else), else from the proto (a copy)."""
        from onnx import helper, numpy_helper

        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        count = int(np.prod(init.dims, dtype=np.int64))
        stored = self.raw(init)
        if stored is not None and sys.byteorder == "little" and len(stored) == count * dtype.itemsize:
            return np.frombuffer(stored, dtype, count)
        return numpy_helper.to_array(init)

    def restored(self) -> onnx.ModelProto:
        """``proto`` with each deferred weight given its data, copied out of the file's bytes (the tensors stay the
        same objects, still written as the file's bytes)."""
        for init in self.proto.graph.initializer:
            raw = self.deferred(init)
            if raw is not None:
                init.raw_data = bytes(raw)
        return self.proto

    def stored_bytes(self, init: onnx.TensorProto):
        """The file's bytes of ``init`` (the serialized TensorProto) while it is the tensor read, unchanged (see the
        class), else None. A deferred weight that changed gets its data here, to be serialized anew."""
        entry = self._stored.get(id(init))
        if entry is None or entry.tensor is not init:
            return None
        if (init.name != entry.name or list(init.dims) != entry.dims or init.data_type != entry.data_type
                or init.data_location != onnx.TensorProto.DEFAULT):
            raw = self.deferred(init)
            if raw is not None:
                init.raw_data = bytes(raw)
            return None
        return entry.whole

    def pieces(self, external: bool = False) -> list:
        """``proto`` serialized, as pieces to write one after the other (:func:`lrpc.wire.serialized_pieces`):
        initializers still as read are the file's bytes they were parsed from (views, no copy; the same message,
        and the same bytes for a file protobuf wrote), the others serialized. A model
        or graph with fields this protobuf build does not know is serialized whole. ``external``: deferred weights
        as references into their file instead (:meth:`for_runtime`)."""
        if not wire.splittable(self.proto):
            return [self.restored().SerializeToString()]
        return wire.serialized_pieces(self.proto, functools.partial(self._tensor_bytes, external=external))

    def _tensor_bytes(self, init: onnx.TensorProto, external: bool) -> bytes:
        tensor = self.stored_bytes(init)
        if external and tensor is not None and self.deferred(init) is not None:
            return _external_reference(init, self._stored[id(init)])
        if tensor is None:
            _must_hold_data(init)
            tensor = init.SerializeToString()
        return tensor

    def serialized(self) -> bytes:
        """:meth:`pieces` joined (with weights as read, mostly a join of the file's bytes)."""
        return b"".join(self.pieces())

    def save(self, path: str | os.PathLike, protect=()) -> None:
        """Write the model to ``path`` atomically (:func:`lrpc.atomic_write.write_atomic`), refusing to overwrite
        any path in ``protect``."""
        write_atomic(self.pieces, path, protect)

    def for_runtime(self) -> tuple[bytes, Source | None]:
        """``(bytes, source)``: the model serialized for onnxruntime with its deferred weights as external data in
        the file they were read from (``source``: its folder is where onnxruntime looks them up,
        :func:`lrpc.runtime.inference_session`), so that onnxruntime reads them from the file once instead of
        parsing them out of a model-sized buffer (a faster start and a lower peak).
        ``source`` is None (and the bytes are :meth:`serialized`'s) when the model has no deferred weight, or they
        do not all come from one file that is still the one read, or its name is not UTF-8. The caller checks after
        the session starts that the file is still the one read and that the session does not map it
        (:class:`Source`)."""
        sources = {self._stored[id(init)].source for init in self.proto.graph.initializer
                   if self.deferred(init) is not None}
        source = sources.pop() if len(sources) == 1 else None
        if source is None or not source.unchanged() or not _utf8(source.path.name):
            return self.serialized(), None
        return b"".join(self.pieces(external=True)), source

    def transfer(self, proto: onnx.ModelProto) -> LoadedModel:
        """The LoadedModel of ``proto``, a model made from this one (a compile's result; owned), with the file's
        bytes of the tensors it holds: the others (weights a pass replaced, a model whose opset was converted)
        would keep the file's bytes in memory for nothing. This one is used up: what was made from it (the
        compile's graph and its :class:`lrpc.graph.DeferredValues`, full of reference cycles) no longer keeps the
        file mapped until the cycle collector runs."""
        held = {id(t) for t in proto.graph.initializer}
        result = LoadedModel(proto, True, {k: v for k, v in self._stored.items() if k in held})
        self.proto, self._stored = None, {}
        return result


class _Stored(NamedTuple):
    """A loaded initializer whose serialization is ``whole``, the file's bytes it was parsed from."""
    tensor: onnx.TensorProto
    whole: memoryview
    name: str
    dims: list
    data_type: int
    raw: memoryview | None  # its raw_data in the file (None: typed fields); the only copy of a deferred weight's
    raw_at: int | None = None  # where ``raw`` starts in the file
    source: Source | None = None  # the file (a memory-mapped read)


def load(path: str | os.PathLike, defer: bool = True) -> LoadedModel:
    """Read and check an ONNX model file; every failure is an :class:`InputError` naming the file. Its initializers
    stored in the file one to one with the ModelProto's keep the file's bytes (protobuf files; none for text
    formats and files with fields this reader does not walk); external data are loaded, from the model's folder
    only.

    ``defer``: the big float weights' data stay in the file's bytes: their TensorProtos hold no data, which
    protobuf would copy while parsing (the rest of the model then parses at once). Deferred are float32/64/16
    initializers of more than :data:`lrpc.structure.BIG` elements stored as raw data in the file (not external), on a
    little-endian machine (raw data is little-endian): exactly the weights lrpc's checker and shape inference leave
    out (:func:`lrpc.graph.structure_of_model`), so they never see a tensor without data."""
    p = Path(path)
    loaded = _parse(p, defer)
    _load_external_data(loaded.proto, p.parent.resolve(), p)
    try:
        check_structure(loaded.proto)
    except Exception as e:
        raise InputError(f"{p}: invalid ONNX model: {one_line(e)}") from None
    return loaded


def _parse(p: Path, defer: bool) -> LoadedModel:
    """The model in file ``p`` (:func:`load`'s reading, before external data and checks)."""
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
            stored, graph = wire.walk(memoryview(data))
            if defer and graph is not None and sys.byteorder == "little":
                text, stripped = wire.skeleton(memoryview(data), stored, graph, BIG * 2)  # (float16: 2 bytes)
        if not stripped and not isinstance(data, bytes):
            data = bytes(data)
        model = onnx.serialization.registry.get(fmt).deserialize_proto(text if stripped else data, onnx.ModelProto())
    except Exception as e:  # protobuf raises DecodeError / RuntimeWarning subclasses
        raise InputError(f"{p}: not an ONNX model ({type(e).__name__}: {one_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    _names_are_text(model, p)
    loaded = LoadedModel(model, True, _stored_of(model, stored, source))
    if stripped and sum(loaded.deferred(i) is not None for i in model.graph.initializer) != stripped:  # (not seen)
        model, stripped = onnx.load_model_from_string(bytes(data)), 0
        loaded = LoadedModel(model, True, _stored_of(model, stored, source))
    if stripped:
        for init in model.graph.initializer:  # left out but not a big float weight of the right size: data back
            raw = loaded.deferred(init)
            if raw is not None and not _deferrable(init, raw):
                init.raw_data = bytes(raw)
    return loaded


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
    (docs/performance.md#compile-time-file-size-start-up). The file must not change while
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
    """The file a model was read from (:func:`load`): its resolved path and what identifies the very file
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


_DEFERRABLE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2}


def _deferrable(init: onnx.TensorProto, raw: memoryview) -> bool:
    size = _DEFERRABLE.get(init.data_type)
    return (size is not None and is_big(init.data_type, init.dims) and init.data_location == onnx.TensorProto.DEFAULT
            and len(raw) == size * int(np.prod(list(init.dims), dtype=np.int64)) and not _typed(init))


def _typed(init: onnx.TensorProto) -> bool:
    """``init`` holds values in a typed field (the float types' ones)."""
    return bool(len(init.float_data) or len(init.double_data) or len(init.int32_data))


def _stored_of(model: onnx.ModelProto, stored: list, source: Source | None = None) -> dict:
    """``{id(TensorProto): _Stored}`` for the initializers of ``model`` found in the file (:func:`lrpc.wire.walk`):
    those it holds one to one with ``model``'s, by position and name; {} when they do not line up."""
    inits = model.graph.initializer
    if len(stored) != len(inits):
        return {}
    return {id(init): _Stored(init, t.whole, init.name, list(init.dims), init.data_type, t.raw, t.raw_at, source)
            for init, t in zip(inits, stored) if t.name == init.name and t.whole is not None}


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # (a file name that is not UTF-8: a protobuf string cannot hold it)
        return False


def _external_reference(init: onnx.TensorProto, entry: _Stored) -> bytes:
    """``init`` (a deferred weight) serialized as external data at its place in the file it was read from."""
    ref = onnx.TensorProto()
    ref.CopyFrom(init)  # (no data to copy)
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", entry.source.path.name), ("offset", entry.raw_at), ("length", len(entry.raw))):
        item = ref.external_data.add()
        item.key, item.value = key, str(value)
    return ref.SerializeToString()


def _must_hold_data(init: onnx.TensorProto) -> None:
    """A deferred weight about to be serialized without its data (not written by the LoadedModel that read it) would
    make a model no runtime loads: say so here."""
    if (not init.HasField("raw_data") and init.data_type in _DEFERRABLE and is_big(init.data_type, init.dims)
            and init.data_location == onnx.TensorProto.DEFAULT and not _typed(init)):
        raise RuntimeError(f"lrpc: weight '{init.name}' was read without its data and is serialized without the "
                           "file's bytes it was read from (please report)")


def external_data_files(path: str | os.PathLike) -> frozenset:
    """The external data files the model at ``path`` refers to (none where it cannot be read): inputs too, which an
    output must not overwrite. Its big weights are not read (:func:`load`'s skeleton)."""
    p = Path(path)
    try:
        return frozenset(target for _, target in _external_locations(_parse(p, True).proto, p.parent.resolve(), p))
    except InputError:
        return frozenset()


def _external_locations(model: onnx.ModelProto, base: Path, path: Path) -> list:
    """(tensor, its external data file) of each of the model's tensors with external data, refusing any location
    outside the model's folder and missing files."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found = []
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if base not in target.parents:
            raise InputError(f"{path}: external data of tensor '{tensor.name}' points outside the model's folder: "
                             f"{location}")
        if not target.is_file():
            raise InputError(f"{path}: external data file of tensor '{tensor.name}' is missing: {location}")
        found.append((tensor, target))
    return found


def _load_external_data(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Load external tensors, from the model's folder only."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor, _ in _external_locations(model, base, path):
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as e:
            raise InputError(f"{path}: cannot read external data of tensor '{tensor.name}': {one_line(e)}") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]

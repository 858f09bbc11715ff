"""Loading and saving ONNX models: validation, external data confinement, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import InputError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model file; every failure is an :class:`InputError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
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
    return model


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, protect: list[str | os.PathLike] = ()) -> None:
    """Write ``model`` atomically (temp file + rename); refuse to overwrite any path in ``protect``."""
    write_atomic(lambda: model.SerializeToString(), path, protect)  # serializing raises ValueError past 2 GB


def write_atomic(data, path: str | os.PathLike, protect: list[str | os.PathLike] = ()) -> None:
    """Write ``data`` (bytes, str, or a callable making them once the path is checked) to ``path`` through
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise InputError(f"{p}: cannot write ({e.strerror or type(e).__name__})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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

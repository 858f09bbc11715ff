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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, protect: list[str | os.PathLike] = ()) -> None:
    """Write ``model`` atomically (temp file + rename); refuse to overwrite any path in ``protect``."""
    p = Path(path)
    for q in protect:
        if Path(q).exists() and p.exists() and p.resolve() == Path(q).resolve():
            raise InputError(f"{p}: refusing to overwrite the input model")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an output file path")
    if not p.parent.exists():
        raise InputError(f"{p.parent}: output folder does not exist")
    data = model.SerializeToString()  # raises ValueError past 2 GB
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

"""Bring old models (opset < 17, old IR) up to opset 17 so every later stage sees one op vocabulary."""
from __future__ import annotations

import onnx
from onnx import version_converter

from ..errors import InputError, one_line
from ..graph import MIN_OPSET


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def run(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` converted to opset 17 when it is older (model-level pass)."""
    version = opset_of(model)
    if version >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:
        raise InputError(f"cannot upgrade the model from opset {version} to {MIN_OPSET}: {one_line(e)}") from None
    converted.ir_version = max(converted.ir_version, 8)
    return converted

"""The pipeline, top to bottom: load -> canonize passes -> emit relevance -> check -> (save)."""
from __future__ import annotations

import os

import onnx

from . import composites
from .emit import emit
from .errors import InputError
from .graph import export_model
from .model_io import load_model
from .passes import canonize as _canonize


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def canonize(model, output: str | None = None) -> onnx.ModelProto:
    """Canonical forward model (BN folded, pools as depthwise convs, …); outputs numerically unchanged."""
    canon = _canonize(_as_model(model), output)
    result = export_model(canon)
    _check(result)
    return result


def compile(model, rules: str | composites.RuleSet = "epsilon-gamma-box", output: str | None = None,
            layerwise: str | None = None, **options) -> onnx.ModelProto:
    """Compile ``model`` (ModelProto or path) into forward + relevance graph.

    ``rules``: a composite name, a .json/.toml rule file, or a RuleSet. ``options``: fields of
    :class:`lrpc.composites.Options` (epsilon, stabilizer_eps, stabilizer, gamma, alpha, beta, low, high,
    zero_bias, maxpool). ``layerwise``: None, "sums" or "full" (per-layer relevance outputs, see emit)."""
    if isinstance(rules, composites.RuleSet):
        ruleset = rules
    else:
        try:
            opts = composites.Options(**options)
        except TypeError as e:
            raise InputError(str(e)) from None
        ruleset = composites.load_ruleset(rules, opts)
    canon = _canonize(_as_model(model), output)
    result = emit(canon, ruleset, layerwise)
    _check(result)
    return result


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # an internal bug, not a user error: say so
        raise RuntimeError(f"lrpc produced an invalid model (please report): {str(e).splitlines()[0]}") from e

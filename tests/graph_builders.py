"""Builders of small ONNX graphs and the canonization oracle of the pass tests (tests/test_pass_*.py, test_pipeline.py):
the canonized model computes what the original computes (onnxruntime CPU), and the caller's model is left as it was."""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.graph import ORIGIN_KEY
from lrpc.passes import canonize as canonize_graph

RTOL = 1e-5
MODELS = Path(__file__).resolve().parent.parent / "models"


# --- builders -----------------------------------------------------------------------------------


def make_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)  # keeps 0-d scalars 0-d


def rand(rng, *shape, scale=1.0, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17, ir: int | None = None,
               check: bool = True) -> onnx.ModelProto:
    """A checked model; ``inputs``/``outputs`` are (name, shape) pairs (shape entries may be 'N')."""
    graph = helper.make_graph(nodes, "t", [vi(n, s) for n, s in inputs], [vi(n, s) for n, s in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir if ir is not None else (8 if opset <= 18 else 9)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def bn_params(rng, prefix: str, c: int):
    """Nontrivial BN parameters: scale, bias, mean, var (var well away from 0 and 1)."""
    return [init(f"{prefix}_scale", rand(rng, c) + 1.5), init(f"{prefix}_bias", rand(rng, c)),
            init(f"{prefix}_mean", rand(rng, c)), init(f"{prefix}_var", rng.uniform(0.2, 3.0, c).astype(np.float32))]


def bn_node(x: str, y: str, prefix: str, eps: float = 1e-3, **kw):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], epsilon=eps, name=f"{prefix}_node", **kw)


# --- running and checking -----------------------------------------------------------------------


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: onnx.ModelProto, batch: int = 3, seed: int = 1) -> dict:
    rng = make_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rand(rng, *dims)
    return feeds


def assert_close(ref: np.ndarray, got: np.ndarray, rtol: float = RTOL) -> None:
    """Equal within ``rtol`` relative (elementwise, with an absolute floor relative to the output's scale)."""
    assert ref.shape == got.shape, (ref.shape, got.shape)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(scale, 1e-30))


def canonize(model: onnx.ModelProto, batches=(3,), feeds: list[dict] | None = None):
    """Canonize with the public API; check every output against the original on random inputs.
    Returns (canonical ModelProto, Canonical from the internal pipeline)."""
    original = copy.deepcopy(model)
    result = lrpc.canonize(copy.deepcopy(model))
    onnx.checker.check_model(result, full_check=True)
    assert model == original, "canonize must not modify its input model"
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    for f in feeds or [feeds_for(model, b, seed=b) for b in batches]:
        for ref, got in zip(ort_run(model, f), ort_run(result, f)):
            assert_close(ref, got)
    canon = canonize_graph(copy.deepcopy(model))
    return result, canon


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def nodes_of(model: onnx.ModelProto, op: str) -> list:
    return [n for n in model.graph.node if n.op_type == op]


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def roles(model: onnx.ModelProto) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get(ORIGIN_KEY, "{}"))


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

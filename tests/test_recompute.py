"""Smooth activations between dense layers are computed again inside the backward (lrpc/recompute.py), not kept
from the forward: the backward never reads the forward's activation output, and the relevance is that of the
same compile with the activation kept."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import lrpc
from lrpc import emit


def _mlp(activation: str, dtype=np.float32) -> onnx.ModelProto:
    """x [2, 5, 16] -> MatMul -> activation (as torch exports it) -> MatMul -> [2, 5, 8]."""
    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(dtype) / 4, name)
             for name, shape in (("w1", (16, 32)), ("w2", (32, 8)))]
    inits += [numpy_helper.from_array(np.array(v, dtype), n) for n, v in (("sqrt2", 2 ** 0.5), ("one", 1.0),
                                                                           ("half", 0.5))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["z"])]
    if activation == "gelu":  # x * 0.5 * (1 + erf(x / sqrt 2)), the legacy exporter's GELU
        nodes += [helper.make_node("Div", ["z", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["z", "p"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["a"])]
    elif activation == "silu":
        nodes += [helper.make_node("Sigmoid", ["z"], ["s"]), helper.make_node("Mul", ["z", "s"], ["a"])]
    else:
        nodes += [helper.make_node("Relu", ["z"], ["a"])]
    nodes += [helper.make_node("MatMul", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, [2, 5, 16])],
                              [helper.make_tensor_value_info("y", elem, [2, 5, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relevance(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime in float32, onnx's reference evaluator in float64 (onnxruntime has no float64 Erf)."""
    feeds = {"x": x, "relevance_seed": np.ones((2, 5, 8), x.dtype)}
    if x.dtype == np.float64:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(["relevance"], feeds)[0]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["relevance"], feeds)[0]


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_smooth_activation_is_computed_again_in_the_backward(activation, dtype, monkeypatch):
    model = _mlp(activation, dtype)
    compiled = lrpc.compile(model, "epsilon")
    forward = {o for n in compiled.graph.node if not n.name.startswith("lrp/") for o in n.output}
    read_back = {x for n in compiled.graph.node if n.name.startswith("lrp/") for x in n.input}
    assert "a" in forward and "a" not in read_back and "z" in read_back
    assert any(n.name.startswith("lrp/recompute/") and n.op_type == "Max" for n in compiled.graph.node)

    monkeypatch.setattr(emit, "recompute_kept", lambda graph, is_backward, seed, live: None)
    kept = lrpc.compile(model, "epsilon")
    assert "a" in {x for n in kept.graph.node if n.name.startswith("lrp/") for x in n.input}
    x = np.random.default_rng(4).standard_normal((2, 5, 16)).astype(dtype)
    got, want = _relevance(compiled, x), _relevance(kept, x)
    if dtype == np.float32:  # (onnxruntime: the same kernels on the same values)
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_onnxruntime_keeps_the_copy(tmp_path):
    """onnxruntime's optimizers (common-subexpression elimination, GELU fusion) leave the copy a node of its own:
    its optimized graph still reads the chain's source through the recompute's Max."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(lrpc.compile(_mlp("gelu"), "epsilon").SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [n for n in optimized.graph.node if n.op_type == "Max" and n.input[0] == "z"]


def test_a_relu_between_layers_is_kept():
    """A ReLU's output is kept (copying it costs an element-wise pass per layer, which mobile nets feel)."""
    compiled = lrpc.compile(_mlp("relu"), "epsilon")
    assert not [n for n in compiled.graph.node if n.name.startswith("lrp/recompute/")]


def _read_back(model: onnx.ModelProto) -> dict:
    """The forward tensors the backward reads (not for their shape only), by the op that makes them (first outputs:
    a LayerNorm's rule reads its statistics, tiny, which are kept)."""
    made = {n.output[0]: n for n in model.graph.node if not n.name.startswith("lrp/")}
    return {x: made[x] for n in model.graph.node if n.name.startswith("lrp/") and n.op_type != "Shape"
            for x in n.input if x in made}


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_attention_operands_are_computed_again(exporter, tmp_path, monkeypatch):
    """A ViT's queries, keys and values (slices and transposes of the packed projection), its attention scores and
    probabilities and its LayerNorm outputs are computed again from the projection and the residual stream the
    backward keeps anyway (not the probabilities times the values: as small as the values, and a product to
    compute again); the relevance is that of the same compile with everything kept."""
    pytest.importorskip("torch")
    from models import families

    model, x = families.build("vit")
    path = families.export(model.eval(), tmp_path / f"vit-{exporter}.onnx", x.shape, exporter)
    compiled = lrpc.compile(str(path), "attnlrp")
    kept = _read_back(compiled)
    computed = {o for n in compiled.graph.node for o in n.output}
    assert not {n.op_type for n in kept.values()} & {"Softmax", "LayerNormalization", "Transpose", "Gather"}
    made = {o: n for n in compiled.graph.node if not n.name.startswith("lrp/") for o in n.output}
    scores = []  # the Q·Kᵀ products before each softmax (through its scale and mask)
    for softmax in [n for n in compiled.graph.node if n.op_type == "Softmax" and not n.name.startswith("lrp/")]:
        t = softmax.input[0]
        while made[t].op_type != "MatMul":
            t = next(i for i in made[t].input if i in computed)
        scores.append(t)
    assert scores and not set(scores) & kept.keys()

    monkeypatch.setattr(emit, "recompute_kept", lambda graph, is_backward, seed, live: None)
    everything = lrpc.compile(str(path), "attnlrp")
    assert {n.op_type for n in _read_back(everything).values()} & {"Softmax", "LayerNormalization"}
    feeds = {"input": x.numpy(), "relevance_seed": np.eye(10, dtype=np.float32)[[3]]}
    got, want = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["relevance"], feeds)[0] for m in (compiled, everything))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_copies_wait_for_the_relevance():
    """Each copy reads its kept tensors through ``Max`` with a -inf made from the relevance the backward holds where
    the copy is needed, so a runtime that runs a node as soon as its inputs exist (or onnxruntime, whose fused nodes
    jump its order) cannot compute the copy during the forward and keep it to the backward."""
    compiled = lrpc.compile(_mlp("gelu"), "epsilon")
    made = {o: n for n in compiled.graph.node for o in n.output}

    def from_seed(t, seen=()) -> bool:
        return t == "relevance_seed" or (t in made and t not in seen and any(
            from_seed(x, (*seen, t)) for x in made[t].input))

    copies = [n for n in compiled.graph.node if n.name.startswith("lrp/recompute/") and n.op_type == "Max"
              and "/gate/" not in n.name]
    assert copies and all(from_seed(n.input[1]) and not from_seed(n.input[0]) for n in copies)

"""The node order of compiled graphs (lrpc/schedule.py), against onnxruntime itself: the execution order
onnxruntime's profiler records is the one lrpc's model of it predicts, and along it the activations alive at once
(summed from the sizes of the tensors of one run) stay those of the emission order, where the unscheduled graph kept
about twice as much."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrpc
import lrpc.emit
from lrpc.contract import SEED
from lrpc.schedule import runtime_walk, schedule


def profiled_order(model: onnx.ModelProto, feeds: dict, tmp_path) -> list[str]:
    """Node names in the order onnxruntime ran them (graph optimizations off, so nodes stay the file's)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / "prof")
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    events = json.load(open(sess.end_profiling()))
    return [e["name"][: -len("_kernel_time")] for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def tensor_bytes(model: onnx.ModelProto, feeds: dict) -> dict[str, int]:
    """Bytes of every node output in one run (each made a graph output); 0 for those made of constants only
    (derived weights: onnxruntime computes them once, at session start, when optimizations are on)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=o) for n in probe.graph.node for o in n.output
                              if o and o not in known)
    names = [o.name for o in probe.graph.output]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    fixed = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if all(x in fixed or not x for x in n.input):
            fixed.update(n.output)
    return {name: 0 if name in fixed else np.asarray(v).nbytes for name, v in zip(names, values)}


def peak_alive(model: onnx.ModelProto, order: list[str], size: dict[str, int]) -> int:
    """Largest number of bytes of node outputs alive at once when the nodes run in ``order`` (a tensor lives
    from its node to its last reader; graph outputs to the end)."""
    nodes = {n.name: n for n in model.graph.node}
    ran = [nodes[name] for name in order]
    last = {x: k for k, n in enumerate(ran) for x in n.input}
    last.update({o.name: len(ran) for o in model.graph.output})
    alive, peak = {}, 0
    for k, n in enumerate(ran):
        alive.update({o: size[o] for o in n.output})
        peak = max(peak, sum(alive.values()))
        for x in set(n.input):
            if last.get(x) == k:
                alive.pop(x, None)
    return peak


def relevance_inputs_come_last(model: onnx.ModelProto) -> None:
    """At every node, the inputs made from the seed are made after the others (onnxruntime's walk enters the
    relevance first wherever its optimizers make it stray from lrpc's plan)."""
    carries, at = {SEED}, {}
    for i, n in enumerate(model.graph.node):
        at.update({o: i for o in n.output if o})
        if SEED in n.output or carries.intersection(n.input):
            carries.update(o for o in n.output if o)
    for n in model.graph.node:
        made = [(at[x], x in carries) for x in n.input if x in at]
        assert max((i for i, c in made if not c), default=-1) < min((i for i, c in made if c), default=1 << 30), n.name


def same_outputs(plain: onnx.ModelProto, model: onnx.ModelProto, feeds: dict) -> None:
    """Both orders give the same outputs (the same kernels on the same data; float32 round-off allowed for
    fusions an onnxruntime version might choose differently by order)."""
    assert [o.name for o in plain.graph.output] == [o.name for o in model.graph.output]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    got = [ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
           for m in (plain, model)]
    for a, b in zip(*got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b), initial=0)))


def runs_as_predicted(model: onnx.ModelProto, feeds: dict, tmp_path) -> list[str]:
    """onnxruntime's profiled order, asserted equal to lrpc's model of it (runtime_walk); returned."""
    ran = profiled_order(model, feeds, tmp_path)
    nodes = list(model.graph.node)
    assert len({n.name for n in nodes}) == len(nodes)  # the profile names nodes
    assert ran == [nodes[k].name for k in runtime_walk(nodes)[0] if nodes[k].op_type != "Constant"]
    return ran


@pytest.fixture(scope="module")
def resnet18(zoo_onnx):
    path = zoo_onnx("resnet18", "legacy")
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    return path, x


def compiled(source, rules: str, scheduled: bool, monkeypatch, **kw) -> onnx.ModelProto:
    """``lrpc.compile(source, rules, **kw)``, with or without the node order (the emission order)."""
    if not scheduled:
        monkeypatch.setattr(lrpc.emit, "order_for_runtime", lambda graph, seed: None)
    model = lrpc.compile(source, rules, **kw)
    monkeypatch.undo()
    return model


def feeds_for(model: onnx.ModelProto, x: np.ndarray) -> dict:
    feeds = {model.graph.input[0].name: x}
    if any(i.name == SEED for i in model.graph.input):
        feeds[SEED] = np.eye(1000, dtype=np.float32)[[3]]
    return feeds


@pytest.mark.parametrize("rules,seed", [("epsilon", "input"), ("epsilon-gamma-box", "input"),
                                        ("epsilon-alpha2-beta1", "top1")])
def test_onnxruntime_runs_the_order_lrpc_predicts_and_keeps_the_emission_schedule(resnet18, rules, seed,
                                                                                   monkeypatch, tmp_path):
    path, x = resnet18
    plain, model = (compiled(str(path), rules, scheduled, monkeypatch, seed=seed) for scheduled in (False, True))
    assert sorted(n.name for n in model.graph.node) == sorted(n.name for n in plain.graph.node)
    onnx.checker.check_model(model)  # still topologically sorted
    peaks, size = {}, tensor_bytes(plain, feeds_for(plain, x))
    for label, m in (("emitted", plain), ("scheduled", model)):
        peaks[label] = peak_alive(m, runs_as_predicted(m, feeds_for(m, x), tmp_path), size)
    in_file_order = peak_alive(plain, [n.name for n in plain.graph.node], size)
    relevance_inputs_come_last(model)
    # onnxruntime ran the unscheduled graph keeping far more alive than its emission order needs; the scheduled
    # one runs (within a few %) that emission order's schedule
    assert peaks["emitted"] > 1.3 * in_file_order, (peaks, in_file_order)
    assert peaks["scheduled"] <= 1.02 * in_file_order, (peaks, in_file_order)
    same_outputs(plain, model, feeds_for(model, x))


def test_schedule_prefers_the_relevance_then_the_latest_input():
    """A hand-made graph: the stabilizer s = Abs(z) + 1 of a backward Div(r, s) is made from the forward only;
    emitted after r, onnxruntime would run it first (highest index) and keep s alive through the chain that
    makes r. The schedule places it before r's producer, so the walk enters r's chain first."""
    h = onnx.helper
    nodes = [
        h.make_node("Relu", ["x"], ["z"], name="fwd"),
        h.make_node("Mul", [SEED, "z"], ["r0"], name="chain0"),
        h.make_node("Neg", ["r0"], ["r"], name="chain1"),
        h.make_node("Abs", ["z"], ["a"], name="stab0"),
        h.make_node("Add", ["a", "one"], ["s"], name="stab1"),
        h.make_node("Div", ["r", "s"], ["out"], name="div"),
    ]
    plain = runtime_walk(nodes)[0]
    assert [nodes[k].name for k in plain] == ["fwd", "stab0", "stab1", "chain0", "chain1", "div"]
    order = schedule(nodes, SEED)
    reordered = [nodes[k] for k in order]
    ran = [reordered[k].name for k in runtime_walk(reordered)[0]]
    assert ran == ["fwd", "chain0", "chain1", "stab0", "stab1", "div"]
    made = {o: i for i, n in enumerate(reordered) for o in n.output}
    assert all(made[x] < i for i, n in enumerate(reordered) for x in n.input if x in made)  # topological


def two_input_model() -> onnx.ModelProto:
    h = onnx.helper
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 5)).astype(np.float32), "W2")
    nodes = [h.make_node("Conv", ["a", "W1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Conv", ["b", "W1"], ["c2"], pads=[1, 1, 1, 1], name="convb"),
             h.make_node("Add", ["c", "c2"], ["s"], name="add"),
             h.make_node("Relu", ["s"], ["r"], name="relu"),
             h.make_node("Flatten", ["r"], ["f"], name="flat"),
             h.make_node("MatMul", ["f", "W2"], ["y"], name="fc")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 3, 6, 6]) for n in "ab"],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])], [w1, w2])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("layerwise", [None, "full"])
@pytest.mark.parametrize("seed", ["input", "top1"])
def test_two_inputs_and_layerwise_outputs_keep_their_numbers_and_order(layerwise, seed, monkeypatch, tmp_path):
    source = two_input_model()
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 6, 6)).astype(np.float32) for n in "ab"}
    plain, model = (compiled(source, "epsilon-gamma-box", scheduled, monkeypatch, layerwise=layerwise, seed=seed)
                    for scheduled in (False, True))
    if seed == "input":
        feeds[SEED] = np.eye(5, dtype=np.float32)[[1, 3]]
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node] != [n.name for n in plain.graph.node]
    relevance_inputs_come_last(model)
    runs_as_predicted(model, feeds, tmp_path)
    same_outputs(plain, model, feeds)


def test_empty_optional_names_carry_nothing():
    """An empty optional output of a relevance node and an empty optional input elsewhere are no tensor: the
    Clip below reads nothing made from the seed, so it is placed with the forward."""
    h = onnx.helper
    nodes = [h.make_node("Relu", ["x"], ["z"], name="fwd"),
             h.make_node("Dropout", [SEED], ["r", ""], name="chain"),
             h.make_node("Clip", ["z", "", "hi"], ["s"], name="clip"),
             h.make_node("Div", ["r", "s"], ["out"], name="div")]
    order = [nodes[k].name for k in schedule(nodes, SEED)]
    assert order.index("clip") < order.index("chain")  # the relevance input of div comes last

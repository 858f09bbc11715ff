"""Reading a model without copying its big weights (lrpc.loaded.load, defer): which tensors are deferred,
that every way a model leaves lrpc gives them their data (or the file's bytes: saved files are SerializeToString's
bytes, sessions get the weights as stored), and that compiling a file read that way gives what compiling the fully
parsed ModelProto gives (oracle: protobuf's own parse)."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

import lrpc
from cli_helpers import DIGITS, one_line_error, run_cli
from lrpc import compiler
from lrpc.graph import DeferredValues, import_model
from lrpc.loaded import LoadedModel, load
from lrpc.runtime import _READS_EXTERNAL_FOLDER

RNG = np.random.default_rng(11)


def _tensors_model(tmp_path) -> onnx.ModelProto:
    """A Conv model carrying initializers (used by Identity nodes) of every kind a file can hold: big float32/64/16
    as raw data (deferred), big int64 and bfloat16 as raw data, a small float32, a big float32 in typed fields, a big
    float32 in external data (none of those deferred)."""
    w = numpy_helper.from_array(RNG.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    extra = [numpy_helper.from_array(RNG.standard_normal(5000).astype(t), f"big_{t.__name__}")
             for t in (np.float32, np.float64, np.float16)]
    extra.append(numpy_helper.from_array(RNG.integers(-9, 9, 5000).astype(np.int64), "big_int64"))
    extra.append(helper.make_tensor("big_bfloat16", TensorProto.BFLOAT16, [5000],
                                    RNG.integers(0, 2**16, 5000, dtype=np.uint16).tobytes(), raw=True))
    extra.append(numpy_helper.from_array(RNG.standard_normal(100).astype(np.float32), "small"))
    extra.append(helper.make_tensor("typed", TensorProto.FLOAT, [5000], RNG.standard_normal(5000).tolist()))
    ext = numpy_helper.from_array(RNG.standard_normal(5000).astype(np.float32), "external")
    set_external_data(ext, "ext.bin")  # (onnx.save writes its raw data there)
    uses = [helper.make_node("Identity", [t.name], [t.name + "_used"]) for t in [*extra, ext]]  # (graph tensors)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"]), *uses], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3, 3])],
                              [w, *extra, ext])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    return onnx.load(str(tmp_path / "m.onnx"))  # (protobuf's parse: the oracle)


def test_only_big_float_raw_weights_are_deferred(tmp_path):
    want = _tensors_model(tmp_path)
    loaded = load(tmp_path / "m.onnx")
    model = loaded.proto
    left_out = {t.name for t in model.graph.initializer if loaded.deferred(t) is not None}
    assert left_out == {"big_float32", "big_float64", "big_float16"}
    assert all(not t.HasField("raw_data") for t in model.graph.initializer if t.name in left_out)
    for t in model.graph.initializer:
        if t.name in left_out:  # the file's bytes of its data
            assert bytes(loaded.deferred(t)) == next(u for u in want.graph.initializer if u.name == t.name).raw_data
    assert model != want and loaded.restored() == want
    assert all(loaded.deferred(t) is None for t in model.graph.initializer)
    assert all(loaded.stored_bytes(t) is not None for t in model.graph.initializer if t.name in left_out)
    full = load(tmp_path / "m.onnx", defer=False).proto
    assert full == want


def test_deferred_values_read_the_files_bytes(tmp_path):
    """graphsurgeon constants of deferred weights load from the file's bytes (every float width); what
    graphsurgeon's exporter takes (``tensor``) is the TensorProto given its data, still written as the file's bytes."""
    want = {t.name: numpy_helper.to_array(t) for t in _tensors_model(tmp_path).graph.initializer
            if t.name != "external"}
    loaded = load(tmp_path / "m.onnx")
    consts = import_model(loaded.proto, loaded).graph.tensors()
    lazy = {n: consts[n]._values for n in want if n in consts}
    assert ({n for n, v in lazy.items() if isinstance(v, DeferredValues)}
            == {"big_float32", "big_float64", "big_float16"})
    for name, values in lazy.items():
        got = values.load()
        assert got.dtype == want[name].dtype and got.flags.writeable and got.tobytes() == want[name].tobytes()
    proto = lazy["big_float16"].tensor
    assert proto.HasField("raw_data") and numpy_helper.to_array(proto).tobytes() == want["big_float16"].tobytes()
    assert loaded.stored_bytes(proto) is not None


def test_a_deferred_weight_serialized_without_the_files_bytes_is_refused(tmp_path):
    onnx.save(_model_with_folded_weight(), str(tmp_path / "m.onnx"))
    loaded = compiler.compile_loaded(tmp_path / "m.onnx", "epsilon")
    with pytest.raises(RuntimeError, match="read without its data"):
        LoadedModel(loaded.proto).pieces()
    assert onnx.ModelProto.FromString(loaded.serialized()) == loaded.restored()


def _model_with_folded_weight(opset: int = 17) -> onnx.ModelProto:
    """Dense layers whose big weights meet the compiler in three ways: used as read (w1, Gemm), through a Transpose that
    constant folding computes (w2: graphsurgeon exports the deferred tensor to onnxruntime), and folded into a
    Conv + BatchNormalization (w3: read as values and replaced)."""
    w1 = RNG.standard_normal((96, 64)).astype(np.float32)  # 6144 values, in the form the compiler keeps
    w2 = RNG.standard_normal((80, 96)).astype(np.float32)  # stored transposed: Transpose folds to [96, 80]
    w3 = RNG.standard_normal((80, 80, 1, 1)).astype(np.float32)
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("s", RNG.random(80) + 0.5), ("b", RNG.standard_normal(80)), ("m", RNG.standard_normal(80)),
           ("v", RNG.random(80) + 0.5))]
    shape = numpy_helper.from_array(np.array([-1, 80, 1, 1], np.int64), "shape")
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
             helper.make_node("MatMul", ["r", "w2t"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["r2"]), helper.make_node("Reshape", ["r2", "shape"], ["img"]),
             helper.make_node("Conv", ["img", "w3"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 80, 1, 1])],
                              [numpy_helper.from_array(w, n) for n, w in (("w1", w1), ("w2", w2), ("w3", w3))]
                              + bn + [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 17 else 7
    return model


def _run(model_bytes, x, seed):
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "relevance_seed": seed})


@pytest.mark.parametrize("case", ["as read", "old opset", "input shapes"])
def test_a_file_read_with_deferred_weights_compiles_as_its_full_parse(case, tmp_path):
    """Compiling the file (big weights deferred) equals compiling protobuf's parse of it: the same nodes and
    initializers, and the same logits and relevance in onnxruntime, from lrpc.compile (restored), from
    compile_loaded's model written with the file's bytes, and from a Session on the saved file. An old
    opset is converted (the converter gets every tensor with its data); fixed input shapes edit the model read."""
    model = _model_with_folded_weight(13 if case == "old opset" else 17)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    shapes = {"x": [2, 64]} if case == "input shapes" else None
    want = lrpc.compile(onnx.load(str(path)), "epsilon-alpha2-beta1", input_shapes=shapes)
    assert "Transpose" not in {n.op_type for n in want.graph.node[:3]} and "BatchNormalization" not in {
        n.op_type for n in want.graph.node}  # (folded: the cases below go through both)
    got = lrpc.compile(path, "epsilon-alpha2-beta1", input_shapes=shapes)
    assert list(got.graph.node) == list(want.graph.node)
    assert {t.name: t for t in got.graph.initializer} == {t.name: t for t in want.graph.initializer}
    saved = compiler.compile_loaded(path, "epsilon-alpha2-beta1", input_shapes=shapes)
    kept = [t.name for t in saved.proto.graph.initializer if saved.deferred(t) is not None]
    assert kept == ([] if case == "old opset" else ["w1"])  # (w2 and w3 became new tensors)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    seed = np.zeros((2, 80, 1, 1), np.float32)
    seed[:, 5] = 1
    expected = _run(want.SerializeToString(), x, seed)
    for result in (_run(saved.serialized(), x, seed), _run(got.SerializeToString(), x, seed)):
        for a, b in zip(result, expected):
            np.testing.assert_array_equal(a, b)
    saved.save(tmp_path / "out.onnx")
    assert onnx.load(str(tmp_path / "out.onnx")) == got
    for session in (lrpc.Session(tmp_path / "out.onnx", providers=["CPUExecutionProvider"]),
                    lrpc.Session(saved, providers=["CPUExecutionProvider"])):  # (w1: in m.onnx)
        outputs = session.run({"x": x}, seed)
        for name, value in zip([o.name for o in want.graph.output], expected):
            np.testing.assert_array_equal(outputs[name], value)


@pytest.mark.parametrize("condition", ["input", "constant"])
def test_a_deferred_weight_read_in_a_subgraph_keeps_its_data(condition, tmp_path):
    """A big weight of the main graph that only an If branch reads (graphsurgeon keeps it in the branch's graph;
    with a constant condition constant folding inlines the branch, whose output is then a Gemm's weight; with a
    fed condition the branch's output is summed into the logits): compiled from the file, the model runs and
    computes what the compile of protobuf's parse computes, also written with the file's bytes."""
    u = RNG.standard_normal((96, 64)).astype(np.float32)

    def branch(op, name):
        return helper.make_graph([helper.make_node(op, ["u"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, [96, 64])])

    nodes = [helper.make_node("If", ["c"], ["w"], then_branch=branch("Identity", "t"), else_branch=branch("Neg", "e")),
             helper.make_node("Gemm", ["x", "v"], ["h"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])]
    inits = [numpy_helper.from_array(u, "u"),
             numpy_helper.from_array(RNG.standard_normal((96, 64)).astype(np.float32), "v")]
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    if condition == "input":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
        nodes += [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["h", "s"], ["y"])]
        feeds["c"] = np.array(False)
    else:
        inits.append(numpy_helper.from_array(np.array(False), "c"))
        nodes += [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1), helper.make_node("Add", ["g", "h"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    want = _session(lrpc.compile(onnx.load(str(path)), "epsilon"))
    feeds["relevance_seed"] = np.ones((2, 96), np.float32)
    saved = compiler.compile_loaded(path, "epsilon")
    runs = [_session(lrpc.compile(path, "epsilon")),
            ort.InferenceSession(saved.serialized(), providers=["CPUExecutionProvider"])]
    for session in runs:
        for a, b in zip(session.run(None, feeds), want.run(None, feeds)):
            np.testing.assert_array_equal(a, b)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_file_is_unmapped_once_the_compile_returns(tmp_path):
    """The compile's graph (full of reference cycles) does not keep the file mapped until the cycle collector
    runs: with the collector off, no mapping of the file is left once lrpc.compile / compile_loaded's result
    is dropped, or once a Session of the file exists."""
    import gc

    path = tmp_path / "mapped.onnx"
    onnx.save(_model_with_folded_weight(), str(path))

    def mapped() -> bool:
        return str(path) in open("/proc/self/maps").read()

    gc.collect()
    gc.disable()
    try:
        model = compiler.compile_loaded(path, "epsilon")
        assert mapped()  # (the result's deferred weights are the file's bytes)
        model = None
        assert not mapped()
        model = lrpc.compile(path, "epsilon")
        assert not mapped() and all(t.HasField("raw_data") for t in model.graph.initializer if len(t.dims) > 1)
        LoadedModel(model).save(tmp_path / "c.onnx")
        session = lrpc.Session(tmp_path / "c.onnx", providers=["CPUExecutionProvider"])
        assert session.outputs and str(tmp_path / "c.onnx") not in open("/proc/self/maps").read()
    finally:
        gc.enable()


@pytest.mark.skipif(not _READS_EXTERNAL_FOLDER, reason="the hand-over needs Linux and onnxruntime >= 1.21")
@pytest.mark.parametrize("case", ["as read", "file replaced", "replaced while starting", "runtime refuses",
                                  "low memory"])
def test_a_session_reads_deferred_weights_from_the_file_it_read(case, tmp_path, monkeypatch):
    """lrpc.Session of a compiled file hands onnxruntime its big weights as references into that file (a small
    model; onnxruntime reads them there). If the path names another file by then (replaced before or while the
    session starts), or onnxruntime cannot read them there, the session is made from the bytes lrpc read: it
    always computes what the file held when it was read (oracle: a session of protobuf's parse of it). A
    ``low_memory`` session (weights not prepacked) is made from the bytes at once (onnxruntime would keep the file
    mapped)."""
    from lrpc import runtime

    def compiled(seed: int, name: str):
        model = _model_with_folded_weight()
        rng = np.random.default_rng(seed)
        for t in model.graph.initializer:
            if t.name == "w1":
                t.CopyFrom(numpy_helper.from_array(rng.standard_normal((96, 64)).astype(np.float32), "w1"))
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        LoadedModel(lrpc.compile(tmp_path / f"{name}.onnx", "epsilon")).save(tmp_path / f"{name}.lrp.onnx")
        return tmp_path / f"{name}.lrp.onnx"

    path, other = compiled(1, "a"), compiled(2, "b")
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    seed = np.zeros((2, 80, 1, 1), np.float32)
    seed[:, 7] = 1
    want = lrpc.Session(onnx.load(str(path)), providers=["CPUExecutionProvider"]).run({"x": x}, seed)
    model = load(path)
    given, real = [], runtime.inference_session

    def spy(data, providers, threads, tf32, external_folder=None, **kw):
        folder = external_folder
        given.append((len(data), folder))
        if folder is not None and case == "runtime refuses":
            raise RuntimeError("cannot read the external data")
        session = real(data, providers, threads, tf32, external_folder=folder, **kw)
        if folder is not None and case == "replaced while starting":
            os.replace(other, path)
        return session

    monkeypatch.setattr(runtime, "inference_session", spy)
    if case == "file replaced":
        os.replace(other, path)
    got = lrpc.Session(model, providers=["CPUExecutionProvider"], low_memory=case == "low memory").run({"x": x}, seed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    small = given[0][0] < path.stat().st_size // 4 if case not in ("file replaced", "low memory") else None
    assert [folder for _, folder in given] == {
        "as read": [path.parent], "file replaced": [None], "replaced while starting": [path.parent, None],
        "runtime refuses": [path.parent, None], "low memory": [None]}[case]
    assert small in (True, None)  # (the weights were not in the model handed over)
    assert [size > path.stat().st_size // 2 for size, folder in given if folder is None] == [True] * sum(
        folder is None for _, folder in given)


@pytest.mark.skipif(not _READS_EXTERNAL_FOLDER, reason="the hand-over needs Linux and onnxruntime >= 1.21")
def test_when_both_session_starts_fail_the_first_error_stays_attached(tmp_path, monkeypatch):
    from lrpc import runtime

    model = _model_with_folded_weight()
    onnx.save(model, str(tmp_path / "m.onnx"))
    LoadedModel(lrpc.compile(tmp_path / "m.onnx", "epsilon")).save(tmp_path / "m.lrp.onnx")

    def refuse(data, providers, threads, tf32, external_folder=None, **kw):
        raise RuntimeError("by reference" if external_folder is not None else "from the bytes")

    monkeypatch.setattr(runtime, "inference_session", refuse)
    with pytest.raises(RuntimeError, match="from the bytes") as caught:
        lrpc.Session(tmp_path / "m.lrp.onnx", providers=["CPUExecutionProvider"])
    assert str(caught.value.__cause__) == "by reference"


@pytest.mark.skipif(not _READS_EXTERNAL_FOLDER, reason="the hand-over needs Linux and onnxruntime >= 1.21")
def test_a_session_that_would_keep_the_file_mapped_is_made_from_the_bytes(tmp_path, monkeypatch):
    """onnxruntime keeps external data it does not copy (here a big constant of an Add) mapped for the session's
    life: such a session is made again from the bytes lrpc read, so that it never depends on the file (rewritten in
    place afterwards, same size, the session computes what it did)."""
    from lrpc import runtime

    b = RNG.standard_normal((1, 5000)).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Mul", ["relevance_seed", "x"], ["r"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 5000])
                                           for n in ("x", "relevance_seed")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 5000]) for n in ("y", "r")],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "add.onnx"
    onnx.save(model, str(path))
    folders, real = [], runtime.inference_session
    monkeypatch.setattr(runtime, "inference_session",
                        lambda data, *a, **k: folders.append(k.get("external_folder")) or real(data, *a, **k))
    load(path)  # (a read that is gone: its address may be reused by the next one)
    held = load(path)  # lrpc's own map of the file, alive: the session's map is still told apart
    session = lrpc.Session(path, providers=["CPUExecutionProvider"])
    assert folders == [path.parent, None]  # (the hand-over, then the bytes)
    held = None  # noqa: F841  (drops lrpc's map: then no map of the file is left)
    assert str(path) not in Path("/proc/self/maps").read_text()
    x = RNG.standard_normal((1, 5000)).astype(np.float32)
    with open(path, "r+b") as f:  # rewritten in place: same size, other weights
        data = f.read()
        f.seek(0)
        f.write(data.replace(b.tobytes(), (-b).tobytes()))
    np.testing.assert_array_equal(session.run({"x": x}, np.ones_like(x))["y"], x + b)


@pytest.mark.skipif(not _READS_EXTERNAL_FOLDER, reason="the hand-over needs Linux and onnxruntime >= 1.21")
def test_lrpcs_own_maps_of_a_file_do_not_count_as_a_sessions(tmp_path, monkeypatch):
    """A file lrpc has read twice (two live maps of it) is still handed to onnxruntime by reference (its maps are
    not the session's); the record of lrpc's maps goes with them (a stale one could hide a session's map)."""
    from lrpc import loaded, runtime

    path = tmp_path / "m.onnx"
    onnx.save(_model_with_folded_weight(), str(path))
    gc.collect()  # (maps of earlier tests' garbage go)
    before = dict(loaded._OWN_MAPS)
    first, second = load(path), load(path)
    assert len(loaded._OWN_MAPS) == len(before) + 2
    folders, real = [], runtime.inference_session
    monkeypatch.setattr(runtime, "inference_session",
                        lambda data, *a, **k: folders.append(k.get("external_folder")) or real(data, *a, **k))
    session = runtime.start_session(second, providers=["CPUExecutionProvider"])
    assert folders == [path.parent]
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], want[0])
    first = second = None  # noqa: F841  (drops both maps: their record must go with them)
    gc.collect()
    assert loaded._OWN_MAPS == before


@pytest.mark.skipif(not _READS_EXTERNAL_FOLDER, reason="the hand-over needs Linux and onnxruntime >= 1.21")
@pytest.mark.parametrize("tool", ["check", "inspect"])
def test_check_and_inspect_read_weights_in_the_file_one_session_at_a_time(tool, tmp_path, monkeypatch):
    """``lrpc check`` / ``lrpc inspect`` start their sessions (original, compiled, conserving, LRP-0 and its probe) as
    lrpc.Session does:
    big weights read by onnxruntime in the model's file, never a second copy serialized, one session and as few
    reads of the file as the session needs alive at a time (VGG16: 21 s / 6.3 GB -> 6.4 s / 2.6 GB for check)."""
    import weakref

    from lrpc import runtime
    from lrpc.check import run_check
    from lrpc.inspect import inspect

    path = tmp_path / "m.onnx"
    onnx.save(_model_with_folded_weight(), str(path))
    folders, alive, maps, sessions, real = [], [], [], [], runtime.inference_session

    def spy(data, *a, **k):
        alive.append(sum(r() is not None for r in sessions))
        maps.append(Path("/proc/self/maps").read_text().count(str(path.resolve())))  # (lrpc's reads of it alive)
        folders.append(k.get("external_folder"))
        session = real(data, *a, **k)
        sessions.append(weakref.ref(session))
        return session

    monkeypatch.setattr(runtime, "inference_session", spy)
    if tool == "check":
        assert run_check(path, "epsilon").passed
        # (compiled, original, conserving, LRP-0 for the gradient check, its probe)
        assert folders == [path.parent] * 5 and maps == [1, 1, 1, 1, 1]
    else:  # (a huge epsilon loses relevance to the stabilizers: one run books it)
        result = inspect(path, "epsilon", lrpc.composites.Options(epsilon=1e3))
        assert result["warning"] is not None and folders == [path.parent] and maps == [1]
    assert alive == [0] * len(folders)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="replaces a file lrpc has mapped")
@pytest.mark.parametrize("tool", ["check", "inspect"])
def test_check_and_inspect_refuse_a_file_replaced_while_they_read_it(tool, tmp_path, monkeypatch, capsys):
    """They read the file once per compile: a file replaced in between is one clear error, not a report that mixes
    two models."""
    from lrpc import runtime
    from lrpc.check import run_check
    from lrpc.errors import InputError
    from lrpc.inspect import inspect

    path, other = tmp_path / "m.onnx", tmp_path / "other.onnx"
    onnx.save(_model_with_folded_weight(), str(path))
    onnx.save(_model_with_folded_weight(), str(other))
    real = runtime.inference_session

    def replace_then_start(data, *a, **k):
        if other.exists():
            os.replace(other, path)
        return real(data, *a, **k)

    monkeypatch.setattr(runtime, "inference_session", replace_then_start)
    with pytest.raises(InputError, match="the file changed while lrpc .* read it"):
        run_check(path, "epsilon") if tool == "check" else inspect(path, "epsilon")
    onnx.save(_model_with_folded_weight(), str(other))  # the command line: one line, exit code 2, no traceback
    from lrpc.cli import main

    assert main([tool, str(path), "--rules", "epsilon"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lrpc: error: {path}: the file changed while lrpc {tool} read it") and "Traceback" not in err


def _big_model() -> onnx.ModelProto:
    """Conv (weight big enough to be kept in place), ReLU, Conv + BatchNorm (its weight folded: replaced), ReLU,
    Gemm."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 3, 5, 5)).astype(np.float32)  # 4800 values: big enough to be kept in place
    w2 = rng.standard_normal((16, 64, 3, 3)).astype(np.float32)  # folded with the BatchNorm: replaced
    g = rng.standard_normal((10, 16 * 2 * 2)).astype(np.float32)
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("s", rng.random(16) + 0.5), ("b", rng.standard_normal(16)), ("m", rng.standard_normal(16)),
           ("v", rng.random(16) + 0.5))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(g, "g"), *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rich_model() -> onnx.ModelProto:
    """A model using most fields of ModelProto and GraphProto (around the graph and its initializers)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    b.doc_string = "a bias"
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5], np.float32), "s"),
                                       numpy_helper.from_array(np.array([2], np.int64), "s_i"), [4])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3, 3])], [w, b],
                              doc_string="graph doc",
                              value_info=[helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1])],
                              sparse_initializer=[sparse])
    func = helper.make_function("local", "f", ["a"], ["o"], [helper.make_node("Relu", ["a"], ["o"])],
                                [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func], producer_name="p", producer_version="1", doc_string="model doc",
                              model_version=7, domain="d")
    helper.set_model_props(model, {"k": "v"})
    return model


def _odd_file(path) -> tuple[onnx.ModelProto, bytes]:
    """_big_model written to ``path`` with weight w's fields in another order than protobuf writes them, in a second
    ModelProto.graph field (protobuf merges the two): (the model, w's bytes as stored)."""
    from lrpc.wire import key_and_length as _key_and_length

    model = _big_model()
    w = model.graph.initializer[0]
    assert w.name == "w"
    reordered = (_key_and_length(9, len(w.raw_data)) + w.raw_data + bytes([2 << 3, TensorProto.FLOAT])
                 + b"".join(bytes([1 << 3, d]) for d in w.dims) + _key_and_length(8, 1) + b"w")  # (dims < 128)
    assert onnx.TensorProto.FromString(reordered) == w and reordered != w.SerializeToString()
    del model.graph.initializer[0]
    entry = _key_and_length(5, len(reordered)) + reordered
    data = model.SerializeToString() + _key_and_length(7, len(entry)) + entry
    model.graph.initializer.append(w)
    assert onnx.ModelProto.FromString(data) == model
    path.write_bytes(data)
    return model, reordered


def test_compile_from_a_path_builds_in_place_of_the_read_model(tmp_path):
    """A model read from a file is lrpc's own: the export reuses its big weights instead of copying them
    (lrpc/graph.py export_model). The result must equal compiling the same ModelProto (which is never
    modified): same nodes, inputs, outputs, metadata and initializers (by content), and BatchNorm-folded
    weights must replace, not join, the originals."""
    import lrpc as api

    model = _big_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    rng = np.random.default_rng(1)
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    before = model.SerializeToString()
    from_path, from_proto = api.compile(path, "epsilon-plus"), api.compile(model, "epsilon-plus")
    assert model.SerializeToString() == before
    inits = lambda m: {t.name: t.SerializeToString() for t in m.graph.initializer}
    assert inits(from_path) == inits(from_proto)
    # a ModelProto handed over (lrpc explain reads the file itself, then hands it over): built in it too
    handed = onnx.load(str(path))
    from lrpc import compiler, explain
    from lrpc.loaded import LoadedModel

    assert api.compile(LoadedModel(handed, owned=True), "epsilon-plus") is handed
    assert inits(handed) == inits(from_proto) and list(handed.graph.node) == list(from_proto.graph.node)
    seen = []
    real = compiler.compile_loaded
    compiler.compile_loaded = lambda m, *a, **k: seen.append((m, m.owned, m.proto)) or real(m, *a, **k)
    try:
        explain.prepare(path, "epsilon-plus")
        explain.prepare(model, "epsilon-plus")
    finally:
        compiler.compile_loaded = real
    assert seen[0][1] and not seen[1][1] and seen[1][2] is model
    assert model.SerializeToString() == before
    assert inits(from_path)["w"] == numpy_helper.from_array(w, "w").SerializeToString()  # kept as it was
    assert "w2" not in inits(from_path)  # replaced by the BatchNorm-folded weight
    for field in ("node", "input", "output", "value_info"):
        assert list(getattr(from_path.graph, field)) == list(getattr(from_proto.graph, field)), field
    assert list(from_path.metadata_props) == list(from_proto.metadata_props)
    assert from_path.opset_import == from_proto.opset_import and from_path.ir_version == from_proto.ir_version
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    seed = np.eye(10, dtype=np.float32)[[1, 2]]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "relevance_seed": seed})
    for a, b in zip(run(from_path), run(from_proto)):
        np.testing.assert_array_equal(a, b)
    assert inits(api.canonize(path)) == inits(api.canonize(model))


@pytest.mark.parametrize("case", ["rich", "no initializers", "no graph", "unknown field", "digits compiled"])
def test_saved_bytes_are_serialize_to_string(case, tmp_path):
    """save_model writes the model piece by piece (its weights one at a time, not one buffer of the whole
    file): the file must hold exactly the bytes of SerializeToString."""
    import lrpc as lib
    from lrpc.loaded import LoadedModel

    if case == "digits compiled":
        model = lib.compile(DIGITS, "epsilon-gamma-box")
    else:
        model = _rich_model()
        if case == "no initializers":
            del model.graph.initializer[:]
        elif case == "no graph":
            model.ClearField("graph")
        elif case == "unknown field":  # (field 99 of ModelProto: unknown to this protobuf build, kept as is)
            model = onnx.ModelProto.FromString(model.SerializeToString() + b"\x98\x06\x05")
    pieces = LoadedModel(model).pieces()
    assert b"".join(pieces) == model.SerializeToString()
    assert len(pieces) == (1 if case in ("no graph", "unknown field") else 5 + 2 * len(model.graph.initializer))
    LoadedModel(model).save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()


def test_model_past_the_file_limit_is_refused(tmp_path, monkeypatch):
    """A model past protobuf's 2 GB limit (here: a limit lowered below the digits CNN's size) is a clear error,
    and nothing is written."""
    from lrpc import wire
    from lrpc.errors import UnsupportedError
    from lrpc.loaded import LoadedModel

    model = onnx.load(str(DIGITS))
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", model.ByteSize() - 1)
    with pytest.raises(UnsupportedError, match="an ONNX file holds at most 2 GB"):
        LoadedModel(model).save(tmp_path / "big.onnx")
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", model.ByteSize())
    LoadedModel(model).save(tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx").read_bytes() == model.SerializeToString()


def test_raw_weights_are_the_initializers_bytes(tmp_path):
    """raw_weights finds each initializer's bytes in the file as stored (every float width and an integer
    tensor, around doc strings and a sparse initializer); a tensor kept in external data is left out (its bytes
    are not in the file)."""
    from onnx.external_data_helper import convert_model_to_external_data

    from lrpc.wire import raw_weights

    model = _rich_model()
    rng = np.random.default_rng(4)
    for dtype in (np.float16, np.float64, np.int64):
        model.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(6) * 9).astype(dtype),
                                                               f"t_{dtype.__name__}"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty"))
    onnx.save(model, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    raw = raw_weights(data)
    assert [t.name for t in raw] == [i.name for i in model.graph.initializer]
    for init, t in zip(model.graph.initializer, raw):
        assert bytes(t.raw) == numpy_helper.to_array(init).tobytes() and bytes(t.whole) == init.SerializeToString()
        assert bytes(data[slice(*t.field)]).endswith(bytes(t.whole))  # the graph's field: key, length, tensor
        assert [bytes(data[a:b]).endswith(bytes(t.raw)) for a, b in t.raw_fields] == [True]
    big = numpy_helper.from_array(rng.standard_normal(4096).astype(np.float32), "big")
    model.graph.initializer.append(big)
    convert_model_to_external_data(model, location="w.bin", size_threshold=1024)
    onnx.save(model, tmp_path / "ext.onnx")
    data = (tmp_path / "ext.onnx").read_bytes()
    stored = {t.name: t.raw for t in raw_weights(data)}
    assert stored["big"] is None and {t.name: t.whole for t in raw_weights(data)}["big"] is None
    assert bytes(stored["w"]) == numpy_helper.to_array(model.graph.initializer[0]).tobytes()
    import lrpc as lib
    from lrpc.errors import InputError

    assert lib.compile(tmp_path / "ext.onnx", "epsilon") is not None
    stored = np.fromfile(tmp_path / "w.bin", np.float32)
    assert stored.size == 4096  # ("big" alone is past the threshold)
    stored[7] = np.nan  # the scan reads the external tensor from the ModelProto: its NaN is found
    stored.tofile(tmp_path / "w.bin")
    with pytest.raises(InputError, match="weight 'big' holds 1 NaN/Inf value"):
        lib.compile(tmp_path / "ext.onnx", "epsilon")


@pytest.mark.parametrize("command", ["compile", "canonize"])
def test_unchanged_weights_are_written_as_the_files_bytes(command, tmp_path):
    """The weights the result holds as read from the file are written as the file's bytes (views into them, not
    serialized again); a weight a pass changed (w2, folded with the BatchNorm) and small ones are serialized. The
    input was written by protobuf: the output holds the model's SerializeToString exactly, from the CLI too."""
    from lrpc import compiler

    path = tmp_path / "big.onnx"
    onnx.save(_big_model(), str(path))
    if command == "compile":
        loaded = compiler.compile_loaded(path, "epsilon-gamma-box")
    else:
        loaded = compiler.canonize_loaded(path)
    model, pieces = loaded.proto, loaded.pieces()
    views = [onnx.TensorProto.FromString(p) for p in pieces if isinstance(p, memoryview)]
    assert [t.name for t in views] == ["w"] and "w2" not in {t.name for t in model.graph.initializer}
    assert views[0] == next(t for t in onnx.load(str(path)).graph.initializer if t.name == "w")
    w = next(t for t in model.graph.initializer if t.name == "w")
    assert not w.HasField("raw_data")  # read without its data (deferred): never copied out of the file's bytes
    assert b"".join(pieces) == loaded.restored().SerializeToString() and w.HasField("raw_data")
    assert b"".join(loaded.pieces()) == model.SerializeToString()  # (restored: still the file's bytes)
    rules = ["--rules", "epsilon-gamma-box"] if command == "compile" else []
    code, _, err = run_cli(command, path, "-o", tmp_path / "out.onnx", *rules)
    assert code == 0, err
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()


def test_weights_are_written_as_stored_in_a_file_protobuf_did_not_write(tmp_path):
    """A file that stores weight w with its fields in another order than protobuf writes them, in a second
    ModelProto.graph field (protobuf merges the two): the same model. The output keeps w's bytes as stored, so
    its bytes differ from SerializeToString's, and it parses to the very same model, from the CLI too."""
    from lrpc import compiler

    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    loaded = compiler.compile_loaded(path, "epsilon")
    got, pieces = loaded.proto, loaded.pieces()
    assert [bytes(p) for p in pieces if isinstance(p, memoryview)] == [reordered]
    assert b"".join(pieces) != got.SerializeToString()
    assert onnx.ModelProto.FromString(b"".join(pieces)) == got
    want = compiler.compile(model, "epsilon")  # (a ModelProto's initializers come in the export's order)
    assert list(got.graph.node) == list(want.graph.node)
    assert {t.name: t for t in got.graph.initializer} == {t.name: t for t in want.graph.initializer}
    code, _, err = run_cli("compile", path, "-o", tmp_path / "out.onnx", "--rules", "epsilon")
    assert code == 0, err
    written = (tmp_path / "out.onnx").read_bytes()
    assert reordered in written and onnx.ModelProto.FromString(written) == got  # (the CLI writes verbatim)


def test_explain_hands_the_files_bytes_over(tmp_path):
    """lrpc explain reads the file and hands model and bytes over to the compile: the weight scan reads the bytes
    (no weight copied out of the proto) and a compile-cache entry keeps the unchanged weights as stored, with the
    graph of a plain compile."""
    from onnx import numpy_helper as nh

    from lrpc import explain

    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    reads = []
    real = nh.to_array
    try:
        nh.to_array = lambda t, *a, **k: reads.append(t.name) or real(t, *a, **k)
        explain.prepare(path, "epsilon", cache=True)
    finally:
        nh.to_array = real
    assert "w" not in reads, reads
    entries = list(Path(os.environ["LRPC_CACHE_DIR"]).glob("*.lrp.onnx"))
    assert len(entries) == 1 and reordered in entries[0].read_bytes()
    import lrpc as lib

    want = lib.compile(model, "epsilon")
    assert onnx.load(str(entries[0])).graph.node == want.graph.node


@pytest.mark.parametrize("seed", ["input", "top1", "switch"])
def test_sessions_get_the_weights_as_stored(seed, tmp_path, monkeypatch):
    """lrpc.Session of a compiled file, and lrpc explain of a plain one, hand onnxruntime the weights still as read as
    the file's bytes (not serialized again; for each seed mode) — a big weight
    read without its data (a file lrpc wrote: one graph field) as a reference to its place in that file, which
    onnxruntime reads itself — and the sessions compute what a session of the same model serialized by protobuf
    computes."""
    import lrpc as lib
    from lrpc import explain, runtime

    given = []
    real = runtime.inference_session
    monkeypatch.setattr(runtime, "inference_session",
                        lambda data, *a, **k: given.append((data, k.get("external_folder"))) or real(data, *a, **k))
    path = tmp_path / "odd.onnx"
    model, reordered = _odd_file(path)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).tobytes()

    def how(data, folder) -> str:
        if reordered in data:
            return "bytes"
        info = {e.key: e.value for e in next(t for t in onnx.load_from_string(data).graph.initializer
                                             if t.name == "w").external_data}
        if folder is None or not info:
            return "serialized"
        start = int(info["offset"])
        assert (Path(folder) / info["location"]).read_bytes()[start:start + int(info["length"])] == w
        return "file"
    code, _, err = run_cli("compile", path, "-o", tmp_path / "odd.lrp.onnx", "--rules", "epsilon", "--seed", seed)
    assert code == 0, err
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    compiled = tmp_path / "odd.lrp.onnx"
    from lrpc.compiler import compile_loaded

    loaded = compile_loaded(path, "epsilon", seed=seed)
    sessions = {"file": lib.Session(compiled), "explain": explain.prepare(path, "epsilon", seed=seed)[0],
                "explain compiled": explain.prepare(compiled)[0],
                "explain cached": explain.prepare(path, "epsilon", seed=seed, cache=True)[0],  # (written)
                "explain cache hit": explain.prepare(path, "epsilon", seed=seed, cache=True)[0],
                "loaded": lib.Session(loaded), "proto": lib.Session(onnx.load(str(compiled)))}
    from lrpc.runtime import _READS_EXTERNAL_FOLDER

    file = "file" if _READS_EXTERNAL_FOLDER else "bytes"  # (the hand-over: Linux, onnxruntime >= 1.21)
    assert [how(*g) for g in given] == [file, "bytes", file, "bytes", file, "bytes", "serialized"]
    assert loaded.proto is not None and loaded._stored  # (left as given: the caller's model and its file's bytes
    sessions["loaded again"] = lib.Session(loaded)  # stay usable, e.g. a second Session)
    want = sessions["proto"].explain({"x": x})  # (top-1: scores then seed, the switch, or a top1-seeded graph)
    assert np.abs(want.relevance).sum() > 0
    for name in set(sessions) - {"proto"}:
        got = sessions[name].explain({"x": x})
        np.testing.assert_array_equal(got.relevance, want.relevance, err_msg=name)


def test_a_weight_changed_in_place_is_serialized_again(tmp_path):
    """The file's bytes stand for a tensor only while it is the very object loaded, with its name, dims and
    type: one renamed, reshaped or retyped in place is serialized again (lrpc itself never writes into a loaded
    tensor), and so is a new tensor of the same name and shape put in its place."""
    from lrpc import compiler

    path = tmp_path / "big.onnx"
    onnx.save(_big_model(), str(path))
    for change in ("name", "dims", "type", "replaced", "none"):
        loaded = compiler.compile_loaded(path, "epsilon")
        model = loaded.proto
        w = next(t for t in model.graph.initializer if t.name == "w")
        assert loaded.stored_bytes(w) is not None and loaded.stored_bytes(onnx.TensorProto()) is None
        if change == "name":
            w.name = "w_renamed"
        elif change == "dims":
            w.dims[0], w.dims[1] = w.dims[1], w.dims[0]
        elif change == "type":
            w.data_type = TensorProto.INT32
        elif change == "replaced":
            at = next(i for i, t in enumerate(model.graph.initializer) if t is w)
            new = numpy_helper.from_array(-numpy_helper.to_array(loaded.restored() and w), "w")
            model.graph.initializer.insert(at, new)
            del model.graph.initializer[at + 1]
            w = model.graph.initializer[at]
            assert numpy_helper.to_array(w).tobytes() == numpy_helper.to_array(new).tobytes()
        assert not w.HasField("raw_data") or change == "replaced"  # (read without its data: deferred)
        assert (loaded.stored_bytes(w) is None) == (change != "none")
        assert w.HasField("raw_data") == (change != "none")  # a changed deferred weight gets its data back
        pieces = b"".join(loaded.pieces())
        assert pieces == loaded.restored().SerializeToString()


def test_nan_weights_refused_in_a_model_proto():
    """The NaN/Inf scan of a ModelProto handed to lrpc.compile (no file bytes: weights read from the proto)."""
    import lrpc as lib
    from lrpc.errors import InputError

    model = _rich_model()
    values = numpy_helper.to_array(model.graph.initializer[0]).copy()
    values[1, 1, 2, 2] = -np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w"))
    with pytest.raises(InputError, match="weight 'w' used by node 'conv' \\(Conv\\) holds 1 NaN/Inf value"):
        lib.compile(model, "epsilon")


@pytest.mark.parametrize("where", ["model", "tensor"])
def test_unknown_group_fields_fall_back_to_the_proto(where, tmp_path):
    """An (unknown) group field, which protobuf parses and raw_weights does not walk: the weights are read from
    the ModelProto instead, and the compile gives the same graph as from the clean file."""
    import lrpc as lib
    from lrpc.wire import raw_weights

    group = bytes([0x9B, 0x06, 0x9C, 0x06])  # field 99: start group, end group
    model = onnx.load(str(DIGITS))
    if where == "tensor":
        model.graph.initializer[0].ParseFromString(model.graph.initializer[0].SerializeToString() + group)
        data = model.SerializeToString()
    else:
        data = model.SerializeToString() + group
    (tmp_path / "g.onnx").write_bytes(data)
    assert raw_weights(data) == []
    got, want = lib.compile(tmp_path / "g.onnx", "epsilon"), lib.compile(DIGITS, "epsilon")
    assert [n.op_type for n in got.graph.node] == [n.op_type for n in want.graph.node]


def test_cli_past_the_file_limit_is_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's side of the 2 GB refusal (limit lowered in-process): one line naming the limit, exit code 2,
    no output file."""
    from lrpc import wire
    from lrpc.cli import main

    monkeypatch.setattr(wire, "MAX_FILE_BYTES", 1000)
    code = main(["compile", str(DIGITS), "-o", str(tmp_path / "o.onnx")])
    one_line_error(code, capsys.readouterr().err, contains="an ONNX file holds at most 2 GB")
    assert not list(tmp_path.iterdir())

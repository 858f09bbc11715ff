"""Reading a model without copying its big weights (lrpc.loaded.load, defer): which tensors are deferred,
that every way a model leaves lrpc gives them their data (or the file's bytes), and that compiling a file read
that way gives what compiling the fully parsed ModelProto gives (oracle: protobuf's own parse)."""
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


@pytest.mark.parametrize("exchange", [True, False])
def test_an_existing_output_is_replaced_whole(exchange, tmp_path, monkeypatch):
    """write_atomic onto an existing file: by exchanging the names (Linux) or by os.replace (elsewhere, or where
    the file system has no exchange): the new bytes, a plain open()'s permissions, no file left beside it, and a
    hard link of the old file keeps the old bytes (the old file is replaced, not written into)."""
    import os

    import lrpc.atomic_write as io

    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old" * 1000)
    os.link(out, tmp_path / "link")
    called = []
    real = io._exchange
    monkeypatch.setattr(io, "_exchange", lambda a, b: called.append(b) or real(a, b))
    io.write_atomic([b"new ", memoryview(b"bytes")], out)
    assert out.read_bytes() == b"new bytes" and (tmp_path / "link").read_bytes() == b"old" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert called == ([out] if sys.platform.startswith("linux") else [])
    if exchange and sys.platform.startswith("linux"):
        assert real(str(tmp_path / "link"), out)  # (this file system exchanges: the path above was taken)
        assert out.read_bytes() == b"old" * 1000
    io.write_atomic(b"fresh", tmp_path / "new.onnx")  # (no file there: a plain rename)
    assert (tmp_path / "new.onnx").read_bytes() == b"fresh"


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
@pytest.mark.parametrize("case", ["as read", "file replaced", "replaced while starting", "runtime refuses"])
def test_a_session_reads_deferred_weights_from_the_file_it_read(case, tmp_path, monkeypatch):
    """lrpc.Session of a compiled file hands onnxruntime its big weights as references into that file (a small
    model; onnxruntime reads them there). If the path names another file by then (replaced before or while the
    session starts), or onnxruntime cannot read them there, the session is made from the bytes lrpc read: it
    always computes what the file held when it was read (oracle: a session of protobuf's parse of it)."""
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
    got = lrpc.Session(model, providers=["CPUExecutionProvider"]).run({"x": x}, seed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    small = given[0][0] < path.stat().st_size // 4 if case != "file replaced" else None
    assert [folder for _, folder in given] == {
        "as read": [path.parent], "file replaced": [None], "replaced while starting": [path.parent, None],
        "runtime refuses": [path.parent, None]}[case]
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
        # (original + compiled, compiled, conserving, LRP-0 for the gradient check, its probe)
        assert folders == [path.parent] * 5 and maps == [2, 1, 1, 1, 1]
    else:  # (a huge epsilon loses relevance to the stabilizers: the run without biases follows)
        result = inspect(path, "epsilon", lrpc.composites.Options(epsilon=1e3))
        assert result["bias"] is not None and folders == [path.parent] * 2 and maps == [1, 1]
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


def test_an_output_is_checked_against_the_inputs_in_one_stat(tmp_path, monkeypatch):
    """explain --images checks each output against every source: with the sources stat'ed once (protected()) each
    check is one stat, not one per source (2,000 images re-run took minutes)."""
    from lrpc import atomic_write as io

    sources = [tmp_path / f"{i}.png" for i in range(50)]
    for s in sources:
        s.write_bytes(b"x")
    read = io.protected([(s, "a source") for s in sources])
    (tmp_path / "out.png").write_bytes(b"y")
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a) or real(*a, **k))
    io.refuse_inputs(tmp_path / "out.png", read)
    assert len(calls) == 1
    with pytest.raises(io.InputError, match="refusing to overwrite an input file \\(a source\\)"):
        io.refuse_inputs(sources[7], read)


def test_the_standard_streams_are_their_descriptors_however_spelled():
    """/dev/stdin, /dev/stdout, /dev/stderr name descriptors 0, 1, 2 (not the file a link resolves to, which a write
    would replace), also as //dev/stdout or /dev/../dev/stdout; /dev/fd/N takes ASCII digits only."""
    from lrpc.atomic_write import _descriptor

    assert [_descriptor(Path(p)) for p in ("/dev/stdin", "/dev/stdout", "/dev/stderr")] == [0, 1, 2]
    assert _descriptor(Path("/dev/../dev/stdout")) == 1 and _descriptor(Path("//dev/stdout")) == 1
    assert _descriptor(Path("/dev/fd/\uff11")) is None

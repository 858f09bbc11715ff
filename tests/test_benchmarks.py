"""The benchmark's measuring helpers measure what they say (benchmarks/bench_lrp.py, bench_transformers.py; the
timings themselves are not tested here)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_lrp


def test_child_memory_is_the_childs_own_peak():
    """The peak of a child that allocates 400 MB is ~400 MB above an idle child's, also while this process holds
    more than that (``ru_maxrss`` carried the parent's peak into the child: every ratio read 1.00)."""
    held = np.ones(80_000_000)  # 640 MB in the parent
    idle = bench_lrp.peak_memory_mb("pass", "cpu")
    busy = bench_lrp.peak_memory_mb("a = np.ones(50_000_000)", "cpu")
    assert 350 < busy - idle < 450, (idle, busy)
    assert idle < held.nbytes / 2**20
    del held


def test_benchmark_sessions_run_with_lrpc_options(tmp_path):
    import lrpc

    compiled = lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon")
    path = tmp_path / "d.lrp.onnx"
    path.write_bytes(compiled.SerializeToString())
    session = bench_lrp.session(path, 1, "cpu")
    assert not session.get_session_options().enable_mem_pattern
    x = np.load(ROOT / "models" / "digits_samples.npz")["images"]
    seed = np.eye(10, dtype=np.float32)[np.arange(len(x)) % 10]
    run = bench_lrp.runner(session, {"input": x, "relevance_seed": seed}, "cpu")
    want = lrpc.Session(compiled, providers=["CPUExecutionProvider"]).run({"input": x}, seed)["relevance"]
    got = dict(zip([o.name for o in session.get_outputs()], run()))["relevance"]
    np.testing.assert_array_equal(got, want)
    mib = bench_lrp.onnxruntime_memory_mb(path, _npz(tmp_path, input=x, relevance_seed=seed), 1, "cpu")
    assert 30 < mib < 1000  # an interpreter with numpy and onnxruntime loaded, a tiny model


def _npz(tmp_path, **arrays):
    path = tmp_path / "feeds.npz"
    np.savez(path, **arrays)
    return path


def test_profile_floor_line(tmp_path):
    """``profile_ops.py --forward``: the compiled graph's kernel time and its convolutions' alone, in forwards. The
    convolutions are part of the total, and the compiled graph contains every node of the forward and more."""
    import os
    import re
    import subprocess

    import lrpc

    path = tmp_path / "d.lrp.onnx"
    path.write_bytes(lrpc.compile(ROOT / "models" / "digits_cnn.onnx", "epsilon-gamma-box").SerializeToString())
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_ops.py"), str(path), "--forward",
                          str(ROOT / "models" / "digits_cnn.onnx"), "--batch", "64", "--runs", "5", "--threads", "1"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    total, conv = map(float, re.search(r"kernel time\): ([\d.]+); its convolutions alone: ([\d.]+)", out).groups())
    assert 0 < conv <= total and total > 1.0, out
    assert "Conv" in out and "nodes not on CPUExecutionProvider: 0" in out


def test_transformer_benchmark_runs_on_tiny_models(tmp_path):
    """``bench_transformers.py --tiny``: every model exports and compiles, each row has its times, and the torch
    detach reference explains what the compiled graph explains (relevance agrees up to the default epsilon)."""
    import os
    import re
    import subprocess

    for module in ("torch", "torchvision", "transformers"):
        pytest.importorskip(module)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_transformers.py"), "--tiny", "--sizes", "2",
                          "--repeats", "1", "--threads", "1", "--cache", str(tmp_path)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"(vit|bert|llama) ", line)]
    assert [(r[0], r[2]) for r in rows] == [(m, c) for m in ("bert", "llama", "vit") for c in ("attnlrp", "cp-lrp")]
    for r in rows:
        fwd, lrp, _, torch_ms, _, err = map(float, r[3:9])
        assert fwd > 0 and lrp > 0 and torch_ms > 0 and err < 5e-3, r

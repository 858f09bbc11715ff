"""Shared fixtures and helpers that need no torch (numpy, onnx, onnxruntime); the torch ones (models of
models/zoo.py and their exports) are in torch_fixtures.py and skip their tests where torch is not installed.

``run_compiled(model, feeds)`` -> run a compiled ModelProto with onnxruntime (CPU), dict of outputs
``run_onnx(model, feeds)``     -> the same as a function; ``rel_l2(a, b)`` -> relative L2 error

Tests may add lines to the end-of-run summary with ``report_line(text)``.

Tests marked ``zoo`` (the zoo beyond its default subset, tests/test_zoo.py) are deselected unless the run asks for
them: ``--zoo all`` or the environment variable ``LRPC_ZOO=all``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["torch_fixtures"]  # the fixtures that export torch models (skip without torch)
_REPORT: list[str] = []


def report_line(text: str) -> None:
    _REPORT.append(text)


def pytest_addoption(parser):
    parser.addoption("--zoo", choices=("default", "all"), default=None,
                     help="'all' also runs the tests marked zoo (the whole zoo of tests/test_zoo.py; env LRPC_ZOO)")


def pytest_collection_modifyitems(config, items):
    if (config.getoption("--zoo") or os.environ.get("LRPC_ZOO", "default")) == "all":
        return
    skipped = [item for item in items if item.get_closest_marker("zoo")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not item.get_closest_marker("zoo")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _REPORT:
        terminalreporter.section("lrpc numeric results")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    """Tests never write the user's compile cache: each test gets a fresh, empty one."""
    monkeypatch.setenv("LRPC_CACHE_DIR", str(tmp_path_factory.mktemp("lrpc-cache")))


def run_onnx(model: onnx.ModelProto, feeds: dict, outputs=None) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.fixture(scope="session")
def run_compiled():
    return run_onnx


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

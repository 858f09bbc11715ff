"""Shared fixtures: seeded torch models from models/zoo.py and their ONNX exports, built once per session.

``zoo_model(name)``            -> eval-mode torch model (cached)
``zoo_onnx(name, exporter)``   -> path of its ONNX export in a session tmp dir (cached); exporter is
                                  "legacy" (TorchScript, constant folding), "legacy-nofold" (BN kept) or
                                  "dynamo"
``zoo_proto(name, exporter)``  -> the loaded onnx.ModelProto of that export (cached)
``run_compiled(model, feeds)`` -> run a compiled ModelProto with onnxruntime (CPU), dict of outputs

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
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402

EXPORTERS = ("legacy", "legacy-nofold", "dynamo")
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


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def zoo_model():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            if name in zoo.TORCHVISION:  # keep one big model in memory at a time (VGG16 is 0.55 GB)
                for other in [k for k in cache if k in zoo.TORCHVISION]:
                    del cache[other]
            cache[name] = zoo.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_onnx(zoo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_onnx")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {exporter!r}")
        key = (name, exporter)
        if key not in cache:
            cache[key] = zoo.export(zoo_model(name), root / f"{name}-{exporter}.onnx", zoo.INPUT_SHAPES[name],
                                    dynamo=exporter == "dynamo", constant_folding=exporter != "legacy-nofold")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def zoo_proto(zoo_onnx):
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(name: str, exporter: str) -> onnx.ModelProto:
        key = (name, exporter)
        if key not in cache:
            if name in zoo.TORCHVISION:  # drop the protos of other big models (files stay on disk)
                for other in [k for k in cache if k[0] in zoo.TORCHVISION and k[0] != name]:
                    del cache[other]
            cache[key] = onnx.load(str(zoo_onnx(name, exporter)))
        return cache[key]

    return get


def run_onnx(model: onnx.ModelProto, feeds: dict, outputs=None) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.fixture(scope="session")
def run_compiled():
    return run_onnx


def grad_x_input_top1(net, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRP-0's oracle for one sample: (output, seed = one-hot × the top-1 output, gradient × input of that output)
    of the torch module ``net`` (output [1, C]) at the tensor ``x``."""
    import torch

    xt = x.clone().requires_grad_(True)
    y = net(xt)
    k = int(y.argmax())
    (grad,) = torch.autograd.grad(y[0, k], xt)
    seed = np.zeros(tuple(y.shape), np.float32)
    seed[0, k] = float(y[0, k].detach())
    return y.detach().numpy(), seed, (grad * x).detach().numpy()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

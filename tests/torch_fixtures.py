"""Fixtures and helpers that need torch: seeded models from models/zoo.py and their ONNX exports, built once per
session. Tests that use them are skipped where torch is not installed (the pure-ONNX tests still run).

``zoo_model(name)``            -> eval-mode torch model (cached)
``zoo_onnx(name, exporter)``   -> path of its ONNX export in a session tmp dir (cached); exporter is
                                  "legacy" (TorchScript, constant folding), "legacy-nofold" (BN kept) or
                                  "dynamo"
``zoo_proto(name, exporter)``  -> the loaded onnx.ModelProto of that export (cached)
``grad_x_input_top1(net, x)``  -> LRP-0's oracle for one sample
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

EXPORTERS = ("legacy", "legacy-nofold", "dynamo")


def _zoo():
    pytest.importorskip("torch")
    from models import zoo

    return zoo


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def zoo_model():
    zoo = _zoo()
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name in zoo.TORCHVISION:  # keep one big model in memory at a time (VGG16 is 0.55 GB)
                for other in [k for k in cache if k in zoo.TORCHVISION]:
                    del cache[other]
            cache[name] = zoo.build(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_onnx(zoo_model, tmp_path_factory):
    zoo = _zoo()
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
    zoo = _zoo()
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

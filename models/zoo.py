"""Seeded test models (random weights) and ONNX export helpers, importable from the tests.

Torchvision builders (``vgg16``, ``vgg16_bn``, ``resnet18``, ``resnet50``) return eval-mode models with

* non-trivial BatchNorm layers: running statistics calibrated on random inputs (so activations stay
  well scaled through deep nets), then perturbed, plus random affine ``weight``/``bias``;
* ``eps = 0`` on every BatchNorm: zennit 0.5.1's MergeBatchNorm leaves the BN's eps in place, so its
  canonized model only equals the original when eps is 0 (see shared/engineering-notes.md). lrpc folds
  BN exactly with any eps, but parity tests need both sides to compute the same function;
* non-zero biases on every Conv/Linear that has one (torchvision initializes VGG's biases to 0).

Small nets for fast tests: :class:`SmallResNet` (a ReLU CNN with BatchNorm, an overlapping 3x3/stride-2
MaxPool, AveragePools with and without border padding, two residual adds, one with a 1x1 projection,
and a Linear head).

``export(model, path, input_shape, dynamo)`` writes an ONNX file with the TorchScript exporter
(``dynamo=False``, default constant folding: BN folded into Conv) or the dynamo exporter.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

TORCHVISION = ("vgg16", "vgg16_bn", "resnet18", "resnet50")
# smallest input that keeps each model meaningful: VGG's classifier needs a 7x7 feature map (224 input);
# ResNets pool globally, 112x112 leaves a 4x4 map after layer4.
INPUT_SHAPES = {
    "vgg16": (1, 3, 224, 224),
    "vgg16_bn": (1, 3, 224, 224),
    "resnet18": (1, 3, 112, 112),
    "resnet50": (1, 3, 112, 112),
    "small": (1, 3, 20, 20),
    "small_bn_eps": (1, 3, 20, 20),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize(model: nn.Module, input_shape, seed: int = 0, calibrate_batches: int = 2) -> nn.Module:
    """Give ``model`` non-trivial BatchNorm statistics/affine parameters and non-zero biases; BN eps := 0.

    Running statistics are measured on ``calibrate_batches`` batches of random normal inputs (shape
    ``input_shape`` with batch 2) in train mode with cumulative averaging, then the variance is scaled by
    U(0.5, 2) and the mean shifted by 0.1·std·N(0,1) per channel, so no BN is an identity or a plain
    standardization. BN weight ~ U(0.5, 1.5)·(random sign for 10% of channels), bias ~ 0.1·N(0,1)."""
    g = _generator(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    if bns:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        model.train()
        shape = (2, *input_shape[1:])
        for _ in range(calibrate_batches):
            model(torch.randn(shape, generator=g))
        for bn in bns:
            n = bn.num_features
            bn.running_var.clamp_(min=1e-3).mul_(0.5 + 1.5 * torch.rand(n, generator=g))
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(n, generator=g))
            sign = torch.where(torch.rand(n, generator=g) < 0.1, -1.0, 1.0)
            bn.weight.copy_(sign * (0.5 + torch.rand(n, generator=g)))
            bn.bias.copy_(0.1 * torch.randn(n, generator=g))
            bn.momentum = 0.1
            bn.eps = 0.0  # after calibration: torch refuses eps=0 in train mode
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def torchvision_model(name: str, seed: int = 0, input_shape=None) -> nn.Module:
    """Seeded torchvision model ``name`` (one of TORCHVISION) with random weights, eval mode."""
    if name not in TORCHVISION:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(TORCHVISION)})")
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    return randomize(model, input_shape or INPUT_SHAPES[name], seed=seed + 1)


def vgg16(seed: int = 0) -> nn.Module:
    return torchvision_model("vgg16", seed)


def vgg16_bn(seed: int = 0) -> nn.Module:
    return torchvision_model("vgg16_bn", seed)


def resnet18(seed: int = 0) -> nn.Module:
    return torchvision_model("resnet18", seed)


def resnet50(seed: int = 0) -> nn.Module:
    return torchvision_model("resnet50", seed)


class Block(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN (+ identity or 1x1 projection) then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.proj = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.proj is None else self.proj(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """ReLU CNN for fast exactness tests (input [N,3,20,20], 10 logits)::

        Conv3x3(3→8)-BN-ReLU → MaxPool 3x3/2 pad 1 (overlapping windows) → Block(8→8, identity add)
        → AvgPool 3x3/1 pad 1 count_include_pad=False (border divisors) → Block(8→16, stride 2, 1x1 projection)
        → AvgPool 2x2/2 → Flatten → Linear(64→32) → ReLU → Linear(32→10)
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.block1 = Block(8, 8)
        self.pool2 = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.block2 = Block(8, 16, stride=2)
        self.pool3 = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.pool1(self.stem(x))
        x = self.pool2(self.block1(x))
        x = self.pool3(self.block2(x))
        return self.head(x)


def small_cnn(seed: int = 0, bn_eps: float | None = None) -> nn.Module:
    """Seeded :class:`SmallResNet`; BN eps is 0 (as for the torchvision builders) unless ``bn_eps`` is given
    (lrpc must fold BN exactly with any eps)."""
    torch.manual_seed(seed)
    model = randomize(SmallResNet(), INPUT_SHAPES["small"], seed=seed + 1, calibrate_batches=4)
    if bn_eps is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = bn_eps
    return model


def small_cnn_bn_eps(seed: int = 0) -> nn.Module:
    """:func:`small_cnn` with BatchNorm eps = 1e-3 (for tests of lrpc alone: its BN folding is exact)."""
    return small_cnn(seed, bn_eps=1e-3)


BUILDERS = {"vgg16": vgg16, "vgg16_bn": vgg16_bn, "resnet18": resnet18, "resnet50": resnet50, "small": small_cnn,
            "small_bn_eps": small_cnn_bn_eps}


def build(name: str, seed: int = 0) -> nn.Module:
    return BUILDERS[name](seed)


def example_input(name_or_shape, seed: int = 1234) -> torch.Tensor:
    """Seeded standard-normal input for a model name (see INPUT_SHAPES) or an explicit shape."""
    shape = INPUT_SHAPES[name_or_shape] if isinstance(name_or_shape, str) else tuple(name_or_shape)
    return torch.randn(shape, generator=_generator(seed))


def export(model: nn.Module, path, input_shape, dynamo: bool = False, opset: int | None = None,
           constant_folding: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Export ``model`` to ONNX at ``path`` with input ``input`` and output ``logits``.

    ``dynamo=False``: TorchScript exporter, default constant folding (BatchNorm is folded into Conv).
    ``constant_folding=False`` (legacy only) keeps BatchNormalization nodes for lrpc to fold.
    ``dynamo=True``: torch.export-based exporter (needs onnxscript; works offline). Weights are embedded
    in the .onnx file (no external data for models under 2 GB). ``dtype=torch.float64`` exports a
    double-precision graph (export a ``model.double()``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(tuple(input_shape), dtype=dtype)
    kw = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        kw["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            if not constant_folding:
                raise ValueError("constant_folding=False is a legacy-exporter option")
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kw)
            prog.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=constant_folding, **kw)
    return path

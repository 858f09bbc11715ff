"""Tiny seeded versions of every common CNN family, plus hand-built ONNX graph forms (issue "every common CNN
export compiles").

Each builder returns an :class:`Arch`: the ONNX model to compile (a torch export or a graph built with
``onnx.helper``), a seeded example input, and a float32 torch *twin* that computes the explained tensor (the
logits, i.e. the tensor behind a final Softmax) from the same weights, for autograd oracles.

Torch families (exported with :func:`export`: TorchScript exporter, opset 17, dynamic batch):
VGG (with/without BatchNorm), ResNet basic block and bottleneck (downsampling shortcuts), DenseNet
(BN-ReLU-Conv, Concat, BatchNorm after Concat/pool), Inception (parallel branches, Concat, MaxPool/AvgPool
with pads), SqueezeNet (Fire modules, GlobalAveragePool), MobileNetV2 (depthwise, ReLU6 = Clip, linear
bottleneck + residual Add), ShuffleNet v1/v2 (grouped convs, channel shuffle Reshape/Transpose/Reshape,
Split), AlexNet with LocalResponseNorm (as one ONNX LRN node, or as torch's own decomposition), activations written
as several ops (GELU Erf/tanh forms, Mish, hard-swish, SiLU), BatchNorm followed by a per-channel scale and shift
(Caffe's BatchNorm + Scale), softmax heads behind layout ops, MLP (Gemm),
normalization layers: a tiny ConvNeXt (channels-last LayerNorm via permute, Linear as MatMul on NHWC, layer scale,
LayerNorm2d), GroupNorm + InstanceNorm (affine), a hand-written channels-first LayerNorm.
:func:`torch_arch` builds, exports (either exporter) and wraps one of them; its twin holds the standard deviation of
normalization layers constant (:func:`sigma_detached`), as AttnLRP's LayerNorm rule does.

Hand-built graph forms (:data:`ONNX_BUILDERS`): MatMul+Add MLP, 3-input Sum, Conv bias as a separate Add,
Caffe2 Scale (Mul/Add of Unsqueeze'd 1-d constants), Caffe2 SpatialBN + Scale (BatchNormalization -> Mul/Add of
[C,1,1] constants, opset 9 and 7), weights made by constant subgraphs, Flatten vs Reshape
(also to ``Shape`` of another tensor),
NHWC input (tf2onnx Transpose, ReduceMean over H, W), a Pad node before Conv, a Pad of the channel axis in a
shortcut, a strided Slice with its axes listed high to low, MaxPool with pads + ceil_mode,
two outputs, and old or new opsets (9 / IR 4, 9 / IR 3 with the weights listed as graph inputs, 11, 21).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.zoo import randomize

OPSET = 17
CNN_SHAPE = (2, 3, 16, 16)  # batch 2: every check also covers the dynamic batch


@dataclass
class Arch:
    """A model to compile and its oracle.

    ``model``: ModelProto or path. ``twin(x)``: float32 torch function giving the explained tensor (logits)
    for an input tensor, differentiable, in the graph output's shape and element order. ``squash``: the op the
    ONNX graph applies after the explained tensor to produce its output ("softmax" or None), over axis
    ``squash_axis``. ``output``: the graph output to explain (None = the first)."""

    name: str
    model: object
    x: np.ndarray
    twin: Callable[[torch.Tensor], torch.Tensor]
    output: str | None = None
    squash: str | None = None
    squash_axis: int = 1


def example_input(shape, seed: int = 1234) -> np.ndarray:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).numpy()


# --------------------------------------------------------------------------------------------- torch families

def _cbr(cin, cout, k=3, s=1, p=None, g=1, bn=True, act: type = nn.ReLU):
    """Conv (+BN) (+activation)."""
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if p is None else p, groups=g, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Conv(-BN)-ReLU stacks with MaxPools, AdaptiveAvgPool (AveragePool k1 in ONNX), Linear-ReLU-Dropout head."""

    def __init__(self, bn: bool = False):
        super().__init__()
        layers, cin = [], 3
        for v in (8, "M", 16, 16, "M", 16, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if bn else []) + [nn.ReLU(True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _shortcut(cin, cout, stride):
    """None (identity), or torchvision's downsampling shortcut: 1x1 conv (stride) + BN."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride=1, expansion=4):
        super().__init__()
        cout = mid * expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, MaxPool 3x3/2 pad 1, two blocks (the second downsamples with a 1x1 conv + BN
    shortcut), global average pool, Linear."""

    def __init__(self, bottleneck: bool = False):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        if bottleneck:
            self.layer1 = Bottleneck(8, 4, stride=1)  # 8 -> 16 channels: projection shortcut, stride 1
            self.layer2 = Bottleneck(16, 4, stride=2)  # 16 -> 16, stride 2: downsampling shortcut
            self.layer3 = Bottleneck(16, 4)  # identity shortcut
            width = 16
        else:
            self.layer1 = BasicBlock(8, 8)  # identity shortcut
            self.layer2 = BasicBlock(8, 16, stride=2)  # downsampling shortcut
            self.layer3 = nn.Identity()
            width = 16
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.maxpool(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 whose output is concatenated to its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        new = self.conv1(F.relu(self.norm1(x)))  # norm1 follows a pool / Concat: cannot fold
        new = self.conv2(F.relu(self.norm2(new)))  # norm2 follows a Conv that only feeds it: folds
        return torch.cat([x, new], 1)


class DenseNet(nn.Module):
    """conv0-BN-ReLU-MaxPool, dense block (2 layers), transition (BN-ReLU-Conv1x1-AvgPool 2), dense layer,
    final BN-ReLU-global pool-Linear (torchvision DenseNet's order)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.trans = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2, 2))
        self.block2 = DenseLayer(8, 4)
        self.norm5 = nn.BatchNorm2d(12)  # after Concat: cannot fold
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm5(x)), 1)
        return self.fc(torch.flatten(x, 1))


class InceptionBlock(nn.Module):
    """1x1 | 1x1-3x3 | 1x1-5x5 | MaxPool 3/1 pad 1 - 1x1 | AvgPool 3/1 pad 1 (count_include_pad=False) - 1x1."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = _cbr(cin, 4, 1)
        self.b2 = nn.Sequential(_cbr(cin, 4, 1), _cbr(4, 4, 3))
        self.b3 = nn.Sequential(_cbr(cin, 2, 1), _cbr(2, 4, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, 4, 1))
        self.b5 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), _cbr(cin, 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x), self.b5(x)], 1)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # GoogLeNet's pools use ceil_mode
        self.block = InceptionBlock(8)
        self.pool2 = nn.AvgPool2d(3, 2, 1)  # count_include_pad=True with pads
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        x = self.pool2(self.block(self.pool1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True))
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True))
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


class SqueezeNet(nn.Module):
    """torchvision SqueezeNet 1.1 layout: conv-ReLU, MaxPool ceil_mode, Fire modules, Dropout, Conv1x1 classifier,
    ReLU, global average pool (GlobalAveragePool in ONNX), Flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(8, 4, 4), Fire(8, 4, 6), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(12, 4, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(12, 10, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=2):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(_cbr(cin, hid, 1, act=nn.ReLU6), _cbr(hid, hid, 3, stride, g=hid, act=nn.ReLU6),
                                  _cbr(hid, cout, 1, act=None))  # linear bottleneck: no activation

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)  # residual Add, no activation after it


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 3, 2, act=nn.ReLU6), InvertedResidual(8, 8, 1),
                                      InvertedResidual(8, 12, 2), InvertedResidual(12, 12, 1),
                                      _cbr(12, 16, 1, act=nn.ReLU6))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def channel_shuffle(x, groups: int):
    """torchvision's: the batch size is read from the tensor (Shape/Gather in a dynamic-batch export)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 - BN - ReLU - channel shuffle - depthwise 3x3 - BN - grouped 1x1 - BN, + x, ReLU."""

    def __init__(self, c, groups=2):
        super().__init__()
        self.groups = groups
        self.g1 = _cbr(c, c, 1, g=groups)
        self.dw = _cbr(c, c, 3, g=c, act=None)
        self.g2 = _cbr(c, c, 1, g=groups, act=None)

    def forward(self, x):
        out = self.g2(self.dw(channel_shuffle(self.g1(x), self.groups)))
        return F.relu(out + x)


class ShuffleUnitV2(nn.Module):
    """ShuffleNetV2 stride-1 unit: split channels (Split), branch 1x1-dw3x3-1x1 on one half, Concat, shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_cbr(h, h, 1), _cbr(h, h, 3, g=h, act=None), _cbr(h, h, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), 1), 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 8), nn.MaxPool2d(3, 2, 1))
        self.unit1 = ShuffleUnitV1(8)
        self.unit2 = ShuffleUnitV2(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.unit2(self.unit1(self.stem(x)))
        return self.fc(x.mean([2, 3]))  # torchvision ShuffleNetV2: ReduceMean over the spatial axes


class _LRNFunction(torch.autograd.Function):
    """torch's LocalResponseNorm, exported as one ONNX ``LRN`` node (as Caffe-converted model-zoo AlexNet /
    GoogLeNet graphs hold it). Same math for odd sizes: x / (k + alpha/size * Σ_window x²)^beta."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` that exports as ONNX ``LRN`` (``onnx_node=True``) or, as torch does by default,
    as its decomposition (Mul x·x, Pad, 3-d AveragePool, Pow, Div)."""

    def __init__(self, *args, onnx_node: bool = True, **kw):
        super().__init__(*args, **kw)
        self.onnx_node = onnx_node

    def forward(self, x):
        if self.onnx_node:
            return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class AlexNetLRN(nn.Module):
    """AlexNet (Krizhevsky 2012) layout with LocalResponseNorm after the first two conv-ReLUs, flattened with
    ``x.view(x.size(0), -1)`` (Shape/Gather/Concat/Reshape in a dynamic-batch export)."""

    def __init__(self, onnx_lrn: bool = True):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, 1, 2), nn.ReLU(inplace=True),
                                      LRN(5, 1e-3, 0.75, 2.0, onnx_node=onnx_lrn), nn.MaxPool2d(3, 2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
                                      LRN(5, 1e-3, 0.75, 2.0, onnx_node=onnx_lrn), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 3 * 3, 32), nn.ReLU(inplace=True),
                                        nn.Linear(32, 10))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class OptionAResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, option A; the popular akamaster/pytorch_resnet_cifar10 code): the downsampling
    shortcut is ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``, a strided Slice and a Pad of the channel axis."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 4)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: global average pool, 1x1 conv, activation, 1x1 conv, gate, x * gate."""

    def __init__(self, c, squeeze, act: type, gate: type):
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, squeeze, 1), act(), nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    """EfficientNet / MobileNetV3 inverted residual: expand 1x1, depthwise kxk, squeeze-and-excitation, project 1x1."""

    def __init__(self, cin, cout, stride, act: type, gate: type, k=3):
        super().__init__()
        hid = cin * 3
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(_cbr(cin, hid, 1, act=act), _cbr(hid, hid, k, stride, g=hid, act=act),
                                   SqueezeExcite(hid, max(2, cin // 2), act, gate), _cbr(hid, cout, 1, act=None))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class GatedNet(nn.Module):
    """EfficientNet-B0 style (SiLU = x * sigmoid(x) in ONNX, SE gates by Sigmoid) or MobileNetV3 style (HardSwish,
    ReLU inside the SE, gates by HardSigmoid): products of two computed tensors whose one side is a gate."""

    def __init__(self, act: type, se_act: type, gate: type):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 3, 2, act=act), MBConv(8, 8, 1, se_act, gate),
                                      MBConv(8, 12, 2, se_act, gate, k=5), MBConv(12, 12, 1, se_act, gate),
                                      _cbr(12, 16, 1, act=act))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class ActivationsNet(nn.Module):
    """A residual CNN whose activations are written as several ONNX ops by the exporter: GELU (Erf form), GELU
    (tanh form), Mish (Softplus, Tanh, Mul), hard-swish written out (x * relu6(x + 3) / 6), SiLU (x * Sigmoid(x))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 12, 3, 2, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        h = F.gelu(self.stem(x))
        h = h + F.mish(self.c2(F.gelu(self.c1(h), approximate="tanh")))
        h = self.c3(h)
        h = F.silu(h * F.relu6(h + 3) / 6)
        return self.fc(h.mean((2, 3)))


class ConvBNScale(nn.Module):
    """Conv -> BatchNorm -> ``x * scale[:, None, None] + shift[:, None, None]`` (-> ReLU): BatchNorm written as
    Caffe's BatchNorm + Scale layers (Caffe2 model-zoo files: SpatialBN, then a per-channel Mul and Add)."""

    def __init__(self, cin, cout, stride=1, relu=True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.scale = nn.Parameter(0.5 + torch.rand(cout))
        self.shift = nn.Parameter(0.2 * torch.randn(cout))
        self.relu = relu

    def forward(self, x):
        h = self.bn(self.conv(x)) * self.scale[:, None, None] + self.shift[:, None, None]
        return F.relu(h) if self.relu else h


class BNScaleNet(nn.Module):
    """Stem and a residual block of :class:`ConvBNScale` layers, MaxPool, global average pool, Linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = ConvBNScale(3, 8), nn.MaxPool2d(2)
        self.a, self.b = ConvBNScale(8, 8), ConvBNScale(8, 8, relu=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = F.relu(self.b(self.a(x)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PooledSoftmax(nn.Module):
    """SqueezeNet-style classifier whose probabilities are ``softmax(dim=1)`` of the pooled [N, C, 1, 1] map (no
    Flatten): ONNX ``GlobalAveragePool -> Softmax(axis=1)``, which torch's exporter before opset 13 writes as
    ``Transpose -> Softmax(axis=3) -> Transpose``. ``logits`` is the explained tensor."""

    output, squash_axis = "prob", 1

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2), Fire(8, 4, 4))
        self.classifier = nn.Sequential(nn.Conv2d(8, 10, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def logits(self, x):
        return self.classifier(self.features(x))

    def forward(self, x):
        return torch.softmax(self.logits(x), dim=1)


class NHWCSoftmax(nn.Module):
    """Dense classifier giving channels-last probabilities: ``softmax(dim=1)`` of an NCHW map, then
    ``permute(0, 2, 3, 1)`` ([N, H, W, C] out). ``logits``: the explained tensor, in the output's order."""

    output, squash_axis = "prob", -1

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3, 1, 1))

    def logits(self, x):
        return self.body(x).permute(0, 2, 3, 1)

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1).permute(0, 2, 3, 1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _affine(norm: nn.Module) -> nn.Module:
    """A normalization's affine parameters drawn at random (not torch's ones and zeros)."""
    with torch.no_grad():
        norm.weight.copy_((0.5 + torch.rand(norm.weight.shape))
                          * torch.where(torch.rand(norm.weight.shape) < 0.2, -1, 1))
        norm.bias.copy_(0.3 * torch.randn(norm.bias.shape))
    return norm


class LayerNorm2d(nn.Module):
    """torchvision's / timm's LayerNorm2d: NCHW permuted to NHWC, LayerNorm over C, permuted back."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.ln = _affine(nn.LayerNorm(c, eps=eps))

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """The original ConvNeXt code's LayerNorm over axis 1 of NCHW, written out (ReduceMean, Sub, Pow, ReduceMean, Add,
    Sqrt, Div, Mul, Add in ONNX, with either exporter)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps
        _affine(self)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, NHWC LayerNorm, Linear 4C (MatMul on NHWC), ReLU (for GELU), Linear C, layer scale (a
    per-channel Mul), back to NCHW, residual add."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = _affine(nn.LayerNorm(c, eps=1e-6))
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.ReLU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + (self.pw2(self.act(self.pw1(y))) * self.gamma).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """torchvision ConvNeXt's layout, tiny: 4x4/4 stem + LayerNorm2d, block, LayerNorm2d + 2x2/2 downsampling conv,
    block, global average pool, LayerNorm2d, Flatten, Linear. (The pool is a mean over H, W: torchvision's
    AdaptiveAvgPool2d(1) before the LayerNorm2d's permute makes the dynamo exporter emit an ``as_strided`` Gather
    with indices computed from the batch size, which lrpc cannot explain.)"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8))
        self.stage1 = ConvNeXtBlock(8)
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, 2))
        self.stage2 = ConvNeXtBlock(16)
        self.head = nn.Sequential(LayerNorm2d(16), nn.Flatten(1), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))).mean((2, 3), keepdim=True))


class GroupInstanceNet(nn.Module):
    """Conv-GroupNorm-ReLU, strided Conv-InstanceNorm(affine)-ReLU (style-transfer nets), residual Conv-GroupNorm + x,
    ReLU, global pool, Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), _affine(nn.GroupNorm(2, 8))
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, 2, 1), _affine(nn.InstanceNorm2d(8, affine=True))
        self.c3, self.n3 = nn.Conv2d(8, 8, 3, padding=1), _affine(nn.GroupNorm(4, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        x = F.relu(x + self.n3(self.c3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChannelsFirstLayerNormNet(nn.Module):
    """Conv, hand-written channels-first LayerNorm, ReLU (twice, the second conv strided), global pool, Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelsFirstLayerNorm(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), ChannelsFirstLayerNorm(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, ChannelsFirstLayerNorm)


def sigma_detached(model: nn.Module):
    """``model`` with the standard deviation of its normalization layers held constant (a copy; ``model`` itself where
    it has none): LRP-0 with AttnLRP's LayerNorm rule is gradient × input of this twin."""
    if not any(isinstance(m, NORMS) for m in model.modules()):
        return model
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, NORMS):
            m.register_forward_hook(_sigma_detached)  # (its output replaces the module's)
    return twin


def _sigma_detached(m: nn.Module, inputs, out):
    """``w ⊙ (x - mean(x)) / sg(sigma) + b`` of normalization module ``m`` (sg: no gradient)."""
    x = inputs[0]
    rank = x.dim()
    w = b = None
    if isinstance(m, nn.LayerNorm) and type(m).__name__ != "LayerNorm2d":
        grouped, dims, w, b = x, tuple(range(rank - len(m.normalized_shape), rank)), m.weight, m.bias
    elif isinstance(m, (ChannelsFirstLayerNorm, nn.LayerNorm)):  # (torchvision's and timm's LayerNorm2d: over axis 1)
        grouped, dims = x, (1,)
        w, b = (v.reshape(-1, *[1] * (rank - 2)) for v in (m.weight, m.bias))
    else:  # GroupNorm / InstanceNorm: statistics per sample and group (instance: each channel its own group)
        groups = m.num_groups if isinstance(m, nn.GroupNorm) else x.shape[1]
        grouped, dims = x.reshape(x.shape[0], groups, -1), (2,)
        if m.affine:
            w, b = (v.reshape(-1, *[1] * (rank - 2)) for v in (m.weight, m.bias))
    mean = grouped.mean(dims, keepdim=True)
    sigma = torch.sqrt(((grouped - mean) ** 2).mean(dims, keepdim=True) + m.eps).detach()
    y = ((grouped - mean) / sigma).reshape(x.shape)
    return y if w is None else y * w + b


TORCH_BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple]] = {
    "vgg": (lambda: VGG(bn=False), CNN_SHAPE),
    "vgg_bn": (lambda: VGG(bn=True), CNN_SHAPE),
    "resnet_basic": (lambda: ResNet(bottleneck=False), CNN_SHAPE),
    "resnet_bottleneck": (lambda: ResNet(bottleneck=True), CNN_SHAPE),
    "densenet": (DenseNet, CNN_SHAPE),
    "inception": (Inception, CNN_SHAPE),
    "squeezenet": (SqueezeNet, CNN_SHAPE),
    "mobilenet_v2": (MobileNetV2, CNN_SHAPE),
    "shufflenet": (ShuffleNet, CNN_SHAPE),
    "alexnet_lrn": (AlexNetLRN, CNN_SHAPE),
    "alexnet_lrn_decomposed": (lambda: AlexNetLRN(onnx_lrn=False), CNN_SHAPE),
    "resnet_cifar_option_a": (OptionAResNet, CNN_SHAPE),
    "efficientnet": (lambda: GatedNet(nn.SiLU, nn.SiLU, nn.Sigmoid), CNN_SHAPE),
    "mobilenet_v3": (lambda: GatedNet(nn.Hardswish, nn.ReLU, nn.Hardsigmoid), CNN_SHAPE),
    "activations": (ActivationsNet, CNN_SHAPE),
    "bn_scale": (BNScaleNet, CNN_SHAPE),
    "pooled_softmax": (PooledSoftmax, CNN_SHAPE),
    "nhwc_softmax": (NHWCSoftmax, CNN_SHAPE),
    "mlp": (mlp, (2, 16)),
    "convnext_like": (ConvNeXtLike, CNN_SHAPE),
    "group_instance_norm": (GroupInstanceNet, CNN_SHAPE),
    "layernorm_channels_first": (ChannelsFirstLayerNormNet, CNN_SHAPE),
}


def build_torch(name: str, seed: int = 0) -> nn.Module:
    """Seeded eval-mode torch model ``name``: random weights, non-trivial BatchNorm statistics (calibrated,
    then perturbed, see models.zoo.randomize), BatchNorm eps 1e-5 (lrpc's folding is exact for any eps)."""
    make, shape = TORCH_BUILDERS[name]
    torch.manual_seed(seed)
    model = randomize(make(), shape, seed=seed + 1, calibrate_batches=2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    return model.float().eval()


def export(model: nn.Module, path, input_shape, opset: int = OPSET, constant_folding: bool = True,
           dynamo: bool = False, output: str = "logits") -> Path:
    """Export with input ``input`` and output ``output``, batch dim dynamic: TorchScript (``dynamo=False``) or the
    torch.export-based exporter (``dynamo=True``; ``opset=None``: its default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(tuple(input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # (its progress lines)
                prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                         output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},))
            prog.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=constant_folding, input_names=["input"], output_names=[output],
                              dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}})
    return path


def torch_arch(name: str, tmp_dir, seed: int = 0, opset: int | None = OPSET, constant_folding: bool = True,
               dynamo: bool = False) -> Arch:
    """Build, export and wrap torch family ``name`` (see :data:`TORCH_BUILDERS`). The twin holds the standard
    deviation of normalization layers constant (:func:`sigma_detached`)."""
    model = build_torch(name, seed)
    shape = TORCH_BUILDERS[name][1]
    tag = (f"{name}-" + ("dynamo" if dynamo else "") + (f"op{opset}" if opset else "")
           + ("" if constant_folding else "-nofold"))
    path = export(model, Path(tmp_dir) / f"{tag}.onnx", shape, opset, constant_folding, dynamo,
                  getattr(model, "output", "logits"))
    twin = sigma_detached(model)
    if hasattr(model, "logits"):  # a model ending in a softmax: its twin gives the logits
        return Arch(tag, str(path), example_input(shape), twin.logits, squash="softmax", squash_axis=model.squash_axis)
    return Arch(tag, str(path), example_input(shape), twin)


# --------------------------------------------------------------------------------------------- hand-built ONNX

class _G:
    """A tiny onnx.helper graph builder: seeded random weights kept as numpy arrays (shared with the twin)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, value, hint="w") -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.array(value), n))  # (ascontiguousarray would make 0-d 1-d)
        return n

    def weight(self, *shape, scale=None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (self.rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)

    def bias(self, n) -> np.ndarray:
        return (0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def node(self, op, inputs, outputs=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, inputs, outputs, opset=OPSET, ir=None, name="g") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lrpc-archs")
        m.ir_version = ir or {9: 4, 11: 6, 17: 8, 18: 8, 21: 10}.get(opset, 8)
        onnx.checker.check_model(m, full_check=True)
        return m

    def conv(self, x, cin, cout, k=3, pads=None, stride=1, bias=True, group=1):
        w = self.weight(cout, cin // group, k, k)
        b = self.bias(cout) if bias else None
        pads = [k // 2] * 4 if pads is None else pads
        ins = [x, self.init(w)] + ([self.init(b, "b")] if bias else [])
        y = self.node("Conv", ins, kernel_shape=[k, k], pads=pads, strides=[stride, stride], group=group)
        return y, w, b  # output name, and the weights for the twin


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _t(a):
    return torch.from_numpy(np.asarray(a))


def _tconv(x, w, b=None, pads=None, stride=1, group=1):
    """Torch Conv with ONNX pads [top, left, bottom, right]."""
    k = w.shape[-1]
    pads = [k // 2] * 4 if pads is None else pads
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return F.conv2d(x, _t(w), None if b is None else _t(b), stride=stride, groups=group)


def _head(g, t, c, n_out=10):
    """GlobalAveragePool -> Flatten -> Gemm(transB=1), with its twin."""
    wf, bf = g.weight(n_out, c), g.bias(n_out)
    y = g.node("Gemm", [g.node("Flatten", [g.node("GlobalAveragePool", [t])], axis=1), g.init(wf), g.init(bf, "b")],
               outputs=["logits"], transB=1)

    def twin(h):
        return h.mean((2, 3)) @ _t(wf).T + _t(bf)

    return y, twin


N = "batch"  # symbolic batch dim of the hand-built graphs
X8 = [N, 3, 8, 8]


def mlp_matmul(seed=10) -> Arch:
    """CNTK/tf2onnx-style MLP: MatMul(x, W[in, out]) + Add(b) with ReLUs (lrpc turns rank-2 MatMul+Add into Gemm)."""
    g = _G(seed)
    sizes = [16, 32, 24, 10]
    ws = [g.weight(a, b, scale=np.sqrt(2.0 / a)) for a, b in zip(sizes, sizes[1:])]
    bs = [g.bias(b) for b in sizes[1:]]
    t = "input"
    for i, (w, b) in enumerate(zip(ws, bs)):
        t = g.node("Add", [g.node("MatMul", [t, g.init(w)]), g.init(b, "b")], outputs=["logits"] if i == 2 else 1)
        if i < 2:
            t = g.node("Relu", [t])

    def twin(x):
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = x @ _t(w) + _t(b)
            x = F.relu(x) if i < 2 else x
        return x

    m = g.model([_vi("input", [N, 16])], [_vi("logits", [N, 10])])
    return Arch("mlp_matmul_add", m, example_input((2, 16)), twin)


def sum3(seed=11) -> Arch:
    """Residual merge as one ``Sum`` with three inputs (Caffe2 / old model zoo exports)."""
    g = _G(seed)
    c0, w0, b0 = g.conv("input", 3, 6)
    c0 = g.node("Relu", [c0])
    a, wa, ba = g.conv(c0, 6, 6)
    b, wb, bb = g.conv(c0, 6, 6, k=1)
    s = g.node("Sum", [c0, g.node("Relu", [a]), g.node("Relu", [b])])
    y, head = _head(g, g.node("Relu", [s]), 6)

    def twin(x):
        h = F.relu(_tconv(x, w0, b0))
        h = F.relu(h + F.relu(_tconv(h, wa, ba)) + F.relu(_tconv(h, wb, bb)))
        return head(h)

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("sum3_residual", m, example_input((2, 3, 8, 8)), twin)


def conv_bias_add(seed=12) -> Arch:
    """Conv without bias followed by ``Add`` of a [C,1,1] (and a [1,C,1,1]) constant."""
    g = _G(seed)
    c1, w1, _ = g.conv("input", 3, 6, bias=False)
    b1 = g.bias(6)
    t = g.node("Relu", [g.node("Add", [c1, g.init(b1.reshape(6, 1, 1), "b")])])
    c2, w2, _ = g.conv(t, 6, 8, bias=False)
    b2 = g.bias(8)
    t = g.node("Relu", [g.node("Add", [g.init(b2.reshape(1, 8, 1, 1), "b"), c2])])  # constant first
    y, head = _head(g, t, 8)

    def twin(x):
        h = F.relu(_tconv(x, w1) + _t(b1).reshape(6, 1, 1))
        return head(F.relu(_tconv(h, w2) + _t(b2).reshape(1, 8, 1, 1)))

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("conv_bias_add", m, example_input((2, 3, 8, 8)), twin)


def caffe2_scale(seed=13) -> Arch:
    """Caffe2-style affine channel: Conv -> Mul(Unsqueeze(s[C], [1,2])) -> Add(Unsqueeze(t[C], [1,2])) -> Relu."""
    g = _G(seed)
    axes = g.init(np.array([1, 2], np.int64), "axes")
    c1, w1, _ = g.conv("input", 3, 6, bias=False)
    s1, t1 = (0.5 + g.rng.random(6)).astype(np.float32), g.bias(6)
    t = g.node("Mul", [c1, g.node("Unsqueeze", [g.init(s1, "scale"), axes])])
    t = g.node("Relu", [g.node("Add", [t, g.node("Unsqueeze", [g.init(t1, "shift"), axes])])])
    c2, w2, b2 = g.conv(t, 6, 8)
    y, head = _head(g, g.node("Relu", [c2]), 8)

    def twin(x):
        h = F.relu(_tconv(x, w1) * _t(s1).reshape(6, 1, 1) + _t(t1).reshape(6, 1, 1))
        return head(F.relu(_tconv(h, w2, b2)))

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("caffe2_scale", m, example_input((2, 3, 8, 8)), twin)


def const_subgraph_weights(seed=14) -> Arch:
    """Weights produced by constant subgraphs: Reshape of a flat initializer (Conv W), Cast of a float16
    initializer (Gemm W), a ``Constant`` node (Conv bias), Transpose of an initializer (second Gemm W)."""
    g = _G(seed)
    w1 = g.weight(6, 3, 3, 3)
    b1 = g.bias(6)
    wr = g.node("Reshape", [g.init(w1.reshape(-1), "wflat"), g.init(np.array([6, 3, 3, 3], np.int64), "shape")])
    bc = g.node("Constant", [], value=numpy_helper.from_array(b1, "bconst"))
    t = g.node("Relu", [g.node("Conv", ["input", wr, bc], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    t = g.node("Flatten", [g.node("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
    w2 = g.weight(16, 6 * 16).astype(np.float16)
    b2 = g.bias(16)
    w2f = g.node("Cast", [g.init(w2, "w16")], to=TensorProto.FLOAT)
    t = g.node("Relu", [g.node("Gemm", [t, w2f, g.init(b2, "b")], transB=1)])
    w3, b3 = g.weight(10, 16), g.bias(10)  # stored as [in, out] and transposed in-graph
    g.node("Gemm", [t, g.node("Transpose", [g.init(w3.T.copy(), "wT")], perm=[1, 0]), g.init(b3, "b")],
           outputs=["logits"], transB=1)

    def twin(x):
        h = F.max_pool2d(F.relu(_tconv(x, w1, b1)), 2).flatten(1)
        h = F.relu(h @ _t(w2.astype(np.float32)).T + _t(b2))
        return h @ _t(w3).T + _t(b3)

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("const_subgraph_weights", m, example_input((2, 3, 8, 8)), twin)


def flatten_form(mode: str, seed=15) -> Arch:
    """Conv-Relu-MaxPool then ``Flatten`` (mode "flatten") or ``Reshape`` with shape [0, -1] ("reshape0") or
    [-1, C*H*W] ("reshape_neg1") before the Gemm head."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 4)
    t = g.node("MaxPool", [g.node("Relu", [c1])], kernel_shape=[2, 2], strides=[2, 2])
    shape = {"reshape0": [0, -1], "reshape_neg1": [-1, 64]}
    t = (g.node("Flatten", [t], axis=1) if mode == "flatten"
         else g.node("Reshape", [t, g.init(np.array(shape[mode], np.int64), "shape")]))
    w2, b2 = g.weight(10, 64), g.bias(10)
    g.node("Gemm", [t, g.init(w2), g.init(b2, "b")], outputs=["logits"], transB=1)

    def twin(x):
        return F.max_pool2d(F.relu(_tconv(x, w1, b1)), 2).flatten(1) @ _t(w2).T + _t(b2)

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch(f"{mode}_head", m, example_input((2, 3, 8, 8)), twin)


def reshape_to_shape_of(seed=23) -> Arch:
    """``Reshape(y, Shape(x))`` (torch ``y.view_as(x)``, Keras/tf2onnx reshapes): with a dynamic batch the target
    shape is computed from a tensor on the relevance path (Flatten then back to the conv map here)."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    t = g.node("Relu", [c1])
    flat = g.node("Flatten", [t], axis=1)
    back = g.node("Reshape", [flat, g.node("Shape", [t])])
    y, head = _head(g, back, 6)

    def twin(x):
        return head(F.relu(_tconv(x, w1, b1)))

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("reshape_to_shape_of", m, example_input((2, 3, 8, 8)), twin)


def nhwc_input(seed=16) -> Arch:
    """tf2onnx layout: NHWC input, a leading Transpose to NCHW, convs, Transpose back to NHWC, ReduceMean over
    H, W (Keras GlobalAveragePooling2D), MatMul + Add head."""
    g = _G(seed)
    t = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    c1, w1, b1 = g.conv(t, 3, 6, k=3, pads=[0, 0, 1, 1], stride=2)  # TF "SAME" with stride 2: pads at the end
    c2, w2, b2 = g.conv(g.node("Relu", [c1]), 6, 8, k=3)
    t = g.node("Transpose", [g.node("Relu", [c2])], perm=[0, 2, 3, 1])
    t = g.node("ReduceMean", [t, g.init(np.array([1, 2], np.int64), "axes")], keepdims=0)
    w3, b3 = g.weight(8, 10, scale=np.sqrt(1 / 8)), g.bias(10)
    g.node("Add", [g.node("MatMul", [t, g.init(w3)]), g.init(b3, "b")], outputs=["logits"])

    def twin(x):
        h = x.permute(0, 3, 1, 2)
        h = F.relu(_tconv(h, w1, b1, pads=[0, 0, 1, 1], stride=2))
        h = F.relu(_tconv(h, w2, b2))
        return h.mean((2, 3)) @ _t(w3) + _t(b3)

    m = g.model([_vi("input", [N, 8, 8, 3])], [_vi("logits", [N, 10])], opset=18)  # ReduceMean axes as an input
    return Arch("nhwc_transpose", m, example_input((2, 8, 8, 3)), twin)


def pad_node_conv(seed=17) -> Arch:
    """``Pad`` as a separate node before a Conv without pads, twice: asymmetric (TF "SAME": 3x3 stride 2 on 8x8
    pads 1 cell at the end) before the first Conv, then [1, 2] / [1, 0] with an explicit pad value."""
    g = _G(seed)
    p1 = [0, 0, 0, 0, 0, 0, 1, 1]  # [N, C, H, W] begins then ends
    t = g.node("Pad", ["input", g.init(np.array(p1, np.int64), "pads")], mode="constant")
    c1, w1, b1 = g.conv(t, 3, 6, pads=[0, 0, 0, 0], stride=2)
    p2 = [0, 0, 1, 2, 0, 0, 1, 0]
    zero = g.init(np.array(0, np.float32), "value")
    t = g.node("Pad", [g.node("Relu", [c1]), g.init(np.array(p2, np.int64), "pads"), zero])
    c2, w2, b2 = g.conv(t, 6, 8, pads=[0, 0, 0, 0])
    y, head = _head(g, g.node("Relu", [c2]), 8)

    def twin(x):
        h = F.relu(_tconv(F.pad(x, (0, 1, 0, 1)), w1, b1, pads=[0, 0, 0, 0], stride=2))
        return head(F.relu(_tconv(F.pad(h, (2, 0, 1, 1)), w2, b2, pads=[0, 0, 0, 0])))

    m = g.model([_vi("input", [N, 3, 8, 8])], [_vi("logits", [N, 10])])
    return Arch("pad_node_conv", m, example_input((2, 3, 8, 8)), twin)


def pad_channels_shortcut(seed=24) -> Arch:
    """A residual shortcut that widens by zero channels: MaxPool 2 then ``Pad`` of the channel axis (ResNet option A
    with a pool), added to a stride-2 conv branch; the Pad cannot fold into a Conv."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 4)
    h = g.node("Relu", [c1])
    short = g.node("Pad", [g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]),
                           g.init(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64), "pads")])
    c2, w2, b2 = g.conv(h, 4, 8, stride=2)
    y, head = _head(g, g.node("Relu", [g.node("Sum", [c2, short])]), 8)

    def twin(x):
        h = F.relu(_tconv(x, w1, b1))
        return head(F.relu(_tconv(h, w2, b2, stride=2) + F.pad(F.max_pool2d(h, 2), (0, 0, 0, 0, 2, 2))))

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("pad_channels_shortcut", m, example_input((2, 3, 8, 8)), twin)


def slice_axes_descending(seed=25) -> Arch:
    """A strided Slice whose axes are listed high to low (``axes=[3, 2]``, a step of 2 on the second): valid ONNX,
    ``h[:, :, 0:8:2, 1:7]``."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 4)
    h = g.node("Relu", [c1])
    t = g.node("Slice", [h] + [g.init(np.array(v, np.int64), n) for v, n in
                               (([1, 0], "starts"), ([7, 8], "ends"), ([3, 2], "axes"), ([1, 2], "steps"))])
    c2, w2, b2 = g.conv(t, 4, 8)
    y, head = _head(g, g.node("Relu", [c2]), 8)

    def twin(x):
        h = F.relu(_tconv(x, w1, b1))
        return head(F.relu(_tconv(h[:, :, 0:8:2, 1:7], w2, b2)))

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])])
    return Arch("slice_axes_descending", m, example_input((2, 3, 8, 8)), twin)


def maxpool_ceil(seed=18) -> Arch:
    """MaxPool with pads and ceil_mode: 3/2 pad 1 on 8x8 (ceil adds a 5th window) and 2/2 pad 1 on 5x5 (ceil's
    4th window would start in the end padding: onnxruntime and torch drop it, ONNX shape inference before
    opset 22 keeps it)."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    t = g.node("MaxPool", [g.node("Relu", [c1])], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    c2, w2, b2 = g.conv(t, 6, 8)
    t = g.node("MaxPool", [g.node("Relu", [c2])], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    y, head = _head(g, t, 8)  # a global pool: a Flatten -> Gemm of the 3x3 map would not even load in onnxruntime

    def twin(x):
        h = F.max_pool2d(F.relu(_tconv(x, w1, b1)), 3, 2, 1, ceil_mode=True)
        return head(F.max_pool2d(F.relu(_tconv(h, w2, b2)), 2, 2, 1, ceil_mode=True))

    m = g.model([_vi("input", [N, 3, 8, 8])], [_vi("logits", [N, 10])])
    return Arch("maxpool_pads_ceil", m, example_input((2, 3, 8, 8)), twin)


def two_outputs(explain: str = "aux", seed=19) -> Arch:
    """A trunk with two heads: ``probs`` (Softmax of a Gemm, first output) and ``aux`` (a Gemm, second)."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    t = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [c1])])])
    wa, ba, wb, bb = g.weight(10, 6), g.bias(10), g.weight(4, 6), g.bias(4)
    g.node("Softmax", [g.node("Gemm", [t, g.init(wa), g.init(ba, "b")], transB=1)], outputs=["probs"], axis=1)
    g.node("Gemm", [t, g.init(wb), g.init(bb, "b")], outputs=["aux"], transB=1)

    def twin(x):
        h = F.relu(_tconv(x, w1, b1)).mean((2, 3))
        return h @ _t(wb).T + _t(bb) if explain == "aux" else h @ _t(wa).T + _t(ba)

    m = g.model([_vi("input", X8)], [_vi("probs", [N, 10]), _vi("aux", [N, 4])])
    squash = None if explain == "aux" else "softmax"
    return Arch(f"two_outputs-{explain}", m, example_input((2, 3, 8, 8)), twin, output=explain, squash=squash)


def opset9(seed=20, weights_as_inputs: bool = False) -> Arch:
    """Model-zoo era graph, opset 9 / IR 4: Conv, BatchNormalization, Relu, MaxPool, Flatten, Gemm, Dropout
    (ratio attribute), Gemm, Softmax. ``weights_as_inputs``: IR 3, every initializer also listed as a graph input
    (as IR < 4 required and old exporters wrote)."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    gam, bet = (0.5 + g.rng.random(6)).astype(np.float32), g.bias(6)
    mean, var = g.bias(6), (0.5 + g.rng.random(6)).astype(np.float32)
    bn = g.node("BatchNormalization", [c1] + [g.init(v, "bn") for v in (gam, bet, mean, var)], epsilon=1e-3)
    t = g.node("MaxPool", [g.node("Relu", [bn])], kernel_shape=[2, 2], strides=[2, 2])
    w2, b2 = g.weight(16, 6 * 16), g.bias(16)
    t = g.node("Relu", [g.node("Gemm", [g.node("Flatten", [t]), g.init(w2), g.init(b2, "b")], transB=1)])
    t = g.node("Dropout", [t], ratio=0.5)
    w3, b3 = g.weight(16, 10), g.bias(10)  # transB=0: W stored [in, out]
    g.node("Softmax", [g.node("Gemm", [t, g.init(w3), g.init(b3, "b")])], outputs=["prob"], axis=1)

    def twin(x):
        h = _tconv(x, w1, b1)
        h = (h - _t(mean).reshape(6, 1, 1)) / torch.sqrt(_t(var).reshape(6, 1, 1) + 1e-3) * _t(gam).reshape(6, 1, 1) \
            + _t(bet).reshape(6, 1, 1)
        h = F.max_pool2d(F.relu(h), 2).flatten(1)
        h = F.relu(h @ _t(w2).T + _t(b2))
        return h @ _t(w3) + _t(b3)

    weights = [_vi(t.name, list(t.dims), t.data_type) for t in g.inits] if weights_as_inputs else []
    m = g.model([_vi("input", X8)] + weights, [_vi("prob", [N, 10])], opset=9, ir=3 if weights_as_inputs else 4)
    name = "opset9_ir3_weights_as_inputs" if weights_as_inputs else "opset9_ir4"
    return Arch(name, m, example_input((2, 3, 8, 8)), twin, squash="softmax")


def caffe2_spatialbn(seed=26, opset=9) -> Arch:
    """Caffe2 model-zoo BatchNorm (Caffe's BatchNorm + Scale layers): Conv (no bias) -> BatchNormalization (scale 1,
    bias 0: statistics only) -> Mul(s[C,1,1]) -> Add(t[C,1,1]) -> Relu; three such layers with a MaxPool and a
    residual ``Sum``, GlobalAveragePool, Flatten, Gemm, Softmax. Opset 9 (or 7, BatchNormalization with
    ``spatial=1``, IR 3 with the weights listed as graph inputs), upgraded by lrpc."""
    g = _G(seed)
    layers = []

    def conv_bn_scale(x, cin, cout):
        y, w, _ = g.conv(x, cin, cout, bias=False)
        mean, var = g.bias(cout), (0.5 + g.rng.random(cout)).astype(np.float32)
        stats = [np.ones(cout, np.float32), np.zeros(cout, np.float32), mean, var]
        bn_attrs = {"spatial": 1} if opset < 9 else {}
        y = g.node("BatchNormalization", [y] + [g.init(v, "bn") for v in stats], epsilon=1e-5, **bn_attrs)
        s, t = (0.5 + g.rng.random(cout)).astype(np.float32), (0.3 * g.rng.standard_normal(cout)).astype(np.float32)
        y = g.node("Add", [g.node("Mul", [y, g.init(s.reshape(-1, 1, 1), "scale")]),
                           g.init(t.reshape(-1, 1, 1), "shift")])
        layers.append((w, mean, var, s, t))
        return y

    t = g.node("MaxPool", [g.node("Relu", [conv_bn_scale("input", 3, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Relu", [conv_bn_scale(t, 8, 8)])
    t = g.node("Relu", [g.node("Sum", [conv_bn_scale(h, 8, 8), t])])
    wf, bf = g.weight(10, 8), g.bias(10)
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [t])], axis=1)
    g.node("Softmax", [g.node("Gemm", [flat, g.init(wf), g.init(bf, "b")], transB=1)], outputs=["prob"], axis=1)

    def layer(x, i):
        w, mean, var, s, t = (_t(v) for v in layers[i])
        h = (_tconv(x, w.numpy()) - mean.reshape(-1, 1, 1)) / torch.sqrt(var.reshape(-1, 1, 1) + 1e-5)
        return h * s.reshape(-1, 1, 1) + t.reshape(-1, 1, 1)

    def twin(x):
        h = F.max_pool2d(F.relu(layer(x, 0)), 2)
        h = F.relu(layer(F.relu(layer(h, 1)), 2) + h)
        return h.mean((2, 3)) @ _t(wf).T + _t(bf)

    old = opset < 9  # IR 3, as Caffe2's exporter wrote opset 7: every initializer also listed as a graph input
    weights = [_vi(t.name, list(t.dims), t.data_type) for t in g.inits] if old else []
    m = g.model([_vi("input", X8)] + weights, [_vi("prob", [N, 10])], opset=opset, ir=3 if old else 4)
    return Arch(f"caffe2_spatialbn-op{opset}", m, example_input((2, 3, 8, 8)), twin, squash="softmax")


def softmax_axis1_opset9(seed=27) -> Arch:
    """Opset 9 head ``GlobalAveragePool -> Softmax(axis=1)`` on [N, C, 1, 1] (old Softmax flattens every axis from
    ``axis`` on): onnx's version converter writes it as ``Flatten -> Softmax(axis=-1) -> Reshape(Shape)``."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    t = g.node("MaxPool", [g.node("Relu", [c1])], kernel_shape=[2, 2], strides=[2, 2])
    c2, w2, b2 = g.conv(t, 6, 10, k=1, pads=[0, 0, 0, 0])
    g.node("Softmax", [g.node("GlobalAveragePool", [g.node("Relu", [c2])])], outputs=["prob"], axis=1)

    def twin(x):
        h = F.max_pool2d(F.relu(_tconv(x, w1, b1)), 2)
        return F.relu(_tconv(h, w2, b2, pads=[0, 0, 0, 0])).mean((2, 3), keepdim=True)

    m = g.model([_vi("input", X8)], [_vi("prob", [N, 10, 1, 1])], opset=9)
    return Arch("softmax_axis1_opset9", m, example_input((2, 3, 8, 8)), twin, squash="softmax")


def opset11(seed=21) -> Arch:
    """Opset 11 forms: Clip with min as an input (ReLU), Pad with pads as an input, ReduceMean with an axes
    attribute (global pool, keepdims), Squeeze with an axes attribute, Gemm."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6, pads=[0, 0, 0, 0])
    t = g.node("Clip", [c1, g.init(np.array([0.0], np.float32), "min")])  # 1-element min: as some converters write it
    t = g.node("Pad", [t, g.init(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    c2, w2, b2 = g.conv(t, 6, 8, pads=[0, 0, 0, 0])
    t = g.node("ReduceMean", [g.node("Relu", [c2])], axes=[2, 3], keepdims=1)
    t = g.node("Squeeze", [t], axes=[2, 3])
    wf, bf = g.weight(10, 8), g.bias(10)
    g.node("Gemm", [t, g.init(wf), g.init(bf, "b")], outputs=["logits"], transB=1)

    def twin(x):
        h = F.relu(_tconv(x, w1, b1, pads=[0, 0, 0, 0]))
        h = F.relu(_tconv(F.pad(h, (1, 1, 1, 1)), w2, b2, pads=[0, 0, 0, 0]))
        return h.mean((2, 3)) @ _t(wf).T + _t(bf)

    m = g.model([_vi("input", X8)], [_vi("logits", [N, 10])], opset=11)
    return Arch("opset11", m, example_input((2, 3, 8, 8)), twin)


def opset21(seed=22) -> Arch:
    """Opset 21 / IR 10: Conv, Relu, MaxPool, AveragePool, Reshape [0, -1], Gemm, Softmax."""
    g = _G(seed)
    c1, w1, b1 = g.conv("input", 3, 6)
    t = g.node("MaxPool", [g.node("Relu", [c1])], kernel_shape=[2, 2], strides=[2, 2])
    c2, w2, b2 = g.conv(t, 6, 8)
    t = g.node("AveragePool", [g.node("Relu", [c2])], kernel_shape=[2, 2], strides=[2, 2])
    t = g.node("Reshape", [t, g.init(np.array([0, -1], np.int64), "shape")])
    wf, bf = g.weight(10, 32), g.bias(10)
    g.node("Softmax", [g.node("Gemm", [t, g.init(wf), g.init(bf, "b")], transB=1)], outputs=["prob"], axis=-1)

    def twin(x):
        h = F.max_pool2d(F.relu(_tconv(x, w1, b1)), 2)
        h = F.avg_pool2d(F.relu(_tconv(h, w2, b2)), 2).flatten(1)
        return h @ _t(wf).T + _t(bf)

    m = g.model([_vi("input", X8)], [_vi("prob", [N, 10])], opset=21)
    return Arch("opset21_ir10", m, example_input((2, 3, 8, 8)), twin, squash="softmax")


ONNX_BUILDERS: dict[str, Callable[[], Arch]] = {
    "mlp_matmul_add": mlp_matmul,
    "sum3_residual": sum3,
    "conv_bias_add": conv_bias_add,
    "caffe2_scale": caffe2_scale,
    "caffe2_spatialbn-op9": caffe2_spatialbn,
    "caffe2_spatialbn-op7": lambda: caffe2_spatialbn(opset=7),
    "const_subgraph_weights": const_subgraph_weights,
    "flatten_head": lambda: flatten_form("flatten"),
    "reshape0_head": lambda: flatten_form("reshape0"),
    "reshape_neg1_head": lambda: flatten_form("reshape_neg1"),
    "reshape_to_shape_of": reshape_to_shape_of,
    "nhwc_transpose": nhwc_input,
    "pad_node_conv": pad_node_conv,
    "pad_channels_shortcut": pad_channels_shortcut,
    "slice_axes_descending": slice_axes_descending,
    "maxpool_pads_ceil": maxpool_ceil,
    "two_outputs-aux": lambda: two_outputs("aux"),
    "two_outputs-probs": lambda: two_outputs("probs"),
    "opset9_ir4": opset9,
    "opset9_ir3_weights_as_inputs": lambda: opset9(weights_as_inputs=True),
    "softmax_axis1_opset9": softmax_axis1_opset9,
    "opset11": opset11,
    "opset21_ir10": opset21,
}

"""The zoo: real architectures nobody here wrote (torchvision classification and segmentation constructors, timm
models), with healthy random weights (:mod:`models.healthy`), small inputs, exported with both torch exporters.

``FAMILIES``: name -> :class:`Family` (constructor, input shape, what the family brings to the graph).
``build(name)`` -> (eval-mode healthy model, its test input); ``export(model, path, shape, exporter)`` writes
the ONNX file ("legacy": TorchScript exporter at opset 17 with constant folding; "dynamo": torch.export-based,
its default opset). Smallest variant of each family; where only the class takes smaller widths/depths
(the transformers), the family's own class is built with a reduced configuration (named in ``what``).
Inputs: 64x64 (the minimum some families accept is larger: AlexNet/VGG's fixed classifiers read a 6x6 / 7x7 map
at 224x224, Inception-v3 takes 75x75), batch 1, seeded N(0, 1).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.healthy import make_healthy

EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 17
NUM_CLASSES = 10


@dataclass(frozen=True)
class Family:
    """A constructor and its test input. ``what``: the graph patterns the family brings. ``dense``: the output is
    a [N, C, H, W] map (segmentation)."""

    source: str
    make: Callable[[], nn.Module]
    what: str
    shape: tuple = (1, 3, 64, 64)
    dense: bool = False
    tags: tuple = field(default=())


class _SegOut(nn.Module):
    """torchvision segmentation models return a dict; the explained output is its "out" map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kw)

    return make


def _seg(name: str) -> Callable[[], nn.Module]:
    def make():
        from torchvision.models import segmentation

        return _SegOut(getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=4))

    return make


def _timm(name: str) -> Callable[[], nn.Module]:
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)

    return make


def _convnext_small_config() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    cfg = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 2), CNBlockConfig(128, None, 1)]
    return ConvNeXt(cfg, num_classes=NUM_CLASSES)


def _swin_small_config() -> nn.Module:
    from torchvision.models import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                           window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


def _maxvit_small_config() -> nn.Module:
    from torchvision.models import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32, 64, 128],
                  block_layers=[1, 1, 1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


def _vit_small_config() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=NUM_CLASSES)


FAMILIES: dict[str, Family] = {
    # ------------------------------------------------------------------ torchvision classification
    "alexnet": Family("torchvision", _tv("alexnet"), "plain ReLU CNN, MaxPool 3x3/2, Dropout, Linear head",
                      (1, 3, 224, 224)),
    "vgg11": Family("torchvision", _tv("vgg11"), "plain ReLU CNN, MaxPool 2x2, big Linear head", (1, 3, 224, 224)),
    "vgg11_bn": Family("torchvision", _tv("vgg11_bn"), "VGG with BatchNorm after every Conv", (1, 3, 224, 224)),
    "resnet18": Family("torchvision", _tv("resnet18"), "basic residual blocks, 1x1/2 projection shortcuts"),
    "resnext50_32x4d": Family("torchvision", _tv("resnext50_32x4d"), "bottlenecks with grouped 3x3 convs (32 groups)"),
    "densenet121": Family("torchvision", _tv("densenet121"),
                          "dense Concat, pre-activation BN-ReLU-Conv (BatchNorm after Concat/pool: not foldable)"),
    "googlenet": Family("torchvision", _tv("googlenet", aux_logits=False, init_weights=True),
                        "Inception branches, Concat, MaxPool ceil_mode"),
    "inception_v3": Family("torchvision", _tv("inception_v3", aux_logits=False, init_weights=True),
                           "Inception-v3 factorized 1x7/7x1 convs, AvgPool with pads, Concat", (1, 3, 75, 75)),
    "squeezenet1_0": Family("torchvision", _tv("squeezenet1_0"), "Fire modules (Concat), conv head, ceil MaxPool"),
    "squeezenet1_1": Family("torchvision", _tv("squeezenet1_1"), "SqueezeNet 1.1 (3x3 stem, earlier pools)"),
    "mobilenet_v2": Family("torchvision", _tv("mobilenet_v2"), "inverted residuals, depthwise, ReLU6 (Clip)"),
    "mobilenet_v3_small": Family("torchvision", _tv("mobilenet_v3_small"),
                                 "HardSwish, squeeze-and-excitation with HardSigmoid gates, depthwise"),
    "mnasnet0_5": Family("torchvision", _tv("mnasnet0_5"), "depthwise inverted residuals with ReLU, no gates"),
    "shufflenet_v2_x0_5": Family("torchvision", _tv("shufflenet_v2_x0_5"),
                                 "channel split (chunk) and shuffle (Reshape/Transpose), depthwise"),
    "efficientnet_b0": Family("torchvision", _tv("efficientnet_b0"), "SiLU, squeeze-and-excitation Sigmoid gates"),
    "efficientnet_v2_s": Family("torchvision", _tv("efficientnet_v2_s"), "fused MBConv (full 3x3) + MBConv with SE"),
    "regnet_x_400mf": Family("torchvision", _tv("regnet_x_400mf"), "grouped bottlenecks, ReLU, no gates"),
    "regnet_y_400mf": Family("torchvision", _tv("regnet_y_400mf"), "grouped bottlenecks with SE Sigmoid gates"),
    "convnext": Family("torchvision", _convnext_small_config,
                       "ConvNeXt class (widths 16-128, 1-2 blocks/stage): depthwise 7x7, LayerNorm (channels-last "
                       "Permute), GELU, layer scale"),
    "swin": Family("torchvision", _swin_small_config,
                   "SwinTransformer class (embed 16, depths 1-1-2-1, window 4): window attention, shifted windows "
                   "(Roll + mask), patch merging, LayerNorm, GELU"),
    "maxvit": Family("torchvision", _maxvit_small_config,
                     "MaxVit class (64x64, channels 16-128, 1 block/stage, partition 2): MBConv + SE, block/grid "
                     "attention, relative position bias, LayerNorm, GELU"),
    "vit": Family("torchvision", _vit_small_config,
                  "VisionTransformer class (64x64, patch 16, 2 layers, width 32): class token, attention, LayerNorm, "
                  "GELU"),
    # ------------------------------------------------------------------ torchvision segmentation
    "fcn_resnet50": Family("torchvision-seg", _seg("fcn_resnet50"),
                           "dilated ResNet-50, Dropout, bilinear upsampling (Resize) to the input size", dense=True),
    "deeplabv3_mobilenet_v3_large": Family("torchvision-seg", _seg("deeplabv3_mobilenet_v3_large"),
                                           "ASPP (dilated branches, global pooling branch upsampled), HardSwish, SE",
                                           dense=True),
    "lraspp_mobilenet_v3_large": Family("torchvision-seg", _seg("lraspp_mobilenet_v3_large"),
                                        "LR-ASPP: Sigmoid attention branch times features, two upsampled heads summed",
                                        dense=True),
    # ------------------------------------------------------------------ timm
    "timm/resnet10t": Family("timm", _timm("resnet10t"), "deep 3-conv stem, average-pool downsampling shortcut"),
    "timm/tf_mobilenetv3_small_minimal_100": Family("timm", _timm("tf_mobilenetv3_small_minimal_100"),
                                                    "TF 'same' padding (Pad nodes), ReLU-only MobileNetV3"),
    "timm/mobilenetv3_small_050": Family("timm", _timm("mobilenetv3_small_050"), "timm MobileNetV3: HardSwish, SE"),
    "timm/ghostnet_050": Family("timm", _timm("ghostnet_050"),
                                "Ghost modules (cheap depthwise features Concat + Slice), SE with hard sigmoid"),
    "timm/repvgg_a0": Family("timm", _timm("repvgg_a0"),
                             "RepVGG train-time blocks: 3x3 + 1x1 + identity-BatchNorm branches summed"),
    "timm/regnety_002": Family("timm", _timm("regnety_002"), "timm RegNetY: grouped convs, SE Sigmoid gates"),
    "timm/dla46_c": Family("timm", _timm("dla46_c"), "DLA tree aggregation (Concat roots), MaxPool downsampling"),
    "timm/dpn48b": Family("timm", _timm("dpn48b"),
                          "dual path: residual Add on a channel slice + dense Concat, pre-activation BN"),
    "timm/hrnet_w18_small": Family("timm", _timm("hrnet_w18_small"),
                                   "parallel resolutions, nearest Upsample + Sum fusion, incre/downsample head"),
    "timm/cs3darknet_focus_s": Family("timm", _timm("cs3darknet_focus_s"),
                                      "focus stem (space-to-depth strided Slices + Concat), CSP split, SiLU"),
    "timm/darknet17": Family("timm", _timm("darknet17"), "LeakyReLU darknet residual stages"),
    "timm/rexnet_100": Family("timm", _timm("rexnet_100"),
                              "partial residual (Add on a channel Slice + Concat), SiLU, ReLU6, SE"),
    "timm/mixnet_s": Family("timm", _timm("mixnet_s"), "mixed depthwise kernels (Split + Concat), SiLU, SE"),
    "timm/res2net50_14w_8s": Family("timm", _timm("res2net50_14w_8s"),
                                    "Res2Net hierarchical splits (Split, Add chain, Concat), AvgPool branch"),
    "timm/selecsls42b": Family("timm", _timm("selecsls42b"), "SelecSLS: Concat of selected block outputs, ReLU"),
    "timm/spnasnet_100": Family("timm", _timm("spnasnet_100"), "ReLU-only NAS mobile net, no gates"),
    "timm/resnetv2_18": Family("timm", _timm("resnetv2_18"), "pre-activation ResNet (BatchNorm before Conv)"),
    "timm/hgnetv2_b0": Family("timm", _timm("hgnetv2_b0"),
                              "HGNetV2: learnable affine (scalar Mul/Add) after ReLU, ESE gates, Concat"),
    "timm/eca_nfnet_l0": Family("timm", _timm("eca_nfnet_l0"),
                                "normalizer-free: weight-standardized convs, scalar gains, ECA (Conv1d) gates, SiLU"),
    "timm/resnest14d": Family("timm", _timm("resnest14d"), "split attention (radix Softmax gates)"),
    "timm/convnext_atto": Family("timm", _timm("convnext_atto"), "timm ConvNeXt: LayerNorm2d, GELU, layer scale"),
    "timm/mobilevit_xxs": Family("timm", _timm("mobilevit_xxs"),
                                 "MobileViT: unfold to patches, transformer blocks (LayerNorm, attention), SiLU"),
    "timm/convnextv2_atto": Family("timm", _timm("convnextv2_atto"),
                                   "ConvNeXt V2: global response normalization (ReduceL2, mean, x * N(x)), LayerNorm"),
    "timm/poolformer_s12": Family("timm", _timm("poolformer_s12"),
                                  "PoolFormer: pool(x) - x token mixer (Sub), GroupNorm, GELU MLP, layer scale"),
}


def example_input(shape, seed: int = 1234) -> torch.Tensor:
    """Seeded standard-normal test input."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Family ``name`` with healthy random weights (seeded) and its test input."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fam.make()
    x = example_input(fam.shape)
    return make_healthy(model, x, seed=seed + 1), x


def export(model: nn.Module, path, shape, exporter: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as ONNX (input ``input``, output ``logits``, static shapes) with ``exporter``;
    ``dtype=torch.float64``: export a float64 graph (pass a ``model.double()``)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(tuple(shape), dtype=dtype)
    kw = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kw)
            prog.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=LEGACY_OPSET, **kw)
    return path

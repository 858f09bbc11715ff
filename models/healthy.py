"""Healthy random weights: every Conv/Linear/BatchNorm of a freshly initialised net gets unit-scale outputs on the
test input, so LRP oracles test the rules and not the stabilizer.

Why: many constructors initialise for training, not for a forward pass with random weights. Fresh from the
constructor (eval mode, 64x64 N(0, 1) input, 10 classes) the logits' RMS is 5e-14 for EfficientNet-B0, 2e-10 for
MobileNetV3-small, 1e-7 for MnasNet-0.5, 2e-2 for GoogLeNet (truncated-normal 0.01 init), 0.8 for ResNet-18; an
absolute stabilizer of 1e-6 then absorbs all relevance and every oracle tests epsilon instead of the rule.
ConvNeXt's layer scales (1e-6) leave its blocks identities.

Procedure of :func:`make_healthy` (deterministic: every random number comes from one seeded generator):

1. Dead scales: parameters that multiply a residual branch and start (near) zero — layer scales (``gamma``,
   ``layer_scale``, ``ls*.gamma``) and skip-init gains (``skipinit_gain``) — get U(0.5, 1.5). LayerNorm /
   GroupNorm affine parameters get weight U(0.5, 1.5), bias 0.1·N(0, 1) (not a plain standardization).
2. One eval-mode pass over a calibration batch — the test input followed by ``extra`` test-like inputs (seeded
   N(0, 1) of the same shape) — with forward hooks on every Conv (1-3d, transposed), Linear and BatchNorm
   module. Hooks fire in execution order, and each returns the layer's output recomputed with the new
   parameters, so every later layer is calibrated on exactly what it will see:

   * BatchNorm: running mean / variance := the per-channel mean / variance of its input over the calibration
     batch (what train-mode passes with cumulative averaging measure on the same inputs; doing it inside the
     walk keeps the statistics right after the layers before it were rescaled), then perturbed — variance
     × U(0.5, 2), mean + 0.1·std·N(0, 1) — with affine weight U(0.5, 1.5) (sign flipped on 10% of the
     channels) and bias 0.1·N(0, 1), so no BatchNorm is a plain standardization.
   * Conv / Linear: an all-zero bias (torchvision's VGG/AlexNet heads, dynamo drops all-zero biases, and a
     BN-free net needs non-trivial biases to test the bias share) becomes 0.1·rms(Wx)·N(0, 1) per output
     channel; then weight and bias are divided by the RMS of the output (Wx + b) over the calibration batch, so
     it has unit RMS. Weight-standardized convs (timm's ScaledStdConv2d) ignore the weight's scale: their
     ``gain`` is divided instead. An all-zero weight or gain (ViT's head, NFNet's zero-init last conv of a block)
     is drawn from N(0, 1) / set to 1 first.

   A module called several times is calibrated at its first call.

   Why 16 calibration samples: batch statistics of a few samples make a deep random BatchNorm net chaotic (each
   BatchNorm standardizes the samples' differences; on 1x1 late maps of noise images those differences are
   tiny), so float32 round-off grows layer by layer. Inception-v3 at 75x75: logits of float32 vs float64 torch
   differ by 5.4e-3 (max abs / max abs) calibrated on 4 samples, 1.1e-4 on 16; over the zoo the worst is
   ~1e-4 (median 5e-6) with 16.
3. ``eval()`` (parameters keep ``requires_grad``: frozen, nn.MultiheadAttention takes its fused fast path,
   which the legacy exporter cannot export).

:func:`layer_rms` reports each hooked layer's output RMS on an input (the health check the tests assert).
"""
from __future__ import annotations

import torch
from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.LayerNorm, nn.GroupNorm)
DEAD_SCALE_NAMES = ("gamma", "layer_scale", "skipinit_gain")


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def _channel_view(module: nn.Module, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per output channel) shaped to broadcast against ``out``: Linear's channels are the last
    axis, a Conv's (and BatchNorm's) axis 1."""
    if isinstance(module, nn.Linear):
        return v
    return v.view([1, -1] + [1] * (out.dim() - 2))


def _fix_dead_scales(model: nn.Module, g: torch.Generator) -> None:
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if any(k in leaf for k in DEAD_SCALE_NAMES) and float(p.abs().max()) < 1e-3:
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    for m in model.modules():  # (timm's GlobalResponseNorm starts with weight and bias 0: it would be the identity)
        grn = type(m).__name__ == "GlobalResponseNorm"
        if (isinstance(m, NORMS) or grn) and getattr(m, "weight", None) is not None:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def _calibrate_bn(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Generator) -> None:
    axes = [a for a in range(x.dim()) if a != 1]
    mean, var = x.mean(dim=axes), x.var(dim=axes, unbiased=False)
    n = bn.num_features
    var = var.clamp(min=1e-4) * (0.5 + 1.5 * torch.rand(n, generator=g))
    bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(n, generator=g))
    bn.running_var.copy_(var)
    if bn.affine:
        sign = torch.where(torch.rand(n, generator=g) < 0.1, -1.0, 1.0)
        bn.weight.copy_(sign * (0.5 + torch.rand(n, generator=g)))
        bn.bias.copy_(0.1 * torch.randn(n, generator=g))


def _rescale_linear(m: nn.Module, inputs: tuple, out: torch.Tensor, g: torch.Generator) -> None:
    bias, gain = getattr(m, "bias", None), getattr(m, "gain", None)
    if not isinstance(gain, torch.Tensor):
        gain = None
    if not m.weight.any() or (gain is not None and not gain.any()):  # zero-initialized (ViT head, NFNet's last conv)
        m.weight.copy_(torch.randn(m.weight.shape, generator=g))
        if gain is not None:
            gain.fill_(1.0)
        out = m.forward(*inputs)
    if bias is not None and not bias.any():
        wx = _rms(out)  # bias 0: the output is Wx
        bias.copy_(0.1 * wx * torch.randn(bias.shape, generator=g))
        out = m.forward(*inputs)
    s = _rms(out)
    if s == 0.0 or not torch.isfinite(torch.tensor(s)):
        return
    if gain is not None:  # weight standardization: the weight's scale does not reach the output
        gain.div_(s)
    else:
        m.weight.div_(s)
    if bias is not None:
        bias.div_(s)


@torch.no_grad()
def make_healthy(model: nn.Module, x: torch.Tensor, seed: int = 0, extra: int = 15) -> nn.Module:
    """Calibrate ``model`` in place (see the module docstring) on the test input ``x`` and ``extra`` seeded
    test-like inputs; returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    _fix_dead_scales(model, g)
    batch = torch.cat([x] + [torch.randn(x.shape, generator=g) for _ in range(extra)])
    done: set[int] = set()

    def hook(m, inputs, out):
        if id(m) in done or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        done.add(id(m))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _calibrate_bn(m, inputs[0], g)
        else:
            _rescale_linear(m, inputs, out, g)
        return m.forward(*inputs)

    _run_hooked(model, hook, batch)
    return model.eval()


@torch.no_grad()
def layer_rms(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Output RMS of every Conv/Linear/BatchNorm module (by qualified name, first call) on input ``x``."""
    found: dict[str, float] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(m, inputs, out):
        if isinstance(out, torch.Tensor):
            found.setdefault(names[id(m)], _rms(out))

    _run_hooked(model, hook, x)
    return found


def _run_hooked(model: nn.Module, hook, x: torch.Tensor) -> None:
    """Run ``model`` on ``x`` with ``hook`` as the forward hook of every Conv/Linear/BatchNorm module."""
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, CONVS + (nn.Linear, nn.modules.batchnorm._BatchNorm))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()

"""Train and export a small vision transformer on scikit-learn's digits, upscaled from 8x8 to 32x32.

Produces, next to this script:
  digits_vit.onnx         - trained ViT (legacy TorchScript exporter, opset 17, logits output, dynamic batch);
  digits_vit_samples.npz  - 16 test images (float32 [16,1,32,32] in [0,1]) and labels (int64 [16]).

Run with:  python models/digits_vit.py [OUT_DIR]
(needs torch, scikit-learn, onnx, onnxruntime; about a minute on CPU; OUT_DIR defaults to models/)
Deterministic on CPU (fixed seeds, single thread).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE  # another folder: for the determinism test
sys.path.insert(0, str(HERE))
from tiny_transformer import Block, accuracy, train  # noqa: E402

SEED = 0
N_TEST = 360
SIZE, PATCH, DIM, HEADS, MLP, DEPTH = 32, 4, 32, 2, 64, 2
EPOCHS = 40

torch.manual_seed(SEED)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# Data: the 1797 8x8 images (0..16 scaled to [0,1]) upscaled bilinearly to 32x32; the split of digits.py.
digits = load_digits()
x = torch.from_numpy((digits.images / 16.0).astype(np.float32)[:, None])
x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
y = torch.from_numpy(digits.target.astype(np.int64))
perm = torch.from_numpy(np.random.default_rng(SEED).permutation(len(x)))
x, y = x[perm], y[perm]
x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


class DigitsViT(nn.Module):
    """Patch convolution (4x4, stride 4: 64 patches), class token, learned positions, pre-LN blocks, LN, head.

    The patch convolution has no bias (as CLIP's): a bias there takes most of the relevance (all of a blank
    patch's), which leaves the pixels a near-zero residue."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, DIM, PATCH, stride=PATCH, bias=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2 + 1, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block(DIM, HEADS, MLP) for _ in range(DEPTH)])
        self.ln, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)[:, 0])


def shift(xb, gen):
    """Augmentation: each image translated by up to 3 pixels in each direction (zero fill)."""
    pad = F.pad(xb, (3, 3, 3, 3))
    dy, dx = torch.randint(0, 7, (2, len(xb)), generator=gen)
    return torch.stack([p[:, i:i + SIZE, j:j + SIZE] for p, i, j in zip(pad, dy.tolist(), dx.tolist())])


net = DigitsViT()
train(net, x_train, y_train, EPOCHS, lr=3e-3, batch=64, seed=SEED, augment=shift)
print(f"train accuracy: {accuracy(net, x_train, y_train):.4f}")
print(f"test accuracy:  {accuracy(net, x_test, y_test):.4f}")

onnx_path = OUT / "digits_vit.onnx"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(net, (x_test[:1],), str(onnx_path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
np.savez(OUT / "digits_vit_samples.npz", images=x_test[:16].numpy(), labels=y_test[:16].numpy())

with torch.no_grad():
    expected = net(x_test).numpy()
got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x_test.numpy()})[0]
diff = np.abs(got - expected).max()
print(f"onnx vs torch max abs diff: {diff:.2e}")
assert diff < 1e-4, diff
print(f"onnx test accuracy: {(got.argmax(1) == y_test.numpy()).mean():.4f}; "
      f"samples right: {(got[:16].argmax(1) == y_test[:16].numpy()).sum()}/16")

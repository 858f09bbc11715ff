"""Train and export a small U-Net that segments scikit-learn's digits (the strokes) at 16x16.

Produces, next to this script:
  digits_unet.onnx   - trained U-Net (opset 17, sigmoid output "mask" [N,1,16,16], dynamic batch), exported
                       without constant folding so it keeps its BatchNormalization, Resize and Concat nodes;
  digits_seg_samples.npz - 8 test images (float32 [8,1,16,16] in [0,1]) and their masks (uint8 [8,1,16,16]).

Data: the 8x8 digits (pixels 0..16 scaled to [0, 1]) upsampled bilinearly to 16x16; the target mask is the
thresholded image (> 0.5): "where is the digit?" as in the segmentation discussions of LRP toolboxes.
Same split as digits.py (seed 0, last 360 images are the test set).

Run with:  python models/digits_seg.py   (needs torch, scikit-learn, onnx, onnxruntime)
Deterministic on CPU (fixed seeds, single thread).
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

OUT = Path(__file__).resolve().parent
SEED, N_TEST, EPOCHS = 0, 360, 20


def data():
    """(x_train, y_train, x_test, y_test): 16x16 images in [0, 1] (8-bit steps) and their stroke masks."""
    x8 = torch.from_numpy((load_digits().images / 16.0).astype(np.float32)[:, None])
    x = F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    x = torch.round(x * 255) / 255  # what an 8-bit PNG of it holds
    perm = torch.from_numpy(np.random.default_rng(SEED).permutation(len(x)))
    x = x[perm]
    y = (x > 0.5).float()
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def block(cin, cout, bn=True):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if bn else []), nn.ReLU())


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2, self.mid = block(1, 8), block(8, 16), block(16, 16, bn=False)
        self.dec2, self.dec1 = block(32, 16, bn=False), block(24, 8, bn=False)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)                                   # 16x16
        e2 = self.enc2(F.max_pool2d(e1, 2))                 # 8x8
        m = self.mid(F.max_pool2d(e2, 2))                   # 4x4
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False), e1], 1))
        return torch.sigmoid(self.head(d1))


def iou(model, xs, ys):
    model.eval()
    with torch.no_grad():
        p = model(xs) > 0.5
    t = ys > 0.5
    return ((p & t).sum() / (p | t).sum()).item()


if __name__ == "__main__":
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test = data()
    net = UNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        net.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(32):
            opt.zero_grad()
            F.binary_cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
    print(f"train IoU: {iou(net, x_train, y_train):.4f}")
    print(f"test IoU:  {iou(net, x_test, y_test):.4f}")
    net.eval()
    path = OUT / "digits_unet.onnx"
    torch.onnx.export(net, (x_test[:1],), str(path), dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["input"], output_names=["mask"],
                      dynamic_axes={"input": {0: "batch"}, "mask": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    np.savez(OUT / "digits_seg_samples.npz", images=x_test[:8].numpy(), masks=y_test[:8].numpy().astype(np.uint8))
    with torch.no_grad():
        expected = net(x_test).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x_test.numpy()})[0]
    diff = np.abs(got - expected).max()
    print(f"onnx vs torch max abs diff: {diff:.2e}")
    assert diff < 1e-5, diff

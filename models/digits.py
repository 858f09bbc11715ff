"""Train and export a small CNN on scikit-learn's 8x8 digits data set.

Produces, next to this script:
  digits_cnn.onnx     - trained CNN (opset 17, softmax output, dynamic batch),
                        exported without constant folding so it keeps its
                        BatchNormalization and Softmax nodes; the Dropout
                        node the exporter drops in eval mode is put back
                        (inference mode, i.e. identity);
  digits_samples.npz  - 16 test images (float32 [16,1,8,8] in [0,1]) and labels.

Run with:  python models/digits.py   (needs torch, scikit-learn, onnx, onnxruntime)
Deterministic on CPU (fixed seeds, single thread).
"""
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

SEED = 0
N_TEST = 360
EPOCHS = 40
OUT = Path(__file__).resolve().parent

torch.manual_seed(SEED)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# Data: 1797 8x8 images with values 0..16, scaled to [0,1]; shuffled with a fixed seed.
digits = load_digits()
x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N,1,8,8]
y = digits.target.astype(np.int64)
perm = np.random.default_rng(SEED).permutation(len(x))
x, y = x[perm], y[perm]
x_train, y_train = torch.from_numpy(x[:-N_TEST]), torch.from_numpy(y[:-N_TEST])
x_test, y_test = torch.from_numpy(x[-N_TEST:]), torch.from_numpy(y[-N_TEST:])

net = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
    nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10),
)


class WithSoftmax(nn.Module):
    """Classifier returning softmax probabilities instead of logits."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.body(x))


def accuracy(model, xs, ys):
    model.eval()
    with torch.no_grad():
        return (model(xs).argmax(1) == ys).float().mean().item()


# Training: Adam on logits with cross-entropy, mini-batches of 32.
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
loss_fn = nn.CrossEntropyLoss()
gen = torch.Generator().manual_seed(SEED)
for epoch in range(EPOCHS):
    net.train()
    for idx in torch.randperm(len(x_train), generator=gen).split(32):
        opt.zero_grad()
        loss_fn(net(x_train[idx]), y_train[idx]).backward()
        opt.step()
print(f"train accuracy: {accuracy(net, x_train, y_train):.4f}")
print(f"test accuracy:  {accuracy(net, x_test, y_test):.4f}")

# Export (eval mode, weights embedded in the file).
model = WithSoftmax(net).eval()
onnx_path = OUT / "digits_cnn.onnx"
torch.onnx.export(
    model, (x_test[:1],), str(onnx_path), dynamo=False, do_constant_folding=False,
    opset_version=17, input_names=["input"], output_names=["probabilities"],
    dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
)


def restore_dropout(m):
    """Re-insert the Dropout node that the eval-mode TorchScript exporter drops.

    The exporter turns eval-mode dropout into nothing; we put it back as an
    inference-mode ONNX Dropout (ratio 0.2, no training_mode input, i.e. an
    identity), so the graph mirrors the torch module list.
    """
    nodes = list(m.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == "/body/body.10/Relu")
    src, dst = nodes[i].output[0], "/body/body.11/Dropout_output_0"
    for n in nodes[i + 1:]:
        n.input[:] = [dst if v == src else v for v in n.input]
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.2, np.float32), "body.11.ratio"))
    nodes.insert(i + 1, onnx.helper.make_node("Dropout", [src, "body.11.ratio"], [dst], name="/body/body.11/Dropout"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


proto = restore_dropout(onnx.load(str(onnx_path)))
onnx.checker.check_model(proto, full_check=True)
onnx.save(proto, str(onnx_path))  # single file, weights embedded (no external data)

np.savez(OUT / "digits_samples.npz", images=x_test[:16].numpy(), labels=y_test[:16].numpy())

# Verify ONNX Runtime against torch on the whole test set.
with torch.no_grad():
    expected = model(x_test).numpy()
sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
got = sess.run(["probabilities"], {"input": x_test.numpy()})[0]
diff = np.abs(got - expected).max()
print(f"onnx vs torch max abs diff: {diff:.2e}")
assert diff < 1e-5, diff
print(f"onnx test accuracy: {(got.argmax(1) == y_test.numpy()).mean():.4f}")

"""Train and export a tiny text classifier on a synthetic task whose answer is known: marker tokens among distractors.

Each sequence is [CLS] followed by 15 words; 1 or 2 of them (at random positions) are the same colour word
("red", "green", "blue" or "yellow"), every other word is drawn uniformly from 24 distractor words. The class is
the colour: only the marker tokens carry information, so a faithful explanation puts the most relevance on them.

Produces, next to this script:
  marker_text.onnx          - trained classifier (legacy TorchScript exporter, opset 17): int64 input_ids
                              [batch, 16] -> logits [batch, 4];
  marker_text_samples.npz   - 12 test sequences input_ids (int64 [12,16]), labels (int64 [12]), markers (bool
                              [12,16], true at the marker positions) and vocab (str [V], the word of each id).

Run with:  python models/marker_text.py [OUT_DIR]
(needs torch, onnx, onnxruntime; under a minute on CPU; OUT_DIR defaults to models/)
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
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE  # another folder: for the determinism test
sys.path.insert(0, str(HERE))
from tiny_transformer import Block, accuracy, train  # noqa: E402

SEED = 0
T, DIM, HEADS, MLP, DEPTH = 16, 32, 2, 64, 2
N_TRAIN, N_TEST, EPOCHS = 4000, 1000, 12
CLASSES = ["red", "green", "blue", "yellow"]
DISTRACTORS = ["the", "a", "cat", "dog", "runs", "over", "under", "big", "small", "house", "tree", "car", "sky",
               "sea", "slow", "fast", "old", "new", "one", "two", "and", "near", "far", "light"]
VOCAB = ["[CLS]"] + CLASSES + DISTRACTORS
CLS_ID, FIRST_MARKER, FIRST_DISTRACTOR = 0, 1, 1 + len(CLASSES)

torch.manual_seed(SEED)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def make_data(n: int, rng) -> tuple:
    """n sequences: (input_ids [n, T], labels [n], markers [n, T] bool)."""
    ids = rng.integers(FIRST_DISTRACTOR, len(VOCAB), (n, T))
    ids[:, 0] = CLS_ID
    labels = rng.integers(0, len(CLASSES), n)
    markers = np.zeros((n, T), bool)
    for i in range(n):
        pos = rng.choice(np.arange(1, T), size=rng.integers(1, 3), replace=False)
        ids[i, pos] = FIRST_MARKER + labels[i]
        markers[i, pos] = True
    return ids.astype(np.int64), labels.astype(np.int64), markers


class MarkerText(nn.Module):
    """Word embedding + learned positions, pre-LN encoder blocks, LayerNorm, linear head on the [CLS] token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), DIM)
        self.pos = nn.Parameter(torch.randn(1, T, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block(DIM, HEADS, MLP) for _ in range(DEPTH)])
        self.ln, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, len(CLASSES))

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)[:, 0])


rng = np.random.default_rng(SEED)
train_ids, train_y, _ = make_data(N_TRAIN, rng)
test_ids, test_y, test_markers = make_data(N_TEST, rng)
x_train, y_train = torch.from_numpy(train_ids), torch.from_numpy(train_y)
x_test, y_test = torch.from_numpy(test_ids), torch.from_numpy(test_y)

net = MarkerText()
train(net, x_train, y_train, EPOCHS, lr=3e-3, batch=64, seed=SEED)
print(f"train accuracy: {accuracy(net, x_train, y_train):.4f}")
print(f"test accuracy:  {accuracy(net, x_test, y_test):.4f}")

onnx_path = OUT / "marker_text.onnx"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(net, (x_test[:1],), str(onnx_path), dynamo=False, opset_version=17, input_names=["input_ids"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})
onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
np.savez(OUT / "marker_text_samples.npz", input_ids=test_ids[:12], labels=test_y[:12], markers=test_markers[:12],
         vocab=np.array(VOCAB))

with torch.no_grad():
    expected = net(x_test).numpy()
got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": test_ids})[0]
diff = np.abs(got - expected).max()
print(f"onnx vs torch max abs diff: {diff:.2e}")
assert diff < 1e-4, diff
print(f"onnx test accuracy: {(got.argmax(1) == test_y).mean():.4f}")

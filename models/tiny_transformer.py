"""The pre-LayerNorm encoder block shared by digits_vit.py and marker_text.py (imported by them; needs torch).

Attention is written out (Linear q/k/v, MatMul, Softmax, MatMul, Linear) as in ViT/BERT exports, so the
exported graph shows the ops lrpc's transformer rules read: LayerNormalization, MatMul of two computed tensors,
Softmax, GELU (as Erf arithmetic) and residual Adds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)); multi-head self-attention, GELU MLP."""

    def __init__(self, d: int, heads: int, mlp: int, bias: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.fc1, self.fc2 = nn.Linear(d, mlp, bias=bias), nn.Linear(mlp, d, bias=bias)
        self.heads = heads

    def forward(self, x):
        n, t, d = x.shape
        # q, k, v by chunk (exported as Slices), not by indexing a stacked tensor: Gather on a tensor with a dynamic
        # batch is refused by lrpc (it needs static dims there)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).chunk(3, -1))
        a = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def train(net, x, y, epochs: int, lr: float, batch: int, seed: int, augment=None) -> None:
    """AdamW with a cosine learning-rate schedule and cross-entropy on the logits (deterministic on CPU)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb = x[idx] if augment is None else augment(x[idx], gen)
            opt.zero_grad()
            F.cross_entropy(net(xb), y[idx]).backward()
            opt.step()
            sched.step()
    net.eval()


def accuracy(net, x, y) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()

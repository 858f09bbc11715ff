"""Relevance of a tiny Hugging Face decoder from lxt, the AttnLRP authors' implementation (run in a process of its
own: lxt patches transformers' and torch's classes for good). ``python lxt_reference.py MODEL COMPOSITE IN.npz
OUT.npy``: MODEL llama or gpt2 as tests/test_decoder.py builds them (COMPOSITE attnlrp or cp-lrp), or vit, torchvision's
VisionTransformer as tests/test_attention.py builds it (cp-lrp, lxt's rules for it); IN.npz holds ``x`` (the
inputs_embeds or images) and ``k`` (the explained logit per sample); OUT.npy gets gradient × input at ``x`` of the
patched model's (last-position) logits.

lxt 2.1 predates transformers 5: two shims, neither touching a rule: a name its BERT module imports is stubbed, and
the attention function is wrapped where transformers 5 looks it up (lxt replaces the attention registry by a dict)."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import torch
import transformers.pytorch_utils

transformers.pytorch_utils.find_pruneable_heads_and_indices = lambda *a, **k: None  # (only imported by lxt)

from lxt.efficient import monkey_patch  # noqa: E402
from lxt.efficient.patches import cp_wrap_attention_forward, wrap_attention_forward  # noqa: E402

import test_attention  # noqa: E402
import test_decoder  # noqa: E402


def main(name: str, composite: str, inputs: str, out: str) -> None:
    data = np.load(inputs)
    x = torch.from_numpy(data["x"]).requires_grad_(True)
    y = (_vit if name == "vit" else _decoder)(name, composite)(x)
    y.gather(1, torch.from_numpy(data["k"])[:, None]).sum().backward()
    np.save(out, (x * x.grad).detach().numpy())


def _vit(name: str, composite: str):
    from torchvision.models import vision_transformer

    rules = importlib.import_module("lxt.efficient.models.vit_torch")
    assert composite == "cp-lrp", "lxt has CP-LRP rules for torchvision's ViT"
    monkey_patch(vision_transformer, rules.cp_LRP)
    return test_attention.torchvision_vit()


def _decoder(name: str, composite: str):
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    rules = importlib.import_module(f"lxt.efficient.models.{name}")
    patches = dict(rules.attnLRP if composite == "attnlrp" else rules.cp_LRP)
    wrap = wrap_attention_forward if composite == "attnlrp" else cp_wrap_attention_forward

    def attention(m):
        m.eager_attention_forward = wrap(m.eager_attention_forward)
        return True

    patches[module] = attention
    monkey_patch(module, patches)
    net = test_decoder._llama(eager=True) if name == "llama" else test_decoder._gpt2()
    net.config._attn_implementation = "eager"
    return test_decoder._wrapped(net)


if __name__ == "__main__":
    main(*sys.argv[1:5])

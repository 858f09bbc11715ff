"""Relevance of a tiny Hugging Face decoder from lxt, the AttnLRP authors' implementation (run in a process of its
own: lxt patches transformers' classes for good). ``python lxt_reference.py MODEL COMPOSITE IN.npz OUT.npy``:
MODEL llama or gpt2 as tests/test_decoder.py builds them, COMPOSITE attnlrp or cp-lrp; IN.npz holds ``e`` (the
inputs_embeds) and ``k`` (the explained logit per sample); OUT.npy gets gradient × input at inputs_embeds of the
patched model's last-position logits.

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

import test_decoder  # noqa: E402


def main(name: str, composite: str, inputs: str, out: str) -> None:
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
    data = np.load(inputs)
    e = torch.from_numpy(data["e"]).requires_grad_(True)
    y = test_decoder._wrapped(net)(e)
    y.gather(1, torch.from_numpy(data["k"])[:, None]).sum().backward()
    np.save(out, (e * e.grad).detach().numpy())


if __name__ == "__main__":
    main(*sys.argv[1:5])

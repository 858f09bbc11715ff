"""lrpc against lxt (the AttnLRP authors' reference implementation, ``pip install --no-deps lxt==2.1``) on tiny
Hugging Face Llama and GPT-2 decoders and torchvision's ViT with random weights and biases: the compiled export's
relevance at ``inputs_embeds`` (the image) equals lxt's gradient × input of its patched model (epsilon 0, 1e-4
relative L2 in float32), under attnlrp and cp-lrp (the ViT: cp-lrp, the rules lxt has for it). lxt runs in a
subprocess (tests/lxt_reference.py): it patches transformers for good.
Skipped where lxt is not installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lxt")

import lrpc  # noqa: E402
from conftest import rel_l2, report_line, run_onnx  # noqa: E402
from test_attention import _export as export_vit  # noqa: E402
from test_attention import torchvision_vit  # noqa: E402
from test_decoder import GRAD_TOL, D, T, _export, _gpt2, _llama  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoder_matches_lxt(tmp_path, name, composite):
    net = _llama(eager=True) if name == "llama" else _gpt2()
    model = _export(net, tmp_path / f"{name}.onnx", "legacy17")
    e = np.random.default_rng(0).standard_normal((2, T, D)).astype(np.float32)
    compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
    logits = run_onnx(model, {"inputs_embeds": e})["logits"]
    k = logits.argmax(1)
    seed = np.zeros_like(logits)
    seed[np.arange(len(k)), k] = logits[np.arange(len(k)), k]
    got = run_onnx(compiled, {"inputs_embeds": e, "relevance_seed": seed})["relevance"]
    err = rel_l2(got, _lxt(tmp_path, name, composite, e, k))
    report_line(f"{name} {composite}: lrpc vs lxt relevance rel L2 {err:.1e} (float32)")
    assert err < GRAD_TOL


def test_torchvision_vit_matches_lxt(tmp_path):
    model = export_vit(torchvision_vit(), tmp_path / "vit.onnx", "legacy17")
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    logits = run_onnx(model, {"input": x})["logits"]
    k = logits.argmax(1)
    seed = np.zeros_like(logits)
    seed[np.arange(len(k)), k] = logits[np.arange(len(k)), k]
    got = run_onnx(lrpc.compile(model, "cp-lrp", epsilon=0.0, stabilizer_eps=0.0),
                   {"input": x, "relevance_seed": seed})["relevance"]
    err = rel_l2(got, _lxt(tmp_path, "vit", "cp-lrp", x, k))
    report_line(f"torchvision ViT cp-lrp: lrpc vs lxt relevance rel L2 {err:.1e} (float32)")
    assert err < GRAD_TOL


def _lxt(tmp_path, name, composite, x, k):
    np.savez(tmp_path / "in.npz", x=x, k=k)
    done = subprocess.run([sys.executable, str(HERE / "lxt_reference.py"), name, composite, str(tmp_path / "in.npz"),
                           str(tmp_path / "lxt.npy")], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp_path / "lxt.npy")

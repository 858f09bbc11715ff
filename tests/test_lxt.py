"""lrpc against lxt (the AttnLRP authors' reference implementation, ``pip install --no-deps lxt==2.1``) on tiny
Hugging Face Llama and GPT-2 decoders with random weights and biases: the compiled export's relevance at
``inputs_embeds`` equals lxt's gradient × input of its patched model (epsilon 0, 1e-4 relative L2 in float32),
under attnlrp and cp-lrp. lxt runs in a subprocess (tests/lxt_reference.py): it patches transformers for good.
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
    np.savez(tmp_path / "in.npz", e=e, k=k)
    done = subprocess.run([sys.executable, str(HERE / "lxt_reference.py"), name, composite, str(tmp_path / "in.npz"),
                           str(tmp_path / "lxt.npy")], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    err = rel_l2(got, np.load(tmp_path / "lxt.npy"))
    report_line(f"{name} {composite}: lrpc vs lxt relevance rel L2 {err:.1e} (float32)")
    assert err < GRAD_TOL

"""Decoders from token ids: Hugging Face ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU,
grouped-query attention) exported as they are, taking ``input_ids`` and ``attention_mask`` and returning the logits
of every position [B, T, V], with both exporters. Whatever the export computes from the ids and the mask alone
(position ids, rotary cos/sin, causal and padding masks, the ids reshaped or cast before the embedding) depends on
no explained tensor and is a constant for the rules; relevance arrives per token at the word embedding.

Oracle: relevance per token = Σ_hidden gradient × input of the word embedding in the decoder's forward with the
rules' tensors detached (tests/test_decoder.py), seeded by the sequence targets (``next``, ``token:POS=ID,...``,
``continuation:N``), float32, 1e-4 relative L2; the two exports agree."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import lrpc
from conftest import rel_l2, report_line
from test_decoder import EXPORTS, _gpt2, _gpt2_forward, _llama, _llama_forward

T, V = 6, 100


@pytest.fixture(autouse=True)
def vocabulary_head_on_seeded_columns(monkeypatch):
    """The vocabulary head runs its rule over the seeded tokens' columns only (as it does from 4096 tokens on):
    these tiny vocabularies take that path too, so the oracles below check it."""
    from lrpc.relevance import linear

    monkeypatch.setattr(linear, "WIDE", 16)
MODELS = {"llama": (_llama, _llama_forward, lambda net: net.model.embed_tokens),
          "gpt2": (_gpt2, _gpt2_forward, lambda net: net.transformer.wte)}


def _feeds():
    rng = np.random.default_rng(5)
    mask = np.ones((2, T), np.int64)
    mask[1, -1] = 0  # the second sample is padded on the right
    return {"input_ids": rng.integers(0, V, (2, T)).astype(np.int64), "attention_mask": mask}


def export_ids(net, path, exporter: str, dynamic: bool = False) -> onnx.ModelProto:
    """``net`` exported taking (input_ids, attention_mask), returning all logits [B, T, V] (``dynamic``: T a
    symbolic dim)."""
    import warnings

    torch = pytest.importorskip("torch")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids, mask):
            return self.net(input_ids=ids, attention_mask=mask).logits

    kw, names = EXPORTS[exporter], ["input_ids", "attention_mask"]
    args = tuple(torch.from_numpy(v) for v in _feeds().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            seq = {1: torch.export.Dim("seq", min=2, max=60)} if dynamic else None
            torch.onnx.export(Logits().eval(), args, dynamo=True, opset_version=kw["opset"], input_names=names,
                              output_names=["logits"], dynamic_shapes={"ids": seq, "mask": seq} if dynamic else None
                              ).save(str(path), external_data=False)
        else:
            axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}, "logits": {1: "seq"}} if dynamic else None
            torch.onnx.export(Logits().eval(), args, str(path), dynamo=False, opset_version=kw["opset"],
                              input_names=names, output_names=["logits"], dynamic_axes=axes)
    return onnx.load(str(path))


def exported_decoders(tmp_path_factory, tag: str, export) -> dict:
    """{(model, exporter): (torch net, ``export(net, path, exporter)``)} for every model of MODELS and exporter."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root, out = tmp_path_factory.mktemp(tag), {}
    for name, (build, _, _) in MODELS.items():
        for exporter in EXPORTS:
            net = build(eager=exporter == "legacy17") if name == "llama" else build()
            out[name, exporter] = net, export(net, root / f"{name}-{exporter}.onnx", exporter)
    return out


@pytest.fixture(scope="module")
def token_decoders(tmp_path_factory):
    return exported_decoders(tmp_path_factory, "token-decoders", export_ids)


def _reference(name, net, feeds, mode, seed):
    """(all logits, Σ_hidden gradient × input of the word embedding) of the detach-reference forward, for the LRP
    seed ``seed``."""
    torch = pytest.importorskip("torch")

    _, forward, embedding = MODELS[name]
    word = embedding(net)(torch.from_numpy(feeds["input_ids"])).detach().requires_grad_(True)
    logits = forward(net, word, mode, mask=torch.from_numpy(feeds["attention_mask"]), last=False)
    # (LRP seeded with s at an output y is gradient × input of the output weighted s / y)
    (logits * (torch.from_numpy(seed) / logits.detach())).sum().backward()
    return logits.detach().numpy(), (word.grad * word).sum(-1).detach().numpy()


def _session(model, composite):
    compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
    assert "NonZero" in {n.op_type for n in compiled.graph.node}  # (the head runs over the seeded columns)
    return lrpc.Session(compiled)


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_from_token_ids_explains_the_next_token(token_decoders, name, composite):
    """target ``next``: the top-1 token at the last position the mask keeps; Session.explain(input_ids=,
    attention_mask=) gives relevance per token [B, T] equal to the detach reference, logits as torch's; the two
    exports agree."""
    torch = pytest.importorskip("torch")

    feeds, got = _feeds(), {}
    for exporter in EXPORTS:
        net, model = token_decoders[name, exporter]
        e = _session(model, composite).explain(**feeds, target="next")
        with torch.no_grad():
            plain = net(input_ids=torch.from_numpy(feeds["input_ids"]),
                        attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
        assert e.output.shape == (2, T, V) and rel_l2(e.output, plain) < 1e-4
        want_seed = np.zeros((2, T, V), np.float32)
        last = [T - 1, T - 2]  # (the second sample's last token is padding: next is predicted before it)
        want_seed[[0, 1], last, plain[[0, 1], last].argmax(-1)] = 1.0
        assert np.array_equal(e.seed, want_seed)
        logits, want = _reference(name, net, feeds, composite, want_seed)
        assert rel_l2(logits, plain) < 1e-5  # (the reference forward is the model's)
        assert e.relevance.shape == (2, T)
        err = rel_l2(e.relevance, want)
        report_line(f"{name} ids {exporter} {composite} next: relevance per token vs detach reference rel L2 "
                    f"{err:.1e} (float32)")
        assert err < 1e-4
        got[exporter] = e.relevance
    assert rel_l2(got["legacy17"], got["dynamo18"]) < 1e-4


@pytest.mark.parametrize("target", ["token:2=17,-3=5", "token:1", "continuation:3"])
@pytest.mark.parametrize("name,exporter", [("gpt2", "legacy17"), ("llama", "dynamo18")])
def test_tokens_at_chosen_positions_and_continuations(token_decoders, name, exporter, target):
    """Chosen (position, token) pairs and a continuation (each of the last N tokens from the position before it)
    seed the sum of their one-hots in one run; the relevance equals the reference's for that sum."""
    net, model = token_decoders[name, exporter]
    feeds = _feeds()
    e = _session(model, "attnlrp").explain(**feeds, target=target)
    want_seed = np.zeros((2, T, V), np.float32)
    if target.startswith("continuation"):
        for p in range(T - 4, T - 1):
            want_seed[[0, 1], p, feeds["input_ids"][:, p + 1]] = 1.0
    elif target == "token:1":
        want_seed[[0, 1], 1, e.output[:, 1].argmax(-1)] = 1.0
    else:
        want_seed[:, 2, 17] = want_seed[:, T - 3, 5] = 1.0
    assert np.array_equal(e.seed, want_seed)
    _, want = _reference(name, net, feeds, "attnlrp", want_seed)
    err = rel_l2(e.relevance, want)
    report_line(f"{name} ids {exporter} attnlrp {target}: relevance per token vs detach reference rel L2 {err:.1e}")
    assert err < 1e-4


def test_cli_explain_tokens_on_a_decoder(token_decoders, tmp_path):
    """``lrpc explain gpt2.onnx --tokens ids.npz --target next -o rel.json``: the relevance per token written is the
    detach reference's (the mask from the .npz)."""
    import json

    from cli_helpers import run_cli

    net, model = token_decoders["gpt2", "dynamo18"]
    feeds = _feeds()
    onnx.save(model, tmp_path / "gpt2.onnx")
    np.savez(tmp_path / "ids.npz", **feeds)
    code, out, err = run_cli("explain", tmp_path / "gpt2.onnx", "--tokens", tmp_path / "ids.npz", "--rules",
                             "attnlrp", "--epsilon", "0", "--stabilizer-eps", "0", "--target", "next", "--no-cache",
                             "-o", tmp_path / "rel.json")
    assert code == 0, err
    data = json.loads((tmp_path / "rel.json").read_text())
    seed = np.zeros((2, T, V), np.float32)
    for b, sample in enumerate(data["samples"]):
        assert sample["ids"] == feeds["input_ids"][b].tolist() and sample["explained"][0][0] == T - 1 - b
        seed[b, T - 1 - b, sample["explained"][0][1]] = 1.0
    _, want = _reference("gpt2", net, feeds, "attnlrp", seed)
    assert rel_l2(np.array([s["relevance"] for s in data["samples"]]), want) < 1e-4
    assert "target next" in out


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_check_conserves_on_a_bias_free_llama_from_token_ids(tmp_path, exporter):
    """``lrpc check --rules cp-lrp`` on a bias-free Llama taking token ids: random ids within the vocabulary, the mask
    all ones; conservation passes (Σ token relevance = the logit), the gradient check is skipped with its reason."""
    from lrpc.check import run_check

    pytest.importorskip("transformers")
    export_ids(_llama(bias=False, eager=exporter == "legacy17"), tmp_path / "llama.onnx", exporter)
    checks = {c.name: c for c in run_check(str(tmp_path / "llama.onnx"), "cp-lrp",
                                           lrpc.Options(epsilon=1e-9, stabilizer_eps=1e-9)).checks}
    assert all(checks[k].passed for k in ("supported", "forward", "finite", "conservation")), checks
    assert checks["gradient"].skipped and "token ids" in checks["gradient"].message


@pytest.mark.parametrize("exporter", list(EXPORTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_with_a_dynamic_sequence_length(tmp_path, name, exporter):
    """A decoder exported with a symbolic sequence length compiles as it is (Llama's grouped-query attention: its
    Expand sums the copies over axes read at run time, RoPE's Slices need the head dim only) and explains sequences
    of two lengths as the detach reference does (attnlrp and cp-lrp, target next, the second sample padded on the
    right)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")

    build = MODELS[name][0]
    net = build(eager=exporter == "legacy17") if name == "llama" else build()
    model = export_ids(net, tmp_path / "llama.onnx", exporter, dynamic=True)
    assert [d.dim_param != "" for d in model.graph.input[0].type.tensor_type.shape.dim] == [False, True]
    for composite in ("attnlrp", "cp-lrp"):
        session = _session(model, composite)
        for t in (4, 9):
            rng = np.random.default_rng(t)
            mask = np.ones((2, t), np.int64)
            mask[1, -1] = 0
            feeds = {"input_ids": rng.integers(0, V, (2, t)).astype(np.int64), "attention_mask": mask}
            e = session.explain(**feeds, target="next")
            assert e.seed[0, t - 1].sum() == 1 and e.seed[1, t - 2].sum() == 1 and e.seed.sum() == 2
            with torch.no_grad():
                plain = net(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
            assert e.relevance.shape == (2, t) and rel_l2(e.output, plain) < 1e-4
            _, want = _reference(name, net, feeds, composite, e.seed)
            err = rel_l2(e.relevance, want)
            report_line(f"{name} ids dynamic T={t} {exporter} {composite} next: relevance per token vs detach "
                        f"reference rel L2 {err:.1e} (float32)")
            assert err < 1e-4

"""Hugging Face architectures nobody here wrote, from tiny configs (2 layers, width 32) with random weights at unit
scale, each exported with both torch exporters: decoders (Qwen2, Mistral, Phi-3, Gemma, Gemma 2, GPT-NeoX, OPT,
Falcon) from token ids explaining ``next``; encoders (DistilBERT, RoBERTa, ELECTRA, ALBERT, DeBERTa-v2, ModernBERT,
BERT with masked-LM and token-classification heads, a mean-pooled T5 encoder); vision (ViT, DeiT, BEiT with relative
position bias, CLIP's vision tower) and Whisper's audio encoder.

Each: compiles under attnlrp and cp-lrp, the compiled forward equals onnxruntime's forward of the export, the
relevance is finite and not zero, and the two exports (different graphs: eager against SDPA attention, other
decompositions) give the same relevance with epsilon 0 (1e-4 relative L2). The families whose relevance is checked
against the rules run in torch are in test_text.py (BERT, DeBERTa-v2), test_decoder.py / test_token_decoders.py
(GPT-2, Llama) and test_vision_transformers.py. A default subset runs in the suite; ``--zoo all`` runs every
family."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch  # noqa: E402

import lrpc  # noqa: E402
from conftest import rel_l2  # noqa: E402
from test_decoder import _randomize  # noqa: E402

T, V = 6, 100
DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
           vocab_size=V, max_position_embeddings=64)
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=V,
           max_position_embeddings=64, num_labels=3)
IMG = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family: (model class, config class, config, what the wrapper returns: decoder logits, one tensor, mean-pooled
# hidden states, image logits, ...)
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DEC, "dec"),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**DEC, "sliding_window": None}, "dec"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**DEC, **IDS}, "dec"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**DEC, "head_dim": 8, "sliding_window": 4}, "dec"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**DEC, "head_dim": 8}, "dec"),
    "gptneox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                {**{k: v for k, v in DEC.items() if k != "num_key_value_heads"}, "rotary_pct": 0.25}, "dec"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                                vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=32,
                                                pad_token_id=1, bos_token_id=2, eos_token_id=2), "dec"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=V, bos_token_id=1, eos_token_id=2), "dec"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=V, max_position_embeddings=64,
                        num_labels=3), "cls"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", {**ENC, "pad_token_id": 1}, "cls"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", {**ENC, "embedding_size": 16}, "cls"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", {**ENC, "embedding_size": 16}, "cls"),
    "debertav2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                  {**ENC, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                   "max_relative_positions": 16, "pooler_hidden_size": 32}, "cls"),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig",
                   {**ENC, **IDS, "cls_token_id": 1, "sep_token_id": 2, "global_attn_every_n_layers": 2,
                    "local_attention": 4}, "cls"),
    "bertmlm": ("BertForMaskedLM", "BertConfig", ENC, "token:2=7"),
    "berttok": ("BertForTokenClassification", "BertConfig", ENC, "token:2=1"),
    "t5enc": ("T5EncoderModel", "T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=V),
              "pool"),
    "vit": ("ViTForImageClassification", "ViTConfig", {**IMG, "num_labels": 5}, "img"),
    "deit": ("DeiTForImageClassification", "DeiTConfig", {**IMG, "num_labels": 5}, "img"),
    "beit": ("BeitForImageClassification", "BeitConfig", {**IMG, "num_labels": 5, "use_relative_position_bias": True},
             "img"),
    "clipvision": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", {**IMG, "projection_dim": 16},
                   "image_embeds"),
    "whisperenc": ("WhisperModel", "WhisperConfig",
                   dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                        decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20,
                        vocab_size=V, decoder_start_token_id=1, **IDS), "audio"),
}
DEFAULT = ("qwen2", "t5enc", "beit")  # (the suite's subset: a decoder, a mean-pooled encoder, relative position bias)
NEEDS_EAGER = {"t5enc", "beit"}  # (torch's SDPA decomposition fails to export these: eager attention for both)


class Wrapped(torch.nn.Module):
    """The model on named inputs, returning one tensor: ``attr`` of its output, or the mean over the sequence of its
    last hidden state (``attr`` "mean")."""

    def __init__(self, net, attr: str):
        super().__init__()
        self.net, self.attr = net, attr

    def forward(self, *args):
        out = self.net(**dict(zip(self.names, args)))
        return out.last_hidden_state.mean(1) if self.attr == "mean" else getattr(out, self.attr)


def build(family: str, eager: bool):
    """(module returning one tensor, feeds, target) of ``family``: random weights at unit scale."""
    import transformers

    model, config, kwargs, kind = FAMILIES[family]
    cfg = getattr(transformers, config)(**kwargs)
    if eager:
        cfg._attn_implementation = "eager"
    net = getattr(transformers, model)(cfg)
    net = net.get_encoder() if kind == "audio" else net
    _randomize(net.eval())
    rng = np.random.default_rng(5)
    if kind in ("img", "image_embeds"):
        feeds = {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    elif kind == "audio":
        feeds = {"input_features": rng.standard_normal((2, 16, 40)).astype(np.float32)}
    else:
        mask = np.ones((2, T), np.int64)
        mask[1, -1] = 0  # (the second sample padded)
        feeds = {"input_ids": rng.integers(3, V, (2, T)).astype(np.int64), "attention_mask": mask}
    module = Wrapped(net, {"img": "logits", "image_embeds": "image_embeds", "pool": "mean", "audio": "mean"}.get(
        kind, "logits"))
    module.names = list(feeds)
    target = "next" if kind == "dec" else kind if kind.startswith("token:") else None
    return module, feeds, target


def export(module, feeds, path, exporter):
    import warnings

    args = tuple(torch.from_numpy(v) for v in feeds.values())
    names = list(feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo18":
            torch.onnx.export(module, args, dynamo=True, opset_version=18, input_names=names,
                              output_names=["out"]).save(str(path), external_data=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["out"])
    module.eval()  # (the legacy exporter leaves the module in training mode)


@pytest.mark.parametrize("family", [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.zoo) for f in FAMILIES])
def test_family_compiles_and_both_exports_agree(family, tmp_path):
    import onnxruntime as ort

    got = {}
    for exporter in ("legacy17", "dynamo18"):
        module, feeds, target = build(family, eager=exporter == "legacy17" or family in NEEDS_EAGER)
        path = tmp_path / f"{exporter}.onnx"
        export(module, feeds, path, exporter)
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for composite in ("attnlrp", "cp-lrp"):
            session = lrpc.Session(lrpc.compile(str(path), composite, epsilon=0.0, stabilizer_eps=0.0))
            e = session.explain(**feeds, target=target)
            assert rel_l2(e.output, plain) < 1e-4
            assert np.all(np.isfinite(e.relevance)) and np.any(e.relevance), (exporter, composite)
            got[exporter, composite] = e.relevance
    for composite in ("attnlrp", "cp-lrp"):
        assert rel_l2(got["legacy17", composite], got["dynamo18", composite]) < 1e-4, composite


# family: (model class, config class, config, the same weights' output at every position, the pooled position per row)
POOLED = {
    "qwen2cls": ("Qwen2ForSequenceClassification", "Qwen2Config", {**DEC, **IDS, "num_labels": 3},
                 lambda net, kw: net.score(net.model(**kw).last_hidden_state)),
    "cliptext": ("CLIPTextModelWithProjection", "CLIPTextConfig",
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=V, max_position_embeddings=64, projection_dim=16, eos_token_id=V - 1),
                 lambda net, kw: net.text_projection(net.text_model(**kw).last_hidden_state)),
}


class _Named(torch.nn.Module):
    def __init__(self, net, out):
        super().__init__()
        self.net, self.out = net, out

    def forward(self, input_ids, attention_mask):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.out(self.net, kw) if callable(self.out) else getattr(self.net(**kw), self.out)


@pytest.mark.parametrize("family", list(POOLED))
def test_pooling_at_positions_computed_from_the_ids(family, tmp_path):
    """A decoder's sequence classifier (the logits at each row's last non-padding token, found from the ids) and
    CLIP's text model (the end-of-text token's state, at the ids' arg-max): a Gather (GatherND) whose indices are
    computed from the ids, read at run time. Oracle: the relevance equals that of the same weights' output at every
    position, seeded at each row's pooled position with the pooled model's seed (both exporters)."""
    import onnx
    import transformers

    model, config, kwargs, per_position = POOLED[family]
    cfg = getattr(transformers, config)(**kwargs)
    cfg._attn_implementation = "eager"
    net = getattr(transformers, model)(cfg)
    _randomize(net.eval())
    ids = np.random.default_rng(6).integers(3, V - 1, (2, T)).astype(np.int64)
    mask = np.ones((2, T), np.int64)
    if family == "qwen2cls":  # (the second row padded at its end: its last token is one earlier)
        ids[1, -1], mask[1, -1], at = 0, 0, [T - 1, T - 2]
    else:  # (the end-of-text token, the highest id)
        at = [3, T - 1]
        ids[np.arange(2), at] = V - 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    for exporter in ("legacy17", "dynamo18"):
        got = {}
        for name, out in (("pooled", "logits" if family == "qwen2cls" else "text_embeds"), ("every", per_position)):
            module = _Named(net, out)
            module.names = list(feeds)
            export(module, feeds, tmp_path / f"{name}-{exporter}.onnx", exporter)
            got[name] = lrpc.Session(lrpc.compile(str(tmp_path / f"{name}-{exporter}.onnx"), "attnlrp"))
        exported = onnx.load(str(tmp_path / f"pooled-{exporter}.onnx"))
        consts = {i.name for i in exported.graph.initializer} | {o for n in exported.graph.node
                                                                 if n.op_type == "Constant" for o in n.output}
        picks = [n.op_type for n in exported.graph.node if n.op_type in ("Gather", "GatherND")
                 and n.input[1] not in consts and "embed" not in n.name and "Shape" not in n.input[0]]
        assert picks, exporter  # (the pooling: indices computed in the graph)
        pooled = got["pooled"].explain(**feeds, target="top1")
        seed = np.zeros(got["every"].run(feeds, np.zeros((2, T, pooled.seed.shape[1]), np.float32))["out"].shape,
                        np.float32)
        seed[np.arange(2), at] = pooled.seed
        each = got["every"].explain(**feeds, seed=seed)
        assert rel_l2(each.output[np.arange(2), at], pooled.output) < 1e-5
        assert np.any(pooled.relevance) and rel_l2(pooled.relevance, each.relevance) < 1e-5, exporter

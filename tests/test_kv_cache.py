"""Decoders with a key/value cache: Hugging Face ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` exported taking
``input_ids`` [B, T], ``attention_mask`` [B, P + T] and ``past_key_values.{layer}.{key,value}`` (the cache of P
earlier tokens, float inputs), returning the logits of the T new positions, with both exporters. The cache is a
constant for the rules (never explained, though a float input): relevance goes to the new tokens only.

Oracle: relevance per new token = Σ_hidden gradient × input of the word embedding in the decoder's forward with the
rules' tensors detached and the same cache concatenated before the new keys and values (tests/test_decoder.py),
float32, 1e-4 relative L2; the forward's logits are the model's with that cache; the two exports agree."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import lrpc
from conftest import rel_l2, report_line
from test_decoder import EXPORTS
from test_token_decoders import MODELS, exported_decoders

P, T, V = 4, 3, 100
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _cache(net):
    """Per layer (keys, values) of the model's own cache after a random prefix of P tokens."""
    torch = pytest.importorskip("torch")

    prefix = torch.from_numpy(np.random.default_rng(7).integers(0, V, (2, P)))
    with torch.no_grad():
        cache = net(input_ids=prefix, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def _feeds(net) -> dict:
    """The new ids, the mask over the cached and the new tokens (the second sample's first cached token padding, as
    after left padding) and the cache, by input name."""
    rng = np.random.default_rng(5)
    mask = np.ones((2, P + T), np.int64)
    mask[1, 0] = 0
    feeds = {"input_ids": rng.integers(0, V, (2, T)).astype(np.int64), "attention_mask": mask}
    for i, (k, v) in enumerate(_cache(net)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    return feeds


def _past(feeds):
    torch = pytest.importorskip("torch")

    layers = len([k for k in feeds if k.endswith(".key")])
    return [(torch.from_numpy(feeds[f"past_key_values.{i}.key"]), torch.from_numpy(feeds[f"past_key_values.{i}.value"]))
            for i in range(layers)]


def _plain(net, feeds):
    """The model's own logits [B, T, V] for the new tokens after the cache."""
    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    cache = DynamicCache(_past(feeds), config=net.config)
    with torch.no_grad():
        return net(input_ids=torch.from_numpy(feeds["input_ids"]), past_key_values=cache, use_cache=True,
                   attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()


def export_with_cache(net, path, exporter: str) -> onnx.ModelProto:
    """``net`` exported taking (input_ids, attention_mask, past_key_values.*), returning the new logits."""
    import warnings

    torch = pytest.importorskip("torch")
    from transformers import DynamicCache

    feeds = _feeds(net)
    layers = len(_past(feeds))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids, mask, *past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=net.config)
            return self.net(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits

    kw, names = EXPORTS[exporter], list(feeds)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            torch.onnx.export(Logits().eval(), args, dynamo=True, opset_version=kw["opset"], input_names=names,
                              output_names=["logits"]).save(str(path), external_data=False)
        else:
            torch.onnx.export(Logits().eval(), args, str(path), dynamo=False, opset_version=kw["opset"],
                              input_names=names, output_names=["logits"])
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def cached_decoders(tmp_path_factory):
    return exported_decoders(tmp_path_factory, "kv-cache", export_with_cache)


def _reference(name, net, feeds, mode, seed):
    """(new logits, Σ_hidden gradient × input of the new tokens' word embedding) of the detach-reference forward
    after the cache, for the LRP seed ``seed``."""
    torch = pytest.importorskip("torch")

    _, forward, embedding = MODELS[name]
    word = embedding(net)(torch.from_numpy(feeds["input_ids"])).detach().requires_grad_(True)
    logits = forward(net, word, mode, mask=torch.from_numpy(feeds["attention_mask"]), last=False, past=_past(feeds))
    (logits * (torch.from_numpy(seed) / logits.detach())).sum().backward()
    return logits.detach().numpy(), (word.grad * word).sum(-1).detach().numpy()


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_cache_is_a_constant_and_the_new_tokens_are_explained(cached_decoders, name, composite):
    """The compiled model explains input_ids (output relevance_tokens [B, T], nothing for the cache);
    Session.explain takes the cache as extra inputs by name; target ``next`` seeds the last new position; relevance
    per new token = the detach reference with the same cache; the two exports agree."""
    got = {}
    for exporter in EXPORTS:
        net, model = cached_decoders[name, exporter]
        feeds = _feeds(net)
        compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
        assert [o.name for o in compiled.graph.output] == ["logits", "relevance_tokens"]
        e = lrpc.Session(compiled).explain(**feeds, target="next")
        plain = _plain(net, feeds)
        assert e.output.shape == (2, T, V) and rel_l2(e.output, plain) < 1e-4
        want_seed = np.zeros((2, T, V), np.float32)
        want_seed[[0, 1], T - 1, plain[:, T - 1].argmax(-1)] = 1.0
        assert np.array_equal(e.seed, want_seed)
        logits, want = _reference(name, net, feeds, composite, want_seed)
        assert rel_l2(logits, plain) < 1e-5  # (the reference forward is the model's, cache included)
        assert e.relevance.shape == (2, T)
        err = rel_l2(e.relevance, want)
        report_line(f"{name} kv-cache {exporter} {composite} next: relevance per new token vs detach reference "
                    f"rel L2 {err:.1e} (float32)")
        assert err < 1e-4
        got[exporter] = e.relevance
    assert rel_l2(got["legacy17"], got["dynamo18"]) < 1e-4


def test_cli_explain_tokens_with_a_cache(cached_decoders, tmp_path):
    """``lrpc explain llama.onnx --tokens ids.npz``: the .npz holds input_ids and the cache (the mask defaults to
    ones over the cached and the new tokens); a continuation of the new tokens is explained as the reference's."""
    import json

    from cli_helpers import one_line_error, run_cli

    net, model = cached_decoders["llama", "dynamo18"]
    feeds = _feeds(net)
    onnx.save(model, tmp_path / "llama.onnx")
    np.savez(tmp_path / "ids.npz", **{k: v for k, v in feeds.items() if k != "attention_mask"})
    code, out, err = run_cli("explain", tmp_path / "llama.onnx", "--tokens", tmp_path / "ids.npz", "--rules",
                             "cp-lrp", "--epsilon", "0", "--stabilizer-eps", "0", "--target", "continuation:2",
                             "--no-cache", "-o", tmp_path / "rel.json")
    assert code == 0, err
    data = json.loads((tmp_path / "rel.json").read_text())
    seed = np.zeros((2, T, V), np.float32)
    for p in (T - 3, T - 2):
        seed[[0, 1], p, feeds["input_ids"][:, p + 1]] = 1.0
    feeds["attention_mask"][:] = 1
    _, want = _reference("llama", net, feeds, "cp-lrp", seed)
    assert [s["ids"] for s in data["samples"]] == feeds["input_ids"].tolist()
    assert rel_l2(np.array([s["relevance"] for s in data["samples"]]), want) < 1e-4
    np.savez(tmp_path / "no-cache.npz", input_ids=feeds["input_ids"])
    code, _, err = run_cli("explain", tmp_path / "llama.onnx", "--tokens", tmp_path / "no-cache.npz", "--no-cache",
                           "-o", tmp_path / "x.json")
    one_line_error(code, err, contains="no array for the key/value cache input 'past_key_values.0.key'")

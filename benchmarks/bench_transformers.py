"""Compiled transformer LRP (attnlrp, cp-lrp) vs the plain forward (onnxruntime) and vs the torch detach reference
of the same rules, measured in one run.

    python benchmarks/bench_transformers.py --memory        # ViT-B/16 batch 1 and 8, BERT-base and a ~100M Llama
                                                            # at sequence 128 and 512, 2 threads (the docs' table)
    python benchmarks/bench_transformers.py --models bert --sizes 128 --composites attnlrp --repeats 5

Models (random weights, seeded; exported with the legacy exporter at opset 17 to a cache folder, one file per
size): torchvision ViT-B/16 (healthy random weights, models/healthy.py; explained: the pixels, target: each
sample's top-1 logit), Hugging Face ``BertForSequenceClassification`` at BERT-base size (token ids, attention
mask, token types; relevance per token; top-1 logit) and a ``LlamaForCausalLM`` of ~100M parameters (8 layers,
width 768, grouped-query attention, SwiGLU, RMSNorm, RoPE; token ids; the last position's top logit: the export
returns that position's logits). Text models run at batch 1.

Per model and size, rounds of the forward and each compiled graph (forward + relevance in one onnxruntime run) in
turn, then rounds of each torch reference and the torch gradient (plain gradient x input, no rule: the least an
autograd LRP costs) in turn (torch apart: its threads keep spinning after a run and slowed the onnxruntime run
after it); medians are reported; column ``rel err``: the compiled relevance against the torch reference's. The torch
reference is the rules written as a forward with the tensors a rule holds constant detached (LayerNorm's sigma,
RMSNorm's 1/rms, each activation's f(x)/x, one factor of each attention product, or under cp-lrp the attention
probabilities and the gate), then backward and gradient x input at the explained tensor: the formulation of the
``lxt`` package (which does not import with transformers 5), at the same thread count. Memory (``--memory``): peak
resident memory of a child process that creates the session (or builds the torch model) and runs it once
(benchmarks/bench_lrp.py). Needs the test extras (torch, torchvision, transformers)."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))

import bench_lrp  # noqa: E402

SIZES = {"vit": [1, 8], "bert": [128, 512], "llama": [128, 512]}
TINY_SIZES = {"vit": [1, 2], "bert": [8, 16], "llama": [8, 16]}
TINY = {"vit": dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
        "bert": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64),
        "llama": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)}
FULL = {"vit": dict(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
        "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512),
        "llama": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=1024)}


# ------------------------------------------------------------------------------------------------ models and inputs
def _unit_scale(net) -> None:
    """Unit-scale activations for a text model: fan-in scaled weights, embeddings N(0, 1), biases of both signs,
    norm scales around 1 (the constructors' 0.02 init would leave tiny logits and relevance near subnormals)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.3 * r)
            elif "embed" in name and p.dim() == 2:
                p.copy_(r)
            elif p.dim() == 2:
                p.copy_(r / np.sqrt(p.shape[1]))
            else:
                p.copy_(1.0 + 0.3 * r)


def build(name: str, tiny: bool = False):
    """The torch model ``name`` (eval mode, seeded random weights)."""
    import torch

    torch.manual_seed(0)
    cfg = (TINY if tiny else FULL)[name]
    if name == "vit":
        from torchvision.models import VisionTransformer

        from models.healthy import make_healthy

        net = VisionTransformer(**cfg, num_classes=10 if tiny else 1000)
        x = torch.from_numpy(inputs(name, 1, tiny)["input"])
        return make_healthy(net, x, extra=3 if tiny else 7)
    import transformers

    if name == "bert":
        net = transformers.BertForSequenceClassification(
            transformers.BertConfig(**cfg, num_labels=3, attn_implementation="eager"))
    else:
        # eager attention: the legacy exporter has no scaled_dot_product_attention with grouped-query attention
        net = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="eager"))
    _unit_scale(net)
    return net.eval()


def _last_logits(net):
    """Token ids -> the logits of the last position (the LM head applied there only, as in generation)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids):
            return self.net(input_ids=input_ids, logits_to_keep=1).logits[:, -1]

    return Wrapped().eval()


def inputs(name: str, size: int, tiny: bool = False) -> dict:
    """The feeds of model ``name`` at ``size`` (batch for the ViT, sequence length for the text models)."""
    rng = np.random.default_rng(0)
    if name == "vit":
        s = (TINY if tiny else FULL)["vit"]["image_size"]
        return {"input": rng.uniform(-2, 2, (size, 3, s, s)).astype(np.float32)}
    ids = rng.integers(0, (TINY if tiny else FULL)[name]["vocab_size"], (1, size)).astype(np.int64)
    if name == "llama":
        return {"input_ids": ids}
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def export(name: str, size: int, cache: Path, tiny: bool = False, net=None) -> Path:
    """The legacy-exporter (opset 17) export of ``name`` at ``size`` (static shapes), cached."""
    import torch

    tag = f"{name}{'-tiny' if tiny else ''}"
    path = cache / f"{tag}-{size}.onnx"
    if path.exists():
        return path
    net = net if net is not None else build(name, tiny)
    feeds = inputs(name, size, tiny)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    module = _last_logits(net) if name == "llama" else net
    tmp = path.with_suffix(".part")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=17, input_names=list(feeds),
                          output_names=["logits"])
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------- torch detach references
def _layer_norm(norm, x):
    """LayerNorm with its standard deviation held constant."""
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
    y = (x - mu) / sigma.detach() * norm.weight
    return y if norm.bias is None else y + norm.bias


def _product(a, b, composite):
    """A product of two computed tensors: split 50/50 (attnlrp) or ``a`` held constant (cp-lrp)."""
    return a.detach() @ b if composite == "cp-lrp" else 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


def _act(f, h):
    """An activation under the identity rule: f(x)/x held constant (0 where x = 0: f(0) = 0 there)."""
    return h * (f(h) / (h + (h == 0).to(h.dtype))).detach()


def _vit_forward(net, x, composite):
    from torch import nn
    from torch.nn import functional as F

    def attention(m, x):
        n, t, d = x.shape
        h = m.num_heads
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = (0.5 * (q @ k.transpose(-2, -1).detach()) + 0.5 * (q.detach() @ k.transpose(-2, -1))) * (d // h) ** -0.5
        return m.out_proj(_product(a.softmax(-1), v, composite).transpose(1, 2).reshape(n, t, d))

    import torch

    n = x.shape[0]
    x = net.conv_proj(x).reshape(n, net.hidden_dim, -1).permute(0, 2, 1)
    x = torch.cat([net.class_token.expand(n, -1, -1), x], dim=1) + net.encoder.pos_embedding
    for blk in net.encoder.layers:
        x = x + attention(blk.self_attention, _layer_norm(blk.ln_1, x))
        x = x + blk.mlp[3](_act(F.gelu, blk.mlp[0](_layer_norm(blk.ln_2, x))))
    assert isinstance(net.heads.head, nn.Linear)
    return net.heads(_layer_norm(net.encoder.ln, x)[:, 0])


def _bert_forward(net, word, feeds, composite):
    import torch
    from torch.nn import functional as F

    mask, types = (torch.from_numpy(feeds[k]) for k in ("attention_mask", "token_type_ids"))
    emb, (n, t) = net.bert.embeddings, mask.shape
    x = _layer_norm(emb.LayerNorm, word + emb.position_embeddings.weight[:t] + emb.token_type_embeddings(types))
    add = torch.where(mask[:, None, None, :].bool(), 0.0, torch.finfo(torch.float32).min)
    for layer in net.bert.encoder.layer:
        att = layer.attention.self
        h, d = att.num_attention_heads, att.attention_head_size

        def heads(y):
            return y.reshape(n, t, h, d).transpose(1, 2)

        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        kt = k.transpose(-1, -2)
        a = ((0.5 * (q @ kt.detach()) + 0.5 * (q.detach() @ kt)) * d ** -0.5 + add).softmax(-1)
        o = _product(a, v, composite).transpose(1, 2).reshape(n, t, h * d)
        x = _layer_norm(layer.attention.output.LayerNorm, layer.attention.output.dense(o) + x)
        y = _act(F.gelu, layer.intermediate.dense(x))
        x = _layer_norm(layer.output.LayerNorm, layer.output.dense(y) + x)
    return net.classifier(_act(torch.tanh, net.bert.pooler.dense(x[:, 0])))


def _llama_forward(net, e, composite):
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    cfg, m = net.config, net.model
    n, t, d = e.shape
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // heads

    def rms(norm, x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach())

    cos, sin = m.rotary_emb(e, torch.arange(t)[None])
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    x = e
    for layer in m.layers:
        at, h = layer.self_attn, rms(layer.input_layernorm, x)
        q = at.q_proj(h).view(n, t, heads, hd).transpose(1, 2)
        k = at.k_proj(h).view(n, t, kv, hd).transpose(1, 2)
        v = at.v_proj(h).view(n, t, kv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, heads // kv), repeat_kv(v, heads // kv)
        kt = k.transpose(-2, -1)
        s = (0.5 * (q @ kt.detach()) + 0.5 * (q.detach() @ kt)) * hd ** -0.5
        o = _product(s.masked_fill(causal, float("-inf")).softmax(-1), v, composite)
        x = x + at.o_proj(o.transpose(1, 2).reshape(n, t, d))
        mlp, h = layer.mlp, rms(layer.post_attention_layernorm, x)
        act, up = _act(torch.nn.functional.silu, mlp.gate_proj(h)), mlp.up_proj(h)
        prod = act.detach() * up if composite == "cp-lrp" else 0.5 * (act * up.detach()) + 0.5 * (act.detach() * up)
        x = x + mlp.down_proj(prod)
    return net.lm_head(rms(m.norm, x[:, -1:]))[:, -1]


def torch_reference(name: str, net, feeds: dict, composite: str):
    """A callable: one torch detach-reference explanation of the top-1 logit (forward, backward, gradient x input
    at the pixels or, summed over the hidden dim, at the token embedding). Returns the relevance as numpy."""
    import torch

    def run():
        if name == "vit":
            x = torch.from_numpy(feeds["input"]).requires_grad_(True)
            y = _vit_forward(net, x, composite)
        else:
            emb = net.bert.embeddings.word_embeddings if name == "bert" else net.model.embed_tokens
            x = emb(torch.from_numpy(feeds["input_ids"])).detach().requires_grad_(True)
            y = _bert_forward(net, x, feeds, composite) if name == "bert" else _llama_forward(net, x, composite)
        y.gather(1, y.argmax(1, keepdim=True)).sum().backward()
        r = (x.grad * x).detach()
        return (r if name == "vit" else r.sum(-1)).numpy()

    return run


def torch_gradient(name: str, net, feeds: dict):
    """A callable: plain gradient x input of the top-1 logit in torch (no rule): the least any autograd LRP costs."""
    import torch

    def run():
        if name == "vit":
            x = torch.from_numpy(feeds["input"]).requires_grad_(True)
            y = net(x)
        else:
            x = net.get_input_embeddings()(torch.from_numpy(feeds["input_ids"])).detach().requires_grad_(True)
            kw = {k: torch.from_numpy(v) for k, v in feeds.items() if k != "input_ids"}
            if name == "llama":
                kw["logits_to_keep"] = 1
            y = net(inputs_embeds=x, **kw).logits
            y = y[:, -1] if y.dim() == 3 else y
        y.gather(1, y.argmax(1, keepdim=True)).sum().backward()
        return (x.grad * x).detach()

    return run


def top1_seed(logits: np.ndarray) -> np.ndarray:
    """Each sample's top-1 logit, the others 0: the relevance at the output that gradient x input starts from."""
    k = (np.arange(len(logits)), logits.argmax(1))
    seed = np.zeros(logits.shape, np.float32)
    seed[k] = logits[k]
    return seed


# ---------------------------------------------------------------------------------------------------------- running
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def torch_memory_mb(name: str, size: int, composite: str, tiny: bool, threads: int) -> float:
    """Peak resident memory of a child that builds the torch model and runs one reference explanation."""
    return bench_lrp.peak_memory_mb(
        "import bench_transformers as bt, torch\n"
        f"torch.set_num_threads({threads})\n"
        f"net = bt.build({name!r}, {tiny!r})\n"
        f"bt.torch_reference({name!r}, net, bt.inputs({name!r}, {size}, {tiny!r}), {composite!r})()", "cpu")


def header(threads: int) -> str:
    import onnx
    import onnxruntime
    import torch
    import torchvision
    import transformers

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                   text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return (f"# {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  {cpu}, "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, {threads} threads (onnxruntime and torch)\n"
            f"# torch {torch.__version__}, torchvision {torchvision.__version__}, transformers "
            f"{transformers.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"python {platform.python_version()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert,llama,vit")
    ap.add_argument("--sizes", help="comma-separated sizes for every model (default: ViT batch 1,8; text 128,512)")
    ap.add_argument("--composites", default="attnlrp,cp-lrp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS in child processes")
    ap.add_argument("--default-session", action="store_true", help="run the compiled graphs in lrpc.Session's "
                    "default session (weights prepacked, onnxruntime's reuse plan); here: low_memory=True")
    ap.add_argument("--tiny", action="store_true", help="tiny configurations (a smoke test of this script)")
    ap.add_argument("--cache", default=os.environ.get("LRPC_BENCH_CACHE", "/tmp/bench"))
    args = ap.parse_args(argv)

    import onnxruntime
    import torch

    import lrpc
    from lrpc.runtime import inference_session

    onnxruntime.set_default_logger_severity(3)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    composites = args.composites.split(",")
    print(header(args.threads))
    print(f"# median of {args.repeats} rounds (forward and each compiled graph in turn, then each torch reference "
          "and the torch gradient in turn); rel err: compiled vs torch reference relevance; grad: torch gradient x "
          "input (no rule); memory: peak RSS of a child process (MiB; torch: the attnlrp reference); compiled "
          f"graphs in {'the default session' if args.default_session else 'a low_memory session'}")
    print(f"{'model':6s} {'size':>4s} {'composite':9s} {'fwd ms':>8s} {'lrp ms':>8s} {'lrp/fwd':>7s} "
          f"{'torch ms':>8s} {'torch/lrp':>9s} {'rel err':>7s} {'grad ms':>8s} {'compile s':>9s} {'nodes':>6s} "
          f"{'fwd nodes':>9s} {'lrp MiB':>7s} {'fwd MiB':>7s} {'mem x':>5s} {'torch MiB':>9s}", flush=True)
    for name in args.models.split(","):
        net = None if args.no_torch else build(name, args.tiny)
        for size in map(int, args.sizes.split(",")) if args.sizes else (TINY_SIZES if args.tiny else SIZES)[name]:
            path = export(name, size, cache, args.tiny, net)
            feeds = inputs(name, size, args.tiny)
            fwd = inference_session(path, ["CPUExecutionProvider"], args.threads)
            seed = top1_seed(fwd.run(None, feeds)[0])
            runs, compiled, sessions = [lambda: fwd.run(None, feeds)], {}, []
            for c in composites:
                lrp_path = cache / f"{path.stem}.{c}.lrp.onnx"
                t0 = time.perf_counter()
                proto = lrpc.compile(path, c)
                compile_s = time.perf_counter() - t0
                lrp_path.write_bytes(proto.SerializeToString())
                sess = inference_session(lrp_path, ["CPUExecutionProvider"], args.threads,
                                         low_memory=not args.default_session)
                sessions.append(sess)
                lrp_feeds = {**feeds, "relevance_seed": seed}
                compiled[c] = (lrp_path, lrp_feeds, compile_s, len(proto.graph.node))
                del proto
                runs.append(lambda s=sess, f=lrp_feeds: s.run(None, f))
            if net is not None:
                runs += [torch_reference(name, net, feeds, c) for c in composites] + [torch_gradient(name, net, feeds)]
            # onnxruntime's runs take turns in their rounds, then torch's in theirs (after a torch run its worker
            # threads keep spinning a while and slow whatever runs next); each first runs once unmeasured
            # (onnxruntime's first run allocates and plans; torch's first backward initialises autograd)
            times = [[] for _ in runs]
            for group in (range(1 + len(composites)), range(1 + len(composites), len(runs))):
                for i in group:
                    runs[i]()
                for _ in range(args.repeats):
                    for i in group:
                        times[i].append(timed(runs[i]))
            ms = [1e3 * statistics.median(t) for t in times]
            errs = {}  # the compiled relevance against the torch reference's (the same rules?)
            if net is not None:
                for i, c in enumerate(composites):
                    out = dict(zip([o.name for o in sessions[i].get_outputs()], runs[1 + i]()))
                    got = out.get("relevance", out.get("relevance_tokens"))
                    want = runs[1 + len(composites) + i]()
                    errs[c] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            fwd_nodes = len(__import__("onnx").load(str(path), load_external_data=False).graph.node)
            for i, c in enumerate(composites):
                lrp_path, lrp_feeds, compile_s, nodes = compiled[c]
                f_ms, l_ms = ms[0], ms[1 + i]
                t_ms = ms[1 + len(composites) + i] if net is not None else None
                mem = ""
                if args.memory:
                    fp, lp = cache / "feeds_fwd.npz", cache / "feeds_lrp.npz"
                    np.savez(fp, **feeds)
                    np.savez(lp, **lrp_feeds)
                    lm = bench_lrp.onnxruntime_memory_mb(lrp_path, lp, args.threads, "cpu", not args.default_session)
                    fm = bench_lrp.onnxruntime_memory_mb(path, fp, args.threads, "cpu")
                    tm = None if net is None or i else torch_memory_mb(name, size, c, args.tiny, args.threads)
                    mem = f" {lm:7.0f} {fm:7.0f} {lm / fm:5.2f} " + (f"{tm:9.0f}" if tm else f"{'-':>9s}")
                ts = (f"{t_ms:8.1f} {t_ms / l_ms:9.2f} {errs[c]:7.1e} {ms[-1]:8.1f}" if t_ms
                      else f"{'-':>8s} {'-':>9s} {'-':>7s} {'-':>8s}")
                print(f"{name:6s} {size:4d} {c:9s} {f_ms:8.1f} {l_ms:8.1f} {l_ms / f_ms:7.2f} {ts} {compile_s:9.1f} "
                      f"{nodes:6d} {fwd_nodes:9d}{mem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

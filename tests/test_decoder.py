"""Decoder blocks (Llama, GPT-2) under AttnLRP and CP-LRP: gated MLPs (SwiGLU), RMSNorm, RoPE, grouped-query
attention, GPT-2's fused QKV (Split) and gelu_new, causal masks.

Per op, float64, against the formulas (onnx's ReferenceEvaluator): SwiGLU's product ``silu(a) ⊙ b`` splits 50/50
under attnlrp and gives all to ``b`` under cp-lrp and the CNN composites (the factor through the activation is the
gate); SiLU's own ``x ⊙ sigmoid(x)`` stays one activation (identity, not split); a written-out RMSNorm is the
identity over the layer. End to end: Hugging Face ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` from tiny configs
(random weights and biases), wrapped to take ``inputs_embeds`` and return the last position's logits, exported with
both exporters and compiled with attnlrp and cp-lrp: relevance at ``inputs_embeds`` = gradient × input of the forward
with the rules' tensors detached (1e-4 relative L2 in float32; in float64 as far as the export's own forward agrees),
and CP-LRP on a bias-free Llama conserves."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import lrpc
from conftest import rel_l2, report_line, run_onnx
from detach_rules import layer_norm, split_matmul


def _model(nodes, inputs, output, shape, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, s) for n, s in inputs],
                          [helper.make_tensor_value_info(output, TensorProto.DOUBLE, shape)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _run64(model, feeds):
    sess = ReferenceEvaluator(model)
    return dict(zip(sess.output_names, sess.run(None, feeds)))


def _swiglu():
    """y = silu(a) ⊙ b, SiLU written as a ⊙ sigmoid(a) (as exporters write it)."""
    nodes = [helper.make_node("Sigmoid", ["a"], ["sa"]), helper.make_node("Mul", ["a", "sa"], ["act"]),
             helper.make_node("Mul", ["act", "b"], ["y"], name="gate")]
    return _model(nodes, [("a", [2, 3, 4]), ("b", [2, 3, 4])], "y", [2, 3, 4])


@pytest.mark.parametrize("composite,share_a", [("attnlrp", 0.5), ("cp-lrp", 0.0), ("epsilon-gamma-box", 0.0)])
def test_gated_mlp_product_split_or_signal(composite, share_a):
    """attnlrp: R_a = R_b = R / 2 (through SiLU's identity); cp-lrp and the CNN composites: the factor through the
    activation is the gate, b gets all."""
    rng = np.random.default_rng(0)
    a, b, R = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    compiled = lrpc.compile(_swiglu(), composite, epsilon=0.05)
    got = _run64(compiled, {"a": a, "b": b, "relevance_seed": R})
    assert rel_l2(got["relevance_b"], (1.0 - share_a) * R) < 1e-12
    if share_a:
        assert rel_l2(got["relevance_a"], share_a * R) < 1e-12
    else:
        assert not np.any(got["relevance_a"])
    rule = "split" if composite == "attnlrp" else "pass"
    assert f'"gate": "{rule}"' in next(p.value for p in compiled.metadata_props if p.key == "lrpc.rules")


def test_silu_product_stays_one_activation_under_attnlrp():
    """x ⊙ sigmoid(x) is SiLU (identity: R_x = R), not a gated product split 50/50."""
    rng = np.random.default_rng(1)
    m = _model([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
               [("x", [2, 5])], "y", [2, 5])
    x, R = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    for composite in ("attnlrp", "cp-lrp"):
        got = _run64(lrpc.compile(m, composite, epsilon=0.05), {"x": x, "relevance_seed": R})
        assert rel_l2(got["relevance"], R) < 1e-12


def test_product_of_two_non_gates_splits_under_attnlrp_and_is_refused_otherwise():
    """relu(a) ⊙ tanh(b): no gate to name; attnlrp splits it, a CNN composite refuses it as before."""
    nodes = [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Tanh", ["b"], ["nb"]),
             helper.make_node("Mul", ["ra", "nb"], ["y"], name="prod")]
    m = _model(nodes, [("a", [2, 4]), ("b", [2, 4])], "y", [2, 4])
    rng = np.random.default_rng(2)
    a, b, R = (rng.standard_normal((2, 4)) for _ in range(3))
    got = _run64(lrpc.compile(m, "attnlrp"), {"a": a, "b": b, "relevance_seed": R})
    assert rel_l2(got["relevance_a"], R / 2) < 1e-12
    with pytest.raises(lrpc.UnsupportedError, match="prod"):
        lrpc.compile(m, "epsilon-gamma-box")


@pytest.mark.parametrize("form", ["reciprocal", "div", "pow"])
def test_written_out_rmsnorm_is_the_identity(form):
    """w ⊙ x / sqrt(mean(x²) + eps) (Pow or Mul for the square, Reciprocal then Mul, or one Div): R_x = R under
    attnlrp (the weight's Mul: epsilon, the identity at epsilon 0); no propagator needed inside."""
    w = numpy_helper.from_array(np.linspace(0.5, 1.5, 6), "w")
    eps, two = numpy_helper.from_array(np.array(1e-6), "eps"), numpy_helper.from_array(np.array(2.0), "two")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    sq = helper.make_node("Pow", ["x", "two"], ["sq"]) if form == "pow" else helper.make_node("Mul", ["x", "x"], ["sq"])
    nodes = [sq, helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"])]
    if form == "div":
        nodes += [helper.make_node("Div", ["x", "rms"], ["n"])]
    else:
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"])]
    nodes += [helper.make_node("Mul", ["n", "w"], ["y"])]
    m = _model(nodes, [("x", [2, 3, 6])], "y", [2, 3, 6], [w, eps, two, axes])
    m.opset_import[0].version = 18
    rng = np.random.default_rng(3)
    x, R = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))
    for composite in ("attnlrp", "cp-lrp"):
        got = _run64(lrpc.compile(m, composite, epsilon=0.0, stabilizer_eps=0.0), {"x": x, "relevance_seed": R})
        assert rel_l2(got["relevance"], R) < 1e-12


def test_rmsnormalization_op_is_the_identity():
    """ONNX's RMSNormalization (opset 23) followed by a Gemm: R_x = the Gemm's epsilon relevance at the norm's
    output, unchanged."""
    rng = np.random.default_rng(4)
    scale = numpy_helper.from_array(1.0 + 0.3 * rng.standard_normal(6), "scale")
    w = numpy_helper.from_array(rng.standard_normal((6, 3)), "w")
    m = _model([helper.make_node("RMSNormalization", ["x", "scale"], ["n"], axis=-1, epsilon=1e-6),
                helper.make_node("MatMul", ["n", "w"], ["y"])], [("x", [4, 6])], "y", [4, 3], [scale, w])
    m.opset_import[0].version = 23
    m.ir_version = 10
    x, R = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    got = _run64(lrpc.compile(m, "attnlrp", epsilon=0.0, stabilizer_eps=0.0), {"x": x, "relevance_seed": R})
    n = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * numpy_helper.to_array(scale)
    wv = numpy_helper.to_array(w)
    assert rel_l2(got["relevance"], n * ((R / (n @ wv)) @ wv.T)) < 1e-10


# ------------------------------------------------------------------------------------------- end to end (transformers)
GRAD_TOL = 1e-4
CONSERVE_TOL = 1e-4
EXPORTS = {"legacy17": {"dynamo": False, "opset": 17}, "dynamo18": {"dynamo": True, "opset": 18}}
T, D = 5, 32


def _randomize(net) -> None:
    """Unit-scale activations: fan-in scaled weights, biases of both signs, norm scales around 1."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif p.dim() > 1:
                fan_in = p.shape[0] if "transformer.h." in name else p.shape[-1]  # (GPT-2's Conv1D: [in, out])
                p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))


def _llama(bias: bool = True, eager: bool = False):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, max_position_embeddings=64, attention_bias=bias,
                      mlp_bias=bias)
    if eager:  # (the legacy exporter has no scaled_dot_product_attention with grouped-query attention)
        cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    net = LlamaForCausalLM(cfg).eval()
    _randomize(net)
    return net


def _gpt2():
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).eval()
    _randomize(net)
    return net


def _mm(a, b, mode):
    return a @ b if mode is None else split_matmul(a, b)


def _causal(scores, mask=None):
    """Causal masking (-inf above the diagonal; with S - T cached keys before the T queries, above diagonal S - T),
    and of the keys where the padding ``mask`` [B, S] is 0."""
    torch = pytest.importorskip("torch")

    t, s = scores.shape[-2:]
    off = torch.ones(t, s, dtype=torch.bool).triu(1 + s - t)
    if mask is not None:
        off = off | (mask[:, None, None, :] == 0)
    return scores.masked_fill(off, float("-inf"))


def _llama_forward(net, e, mode, mask=None, last=True, past=None):
    """LlamaForCausalLM's forward on ``inputs_embeds``, last position's logits (``last``; else all), ``mask`` the
    padding mask [B, T] (or None; [B, P + T] with ``past``: per layer the cached (keys, values) [B, KV, P, hd] of P
    earlier tokens, constants), with the rules' tensors detached:
    RMSNorm's 1/rms, SiLU's f(x)/x, one factor of each product (attnlrp: both halves; cp-lrp: the probabilities and
    the gate constant)."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    cfg, m = net.config, net.model
    n, t, d = e.shape
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // heads

    def rms(norm, x):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach())

    start = 0 if past is None else past[0][0].shape[2]
    cos, sin = m.rotary_emb(e, torch.arange(start, start + t)[None])
    x = e
    for i, layer in enumerate(m.layers):
        at, h = layer.self_attn, rms(layer.input_layernorm, x)
        q = at.q_proj(h).view(n, t, heads, hd).transpose(1, 2)
        k = at.k_proj(h).view(n, t, kv, hd).transpose(1, 2)
        v = at.v_proj(h).view(n, t, kv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        k, v = repeat_kv(k, heads // kv), repeat_kv(v, heads // kv)
        a = _causal(_mm(q, k.transpose(-2, -1), mode) * hd ** -0.5, mask).softmax(-1)
        o = a.detach() @ v if mode == "cp-lrp" else _mm(a, v, mode)
        x = x + at.o_proj(o.transpose(1, 2).reshape(n, t, d))
        mlp, h = layer.mlp, rms(layer.post_attention_layernorm, x)
        g, u = mlp.gate_proj(h), mlp.up_proj(h)
        act = g * (torch.nn.functional.silu(g) / g).detach()
        prod = act.detach() * u if mode == "cp-lrp" else 0.5 * (act * u.detach()) + 0.5 * (act.detach() * u)
        x = x + mlp.down_proj(prod)
    logits = net.lm_head(rms(m.norm, x))
    return logits[:, -1] if last else logits


def _gpt2_forward(net, e, mode, mask=None, last=True, past=None):
    """GPT2LMHeadModel's forward on ``inputs_embeds`` (positions added), last position's logits (``last``; else all),
    ``mask`` the padding mask [B, T] (or None; [B, P + T] with ``past``: per layer the cached (keys, values)
    [B, H, P, hd] of P earlier tokens, constants), with the rules' tensors detached (LayerNorm's sigma, gelu_new's
    f(x)/x, one factor of each attention product)."""
    torch = pytest.importorskip("torch")
    from transformers.activations import NewGELUActivation

    m = net.transformer
    n, t, d = e.shape
    heads = net.config.n_head
    hd = d // heads
    gelu = NewGELUActivation()

    start = 0 if past is None else past[0][0].shape[2]
    x = e + m.wpe(torch.arange(start, start + t))[None]
    for i, blk in enumerate(m.h):
        q, k, v = blk.attn.c_attn(layer_norm(blk.ln_1, x)).split(d, dim=2)
        q, k, v = (z.view(n, t, heads, hd).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        a = _causal(_mm(q, k.transpose(-2, -1), mode) / hd ** 0.5, mask).softmax(-1)
        o = a.detach() @ v if mode == "cp-lrp" else _mm(a, v, mode)
        x = x + blk.attn.c_proj(o.transpose(1, 2).reshape(n, t, d))
        h = blk.mlp.c_fc(layer_norm(blk.ln_2, x))
        x = x + blk.mlp.c_proj(h * (gelu(h) / h).detach())
    logits = net.lm_head(layer_norm(m.ln_f, x))
    return logits[:, -1] if last else logits


def _wrapped(net):
    torch = pytest.importorskip("torch")

    class LastLogits(torch.nn.Module):
        """Takes ``inputs_embeds`` [B, T, D], returns the logits of the last position [B, V]."""

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, e):
            return self.net(inputs_embeds=e).logits[:, -1]

    return LastLogits().eval()


def _export(net, path, exporter: str, dtype=None):
    import warnings

    import onnx
    torch = pytest.importorskip("torch")

    kw = EXPORTS[exporter]
    e = torch.zeros(2, T, D, dtype=dtype or torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            torch.onnx.export(_wrapped(net), (e,), dynamo=True, opset_version=kw["opset"],
                              input_names=["inputs_embeds"], output_names=["logits"]).save(str(path),
                                                                                          external_data=False)
        else:
            torch.onnx.export(_wrapped(net), (e,), str(path), dynamo=False, opset_version=kw["opset"],
                              input_names=["inputs_embeds"], output_names=["logits"])
    return onnx.load(str(path))


def _reference(forward, net, e, mode):
    """(logits, seed = one-hot × the top-1 logit per sample, gradient × input of the top-1 logits' sum)."""
    torch = pytest.importorskip("torch")

    et = torch.from_numpy(e).requires_grad_(True)
    y = forward(net, et, mode)
    k = y.argmax(1)
    y.gather(1, k[:, None]).sum().backward()
    seed = np.zeros(tuple(y.shape), e.dtype)
    seed[np.arange(len(k)), k.numpy()] = y.detach().numpy()[np.arange(len(k)), k.numpy()]
    return y.detach().numpy(), seed, (et.grad * et).detach().numpy()


MODELS = {"llama": (_llama, _llama_forward), "gpt2": (_gpt2, _gpt2_forward)}


@pytest.fixture(scope="module")
def decoder_exports(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root, out = tmp_path_factory.mktemp("decoders"), {}
    for name, (build, _) in MODELS.items():
        for exporter in EXPORTS:
            net = build(eager=exporter == "legacy17") if name == "llama" else build()
            out[name, exporter] = net, _export(net, root / f"{name}-{exporter}.onnx", exporter)
    return out


@pytest.mark.parametrize("exporter", list(EXPORTS))
@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_matches_the_detach_reference(decoder_exports, name, exporter, composite):
    """Relevance at inputs_embeds of the compiled export = gradient × input of the forward with the rules' tensors
    detached (epsilon 0: the rules themselves), float32, 1e-4 relative L2."""
    torch = pytest.importorskip("torch")

    net, model = decoder_exports[name, exporter]
    e = np.random.default_rng(0).standard_normal((2, T, D)).astype(np.float32)
    with torch.no_grad():
        plain = _wrapped(net)(torch.from_numpy(e)).numpy()
    logits, seed, want = _reference(MODELS[name][1], net, e, composite)
    assert rel_l2(logits, plain) < 1e-5  # (the reference forward is the model's)
    compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
    got = run_onnx(compiled, {"inputs_embeds": e, "relevance_seed": seed})
    assert rel_l2(got["logits"], plain) < 1e-4
    err = rel_l2(got["relevance"], want)
    report_line(f"{name} {exporter} {composite}: relevance vs detach reference rel L2 {err:.1e} (float32)")
    assert err < GRAD_TOL


@pytest.mark.parametrize("exporter", list(EXPORTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_decoder_matches_the_detach_reference_in_float64(tmp_path, name, exporter):
    """The same in float64 (onnxruntime has the kernels GPT-2 and Llama need): the relevance agrees as far as the
    export's own forward does (Llama's exports keep its RoPE tables in float32: logits and relevance 1e-7;
    GPT-2's 1e-13 legacy, 1e-9 dynamo)."""
    torch = pytest.importorskip("torch")

    pytest.importorskip("transformers")
    build, forward = MODELS[name]
    net = (build(eager=exporter == "legacy17") if name == "llama" else build()).double()
    model = _export(net, tmp_path / "m.onnx", exporter, torch.float64)
    e = np.random.default_rng(0).standard_normal((2, T, D))
    tol = 1e-6 if name == "llama" else 1e-8
    for composite in ("attnlrp", "cp-lrp"):
        logits, seed, want = _reference(forward, net, e, composite)
        got = run_onnx(lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0),
                       {"inputs_embeds": e, "relevance_seed": seed})
        assert rel_l2(got["logits"], logits) < tol
        err = rel_l2(got["relevance"], want)
        report_line(f"{name} {exporter} {composite}: relevance vs detach reference rel L2 {err:.1e} (float64)")
        assert err < tol


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_bias_free_llama_cp_lrp_conserves(tmp_path, exporter):
    """CP-LRP on a Llama without biases: Σ relevance at inputs_embeds = the explained logit."""
    pytest.importorskip("transformers")
    net = _llama(bias=False, eager=exporter == "legacy17")
    model = _export(net, tmp_path / "m.onnx", exporter)
    e = np.random.default_rng(1).standard_normal((2, T, D)).astype(np.float32)
    _, seed, want = _reference(_llama_forward, net, e, "cp-lrp")
    got = run_onnx(lrpc.compile(model, "cp-lrp", epsilon=1e-9, stabilizer_eps=1e-9),
                   {"inputs_embeds": e, "relevance_seed": seed})
    sums = got["relevance"].reshape(2, -1).sum(1, dtype=np.float64)
    err = float(np.max(np.abs(sums - seed.sum(1)) / np.abs(seed.sum(1))))
    report_line(f"llama {exporter} cp-lrp bias-free: conservation rel error {err:.1e} (float32)")
    assert err < CONSERVE_TOL
    assert rel_l2(got["relevance"], want) < GRAD_TOL

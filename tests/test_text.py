"""Text encoders explained per token, explaining at a chosen tensor, and attention masks with -inf.

Token-id models (no float input) are explained at the word embedding (the Gather of a constant table by
``input_ids``): output ``relevance_tokens`` [B, T], the relevance arriving there summed over the hidden axis.
Oracle: a tiny Hugging Face BERT (random weights and biases), exported with both exporters with input_ids,
attention_mask (padding in one sample) and token_type_ids, compiled with attnlrp and cp-lrp: relevance per token =
Σ_hidden gradient × input of the word embedding in the BERT forward written out with the rule's tensors detached
(1e-4 relative L2, float32). Pure ONNX: -inf masks off the relevance path (a constant, an int mask input) are
accepted, -inf weights on it refused; ``explain_at`` against the model cut at that tensor."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from conftest import rel_l2, report_line, run_onnx
from detach_rules import layer_norm, split_matmul

EXPORTS = {"legacy17": {"dynamo": False, "opset": 17}, "dynamo18": {"dynamo": True, "opset": 18}}
T = 8


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, e, s) for n, e, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _masked_attention_model(mask_kind: str):
    """ids [2, 4] -> embedding e [2, 4, 6] (+ a position embedding by constant indices); scores = e eᵀ
    + mask; softmax; @ e; Σ over tokens; @ W -> y [2, 3]. The mask: a constant with -inf ("const") or built from an
    int input ``attention_mask`` by Where(mask, 0, -inf) ("input")."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((10, 6)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "pos_table"),
             numpy_helper.from_array(np.arange(4, dtype=np.int64), "pos_ids"),
             numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e0"]),
             helper.make_node("Gather", ["pos_table", "pos_ids"], ["p"]),
             helper.make_node("Add", ["e0", "p"], ["e"]),
             helper.make_node("Transpose", ["e"], ["et"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["e", "et"], ["scores"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["s"], axis=-1),
             helper.make_node("MatMul", ["s", "e"], ["ctx"]),
             helper.make_node("ReduceSum", ["ctx", "one"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["y"])]
    inputs = [("ids", TensorProto.INT64, [2, 4])]
    if mask_kind == "const":
        mask = np.zeros((1, 4, 4), np.float32)
        mask[..., 3] = -np.inf
        inits.append(numpy_helper.from_array(mask, "mask"))
    else:
        inputs.append(("attention_mask", TensorProto.INT64, [2, 4]))
        nodes[:0] = [helper.make_node("Cast", ["attention_mask"], ["mb"], to=TensorProto.BOOL),
                     helper.make_node("Unsqueeze", ["mb", "one"], ["mb3"]),
                     helper.make_node("Where", ["mb3", "zero", "ninf"], ["mask"])]
    return _model(nodes, inputs, [("y", [2, 3])], inits)


@pytest.mark.parametrize("mask_kind", ["const", "input"])
def test_minus_inf_masks_off_the_relevance_path_are_accepted(mask_kind):
    """-inf in a constant mask added to the scores, or in a mask branch built from an int input, compiles: masked
    keys get no relevance, everything is finite, the word embedding's relevance arrives per token. The relevance
    equals that of the same model with the -inf replaced by -1e30 (which lrpc accepted before)."""
    m = _masked_attention_model(mask_kind)
    feeds = {"ids": np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int64)}
    if mask_kind == "input":
        feeds["attention_mask"] = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.int64)
    compiled = lrpc.compile(m, "attnlrp")
    assert [o.name for o in compiled.graph.output] == ["y", "relevance_tokens"]
    seed = np.zeros((2, 3), np.float32)
    seed[:, 1] = 1.0
    got = run_onnx(compiled, {**feeds, "relevance_seed": seed})
    r = got["relevance_tokens"]
    assert r.shape == (2, 4) and np.all(np.isfinite(r)) and np.any(r[:, :3])
    finite = onnx.ModelProto.FromString(m.SerializeToString())
    for t in finite.graph.initializer:
        if t.name in ("mask", "ninf"):
            v = numpy_helper.to_array(t).copy()
            v[np.isinf(v)] = -1e30
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    want = run_onnx(lrpc.compile(finite, "attnlrp"), {**feeds, "relevance_seed": seed})["relevance_tokens"]
    assert rel_l2(r, want) < 1e-6


def test_minus_inf_weights_on_the_relevance_path_are_refused():
    """-inf in a weight relevance crosses (the final MatMul's, a Gemm after canonization) is refused in one line
    naming it and its user."""
    m = _masked_attention_model("const")
    w = next(t for t in m.graph.initializer if t.name == "W")
    v = numpy_helper.to_array(w).copy()
    v[0, 0] = -np.inf
    w.CopyFrom(numpy_helper.from_array(v, "W"))
    with pytest.raises(lrpc.InputError, match=r"used by node '\w+' \(Gemm\) holds 1 -inf value\(s\) where rel"):
        lrpc.compile(m, "attnlrp")


def _cnn():
    """x -> Conv -> Relu (h) -> Flatten -> Gemm -> y, and a side output z = Relu(x) that does not feed y."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32) / 8, "W"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["h"], name="relu"),
             helper.make_node("Flatten", ["h"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "bias"], ["y"], transB=1, name="fc"),
             helper.make_node("Relu", ["x"], ["z"], name="side")]
    return _model(nodes, [("x", TensorProto.FLOAT, [2, 2, 4, 4])], [("y", [2, 5]), ("z", [2, 2, 4, 4])], inits)


def test_explain_at_a_feature_map_equals_the_model_cut_there():
    """explain_at='h' (a CNN feature map): output ``relevance`` shaped like h, equal to the relevance of the tail
    model (h an input) fed with h."""
    m = _cnn()
    x = np.random.default_rng(2).standard_normal((2, 2, 4, 4)).astype(np.float32)
    seed = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    compiled = lrpc.compile(m, "epsilon", explain_at="h")
    rel = [o for o in compiled.graph.output if o.name == "relevance"]
    assert [d.dim_value for d in rel[0].type.tensor_type.shape.dim] == [2, 4, 4, 4]
    got = run_onnx(compiled, {"x": x, "relevance_seed": seed})
    tail = _model(m.graph.node[2:4], [("h", TensorProto.FLOAT, [2, 4, 4, 4])], [("y", [2, 5])],
                  [t for t in m.graph.initializer if t.name in ("W", "bias")])
    want = run_onnx(lrpc.compile(tail, "epsilon"), {"h": np.maximum(_conv(x, m), 0), "relevance_seed": seed})
    assert rel_l2(got["relevance"], want["relevance"]) < 1e-6


def _conv(x, m):
    cut = _model(m.graph.node[:1], [("x", TensorProto.FLOAT, [2, 2, 4, 4])], [("c", [2, 4, 4, 4])],
                 [t for t in m.graph.initializer if t.name == "w"])
    return run_onnx(cut, {"x": x})["c"]


def test_explain_at_errors_are_one_line():
    m = _cnn()
    with pytest.raises(lrpc.InputError, match="explain_at: the model has no tensor 'nope'"):
        lrpc.compile(m, "epsilon", explain_at="nope")
    with pytest.raises(lrpc.InputError, match="does not depend on the tensor 'z'"):
        lrpc.compile(m, "epsilon", explain_at="z")


def test_explain_at_on_the_cli(tmp_path):
    from cli_helpers import one_line_error, run_cli

    path = tmp_path / "m.onnx"
    onnx.save(_cnn(), path)
    code, _, err = run_cli("compile", path, "--explain-at", "h", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    assert "relevance" in [o.name for o in onnx.load(tmp_path / "o.onnx").graph.output]
    code, _, err = run_cli("compile", path, "--explain-at", "nope", "-o", tmp_path / "o2.onnx")
    one_line_error(code, err, contains="no tensor 'nope'")


# ------------------------------------------------------------------------------------------- BERT (transformers)
def _bert():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  attn_implementation="eager")
    net = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # unit-scale activations, biases of both signs (dynamo drops all-zero biases)
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif "embeddings" in name and name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn_like(p))
            elif name.endswith("weight") and p.dim() == 2:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[1]))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return net


def _bert_inputs():
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 100, (2, T)).astype(np.int64)
    mask = np.ones((2, T), np.int64)
    mask[1, 6:] = 0  # the second sample is padded
    types = np.zeros((2, T), np.int64)
    types[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _export_bert(net, path, exporter, dynamic: bool = False):
    """``dynamic``: batch and sequence length symbolic."""
    import warnings

    torch = pytest.importorskip("torch")

    kw = EXPORTS[exporter]
    args = tuple(torch.from_numpy(v) for v in _bert_inputs().values())
    names = list(_bert_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kw["dynamo"]:
            dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=30)}
            torch.onnx.export(net, args, dynamo=True, opset_version=kw["opset"], input_names=names,
                              output_names=["logits"], dynamic_shapes={"input_ids": dims, "attention_mask": dims,
                                                                       "token_type_ids": dims} if dynamic else None
                              ).save(str(path), external_data=False)
        else:
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(net, args, str(path), dynamo=False, opset_version=kw["opset"], input_names=names,
                              output_names=["logits"], dynamic_axes={n: axes for n in names} if dynamic else None)
    return onnx.load(str(path))


def _bert_reference(net, feeds, mode: str):
    """(logits, seed = one-hot × top-1 logit, Σ_hidden gradient × input of the word embedding) of BERT's forward
    written out with its own parameters, the rule's tensors detached: LayerNorm's sigma, GELU's f(x)/x, tanh's
    f(x)/x, one factor of each attention product (attnlrp) or the attention probabilities (cp-lrp)."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    ids, mask, types = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    emb, n, t = net.bert.embeddings, *ids.shape
    word = emb.word_embeddings(ids).detach().requires_grad_(True)
    x = layer_norm(emb.LayerNorm, word + emb.position_embeddings.weight[:t] + emb.token_type_embeddings(types))
    add = torch.where(mask[:, None, None, :].bool(), 0.0, torch.finfo(torch.float32).min)
    for layer in net.bert.encoder.layer:
        att = layer.attention.self
        h, d = att.num_attention_heads, att.attention_head_size

        def heads(y):
            return y.reshape(n, t, h, d).transpose(1, 2)

        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        a = (split_matmul(q, k.transpose(-1, -2)) * d ** -0.5 + add).softmax(-1)
        o = (a.detach() @ v if mode == "cp-lrp" else split_matmul(a, v)).transpose(1, 2).reshape(n, t, h * d)
        x = layer_norm(layer.attention.output.LayerNorm, layer.attention.output.dense(o) + x)
        y = layer.intermediate.dense(x)
        x = layer_norm(layer.output.LayerNorm, layer.output.dense(y * (F.gelu(y) / y).detach()) + x)
    p = net.bert.pooler.dense(x[:, 0])
    logits = net.classifier(p * (torch.tanh(p) / p).detach())
    with torch.no_grad():
        plain = net(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    assert rel_l2(logits.detach().numpy(), plain.logits.numpy()) < 1e-5  # the written-out forward is BERT's
    best = logits.argmax(1)
    logits.gather(1, best[:, None]).sum().backward()
    seed = np.zeros(tuple(logits.shape), np.float32)
    seed[np.arange(n), best.numpy()] = logits.detach().numpy()[np.arange(n), best.numpy()]
    return logits.detach().numpy(), seed, (word.grad * word).sum(-1).detach().numpy()


@pytest.fixture(scope="module")
def bert_exports(tmp_path_factory):
    pytest.importorskip("torch")
    net, root = _bert(), tmp_path_factory.mktemp("bert")
    return net, {e: _export_bert(net, root / f"{e}.onnx", e) for e in EXPORTS}


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_bert_relevance_per_token_matches_the_detach_reference(bert_exports, composite):
    """Both exports, float32: logits as torch's, ``relevance_tokens`` = the detach reference to 1e-4 relative L2,
    and the two exports agree to 1e-5."""
    net, models = bert_exports
    feeds = _bert_inputs()
    logits, seed, want = _bert_reference(net, feeds, composite)
    got = {}
    for exporter, model in models.items():
        compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
        out = run_onnx(compiled, {**{i.name: feeds[i.name] for i in model.graph.input}, "relevance_seed": seed})
        assert rel_l2(out["logits"], logits) < 1e-4
        got[exporter] = out["relevance_tokens"]
        assert got[exporter].shape == (2, T)
        err = rel_l2(got[exporter], want)
        report_line(f"BERT {exporter} {composite}: relevance per token vs detach reference rel L2 {err:.1e} "
                    "(float32)")
        assert err < 1e-4
    assert rel_l2(got["legacy17"], got["dynamo18"]) < 1e-5


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_bert_with_symbolic_batch_and_sequence_length(tmp_path, exporter):
    """BERT exported with a symbolic batch and sequence length (as Hugging Face exports are used) compiles as it is:
    the [CLS] pooling, a Gather at index 0 of the symbolic axis, routes its relevance by a Pad read at run time.
    One compiled file explains 8 tokens of 2 samples and 5 tokens of one, each = the detach reference."""
    net = _bert()
    model = _export_bert(net, tmp_path / "bert.onnx", exporter, dynamic=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param  # (the sequence length is symbolic)
    compiled = lrpc.compile(model, "attnlrp", epsilon=0.0, stabilizer_eps=0.0)
    full = _bert_inputs()
    for feeds in (full, {k: v[:1, :5] for k, v in full.items()}):
        logits, seed, want = _bert_reference(net, feeds, "attnlrp")
        out = run_onnx(compiled, {**feeds, "relevance_seed": seed})
        assert rel_l2(out["logits"], logits) < 1e-4
        err = rel_l2(out["relevance_tokens"], want)
        report_line(f"BERT {exporter} symbolic batch and sequence, {feeds['input_ids'].shape}: relevance per token "
                    f"vs detach reference rel L2 {err:.1e} (float32)")
        assert out["relevance_tokens"].shape == feeds["input_ids"].shape and err < 1e-4


@pytest.mark.parametrize("exporter", list(EXPORTS))
def test_deberta_v2_disentangled_attention(tmp_path, exporter):
    """DeBERTa-v2 (Hugging Face, tiny config): disentangled attention adds to Q·Kᵀ the queries times the relative
    positions' keys and the relative positions' queries times the keys (MatMuls with a batched constant, or a
    constant first, made Einsums), picked per query and key by GatherElements. attnlrp and cp-lrp per token = the
    rules run in torch on the unchanged model (1e-4 relative L2, float32)."""
    import warnings

    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from detach_rules import rules_in_torch

    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                       num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                       position_buckets=8, max_relative_positions=16, pooler_hidden_size=32)
    cfg._attn_implementation = "eager"
    net = transformers.DebertaV2ForSequenceClassification(cfg).eval().requires_grad_(False)
    feeds = {k: v for k, v in _bert_inputs().items() if k != "token_type_ids"}
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    path, names = tmp_path / "deberta.onnx", list(feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if EXPORTS[exporter]["dynamo"]:
            torch.onnx.export(net, args, dynamo=True, opset_version=EXPORTS[exporter]["opset"], input_names=names,
                              output_names=["logits"]).save(str(path), external_data=False)
        else:
            torch.onnx.export(net, args, str(path), dynamo=False, opset_version=EXPORTS[exporter]["opset"],
                              input_names=names, output_names=["logits"])
    net.eval()  # (the legacy exporter leaves the model in training mode)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "GatherElements" in ops
    for composite in ("attnlrp", "cp-lrp"):
        word = net.deberta.embeddings.word_embeddings(args[0]).detach().requires_grad_(True)
        with rules_in_torch(composite):
            logits = net(inputs_embeds=word, attention_mask=args[1]).logits
        best = logits.argmax(1)
        logits.gather(1, best[:, None]).sum().backward()
        want = (word.grad * word).sum(-1).detach().numpy()
        seed = np.zeros(tuple(logits.shape), np.float32)
        seed[np.arange(2), best.numpy()] = logits.detach().numpy()[np.arange(2), best.numpy()]
        compiled = lrpc.compile(model, composite, epsilon=0.0, stabilizer_eps=0.0)
        out = run_onnx(compiled, {**feeds, "relevance_seed": seed})
        assert rel_l2(out["logits"], logits.detach().numpy()) < 1e-4
        err = rel_l2(out["relevance_tokens"], want)
        report_line(f"DeBERTa-v2 {exporter} {composite}: relevance per token vs the rules in torch rel L2 {err:.1e} "
                    "(float32)")
        assert err < 1e-4


def test_bert_session_and_cli_explain_per_token(bert_exports, tmp_path):
    """lrpc.Session(...).explain on the ids (a dict of inputs) gives relevance per token; ``lrpc explain --npy``
    with an .npz of the inputs writes it."""
    from cli_helpers import run_cli

    net, models = bert_exports
    feeds = _bert_inputs()
    _, seed, want = _bert_reference(net, feeds, "attnlrp")
    session = lrpc.Session(lrpc.compile(models["legacy17"], "attnlrp", epsilon=0.0, stabilizer_eps=0.0))
    e = session.explain(feeds, target=np.argmax(seed, 1))
    want = want / seed.sum(1, keepdims=True)  # (the reference seeds the logit, explain a one-hot)
    assert e.relevance.shape == (2, T) and rel_l2(e.relevance, want) < 1e-4
    onnx.save(models["legacy17"], tmp_path / "bert.onnx")
    np.savez(tmp_path / "ids.npz", **feeds)
    code, _, err = run_cli("explain", tmp_path / "bert.onnx", "--npy", tmp_path / "ids.npz", "--rules", "attnlrp",
                           "--epsilon", "0", "--stabilizer-eps", "0", "--no-cache", "-o", tmp_path / "out.png")
    assert code == 0, err
    written = np.load(tmp_path / "out.npy")
    assert written.shape[-1] == T


@pytest.mark.parametrize("composite", ["cp-lrp", "attnlrp"])
def test_check_on_a_token_model_skips_the_gradient_check_with_the_reason(bert_exports, tmp_path, composite):
    """`lrpc check` on token ids: the forward and finite checks run and conservation closes (the token-type and
    position embeddings added to the word embedding are biases of that sum; attnlrp's softmax keeps the remainder of
    its expansion as a bias); the gradient check (finite differences along float inputs) is skipped with its reason
    instead of failing on a probe without inputs."""
    from lrpc.check import run_check

    _, models = bert_exports
    onnx.save(models["legacy17"], str(tmp_path / "bert.onnx"))
    report = run_check(str(tmp_path / "bert.onnx"), composite, inputs=_bert_inputs())
    checks = {c.name: c for c in report.checks}
    assert checks["supported"].passed and checks["forward"].passed and checks["finite"].passed
    assert checks["conservation"].passed, checks["conservation"].message
    embeddings = next(r for r in report.layers if r["name"] == "/bert/embeddings/Add")
    assert embeddings["bias"] != 0 and abs(embeddings["stabilizer"]) < 1e-4
    assert checks["gradient"].skipped and "no float input (token ids)" in checks["gradient"].message

"""Token-id models without torch: what is computed from the ids and the mask alone is a constant for the rules,
sequence targets (``next``, ``token:POS[=ID,...]``, ``continuation:N``) and their seeds, random token inputs for
check/inspect, ``lrpc explain --tokens`` and its one-line errors.

Oracle for the constants: a toy decoder whose position ids (CumSum of the mask), rotary-style cos (Cos of a Range)
and causal mask (Where of a LessOrEqual of Ranges, -inf) are computed in the graph, and whose ids are cast before the
embedding, explains per token exactly as the same model with those tensors given as initializers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrpc
from cli_helpers import one_line_error, run_cli
from conftest import rel_l2, run_onnx
from lrpc import targets
from lrpc.check import random_inputs
from lrpc.errors import InputError

B, T, D, V = 2, 5, 6, 20
COMPUTED = ("p", "cosv", "madd")  # the tensors computed from the ids' shape and the mask alone


def _decoder(folded: dict | None = None, length=T) -> onnx.ModelProto:
    """ids (cast to int32) -> word embedding e; positions p = pos_table[cumsum(mask) - 1]; x = (e + p) * cos(r ⊗ f),
    r = Range(0, T); causal self-attention (+ x); logits [B, T, V]. ``folded``: the values of ``COMPUTED`` as
    initializers instead of their subgraphs (no mask input). ``length``: the sequence dim (a name: dynamic)."""
    rng = np.random.default_rng(0)
    arr = {"table": rng.standard_normal((V, D)), "pos_table": rng.standard_normal((8, D)),
           "inv_freq": np.linspace(0.1, 1.0, D), "W": rng.standard_normal((D, V)) / 3}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arr.items()]
    inits += [numpy_helper.from_array(np.array(v, dtype), k) for k, v, dtype in
              [("one", [1], np.int64), ("ax0", [0], np.int64), ("ax1", [1], np.int64), ("i1", 1, np.int64),
               ("start", 0, np.int64), ("zero", 0.0, np.float32), ("ninf", -np.inf, np.float32)]]
    mk = helper.make_node
    nodes = [mk("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
             mk("Gather", ["table", "ids32"], ["e"])]
    constant = [mk("CumSum", ["attention_mask", "i1"], ["cs"]), mk("Sub", ["cs", "one"], ["pos"]),
                mk("Gather", ["pos_table", "pos"], ["p"]),
                mk("Shape", ["input_ids"], ["shp"]), mk("Gather", ["shp", "i1"], ["t"]),
                mk("Range", ["start", "t", "i1"], ["r"]), mk("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
                mk("Unsqueeze", ["rf", "ax1"], ["rf2"]), mk("Mul", ["rf2", "inv_freq"], ["ang"]),
                mk("Cos", ["ang"], ["cosv"]),
                mk("Unsqueeze", ["r", "ax0"], ["rr0"]), mk("Unsqueeze", ["r", "ax1"], ["rr1"]),
                mk("LessOrEqual", ["rr0", "rr1"], ["allowed"]), mk("Where", ["allowed", "zero", "ninf"], ["madd"])]
    nodes += [] if folded else constant
    nodes += [mk("Add", ["e", "p"], ["x"]), mk("Mul", ["x", "cosv"], ["xr"]),
              mk("Transpose", ["xr"], ["xt"], perm=[0, 2, 1]), mk("MatMul", ["xr", "xt"], ["sc"]),
              mk("Add", ["sc", "madd"], ["msc"]), mk("Softmax", ["msc"], ["a"], axis=-1),
              mk("MatMul", ["a", "xr"], ["ctx"]), mk("Add", ["ctx", "xr"], ["h"]),
              mk("MatMul", ["h", "W"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", length])]
    if folded:
        inits += [numpy_helper.from_array(v, k) for k, v in folded.items()]
    else:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", length]))
    g = helper.make_graph(nodes, "toy", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                  ["batch", length, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds():
    mask = np.ones((B, T), np.int64)
    mask[1, 0] = 0  # (left padding: the positions of the second sample start later)
    return {"input_ids": np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int64), "attention_mask": mask}


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp", "epsilon-gamma-box", "epsilon"])
def test_tensors_computed_from_ids_and_mask_are_constants(composite):
    """Position ids from the mask's CumSum, cos of a Range, a causal mask built by Where(.., -inf), ids cast before the
    embedding: the relevance per token equals that of the model with those tensors as initializers. The embeddings'
    sum is a bias add in both forms (category scale: pass under the CNN composites, epsilon under attnlrp/cp-lrp),
    whether the position addend is computed or stored."""
    m, feeds = _decoder(), _feeds()
    probe = onnx.ModelProto.FromString(m.SerializeToString())
    probe.graph.output.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in COMPUTED)
    values = run_onnx(probe, feeds)
    compiled = lrpc.compile(m, composite, epsilon=1e-3)
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance_tokens"]
    seed = targets.seed(targets.parse("next"), [B, T, V], lambda: values["logits"])
    got = run_onnx(compiled, {**feeds, "relevance_seed": seed})
    want = run_onnx(lrpc.compile(_decoder({k: values[k] for k in COMPUTED}), composite, epsilon=1e-3),
                    {"input_ids": feeds["input_ids"], "relevance_seed": seed})
    assert np.allclose(got["logits"], values["logits"])
    assert got["relevance_tokens"].shape == (B, T) and np.all(np.isfinite(got["relevance_tokens"]))
    assert rel_l2(got["relevance_tokens"], want["relevance_tokens"]) < 1e-6


@pytest.mark.parametrize("text,kind,values,shown", [
    ("next", "next", (), "next"), ("token:3", "token", (3,), "token:3"),
    ("token:-2=5, 3=7", "token", (-2, 5, 3, 7), "token:-2=5,3=7"), ("continuation:2", "continuation", (2,),
                                                                    "continuation:2")])
def test_sequence_targets_parse_and_print(text, kind, values, shown):
    t = targets.parse(text)
    assert (t.kind, t.values, str(t)) == (kind, values, shown)
    assert targets.parse(str(t)) == t


@pytest.mark.parametrize("text,message", [
    ("token:x", "expected token:POS, token:POS=ID"), ("token:1=2=3", "expected token:POS, token:POS=ID"),
    ("token:1=-2", "token ids must be >= 0"), ("continuation:0", "N must be at least 1"),
    ("tokens:1", "unknown target kind 'tokens'")])
def test_bad_sequence_targets_are_refused(text, message):
    with pytest.raises(InputError, match=message):
        targets.parse(text)


def test_sequence_seeds():
    """next: top-1 at the last position (the last one the mask keeps); token:POS: top-1 there; pairs and
    continuations: the sum of one-hots."""
    rng = np.random.default_rng(1)
    scores, ids = rng.standard_normal((B, T, V)), rng.integers(0, V, (B, T))

    def seed(text, **kw):
        return targets.seed(targets.parse(text), [B, T, V], lambda: scores, ids=lambda: ids, **kw)

    want = np.zeros((B, T, V), np.float32)
    want[[0, 1], T - 1, scores[:, -1].argmax(-1)] = 1
    assert np.array_equal(seed("next"), want) and np.array_equal(seed(f"token:{T - 1}"), want)
    mask = np.ones((B, T), np.int64)
    mask[1, 3:] = 0  # right padding: the second sample's next token is predicted at position 2
    want[1] = 0
    want[1, 2, scores[1, 2].argmax()] = 1
    assert np.array_equal(seed("next", mask=lambda: mask), want)
    cached = np.concatenate([np.ones((B, 2), np.int64), mask], 1)  # (a mask over 2 cached tokens and the T new ones)
    assert np.array_equal(seed("next", mask=lambda: cached), want)
    with pytest.raises(InputError, match="keep a position in each sample"):
        seed("next", mask=lambda: 0 * mask)
    want = np.zeros((B, T, V), np.float32)
    want[:, 0, 4] = want[:, 3, 7] = 1
    assert np.array_equal(seed("token:0=4,-2=7"), want)
    want = np.zeros((B, T, V), np.float32)
    for p in (T - 3, T - 2):
        want[[0, 1], p, ids[:, p + 1]] = 1
    assert np.array_equal(seed("continuation:2"), want)
    for text, message in [(f"token:{T}", "outside the sequence of 5 tokens"), (f"token:1={V}", "outside the vocab"),
                          (f"continuation:{T}", "continues at most 4"), ("next", "needs logits \\[N, T, V\\]")]:
        with pytest.raises(InputError, match=message):
            targets.seed(targets.parse(text), [B, T, V] if text != "next" else [B, V], lambda: scores,
                         ids=lambda: ids)


def test_session_explains_inputs_given_by_name():
    m, feeds = _decoder(), _feeds()
    session = lrpc.Session(lrpc.compile(m, "attnlrp"))
    e = session.explain(**feeds, target="continuation:2")
    assert e.relevance.shape == (B, T) and e.output.shape == (B, T, V)
    assert np.array_equal(e.relevance, session.explain(feeds, target="continuation:2").relevance)
    with pytest.raises(InputError, match="not both"):
        session.explain(feeds, input_ids=feeds["input_ids"])


def test_random_inputs_of_token_models_are_ids_within_the_vocabulary():
    feeds = random_inputs(_decoder(), seed=3)
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (1, T)
    assert feeds["input_ids"].max() < V and len(np.unique(feeds["input_ids"])) > 1
    assert np.all(feeds["attention_mask"] == 1)


def test_output_dims_named_apart_from_the_inputs():
    """An export that names the logits' dims itself (torch's legacy exporter with dynamic axes on the inputs only:
    'MatMulout_dim_0', 'MatMulout_dim_1'): compiling names them after the inputs' dims where shape inference finds
    them (the batch here), and the Session reads the others off a run with a placeholder seed, so target "next"
    explains the last position, as with the dims named after the inputs; a seed that would broadcast over the logits
    is refused in one line."""
    named, apart = _decoder(length="seq"), _decoder(length="seq")
    for i, d in enumerate(apart.graph.output[0].type.tensor_type.shape.dim[:2]):
        d.dim_param = f"MatMulout_dim_{i}"
    compiled = lrpc.compile(apart, "attnlrp")
    seed_dims = next(i for i in compiled.graph.input if i.name == "relevance_seed").type.tensor_type.shape.dim
    assert seed_dims[0].dim_param == "batch" and seed_dims[2].dim_value == V  # (the batch found; here not T)
    for i, d in enumerate(seed_dims[:2]):  # (as if inference had not found them: the Session's run decides)
        d.dim_param = f"unknown_{i}"
    feeds = _feeds()
    want = lrpc.Session(lrpc.compile(named, "attnlrp")).explain(**feeds, target="next")
    for session in (lrpc.Session(lrpc.compile(apart, "attnlrp")), lrpc.Session(compiled)):
        for batch in (feeds, {k: v[:1] for k, v in feeds.items()}):
            got = session.explain(**batch, target="next")
            n = len(batch["input_ids"])
            assert got.seed.shape == (n, T, V) and np.array_equal(got.seed, want.seed[:n])
            assert rel_l2(got.relevance, want.relevance[:n]) < 1e-6
        with pytest.raises(lrpc.InputError, match=r"the seed has shape \[2, 1, 20\], the explained output 'logits' "
                                                  r"\[2, 5, 20\]"):
            session.explain(**feeds, seed=want.seed[:, -1:])


def test_output_dims_named_by_shape_inference_or_refused_clearly():
    """Output dims named apart from the inputs' take the input dims shape inference finds (an embedding and a dense
    head: [b, seq, V]); where neither inference nor a run can tell them (the relevance reshapes the seed, so a
    placeholder does not fit), explaining a target is refused in one line asking for an explicit seed, which works."""
    rng = np.random.default_rng(3)
    mk = helper.make_node
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((D, V)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, -1, 4], np.int64), "shape")]

    def model(reshaped: bool) -> onnx.ModelProto:
        nodes = [mk("Gather", ["table", "input_ids"], ["e"]), mk("Tanh", ["e"], ["h"]), mk("MatMul", ["h", "W"], ["z"])]
        nodes.append(mk("Reshape", ["z", "shape"], ["logits"]) if reshaped else mk("Identity", ["z"], ["logits"]))
        g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             ["o0", "o1", 4 if reshaped else V])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    seed = next(i for i in lrpc.compile(model(False), "attnlrp").graph.input if i.name == "relevance_seed")
    assert [d.dim_param or d.dim_value for d in seed.type.tensor_type.shape.dim] == ["b", "seq", V]
    session = lrpc.Session(lrpc.compile(model(True), "attnlrp"))
    ids = rng.integers(0, V, (2, T))
    with pytest.raises(lrpc.InputError, match=r"the explained output's dims \['o1'\] are named by no input .* give "
                                              r"seed= of the output's shape"):
        session.explain(input_ids=ids, target="top1")
    explicit = np.zeros((2, T * V // 4, 4), np.float32)
    explicit[:, 0, 1] = 1.0
    assert np.isfinite(session.explain(input_ids=ids, seed=explicit).relevance).all()


def _boxes_model() -> onnx.ModelProto:
    """LayoutLM's inputs in small: token ids [B, T] and a box per token, bbox [B, T, 4] (integer coordinates whose
    embeddings are summed and added to the word's), then a dense head over each position: logits [B, T, V]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((10, D)).astype(np.float32), "boxes"),
             numpy_helper.from_array(rng.standard_normal((D, V)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    mk = helper.make_node
    nodes = [mk("Gather", ["table", "input_ids"], ["e"]), mk("Gather", ["boxes", "bbox"], ["b4"]),
             mk("ReduceSum", ["b4", "ax2"], ["b"], keepdims=0), mk("Add", ["e", "b"], ["x"]),
             mk("Tanh", ["x"], ["h"]), mk("MatMul", ["h", "W"], ["logits"])]
    g = helper.make_graph(nodes, "boxes", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", T]),
                                           helper.make_tensor_value_info("bbox", TensorProto.INT64, ["B", T, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", T, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cli_explain_tokens_with_an_input_per_token_of_higher_rank(tmp_path):
    """An integer input [B, T, 4] beside the ids (LayoutLM's boxes) comes from the .npz as it is ([T, 4] for one
    sequence of ids [T]); the relevance is Session.explain's."""
    onnx.save(_boxes_model(), tmp_path / "boxes.onnx")
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, V, (B, T)), "bbox": rng.integers(0, 10, (B, T, 4))}
    want = lrpc.Session(lrpc.compile(_boxes_model(), "attnlrp")).explain(**feeds, target="token:2=7").relevance
    for name, arrays, rows in (("both", feeds, slice(None)), ("one", {k: v[0] for k, v in feeds.items()}, slice(0, 1))):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        code, _, err = run_cli("explain", tmp_path / "boxes.onnx", "--tokens", tmp_path / f"{name}.npz", "--rules",
                               "attnlrp", "--target", "token:2=7", "--no-cache", "-o", tmp_path / f"{name}.json")
        assert code == 0, err
        got = np.array([r["relevance"] for r in json.loads((tmp_path / f"{name}.json").read_text())["samples"]])
        assert rel_l2(got, want[rows]) < 1e-6, name
    np.savez(tmp_path / "flat.npz", input_ids=feeds["input_ids"], bbox=feeds["bbox"][..., 0])
    code, _, err = run_cli("explain", tmp_path / "boxes.onnx", "--tokens", tmp_path / "flat.npz", "-o",
                           tmp_path / "flat.json")
    one_line_error(code, err, contains="input 'bbox' has shape [2, 5], the token ids [2, 5] (it takes [B, T, ...] "
                                       "of rank 3)")


@pytest.mark.parametrize("case,contains", [
    ("missing", "no such file"), ("floats", "token ids must be integers"), ("suffix", "needs a suffix"),
    ("position", "position 9 outside the sequence"), ("html", "needs the tokens' text"),
    ("tokenizer", "--tokenizer goes with --text")])
def test_cli_explain_tokens_errors_are_one_line(tmp_path, case, contains):
    onnx.save(_decoder(), tmp_path / "toy.onnx")
    np.save(tmp_path / "ids.npy", _feeds()["input_ids"])
    np.save(tmp_path / "f.npy", np.zeros((B, T), np.float32))
    src = {"missing": tmp_path / "nope.npy", "floats": tmp_path / "f.npy"}.get(case, tmp_path / "ids.npy")
    out = {"suffix": "rel.txt", "html": "rel.html"}.get(case, "rel.json")
    extra = {"position": ["--target", "token:9"]}.get(case, [])
    args = ["--npy", src, "--tokenizer", tmp_path / "t.json"] if case == "tokenizer" else ["--tokens", src]
    code, _, err = run_cli("explain", tmp_path / "toy.onnx", *args, *extra, "--no-cache", "-o", tmp_path / out)
    one_line_error(code, err, contains=contains)


def _tokenizer(path):
    """A word-level tokenizer.json over V words w0 … w19, split on whitespace (built here: nothing downloaded)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_cli_explain_text_with_a_local_tokenizer(tmp_path):
    """--text encoded by a local tokenizer.json: the JSON holds the tokens' text, rel.html shows them coloured, the
    table names them; the relevance is that of --tokens with the same ids."""
    onnx.save(_decoder(), tmp_path / "toy.onnx")
    _tokenizer(tmp_path / "tok.json")
    code, out, err = run_cli("explain", tmp_path / "toy.onnx", "--text", "w3 w1 w4 w1 w5", "--tokenizer",
                             tmp_path / "tok.json", "--rules", "attnlrp", "--no-cache", "-o", tmp_path / "rel.json")
    assert code == 0, err
    sample = json.loads((tmp_path / "rel.json").read_text())["samples"][0]
    assert sample["ids"] == [3, 1, 4, 1, 5] and sample["tokens"] == ["w3", "w1", "w4", "w1", "w5"]
    page = (tmp_path / "rel.html").read_text()
    assert page.count("<span") == T and "w4</span>" in page
    assert "token" in out and "w4" in out
    np.save(tmp_path / "ids.npy", np.array([[3, 1, 4, 1, 5]]))
    code, _, err = run_cli("explain", tmp_path / "toy.onnx", "--tokens", tmp_path / "ids.npy", "--rules", "attnlrp",
                           "--no-cache", "-o", tmp_path / "same.json")
    assert code == 0, err
    same = json.loads((tmp_path / "same.json").read_text())["samples"][0]
    assert rel_l2(sample["relevance"], same["relevance"]) < 1e-6


def test_text_needs_a_tokenizer_and_the_package(tmp_path, monkeypatch):
    from lrpc import text

    with pytest.raises(InputError, match="--text needs --tokenizer"):
        text.text_ids("a b", None)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(InputError, match="needs the 'tokenizers' package"):
        text.text_ids("a b", tmp_path / "tok.json")
    monkeypatch.undo()
    pytest.importorskip("tokenizers")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json: cannot read or apply the tokenizer"):
        text.text_ids("a b", tmp_path / "bad.json")


def test_terminal_colours_and_long_sequences():
    from lrpc.text import table

    ids, r = np.arange(30)[None], np.linspace(-1, 2, 30)[None]
    shown = table(ids, r, [f"t{i}" for i in range(30)], colour=True)
    assert "the 24 most relevant of 30 tokens" in shown and "\x1b[48;2;" in shown
    assert len([line for line in shown.splitlines() if line.strip()[:1].isdigit()]) == 24


@pytest.mark.parametrize("target", ["next", "continuation:2"])
def test_inspect_on_random_token_ids(tmp_path, target):
    """lrpc inspect's random inputs for a token model are ids within the vocabulary; sequence targets seed one
    entry per explained position."""
    from lrpc.inspect import inspect

    onnx.save(_decoder(), tmp_path / "toy.onnx")
    result = inspect(str(tmp_path / "toy.onnx"), "cp-lrp", None, None, target, 1e-3, None, None)
    assert result["target"] == target and result["seed_sum"] == (1.0 if target == "next" else 2.0)
    assert np.isfinite(result["input_sum"]) and result["layers"]


def test_dynamic_sequence_length():
    """A model with a dynamic sequence dim explains sequences of any length: the seed takes the ids' length."""
    session = lrpc.Session(lrpc.compile(_decoder(length="seq"), "attnlrp"))
    for t in (3, 7):
        ids = np.arange(2 * t).reshape(2, t) % V
        e = session.explain(input_ids=ids, attention_mask=np.ones_like(ids), target="next")
        assert e.relevance.shape == (2, t) and e.seed.shape == (2, t, V) and e.seed[:, -1].sum() == 2


def test_cli_explain_tokens_of_a_classifier_defaults_to_top1(tmp_path):
    """A classifier of token ids (logits [B, C]): --tokens explains each sample's top class (the JSON names it)."""
    from test_text import _masked_attention_model

    onnx.save(_masked_attention_model("input"), tmp_path / "cls.onnx")
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    code, out, err = run_cli("explain", tmp_path / "cls.onnx", "--tokens", tmp_path / "ids.npy", "--rules", "attnlrp",
                             "--no-cache", "-o", tmp_path / "rel.json")
    assert code == 0, err
    data = json.loads((tmp_path / "rel.json").read_text())
    e = lrpc.Session(lrpc.compile(_masked_attention_model("input"), "attnlrp")).explain(
        ids=ids, attention_mask=np.ones_like(ids))
    assert data["target"] == "top1" and [s["explained"] for s in data["samples"]] == [[[int(c)]] for c in e.target]
    assert rel_l2(np.array([s["relevance"] for s in data["samples"]]), e.relevance) < 1e-6
    mask = np.ones_like(ids)
    mask[1, 3] = 0
    np.savez(tmp_path / "ids.npz", ids=ids, attention_mask=mask)  # (the ids under the model's name for them)
    code, out, err = run_cli("explain", tmp_path / "cls.onnx", "--tokens", tmp_path / "ids.npz", "--rules", "attnlrp",
                             "--no-cache", "-o", tmp_path / "masked.npy")
    assert code == 0, err
    e = lrpc.Session(lrpc.compile(_masked_attention_model("input"), "attnlrp")).explain(ids=ids, attention_mask=mask)
    assert rel_l2(np.load(tmp_path / "masked.npy"), e.relevance) < 1e-6


def _cached_decoder(past: np.ndarray | None = None) -> onnx.ModelProto:
    """ids -> word embedding e [B, T, D]; keys k = Concat(cache, e) over the sequence axis, the cache a float input
    ``past_key_values.0.key`` [B, P, D] (``past``: an initializer of these values instead); softmax(e kᵀ) k, then
    logits [B, T, V]."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "table"),
             numpy_helper.from_array((rng.standard_normal((D, V)) / 3).astype(np.float32), "W")]
    mk = helper.make_node
    nodes = [mk("Gather", ["table", "input_ids"], ["e"]), mk("Concat", ["past_key_values.0.key", "e"], ["k"], axis=1),
             mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), mk("MatMul", ["e", "kt"], ["sc"]),
             mk("Softmax", ["sc"], ["a"], axis=-1), mk("MatMul", ["a", "k"], ["ctx"]),
             mk("MatMul", ["ctx", "W"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, T])]
    if past is None:
        inputs.append(helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [B, 3, D]))
    else:
        inits.append(numpy_helper.from_array(past, "past_key_values.0.key"))
    g = helper.make_graph(nodes, "cached", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                     [B, T, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_a_key_value_cache_is_a_constant(composite):
    """A float input named as a decoder's cache (past_key_values.*) is not explained: the token ids are (output
    relevance_tokens), fed with the cache by name, with the relevance of the model whose cache is an initializer."""
    from lrpc.contract import is_cache_input

    past = np.random.default_rng(4).standard_normal((B, 3, D)).astype(np.float32)
    ids = _feeds()["input_ids"]
    compiled = lrpc.compile(_cached_decoder(), composite)
    assert [o.name for o in compiled.graph.output] == ["logits", "relevance_tokens"]
    got = lrpc.Session(compiled).explain(input_ids=ids, **{"past_key_values.0.key": past}, target="next")
    want = lrpc.Session(lrpc.compile(_cached_decoder(past), composite)).explain(input_ids=ids, target="next")
    assert np.array_equal(got.seed, want.seed) and rel_l2(got.relevance, want.relevance) < 1e-6
    assert [is_cache_input(n) for n in ("past_key_values.0.key", "past.1.value", "past_key_3", "pastry", "x")] == \
        [True, True, True, False, False]

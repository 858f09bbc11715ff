"""Targets -> seeds (lrpc.targets) and what Session.explain / explain_topk return.

Oracles: seeds are rebuilt independently from the torch model's own outputs (arg-max per position,
sigmoid > 0.5); relevance of a region equals the sum of the relevance of its positions (the backward
pass is linear in the seed for a fixed forward); top-k ranks match torch.topk; per-layer relevance
matches the compiled graph's outputs and its input layer's relevance is the input relevance."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import lrpc
from lrpc import targets
from lrpc.errors import InputError

H, W = 6, 7


class _Seg(torch.nn.Module):
    """A tiny segmentation net: ``classes`` channels; softmax over channels (classes > 1) or sigmoid (1)
    by default, ``head`` "sigmoid" (independent labels), "logits" (none) or "nhwc" (default head, then
    channels last)."""

    def __init__(self, classes: int, head: str = "default"):
        super().__init__()
        self.classes, self.head = classes, head
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, classes, 3, padding=1)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        if self.head == "logits":
            return y
        if self.head == "nhwc":  # as TensorFlow models end: channels last, softmax over the last axis
            return torch.softmax(y.permute(0, 2, 3, 1), dim=-1)
        return torch.softmax(y, dim=1) if self.classes > 1 and self.head != "sigmoid" else torch.sigmoid(y)


def _export(net) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, H, W),), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def _session(classes: int, rules="epsilon-gamma-box", head="default", **kw):
    torch.manual_seed(classes)
    net = _Seg(classes, head).eval()
    compiled = lrpc.compile(_export(net), rules, low=-3.0, high=3.0, **kw)
    return net, lrpc.Session(compiled, providers=["CPUExecutionProvider"], channels_last=head == "nhwc")


X = np.random.default_rng(3).standard_normal([2, 3, H, W]).astype(np.float32)


def _probs(net):
    with torch.no_grad():
        return net(torch.from_numpy(X)).numpy()


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, kind, values", [
    ("281", "index", (281,)), ("3,1", "index", (3, 1)), ("top1", "top", (1,)), ("top5", "top", (5,)),
    ("pixel:2,3", "pixel", (2, 3)), ("pixel:1,2,3", "pixel", (1, 2, 3)), ("box:0,1,3,4", "box", (0, 1, 3, 4)),
    ("class:2", "class", (2,)), (None, "top", (1,)), (7, "index", (7,)), ([1, 2], "index", (1, 2)),
])
def test_parse(text, kind, values):
    t = targets.parse(text)
    assert (t.kind, t.values) == (kind, values)


@pytest.mark.parametrize("text, message", [
    ("cat", "expected a class index"), ("top0", "at least 1"), ("pixel:a,b", "integers"),
    ("ring:1,2", "unknown target kind"), ("class:1,2", "one class"), ("mask:", "needs a file"),
    ("pixel:-1,2", ">= 0"), ([[1, 2]], "class index"),
])
def test_parse_errors(text, message):
    with pytest.raises(InputError, match=message):
        targets.parse(text)


# ------------------------------------------------------------------------------------------ dense seeds

def test_multiclass_dense_seeds_follow_the_prediction(tmp_path):
    net, s = _session(3)
    probs = _probs(net)
    pred = probs.argmax(axis=1)  # [N, H, W]
    shape = [2, 3, H, W]
    scores = lambda: probs
    want = np.zeros(shape, np.float32)
    for n in range(2):
        want[n, pred[n, 2, 4], 2, 4] = 1
    assert np.array_equal(targets.seed(targets.parse("pixel:2,4"), shape, scores), want)
    want = np.zeros(shape, np.float32)
    want[:, 1, 2, 4] = 1
    assert np.array_equal(targets.seed(targets.parse("pixel:1,2,4"), shape, lambda: 1 / 0), want)  # no scores needed
    box = np.zeros([2, H, W], bool)
    box[:, 1:4, 2:6] = True
    want = np.stack([box & (pred == c) for c in range(3)], axis=1).astype(np.float32)
    assert np.array_equal(targets.seed(targets.parse("box:1,2,4,6"), shape, scores), want)
    for c in range(3):
        want = np.zeros(shape, np.float32)
        want[:, c] = pred == c
        assert np.array_equal(targets.seed(targets.parse(f"class:{c}"), shape, scores), want)
    mask = np.zeros([H, W], np.uint8)
    mask[0, :3] = 1
    np.save(tmp_path / "m.npy", mask)
    want = np.stack([(mask > 0) & (pred == c) for c in range(3)], axis=1).astype(np.float32)
    assert np.array_equal(targets.seed(targets.parse(f"mask:{tmp_path / 'm.npy'}"), shape, scores), want)
    per_channel = np.zeros([3, H, W], bool)
    per_channel[2, 5, 6] = True
    np.save(tmp_path / "c.npy", per_channel)
    want = np.broadcast_to(per_channel, shape).astype(np.float32)
    assert np.array_equal(targets.seed(targets.parse(f"mask:{tmp_path / 'c.npy'}"), shape, lambda: 1 / 0), want)


def test_one_channel_sigmoid_threshold_and_png_mask(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    net, s = _session(1)
    assert s.sigmoid  # the graph output is the sigmoid's
    probs = _probs(net)
    fg = probs[:, 0] > 0.5
    assert 0 < fg.sum() < fg.size  # both classes occur, so the test can fail
    e1, e0 = s.explain(X, "class:1"), s.explain(X, "class:0")
    np.testing.assert_array_equal(s.run({"x": X}, fg[:, None].astype(np.float32))["relevance"], e1.relevance)
    np.testing.assert_array_equal(s.run({"x": X}, (~fg)[:, None].astype(np.float32))["relevance"], e0.relevance)
    mask = np.zeros([H, W], np.uint8)
    mask[2:4, 1:3] = 255
    pil.fromarray(mask).save(tmp_path / "m.png")
    seed = np.zeros([2, 1, H, W], np.float32)
    seed[:, 0, 2:4, 1:3] = 1
    np.testing.assert_array_equal(s.explain(X, f"mask:{tmp_path / 'm.png'}").relevance,
                                  s.run({"x": X}, seed)["relevance"])


def test_one_channel_logits_threshold_at_zero():
    net, s = _session(1, head="logits")
    assert not s.sigmoid
    fg = _probs(net)[:, 0] > 0.0
    assert 0 < fg.sum() < fg.size
    np.testing.assert_array_equal(s.explain(X, "class:1").seed[:, 0], fg)


def test_older_compiled_models_without_metadata_still_see_the_sigmoid():
    net, s = _session(1)
    compiled = onnx.ModelProto()
    compiled.CopyFrom(s_model := lrpc.compile(_export(net), "epsilon-plus"))
    del compiled.metadata_props[:]
    compiled.metadata_props.extend(p for p in s_model.metadata_props if p.key != "lrpc.output")
    old = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    assert old.sigmoid and old.scores_output == "y"
    np.testing.assert_array_equal(old.explain(X, "class:1").seed[:, 0], _probs(net)[:, 0] > 0.5)


def test_multilabel_sigmoid_channels_are_independent():
    net, s = _session(3, head="sigmoid")
    probs = _probs(net)
    on = probs > 0.5
    assert s.sigmoid and (on.sum(axis=1) != 1).any()  # some positions have 0 or 2+ labels: not an arg-max
    np.testing.assert_array_equal(s.explain(X, "class:2").seed[:, 2], on[:, 2])
    box = np.zeros(on.shape, bool)
    box[:, :, 1:3, 2:6] = True
    np.testing.assert_array_equal(s.explain(X, "box:1,2,3,6").seed, box & on)


def test_channels_last_dense_output():
    net, s = _session(3, head="nhwc")
    probs = _probs(net)  # [N, H, W, C]
    assert probs.shape == (2, H, W, 3)
    pred = probs.argmax(axis=-1)
    want = np.zeros(probs.shape, np.float32)
    for c in range(3):
        want[..., c] = pred == c
    np.testing.assert_array_equal(s.explain(X, "box:0,0,6,7").seed, want)
    one = np.zeros(probs.shape, np.float32)
    one[:, 2, 4, 1] = 1
    np.testing.assert_array_equal(s.explain(X, "pixel:1,2,4").seed, one)
    np.testing.assert_array_equal(s.explain(X, "class:1").seed[..., 1], pred == 1)


def test_image_masks_threshold_at_mid_gray(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    gray = np.full([H, W], 30, np.uint8)  # JPEG-like noise below mid gray selects nothing
    gray[1:3, 2:4] = 220
    pil.fromarray(gray).save(tmp_path / "m.png")
    seed = targets.seed(targets.parse(f"mask:{tmp_path / 'm.png'}"), [1, 1, H, W], lambda: 1 / 0)  # one channel
    assert seed.sum() == 4 and seed[0, 0, 1:3, 2:4].all()


def test_region_relevance_is_the_sum_over_its_pixels():
    net, s = _session(3)
    region = s.explain(X, "box:1,2,3,5").relevance.astype(np.float64)
    parts = sum(s.explain(X, f"pixel:{y},{x}").relevance.astype(np.float64) for y in range(1, 3) for x in range(2, 5))
    assert _rel(region, parts) < 1e-5
    total = sum(s.explain(X, f"class:{c}").relevance.astype(np.float64) for c in range(3))
    everywhere = s.explain(X, f"box:0,0,{H},{W}").relevance.astype(np.float64)  # every position, predicted class
    assert _rel(total, everywhere) < 1e-5


@pytest.mark.parametrize("text, message", [
    ("pixel:1", "2 spatial axes"), ("pixel:9,9", "outside"), ("box:3,3,3,4", "exceed"), ("pixel:5,1,1", "channel 5"),
    ("class:3", "out of range 0..2"),
])
def test_dense_target_errors(text, message):
    net, s = _session(3)
    with pytest.raises(InputError, match=message):
        s.explain(X, text)


def test_dense_target_on_a_classifier_is_refused():
    from lrpc.errors import InputError as E

    with pytest.raises(E, match="dense target needs an output"):
        targets.seed(targets.parse("pixel:1,2"), [1, 10], lambda: np.zeros([1, 10]))


def test_mask_file_errors(tmp_path):
    net, s = _session(3)
    np.save(tmp_path / "wrong.npy", np.ones([4, 4]))
    np.save(tmp_path / "zero.npy", np.zeros([H, W]))
    for name, msg in (("wrong.npy", "does not fit"), ("zero.npy", "selects nothing"), ("none.npy", "no such file")):
        with pytest.raises(InputError, match=msg):
            s.explain(X, f"mask:{tmp_path / name}")


# ------------------------------------------------------------------------------------------ top-k, layers

def _assert_ranks_are_single_explanations(s, ranks, want):
    """Each rank's classes are ``want[:, rank]`` and its explanation is explain's with those classes, bit for bit."""
    assert np.array_equal(np.stack([e.target for e in ranks], axis=1), want)
    for i, e in enumerate(ranks):
        single = s.explain(X, want[:, i])
        np.testing.assert_array_equal(e.relevance, single.relevance)
        np.testing.assert_array_equal(e.output, single.output)
        np.testing.assert_array_equal(e.seed, single.seed)


def _counted(session) -> list:
    """The runs of ``session`` from now on (one entry per onnxruntime run)."""
    runs, real = [], session.session

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def run_with_iobinding(self, *args, **kwargs):
            runs.append(1)
            return real.run_with_iobinding(*args, **kwargs)

        def run(self, *args, **kwargs):
            runs.append(1)
            return real.run(*args, **kwargs)

    session.session = Counting()
    return runs


def test_topk_ranks_match_torch_and_single_targets():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * H * W, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10)).eval()
    s = lrpc.Session(lrpc.compile(_export(net), "epsilon-plus", seed="switch"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = torch.topk(net(torch.from_numpy(X)), 4, dim=1).indices.numpy()
    runs = _counted(s)
    ranks = s.explain_topk(X, 4)
    assert len(runs) == 4  # (the graph's own top-1 run gives the scores and rank 1 at once)
    _assert_ranks_are_single_explanations(s, ranks, want)
    assert np.array_equal(s.explain(X).target, want[:, 0])
    with pytest.raises(InputError, match="explain_topk"):
        s.explain(X, "top3")
    with pytest.raises(InputError, match="only 10 entries"):
        s.explain_topk(X, 11)


def test_topk_runs_rank_one_again_where_the_ranking_disagrees_with_the_graphs_top1(monkeypatch):
    """Where the ranking's rank 1 (on the graph output) is not the class the graph's top-1 run picked (tied scores:
    its arg-max is taken on the logits), rank 1 is run again with its seed: k + 1 runs, the same explanations as
    explicit seeds (oracle: explain with each rank's class; the tie is simulated by shifting the ranking)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * H * W, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10), torch.nn.Softmax(dim=1)).eval()
    s = lrpc.Session(lrpc.compile(_export(net), "epsilon-plus", seed="switch"), providers=["CPUExecutionProvider"])
    real_topk = lrpc.targets.topk

    def shifted(shape, scores, k, dtype=np.float32):
        classes, _ = real_topk(shape, scores, k + 1, dtype)
        classes = classes[:, 1:]  # (rank 1 is now another class than the graph's arg-max)
        return classes, [lrpc.targets.one_hot(shape, classes[:, i], dtype) for i in range(k)]

    monkeypatch.setattr(lrpc.targets, "topk", shifted)
    with torch.no_grad():
        want = torch.topk(net(torch.from_numpy(X)), 5, dim=1).indices.numpy()[:, 1:]
    runs = _counted(s)
    ranks = s.explain_topk(X, 4)
    assert len(runs) == 5
    _assert_ranks_are_single_explanations(s, ranks, want)


@pytest.mark.parametrize("mode", ["full", "sums"])
def test_layers_dict(mode):
    torch.manual_seed(3)
    net = _Seg(3).eval()
    model = _export(net)
    compiled = lrpc.compile(model, "epsilon-plus", layerwise=mode)
    s = lrpc.Session(compiled, providers=["CPUExecutionProvider"])
    e = s.explain(X, "class:1")
    names = [row["name"] for row in json.loads({p.key: p.value for p in compiled.metadata_props}["lrpc.layers"])]
    assert sorted(e.layers) == sorted(names) and len(names) == 2
    first = names[0]  # execution order: the first conv receives the input's relevance
    plain = lrpc.Session(lrpc.compile(model, "epsilon-plus"), providers=["CPUExecutionProvider"]).explain(X, "class:1")
    assert plain.layers == {}
    np.testing.assert_allclose(e.relevance, plain.relevance, rtol=1e-6, atol=1e-7)
    want = e.relevance if mode == "full" else e.relevance.reshape(2, -1).sum(axis=1)
    np.testing.assert_allclose(e.layers[first], want, rtol=1e-5, atol=1e-6)


def _without_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv biases zeroed and BatchNormalization shifts made 0 (beta = gamma * mean / sqrt(var + eps))."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}

    def put(name, value):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for node in m.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2:
            put(node.input[2], np.zeros_like(numpy_helper.to_array(inits[node.input[2]])))
        if node.op_type == "BatchNormalization":
            gamma, _, mean, var = (numpy_helper.to_array(inits[n]) for n in node.input[1:5])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            put(node.input[2], gamma * mean / np.sqrt(var + eps))
    return m


def test_shipped_unet_class_target_conserves_the_predicted_pixels():
    """models/digits_unet.onnx (trained; BatchNorm, Resize, Concat skips, Sigmoid): explaining every pixel
    predicted as stroke hands exactly that many units of relevance to the input, per sample (biases
    removed from the model so that no unit is switched on by its bias alone: those receive relevance but
    pass none down, tests/test_architectures.py; flat first layer, tiny stabilizers)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = np.load(root / "models" / "digits_seg_samples.npz")
    model = onnx.load(str(root / "models" / "digits_unet.onnx"))
    trained = lrpc.Session(lrpc.compile(model, "epsilon-plus-flat"), providers=["CPUExecutionProvider"])
    mask = trained.explain(data["images"], "class:1").output > 0.5
    iou = (mask & (data["masks"] > 0)).sum() / (mask | (data["masks"] > 0)).sum()
    assert iou > 0.9  # the shipped model is trained (test IoU 0.97 over the whole test split)
    compiled = lrpc.compile(_without_biases(model), "epsilon-plus-flat", epsilon=1e-9, stabilizer_eps=1e-9)
    e = lrpc.Session(compiled, providers=["CPUExecutionProvider"]).explain(data["images"], "class:1")
    predicted = (e.output > 0.5).sum(axis=(1, 2, 3))
    assert np.all(predicted > 5)
    np.testing.assert_allclose(e.relevance.sum(axis=(1, 2, 3), dtype=np.float64), predicted, rtol=1e-5)


# ------------------------------------------------------------------------------------------ in-graph top-1 seed

@pytest.mark.parametrize("model_file, samples", [("digits_cnn.onnx", "digits_samples.npz"),
                                                  ("digits_unet.onnx", "digits_seg_samples.npz")])
def test_in_graph_top1_seed_equals_the_fed_top1_seed(model_file, samples):
    """compile(seed="top1"): one run with only the model's inputs gives the relevance of the fed top-1 seed
    (bit for bit: same graph below the seed) and names the chosen index, a maximum of the scores (the
    U-Net's sigmoid saturates to 1.0 at many pixels: there the logits decide)."""
    from pathlib import Path

    import onnxruntime as ort

    root = Path(__file__).resolve().parents[1]
    x = np.load(root / "models" / samples)["images"]
    own = lrpc.compile(root / "models" / model_file, "epsilon-gamma-box", seed="top1")
    fed = lrpc.compile(root / "models" / model_file, "epsilon-gamma-box")
    assert [i.name for i in own.graph.input] == ["input"] and own.graph.output[-1].name == "relevance_target"
    sess = ort.InferenceSession(own.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, relevance, chosen = sess.run(None, {"input": x})
    flat = scores.reshape(len(x), -1)  # the arg-max is taken on the explained logits: a maximum of the
    assert np.array_equal(flat[np.arange(len(x)), chosen], flat.max(axis=1))  # (monotone) scores, ties aside
    seed = np.zeros((len(x), scores[0].size), np.float32)
    seed[np.arange(len(x)), chosen] = 1
    want = ort.InferenceSession(fed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x, "relevance_seed": seed.reshape(scores.shape)})[1]
    np.testing.assert_array_equal(relevance, want)
    s = lrpc.Session(own, providers=["CPUExecutionProvider"])
    e = s.explain(x)
    assert np.array_equal(e.target, chosen) and np.array_equal(e.relevance, want) and e.seed.sum() == len(x)
    assert len(s.explain_topk(x, 1)) == 1
    for call, message in ((lambda: s.explain(x, 3), "top-1 output only"), (lambda: s.explain_topk(x, 2), "not top2"),
                          (lambda: s.run({"input": x}, seed), "takes no seed")):
        with pytest.raises(InputError, match=message):
            call()
    # compiled with seed="switch": a seed-input model whose Session does the same in one run, through its switch
    switched = lrpc.compile(root / "models" / model_file, "epsilon-gamma-box", seed="switch")
    before = switched.SerializeToString()
    session = lrpc.Session(switched, providers=["CPUExecutionProvider"])
    assert switched.SerializeToString() == before  # the caller's model is left as it was
    runs = _counted(session)
    e = session.explain(x)
    assert len(runs) == 1 and np.array_equal(e.target, chosen) and np.array_equal(e.relevance, want)
    assert np.array_equal(e.seed.reshape(len(x), -1), seed)
    fed_run = session.run({"input": x}, seed.reshape(scores.shape))  # a fed seed goes through unchanged
    assert "relevance_target" not in fed_run and np.array_equal(fed_run["relevance"], want)
    assert session.inputs == ["input"] and len(runs) == 2
    # seed_for and explain_topk(x, 1) take the same arg-max as explain, in one run each
    assert np.array_equal(session.seed_for(x, "top1"), e.seed) and len(runs) == 3
    [top] = session.explain_topk(x, 1)
    assert np.array_equal(top.target, chosen) and np.array_equal(top.relevance, want) and len(runs) == 4
    # a plain seed-input model: top-1 read off the scores (first index where they tie, e.g. a saturated sigmoid's
    # 1.0s; elsewhere the same class), then explained with its seed: two runs
    plain = lrpc.Session(fed, providers=["CPUExecutionProvider"])
    runs = _counted(plain)
    e = plain.explain(x)
    first = flat.argmax(axis=1)
    assert len(runs) == 2 and np.array_equal(e.target, first)
    assert np.all((first == chosen)[flat.max(axis=1) > np.sort(flat, axis=1)[:, -2]])
    seed = np.zeros_like(seed)
    seed[np.arange(len(x)), first] = 1
    np.testing.assert_array_equal(e.relevance, ort.InferenceSession(fed.SerializeToString(), providers=[
        "CPUExecutionProvider"]).run(None, {"input": x, "relevance_seed": seed.reshape(scores.shape)})[1])


def test_session_without_the_explained_tensor_runs_unswitched():
    """A compiled file whose explained tensor was renamed afterwards (graph tools do) still loads and explains
    top-1 (from the scores: Session reads no graph tensor by the recorded name)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    x = np.load(root / "models" / "digits_samples.npz")["images"][:3]
    compiled = lrpc.compile(root / "models" / "digits_cnn.onnx", "epsilon")
    want = lrpc.Session(compiled, providers=["CPUExecutionProvider"]).explain(x)
    for p in compiled.metadata_props:
        if p.key == "lrpc.explained":
            p.value = "renamed_by_a_tool"
    e = lrpc.Session(compiled, providers=["CPUExecutionProvider"]).explain(x)
    assert np.array_equal(e.target, want.target) and np.allclose(e.relevance, want.relevance, rtol=1e-6, atol=1e-9)

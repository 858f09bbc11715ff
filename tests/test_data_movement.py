"""Data movement whose relevance is routed as the elements moved: Gather with constant indices or indices read at run
time (each element gets the relevance of every copy; ScatterElements with reduction add), Expand and Tile (the sum
over the copies), dynamo's
``aten.as_strided`` (Gather of a flattened tensor in the order of a transposed view: passes/gather_as_layout.py makes
it Reshape/Transpose), and squeeze-and-excitation gates broadcast by Expand (ECA: ``x * gate.expand_as(x)``).

Oracles: (1) a dense float64 reference, ``R_x = x ⊙ Jᵀ Wᵀ (s / y)`` for ``y = W · J x`` with J the 0/1 matrix of the
movement (LRP-0 of a linear map, exact); (2) tiny torch modules exported by both exporters: forward equal to torch's,
LRP-0 (epsilon 0, seed one-hot × logit) = gradient × input of the torch module, with the gate detached (the gate
gets no relevance) and LayerNorm's σ detached (its rule), float32 1e-4 relative L2."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")  # (exports torch models; the pure-ONNX tests run without torch)
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lrpc
from conftest import rel_l2, run_onnx
from lrpc.passes import canonize
from lrpc.passes.gather_as_layout import transposed_view
from torch_fixtures import grad_x_input_top1

# ------------------------------------------------------------------------------------------------ (1) dense, float64

X_SHAPE = (2, 3, 4, 5)
MOVES = {  # name: (input shape, node, extra initializers)
    "gather_axis1_duplicates": (X_SHAPE, ("Gather", {"axis": 1}), {"i": np.array([[2, 0], [2, 2]], np.int64)}),
    "gather_axis3_negative": (X_SHAPE, ("Gather", {"axis": -1}), {"i": np.array([-1, 0, -1, 3], np.int64)}),
    "gather_scalar_axis2": (X_SHAPE, ("Gather", {"axis": 2}), {"i": np.array(1, np.int64)}),
    "gather_range_axis3": (X_SHAPE, ("Gather", {"axis": 3}), {"i": np.array([[1, 2], [3, 4]], np.int64)}),
    "gather_scalar_axis0": (X_SHAPE, ("Gather", {"axis": 0}), {"i": np.array(-1, np.int64)}),
    "gather_flat_overlapping": ((24,), ("Gather", {"axis": 0}),
                                {"i": np.lib.stride_tricks.as_strided(np.arange(24), (2, 3, 4), (80, 16, 8)) // 8}),
    "gather_flat_transposed": ((24,), ("Gather", {"axis": 0}),
                               {"i": np.arange(24).reshape(2, 3, 4).transpose(0, 2, 1).copy()}),
    "gather_nd_pairs_repeated": (X_SHAPE, ("GatherND", {}), {"i": np.array([[[1, 2], [0, 0]], [[1, 2], [1, -1]]])}),
    "gather_nd_full_index": (X_SHAPE, ("GatherND", {}), {"i": np.array([[0, 2, 3, 4], [0, 2, 3, 4], [1, 0, 0, 1]])}),
    "gather_elements_last_axis": (X_SHAPE, ("GatherElements", {"axis": -1}),
                                  {"i": np.random.default_rng(3).integers(-5, 5, (2, 3, 4, 3))}),  # (repeats too)
    "tile_axes_1_and_3": (X_SHAPE, ("Tile", {}), {"i": np.array([1, 2, 1, 3], np.int64)}),
    "expand_spatial": ((2, 3, 1, 1), ("Expand", {}), {"i": np.array(X_SHAPE, np.int64)}),
    "expand_new_leading_axes": ((3, 1, 5), ("Expand", {}), {"i": np.array(X_SHAPE, np.int64)}),
}


def _move(name: str, x: np.ndarray) -> np.ndarray:
    _, (op, attrs), consts = MOVES[name]
    if op == "Expand":
        return np.broadcast_to(x, tuple(consts["i"]))
    if op == "Tile":
        return np.tile(x, tuple(consts["i"]))
    if op == "GatherND":
        i = consts["i"]
        return x[tuple(np.moveaxis(i, -1, 0))]
    if op == "GatherElements":
        return np.take_along_axis(x, consts["i"], axis=attrs["axis"])
    return np.take(x, consts["i"], axis=attrs["axis"])


def _dense_model(name: str, w: np.ndarray, run_time: bool = False) -> onnx.ModelProto:
    """``y = W · move(x)``; ``run_time``: the indices are an input of the graph (read at run time), else constants."""
    shape, (op, attrs), consts = MOVES[name]
    out = _move(name, np.zeros(shape))
    flat = [helper.make_node("Reshape", ["m", "flat"], ["f"], name="flatten")]
    nodes = [helper.make_node(op, ["x", "i"], ["m"], name="move", **attrs), *flat,
             helper.make_node("MatMul", ["f", "w"], ["y"], name="dense")]
    inits = [] if run_time else [numpy_helper.from_array(v, k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array([1, out.size], np.int64), "flat"), numpy_helper.from_array(w, "w")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, list(shape))]
    if run_time:
        inputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, list(np.shape(consts["i"]))))
    graph = helper.make_graph(nodes, name, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, w.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("run_time", [False, True], ids=["constant", "run_time"])
@pytest.mark.parametrize("name", list(MOVES))
def test_moved_relevance_equals_dense_reference(name, run_time):
    """Also with the indices an input of the graph (computed from inputs other than the explained one, as a
    sequence classifier's last-token positions from the ids): read at run time."""
    if run_time and not name.startswith("gather"):
        pytest.skip("an Expand's shape, a Tile's repeats: not indices")
    rng = np.random.default_rng(0)
    shape = MOVES[name][0]
    x = rng.standard_normal(shape)
    n_out = _move(name, x).size
    w = rng.standard_normal((n_out, 6))
    model = _dense_model(name, w, run_time)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    seed = rng.standard_normal((1, 6))
    feeds = {"x": x, "relevance_seed": seed}
    if run_time:
        feeds["i"] = np.asarray(MOVES[name][2]["i"], np.int64)
    out = run_onnx(compiled, feeds)
    # J: column j is the movement of the j-th unit vector
    J = np.stack([_move(name, e.reshape(shape)).reshape(-1) for e in np.eye(x.size)], axis=1)
    y = J @ x.reshape(-1) @ w
    np.testing.assert_allclose(out["y"][0], y, rtol=1e-12)
    want = x.reshape(-1) * (J.T @ (w @ (seed[0] / y)))
    assert rel_l2(out["relevance"].reshape(-1), want) < 1e-12
    if "transposed" in name and not run_time:  # a transposed view: Reshape/Transpose, no Gather left
        assert {n.op for n in canonize(model).graph.nodes} == {"Reshape", "Transpose", "Gemm"}


@pytest.mark.parametrize("pieces", [[0, 1, 2], [2, 1], [[0, 1], 2], [0, 2]], ids=["all", "last_two", "range_and_one",
                                                                                  "gap"])
def test_slices_of_one_axis_send_back_one_tensor(pieces):
    """Gathers of pieces of one axis (q, k and v of a packed projection) each through its own dense layer: LRP-0
    equals the dense reference, and pieces that tile a range of the axis come back as one Concat (padded around the
    range), not as a zero-padded copy per piece summed."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    nodes, inits, outs, mats = [], [numpy_helper.from_array(np.array([1, -1], np.int64), "flat")], [], []
    for k, piece in enumerate(pieces):
        index = np.array(piece, np.int64)
        w = rng.standard_normal((index.size * 20, 6))
        inits += [numpy_helper.from_array(index, f"i{k}"), numpy_helper.from_array(w, f"w{k}")]
        nodes += [helper.make_node("Gather", ["x", f"i{k}"], [f"g{k}"], axis=0),
                  helper.make_node("Reshape", [f"g{k}", "flat"], [f"f{k}"]),
                  helper.make_node("MatMul", [f"f{k}", f"w{k}"], [f"y{k}"])]
        outs.append(f"y{k}")
        mats.append(np.take(np.eye(60).reshape(3, 20, 60), index, axis=0).reshape(-1, 60).T @ w)  # x (flat) -> y_k
    nodes.append(helper.make_node("Sum", outs, ["y"]))
    graph = helper.make_graph(nodes, "pieces", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    seed = rng.standard_normal((1, 6))
    out = run_onnx(compiled, {"x": x, "relevance_seed": seed})
    m = sum(mats)  # [60, 6]: y = x_flat @ m
    y = x.reshape(-1) @ m
    np.testing.assert_allclose(out["y"][0], y, rtol=1e-12)
    assert rel_l2(out["relevance"].reshape(-1), x.reshape(-1) * (m @ (seed[0] / y))) < 1e-12
    backward = [n for n in compiled.graph.node if n.name.startswith("lrp/")]
    made = {o: n.op_type for n in backward for o in n.output}
    padded_sums = [n for n in backward if n.op_type == "Sum" and any(made.get(i) == "Pad" for i in n.input)]
    assert bool(padded_sums) == (pieces == [0, 2])
    assert any(n.op_type == "Concat" for n in backward) == (pieces != [0, 2])


@pytest.mark.parametrize("indices", [[0], [1, 2], [-1], [-2, -1], [0, 2], [-1, 0, -1]],
                         ids=["first", "range", "last", "last_two", "skip", "mixed_signs"])
def test_gather_along_a_symbolic_axis(indices):
    """A Gather with constant indices along an axis whose length is known only at run time (an encoder's [CLS] token
    with a symbolic sequence length): one compiled graph gives the dense reference at two lengths (zero padding read
    at run time for one range from the start or from the end, a scatter with negative indices counted from the run-time
    length otherwise)."""
    rng = np.random.default_rng(1)
    idx = np.array(indices, np.int64)
    w = rng.standard_normal((idx.size * 5, 6))
    nodes = [helper.make_node("Gather", ["x", "i"], ["m"], name="move", axis=1),
             helper.make_node("Reshape", ["m", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="dense")]
    inits = [numpy_helper.from_array(idx, "i"), numpy_helper.from_array(np.array([2, idx.size * 5], np.int64), "flat"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, "t", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 6])], inits)
    compiled = lrpc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "epsilon",
                            epsilon=0.0, stabilizer_eps=0.0)
    for t in (4, 7):
        x = rng.standard_normal((2, t, 5))
        seed = rng.standard_normal((2, 6))
        out = run_onnx(compiled, {"x": x, "relevance_seed": seed})
        f = np.take(x, idx, axis=1).reshape(2, -1)
        np.testing.assert_allclose(out["y"], f @ w, rtol=1e-12)
        back = np.zeros_like(x)  # the gathered cells' relevance summed back to where they came from
        np.add.at(back, (slice(None), idx), (f * ((seed / (f @ w)) @ w.T)).reshape(2, idx.size, 5))
        assert rel_l2(out["relevance"], back) < 1e-12


def test_tile_along_a_symbolic_axis():
    """Tile of a tensor with a symbolic length (GCViT's legacy export tiles its global queries): the dims read at
    run time; each element gets the summed relevance of its copies (identity activation after it: the copies' R)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Tile", ["x", "r"], ["t"], name="tile"), helper.make_node("Tanh", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, "n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, "m", 6])],
                              [numpy_helper.from_array(np.array([1, 2, 2], np.int64), "r")])
    compiled = lrpc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "attnlrp")
    for n in (1, 4):
        x, seed = rng.standard_normal((2, n, 3)), rng.standard_normal((2, 2 * n, 6))
        out = run_onnx(compiled, {"x": x, "relevance_seed": seed})
        assert rel_l2(out["relevance"], seed.reshape(2, 2, n, 2, 3).sum((1, 3))) < 1e-12


def test_tile_with_computed_repeats_is_refused():
    """Repeats read from an input: no static copy count, refused in one line naming the node."""
    nodes = [helper.make_node("Tile", ["x", "r"], ["t"], name="tile"), helper.make_node("Tanh", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3]),
                                           helper.make_tensor_value_info("r", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["a", "b"])])
    message = r"^node 'tile' \(Tile\): Tile with computed repeats has no LRP rule"
    with pytest.raises(lrpc.UnsupportedError, match=message):
        lrpc.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "attnlrp")


@pytest.mark.parametrize("shape, perm", [((2, 3, 4), (0, 2, 1)), ((1, 8, 1, 1), (0, 1, 2, 3)),
                                         ((1, 8, 1, 1), (0, 2, 3, 1)), ((3, 1, 4), (2, 1, 0)), ((5,), (0,))])
def test_transposed_view_is_recognised(shape, perm):
    """The indices dynamo writes for as_strided of a transposed tensor ``Σ i_k · stride_k`` give back a Reshape and
    Transpose that move a flat tensor the same way; indices that skip, repeat or do not follow strides give None."""
    n = int(np.prod(shape))
    idx = np.arange(n).reshape(shape).transpose(perm)
    source, p = transposed_view(idx, n)
    flat = np.random.default_rng(0).standard_normal(n)
    moved = flat.reshape(source) if p is None else flat.reshape(source).transpose(p)
    np.testing.assert_array_equal(moved, flat[idx])
    assert (p is None) == (sorted(a for a in perm if shape[a] > 1) == [a for a in perm if shape[a] > 1])
    assert transposed_view(idx - n, n) is not None  # negative indices count from the end
    if n > 1:
        repeated = idx.copy()
        repeated.reshape(-1)[-1] = repeated.reshape(-1)[0]
        assert transposed_view(repeated, n) is None
        swapped = idx.copy().reshape(-1)
        swapped[[0, -1]] = swapped[[-1, 0]]
        assert transposed_view(swapped.reshape(idx.shape), n) is None
        assert transposed_view(idx, n + 1) is None


@pytest.mark.parametrize("op", ["Gather", "GatherElements", "GatherND"])
def test_gather_with_indices_from_the_explained_input_is_refused(op):
    """Indices that depend on the explained input (an arg-max of it) would let relevance choose its own path."""
    rng = np.random.default_rng(0)
    shape = {"Gather": [3], "GatherElements": [1, 3, 3], "GatherND": [1, 1]}[op]
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),  # (an integer made from x, of the right shape)
             helper.make_node("Cast", ["s"], ["si"], to=TensorProto.INT64),
             helper.make_node("Mul", ["si", "zero"], ["z"]), helper.make_node("Expand", ["z", "ishape"], ["i"]),
             helper.make_node(op, ["x", "i"], ["g"], name="pick", **({} if op == "GatherND" else {"axis": 1})),
             helper.make_node("Reshape", ["g", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "w"], ["y"], name="dense")]
    size = {"Gather": 9, "GatherElements": 9, "GatherND": 12}[op]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(np.array([1, size], np.int64), "flat"),
                               numpy_helper.from_array(np.array(0, np.int64), "zero"),
                               numpy_helper.from_array(np.array(shape, np.int64), "ishape"),
                               numpy_helper.from_array(rng.standard_normal((size, 2)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    message = rf"^node 'pick' \({op}\): {op} with indices computed from the explained input has no LRP rule"
    with pytest.raises(lrpc.UnsupportedError, match=message):
        lrpc.compile(model, "epsilon")


# ------------------------------------------------------------------------------------------------ (2) torch exports

class LayerNorm2dDetached(nn.Module):
    """torchvision's LayerNorm2d (channels-last permute, LayerNorm, permute back), or with σ detached: the function
    whose gradient × input is LRP-0 of lrpc's LayerNorm rule."""

    def __init__(self, c: int, detach: bool):
        super().__init__()
        self.norm, self.detach = nn.LayerNorm(c, eps=1e-6), detach

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self.detach:
            u = x.mean(-1, keepdim=True)
            sigma = (x.var(-1, unbiased=False, keepdim=True) + self.norm.eps).sqrt().detach()
            x = (x - u) / sigma * self.norm.weight + self.norm.bias
        else:
            x = self.norm(x)
        return x.permute(0, 3, 1, 2)


class ConvNeXtHead(nn.Module):
    """A ConvNeXt block's channels-last Linear with residual, then the head (pool, LayerNorm2d, Linear): dynamo writes
    the pooled map's restride as as_strided (Gather of the flattened map)."""

    def __init__(self, detach: bool = False):
        super().__init__()
        self.c1, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8)
        self.pool, self.norm, self.fc = nn.AdaptiveAvgPool2d(1), LayerNorm2dDetached(8, detach), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = self.lin(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + h
        return self.fc(self.norm(self.pool(h)).flatten(1))


class ECANet(nn.Module):
    """Efficient channel attention as timm writes it (``x * gate.expand_as(x)``, the gate a Conv1d over the pooled
    channels), then a broadcast of the pooled map on the signal path (``h + mean(h).expand_as(h)``)."""

    def __init__(self, detach: bool = False):
        super().__init__()
        self.c1, self.eca = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.c2, self.fc, self.detach = nn.Conv2d(8, 6, 3, stride=2), nn.Linear(6, 5), detach

    def forward(self, x):
        h = torch.relu(self.c1(x))
        g = self.eca(h.mean((2, 3)).view(h.shape[0], 1, -1)).sigmoid().view(h.shape[0], -1, 1, 1)
        h = h * (g.detach() if self.detach else g).expand_as(h)
        h = torch.relu(self.c2(h + h.mean((2, 3), keepdim=True).expand_as(h)))
        return self.fc(h.mean((2, 3)))


class TokenPick(nn.Module):
    """Tokens [N, HW, C] from a Conv, the first token (ViT's class token ``x[:, 0]``) and a channel pick with a
    repeat (``x[:, :, [2, 0, 2]]``): Gathers with constant indices on the signal path."""

    def __init__(self, detach: bool = False):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 6, 3, stride=2), nn.Linear(6 + 3 * 16, 5)

    def forward(self, x):
        t = torch.relu(self.c1(x)).flatten(2).transpose(1, 2)
        return self.fc(torch.cat([t[:, 0], t[:, :, [2, 0, 2]].flatten(1)], 1))


# name: (module, {exporter: the op of the pattern in its export})
NETS = {"convnext_head": (ConvNeXtHead, {"dynamo": "Gather"}),
        "eca": (ECANet, {"legacy": "Expand", "dynamo": "Expand"}),
        "token_pick": (TokenPick, {"legacy": "Gather", "dynamo": "GatherND"})}
CASES = [(name, exporter) for name, (_, ops) in NETS.items() for exporter in ("legacy", "dynamo")]


def _export(net: nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(net, (x,), dynamo=True, verbose=False, input_names=["input"]).model_proto
        buf = io.BytesIO()
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["input"])
        return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name, exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_lrp0_is_gradient_times_input_of_exports(name, exporter):
    make, ops = NETS[name]
    torch.manual_seed(0)
    net, twin = make().eval(), make(detach=True).eval()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    model = _export(net, x, exporter)
    if exporter in ops:  # the pattern this case is about is in the export
        assert ops[exporter] in {n.op_type for n in model.graph.node}
    if name == "convnext_head":  # as_strided is a layout op for the passes (LayerNorm between Transposes)
        assert "Gather" not in {n.op for n in canonize(model).graph.nodes}
    _, seed, want = grad_x_input_top1(twin, x)
    compiled = lrpc.compile(model, "epsilon", epsilon=0.0, stabilizer_eps=0.0)
    out = run_onnx(compiled, {"input": x.numpy(), "relevance_seed": seed})
    logits = net(x).detach().numpy()
    np.testing.assert_allclose(out[model.graph.output[0].name], logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    assert np.abs(want).sum() > 0 and rel_l2(out["relevance"], want) < 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gradient_check_runs_through_gathers(exporter, tmp_path):
    """Gather/GatherND with constant indices are linear with exact adjoints: ``lrpc check``'s gradient check (LRP-0
    against directional derivatives of the forward) covers a ReLU net with them instead of skipping it."""
    from lrpc.check import run_check
    from lrpc.composites import Options

    torch.manual_seed(0)
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    model = _export(TokenPick().eval(), x, exporter)
    assert NETS["token_pick"][1][exporter] in {n.op_type for n in model.graph.node}
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = run_check(str(tmp_path / "m.onnx"), "epsilon-gamma-box", Options(low=-3.0, high=3.0),
                       inputs={"input": x.numpy()})
    g = next(c for c in report.checks if c.name == "gradient")
    assert g.passed and not g.skipped and g.figure <= 1e-5, g.message


def test_last_position_of_a_dynamic_length(tmp_path):
    """``h[:, h.shape[1] - 1]`` (legacy export, dynamic batch and length): the index is computed from the length,
    ``Sub(T, 1)`` rewritten as an Add of a scalar that stays a scalar, so the Gather keeps its output's rank and
    reads the index at run time. Oracle: LRP-0 (lrpc check's ruleset: epsilon also on bias adds) = gradient × input
    of the torch module at two lengths, one compiled graph."""
    from lrpc.gradient import ruleset

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.o(h[:, h.shape[1] - 1])

    torch.manual_seed(0)
    net = Last().eval().requires_grad_(False)
    path = tmp_path / "last.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 5, 6),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "B", 1: "T"}})
    session = lrpc.Session(lrpc.compile(str(path), ruleset()), ["CPUExecutionProvider"])
    for t in (5, 8):
        x = torch.randn(2, t, 6)
        xt = x.clone().requires_grad_(True)
        y = net(xt)
        y[:, 1].sum().backward()
        seed = np.zeros((2, 3), np.float32)
        seed[:, 1] = y[:, 1].detach().numpy()  # (one-hot × logit: LRP-0 is then gradient × input)
        e = session.explain(x.numpy(), seed=seed)
        assert e.output.shape == (2, 3)
        assert rel_l2(e.relevance, (xt.grad * xt).detach().numpy()) < 1e-5

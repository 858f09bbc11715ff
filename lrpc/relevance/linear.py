"""ONE generic emitter for every rule on every linear op, through the op's adjoint.

A :class:`View` says how to run a linear op forward with other weights and how to apply its adjoint
(vector-Jacobian product): Conv <-> ConvTranspose, Gemm/MatMul <-> MatMul with the weight, Einsum <-> Einsum,
element-wise affine layers (standalone BatchNormalization, Mul/Add by a constant) <-> Mul. Derived weights (W+,
W+γW+, …) are built in-graph from the one stored initializer, so onnxruntime folds them once at session start and
the file does not grow."""
from __future__ import annotations

import numpy as np

from ..errors import InputError, UnsupportedError, where
from ..graph import const_value, is_const, static_dims
from ..rules import Rule, weight_basis
from . import EXACT, declare, depthwise, register
from .gamma import signed_gamma
from .stabilize import complement, indicator, own_quotient, quotient, scalar_of


class View:
    """A linear node seen as ``z = f(x; W) + b``."""

    def __init__(self, ctx, node, x, w, bias):
        self.ctx, self.b, self.node = ctx, ctx.b, node
        self.x, self.w, self.bias = x, w, bias  # bias: constant tensor or None
        self.z = node.outputs[0]

    def forward(self, x, w, bias):
        raise NotImplementedError

    def adjoint(self, c, w):
        raise NotImplementedError

    def bias_for_output(self, bias):
        """``bias`` shaped to broadcast over the output (for ``z - b``)."""
        return bias

    def without_bias(self):
        """``f(x; W)`` by a forward of its own (the output minus the bias would cancel where it is small next to
        the bias): for the accounts of :func:`emit_rule`."""
        return self.forward(self.x, self.w, None)

    def bias_shape(self) -> list[int]:
        """Shape of a bias that ``forward`` takes (one value per output channel / feature)."""
        return [1]

    def constant_bias(self, value):
        """``value`` (a number or an array) as a constant bias ``forward`` takes: the layer's bias shape."""
        shape = const_value(self.bias).shape if self.bias is not None else self.bias_shape()
        return self.b.const(np.broadcast_to(np.asarray(value, np.float64), shape).astype(self.b.dtype))

    def unbroadcast(self, r):
        return r


class ConvView(View):
    def _attrs(self):
        a = self.node.attrs
        keep = ("kernel_shape", "strides", "pads", "dilations", "group")
        return {k: a[k] for k in keep if k in a}

    def forward(self, x, w, bias):
        return self.b.op("Conv", [x, w] + ([bias] if bias is not None else []), self._attrs())

    def adjoint(self, c, w):
        a = self._attrs()
        xs = static_dims(self.x, self.node, "input shape")[2:]
        zs = static_dims(self.z, self.node, "output shape")[2:]
        n = len(xs)
        k, s, d, p = (a["kernel_shape"], a.get("strides", [1] * n), a.get("dilations", [1] * n),
                      a.get("pads", [0] * 2 * n))
        span = [(k[i] - 1) * d[i] + 1 for i in range(n)]
        op = [xs[i] - (s[i] * (zs[i] - 1) + span[i] - p[i] - p[n + i]) for i in range(n)]
        flipped_pads = [span[i] - 1 - p[i] for i in range(n)] + [span[i] - 1 - p[n + i] + op[i] for i in range(n)]
        if all(v == 1 for v in s) and min(flipped_pads) >= 0:
            # stride 1: the adjoint is a Conv with flipped, in/out-swapped weights (faster kernels than ConvTranspose)
            return self.b.op("Conv", [c, self._flipped(w)], {**a, "pads": flipped_pads})
        # (portable: every grouped layer, no grouped ConvTranspose, which IREE cannot compile)
        portable = self.ctx.provider == "portable"
        grouped = depthwise.is_depthwise(self.node) or (portable and a.get("group", 1) > 1)
        dw_pads = depthwise.pads_for(xs, zs, k, s, d, p) if grouped else None
        if dw_pads is not None:
            return depthwise.strided_adjoint(self.b, c, self._flipped(w), a["group"], k, s, d, dw_pads,
                                             zs if portable else None)
        return self.b.op("ConvTranspose", [c, w], {**a, "output_padding": op})

    def _flipped(self, w):
        """[Cout, Cin/g, *k] -> [Cin, Cout/g, *k] per group, spatially reversed (constant-folded at session start).
        As few ops as the layer allows (one group: no Reshapes; a 1x1 kernel: no reversal): onnxruntime's constant
        folding keeps every intermediate until it ends, and those set the peak memory of a session's start."""
        if w.name not in self.ctx.cache:
            b, g = self.b, int(self.node.attrs.get("group", 1))
            shape = list(self.w.shape)  # (graphsurgeon knows shapes without loading values)
            cout, cin_g, ks = shape[0], shape[1], shape[2:]
            n = len(ks)
            if g == 1:
                t = b.op("Transpose", [w], {"perm": [1, 0, *range(2, 2 + n)]})
            else:
                t = b.op("Reshape", [w, b.ints([g, cout // g, cin_g, *ks])])
                t = b.op("Transpose", [t], {"perm": [0, 2, 1, *range(3, 3 + n)]})
                t = b.op("Reshape", [t, b.ints([g * cin_g, cout // g, *ks])])
            axes = [2 + i for i in range(n) if ks[i] != 1]
            if axes:
                k = len(axes)
                t = b.op("Slice", [t, b.ints([-1] * k), b.ints([-(2 ** 62)] * k), b.ints(axes), b.ints([-1] * k)])
            self.ctx.cache[w.name] = t
        return self.ctx.cache[w.name]

    def bias_shape(self):
        return [self.w.shape[0]]

    def bias_for_output(self, bias):
        rank = len(self.z.shape)
        return self.b.op("Reshape", [bias, self.b.ints([-1] + [1] * (rank - 2))])


class ConvTransposeView(ConvView):
    def forward(self, x, w, bias):
        a = {**self._attrs(),
             "output_padding": self.node.attrs.get("output_padding", [0] * (len(self.node.attrs["kernel_shape"])))}
        return self.b.op("ConvTranspose", [x, w] + ([bias] if bias is not None else []), a)

    def adjoint(self, c, w):
        return self.b.op("Conv", [c, w], self._attrs())

    def bias_shape(self):
        return [self.w.shape[1] * int(self.node.attrs.get("group", 1))]


class GemmView(View):
    """Gemm in normal form: ``z = x Wᵀ + b`` with W [out, in]."""

    def forward(self, x, w, bias):
        return self.b.op("Gemm", [x, w] + ([bias] if bias is not None else []), {"transB": 1})

    def adjoint(self, c, w):
        return self.b.op("MatMul", [c, w])

    def bias_shape(self):
        return [self.w.shape[0]]


class MatMulView(View):
    """``z = x W`` with W [in, out] and x of any rank ≥ 2."""

    def forward(self, x, w, bias):
        z = self.b.op("MatMul", [x, w])
        return z if bias is None else self.b.add(z, bias)

    def adjoint(self, c, w):
        """``c Wᵀ`` as a Gemm that reads W as it is (over ``c`` flattened to 2-d): a transposed copy would be a
        second copy of the weight in memory (``lrpc.Session(..., low_memory=True)`` then holds it once)."""
        b = self.b
        g = b.op("Gemm", [b.op("Flatten", [c], {"axis": -1}), w], {"transB": 1})
        lead = b.op("Slice", [b.shape_of(c), b.ints([0]), b.ints([-1])], dtype=np.int64)  # (c's: x kept no longer)
        return b.op("Reshape", [g, b.op("Concat", [lead, b.ints([self.w.shape[0]])], {"axis": 0}, dtype=np.int64)])


class ColumnsView(View):
    """A Gemm/MatMul with a constant weight and no bias restricted to the output columns (last axis) where the
    relevance arriving is not zero anywhere in the batch: ``x``'s relevance is the same, since every rule sends each
    output's relevance down in proportion to it and a column that receives none sends none. For wide layers
    reached by a sparse seed (a decoder's vocabulary head explaining a few tokens): the adjoint and the rule's
    element-wise work run over those columns only, not over the vocabulary."""

    def __init__(self, inner: View, R):
        b = inner.b
        batch_axes = list(range(len(R.shape) - 1))
        seeded = b.reduce_max(b.op("Abs", [R]), batch_axes, keepdims=0) if batch_axes else b.op("Abs", [R])
        self.columns = b.op("Reshape", [b.op("NonZero", [seeded], dtype=np.int64), b.ints([-1])], dtype=np.int64)
        w_axis = 0 if isinstance(inner, GemmView) else 1  # (Gemm in normal form: W [out, in]; MatMul: W [in, out])
        super().__init__(inner.ctx, inner.node, inner.x, inner.w, None)
        self.inner, self.w, self.z = inner, self.select(inner.w, w_axis), self.select(inner.z)
        self.z.shape = [*inner.z.shape[:-1], "columns"] if inner.z.shape is not None else None

    def select(self, t, axis: int = -1):
        return self.b.op("Gather", [t, self.columns], {"axis": axis})

    def forward(self, x, w, bias):
        return self.inner.forward(x, w, bias)

    def adjoint(self, c, w):
        return self.inner.adjoint(c, w)


WIDE = 4096  # output width from which a seeded layer runs its rule over the seeded columns only (ColumnsView)


def _seeded_columns(ctx, view: View, rule: Rule, R):
    """``(view, R)`` restricted to the seeded columns (:class:`ColumnsView`) where the layer's output is the
    explained one and at least :data:`WIDE` wide, its weight constant and 2-d, no bias; as they are elsewhere (and
    for the norm-scale stabilizer, whose scale is a maximum over all outputs, and the portable lowering, whose
    runtimes may lack NonZero)."""
    if (R is not ctx.seed or type(view) not in (GemmView, MatMulView) or view.bias is not None
            or not is_const(view.w) or len(view.w.shape) != 2 or rule.stabilizer == "norm-scale"
            or ctx.provider == "portable" or R.shape is None or not isinstance(R.shape[-1], int)
            or R.shape[-1] < WIDE):
        return view, R
    view = ColumnsView(view, R)
    return view, view.select(R)


class ScaleView(View):
    """Element-wise affine ``z = x * W + b`` (W, b broadcast constants)."""

    def forward(self, x, w, bias):
        z = self.b.mul(x, w)
        return z if bias is None else self.b.add(z, bias)

    def adjoint(self, c, w):
        return self.unbroadcast(self.b.mul(c, w))

    def unbroadcast(self, r):
        return unbroadcast(self.b, r, self.x, self.z)


class EinsumView(View):
    """Einsum of the input with one constant operand (``bchw,oc->bohw``, ``...c,dc->...d``): forward with the
    layer's equation, adjoint from the output's and the weight's subscripts to the input's."""

    def __init__(self, ctx, node, x, w, terms: tuple[str, str, str], x_first: bool):
        super().__init__(ctx, node, x, w, None)
        self.sx, self.sw, self.sz = terms
        self.x_first = x_first

    def forward(self, x, w, bias):
        eq = f"{self.sx},{self.sw}->{self.sz}" if self.x_first else f"{self.sw},{self.sx}->{self.sz}"
        z = self.b.op("Einsum", [x, w] if self.x_first else [w, x], {"equation": eq})
        return z if bias is None else self.b.add(z, bias)

    def adjoint(self, c, w):
        return self.b.op("Einsum", [c, w], {"equation": f"{self.sz},{self.sw}->{self.sx}"})


def einsum_equation(node) -> tuple[str, list[str], str]:
    """An Einsum's equation without spaces, its operands' subscripts and the output's (an implicit output: the
    subscripts used once, in alphabetical order, after an ellipsis)."""
    eq = node.attrs.get("equation", "")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    if not arrow:
        letters = [c for c in lhs if c.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return eq, lhs.split(","), out


def einsum_terms(node) -> tuple[str, str, str]:
    """(input, weight, output) subscripts of an Einsum of one computed tensor with one constant (a linear layer
    whose adjoint is again an Einsum); UnsupportedError for the equations that are not (two computed operands,
    a diagonal, an input index summed away without the weight)."""
    eq, terms, out = einsum_equation(node)
    computed = [t for t in node.inputs if not is_const(t)]
    if len(node.inputs) != 2 or len(computed) != 1:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}' has an LRP rule only with two operands, one of them "
                               f"constant (a linear layer); here {len(node.inputs)} operand(s), "
                               f"{len(computed)} computed")
    sx, sw = terms if node.inputs[0] is computed[0] else terms[::-1]
    bad = next((t for t in (sx, sw, out) if len(t.replace("...", "")) != len(set(t.replace("...", "")))), None)
    if bad is not None:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}': repeated subscripts in '{bad}' (a diagonal) have no "
                               "LRP rule")
    if "..." in sw:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}': an ellipsis in the constant operand is not supported")
    lost = [c for c in sx.replace("...", "") if c not in out and c not in sw]
    if lost:
        raise UnsupportedError(f"{where(node)}: Einsum '{eq}': index '{lost[0]}' of the input is summed away without "
                               f"the weight (a sum, not a linear layer with weights)")
    return sx, sw, out


def unbroadcast(b, r, x, z):
    """Sum ``r`` (shaped like ``z``) over the axes along which ``x`` was broadcast to ``z``."""
    if x.shape is None or z.shape is None:
        return r
    xs, zs = list(x.shape), list(z.shape)
    lead = len(zs) - len(xs)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(xs) if d == 1 and zs[lead + i] != 1]
    if not axes:
        return r
    r = b.reduce_sum(r, axes, keepdims=1)
    return b.op("Reshape", [r, b.shape_of(x)]) if lead else r


def view_of(ctx, node) -> View:
    op, ins = node.op, node.inputs
    def bias(i):  # a zero bias is no bias: the forward output can then be reused as is
        return ins[i] if len(ins) > i and is_const(ins[i]) and np.any(const_value(ins[i])) else None

    if op in ("Conv", "ConvTranspose"):
        _check_groups(node)
        return (ConvView if op == "Conv" else ConvTransposeView)(ctx, node, ins[0], ins[1], bias(2))
    if op == "Gemm":
        return GemmView(ctx, node, ins[0], ins[1], bias(2))
    if op == "MatMul":
        return MatMulView(ctx, node, ins[0], ins[1], None)
    if op == "Einsum":
        sx, sw, sz = einsum_terms(node)
        x_first = not is_const(ins[0])
        return EinsumView(ctx, node, *(ins if x_first else ins[::-1]), (sx, sw, sz), x_first)
    if op == "BatchNormalization":
        if not all(is_const(t) for t in ins[1:5]) or len(node.outputs) > 1:
            raise UnsupportedError(f"{where(node)}: BatchNormalization needs constant statistics and inference mode")
        from ..passes.fold_batchnorm import bn_affine

        scale, shift = bn_affine(node)
        rank = len(ins[0].shape) if ins[0].shape is not None else 4
        dtype = ctx.b.dtype
        shape = [-1] + [1] * (rank - 2)
        return ScaleView(ctx, node, ins[0], ctx.b.const(scale.reshape(shape), dtype),
                         ctx.b.const(shift.reshape(shape), dtype))
    if op == "Mul" and not any(is_const(t) for t in ins):  # a gated product: the gate is the (input-dependent) scale
        dead = [t for t in ins if t.name not in ctx.live]  # (a factor no function of the explained input is one)
        gate = dead[0] if dead else gate_operand(node, ctx.canon.activations)
        return ScaleView(ctx, node, next(t for t in ins if t is not gate), gate, None)
    # Mul / Add with one constant operand
    x = next(t for t in ins if not is_const(t))
    c = next(t for t in ins if is_const(t))
    if op == "Mul":
        return ScaleView(ctx, node, x, c, None)
    return ScaleView(ctx, node, x, ctx.b.const(np.ones([1] * max(len(const_value(c).shape), 1))), c)


def _check_groups(node) -> None:
    """InputError where a (transposed) convolution's weight and ``group`` do not fit its input's channels."""
    x, w, g = node.inputs[0], node.inputs[1], int(node.attrs.get("group", 1))
    if x.shape is None or w.shape is None or len(x.shape) < 2 or not isinstance(x.shape[1], int):
        return
    c, (cout, per_group) = x.shape[1], w.shape[:2]
    fits = (c == per_group * g and cout % g == 0) if node.op == "Conv" else (c == cout and c % g == 0)
    if not fits:
        raise InputError(f"{where(node)}: weight {list(w.shape)} with group={g} does not fit the input's {c} channels")


GATES = ("Sigmoid", "HardSigmoid", "Softmax")  # (outputs in [0, 1])
# single-op activations that gate a signal in gated MLPs (GeGLU at opset 20), besides activations written as several
# ops (SwiGLU's SiLU): a gate of lowest precedence. ReLU only in a gated MLP's form, ``relu(W1·x) ⊙ (W2·x)`` (ReGLU):
# other products with a ReLU (or a Clip) stay refused as no gate.
ACTIVATIONS = ("Gelu", "Mish", "HardSwish")
PROJECTIONS = ("Gemm", "MatMul", "Conv", "Einsum")
LAYOUT = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity", "Transpose", "Cast")


def gate_operand(node, activations=None):
    """The operand of a two-tensor Mul that is a gate: a Sigmoid/HardSigmoid/Softmax output, or a hard sigmoid written
    as a Clip whose range, times the positive constants applied after it, lies in [0, 1] (``relu6(x + 3) / 6``);
    possibly moved by layout ops. As in squeeze-and-excitation blocks and per-sample gates (a function of one
    tensor written as several ops, SiLU's ``x * sigmoid(x)`` too, is an activation instead:
    passes/activation_regions.py). Where both operands qualify, a Sigmoid/HardSigmoid beats a Clip (a ReLU6
    activation times an SE gate). A Softmax gate is split attention's (ResNeSt, SKNet: a softmax over the branches
    weighs each). Given ``activations`` (the names of the nodes making activation regions' outputs), an activation's
    output (a ReLU's only as ``relu(W1·x) ⊙ (W2·x)``, ReGLU) gates last: the factor through the activation in a
    gated MLP (SwiGLU's ``silu(gate) * up``, as CP-LRP and lxt hold it constant). UnsupportedError unless that leaves
    exactly one."""
    def scale_of(n):  # Mul / Div by a positive constant: its factor, else None
        consts = [i for i in n.inputs if is_const(i)]
        if n.op not in ("Mul", "Div") or len(consts) != 1 or (n.op == "Div" and n.inputs[1] is not consts[0]):
            return None
        k = const_value(consts[0])
        if k.size != 1 or not float(k.reshape(-1)[0]) > 0:
            return None
        return float(k.reshape(-1)[0]) if n.op == "Mul" else 1.0 / float(k.reshape(-1)[0])

    def kind(t, other) -> int:  # 3: Sigmoid/HardSigmoid/Softmax gate, 2: Clip gate, 1: an activation, 0: no gate
        factor = 1.0
        while t.inputs:
            k = 1.0 if t.inputs[0].op in LAYOUT else scale_of(t.inputs[0])
            if k is None:
                break
            factor *= k
            t = next(i for i in t.inputs[0].inputs if not is_const(i))
        n = t.inputs[0] if t.inputs else None
        if n is None:
            return 0
        if n.op in GATES:
            return 3 if factor <= 1.0 + 1e-6 else 0
        lo, hi = (n.inputs[i] if len(n.inputs) > i and n.inputs[i].name else None for i in (1, 2))
        if n.op == "Clip" and lo is not None and hi is not None and is_const(lo) and is_const(hi):
            if np.all(const_value(lo) >= 0) and np.all(const_value(hi) * factor <= 1.0 + 1e-6):
                return 2
        if activations is None:
            return 0
        if n.op == "Relu":
            mine, theirs = _projection(n.inputs[0]), _projection(other)
            return int(None not in (mine, theirs) and mine[0] != theirs[0] and mine[1] == theirs[1])
        return 1 if n.name in activations or n.op in ACTIVATIONS else 0

    pair = len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]
    kinds = [kind(t, o) for t, o in zip(node.inputs, node.inputs[::-1])] if pair else []
    best = max(kinds, default=0)
    gates = [t for t, k in zip(node.inputs, kinds) if k == best and best > 0]
    if len(gates) != 1:
        raise UnsupportedError(f"{where(node)}: Mul of two computed tensors has an LRP rule only as a gated product "
                               f"(one operand a Sigmoid/HardSigmoid/Softmax gate, a Clip with range in [0, 1] or an "
                               f"activation), or under the split rule; here {len(gates)} operand(s) are gates")
    return gates[0]


def _projection(t):
    """(linear layer, its input's name) where a linear layer with constant weights maps a tensor to ``t`` (layout ops
    and a bias Add around it), else None: a gated MLP projects both its factors from one input by two layers."""
    def back(t):  # through layout ops and constant addends
        while t.inputs and (t.inputs[0].op in LAYOUT or t.inputs[0].op == "Add") and sum(
                not is_const(i) for i in t.inputs[0].inputs) == 1:
            t = next(i for i in t.inputs[0].inputs if not is_const(i))
        return t

    t = back(t)
    n = t.inputs[0] if t.inputs else None
    if n is None or n.op not in PROJECTIONS or sum(not is_const(i) for i in n.inputs) != 1:
        return None
    return n.name, back(next(i for i in n.inputs if not is_const(i))).name


declare("Resize", "Upsample", category="resize", keeps_category=True)  # (passes/resize_to_matmul.py: MatMuls)


GATE = "lrpc.gate"  # what emission explains an element-wise Mul of two computed tensors as (emit.op_of)


@register(GATE, category="gate", keeps_nonneg=True,
          gradient="a gated product: its rule gives the gate no relevance, or half")
def gated_product(ctx, node, R_out):
    """An element-wise product ``y = a ⊙ b`` of two computed tensors that is no activation. ``split`` (AttnLRP):
    ``R_a = R_b = R / 2`` (a factor no function of the explained input gets none, the other all); any other rule
    treats the gate (:func:`gate_operand`) as the weight of the linear map of the other factor (:func:`propagate`)."""
    if not ctx.rule(node).splits:
        return propagate(ctx, node, R_out)
    b, y = ctx.b, node.outputs[0]
    live = [t.name in ctx.live for t in node.inputs]
    share = R_out[0] if sum(live) == 1 else b.mul(R_out[0], b.const(0.5))
    return [unbroadcast(b, share, t, y) if on else None for t, on in zip(node.inputs, live)]


@register("Conv", "ConvTranspose", category="conv", keeps_nonneg=True, gradient=EXACT)
@register("Gemm", "MatMul", "Einsum", category="dense", keeps_nonneg=True, gradient=EXACT)
@register("Mul", category="scale", keeps_nonneg=True, gradient=EXACT)
@register("BatchNormalization", "Add", category="scale", gradient=EXACT)
def propagate(ctx, node, R_out):
    """A linear layer under its rule. A gated product ``y = x * g`` (:func:`gate_operand`) is the element-wise
    linear map of ``x`` scaled by the gate's values: its rule (pass by default, category scale) sends
    relevance to ``x`` only; the gate's branch gets none (signal-take-all)."""
    if node.op == "Add" and sum(not is_const(t) for t in node.inputs) != 1:
        raise UnsupportedError(f"{where(node)}: Add of two non-constant tensors has no LRP rule")
    rule = ctx.rule(node)
    R = R_out[0]
    if node.op == "Add" and not rule.is_pass and not all(np.all(np.isfinite(const_value(t))) for t in node.inputs
                                                       if is_const(t)):
        return _masked_sum(ctx, node, rule, R)
    view = view_of(ctx, node)
    if rule.is_pass:
        r_in = view.unbroadcast(R)
    else:
        view, R = _seeded_columns(ctx, view, rule, R)
        r_in = emit_rule(ctx, view, rule, R)
    return [r_in if t is view.x else None for t in node.inputs]


def _masked_sum(ctx, node, rule: Rule, R):
    """``z = x + m`` with a constant ``m`` holding -inf (a causal mask folded to a constant) under epsilon:
    ``R_x = x ⊙ R / stab(z)``, computed on ``z`` itself (no bias arithmetic with infinities); 0 where ``m`` is."""
    if rule.on_sums != "share":
        raise UnsupportedError(f"{where(node)}: rule '{rule.name}' does not apply to an Add of an infinite constant "
                               "(an attention mask: use epsilon or pass)")
    x, z = next(t for t in node.inputs if not is_const(t)), node.outputs[0]
    c = quotient(ctx.b, R, z, rule, len(z.shape) if z.shape is not None else None)
    return [None if is_const(t) else unbroadcast(ctx.b, ctx.product(x, c), x, z) for t in node.inputs]


def emit_rule(ctx, view: View, rule: Rule, R):
    """Lower ``rule`` (data, see rules.py) on ``view`` with incoming relevance ``R``.

    A group's denominator is ``sum_k a_k f(input; W_k) + bias`` and the relevance sent down is
    ``sum input * W_kᵀ(sum a_k c)``: one forward and one adjoint per (input, weight) pair. Weight variants
    are either used as they are or split into basis weights (``weight_basis``: W- = W - W+, W + γW+, …),
    whichever needs fewer convolutions, chosen separately for the forwards and the adjoints: with several
    groups the basis shares work, and ``f(x; W)`` is the layer's own output (gamma behind a residual sum:
    both denominators from z and one forward f(x; γW+), then adjoints with Wup and Wdown as they are).
    Groups whose mask selects outputs that statically receive no relevance (``z<0`` behind a ReLU) are
    skipped: their message is identically zero."""
    b = ctx.b
    variants = _Variants(ctx, view, rule)
    fast = _on_own_output(ctx, view, rule, R, variants)
    if fast is None:
        fast = signed_gamma(ctx, view, rule, R)
    if fast is not None:
        return fast
    rank = len(view.z.shape) if view.z.shape is not None else None
    gamma = rule.gamma
    groups = []
    for group in rule.groups:
        if group.mask == "z<0" and ctx.no_relevance_below_zero(view.z):
            continue
        terms = [t for t in group.terms if variants.input(t.input) is not None]
        if terms:
            groups.append((group, terms))
    # forwards and adjoints each take the decomposition that needs fewer convolutions (on a tie, the
    # variants as they are: their messages need no linear combination)
    split, plain = (lambda w: weight_basis(w, gamma)), (lambda w: {w: 1.0})
    # one group: every message is a multiple of its one quotient c, so inputs that meet the same weight
    # share one adjoint: sum_i a_i input_i * Wᵀc = (sum_i a_i input_i) * Wᵀc (z-box: (x - h) * Wᵀc + (h - l) * W+ᵀc)
    shared = len(groups) == 1 and all(variants.input(t.input, numerator=True) is not None for t in groups[0][1])

    def adjoints(d) -> int:
        keys = _keys(groups, variants, d)
        return len({w for _, w in keys}) if shared else len(keys)

    def forwards(d) -> int:
        return len(_keys(groups, variants, d) - {variants.own})

    decompose = split if forwards(split) < forwards(plain) else plain
    decompose_adjoint = split if adjoints(split) < adjoints(plain) else plain
    messages: dict[tuple[str, str], list] = {}  # (input variant, weight) -> [(coefficient, message)]
    audit: list = []  # per group: (relevance passed on, bias share, where it passes relevance on)
    for group, terms in groups:
        mix: dict[tuple[str, str], float] = {}
        biases = []
        for t in terms:
            inp = variants.alias(t.input)
            for weight, a in decompose(t.weight).items():
                mix[(inp, weight)] = mix.get((inp, weight), 0.0) + t.sign * a
            bias = variants.bias(t.bias)
            if bias is not None:
                biases.append((t.sign, bias))
        mix = {k: a for k, a in mix.items() if a != 0.0}
        sent: dict[tuple[str, str], float] = {}
        for t in terms:
            for weight, a in decompose_adjoint(t.weight).items():
                key = (variants.alias(t.input), weight)
                sent[key] = sent.get(key, 0.0) + t.sign * a
        # R vanishes where z <= 0 (behind a ReLU): a z>0 mask is then a no-op, and a denominator above z
        # is positive wherever R is not zero. Where a mask keeps only z > 0 (z < 0), a denominator above
        # (below) z has that sign wherever the message survives: the sign test can go.
        quiet = ctx.no_relevance_below_zero(view.z)
        biases_kept = not rule.zero_bias or view.bias is None
        sign = variants.terms_sign(terms)
        known = ("nonneg" if sign > 0 else "nonpos" if sign < 0 else
                 "positive" if group.above_z and biases_kept and (quiet or group.mask == "z>0") else
                 "negative" if group.below_z and biases_kept and group.mask == "z<0" else None)
        shift = 0.0
        if known and rule.stabilizer == "sign" and rule.eps > 0:
            shift = rule.eps if known in ("nonneg", "positive") else -rule.eps
        z, shifted = variants.denominator(mix, biases, shift)
        c = quotient(b, R, z, rule, rank, known, shifted)
        if group.mask is not None and not (quiet and group.mask == "z>0"):  # masks are built once per layer
            c = b.mul(c, variants.mask(group.mask))
        if ctx.audit:
            audit.append(_audit_group(view, variants, group, terms, biases, c))
        for key, a in sent.items():
            messages.setdefault(key, []).append((a * group.coef, c))
    if ctx.audit:
        passable = b.sum([p for _, _, p in audit])
        kept, bias = (b.sum([a[i] for a in audit]) for i in (0, 1))
        ctx.account(view.node, kept if kept is not None else b.zeros_like(R), bias,
                    R if passable is None else b.mul(R, complement(b, passable)))
    if shared:  # messages[key] = [(a_key, c)] with the one c
        per_weight: dict[str, list] = {}
        for (inp, basis), [(a, c)] in messages.items():
            if a != 0.0:
                per_weight.setdefault(basis, []).append((a, variants.input(inp, numerator=True)))
        out = []
        for basis, uses in per_weight.items():
            scale = uses[0][0]  # into the (constant-folded) weight
            adj = view.adjoint(c, variants.weight(basis, scale))
            out.append(ctx.product(linear_combination(b, [(a / scale, t) for a, t in uses]), adj))
        return b.sum(out)
    by_input: dict[str, list] = {}
    for (inp, basis), parts in messages.items():
        parts = [(a, c) for a, c in parts if a != 0.0]
        if parts:  # the first coefficient goes into the (constant-folded) weight: one Mul pass less
            scale = parts[0][0]
            msg = linear_combination(b, [(a / scale, c) for a, c in parts])
            by_input.setdefault(inp, []).append(view.adjoint(msg, variants.weight(basis, scale)))
    out = []
    for inp, adjs in by_input.items():
        total = b.sum(adjs)
        factor = variants.input(inp, numerator=True)
        out.append(total if factor is None else ctx.product(factor, total))
    return b.sum(out)


def _on_own_output(ctx, view: View, rule: Rule, R, variants):
    """Epsilon and gamma when the relevance arriving is ``R = z ⊙ c`` with the layer's own output ``z`` (a
    branch of a residual sum under the norm rule): the masks and sign tests fold into ``z``.

    epsilon: ``R / stab(z) = c ⊙ |z| / (|z| + eps)``, also where ``R = t ⊙ c`` with ``t`` a constant multiple of ``z``
    (:func:`~lrpc.relevance.stabilize.own_quotient`); a scale by one constant value returns ``z ⊙ m`` (``m`` that
    quotient), so the layer before sees its own output too.
    gamma (input >= 0): with ``u = γ(W+x + b+) >= 0``, ``z↑ = z + u`` (used where z > 0) and
    ``z↓ = (1+γ)z - u`` (where z < 0), so both stabilized denominators are ``±D`` with
    ``D = A + u + eps`` and ``A = LeakyRelu(z, -(1+γ))`` (z where z >= 0, -(1+γ)z below). Then
    ``c↑ = Relu(z) ⊙ q``, ``c↓ = Relu(-z) ⊙ q`` with ``q = c / D``, and since W↑ = W + γW+ and
    W↓ = (1+γ)W - γW+: ``W↑ᵀc↑ + W↓ᵀc↓ = Wᵀ(q ⊙ A) + γW+ᵀ(q ⊙ z)``: no masks, one forward, two adjoints.
    None where this does not apply (other rules or stabilizers, eps = 0, biases left out of the
    denominators, a possibly negative input for gamma)."""
    factors = ctx.factors_of(R)
    if (factors is None or rule.stabilizer != "sign" or rule.eps <= 0
            or (rule.zero_bias and view.bias is not None) or not rule.own_output):
        return None
    b, z, eps, g = ctx.b, view.z, rule.eps, rule.gamma
    if g == 0.0:  # epsilon (gamma 0 is epsilon, for inputs of either sign)
        m = own_quotient(ctx, R, z, rule)  # (also where R = t ⊙ c with t a constant multiple of z)
        if m is None:
            return None
        if ctx.audit:  # (R = z ⊙ c vanishes where z = 0: no zero denominators)
            ctx.account(view.node, b.mul(m, view.without_bias()),
                        None if view.bias is None else b.mul(m, view.bias_for_output(view.bias)))
        if isinstance(view, ScaleView) and view.bias is None and scalar_of(view.w, view.x):
            return ctx.product(z, m)  # x ⊙ (m w) = z ⊙ m: the next layer sees its relevance as (its output) ⊙ m
        return ctx.product(view.x, view.adjoint(m, view.w))
    if factors[0] is not z or not ctx.nonneg(view.x) or g < 0:
        return None
    c = factors[1]
    A = b.op("LeakyRelu", [z], {"alpha": -(1.0 + g)})
    plus = variants.bias("b+")
    shift = eps + (g * const_value(plus).astype(np.float64) if plus is not None else 0.0)
    u = view.forward(view.x, variants.weight("W+", g), view.constant_bias(shift))
    # D >= eps in exact arithmetic (u >= eps, A >= 0); Max keeps it so where a runtime's convolution
    # (Winograd, TF32) rounds u below that near z = 0
    q = b.op("Div", [c, b.op("Max", [b.add(u, A), b.const(eps)])])
    if ctx.audit:  # Wᵀ(q⊙A) + γW+ᵀ(q⊙z) passes on <q⊙A, f(x; W)> + <q⊙z, f(x; γW+)>; the biases b↑ = b + γb+ (z > 0)
        # and b↓ = b + γb- (z < 0) take <q⊙A, b> + <q⊙z, γb+>
        m, n = b.mul(q, A), b.mul(q, z)
        kept = b.add(b.mul(m, view.without_bias()), b.mul(n, view.forward(view.x, variants.weight("W+", g), None)))
        bias = None
        if view.bias is not None:
            bias = b.mul(m, view.bias_for_output(view.bias))
            if plus is not None:
                up = view.constant_bias(g * const_value(plus).astype(np.float64))
                bias = b.add(bias, b.mul(n, view.bias_for_output(up)))
        ctx.account(view.node, kept, bias)
    adj = b.sum([view.adjoint(b.mul(q, A), view.w), view.adjoint(b.mul(q, z), variants.weight("W+", g))])
    return ctx.product(view.x, adj)


def _audit_group(view: View, variants, group, terms, biases, c):
    """What one group passes on (its message times its numerators' sum, each term's forward taken with its variant
    weight as it is: W- = W - W+ would cancel where it is 0), its biases' share (message times biases), and
    ``coef · mask`` where its denominator without stabilizer is not 0 (elsewhere no numerator can carry relevance)."""
    b = view.b
    n = linear_combination(b, [(t.sign, view.without_bias() if (t.input, t.weight) == ("x", "W") else
                                    view.forward(variants.input(t.input), variants.weight(t.weight), None))
                               for t in terms])
    beta = _offset(b, biases)
    beta = None if beta is None else view.bias_for_output(beta)
    passable = complement(b, indicator(b, "Equal", n if beta is None else b.add(n, beta)))
    if group.mask is not None:
        passable = b.mul(passable, variants.mask(group.mask))
    coef = b.const(group.coef)
    return (b.mul(b.mul(c, n), coef), None if beta is None else b.mul(b.mul(c, beta), coef),
            passable if group.coef == 1.0 else b.mul(passable, coef))


def _keys(groups, variants, decompose) -> set:
    """The (input, weight) pairs a decomposition needs: one forward each (f(x; W) is free: the layer's
    output) and one adjoint each."""
    return {(variants.alias(t.input), w) for _, terms in groups for t in terms for w in decompose(t.weight)}


def linear_combination(b, parts):
    """``sum a_i t_i`` for [(a_i, t_i)], with as few ops as the coefficients allow (None if empty)."""
    acc = None
    for a, t in parts:
        if a == 0.0:
            continue
        if acc is None:
            acc = t if a == 1.0 else b.op("Neg", [t]) if a == -1.0 else b.mul(t, b.const(a))
        elif abs(a) == 1.0:
            acc = b.op("Add" if a > 0 else "Sub", [acc, t])
        else:
            acc = b.add(acc, b.mul(t, b.const(a)))
    return acc


class _Variants:
    """Input, weight and bias variants of one view, each built at most once."""

    def __init__(self, ctx, view: View, rule: Rule):
        self.ctx, self.b, self.view, self.rule = ctx, ctx.b, view, rule
        self.gamma = rule.gamma
        self._cache: dict = {}

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def terms_sign(self, terms) -> int:
        """+1 when every term input ⊙ weight (+ bias) is >= 0 by sign alone (z-plus, flat, w-square, the
        positive group of alpha-beta), -1 when every one is <= 0 (the negative group), else 0."""
        def sign(kind: str, name: str | None) -> int:
            if kind == "input":
                if name in ("x+", "ones") or (name == "x" and self.ctx.nonneg(self.view.x)):
                    return 1
                return -1 if name == "x-" else 0
            if name.startswith("b") and self.rule.zero_bias:
                return 0
            return {"W+": 1, "W2": 1, "ones": 1, "W-": -1, "b+": 1, "b2": 1, "b-": -1}.get(name, 0)
        for want in (1, -1):
            if all(t.sign * sign("input", t.input) * sign("weight", t.weight) == want
                   and (t.bias is None or self.rule.zero_bias or t.sign * sign("bias", t.bias) == want) for t in terms):
                return want
        return 0

    def mask(self, name: str):
        op = {"z>0": "Greater", "z<0": "Less"}[name]
        return self._memo(("mask", name), lambda: indicator(self.b, op, self.view.z))

    def alias(self, name: str) -> str:
        """x+ of a non-negative x is x itself: one name, so forwards and adjoints are shared."""
        return "x" if name == "x+" and self.ctx.nonneg(self.view.x) else name

    def input(self, name: str, numerator: bool = False):
        """The input variant; None when it is identically zero (x- of a non-negative x) or, in a
        numerator, when it is the constant one (flat / w-square leave the input factor out)."""
        b, x = self.b, self.view.x
        nonneg = self.ctx.nonneg(x)
        if name == "x":
            return x
        if name == "x+":
            return x if nonneg else self._memo("x+", lambda: b.relu(x))
        if name == "x-":
            return None if nonneg else self._memo("x-", lambda: b.op("Min", [x, b.const(0.0)]))
        if name == "ones":
            return None if numerator else self._memo("ones", lambda: b.ones_like(x))
        if name in ("low", "high"):
            bound = self._memo(name, lambda: self._bound(name))
            return bound if numerator else self._memo(name + "_full", lambda: self._one_sample(bound))
        raise ValueError(f"unknown input variant {name}")

    def _one_sample(self, bound):
        """The bound broadcast to one sample ``[1, *x.shape[1:]]`` when those dims are static: its forward is then
        a constant that onnxruntime folds at session start (it broadcasts over the batch); else to x's shape."""
        b, x = self.b, self.view.x
        dims = list(x.shape[1:]) if x.shape is not None else None
        if dims is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            return b.op("Expand", [bound, b.ints([1, *dims])])
        return b.op("Expand", [bound, b.shape_of(x)])

    def _bound(self, name: str):
        value = np.asarray(self.rule.params[name], dtype=np.float64)
        x = self.view.x
        rank = len(x.shape) if x.shape is not None else 4
        if value.ndim == 1 and value.size > 1:  # per channel
            channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
            if isinstance(channels, (int, np.integer)) and channels != value.size:
                raise UnsupportedError(f"z-box --{name} has {value.size} per-channel values but the input of "
                                       f"{where(self.view.node)} has {channels} channel(s)")
            value = value.reshape([1, -1] + [1] * (rank - 2))
        elif value.ndim == rank - 1:  # one sample's shape
            value = value[None]
        elif value.ndim > 1:
            raise UnsupportedError(f"z-box --{name} of shape {list(value.shape)} does not fit the input of "
                                   f"{where(self.view.node)} (shape {x.shape}): give a number, one per channel, "
                                   "or one sample's shape")
        return self.b.const(value.astype(self.b.dtype))

    def weight(self, name: str, scale: float = 1.0):
        w = self._param(name, self.view.w)
        return w if scale == 1.0 else self._memo(("scaled", name, scale), lambda: self.b.mul(w, self.b.const(scale)))

    def bias(self, name: str | None):
        """A bias variant, computed here (biases are small): offsets of denominators then fold to constants."""
        name = self.rule.bias(name)
        if name is None or self.view.bias is None:
            return None
        def make():
            v, g = const_value(self.view.bias).astype(np.float64), self.gamma
            pos, neg = np.maximum(v, 0.0), np.minimum(v, 0.0)
            makers = {"b": lambda: v, "b+": lambda: pos, "b-": lambda: neg, "bup": lambda: v + g * pos,
                      "bdown": lambda: v + g * neg, "b2": lambda: v * v}
            value = makers[name]()  # (only the variant asked for: b² of a -1e308 mask overflows)
            return self.b.const(value.astype(self.b.dtype))
        return self._memo(("bias", name), make)

    def _param(self, name: str, p):
        b, g = self.b, self.gamma
        key = (name, p.name)
        pos = lambda: self._memo(("W+", p.name), lambda: b.op("Relu", [p]))  # noqa: E731
        neg = lambda: self._memo(("W-", p.name), lambda: b.op("Min", [p, b.const(0.0)]))  # noqa: E731
        makers = {
            "W": lambda: p,
            "W+": pos,
            "W-": neg,
            "Wup": lambda: b.add(p, b.mul(pos(), b.const(g))),
            "Wdown": lambda: b.add(p, b.mul(neg(), b.const(g))),
            "W2": lambda: b.mul(p, p),
            "ones": lambda: (b.op("ConstantOfShape", [b.ints(list(p.shape))], {"value": _one(b.dtype)}) if is_const(p)
                             else b.ones_like(p)),  # (a gate's shape may be symbolic)
        }
        if name not in makers:
            raise ValueError(f"unknown weight variant {name}")
        return self._memo(key, makers[name])

    @property
    def own(self) -> tuple | None:
        """The (input, weight) pair whose forward is the layer's own output z (less its bias): ``("x", "W")``, or
        None where biases are left out of the denominators (``zero_bias``) and the layer has one: ``z - b`` is
        then no stand-in for ``Wx``, since where ``Wx`` is tiny next to ``b`` (GoogLeNet's fc: 5e-12 against 0.03)
        the difference is float32 rounding noise of ``b``; ``f(x; W)`` is computed by a forward of its own."""
        return None if self.rule.zero_bias and self.view.bias is not None else ("x", "W")

    def denominator(self, mix: dict, biases: list, shift: float = 0.0):
        """``sum a f(input; basis) + sum ± bias`` for ``mix = {(input, basis): a}``, plus ``shift`` where that
        costs no extra pass (returned: whether it was added). The layer's own output ``z = f(x; W) + b``
        stands in for ``f(x; W)`` (its bias is taken back out of the sum; not with zero_bias, see :attr:`own`).
        A fresh forward runs with its first coefficient folded into the weight and, for the first group that
        needs it, the group's constant offset as its bias: ``z + f(x; γW+, b')`` is then one Conv that
        onnxruntime fuses with the Add (NCHWc Conv with a sum input). Later groups reuse it and take coefficient
        and bias back out."""
        view, b, own = self.view, self.b, self.own
        biases = list(biases) + ([(-mix[own], view.bias)] if own in mix and view.bias is not None else [])
        fresh = [k for k in mix if k != own and ("f", *k) not in self._cache]
        for k in mix:  # forwards already built bring their own bias: take it back out
            if k != own and k not in fresh and self._cache[("f", *k)][2] is not None:
                _, scale, f_bias = self._cache[("f", *k)]
                biases.append((-mix[k] / scale, f_bias))
        if shift:
            with_shift = biases + [(1.0, view.constant_bias(shift))]
        # the shift is free where a fresh forward takes it in its bias, where an offset is added anyway, or
        # where it cancels the offset (alpha-beta's z- = z - (W+x + b+ + eps) - eps needs no Add at all)
        shifted = bool(shift) and (bool(fresh) or _offset(b, biases) is not None or _offset(b, with_shift) is None)
        if shifted:
            biases = with_shift
        parts = []  # (coefficient, tensor, computed from the activations)
        for (inp, basis), a in mix.items():
            if (inp, basis) == own:
                parts.append((a, view.z, True))
                continue
            key = ("f", inp, basis)
            if key not in self._cache:
                offset = _offset(b, biases) if (inp, basis) == fresh[0] else None
                biases = [] if offset is not None else biases
                self._cache[key] = (view.forward(self.input(inp), self.weight(basis, a), offset), a, offset)
            f, scale, _ = self._cache[key]
            parts.append((a / scale, f, inp not in ("low", "high")))
        # forwards of constants (z-box bounds) first: onnxruntime folds their sum, one Add meets the activations
        parts.sort(key=lambda p: p[2])
        z = linear_combination(b, [p[:2] for p in parts])
        offset = _offset(b, biases)
        return (z if offset is None else b.add(z, view.bias_for_output(offset))), shifted


def _offset(b, biases):
    """``sum a_i b_i`` of constant bias tensors, computed here; None when it vanishes (b - b, or
    bdown - (1+γ)b + bup - b, which is zero but for float64 rounding far below float32 resolution)."""
    if not biases:
        return None
    terms = [a * const_value(t).astype(np.float64) for a, t in biases]
    value = sum(terms)
    if np.all(np.abs(value) <= 1e-9 * max(float(np.max(np.abs(t))) for t in terms)):
        return None
    return b.const(np.asarray(value).astype(b.dtype))


def _one(dtype):
    import onnx

    return onnx.numpy_helper.from_array(np.ones(1, dtype))

"""ONE generic emitter for every rule on every linear op, through the op's adjoint.

A :class:`View` says how to run a linear op forward with other weights and how to apply its adjoint
(vector-Jacobian product): Conv <-> ConvTranspose, Gemm/MatMul <-> MatMul with the weight, element-wise
affine layers (standalone BatchNormalization, Mul/Add by a constant) <-> Mul. Derived weights (W+, W+γW+, …)
are built in-graph from the one stored initializer, so onnxruntime folds them once at session start and
the file does not grow."""
from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError, where
from ..graph import const_value, is_const, static_dims
from ..rules import Rule
from . import register
from .stabilize import quotient


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
        k, s, d, p = a["kernel_shape"], a.get("strides", [1] * n), a.get("dilations", [1] * n), a.get("pads", [0] * 2 * n)
        op = [xs[i] - (s[i] * (zs[i] - 1) + (k[i] - 1) * d[i] + 1 - p[i] - p[n + i]) for i in range(n)]
        return self.b.op("ConvTranspose", [c, w], {**a, "output_padding": op})

    def bias_for_output(self, bias):
        rank = len(self.z.shape)
        return self.b.op("Reshape", [bias, self.b.ints([-1] + [1] * (rank - 2))])


class ConvTransposeView(ConvView):
    def forward(self, x, w, bias):
        a = {**self._attrs(), "output_padding": self.node.attrs.get("output_padding", [0] * (len(self.node.attrs["kernel_shape"])))}
        return self.b.op("ConvTranspose", [x, w] + ([bias] if bias is not None else []), a)

    def adjoint(self, c, w):
        return self.b.op("Conv", [c, w], self._attrs())


class GemmView(View):
    """Gemm in normal form: ``z = x Wᵀ + b`` with W [out, in]."""

    def forward(self, x, w, bias):
        return self.b.op("Gemm", [x, w] + ([bias] if bias is not None else []), {"transB": 1})

    def adjoint(self, c, w):
        return self.b.op("MatMul", [c, w])


class MatMulView(View):
    """``z = x W`` with W [in, out] and x of any rank ≥ 2."""

    def forward(self, x, w, bias):
        z = self.b.op("MatMul", [x, w])
        return z if bias is None else self.b.add(z, bias)

    def adjoint(self, c, w):
        return self.b.op("MatMul", [c, self.b.op("Transpose", [w], {"perm": [1, 0]})])


class ScaleView(View):
    """Element-wise affine ``z = x * W + b`` (W, b broadcast constants)."""

    def forward(self, x, w, bias):
        z = self.b.mul(x, w)
        return z if bias is None else self.b.add(z, bias)

    def adjoint(self, c, w):
        return self.unbroadcast(self.b.mul(c, w))

    def unbroadcast(self, r):
        return unbroadcast(self.b, r, self.x, self.z)


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

    if op == "Conv":
        return ConvView(ctx, node, ins[0], ins[1], bias(2))
    if op == "ConvTranspose":
        return ConvTransposeView(ctx, node, ins[0], ins[1], bias(2))
    if op == "Gemm":
        return GemmView(ctx, node, ins[0], ins[1], bias(2))
    if op == "MatMul":
        return MatMulView(ctx, node, ins[0], ins[1], None)
    if op == "BatchNormalization":
        if not all(is_const(t) for t in ins[1:5]) or len(node.outputs) > 1:
            raise UnsupportedError(f"{where(node)}: BatchNormalization needs constant statistics and inference mode")
        from ..passes.fold_batchnorm import bn_affine

        scale, shift = bn_affine(node)
        rank = len(ins[0].shape) if ins[0].shape is not None else 4
        dtype = ctx.b.dtype
        shape = [-1] + [1] * (rank - 2)
        return ScaleView(ctx, node, ins[0], ctx.b.const(scale.reshape(shape), dtype), ctx.b.const(shift.reshape(shape), dtype))
    # Mul / Add with one constant operand
    x = next(t for t in ins if not is_const(t))
    c = next(t for t in ins if is_const(t))
    if op == "Mul":
        return ScaleView(ctx, node, x, c, None)
    return ScaleView(ctx, node, x, ctx.b.const(np.ones([1] * max(len(const_value(c).shape), 1))), c)


@register("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add")
def propagate(ctx, node, R_out):
    if node.op in ("Mul", "Add") and sum(not is_const(t) for t in node.inputs) != 1:
        raise UnsupportedError(f"{where(node)}: {node.op} of two non-constant tensors has no LRP rule")
    view = view_of(ctx, node)
    rule = ctx.rule(node)
    R = R_out[0]
    r_in = view.unbroadcast(R) if rule.is_pass else emit_rule(ctx, view, rule, R)
    return [r_in if t is view.x else None for t in node.inputs]


def emit_rule(ctx, view: View, rule: Rule, R):
    """Lower ``rule`` (data, see rules.py) on ``view`` with incoming relevance ``R``."""
    b = ctx.b
    variants = _Variants(ctx, view, rule)
    rank = len(view.z.shape) if view.z.shape is not None else None
    messages: dict[tuple[str, str], list] = {}  # (input variant, weight variant) -> signed messages
    for group in rule.groups:
        terms = [t for t in group.terms if variants.input(t.input) is not None]
        if not terms:
            continue
        parts = []
        for i, t in enumerate(terms):
            bias = variants.bias(t.bias)
            parts.append((t.sign, variants.forward(t.input, t.weight, bias)))
        z = parts[0][1] if parts[0][0] > 0 else b.op("Neg", [parts[0][1]])
        for sign, p in parts[1:]:
            z = b.op("Add" if sign > 0 else "Sub", [z, p])
        c = quotient(b, R, z, rule, rank)
        if group.mask is not None:
            cmp = b.op("Greater" if group.mask == "z>0" else "Less", [view.z, b.const(0.0)], dtype=bool)
            c = b.op("Where", [cmp, c, b.const(0.0)])
        if group.coef != 1.0:
            c = b.mul(c, b.const(group.coef))
        for t in terms:
            messages.setdefault((t.input, t.weight), []).append((t.sign, c))
    by_input: dict[str, list] = {}
    for (inp, wv), signed in messages.items():
        msg = signed[0][1] if signed[0][0] > 0 else b.op("Neg", [signed[0][1]])
        for sign, c in signed[1:]:
            msg = b.op("Add" if sign > 0 else "Sub", [msg, c])
        by_input.setdefault(inp, []).append(view.adjoint(msg, variants.weight(wv)))
    out = []
    for inp, adjs in by_input.items():
        total = b.sum(adjs)
        factor = variants.input(inp, numerator=True)
        out.append(total if factor is None else b.mul(factor, total))
    return b.sum(out)


class _Variants:
    """Input, weight and bias variants of one view, each built at most once."""

    def __init__(self, ctx, view: View, rule: Rule):
        self.ctx, self.b, self.view, self.rule = ctx, ctx.b, view, rule
        self.gamma = float(rule.params.get("gamma", 0.0))
        self._cache: dict = {}

    def _memo(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def input(self, name: str, numerator: bool = False):
        """The input variant; None when it is identically zero (x- of a non-negative x) or, in a
        numerator, when it is the constant one (flat / w-square leave the input factor out)."""
        b, x = self.b, self.view.x
        nonneg = self.ctx.nonneg(x)
        if name == "x":
            return x
        if name == "x+":
            return x if nonneg else self._memo("x+", lambda: b.op("Relu", [x]))
        if name == "x-":
            return None if nonneg else self._memo("x-", lambda: b.op("Min", [x, b.const(0.0)]))
        if name == "ones":
            return None if numerator else self._memo("ones", lambda: b.ones_like(x))
        if name in ("low", "high"):
            bound = self._memo(name, lambda: self._bound(name))
            return bound if numerator else self._memo(name + "_full", lambda: b.op("Expand", [bound, b.shape_of(x)]))
        raise ValueError(f"unknown input variant {name}")

    def _bound(self, name: str):
        value = np.asarray(self.rule.params[name], dtype=np.float64)
        x = self.view.x
        rank = len(x.shape) if x.shape is not None else 4
        if value.ndim == 1 and value.size > 1:  # per channel
            value = value.reshape([1, -1] + [1] * (rank - 2))
        elif value.ndim == rank - 1:  # one sample's shape
            value = value[None]
        return self.b.const(value.astype(self.b.dtype))

    def weight(self, name: str):
        return self._param(name, self.view.w)

    def bias(self, name: str | None):
        name = self.rule.bias(name)
        if name is None or self.view.bias is None:
            return None
        return self._param(name.replace("b", "W", 1), self.view.bias)

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
            "ones": lambda: b.op("ConstantOfShape", [b.ints(const_value(p).shape)],
                                 {"value": _one(b.dtype)}),
        }
        if name not in makers:
            raise ValueError(f"unknown weight variant {name}")
        return self._memo(key, makers[name])

    def forward(self, inp: str, wv: str, bias):
        """``f(input variant; weight variant) + bias``, reusing the forward output where it is the same."""
        view = self.view
        if inp == "x" and wv == "W":
            if bias is view.bias:
                return view.z
            if bias is None and view.bias is not None:
                return self.b.op("Sub", [view.z, view.bias_for_output(view.bias)])
        return view.forward(self.input(inp), self.weight(wv), bias)


def _one(dtype):
    import onnx

    return onnx.numpy_helper.from_array(np.ones(1, dtype))

"""The torch detach references of the transformer rules: pieces of a forward whose gradient × input is the rule's
relevance (tensors a rule holds constant are detached)."""
import contextlib


def layer_norm(norm, x):
    """LayerNorm with its standard deviation held constant (AttnLRP, CP-LRP): the epsilon rule on the centring."""
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
    y = (x - mu) / sigma.detach() * norm.weight
    return y if norm.bias is None else y + norm.bias


def split_matmul(a, b):
    """A product of two computed tensors whose relevance is split 50/50 between them (AttnLRP)."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)


@contextlib.contextmanager
def rules_in_torch(mode: str):
    """Within it, torch computes the forward of the rules of ``mode`` (attnlrp, cp-lrp) for any model built from
    torch's functions: a product of two tensors that both need gradients splits (attnlrp), a softmax's output is
    held constant (cp-lrp), LayerNorm holds its standard deviation constant, GELU and SiLU are ``x · sg(f(x)/x)``
    (the identity rule, also Tanh and Sigmoid), an einsum of two such tensors splits as a product does, and
    torchvision's squeeze-and-excitation gate is a product of two computed tensors (split under attnlrp, the gate
    held constant under cp-lrp); GroupNorm holds each group's standard deviation constant, and a norm
    (``Tensor.norm``, ``linalg.vector_norm``: ``F.normalize``'s and ConvNeXt V2's response normalization's scale) is
    held constant; an inference BatchNorm is written as its affine. Gradient × input of
    the model's output is then the rule's relevance where the model's parameters need no gradients
    (``model.requires_grad_(False)``: only the input's descendants do).
    ``torch.bmm`` is a product like ``torch.matmul``."""
    import torch
    from torch.nn import functional as F
    from torchvision.ops.misc import SqueezeExcitation

    saved = {(torch.Tensor, "matmul"): torch.Tensor.matmul, (torch.Tensor, "__matmul__"): torch.Tensor.__matmul__,
             (torch, "matmul"): torch.matmul, (torch, "bmm"): torch.bmm, (torch, "einsum"): torch.einsum,
             (F, "softmax"): F.softmax,
             (SqueezeExcitation, "forward"): SqueezeExcitation.forward, (torch, "tanh"): torch.tanh,
             (torch, "sigmoid"): torch.sigmoid,
             (torch.Tensor, "softmax"): torch.Tensor.softmax, (F, "layer_norm"): F.layer_norm, (F, "gelu"): F.gelu,
             (F, "silu"): F.silu, (F, "group_norm"): F.group_norm, (torch.Tensor, "norm"): torch.Tensor.norm,
             (torch.linalg, "vector_norm"): torch.linalg.vector_norm, (F, "batch_norm"): F.batch_norm}
    plain = saved[(torch, "matmul")]

    def matmul(a, b):
        if mode == "attnlrp" and a.requires_grad and b.requires_grad:
            return 0.5 * (plain(a, b.detach()) + plain(a.detach(), b))
        return plain(a, b)

    def einsum(eq, *ops):
        if mode == "attnlrp" and len(ops) == 2 and all(t.requires_grad for t in ops):
            a, b = ops
            return 0.5 * (saved[(torch, "einsum")](eq, a, b.detach()) + saved[(torch, "einsum")](eq, a.detach(), b))
        return saved[(torch, "einsum")](eq, *ops)

    def gate(self, x):  # torchvision's squeeze-and-excitation: scale(x) · x, a product of two computed tensors
        return matmul_like(self._scale(x), x)

    def matmul_like(a, b):  # an element-wise product under the mode's rule: split (attnlrp), the gate constant (cp-lrp)
        if mode == "attnlrp":
            return 0.5 * (a.detach() * b + a * b.detach())
        return a.detach() * b

    def softmax(x, *args, **kw):
        kw.pop("_stacklevel", None)  # (F.softmax's, which nn.Softmax passes; Tensor.softmax has none)
        if len(args) > 1:  # (F.softmax(x, dim, _stacklevel, dtype) positionally)
            args = (args[0], *args[2:])
        s = saved[(torch.Tensor, "softmax")](x, *args, **kw)
        return s.detach() if mode == "cp-lrp" else s

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(shape), 0))
        mu = x.mean(dims, keepdim=True)
        sigma = ((x - mu) ** 2).mean(dims, keepdim=True).add(eps).sqrt()
        y = (x - mu) / sigma.detach()
        y = y if weight is None else y * weight
        return y if bias is None else y + bias

    def group_norm(x, groups, weight=None, bias=None, eps=1e-5):  # (each group's sigma held constant)
        g = x.reshape(x.shape[0], groups, -1)
        mu = g.mean(-1, keepdim=True)
        sigma = ((g - mu) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
        y = ((g - mu) / sigma.detach()).reshape(x.shape)
        at = (1, -1) + (1,) * (x.dim() - 2)  # (per channel)
        y = y if weight is None else y * weight.reshape(at)
        return y if bias is None else y + bias.reshape(at)

    def batch_norm(x, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if training:
            return saved[(F, "batch_norm")](x, mean, var, weight, bias, training, momentum, eps)
        at = (1, -1) + (1,) * (x.dim() - 2)  # (inference: the affine it is, whose autograd torch gets right; its
        y = (x - mean.reshape(at)) / (var.reshape(at) + eps).sqrt()  # kernel's gradient is wrong at batch 1 in some
        y = y if weight is None else y * weight.reshape(at)  # graphs, torch 2.14: flatten + transpose after it)
        return y if bias is None else y + bias.reshape(at)

    def identity_rule(f):  # (never in place: x is needed)
        return lambda x, *args, **kw: x * (f(x, *args, **{k: v for k, v in kw.items() if k != "inplace"}) / x).detach()

    new = {(torch.Tensor, "matmul"): matmul, (torch.Tensor, "__matmul__"): matmul, (torch, "matmul"): matmul,
           (torch, "bmm"): matmul,
           (torch, "einsum"): einsum, (F, "softmax"): softmax,
           (SqueezeExcitation, "forward"): gate, (torch, "tanh"): identity_rule(saved[(torch, "tanh")]),
           (torch, "sigmoid"): identity_rule(saved[(torch, "sigmoid")]), (torch.Tensor, "softmax"): softmax,
           (F, "layer_norm"): layer_norm, (F, "group_norm"): group_norm, (F, "batch_norm"): batch_norm,
           (torch.Tensor, "norm"): lambda x, *a, **k: saved[(torch.Tensor, "norm")](x, *a, **k).detach(),
           (torch.linalg, "vector_norm"): lambda x, *a, **k: saved[(torch.linalg, "vector_norm")](x, *a, **k).detach(),
           (F, "gelu"): identity_rule(saved[(F, "gelu")]), (F, "silu"): identity_rule(saved[(F, "silu")])}
    try:  # Hugging Face's GELU module holds F.gelu from its construction: it calls the patched one at run time
        from transformers.activations import GELUActivation

        saved[(GELUActivation, "forward")] = GELUActivation.forward
        new[(GELUActivation, "forward")] = lambda self, x: F.gelu(x)
    except ImportError:
        pass
    try:
        for (owner, name), f in new.items():
            setattr(owner, name, f)
        yield
    finally:
        for (owner, name), f in saved.items():
            setattr(owner, name, f)

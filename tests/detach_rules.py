"""The torch detach references of the transformer rules: pieces of a forward whose gradient × input is the rule's
relevance (tensors a rule holds constant are detached)."""


def layer_norm(norm, x):
    """LayerNorm with its standard deviation held constant (AttnLRP, CP-LRP): the epsilon rule on the centring."""
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
    y = (x - mu) / sigma.detach() * norm.weight
    return y if norm.bias is None else y + norm.bias


def split_matmul(a, b):
    """A product of two computed tensors whose relevance is split 50/50 between them (AttnLRP)."""
    return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)

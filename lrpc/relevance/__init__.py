"""The backward: one registry, op type -> relevance propagator.

A propagator is ``fn(ctx, node, R_out: list) -> list`` taking the relevance arriving at each node output
(None where none arrives) and returning the relevance for each node input (None for constants and
inputs that carry none). ``ctx`` is :class:`lrpc.emit.Context`."""
from __future__ import annotations

PROPAGATORS: dict = {}


def register(*ops: str):
    def deco(fn):
        for op in ops:
            PROPAGATORS[op] = fn
        return fn
    return deco


def propagator(op: str):
    return PROPAGATORS.get(op)


from . import elementwise, linear, normalization, pooling, structural  # noqa: E402,F401  (fill the registry)

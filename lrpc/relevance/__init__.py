"""The backward: one registry, op type -> relevance propagator and what lrpc knows of the op.

A propagator is ``fn(ctx, node, R_out: list) -> list`` taking the relevance arriving at each node output
(None where none arrives) and returning the relevance for each node input (None for constants and
inputs that carry none). ``ctx`` is :class:`lrpc.emit.Context`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

EXACT = "exact"  # Op.gradient of an op whose propagator is gradient × input under LRP-0


@dataclass(frozen=True)
class Op:
    """An op type's propagator and the facts emission and the gradient check read."""

    fn: Callable | None = None  # the propagator; None: no relevance reaches the op (a pass rewrites it, a gate, ...)
    category: str | None = None  # composite category of its layers (composites.py); None: no rule, relevance routes
    keeps_category: bool = False  # a node a pass makes from it keeps the category (a pool made a depthwise Conv)
    nonneg: bool = False  # its output is >= 0 whatever its inputs
    keeps_nonneg: bool = False  # its output is >= 0 where its float inputs are (weights: their stored signs)
    routes: bool = False  # each input element's relevance comes from outputs of the same value (data movement)
    reported: bool = False  # a layerwise row of its own without a category (MaxPool: how it routes is an option)
    gradient: str | None = None  # under LRP-0: EXACT (gradient × input), or why not (for a message); None: not known


OPS: dict[str, Op] = {}
UNKNOWN = Op()


def register(*ops: str, **facts):
    """Decorator: the function is the propagator of ``ops``, which have ``facts`` (fields of :class:`Op`)."""
    def deco(fn):
        declare(*ops, fn=fn, **facts)
        return fn
    return deco


def declare(*ops: str, **facts) -> None:
    """Record ``facts`` of ``ops`` (with ``fn``: their propagator)."""
    for op in ops:
        OPS[op] = Op(**facts)


def propagator(op: str):
    return OPS.get(op, UNKNOWN).fn


def facts(op: str | None) -> Op:
    """The registered facts of ``op`` (none for an op lrpc does not know)."""
    return OPS.get(op, UNKNOWN)


from . import attention, elementwise, linear, normalization, pooling, structural  # noqa: E402,F401  (fill the registry)

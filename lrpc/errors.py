"""Error types of lrpc. Each carries the exit code the CLI returns for it."""
from __future__ import annotations


class LrpcError(Exception):
    """A problem the user can fix; the CLI prints ``str(err)`` as one line."""

    exit_code = 2


class InputError(LrpcError):
    """The input (file, model, flag) is unusable: missing, corrupt, unsupported, bad option."""


class UnsupportedError(InputError):
    """The model uses something lrpc cannot explain (an op, a dynamic shape, a rule/op pairing)."""


class CheckFailed(LrpcError):
    """A verification (forward equality, conservation, finiteness) failed."""

    exit_code = 1


def where(node) -> str:
    """Describe a graph node for an error message: ``node 'name' (OpType)``."""
    return f"node '{node.name}' ({node.op})"

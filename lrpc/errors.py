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


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's text as one line for an error message: line breaks and runs of spaces joined (onnx's checker
    breaks its messages in the middle), onnx's "Inference error(s):" framing dropped, at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    for frame in ("[ShapeInferenceError] Inference error(s): ", "[TypeInferenceError] Inference error(s): "):
        text = text.replace(frame, "")
    return text if len(text) <= limit else text[: limit - 1] + "…"

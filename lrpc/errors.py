"""Error types of lrpc. Each carries the exit code the CLI returns for it."""
from __future__ import annotations


class LrpcError(Exception):
    """A problem the user can fix; the CLI prints ``str(err)`` as one line."""

    exit_code = 2


class InputError(LrpcError):
    """The input (file, model, flag) is unusable: missing, corrupt, unsupported, bad option."""


class UnsupportedError(InputError):
    """The model uses something lrpc cannot explain (an op, a dynamic shape, a rule/op pairing). ``nodes``: the
    names of the nodes it is about, where it lists them (:func:`unsupported`)."""

    def __init__(self, message: str, nodes: list[str] | None = None):
        super().__init__(message)
        self.nodes = list(nodes or [])


class CheckFailed(LrpcError):
    """A verification (forward equality, conservation, finiteness) failed."""

    exit_code = 1


STANDARD = (None, "", "ai.onnx")  # ONNX's own op domain as graphs spell it (None: onnx-graphsurgeon's default)


def op_type(node) -> str:
    """A node's op type as lrpc names it: ``OpType`` in ONNX's own domain, ``domain::OpType`` in any other (a custom
    op is never mistaken for a standard one of the same name)."""
    domain = getattr(node, "domain", None)
    return node.op if domain in STANDARD else f"{domain}::{node.op}"


def where(node) -> str:
    """Describe a graph node for an error message: ``node 'name' (OpType)``, ``(domain::OpType)`` outside ONNX's own."""
    return f"node '{node.name}' ({op_type(node)})"


LISTED = 8  # nodes named in one error message (the others counted, with their op types)


def unsupported(nodes: list, refused: dict[str, str]) -> UnsupportedError:
    """One error naming every node of ``nodes`` (up to :data:`LISTED`): a pass's reason where a pass left the node
    as it was (``refused``: node name -> one-line reason), else "no relevance propagator for ..."; one line."""
    shown = nodes[:LISTED]
    reasons = [refused[n.name] for n in shown if n.name in refused]
    plain = [where(n) for n in shown if n.name not in refused]
    parts = reasons + ([f"no relevance propagator for {', '.join(plain)}"] if plain else [])
    rest = sorted({op_type(n) for n in nodes[LISTED:]})
    more = f" and {len(nodes) - LISTED} more ({', '.join(rest)})" if rest else ""
    named = [n.name for n in nodes if n.name in refused] + [n.name for n in nodes if n.name not in refused]
    return UnsupportedError("; ".join(parts) + more, named)


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's text as one line for an error message: line breaks and runs of spaces joined (onnx's checker
    breaks its messages in the middle), onnx's "Inference error(s):" framing dropped, at most ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    for frame in ("[ShapeInferenceError] Inference error(s): ", "[TypeInferenceError] Inference error(s): "):
        text = text.replace(frame, "")
    return text if len(text) <= limit else text[: limit - 1] + "…"

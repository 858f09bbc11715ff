"""lrpc: compile ONNX models into ONNX models that also compute their LRP explanation."""
from .compiler import canonize, compile
from .composites import COMPOSITES, Options, RuleSet, load_ruleset
from .errors import CheckFailed, InputError, LrpcError, UnsupportedError

__version__ = "0.1.0"


def __getattr__(name):  # onnxruntime is imported only when a Session is asked for
    if name == "Session":
        from .runtime import Session

        return Session
    raise AttributeError(name)


__all__ = ["compile", "canonize", "Session", "Options", "RuleSet", "load_ruleset", "COMPOSITES",
           "LrpcError", "InputError", "UnsupportedError", "CheckFailed"]

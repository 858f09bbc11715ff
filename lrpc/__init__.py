"""lrpc: compile ONNX models into ONNX models that also compute their LRP explanation."""
from .compiler import canonize, compile
from .composites import COMPOSITES, Options, RuleSet, load_ruleset
from .errors import CheckFailed, InputError, LrpcError, UnsupportedError
from .imaging import colorize, grid, heatmap, overlay  # numpy only; Pillow is imported when an image is made

__version__ = "0.1.0"


def __getattr__(name):  # onnxruntime is imported only when a Session is asked for
    if name in ("Session", "Explanation"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)


__all__ = ["compile", "canonize", "Session", "Explanation", "heatmap", "overlay", "grid", "colorize", "Options",
           "RuleSet", "load_ruleset", "COMPOSITES", "LrpcError", "InputError", "UnsupportedError", "CheckFailed"]

"""lrpc: compile ONNX models into ONNX models that also compute their LRP explanation."""
__version__ = "0.1.0"

# the package's names, each imported from its module when first asked for (PEP 562): ``import lrpc.runtime`` or
# ``lrpc.Session`` loads no compiler, ``lrpc.compile`` no onnxruntime, the imaging functions no Pillow
_NAMES = {"compile": "compiler", "canonize": "compiler", "COMPOSITES": "composites", "Options": "composites",
          "RuleSet": "composites", "load_ruleset": "composites", "CheckFailed": "errors", "InputError": "errors",
          "LrpcError": "errors", "UnsupportedError": "errors", "colorize": "imaging", "grid": "imaging",
          "heatmap": "imaging", "overlay": "imaging", "Session": "runtime", "Explanation": "runtime",
          "LoadedModel": "loaded", "load": "loaded"}


def __getattr__(name):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lrpc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # (asked for once)
    return value


def __dir__():
    return sorted([*globals(), *_NAMES])


__all__ = ["compile", "canonize", "Session", "Explanation", "heatmap", "overlay", "grid", "colorize", "Options",
           "RuleSet", "load_ruleset", "COMPOSITES", "LrpcError", "InputError", "UnsupportedError", "CheckFailed",
           "LoadedModel", "load"]

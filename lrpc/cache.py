"""On-disk cache of compiled models, so ``lrpc explain model.onnx`` compiles a model once.

An entry is keyed by a SHA-256 over: lrpc's version and the bytes of its source files, onnx's version, the
bytes of the model file and of every external-data file it names, the rules (a rule file's bytes, or the
composite name), the options, the explained output and the input shapes. Any change to any of these is a new entry;
nothing is ever looked up by path or modification time alone.

Location: ``$LRPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/lrpc``, else ``~/.cache/lrpc``. Entries are written
atomically (a concurrent reader sees a whole file or none). A cache folder that cannot be created or
written (or searched) is skipped with one warning: the compiled model is still used. Entries are plain compiled
``.lrp.onnx`` files; delete the folder to clear the cache. Models over 2 GB are not cached."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import onnx

from .loaded import LoadedModel, load


def cache_dir() -> Path:
    if os.environ.get("LRPC_CACHE_DIR"):
        return Path(os.environ["LRPC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lrpc"


def key(path, rules, settings: dict) -> str:
    """The entry's key for the model file ``path`` (and the external data files it names)."""
    from . import __version__

    h = hashlib.sha256()
    h.update(f"lrpc {__version__} {_code_digest()} onnx {onnx.__version__}\n".encode())
    p = Path(path)
    for f in [p] + _external_files(p):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)
    rules_path = Path(str(rules))
    if str(rules).endswith((".json", ".toml")) and rules_path.is_file():
        h.update(b"rules file\0" + rules_path.read_bytes())
    else:
        h.update(f"rules {rules}\0".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of lrpc's own sources: any change to the compiler (an edited checkout, a new release) makes
    new entries, so a cache shared between installs never serves another code's compilation."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _external_files(p: Path) -> list[Path]:
    """The external data files a model file names (read from the file without loading the data)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    bare = onnx.load_model(str(p), load_external_data=False)
    names = sorted({next((e.value for e in t.external_data if e.key == "location"), "")
                    for t in _get_all_tensors(bare) if uses_external_data(t)})
    return [p.parent / n for n in names if n]


def compiled(path, rules, settings: dict, make) -> LoadedModel:
    """The cached compilation of the model file ``path`` under ``settings`` (a JSON-able dict of everything else
    compile depends on), or what ``make()`` returns (:func:`lrpc.compiler.compile_loaded`), stored for next time.
    Notes go to stderr."""
    model_key = key(path, rules, settings)
    folder = cache_dir()
    entry = folder / f"{model_key[:32]}.lrp.onnx"
    try:
        hit = entry.is_file()
    except OSError as e:  # e.g. a folder we may not search
        _warn(folder, e)
        return make()
    if hit:
        try:
            model = load(entry)
            print(f"lrpc: compiled model from the cache: {entry}", file=sys.stderr)
            return model
        except Exception:  # a damaged or unreadable entry is recompiled and replaced
            pass
    model = make()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model.save(entry)
    except Exception as e:
        _warn(folder, e)
    return model


def _warn(folder: Path, e: BaseException) -> None:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"lrpc: warning: compile cache {folder} not used ({first}); set LRPC_CACHE_DIR or use --no-cache",
          file=sys.stderr)

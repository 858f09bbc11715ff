"""Explain images or tensors end to end: preprocess, compile (unless already compiled), run, write heatmaps.

Used by ``lrpc explain``; the pieces are usable from Python too::

    from lrpc.explain import prepare
    from lrpc.preprocess import load_image, normalization
    session, spec = prepare("model.onnx", rules="epsilon-plus")
    x, shown = load_image("cat.jpg", spec.size, spec.channels, *normalization("imagenet"))
    e = session.explain(x)          # e.output, e.relevance, e.layers, e.target

How images become model inputs: :mod:`lrpc.preprocess`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import __version__, compiler, targets
from .atomic_write import protected, refuse_inputs, write_atomic
from .audit import MANIFEST
from .contract import SEED, SEED_MODE
from .errors import InputError, one_line
from .imaging import grid, heatmap, overlay, pil_image
from .loaded import LoadedModel, external_data_files
from .preprocess import (
    IMAGE_SUFFIXES,
    image_files,
    image_input,
    image_size,
    load_image,
    load_tensors,
    model_input,
    normalization,
)


def prepare(model, rules="epsilon-gamma-box", output: str | None = None, input_shapes: dict | None = None,
            layout: str = "nchw", size: tuple | None = None, providers=None, cache: bool = False, seed: str = "input",
            start: bool = True, low_memory: bool = False, **options):
    """Return ``(Session, InputSpec)``. ``model``: path or ModelProto, plain (compiled here with ``rules``
    and ``options``) or already compiled (input ``relevance_seed`` present: used as is, rules ignored).
    ``size``: (H, W) for images; fixes dynamic spatial dims of a plain model before compiling.
    ``cache``: reuse/store the compilation of a model file in the on-disk cache (:mod:`lrpc.cache`).
    ``seed``: how a plain model is compiled ("top1": the graph seeds each sample's top-1 output, one run); it is
    compiled for the provider the session will run on (see ``for_provider`` of :func:`lrpc.compile`).
    ``start=False``: return the compiled :class:`lrpc.loaded.LoadedModel` instead of a Session (compiled once on a
    Ray driver, run in its actors). ``low_memory``: the Session's (:class:`lrpc.runtime.Session`)."""
    from .runtime import Session, default_providers

    if layout not in ("nchw", "nhwc"):
        raise InputError(f"--layout must be nchw or nhwc, got '{layout}'")
    loaded = LoadedModel.of(model)
    spec = model_input(loaded.proto, layout)
    if size is not None and spec.size is not None and tuple(size) != spec.size:
        raise InputError(f"--size {size[0]},{size[1]} differs from the static size {spec.size[0]},{spec.size[1]} "
                         f"of model input '{spec.name}'")
    compiled = SEED in {i.name for i in loaded.proto.graph.input} or \
        any(p.key == SEED_MODE for p in loaded.proto.metadata_props)
    if not compiled:
        shapes = dict(input_shapes or {})
        if size is not None and spec.size is None and len(spec.dims) == 4 and spec.name not in shapes:
            h, w = size
            shapes[spec.name] = [-1, -1, h, w] if layout == "nchw" else [-1, h, w, -1]
        # a model read here is handed over with the file's bytes (its big weights were never copied out of them):
        # the compiled graph is built in it, the weight scan reads the bytes, and a cache entry and the session get
        # the unchanged weights as the file's bytes (on a cache hit the read model is dropped unused)
        provider = "cuda" if (providers or default_providers())[0] == "CUDAExecutionProvider" else "cpu"
        make = lambda: compiler.compile_loaded(loaded, rules, output=output, input_shapes=shapes or None,  # noqa: E731
                                               seed=seed, for_provider=provider, **options)
        if cache and isinstance(model, (str, os.PathLike)):
            from . import cache as compile_cache

            settings = {"output": output, "input_shapes": shapes, "options": options, "seed": seed,
                        "for_provider": provider}
            loaded = compile_cache.compiled(model, rules, settings, make)
        else:
            loaded = make()
        spec = model_input(loaded.proto, layout)
    # (a compiled file: its weights go to the session as the file's bytes)
    if not start:
        return loaded, spec
    return Session(loaded, providers=providers, channels_last=layout == "nhwc", low_memory=low_memory), spec


def heat_image(relevance: np.ndarray, layout: str = "nchw", cmap: str = "coldnhot", level: float = 1.0):
    """Heatmap of a relevance batch: one sample's image, or a grid of the samples' images."""
    r = np.asarray(relevance)
    if r.ndim == 0:
        raise InputError("relevance is a scalar: nothing to draw")
    maps = []
    for sample in (r if r.ndim > 1 else r[None]):
        if layout == "nhwc" and sample.ndim == 3:
            sample = np.moveaxis(sample, -1, 0)
        if sample.ndim > 3:
            sample = sample.reshape(-1, *sample.shape[-2:])
        maps.append(heatmap(sample, cmap=cmap, symmetric=True, level=level))
    return maps[0] if len(maps) == 1 else grid(maps)


def run(model, out, image=None, images=None, npy=None, target=None, rules="epsilon-gamma-box",
        output=None, input_shapes=None, size=None, preset=None, mean=None, std=None, grayscale=False, layout="nchw",
        cmap="coldnhot", level=1.0, with_overlay=False, overlay_alpha=0.5, batch_size=8, cache=False,
        progress=None, log=print, manifest=False, ray=None, concurrency=None, relevance_dtype="float32",
        relevance_pool=1, resume=True, low_memory=False, **options) -> list[Path]:
    """What ``lrpc explain`` does; returns the written paths. Exactly one of ``image``, ``images``, ``npy``.

    ``target``: see :mod:`lrpc.targets` (class index, None/"top1", "topK", or a dense target); with topK
    each heatmap is a row of K panels (rank 1 first; a tensor batch gives one row per sample) and the .npy
    holds [N, K, ...] instead of [N, ...].
    ``batch_size``: images run together in directory mode (1 where the model's batch dim is static 1).
    In directory mode an unreadable image is skipped with a warning and the others are explained; the run
    then ends with an :class:`InputError` saying how many were skipped (``lrpc explain`` exits 2).
    ``cache``: compile through the on-disk cache. ``progress``: a progress bar on stderr (default: when
    stderr is a terminal). ``options``: lrpc.Options fields; ``low``/``high`` left as None default to the
    range of normalized [0, 1] images ((0 - mean)/std .. (1 - mean)/std). ``size``: (H, W), ``"H,W"`` or one
    number, for models with dynamic spatial dims; ``preset`` ("imagenet") or ``mean``/``std``: the normalization
    (see :func:`lrpc.preprocess.normalization`). ``manifest`` (directory mode): append a JSON line per image to
    ``out/manifest.jsonl`` (source, heatmap, relevance, target, score, status ok; or status error and the error)
    and skip the images an earlier run's manifest lists as done whose outputs exist (a resumed run). The manifest's
    first line records the model (its sha256), the settings that change the outputs and lrpc's version; resuming
    with another model or other settings is refused unless ``resume=False``, which starts a new manifest and
    explains every image again.
    ``ray`` (directory mode): run the model in Ray Data actors (:mod:`lrpc.ray`; "auto", "local" or a cluster
    address; ``concurrency`` actors) instead of this process; the images are read and the outputs written as
    without, and the manifest is always kept. ``relevance_dtype`` ("float32" or "float16") and ``relevance_pool``
    (N: the spatial dims of an image's relevance summed over N x N blocks, which keeps its total) shrink the .npy
    files; the heatmaps are drawn from the full relevance. ``low_memory``: run the compiled graph in a
    ``Session(low_memory=True)`` (each weight held once, no buffer-reuse plan: a lower peak for some time; the
    relevance is the same to float32 rounding, so a manifest does not record it)."""
    size, (mean, std) = image_size(size), normalization(preset, mean, std)
    if sum(x is not None for x in (image, images, npy)) != 1:
        raise InputError("give exactly one of --image, --images, --npy")
    if with_overlay and npy is not None:
        raise InputError("--overlay needs --image or --images (there is no picture under a tensor)")
    if cmap not in ("coldnhot", "bwr", "seismic", "gray"):
        raise InputError(f"unknown colormap '{cmap}'")
    if ray is not None and images is None:
        raise InputError("--ray needs --images (a directory of images)")
    manifest = manifest or ray is not None
    if not resume and not (manifest and images is not None):
        raise InputError("--no-resume goes with --images and --manifest (or --ray)")
    if relevance_dtype not in ("float32", "float16"):
        raise InputError(f"--relevance-dtype must be float32 or float16, got '{relevance_dtype}'")
    if int(relevance_pool) < 1 or (int(relevance_pool) > 1 and images is None and image is None):
        raise InputError(f"--relevance-pool must be at least 1 and needs --image/--images, got {relevance_pool}")
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    goal = targets.parse(target)
    pil_image()  # fail early and clearly without Pillow
    if npy is not None:
        sources = [Path(npy)]
    elif image is not None:
        sources = [Path(image)]
        if not sources[0].is_file():
            raise InputError(f"{image}: no such file" if not sources[0].exists() else f"{image}: not a file")
    else:
        sources = image_files(images)
    read = [(s, "a source") for s in sources] + [(goal.path, "the target file")]
    if isinstance(model, (str, os.PathLike)):
        read.append((model, "the model"))
        read += [(f, "the model's external data") for f in sorted(external_data_files(model))]
    if isinstance(rules, (str, os.PathLike)) and Path(rules).is_file():
        read.append((rules, "the rule file"))
    paths = _outputs(out, sources, many=images is not None, protect=protected(read))
    if goal.kind == "index" and len(goal.values) > 1 and images is not None and len(goal.values) != len(sources):
        raise InputError(f"--target: {len(goal.values)} class indices for {len(sources)} images (give one, or "
                         f"one per image in file name order)")

    _box_defaults(options, mean, std, tensors=npy is not None)
    book = None
    if manifest and images is not None:  # (refused before compiling when it cannot resume)
        target = str(goal) if goal.path is None else {"mask": goal.path, "sha256": _sha256([goal.path])}
        settings = {"rules": _file_or_name(rules), "target": target,
                    "output": output, "input_shape": input_shapes, "size": size, "mean": mean, "std": std,
                    "grayscale": grayscale, "layout": layout, "cmap": cmap, "level": level, "overlay": with_overlay,
                    "overlay_alpha": overlay_alpha if with_overlay else None, "relevance_dtype": relevance_dtype,
                    "relevance_pool": int(relevance_pool), **options}
        book = _Manifest(out, sources, paths, _model_record(model), settings, resume)
    # top1: the graph seeds itself, one run per batch; topK: its switch gives the scores and rank 1 in one run
    seed = "input" if goal.kind != "top" else "top1" if goal.values[0] == 1 else "switch"
    providers = None
    if ray is not None:  # compiled here for the actors' provider (CUDA where the cluster has GPUs)
        from . import ray as lrpc_ray

        providers = lrpc_ray.providers(lrpc_ray.connect(ray))
    session, spec = prepare(model, rules, output=output, input_shapes=input_shapes, layout=layout, size=size,
                            providers=providers, cache=cache, seed=seed, start=ray is None, low_memory=low_memory,
                            **options)
    read = protected(read)  # (stat once: a directory's outputs are each checked against every source)
    if npy is None:
        if len(spec.dims) != 4:
            raise InputError(f"model input '{spec.name}' has rank {len(spec.dims)}; images need rank 4 "
                             f"({spec.layout.upper()}); use --npy for other inputs")
        hw = tuple(size) if size is not None else spec.size
        if hw is None:
            raise InputError(f"model input '{spec.name}' has a dynamic height/width: give --size H,W")
    fixed = spec.dims[0] if spec.dims else None
    per_run = 1 if npy is not None else (int(batch_size) if fixed is None else min(int(batch_size), fixed))
    if fixed not in (None, 1) and npy is None:
        raise InputError(f"model input '{spec.name}' has a static batch of {fixed}; image mode feeds batches of "
                         f"any size: use --npy with {fixed} samples")
    todo = book.todo() if book else list(range(len(sources)))
    if book and book.older:
        log(f"lrpc: note: {book.path} was started by lrpc {book.older}; resumed with lrpc {__version__}")
    if book and len(todo) < len(sources):
        log(f"{len(sources) - len(todo)} of {len(sources)} images done in an earlier run ({book.path}): skipped")
    bar = _Progress(len(todo), progress if images is not None and len(sources) > 1 else False)
    try:
        written, skipped, lost = [], [], 0
        work = _Work(hw if npy is None else None, spec.channels, mean, std, layout, grayscale, spec.dtype, goal,
                     with_overlay, images is not None)
        drawing = _Drawing(layout, cmap, level, overlay_alpha if with_overlay else None, relevance_dtype,
                           int(relevance_pool))
        batches = [todo[start:start + per_run] for start in range(0, len(todo), per_run)]
        if npy is not None:
            chunks = [_explain_feeds(session, load_tensors(sources[0], session), goal, [0])]
        elif ray is not None:
            chunks = lrpc_ray.chunks(session, work, [[(i, str(sources[i]), str(paths[i][0])) for i in b]
                                                     for b in batches], ray, concurrency,
                                     channels_last=layout == "nhwc", drawing=drawing, low_memory=low_memory)
        else:
            chunks = (explain_images(session, work, [(i, sources[i]) for i in b]) for b in batches)
        for c in chunks:
            for i, err in c["errors"]:  # directory mode: the other images are still explained
                skipped.append(sources[i])
                if book:
                    book.error(i, err)
                if not c.get("lost"):
                    bar.note(f"lrpc: warning: {err}; skipped")
            if c.get("lost"):  # the Ray executor gave up on these images (one warning, not one per image)
                lost += len(c["errors"])
                bar.note(f"lrpc: warning: {len(c['errors'])} images not explained: {c['lost']}")
            chunk, relevance, labels, scores, shown = c["index"], c["relevance"], c["labels"], c["scores"], c["shown"]
            if not chunk:
                continue
            for j in np.flatnonzero(c["empty"]):
                where = sources[chunk[j]].name if npy is None else f"{sources[0].name} sample {j}"
                print(f"lrpc: warning: {where}: target {goal} selects no output entry (empty heatmap)",
                      file=sys.stderr)
            k = relevance.shape[1] if relevance is not None else 1
            drawn = c.get("drawn")  # (drawn already by the Ray executor's actors)
            if drawn is None:  # a unit: [rows, K, ...], a tensor file's batch or one image
                units = [relevance] if npy is not None else [relevance[j:j + 1] for j in range(len(relevance))]
                drawn = (draw(rel, shown[j], drawing, paths[chunk[j]][0]) for j, rel in enumerate(units))
            for j, (png_bytes, npy_bytes, note) in enumerate(drawn):
                png, npy_out = paths[chunk[j]]
                if not written and (relevance_dtype != "float32" or int(relevance_pool) > 1):
                    bar.note(note)
                write_atomic([npy_bytes], npy_out, read)
                write_atomic([png_bytes], png, read)
                written += [png, npy_out]
                if book:
                    book.done(chunk[j], labels[j] if labels is not None else str(goal), scores[j])
                prefix = "top1 " if seed == "top1" else ""
                what = (str(goal) if labels is None else labels[j] if npy is None
                        else ("; " if k > 1 else ",").join(labels))
                bar.step(f"{sources[chunk[j]].name}: target {prefix}{what} -> {png}, {npy_out}", log)
        if skipped:
            where = f"; errors in {book.path}" if book else ""
            what = "could not be read" if not lost else f"failed ({lost} in Ray, retries spent)"
            raise InputError(f"{len(skipped)} of {len(sources)} images {what} (warnings above{where}); "
                             f"the other {len(sources) - len(skipped)} were explained")
        return written
    finally:
        bar.close()


class _Work(NamedTuple):
    """How images become inputs and which target they are explained for: what an executor's workers need besides
    the session (picklable, for Ray actors)."""

    size: tuple | None
    channels: int | None
    mean: object
    std: object
    layout: str
    grayscale: bool
    dtype: object
    goal: object
    shown: bool  # return the (resized, cropped) pictures, for overlays
    tolerant: bool  # an unreadable image is an error row (directory mode), not an error


class _Drawing(NamedTuple):
    """How an image's relevance becomes its files (picklable: Ray actors draw too)."""

    layout: str
    cmap: str
    level: float
    overlay_alpha: float | None  # None: no overlay
    dtype: str  # of the stored relevance
    pool: int  # its spatial dims summed over pool x pool blocks


def draw(relevance: np.ndarray, shown, drawing: _Drawing, heatmap_path) -> tuple[bytes, bytes, str]:
    """The files of one image's (or one tensor file's) relevance [rows, K, ...]: the heatmap encoded in the format of
    ``heatmap_path``'s suffix (K ranks: a row of panels per sample; over the picture ``shown`` with an overlay), the
    .npy's bytes, and a line saying the stored shape and size."""
    d, k = drawing, relevance.shape[1]
    maps = [heat_image(relevance[r, i][None], d.layout, d.cmap, d.level) for r in range(len(relevance))
            for i in range(k)]
    if d.overlay_alpha is not None and shown is not None:
        maps = [overlay(shown, m, d.overlay_alpha) for m in maps]
    pic = maps[0] if len(maps) == 1 else grid(maps, cols=k if k > 1 else None)
    stored = _stored(relevance if k > 1 else relevance[:, 0], d.layout, d.dtype, d.pool)
    array = io.BytesIO()
    np.save(array, stored)
    note = (f"relevance stored as {list(stored.shape)} {stored.dtype}: {stored.nbytes} bytes per image "
            f"({relevance.nbytes} unpooled float32)")
    return _encoded(pic, Path(heatmap_path)), array.getvalue(), note


def explain_images(session, work: _Work, items: list, names: dict | None = None) -> dict:
    """Explain a batch of images ``items`` = [(index, path, or an image's array or encoded bytes)] in one run: the
    chunk the writer of :func:`run` takes (``index``, ``relevance`` [N, K, ...], ``labels``, ``scores``, ``shown``,
    ``empty`` of the images read; ``errors``: [(index, message)] of the others, which name an image that is no path
    by ``names[index]``, else as "row INDEX"). Every executor runs this."""
    loaded, errors = [], []
    for i, source in items:
        try:
            if isinstance(source, (str, os.PathLike)):
                x = load_image(source, work.size, work.channels, work.mean, work.std, work.layout, work.grayscale,
                               work.dtype)
            else:
                x = image_input(source, work.size, work.channels, work.mean, work.std, work.layout, work.grayscale,
                                work.dtype, where=(names or {}).get(i, f"row {i}"))
            loaded.append((i, x))
        except InputError as err:
            if not work.tolerant:
                raise
            errors.append((i, str(err)))
    if not loaded:
        return {"index": [], "relevance": None, "labels": [], "scores": [], "shown": [], "empty": [],
                "errors": errors}
    chunk = [i for i, _ in loaded]
    goal = work.goal
    if goal.kind == "index" and len(goal.values) > 1:  # one class per image
        goal = targets.Target("index", tuple(goal.values[i] for i in chunk))
    c = _explain_feeds(session, {session.inputs[0]: np.concatenate([x for _, (x, _) in loaded])}, goal, chunk)
    c.update(shown=[pic if work.shown else None for _, (_, pic) in loaded], errors=errors)
    return c


def _explain_feeds(session, feeds, goal, chunk) -> dict:
    """One run on ``feeds``: the relevance [N, K, ...] (K: the ranks of a topK target, else 1), target labels,
    scores and which samples had an empty seed."""
    if goal.kind == "top" and goal.values[0] > 1:
        ranks = session.explain_topk(feeds, goal.values[0])
        relevance = np.stack([_first(e.relevance) for e in ranks], axis=1)  # [N, K, ...]
        labels = [",".join(str(int(e.target[j])) for e in ranks) for j in range(len(ranks[0].target))]
        scores, empty = _scores(ranks[0].output, ranks[0].target), [False] * len(labels)
    else:
        e = session.explain(feeds, goal)
        relevance = _first(e.relevance)[:, None]  # [N, 1, ...]
        empty = list(~np.asarray(e.seed).reshape(len(e.seed), -1).any(axis=1))
        labels = [str(int(c)) for c in e.target] if goal.kind in ("index", "top") else None
        scores = _scores(e.output, e.target) if labels is not None else [None] * len(relevance)
    return {"index": chunk, "relevance": relevance, "labels": labels, "scores": scores,
            "shown": [None] * len(chunk), "empty": empty, "errors": []}


def _stored(relevance: np.ndarray, layout: str, dtype: str, pool: int) -> np.ndarray:
    """The relevance as written to the .npy: its two spatial dims summed over ``pool`` x ``pool`` blocks (edge blocks
    partial; the total is kept), as ``dtype``."""
    r = relevance
    if pool > 1:
        h_axis = r.ndim - 2 if layout == "nchw" else r.ndim - 3
        for axis in (h_axis, h_axis + 1):
            starts = np.arange(0, r.shape[axis], pool)
            r = np.add.reduceat(r, starts, axis=axis)
    return r.astype(dtype, copy=False)


def _scores(output, target) -> list:
    """Each sample's score of its explained class (None where the output is not [N, classes])."""
    out = np.asarray(output)
    if out.ndim != 2:
        return [None] * len(target)
    return [float(out[j, int(t)]) for j, t in enumerate(target)]


class _Manifest:
    """``out/manifest.jsonl``: a header line (the model, the settings, lrpc's version), then a JSON line per explained
    or failed image, appended as the run goes (a killed run keeps the lines written so far); the images with an ok
    line whose outputs exist are done. Resuming a manifest of another model or other settings is refused."""

    def __init__(self, out, sources: list[Path], paths: list[tuple[Path, Path]], model: dict, settings: dict,
                 resume: bool = True):
        self.path, self.sources, self.paths = Path(out) / MANIFEST, sources, paths
        self.header = {"manifest": "lrpc explain", "lrpc": __version__, "model": model,
                       "settings": json.loads(json.dumps(settings, default=_plain))}  # (as read back: lists)
        self.rows = self._read() if resume else []
        self.new = not self.rows  # the header starts the file at the first row written
        self.older = None
        if self.rows:
            self._check(self.rows[0])

    def _read(self) -> list[dict]:
        rows = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # (a line cut short by a killed run)
                    continue
        return rows

    def _check(self, first: dict) -> None:
        """Refuse to resume a manifest of another model or other settings (one line saying what differs)."""
        again = "pass --no-resume to explain every image again, or write to another directory"
        if "settings" not in first:
            raise InputError(f"{self.path} records no model or settings (an older lrpc wrote it): {again}")
        differ = []
        was, now = (first.get("model") or {}).get("sha256"), self.header["model"]["sha256"]
        if was != now and now is not None:  # (a model file that cannot be read fails later, saying so)
            differ.append(f"the model (sha256 {str(was)[:12]}, now {str(now)[:12]})")
        for key in sorted(set(first["settings"]) | set(self.header["settings"])):
            a, b = first["settings"].get(key), self.header["settings"].get(key)
            if a != b:
                differ.append(f"--{key.replace('_', '-')} ({_brief(a)}, now {_brief(b)})")
        if differ:
            raise InputError(f"{self.path} was written for other settings: {'; '.join(differ)}; {again}")
        if first.get("lrpc") != __version__:
            self.older = first.get("lrpc")

    def todo(self) -> list[int]:
        done = set()
        for row in self.rows:
            if "source" not in row:  # (the header)
                continue
            if row.get("status") == "ok":
                done.add(row.get("source"))
            else:
                done.discard(row.get("source"))
        return [i for i, s in enumerate(self.sources)
                if not (str(s) in done and all(p.is_file() for p in self.paths[i]))]

    def done(self, i: int, target, score) -> None:
        png, npy = self.paths[i]
        self._append({"source": str(self.sources[i]), "heatmap": png.name, "relevance": npy.name,
                      "target": target, "score": score, "status": "ok"})

    def error(self, i: int, err) -> None:
        self._append({"source": str(self.sources[i]), "status": "error", "error": str(err)})

    def _append(self, row: dict) -> None:
        with open(self.path, "w" if self.new else "a") as f:
            if self.new:
                f.write(json.dumps(self.header) + "\n")
                self.new = False
            f.write(json.dumps(row) + "\n")


def _model_record(model) -> dict:
    """The model as a manifest records it: its file and the sha256 of its bytes (and of its external data's)."""
    if isinstance(model, (str, os.PathLike)):
        return {"file": str(model), "sha256": _sha256([model, *sorted(external_data_files(model))])}
    proto = model.proto if isinstance(model, LoadedModel) else model
    return {"file": None, "sha256": hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()}


def _sha256(files) -> str | None:
    """The sha256 of the files' bytes one after the other (None where one is missing: an error comes later)."""
    files = [Path(f) for f in files]
    if not files or not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _file_or_name(rules):
    """A composite's name, or a rule file's name and sha256."""
    if isinstance(rules, (str, os.PathLike)) and Path(rules).is_file():
        return {"file": str(rules), "sha256": _sha256([rules])}
    return rules if isinstance(rules, str) else repr(rules)


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _brief(value) -> str:
    text = "none" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _first(relevance):
    """The first float input's relevance (a model with several float inputs returns a list)."""
    return relevance[0] if isinstance(relevance, list) else relevance


class _Progress:
    """A one-line progress bar on stderr (when it is a terminal); otherwise each step's message is logged."""

    def __init__(self, total: int, show: bool | None):
        self.total, self.done, self.stream = total, 0, sys.stderr
        self.show = self.stream.isatty() if show is None else bool(show)
        self.started = time.perf_counter()

    def step(self, message: str, log) -> None:
        self.done += 1
        if not self.show:
            log(message)
            return
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        filled = int(30 * self.done / max(self.total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} ({rate:.1f}/s)")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line on stderr that does not land on the bar's line."""
        self.stream.write(("\n" if self.show and self.done else "") + message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.show and self.done:
            self.stream.write("\n")
            self.stream.flush()
            self.show = False


def _box_defaults(options: dict, mean, std, tensors: bool) -> None:
    """z-box bounds left as None: the range of [0, 1] images after normalization (of 0..1 for tensors)."""
    for key, edge in (("low", 0.0), ("high", 1.0)):
        if options.get(key) is None:
            v = (edge - _arr(mean, 0.0)) / _arr(std, 1.0) if not tensors else np.array([edge])
            options[key] = float(v[0]) if v.size == 1 else [float(x) for x in v]


def _arr(v, default):
    return np.atleast_1d(np.asarray(default if v is None else v, dtype=np.float64))


def _encoded(pic, path: Path) -> bytes:
    """``pic`` (a PIL image) in the format of ``path``'s suffix."""
    buffer = io.BytesIO()
    try:
        pic.save(buffer, format=pil_image().registered_extensions()[path.suffix.lower()])
    except Exception as err:
        raise InputError(f"{path}: cannot write image: {one_line(err)}") from None
    return buffer.getvalue()


def _outputs(out, sources: list[Path], many: bool, protect=()) -> list[tuple[Path, Path]]:
    """(heatmap path, relevance .npy path) per source; refuses to overwrite any of ``protect``
    (:func:`lrpc.atomic_write.refuse_inputs`)."""
    o = Path(out)
    if many or o.is_dir() or str(out).endswith(("/", os.sep)):
        if o.exists() and not o.is_dir():
            raise InputError(f"{o}: exists and is not a directory (directory mode writes <stem>.png per image)")
        if not o.parent.exists():
            raise InputError(f"{o.parent}: output folder does not exist")
        try:
            o.mkdir(exist_ok=True)
        except OSError as e:
            raise InputError(f"{o}: cannot make the output directory ({e.strerror or type(e).__name__})") from None
        stems = [s.stem for s in sources]
        names = [s.stem if stems.count(s.stem) == 1 else s.name for s in sources]
        pairs = [(o / f"{n}.png", o / f"{n}.npy") for n in names]
    else:
        if o.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{o}: the output needs an image suffix ({', '.join(IMAGE_SUFFIXES)}), e.g. heat.png")
        if not o.parent.exists():
            raise InputError(f"{o.parent}: output folder does not exist")
        pairs = [(o, o.with_suffix(".npy"))]
    for pair in pairs:
        for p in pair:
            refuse_inputs(p, protect)
    return pairs

"""Explain images or tensors end to end: preprocess, compile (unless already compiled), run, write heatmaps.

Used by ``lrpc explain``; the pieces are usable from Python too::

    from lrpc.explain import load_image, prepare
    session, spec = prepare("model.onnx", rules="epsilon-plus")
    x, shown = load_image("cat.jpg", spec.size, spec.channels, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    e = session.explain(x)          # e.output, e.relevance, e.layers, e.target

Images are read with Pillow (``pip install 'lrpc[image]'``), converted to the model's channel count (1:
grayscale, 3: RGB), resized so that they cover the target size (the shorter side fits), center-cropped to
it, scaled to [0, 1] and normalized per channel with ``(x - mean) / std``. The model input is NCHW unless
``layout="nhwc"``.
"""
from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import compiler, targets
from .contract import SEED, SEED_MODE
from .errors import InputError, one_line
from .imaging import _pil_image, grid, heatmap, overlay
from .model_io import external_data_files, protected, read_model, refuse_inputs, write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """The explained model input: name, dims (None where dynamic), numpy dtype, layout, and for images the
    target ``size`` (H, W) and ``channels`` (None where unknown)."""

    name: str
    dims: list
    dtype: np.dtype
    layout: str = "nchw"

    @property
    def size(self):
        if len(self.dims) != 4:
            return None
        h, w = (self.dims[2], self.dims[3]) if self.layout == "nchw" else (self.dims[1], self.dims[2])
        return (h, w) if h and w else None

    @property
    def channels(self):
        if len(self.dims) != 4:
            return None
        return self.dims[1] if self.layout == "nchw" else self.dims[3]


def model_input(model: onnx.ModelProto, layout: str = "nchw") -> InputSpec:
    """The first graph input that is neither the relevance seed nor an initializer."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name == SEED or inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:
            dtype = np.dtype(np.float32)
        return InputSpec(inp.name, dims, dtype, layout)
    raise InputError("the model has no input to explain")


def prepare(model, rules="epsilon-gamma-box", output: str | None = None, input_shapes: dict | None = None,
            layout: str = "nchw", size: tuple | None = None, providers=None, cache: bool = False, seed: str = "input",
            **options):
    """Return ``(Session, InputSpec)``. ``model``: path or ModelProto, plain (compiled here with ``rules``
    and ``options``) or already compiled (input ``relevance_seed`` present: used as is, rules ignored).
    ``size``: (H, W) for images; fixes dynamic spatial dims of a plain model before compiling.
    ``cache``: reuse/store the compilation of a model file in the on-disk cache (:mod:`lrpc.cache`).
    ``seed``: how a plain model is compiled ("top1": the graph seeds each sample's top-1 output, one run); it is
    compiled for the provider the session will run on (see ``for_provider`` of :func:`lrpc.compile`)."""
    from .runtime import Session, default_providers

    if layout not in ("nchw", "nhwc"):
        raise InputError(f"--layout must be nchw or nhwc, got '{layout}'")
    proto, verbatim = read_model(model) if isinstance(model, (str, os.PathLike)) else (model, {})
    if not isinstance(proto, onnx.ModelProto):
        raise InputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    spec = model_input(proto, layout)
    if size is not None and spec.size is not None and tuple(size) != spec.size:
        raise InputError(f"--size {size[0]},{size[1]} differs from the static size {spec.size[0]},{spec.size[1]} "
                         f"of model input '{spec.name}'")
    compiled = SEED in {i.name for i in proto.graph.input} or any(p.key == SEED_MODE for p in proto.metadata_props)
    if not compiled:
        shapes = dict(input_shapes or {})
        if size is not None and spec.size is None and len(spec.dims) == 4 and spec.name not in shapes:
            h, w = size
            shapes[spec.name] = [-1, -1, h, w] if layout == "nchw" else [-1, h, w, -1]
        # a model read here is handed over with the file's bytes (its big weights were never copied out of them):
        # the compiled graph is built in it, the weight scan reads the bytes, and a cache entry and the session get
        # the unchanged weights as the file's bytes
        source = compiler.Owned(proto, verbatim) if isinstance(model, (str, os.PathLike)) else proto
        verbatim = None
        provider = "cuda" if (providers or default_providers())[0] == "CUDAExecutionProvider" else "cpu"
        make = lambda: compiler.compile_for_save(source, rules, output=output, input_shapes=shapes or None,  # noqa: E731
                                                 seed=seed, for_provider=provider, **options)
        if cache and isinstance(model, (str, os.PathLike)):
            from . import cache as compile_cache

            settings = {"output": output, "input_shapes": shapes, "options": options, "seed": seed,
                        "for_provider": provider}
            proto, verbatim = compile_cache.compiled(model, rules, settings, make)
        else:
            proto, verbatim = make()
        spec = model_input(proto, layout)
        source = make = None  # (on a cache hit nothing took the file's bytes out of source: drop them here)
    # (a compiled file: its weights go to the session as the file's bytes)
    return Session(proto, providers=providers, channels_last=layout == "nhwc", verbatim=verbatim), spec


def load_image(path, size, channels: int | None = 3, mean=None, std=None, layout: str = "nchw",
               grayscale: bool = False, dtype=np.float32):
    """Read an image file into a model input ``[1, C, H, W]`` (or ``[1, H, W, C]``).

    Returns ``(tensor, shown)``: ``shown`` is the resized and cropped RGB PIL image before normalization
    (for overlays). ``size``: (H, W). ``channels``: 1 or 3 (None: 1 with ``grayscale``, else 3)."""
    Image = _pil_image()
    from PIL import ImageOps

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an image file")
    try:
        with Image.open(p) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    except Exception as e:  # UnidentifiedImageError, truncated files, decompression bombs, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: cannot read image ({first})") from None
    channels = channels or (1 if grayscale else 3)
    if channels not in (1, 3):
        raise InputError(f"{p}: the model input has {channels} channels; images give 1 (grayscale) or 3 (RGB)")
    img = img.convert("L" if channels == 1 or grayscale else "RGB")
    h, w = size
    iw, ih = img.size
    scale = max(h / ih, w / iw)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    a = np.asarray(img, dtype=np.float64) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] != channels:
        a = np.repeat(a, channels, axis=-1)
    a = (a - _per_channel(mean, channels, 0.0, "--mean")) / _per_channel(std, channels, 1.0, "--std")
    if layout == "nchw":
        a = a.transpose(2, 0, 1)
    return a[None].astype(dtype), img.convert("RGB")


def _per_channel(values, channels: int, default: float, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default)
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if v.size == 1:
        v = np.full(channels, v[0])
    if v.size != channels:
        raise InputError(f"{what}: {v.size} values given, the model input has {channels} channel(s)")
    if what == "--std" and np.any(v == 0):
        raise InputError("--std: values must be nonzero")
    return v


def load_tensors(path, session) -> dict:
    """Feeds from a ``.npy`` (the first model input) or ``.npz`` (one array: the first input; several:
    one per model input, by name). Float arrays are cast to the input's float type (numpy's default
    float64 into a float32 model); ranks and static dims are checked against the model."""
    from .runtime import NUMPY_TYPES, fits

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        arrays = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else {session.inputs[0]: data}
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: cannot read tensors (.npy/.npz expected): {first}") from None
    if len(arrays) == 1:
        arrays = {session.inputs[0]: next(iter(arrays.values()))}
    missing = [n for n in session.inputs if n not in arrays]
    if missing:
        raise InputError(f"{p}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays)})")
    specs = {i.name: i for i in session.session.get_inputs()}
    feeds = {}
    for name in session.inputs:
        a, spec = np.asarray(arrays[name]), specs[name]
        if not fits(spec, a.shape):
            shown = ",".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            raise InputError(f"{p}: array for input '{name}' has shape {list(a.shape)}, the model expects [{shown}]")
        if a.ndim and a.shape[0] == 0:
            raise InputError(f"{p}: array for input '{name}' holds no samples")
        want = NUMPY_TYPES.get(spec.type)
        floating = want is not None and np.issubdtype(want, np.floating)
        if floating and np.issubdtype(a.dtype, np.number) and a.dtype != want:
            a = a.astype(want)
        feeds[name] = a
    return feeds


def image_files(folder) -> list[Path]:
    d = Path(folder)
    if not d.exists():
        raise InputError(f"{d}: no such directory")
    if not d.is_dir():
        raise InputError(f"{d}: not a directory")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
    return files


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
        output=None, input_shapes=None, size=None, mean=None, std=None, grayscale=False, layout="nchw",
        cmap="coldnhot", level=1.0, with_overlay=False, overlay_alpha=0.5, batch_size=8, cache=False,
        progress=None, log=print, **options) -> list[Path]:
    """What ``lrpc explain`` does; returns the written paths. Exactly one of ``image``, ``images``, ``npy``.

    ``target``: see :mod:`lrpc.targets` (class index, None/"top1", "topK", or a dense target); with topK
    each heatmap is a row of K panels (rank 1 first; a tensor batch gives one row per sample) and the .npy
    holds [N, K, ...] instead of [N, ...].
    ``batch_size``: images run together in directory mode (1 where the model's batch dim is static 1).
    In directory mode an unreadable image is skipped with a warning and the others are explained; the run
    then ends with an :class:`InputError` saying how many were skipped (``lrpc explain`` exits 2).
    ``cache``: compile through the on-disk cache. ``progress``: a progress bar on stderr (default: when
    stderr is a terminal). ``options``: lrpc.Options fields; ``low``/``high`` left as None default to the
    range of normalized [0, 1] images ((0 - mean)/std .. (1 - mean)/std)."""
    if sum(x is not None for x in (image, images, npy)) != 1:
        raise InputError("give exactly one of --image, --images, --npy")
    if with_overlay and npy is not None:
        raise InputError("--overlay needs --image or --images (there is no picture under a tensor)")
    if cmap not in ("coldnhot", "bwr", "seismic", "gray"):
        raise InputError(f"unknown colormap '{cmap}'")
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    goal = targets.parse(target)
    _pil_image()  # fail early and clearly without Pillow
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
    if isinstance(rules, (str, os.PathLike)) and Path(rules).is_file():
        read.append((rules, "the rule file"))
    paths = _outputs(out, sources, many=images is not None, protect=protected(read))
    if goal.kind == "index" and len(goal.values) > 1 and images is not None and len(goal.values) != len(sources):
        raise InputError(f"--target: {len(goal.values)} class indices for {len(sources)} images (give one, or "
                         f"one per image in file name order)")

    for key, edge in (("low", 0.0), ("high", 1.0)):
        if options.get(key) is None:  # default: the range of [0, 1] images after normalization
            v = (edge - _arr(mean, 0.0)) / _arr(std, 1.0) if npy is None else np.array([edge])
            options[key] = float(v[0]) if v.size == 1 else [float(x) for x in v]
    # top1: the graph seeds itself, one run per batch; topK: its switch gives the scores and rank 1 in one run
    seed = "input" if goal.kind != "top" else "top1" if goal.values[0] == 1 else "switch"
    session, spec = prepare(model, rules, output=output, input_shapes=input_shapes, layout=layout, size=size,
                            cache=cache, seed=seed, **options)
    if isinstance(model, (str, os.PathLike)):  # (its external data files are known once it was read)
        read += [(f, "the model's external data") for f in sorted(external_data_files(model))]
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
    bar = _Progress(len(sources), progress if images is not None and len(sources) > 1 else False)
    try:
        written, skipped = [], []
        for start in range(0, len(sources), per_run):
            chunk = list(range(start, min(start + per_run, len(sources))))
            shown = [None] * len(chunk)
            if npy is not None:
                feeds = load_tensors(sources[0], session)
            else:
                loaded = []
                for i in chunk:
                    try:
                        loaded.append((i, load_image(sources[i], hw, spec.channels, mean, std, layout, grayscale,
                                                     spec.dtype)))
                    except InputError as err:  # directory mode: the other images are still explained
                        if images is None:
                            raise
                        skipped.append(sources[i])
                        bar.note(f"lrpc: warning: {err}; skipped")
                if not loaded:
                    continue
                chunk = [i for i, _ in loaded]
                feeds = {session.inputs[0]: np.concatenate([x for _, (x, _) in loaded])}
                shown = [pic for _, (_, pic) in loaded]
            chunk_goal = goal
            if goal.kind == "index" and len(goal.values) > 1 and npy is None:  # one class per image
                chunk_goal = targets.Target("index", tuple(goal.values[i] for i in chunk))
            if goal.kind == "top" and goal.values[0] > 1:
                ranks = session.explain_topk(feeds, goal.values[0])
                relevance = np.stack([_first(e.relevance) for e in ranks], axis=1)  # [N, K, ...]
                labels = [",".join(str(int(e.target[j])) for e in ranks) for j in range(len(ranks[0].target))]
            else:
                e = session.explain(feeds, chunk_goal)
                relevance = _first(e.relevance)[:, None]  # [N, 1, ...]
                empty = ~np.asarray(e.seed).reshape(len(e.seed), -1).any(axis=1)
                for j in np.flatnonzero(empty):
                    where = sources[chunk[j]].name if npy is None else f"{sources[0].name} sample {j}"
                    print(f"lrpc: warning: {where}: target {goal} selects no output entry (empty heatmap)", file=sys.stderr)
                labels = [str(int(c)) for c in e.target] if goal.kind in ("index", "top") else None
            k = relevance.shape[1]
            units = [relevance] if npy is not None else [relevance[j:j + 1] for j in range(len(chunk))]
            for j, rel in enumerate(units):  # rel: [rows, K, ...]: a tensor file's batch, or one image
                png, npy_out = paths[chunk[j]]
                maps = [heat_image(rel[r, i][None], layout, cmap, level) for r in range(len(rel)) for i in range(k)]
                if with_overlay and shown[j] is not None:
                    maps = [overlay(shown[j], m, overlay_alpha) for m in maps]
                pic = maps[0] if len(maps) == 1 else grid(maps, cols=k if k > 1 else None)
                array = io.BytesIO()
                np.save(array, rel if k > 1 else rel[:, 0])
                write_atomic([array.getbuffer()], npy_out, read)
                write_atomic(lambda: [_encoded(pic, png)], png, read)
                written += [png, npy_out]
                prefix = "top1 " if seed == "top1" else ""
                what = str(goal) if labels is None else labels[j] if npy is None else ("; " if k > 1 else ",").join(labels)
                bar.step(f"{sources[chunk[j]].name}: target {prefix}{what} -> {png}, {npy_out}", log)
        if skipped:
            raise InputError(f"{len(skipped)} of {len(sources)} images could not be read (warnings above); "
                             f"the other {len(sources) - len(skipped)} were explained")
        return written
    finally:
        bar.close()


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


def _arr(v, default):
    return np.atleast_1d(np.asarray(default if v is None else v, dtype=np.float64))


def _encoded(pic, path: Path) -> bytes:
    """``pic`` (a PIL image) in the format of ``path``'s suffix."""
    buffer = io.BytesIO()
    try:
        pic.save(buffer, format=_pil_image().registered_extensions()[path.suffix.lower()])
    except Exception as err:
        raise InputError(f"{path}: cannot write image: {one_line(err)}") from None
    return buffer.getvalue()


def _outputs(out, sources: list[Path], many: bool, protect=()) -> list[tuple[Path, Path]]:
    """(heatmap path, relevance .npy path) per source; refuses to overwrite any of ``protect``
    (:func:`lrpc.model_io.refuse_inputs`)."""
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

"""Explain datasets on Ray Data: the model is compiled once on the driver, and each actor of a ``map_batches``
actor pool starts one :class:`lrpc.Session` from the compiled bytes and explains batches with the code of
``lrpc explain`` (:func:`lrpc.explain.explain_images`: same preprocessing, same results)::

    import ray, lrpc.ray
    ds = ray.data.read_images("s3://bucket/val/", include_paths=True)
    out = lrpc.ray.explain(ds, "model.onnx", rules="epsilon-plus-flat", target="top1", batch_size=32)
    out.write_parquet("explanations/")          # path, target, score, relevance, error

``lrpc explain --images DIR --ray auto`` runs the same actors (:func:`chunks`), which also draw each image's files
(:func:`lrpc.explain.draw`), and writes what the single-process command writes. Needs ``pip install 'lrpc[ray]'``.
"""
from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np

from .errors import InputError, one_line

# an actor that dies (a node lost, out of memory) is restarted and its batch run again this many times
MAX_RESTARTS = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("Ray is not installed: pip install 'lrpc[ray]' (or pip install 'ray[data]')") from None
    return ray


def connect(address: str | None = "auto"):
    """The ``ray`` module, connected: the running Ray if this process has one; ``"auto"``: the cluster of this
    machine (``ray start``, $RAY_ADDRESS) or else a local one started here; ``"local"``: a local one; otherwise a
    cluster address (``host:port`` or ``ray://host:port``)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    logging.getLogger("ray").setLevel(logging.WARNING)  # (Ray Data logs each run's plan at INFO)
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address in (None, "local"):
        ray.init(**kwargs)
    elif address == "auto":
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:  # no cluster here: a local one
            ray.init(**kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except Exception as err:
            raise InputError(f"--ray {address}: cannot connect ({one_line(err)})") from None
    return ray


def providers(ray) -> list[str]:
    """The onnxruntime providers the actors get: CUDA where the cluster has GPUs (each actor asks for one)."""
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def _resources(ray, concurrency: int | None, num_cpus: float | None, num_gpus: float | None) -> dict:
    """Actors and what each asks for: one per GPU where the cluster has GPUs, else one, and ``num_cpus`` (default
    1: the reading tasks of the dataset need CPUs too); more actors than GPUs share them (each asks 1 / the actors
    per GPU: one actor's model runs while another reads or draws). ``threads``: each actor's onnxruntime threads,
    the CPUs of a node shared by the actors it holds."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    share = num_gpus is None and gpus > 0
    if num_gpus is None:
        num_gpus = 1 if gpus else 0
    actors = int(concurrency or (gpus if num_gpus else 1) or 1)
    if actors < 1:
        raise InputError(f"--ray-actors must be at least 1, got {actors}")
    if share and actors > gpus:
        num_gpus = 1 / math.ceil(actors / gpus)
    nodes = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1]
    threads = max(1, int(max(nodes) // math.ceil(actors / len(nodes))))
    return {"concurrency": actors, "num_cpus": 1 if num_cpus is None else num_cpus, "num_gpus": num_gpus,
            "threads": threads if num_cpus is None else max(1, int(num_cpus))}


class _Explainer:
    """A Ray Data actor: one Session, started from the compiled model's bytes. ``drawing`` (``lrpc explain
    --ray``): it also draws and encodes each image's files, so the driver only writes bytes."""

    def __init__(self, compiled: bytes, work, channels_last: bool, threads: int | None, per_row: bool,
                 column: str = "image", path_column: str = "path", drawing=None, low_memory: bool = False):
        import onnx

        from .runtime import Session

        if not isinstance(compiled, bytes):  # (an ObjectRef of the model that Ray passed on unresolved)
            compiled = _ray().get(compiled)
        self.session = Session(onnx.load_from_string(compiled), threads=threads, channels_last=channels_last,
                               low_memory=low_memory)
        self.work, self.per_row, self.column, self.path_column = work, per_row, column, path_column
        self.drawing = drawing
        k = work.goal.values[0] if work.goal.kind == "top" and work.goal.values[0] > 1 else 1
        c = work.channels or (1 if work.grayscale else 3)
        dims = (c, *work.size) if work.layout == "nchw" else (*work.size, c)
        self.blank = np.zeros((k, *dims), np.float32)  # the relevance of an error row

    def __call__(self, batch: dict) -> dict:
        from .explain import explain_images

        if not self.per_row:  # lrpc explain --ray: each row is a batch of the single-process command's (index,
            # image path, heatmap path)
            rows = json.loads(str(batch["items"][0]))
            c = explain_images(self.session, self.work, [(int(i), str(p)) for i, p, _ in rows])
            return self._drawn(c, [int(i) for i, _, _ in rows], {int(i): h for i, _, h in rows})
        # lrpc.ray.explain: Ray's batch of the user's rows (an image column, and their paths where the dataset has them)
        items = list(enumerate(batch[self.column]))
        keys = [str(p) for p in batch[self.path_column]] if self.path_column in batch else None
        c = explain_images(self.session, self.work, items, dict(enumerate(keys)) if keys else None)
        rows = {}
        for j, i in enumerate(c["index"]):
            rows[i] = (c["relevance"][j].astype(np.float32, copy=False), c["labels"][j] if c["labels"] else "",
                       np.nan if c["scores"][j] is None else c["scores"][j], "")
        for i, err in c["errors"]:
            rows[i] = (self.blank, "", np.nan, err)
        order = [i for i, _ in items]
        relevance = np.stack([rows[i][0] for i in order])
        return {"path": np.array(keys if keys else [str(i) for i in order], dtype=object),
                "target": np.array([rows[i][1] for i in order], dtype=object),
                "score": np.array([rows[i][2] for i in order], dtype=np.float64),
                "relevance": relevance[:, 0] if self.blank.shape[0] == 1 else relevance,
                "error": np.array([rows[i][3] for i in order], dtype=object)}

    def _drawn(self, c: dict, order: list, heatmaps: dict) -> dict:
        """The rows of ``lrpc explain --ray``: per image its encoded heatmap and .npy (:func:`lrpc.explain.draw`,
        as the single-process command draws them), target, score, or its error."""
        from .explain import draw

        rows = {i: (b"", b"", "", "", np.nan, False, err) for i, err in c["errors"]}
        for j, i in enumerate(c["index"]):
            try:
                png, npy, note = draw(c["relevance"][j:j + 1], c["shown"][j], self.drawing, heatmaps[i])
            except InputError as err:
                rows[i] = (b"", b"", "", "", np.nan, False, str(err))
                continue
            rows[i] = (png, npy, note, c["labels"][j] if c["labels"] else "",
                       np.nan if c["scores"][j] is None else c["scores"][j], bool(c["empty"][j]), "")
        column = lambda n, dtype=object: np.array([rows[i][n] for i in order], dtype=dtype)  # noqa: E731
        return {"index": np.array(order, dtype=np.int64), "png": column(0), "npy": column(1), "note": column(2),
                "target": column(3), "score": column(4, np.float64), "empty": column(5, bool), "error": column(6)}


def _map(ds, compiled: bytes, work, channels_last: bool, batch_size, resources: dict, per_row: bool,
         column="image", path_column="path", drawing=None, low_memory=False):
    """``ds`` explained by a pool of ``_Explainer`` actors (restarted, and their batch retried, when they die)."""
    import ray
    from ray.data import ActorPoolStrategy

    compiled = ray.put(compiled)  # once, not pickled into every actor's constructor

    with warnings.catch_warnings():  # (Ray deprecates passing actor options this way but has no other for them)
        warnings.simplefilter("ignore")
        return ds.map_batches(_Explainer, batch_size=batch_size, batch_format="numpy",
                              fn_constructor_args=(compiled, work, channels_last, resources["threads"], per_row,
                                                   column, path_column, drawing, low_memory),
                              compute=ActorPoolStrategy(size=resources["concurrency"]), num_cpus=resources["num_cpus"],
                              num_gpus=resources["num_gpus"] or None, max_restarts=MAX_RESTARTS,
                              max_task_retries=MAX_RESTARTS)


def chunks(loaded, work, batches: list, address="auto", concurrency=None, channels_last=False, num_cpus=None,
           num_gpus=None, drawing=None, low_memory=False):
    """The executor of ``lrpc explain --ray``: yields the chunks of :func:`lrpc.explain.explain_images` for
    ``batches`` (lists of (index, image path, heatmap path), batched as the single-process command batches them)
    computed in Ray actors, with the files drawn there (``drawn``: per image the heatmap's and the .npy's bytes,
    :func:`lrpc.explain.draw` with ``drawing``) instead of the relevance. When Ray gives up on a batch (its retries
    spent) its images come back as error rows."""
    ray = connect(address)
    resources = _resources(ray, concurrency, num_cpus, num_gpus)
    rows = [{"items": json.dumps(b)} for b in batches if b]
    if not rows:
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # (lrpc explain has its own)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    out = _map(ds, loaded.serialized(), work, channels_last, 1, resources, False, drawing=drawing,
               low_memory=low_memory)
    left = {int(b[0]) for batch in batches for b in batch}
    try:
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            ok = [j for j in range(len(b["index"])) if not b["error"][j]]
            chunk = {"index": [int(b["index"][j]) for j in ok], "relevance": None,
                     "drawn": [(bytes(b["png"][j]), bytes(b["npy"][j]), str(b["note"][j])) for j in ok],
                     "labels": [str(b["target"][j]) for j in ok] if work.goal.kind in ("index", "top") else None,
                     "scores": [None if np.isnan(b["score"][j]) else float(b["score"][j]) for j in ok],
                     "empty": [bool(b["empty"][j]) for j in ok], "shown": [None] * len(ok),
                     "errors": [(int(b["index"][j]), str(b["error"][j])) for j in range(len(b["index"]))
                                if b["error"][j]]}
            left -= {int(i) for i in b["index"]}
            yield chunk
    except Exception as err:  # Ray gave up (retries spent): the images not explained are error rows
        message = f"Ray: {type(err).__name__}: {one_line(err)}"
        yield {"index": [], "relevance": None, "labels": None, "scores": [], "empty": [], "shown": [],
               "errors": [(i, message) for i in sorted(left)], "lost": message}


def explain(ds, model, rules="epsilon-gamma-box", target=None, batch_size: int = 8, concurrency: int | None = None,
            num_cpus: float | None = None, num_gpus: float | None = None, column: str = "image",
            path_column: str = "path", size=None, preset=None, mean=None, std=None, grayscale: bool = False,
            layout: str = "nchw", output=None, input_shapes=None, cache: bool = False, low_memory: bool = False,
            **options):
    """Explain every row of the Ray Dataset ``ds`` (an image column ``column``: [H, W] or [H, W, C] uint8, as
    ``ray.data.read_images`` gives, or an image file's bytes, as ``read_binary_files`` gives under "bytes";
    ``path_column`` is passed through). Returns a lazy Dataset with the columns ``path``, ``target`` (the explained
    class; "c1,c2,.." for topK), ``score`` (its output, NaN where none), ``relevance`` ([C, H, W] float32,
    [K, C, H, W] for topK) and ``error`` (empty, or why the row could not be explained, naming its path; its
    relevance is then zeros). ``model``: a plain model (compiled here, once) or a compiled one;
    ``rules``, ``target``, the preprocessing and ``options`` as for ``lrpc explain``. ``concurrency``: actors
    (default one per GPU, else one); ``num_cpus``/``num_gpus``: what each asks for."""
    from . import targets
    from .explain import _box_defaults, _Work, prepare
    from .preprocess import image_size, normalization

    ray = connect()
    size, (mean, std) = image_size(size), normalization(preset, mean, std)
    goal = targets.parse(target)
    if goal.kind == "index" and len(goal.values) > 1:
        raise InputError("lrpc.ray.explain: one class index for all rows (or top1/topK)")
    if goal.kind not in ("index", "top"):
        raise InputError("lrpc.ray.explain: class targets only (a class index, top1 or topK)")
    _box_defaults(options, mean, std, tensors=False)
    resources = _resources(ray, concurrency, num_cpus, num_gpus)
    seed = "input" if goal.kind != "top" else "top1" if goal.values[0] == 1 else "switch"
    loaded, spec = prepare(model, rules, output=output, input_shapes=input_shapes, layout=layout, size=size,
                           providers=providers(ray) if resources["num_gpus"] else ["CPUExecutionProvider"],
                           cache=cache, seed=seed, start=False, **options)
    hw = tuple(size) if size is not None else spec.size
    if len(spec.dims) != 4 or hw is None:
        raise InputError(f"model input '{spec.name}': images need rank 4 and a static height/width (or size=)")
    work = _Work(hw, spec.channels, mean, std, layout, grayscale, spec.dtype, goal, False, True)
    return _map(ds, loaded.serialized(), work, layout == "nhwc", int(batch_size), resources, True, column,
                path_column, low_memory=low_memory)

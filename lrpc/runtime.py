"""Session: a compiled model in onnxruntime: targets become seeds (:mod:`lrpc.targets`), results come back as
:class:`Explanation` (output, relevance, per-layer relevance, target); the providers that ran are reported."""
from __future__ import annotations

import os
import sys
import warnings
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from . import targets
from .contract import (
    LAYER_IN,
    OUTPUT,
    PROVIDER,
    SEED,
    SEED_MODE,
    SUM_IN,
    SWITCH,
    TARGET,
    input_relevance_names,
    metadata,
)
from .errors import InputError, one_line
from .loaded import LoadedModel


class Session:
    """Runs a compiled model (``lrpc.compile`` output or a ``.lrp.onnx`` path) in onnxruntime.

    ``providers``: onnxruntime providers; default CUDA when onnxruntime offers it, else CPU. Check
    :attr:`providers` for the ones the session actually got (a CUDA request can fall back to CPU).
    ``tf32``: let CUDA run float32 convolutions/matmuls in TF32 (faster, ~1e-3 relative error); off by
    default so GPU relevance matches the CPU's to float32 rounding. ``channels_last``: dense outputs are
    [N, *spatial, C] (NHWC models) for the dense targets of :meth:`explain`. ``model`` may also be a
    :class:`lrpc.loaded.LoadedModel` (:func:`lrpc.compiler.compile_loaded`; a path is read as one): the weights it
    holds as read from a file are read by onnxruntime there, not serialized again (a faster start). ``low_memory``:
    onnxruntime's weight prepacking and its static buffer-reuse plan off (docs/performance.md#memory). Prepacking
    gives every MatMul/Gemm its own packed copy of its weight, and a compiled graph's forward and backward read each
    dense weight, so without it each weight is held once (transformers: about 330 MiB less); the reuse plan holds a
    freed buffer for a later tensor of its size, and without it freed tensors go back to the allocator at once
    (ViT-B/16 at batch 8: 250 MiB less). It runs up to ~15% slower, most at short sequences, float32 results can
    differ with the batch a sample runs in at the last bit, and a model read from a file starts from the bytes lrpc
    read. The Session keeps no reference to ``model``."""

    def __init__(self, model, providers: list[str] | None = None, threads: int | None = None, tf32: bool = False,
                 channels_last: bool = False, low_memory: bool = False):
        if not isinstance(model, (str, os.PathLike, onnx.ModelProto, LoadedModel)):
            raise InputError(f"expected a compiled onnx.ModelProto or path, got {type(model).__name__}")
        loaded = LoadedModel.of(model)
        model = loaded.proto
        meta = metadata(model)
        self.top1 = meta.get(SEED_MODE) == "top1"  # compiled with seed="top1": the graph makes its seed
        if SEED not in {i.name for i in model.graph.input} and not self.top1:
            raise InputError(f"model has no '{SEED}' input: compile it first (lrpc compile / lrpc.compile)")
        # compiled with seed="switch": top-1 targets are seeded in the graph (one run, not two), others fed
        self._switch = meta.get(SEED_MODE) == "switch" and SWITCH in {i.name for i in model.graph.input}
        self.session = start_session(loaded, providers, threads, tf32, low_memory)
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"  # where outputs are allocated
        self._device_id = int(self.session.get_provider_options().get(self.providers[0], {}).get("device_id", 0))
        if self.device == "cuda" and meta.get(PROVIDER) != "cuda" and _lrpc_unpools(model):
            warnings.warn(CUDA_UNPOOL, stacklevel=2)
        ins = self.session.get_inputs()
        outs = [o for o in self.session.get_outputs() if not (self._switch and o.name == TARGET)]
        self.inputs = [i.name for i in ins if i.name not in (SEED, SWITCH)]
        self.outputs = [o.name for o in outs]
        self.relevance_outputs = input_relevance_names(self.outputs)
        seed_info = next((i for i in ins if i.name == SEED), None) or \
            next(o for o in outs if o.name == meta.get(OUTPUT, self.outputs[0]))
        self.seed_shape = seed_info.shape
        self._dtype = NUMPY_TYPES.get(seed_info.type, np.float32)
        self._specs = {i.name: i for i in ins}
        # targets are read off the output that was explained (the first one for models compiled before
        # lrpc recorded it); sigmoid scores are foreground above 0.5 (logits: above 0)
        self.scores_output = meta.get(OUTPUT) if meta.get(OUTPUT) in self.outputs else self.outputs[0]
        self.sigmoid = _behind_sigmoid(model.graph, self.scores_output)
        self.channels_last = channels_last
        self._probed: dict = {}  # input shapes -> seed shape read off a forward (dims the inputs do not name)

    def run(self, feeds: dict, seed: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """All outputs by name, for explicit inputs and an explicit seed (none for a top1-compiled model)."""
        self._check_seed_given(seed)
        return self._run(self.outputs, self._feeds(feeds), seed, top1=False)

    def run_on_device(self, feeds: dict, seed=None, outputs: list[str] | None = None) -> dict[str, ort.OrtValue]:
        """As :meth:`run`, but through onnxruntime's IO binding, and the outputs stay where the session runs:
        ``onnxruntime.OrtValue`` s in CUDA memory on a CUDA session (``.numpy()`` copies one to the host), so a
        pipeline whose data lives on the GPU pays no host round trip. ``feeds`` and ``seed`` may be numpy arrays
        or ``OrtValue`` s on any device (e.g. ``OrtValue.ortvalue_from_numpy(x, "cuda", 0)``, or
        ``OrtValue.from_dlpack`` of a framework's GPU tensor); ``outputs``: the names to compute (default all)."""
        self._check_seed_given(seed)
        unknown = [n for n in outputs or () if n not in self.outputs]
        if unknown:
            raise InputError(f"no output {unknown[0]!r}; the model's outputs: {self.outputs}")
        return self._run(outputs or self.outputs, self._feeds(feeds), seed, top1=False, host=False)

    def _check_seed_given(self, seed) -> None:
        if self.top1 and seed is not None:
            raise InputError("this model makes its own seed (compiled with seed top1): it takes no seed")
        if not self.top1 and seed is None:
            raise InputError(f"a seed is needed ('{SEED}')")

    def _run(self, names, feeds, seed, top1: bool, host: bool = True, probe: bool = False) -> dict:
        """One IO-bound run of ``feeds`` (checked by :meth:`_feeds`): inputs bound where they are (numpy arrays are
        read in place on the CPU and copied once to a CUDA device), outputs allocated on the session's device;
        ``host``: copied back as numpy. A seed whose size differs from the explained output's is refused (it
        would broadcast), except in a ``probe`` (a forward-only run: the seed is a placeholder)."""
        if sorted(feeds) != sorted(self.inputs):
            raise InputError(f"inputs {sorted(feeds)} given, the model takes {self.inputs}")
        if not self.top1:
            seed = self._checked(SEED, seed)
            # the seed's leading dim is the batch of an input whose leading dim has the same name (an output may be
            # flattened over the batch, [N*HW, C], or its dims named apart by the exporter: then onnxruntime judges)
            dims, s = self._specs[SEED].shape, _shape(seed)
            same = [n for n in self.inputs
                    if dims and isinstance(dims[0], str) and self._specs[n].shape[:1] == dims[:1]]
            x = _shape(feeds[same[0]]) if same else None
            if x and s and x[0] != s[0]:
                raise InputError(f"the seed holds {s[0]} samples, input '{same[0]}' {x[0]}")
            feeds = {**feeds, SEED: seed}
            if self._switch:
                # (an OrtValue: IO binding finds no bind_cpu_input type for an input that has a default initializer)
                feeds[SWITCH] = ort.OrtValue.ortvalue_from_numpy(np.array(top1))
        binding = bind(self.session, feeds, names, self.device, self._device_id)
        try:
            self.session.run_with_iobinding(binding)
        except (RuntimeError, _ORT_ERRORS.InvalidArgument, _ORT_ERRORS.Fail, _ORT_ERRORS.RuntimeException) as e:
            # (inputs that fit the declared shapes but not each other, e.g. a seed of another batch than the input's)
            raise InputError(f"onnxruntime refused the inputs: {one_line(e)}") from None
        result = dict(zip(names, binding.copy_outputs_to_cpu() if host else binding.get_outputs()))
        if SEED in feeds and self.scores_output in result and not probe:  # (a seed that broadcasts runs, wrongly)
            s, out = _shape(feeds[SEED]), _shape(result[self.scores_output])
            if int(np.prod(s)) != int(np.prod(out)):
                raise InputError(f"the seed has shape {s}, the explained output '{self.scores_output}' {out}: "
                                 f"give a seed of the output's shape")
        return result

    def _checked(self, name: str, value):
        return conform(self._specs[name], value, "the seed" if name == SEED else f"input '{name}'")

    def _run_top1(self, feeds) -> dict[str, np.ndarray]:
        """One run seeding each sample's top-1 output in the graph (``relevance_target`` holds the index)."""
        if self.top1:
            return self.run(feeds)
        return self._run(self.outputs + [TARGET], feeds, np.zeros(self._seed_shape(feeds), self._dtype), top1=True)

    def explain(self, x=None, target=None, seed: np.ndarray | None = None, **inputs) -> Explanation:
        """Explain one target per sample; returns an :class:`Explanation` (output, relevance, layers, target,
        seed).

        ``x``: the input array (or a dict of inputs); or the inputs by name as keywords
        (``explain(input_ids=ids, attention_mask=mask, target="next")``: relevance per token, [B, T]).
        ``target``: see :mod:`lrpc.targets` — a class index, one per sample, None/"top1" for each sample's top-1
        class, a dense target ("pixel:Y,X", "box:Y0,X0,Y1,X1", "mask:FILE", "class:C") or, on logits [B, T, V], a
        sequence target ("next", "token:POS=ID", "continuation:N"). Top-1 is one run in models compiled with seed
        "top1" or "switch" (the graph seeds each sample's arg-max of the explained logits itself); it and the other
        targets that depend on the prediction cost one extra run (with a zero seed) to read the scores otherwise.
        ``seed``: an explicit seed tensor instead, shaped like the explained output (e.g. one-hot × logit, or a
        weighted mask of output pixels)."""
        feeds = self._feeds(_given(x, inputs))
        target = targets.parse(target) if seed is None else None
        is_top1 = target is not None and (target.kind, target.values) == ("top", (1,))
        if self.top1 and not is_top1:
            raise InputError("this model was compiled with seed top1: it explains each sample's top-1 output "
                             "only (compile without --seed top1 for other targets or seeds)")
        if is_top1 and (self.top1 or self._switch):  # one run: the graph seeds each sample's top-1 output itself
            result = self._run_top1(feeds)
            chosen = result[TARGET]
            return self._explanation(feeds, targets.one_hot(self._seed_shape(feeds), chosen, self._dtype), chosen,
                                     result)
        if seed is None:
            seed = self.seed_for(feeds, target)
        return self._explanation(feeds, seed, target)

    def seed_for(self, x=None, target=None, **inputs) -> np.ndarray:
        """The seed :meth:`explain` uses for ``target`` on input ``x`` (or the inputs by name; one extra run where
        the target depends on the prediction)."""
        feeds, target = self._feeds(_given(x, inputs)), targets.parse(target)
        if self.top1 or (self._switch and (target.kind, target.values) == ("top", (1,))):
            return self.explain(feeds, target).seed  # (the same arg-max explain takes: of the explained logits)
        if target.kind == "top" and target.values[0] != 1:
            raise InputError(f"target {target}: use explain_topk(x, {target.values[0]}) for several ranks")
        return targets.seed(target, self._seed_shape(feeds), lambda: self._scores(feeds), self.sigmoid,
                            self.channels_last, self._dtype, ids=lambda: self._token_ids(feeds),
                            mask=lambda: feeds.get("attention_mask"))

    def _token_ids(self, feeds) -> np.ndarray:
        """The token ids among ``feeds``: ``input_ids``, else the only integer input [N, T]."""
        if "input_ids" in feeds:
            return np.asarray(feeds["input_ids"])
        ints = [n for n in self.inputs if self._specs[n].type in _INT_TYPES and len(self._specs[n].shape) == 2]
        if len(ints) != 1:
            raise InputError(f"which input holds the token ids? name it 'input_ids' (integer inputs: {ints})")
        return np.asarray(feeds[ints[0]])

    def explain_topk(self, x, k: int) -> list[Explanation]:
        """Explanations of each sample's ``k`` highest outputs, rank 1 first, ranked on the graph output; the
        explained classes are in each :attr:`Explanation.target` ([N] per rank). ``k`` runs: the first run is the
        graph's own top-1 (compiled with seed "switch"), which gives the scores and the explanation of rank 1 at once
        (its arg-max is taken on the explained tensor, e.g. the logits before a stripped softmax: where the scores
        tie and it picks another class than the ranking, rank 1 is run again with its seed: ``k + 1`` runs, as
        without the switch; ``k + 1`` runs in models compiled without it)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"top-k: k must be a whole number of at least 1, got {k!r}")
        feeds = self._feeds(x)
        if (self.top1 or self._switch) and int(k) == 1:
            return [self.explain(feeds)]
        if self.top1:
            raise InputError(f"this model was compiled with seed top1: it explains the top-1 output only, not top{k}")
        shape = self._seed_shape(feeds)
        first = self._run_top1(feeds) if self._switch else None
        scores = first[self.scores_output] if first is not None else self._scores(feeds)
        classes, seeds = targets.topk(shape, scores, int(k), self._dtype)
        if first is not None and not np.array_equal(first[TARGET], classes[:, 0]):
            first = None
        return [self._explanation(feeds, s, classes[:, i], first if i == 0 else None) for i, s in enumerate(seeds)]

    def _explanation(self, feeds, seed, target, result=None) -> Explanation:
        result = self.run(feeds, seed) if result is None else result
        relevance = [result[n] for n in self.relevance_outputs]
        layers = {n.split("/", 1)[1]: result[n] for n in self.outputs if n.startswith(LAYER_IN)}
        if not layers:  # compiled with --layerwise sums: per-sample sums instead
            layers = {n.split("/", 1)[1]: result[n] for n in self.outputs if n.startswith(SUM_IN)}
        if getattr(target, "kind", None) in ("index", "top"):
            target = self._chosen(seed)
        return Explanation(result[self.scores_output], relevance[0] if len(relevance) == 1 else relevance,
                           layers, target, seed)

    def _feeds(self, x) -> dict:
        """``x`` (one input's value, or {name: value}) with each value checked and converted (:func:`conform`)."""
        feeds = x if isinstance(x, dict) else {self.inputs[0]: x}
        return {n: self._checked(n, v) if n in self._specs else v for n, v in feeds.items()}

    def _seed_shape(self, feeds) -> list[int]:
        """The seed's shape for ``feeds``: a dynamic dim takes the size of an input's dim of the same name (a sequence
        length ``T`` of ``input_ids`` [B, T] and logits [B, T, V]; compiling names an exported output's dims after the
        inputs' where shape inference finds them). Other dims are read off the explained output of a run with a
        placeholder seed (once per input shapes; onnxruntime runs the whole graph), where it has the seed's rank;
        else they are the batch."""
        batch = _shape(next(iter(feeds.values())))[0]
        named = {d: n for name, value in feeds.items() if name in self._specs
                 for d, n in zip(self._specs[name].shape, _shape(value)) if isinstance(d, str)}
        shape = [d if isinstance(d, int) else named.get(d) for d in self.seed_shape]
        if None in shape[1:]:
            key = tuple((n, tuple(_shape(v))) for n, v in sorted(feeds.items()))
            if key not in self._probed:
                placeholder = [batch, *(1 if d is None else d for d in shape[1:])]
                try:
                    self._probed[key] = self._forward_shape(feeds, placeholder)
                except InputError as e:  # (the relevance reshapes the seed: the placeholder does not fit)
                    unnamed = [d for d in self.seed_shape[1:] if isinstance(d, str) and d not in named]
                    raise InputError(f"the explained output's dims {unnamed} are named by no input and could not "
                                     f"be read off a run ({e}): give seed= of the output's shape") from None
            out = self._probed[key]
            if len(out) == len(shape):
                shape = [o if d is None else d for d, o in zip(shape, out)]
        return [batch if d is None else d for d in shape]

    def _forward_shape(self, feeds, placeholder: list[int]) -> list[int]:
        """The explained output's shape for ``feeds``, from a run with a zero seed shaped ``placeholder`` (the
        relevance it gives is not used; where the relevance reshapes the seed, the run fails: InputError)."""
        seed = None if self.top1 else np.zeros(placeholder, self._dtype)
        out = self._run([self.scores_output], feeds, seed, top1=False, probe=True)
        return _shape(out[self.scores_output])

    def _scores(self, feeds) -> np.ndarray:
        """The scores the targets refer to (one run with a zero seed)."""
        seed = None if self.top1 else np.zeros(self._seed_shape(feeds), self._dtype)
        return self.run(feeds, seed)[self.scores_output]

    @staticmethod
    def _chosen(seed) -> np.ndarray:
        flat = np.asarray(seed).reshape(np.shape(seed)[0], -1)
        return flat.argmax(axis=1)


def start_session(model: LoadedModel, providers: list | None = None, threads: int | None = None,
                  tf32: bool = False, low_memory: bool = False) -> ort.InferenceSession:
    """:func:`inference_session` of ``model``, whose weights may still be those of the file it was read from (big
    ones deferred, never copied into the proto): onnxruntime reads those in that file as external data
    (:meth:`lrpc.loaded.LoadedModel.for_runtime`), not out of the model serialized again; when the file changed
    since lrpc read it, onnxruntime could not read it there, or the session would keep it mapped (and so depend on
    it), the session is started again from the bytes lrpc read, with the first failure attached to a second one.
    A ``low_memory`` session starts from those bytes at once (without prepacking, onnxruntime would keep every
    weight mapped from the file)."""
    def serialize(whole: bool):
        return (model.serialized(), None) if whole else model.for_runtime()

    data, source = serialize(whole=low_memory or not _READS_EXTERNAL_FOLDER)
    session, first_error = None, None
    try:
        session = inference_session(data, providers, threads, tf32, external_folder=source and source.path.parent,
                                    low_memory=low_memory)
    except Exception as e:
        if source is None:
            raise
        first_error = e
    data = None
    if source is not None and (session is None or not source.unchanged() or source.mapped_elsewhere()):
        session = None  # (the first session goes before the second starts)
        try:
            session = inference_session(serialize(whole=True)[0], providers, threads, tf32, low_memory=low_memory)
        except Exception as e:  # the first failure stays attached (--debug shows both)
            raise e from first_error
    return session


def inference_session(model, providers: list | None = None, threads: int | None = None, tf32: bool = False,
                      cuda_options: dict | None = None, profile: str | None = None,
                      external_folder=None, low_memory: bool = False) -> ort.InferenceSession:
    """The onnxruntime session lrpc runs graphs in (``Session``; the benchmarks use it for both sides).

    ``model``: serialized bytes or a path. ``providers``: default CUDA when onnxruntime offers it, else CPU;
    plain names (options are set here). ``threads``: intra-op threads (default: onnxruntime's choice, the physical
    cores), one inter-op thread. Memory (docs/performance.md#memory): onnxruntime's memory pattern (one
    block sized by the first run for all intermediate tensors) is off — a compiled graph keeps the forward's
    activations for its backward half, and the pattern raised the peak at equal speed; on CUDA the arena grows by
    what is requested, not by powers of two. ``tf32``: CUDA float32 convolutions/matmuls in TF32.
    ``cuda_options``: more CUDA provider options. ``profile``: a file prefix for onnxruntime's profiler (off by
    default). ``external_folder``: where the external data of a model given as bytes lie
    (:meth:`lrpc.loaded.LoadedModel.for_runtime`). ``low_memory``: onnxruntime's weight prepacking and buffer-reuse
    plan off (:class:`Session`)."""
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_mem_reuse = False
    options.log_severity_level = 4  # (a failing run raises with the message: not also logged in red on stderr)
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if providers is None:
        providers = default_providers()
    cuda = {"use_tf32": str(int(tf32)), "arena_extend_strategy": "kSameAsRequested", **(cuda_options or {})}
    providers = [("CUDAExecutionProvider", cuda) if p == "CUDAExecutionProvider" else p for p in providers]
    session = ort.InferenceSession(str(model) if isinstance(model, os.PathLike) else model, options,
                                   providers=providers)
    release_freed_memory()
    return session


def default_providers() -> list[str]:
    """CUDA when onnxruntime offers it, else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def release_freed_memory() -> None:
    """Hand the memory freed in this process's heap back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A session start frees much (the parsed model, weights onnxruntime folded or re-laid out, constant folding's
    intermediates), and glibc keeps such memory in the process instead of returning it; a compiled graph's run
    then grows on top of it. The call is cheap next to a session start and leaves run times unchanged
    (docs/performance.md#memory)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # (a C library without it, e.g. musl)
        pass


CUDA_UNPOOL = ("the compiled graph has MaxUnpool nodes (MaxPool's backward), which onnxruntime's CUDA provider runs "
               "on the CPU, with copies to and from the GPU: compile it for CUDA (lrpc.compile(..., "
               "for_provider=\"cuda\"), lrpc compile --for-provider cuda) to keep them on the GPU")


def _lrpc_unpools(model: onnx.ModelProto) -> bool:
    """Whether ``model`` has a MaxUnpool lrpc emitted (node names under ``lrp/``: the winner-mode MaxPool backward of
    disjoint windows that earlier lrpc versions compiled for the CPU)."""
    return any(n.op_type == "MaxUnpool" and n.name.startswith("lrp/") for n in model.graph.node)


def bind(session: ort.InferenceSession, feeds: dict, names: list[str], device: str,
         device_id: int = 0) -> ort.IOBinding:
    """An IO binding of ``session``: ``feeds`` (numpy arrays or ``OrtValue`` s) as inputs, outputs ``names``
    allocated by onnxruntime on ``device`` ("cpu" or "cuda") number ``device_id``. The binding keeps its inputs
    alive (numpy arrays are read in place; a CPU OrtValue may view a numpy array)."""
    binding = session.io_binding()
    binding.keep = []
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.keep.append(value)
            binding.bind_ortvalue_input(name, value)
        else:
            binding.keep.append(np.asarray(value, order="C"))  # (0-d stays 0-d)
            binding.bind_cpu_input(name, binding.keep[-1])
    for name in names:
        binding.bind_output(name, device, device_id)
    return binding


def fits(spec, shape) -> bool:
    """Whether ``shape`` has the rank and the fixed dimensions of onnxruntime input ``spec``."""
    return len(shape) == len(spec.shape) and all(not isinstance(d, int) or d == n for d, n in zip(spec.shape, shape))


def conform(spec, value, what: str):
    """``value`` as onnxruntime input ``spec`` (a NodeArg) takes it (lists and scalars converted to its dtype), or a
    one-line InputError naming ``what`` when its dtype, rank or a fixed dimension differs or it holds no sample."""
    if isinstance(value, ort.OrtValue):
        dtype = value.data_type()
    else:
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value, NUMPY_TYPES.get(spec.type))
            except (TypeError, ValueError) as e:
                raise InputError(f"{what}: cannot be read as {spec.type[7:-1]} ({str(e).splitlines()[0]})") from None
        dtype = f"tensor({_ONNX.get(value.dtype.type, value.dtype.name)})"
    shape = _shape(value)
    if dtype != spec.type or not fits(spec, shape):
        raise InputError(f"{what}: got {dtype[7:-1]} {shape}, the model takes {spec.type[7:-1]} {spec.shape}")
    if shape and shape[0] == 0:
        raise InputError(f"{what}: an empty batch (no sample)")
    return value


def _given(x, inputs: dict):
    """``x``, or the inputs given by name (not both)."""
    if inputs and x is not None:
        raise InputError("give the input as x or the inputs by name, not both")
    return inputs or x


def _shape(value) -> list[int]:
    return list(value.shape() if isinstance(value, ort.OrtValue) else np.shape(value))


# onnxruntime's type names -> numpy types
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
               "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
_ONNX = {v: k[7:-1] for k, v in NUMPY_TYPES.items()}  # numpy scalar type -> onnxruntime's name
_INT_TYPES = [k for k, v in NUMPY_TYPES.items() if np.dtype(v).kind in "iu"]


_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state
# onnxruntime looks up the external data of a model given as bytes in a folder given by a session option from 1.21
# on (older versions take the option silently and look in the working directory); on Linux only, where a session
# that would keep the file mapped can be told (Source.mapped_elsewhere)
_READS_EXTERNAL_FOLDER = sys.platform.startswith("linux") and tuple(
    int(p) for p in ort.__version__.split(".")[:2] if p.isdigit()) >= (1, 21)


def _behind_sigmoid(graph: onnx.GraphProto, name: str) -> bool:
    """Whether tensor ``name`` is a Sigmoid's output, possibly moved by layout-only ops (Transpose, ...)."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(name)
    while node is not None and node.op_type in ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"):
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "Sigmoid"


class Explanation(NamedTuple):
    """What :meth:`Session.explain` returns. ``output``: the model output the targets refer to (the
    graph output chosen at compile time, e.g. softmax probabilities); ``relevance``: relevance of the
    input (a list for several float inputs; per token, [B, T], for a model of token ids); ``layers``: per-layer
    relevance by layer name when the model was compiled with ``--layerwise full`` (``sums``: per-sample sums),
    else empty; ``target``: the explained class per sample for class targets, else the parsed dense target (None
    for explicit seeds); ``seed``: the seed that was propagated (shaped like the explained output)."""

    output: np.ndarray
    relevance: np.ndarray | list
    layers: dict
    target: object = None
    seed: np.ndarray | None = None

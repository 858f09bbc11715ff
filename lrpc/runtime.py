"""Session: a compiled model in onnxruntime, with seeding by class index and provider reporting."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from .emit import SEED
from .errors import InputError
from .model_io import load_model


class Session:
    """Runs a compiled model (``lrpc.compile`` output or a ``.lrp.onnx`` path) in onnxruntime.

    ``providers``: onnxruntime providers; default CUDA when onnxruntime offers it, else CPU. Check
    :attr:`providers` for the ones the session actually got (a CUDA request can fall back to CPU).
    ``tf32``: let CUDA run float32 convolutions/matmuls in TF32 (faster, ~1e-3 relative error); off by
    default so GPU relevance matches the CPU's to float32 rounding."""

    def __init__(self, model, providers: list[str] | None = None, threads: int | None = None, tf32: bool = False):
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        if not isinstance(model, onnx.ModelProto):
            raise InputError(f"expected a compiled onnx.ModelProto or path, got {type(model).__name__}")
        if SEED not in {i.name for i in model.graph.input}:
            raise InputError(f"model has no '{SEED}' input: compile it first (lrpc compile / lrpc.compile)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        providers = [("CUDAExecutionProvider", {"use_tf32": str(int(tf32))}) if p == "CUDAExecutionProvider" else p
                     for p in providers]
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        self.providers = self.session.get_providers()
        ins = self.session.get_inputs()
        self.inputs = [i.name for i in ins if i.name != SEED]
        self.seed_shape = next(i.shape for i in ins if i.name == SEED)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.relevance_outputs = [n for n in self.outputs if n == "relevance" or n.startswith("relevance_")]
        self._dtype = np.float64 if next(i.type for i in ins if i.name == SEED) == "tensor(double)" else np.float32

    def run(self, feeds: dict, seed: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs by name, for explicit inputs and an explicit seed."""
        values = self.session.run(None, {**feeds, SEED: np.asarray(seed, self._dtype)})
        return dict(zip(self.outputs, values))

    def explain(self, x, target=None, seed: np.ndarray | None = None):
        """Return ``(first model output, relevance)``.

        ``x``: the input array (or a dict of inputs). ``target``: a class index, one per sample, or None
        for each sample's top-1 class (one extra run); the seed is then one-hot. ``seed``: an explicit seed
        tensor instead (e.g. one-hot × logit, or a mask of output pixels)."""
        feeds = x if isinstance(x, dict) else {self.inputs[0]: np.asarray(x)}
        batch = next(iter(feeds.values())).shape[0]
        if seed is None:
            if target is None:
                target = np.argmax(self._first_output(feeds, batch).reshape(batch, -1), axis=1)
            seed = self._one_hot(np.broadcast_to(np.asarray(target), (batch,)), batch)
        result = self.run(feeds, seed)
        relevance = [result[n] for n in self.relevance_outputs]
        return result[self.outputs[0]], relevance[0] if len(relevance) == 1 else relevance

    def _first_output(self, feeds, batch):
        shape = [batch if not isinstance(d, int) else d for d in self.seed_shape]
        return self.run(feeds, np.zeros(shape, self._dtype))[self.outputs[0]]

    def _one_hot(self, classes, batch):
        shape = [batch if not isinstance(d, int) else d for d in self.seed_shape]
        seed = np.zeros((batch, int(np.prod(shape[1:]))), self._dtype)
        classes = np.asarray(classes, np.int64)
        if classes.min() < 0 or classes.max() >= seed.shape[1]:
            raise InputError(f"target class out of range 0..{seed.shape[1] - 1}: {classes.tolist()}")
        seed[np.arange(batch), classes] = 1.0
        return seed.reshape(shape)

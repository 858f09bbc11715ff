"""What to explain: targets and the relevance seeds they make.

A target is given as text (``lrpc explain --target``) or to :meth:`lrpc.Session.explain`:

=====================  ==========================================================================
``281`` / ``[3, 1]``   an output index (flat, per sample): one for all samples or one per sample
``top1`` / ``None``    each sample's highest output
``topK`` (``top5``)    the K highest outputs, explained one rank at a time (``Session.explain_topk``)
``pixel:Y,X``          dense outputs: one output position; ``pixel:C,Y,X`` names its channel
``box:Y0,X0,Y1,X1``    dense outputs: the positions Y0 <= y < Y1, X0 <= x < X1 (``box:C,...``: channel C)
``mask:FILE``          dense outputs: the nonzero entries of a .npy file (image files: gray level
                       >= 128), either one per position ([H, W]) or per channel and position ([C, H, W])
``class:C``            dense outputs: every position whose predicted class is C
``next``               sequence outputs: the top-1 token at the last position (which tokens made the next one;
                       the last one the attention mask keeps, where there is one; a mask longer than the
                       sequence, as a decoder's with a key/value cache, is read at its last T positions)
``token:POS``          sequence outputs: the top-1 token at position POS (negative: from the end)
``token:POS=ID,...``   sequence outputs: token ID at position POS; several pairs are explained together
``continuation:N``     sequence outputs: the input's last N tokens, each at the position before it (a generated
                       continuation explained in one run; needs the token ids)
=====================  ==========================================================================

Sequence outputs are logits ``[N, T, V]`` (a decoder's, one row of vocabulary scores per position); their
targets seed one at each selected (position, token) and zero elsewhere, so several pairs explain their sum.

Dense outputs are laid out ``[N, C, *spatial]`` (NCHW segmentation maps; one or more spatial axes;
coordinates count spatial axes only), or ``[N, *spatial, C]`` with ``channels_last`` (``--layout nhwc``).
Where a target names positions but no channel, each position takes its predicted channels: the arg-max
over channels (softmax or logits), every channel above 0.5 when the output is a Sigmoid's (independent
labels), and for a one-channel output channel 0 at every selected position. The predicted class of a
one-channel output is 1 where the score exceeds 0.5 (after a Sigmoid) or 0 (logits) and 0 elsewhere;
both classes seed channel 0 (the relevance then shows the evidence for the foreground at the selected
positions). ``class:C`` of a several-channel output selects channel C where C is predicted.

Seeds are one at the selected output entries and zero elsewhere, so the explanation of a region is the
sum of the explanations of its positions and conserves the number of selected entries."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

DENSE = ("pixel", "box", "mask", "class")
SEQUENCE = ("next", "token", "continuation")


@dataclass(frozen=True)
class Target:
    """A parsed target. ``kind``: index, top, pixel, box, mask, class, next, token, continuation. ``values``: the
    numbers (indices; k; [C,] coordinates; class; a position, or position and token pairs flat; N), ``path``: the
    mask file."""

    kind: str
    values: tuple = ()
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "index":
            return ",".join(map(str, self.values))
        if self.kind == "top":
            return f"top{self.values[0]}"
        if self.kind == "mask":
            return f"mask:{self.path}"
        if self.kind == "next":
            return "next"
        if self.kind == "token" and len(self.values) > 1:
            v = self.values
            return "token:" + ",".join(f"{v[i]}={v[i + 1]}" for i in range(0, len(v), 2))
        return f"{self.kind}:{','.join(map(str, self.values))}"


def parse(target) -> Target:
    """A :class:`Target` from text, an int, a sequence of ints, None (top1) or a Target."""
    parsed = _parse(target)
    if any(abs(v) >= 2**62 for v in parsed.values):
        raise InputError(f"target {target}: {max(parsed.values, key=abs)} is out of range")
    return parsed


def _parse(target) -> Target:
    if isinstance(target, Target):
        return target
    if target is None:
        return Target("top", (1,))
    if isinstance(target, (int, np.integer)):
        return Target("index", (int(target),))
    if not isinstance(target, str):
        values = np.asarray(target)
        if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
            raise InputError(f"target: expected a class index, a list of them (one per sample) or a target "
                             f"string, got {target!r}")
        return Target("index", tuple(int(v) for v in values))
    text = target.strip()
    m = re.fullmatch(r"top(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise InputError(f"--target {text}: k must be at least 1")
        return Target("top", (k,))
    if text == "next":
        return Target("next")
    kind, sep, rest = text.partition(":")
    if kind in SEQUENCE[1:] and sep:
        return _sequence(kind, rest)
    if not sep:
        try:
            return Target("index", tuple(int(v) for v in text.split(",")))
        except ValueError:
            raise InputError(f"--target: expected a class index, top1, topK, pixel:Y,X, box:Y0,X0,Y1,X1, "
                             f"mask:FILE, class:C, next, token:POS[=ID] or continuation:N, got '{text}'") from None
    if kind not in DENSE:
        raise InputError(f"--target {text}: unknown target kind '{kind}' (pixel, box, mask, class, token, "
                         f"continuation)")
    if kind == "mask":
        if not rest:
            raise InputError("--target mask: needs a file, e.g. mask:region.npy")
        return Target("mask", (), rest)
    try:
        values = tuple(int(v) for v in rest.split(","))
    except ValueError:
        raise InputError(f"--target {text}: expected integers after '{kind}:'") from None
    if any(v < 0 for v in values):
        raise InputError(f"--target {text}: coordinates and classes must be >= 0")
    if kind == "class" and len(values) != 1:
        raise InputError(f"--target {text}: class takes one class index")
    return Target(kind, values)


def _sequence(kind: str, rest: str) -> Target:
    """``token:POS``, ``token:POS=ID,...`` or ``continuation:N``."""
    text = f"{kind}:{rest}"
    try:
        if kind == "continuation":
            n = int(rest)
            if n < 1:
                raise InputError(f"--target {text}: N must be at least 1")
            return Target(kind, (n,))
        if "=" not in rest:
            return Target(kind, (int(rest),))
        pairs = [p.split("=") for p in rest.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        values = tuple(int(v) for p in pairs for v in p)
    except ValueError:
        raise InputError(f"--target {text}: expected token:POS, token:POS=ID[,POS=ID...] or continuation:N "
                         f"(integers)") from None
    if any(v < 0 for v in values[1::2]):
        raise InputError(f"--target {text}: token ids must be >= 0")
    return Target(kind, values)


def seed(target: Target, shape: list[int], scores, sigmoid: bool = False, channels_last: bool = False,
         dtype=np.float32, ids=None, mask=None) -> np.ndarray:
    """The seed for ``target`` on an explained output of ``shape`` ([N, ...]). ``scores``: a callable
    returning the model's scores (shaped like the explained output), called only where the target depends
    on the prediction (top, class, positions without a channel on a multi-channel output). ``sigmoid``:
    the scores are sigmoid probabilities (foreground above 0.5; several channels are independent labels)
    rather than logits or softmax probabilities. ``channels_last``: the output is [N, *spatial, C].
    ``top`` targets give rank 1 here; :func:`topk` gives all ranks. ``ids``: a callable returning the token ids
    [N, T] (read by ``continuation`` only); ``mask``: one returning the attention mask [N, T] or None (read by
    ``next``: each sample's last position the mask keeps)."""
    shape = [int(d) for d in shape]
    batch = shape[0]
    if target.kind in SEQUENCE:
        return sequence_seed(target, shape, scores, ids, dtype, mask)
    if target.kind == "top":
        if target.values[0] != 1:
            raise InputError(f"--target {target}: one rank at a time here; several ranks: lrpc explain "
                             f"--target {target} or Session.explain_topk")
        return topk(shape, scores(), 1, dtype)[1][0]
    if target.kind == "index":
        return one_hot(shape, np.broadcast_to(_per_sample(target.values, batch), (batch,)), dtype)
    if len(shape) < 3:
        raise InputError(f"--target {target}: a dense target needs an output [N, C, H, W, ...]; the explained "
                         f"output has shape {shape} (use a class index or topK)")
    if channels_last:
        first = [shape[0], shape[-1], *shape[1:-1]]
        s = _dense(target, first, lambda: np.moveaxis(np.asarray(scores()), -1, 1), sigmoid)
        return np.moveaxis(s, 1, -1).astype(dtype)
    return _dense(target, shape, scores, sigmoid).astype(dtype)


def sequence_seed(target: Target, shape: list[int], scores, ids=None, dtype=np.float32, mask=None) -> np.ndarray:
    """The seed of a sequence target (next, token, continuation) on logits of ``shape`` [N, T, V]; ``ids``, ``mask``:
    callables returning the token ids and the attention mask (or None), see :func:`seed`."""
    if len(shape) != 3:
        raise InputError(f"--target {target}: a sequence target needs logits [N, T, V]; the explained output has "
                         f"shape {shape}")
    batch, length, vocab = shape
    s = np.zeros(shape, dtype)
    rows = np.arange(batch)
    if target.kind == "continuation":
        n = target.values[0]
        if n > length - 1:
            raise InputError(f"--target {target}: a sequence of {length} tokens continues at most {length - 1} "
                             f"tokens after the first")
        if ids is None:
            raise InputError(f"--target {target}: needs the token ids (a model of token ids)")
        tokens = np.asarray(ids())
        if list(tokens.shape) != [batch, length]:
            raise InputError(f"--target {target}: token ids of shape {list(tokens.shape)}, the logits {shape}")
        for token in (int(tokens.min()), int(tokens.max())):
            _token_in_range(target, token, vocab)
        for p in range(length - 1 - n, length - 1):
            s[rows, p, tokens[:, p + 1]] = 1.0
        return s
    if target.kind == "next":
        kept = None if mask is None else mask()
        if kept is None:
            pairs = [(-1, None)]
        else:  # each sample's last position the mask keeps (right padding)
            kept = np.asarray(kept) != 0
            if kept.ndim == 2 and kept.shape[1] > length:  # (with a key/value cache it covers the cached tokens too)
                kept = kept[:, -length:]
            if list(kept.shape) != [batch, length] or not kept.any(axis=1).all():
                raise InputError(f"--target next: the attention mask {list(kept.shape)} must be [N, T] = "
                                 f"{[batch, length]} and keep a position in each sample")
            last = length - 1 - np.argmax(kept[:, ::-1], axis=1)
            token = np.asarray(scores())[rows, last].argmax(-1)
            s[rows, last, token] = 1.0
            return s
    else:
        pairs = [(target.values[0], None)] if len(target.values) == 1 else \
            list(zip(target.values[::2], target.values[1::2]))
    for pos, token in pairs:
        if not -length <= pos < length:
            raise InputError(f"--target {target}: position {pos} outside the sequence of {length} tokens")
        if token is None:
            token = np.asarray(scores())[:, pos].argmax(-1)
        else:
            _token_in_range(target, token, vocab)
        s[rows, pos, token] = 1.0
    return s


def _token_in_range(target, token: int, vocab: int) -> None:
    if not 0 <= token < vocab:
        raise InputError(f"--target {target}: token id {token} outside the vocabulary 0..{vocab - 1}")


def _dense(target: Target, shape: list[int], scores, sigmoid: bool) -> np.ndarray:
    """Boolean seed [N, C, *spatial] of a dense target."""
    batch, channels, spatial = shape[0], shape[1], shape[2:]
    selected = np.zeros(shape, bool)  # which (channel, position) entries are seeded
    if target.kind == "class":
        c = target.values[0]
        limit = 2 if channels == 1 else channels
        if c >= limit:
            raise InputError(f"--target {target}: class out of range 0..{limit - 1}")
        on = _predicted(scores(), shape, sigmoid)
        if channels == 1:
            selected[:, 0] = on[:, 0] if c == 1 else ~on[:, 0]
        else:
            selected[:, c] = on[:, c]
        return selected
    if target.kind == "mask":
        mask = _read_mask(target.path, channels, spatial)
        if mask.ndim == len(spatial) + 1:  # per channel
            selected[:] = mask
            return selected
        positions = np.broadcast_to(mask, [batch, *spatial])
    else:
        positions, channel = _positions(target, shape)
        if channel is not None:
            selected[:, channel] = positions
            return selected
    if channels == 1:
        selected[:, 0] = positions
    else:
        selected[:] = positions[:, None] & _predicted(scores(), shape, sigmoid)
    return selected


def _positions(target: Target, shape: list[int]):
    """(positions [N, *spatial] bool, explicit channel or None) of a pixel/box target."""
    channels, spatial = shape[1], shape[2:]
    n = len(spatial)
    coords = list(target.values)
    want = n if target.kind == "pixel" else 2 * n
    if len(coords) not in (want, want + 1):
        axes = ",".join("YX"[-n:] if n <= 2 else [f"d{i}" for i in range(n)])
        form = axes if target.kind == "pixel" else f"{axes} (start) then {axes} (end)"
        raise InputError(f"--target {target}: this output has {n} spatial axes (shape {shape}): give "
                         f"{target.kind}:[C,]{form}")
    channel = coords.pop(0) if len(coords) == want + 1 else None
    if channel is not None and channel >= channels:
        raise InputError(f"--target {target}: channel {channel} out of range 0..{channels - 1}")
    lo, hi = (coords, [v + 1 for v in coords]) if target.kind == "pixel" else (coords[:n], coords[n:])
    for i in range(n):
        if not (0 <= lo[i] < hi[i] <= spatial[i]):
            raise InputError(f"--target {target}: outside the output's spatial size {spatial} "
                             f"(box ends are exclusive and must exceed its starts)")
    positions = np.zeros([shape[0], *spatial], bool)
    positions[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])] = True
    return positions, channel


def topk(shape: list[int], scores: np.ndarray, k: int, dtype=np.float32) -> tuple[np.ndarray, list]:
    """``(classes [N, k], [seed of rank 1, ..., seed of rank k])`` from the scores (flat per sample)."""
    batch, size = int(shape[0]), int(np.prod(shape[1:]))
    flat = np.asarray(scores).reshape(batch, -1)
    if flat.shape[1] != size:
        raise InputError(f"scores of shape {list(np.shape(scores))} do not match the explained output {shape}")
    if k > size:
        raise InputError(f"--target top{k}: the output has only {size} entries per sample")
    classes = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return classes, [one_hot(shape, classes[:, i], dtype) for i in range(k)]


def _per_sample(values, batch: int) -> np.ndarray:
    v = np.asarray(values, np.int64)
    if v.size not in (1, batch):
        raise InputError(f"target: {v.size} class indices for a batch of {batch} (give one, or one per sample)")
    return v if v.size == batch else np.full(batch, v[0])


def one_hot(shape, classes, dtype) -> np.ndarray:
    """Seed of ``shape`` [N, ...]: 1 at flat index ``classes[n]`` of each sample n."""
    batch, size = int(shape[0]), int(np.prod(shape[1:]))
    classes = np.asarray(classes, np.int64)
    if classes.min() < 0 or classes.max() >= size:
        raise InputError(f"target class out of range 0..{size - 1}: {classes.tolist()}")
    s = np.zeros((batch, size), dtype)
    s[np.arange(batch), classes] = 1.0
    return s.reshape(shape)


def _predicted(scores, shape, sigmoid: bool) -> np.ndarray:
    """Which channels each position predicts, [N, C, *spatial] bool: the arg-max channel (softmax or
    logits), every channel above 0.5 (sigmoid: independent labels), or for one channel: above 0.5
    (sigmoid) or 0 (logits)."""
    s = np.asarray(scores)
    if list(s.shape) != list(shape):
        raise InputError(f"the model's scores have shape {list(s.shape)}, the explained output {list(shape)}: "
                         f"a dense target needs them to match")
    if sigmoid or shape[1] == 1:
        return s > (0.5 if sigmoid else 0.0)
    return np.arange(shape[1]).reshape([1, -1] + [1] * (len(shape) - 2)) == s.argmax(axis=1)[:, None]


def _read_mask(path, channels: int, spatial: list[int]) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--target mask:{path}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            mask = np.load(p, allow_pickle=False)
        except Exception as e:
            raise InputError(f"--target mask:{path}: cannot read .npy ({str(e).splitlines()[0]})") from None
    else:
        from .imaging import pil_image

        try:
            with pil_image().open(p) as im:
                mask = np.asarray(im.convert("L")) >= 128  # robust to JPEG noise; alpha is ignored
        except Exception as e:
            raise InputError(f"--target mask:{path}: cannot read image ({str(e).splitlines()[0]})") from None
    mask = np.asarray(mask) != 0
    if list(mask.shape) == list(spatial) or list(mask.shape) == [channels, *spatial]:
        if not mask.any():
            raise InputError(f"--target mask:{path}: selects nothing (all zero)")
        return mask
    raise InputError(f"--target mask:{path}: shape {list(mask.shape)} does not fit the output: expected "
                     f"{list(spatial)} (positions) or {[channels, *spatial]} (channels and positions)")

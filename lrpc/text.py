"""Explain token ids end to end (``lrpc explain --tokens``): read the ids, fill the model's other integer inputs, run
a target, write the relevance per token as JSON (ids, relevance, the explained positions) and .npy, and print a
short table. The tokens' text comes from a local ``tokenizer.json`` (the optional ``tokenizers`` package) where one
is given (``--text``); nothing is downloaded."""
from __future__ import annotations

import html
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import targets
from .atomic_write import protected, write_atomic
from .contract import is_cache_input
from .errors import InputError, one_line
from .loaded import external_data_files

SUFFIXES = (".json", ".npy", ".html")
ROWS = 24  # the terminal table shows all tokens of a sequence up to this length, else the most relevant ones


def vocabulary_sizes(model) -> dict[str, int]:
    """``{graph input: rows}`` of the integer inputs that index an embedding table (a Gather of a constant
    [rows, D] table by the input, reshaped or cast on the way), the smallest table where several."""
    from .emit import ID_PRESERVING

    consts = {t.name: list(t.dims) for t in model.graph.initializer}
    consts.update({n.output[0]: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    sizes = {}
    for node in model.graph.node:
        table = consts.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        if table is None or len(table) != 2 or any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        name = node.input[1]
        while name in producers and producers[name].op_type in ID_PRESERVING:
            name = producers[name].input[0]
        if name in inputs:
            sizes[name] = min(sizes.get(name, table[0]), table[0])
    return sizes


def read_tokens(path) -> dict:
    """The arrays of a ``.npy`` (the token ids, [T] or [B, T], as ``input_ids``) or ``.npz`` (one array: the token
    ids; several: by input name, the ids as ``input_ids`` or under the model's name for them)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        arrays = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else {"input_ids": data}
    except Exception as e:
        raise InputError(f"{p}: cannot read token ids (.npy/.npz expected): {one_line(e)}") from None
    if len(arrays) == 1:
        arrays = {"input_ids": next(iter(arrays.values()))}
    return arrays


def text_ids(text: str, tokenizer) -> tuple[dict, list[str]]:
    """(``{"input_ids": [1, T]}``, the tokens' text) of ``text`` encoded by a local ``tokenizer.json``."""
    if tokenizer is None:
        raise InputError("--text needs --tokenizer tokenizer.json (a local Hugging Face tokenizers file)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("--text needs the 'tokenizers' package (pip install tokenizers)") from None
    p = Path(tokenizer)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        encoding = Tokenizer.from_file(str(p)).encode(text)
    except Exception as e:
        raise InputError(f"{p}: cannot read or apply the tokenizer: {one_line(e)}") from None
    if not encoding.ids:
        raise InputError("--text: the tokenizer made no tokens of it")
    return {"input_ids": np.asarray([encoding.ids], np.int64)}, list(encoding.tokens)


def model_feeds(session, arrays: dict, source: str) -> tuple[dict, np.ndarray]:
    """(the feeds of ``session``, the token ids [B, T]): the ids under the model's ids input and the arrays given by
    name (each [B, T], or [B, T, ...] for an input of higher rank, as LayoutLM's boxes), converted to the input's
    type; an attention mask not given is all ones, token types zeros, position ids 0..T-1. A decoder's key/value
    cache (inputs ``past_key_values.*``, [B, heads, P, hd]) must be given; the attention mask then covers the P
    cached tokens and the T new ones, position ids count from P."""
    from .runtime import NUMPY_TYPES

    specs = {i.name: i for i in session.session.get_inputs()}
    ints = [n for n in session.inputs if np.dtype(NUMPY_TYPES.get(specs[n].type, np.float32)).kind in "iu"]
    cache = [n for n in session.inputs if n not in ints and is_cache_input(n)]
    floats = [n for n in session.inputs if n not in ints and n not in cache]
    if floats:
        raise InputError(f"{source}: the model takes float input '{floats[0]}': token ids explain models of "
                         f"integer inputs only (use --npy)")
    ids_name = "input_ids" if "input_ids" in ints else next((n for n in ints if "mask" not in n and "type" not in n
                                                             and "position" not in n), None)
    if ids_name is None:
        raise InputError(f"{source}: which model input takes the token ids? (inputs: {', '.join(session.inputs)})")
    ids = arrays.get(ids_name, arrays.get("input_ids"))
    if ids is None:
        raise InputError(f"{source}: no array for the token ids (input '{ids_name}'; arrays: {', '.join(arrays)})")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
        raise InputError(f"{source}: token ids must be integers [T] or [B, T], got {ids.dtype} {list(ids.shape)}")
    ids = ids[None] if ids.ndim == 1 else ids
    feeds = {}
    for name in cache:
        if name not in arrays:
            raise InputError(f"{source}: no array for the key/value cache input '{name}' (give an .npz with it)")
        feeds[name] = np.asarray(arrays[name]).astype(NUMPY_TYPES[specs[name].type])
    past = feeds[cache[0]].shape[-2] if cache and feeds[cache[0]].ndim >= 2 else 0  # (cached tokens)
    for name in session.inputs:
        if name in cache:
            continue
        value = ids if name == ids_name else arrays.get(name)
        want = list(ids.shape) if "mask" not in name else [ids.shape[0], ids.shape[1] + past]
        if value is None:
            if "mask" in name:
                value = np.ones(want, ids.dtype)
            elif "type" in name:
                value = np.zeros_like(ids)
            elif "position" in name:
                value = np.broadcast_to(np.arange(past, past + ids.shape[1]), ids.shape)
            else:
                raise InputError(f"{source}: no array for model input '{name}' (give an .npz with it)")
        given = np.asarray(value)
        rank = len(specs[name].shape) if specs[name].shape else 2  # (more than 2: per token, as LayoutLM's boxes)
        value = given[None] if given.ndim == rank - 1 and len(ids) == 1 else given  # (one sequence)
        if list(value.shape[:2]) != want or value.ndim != rank:
            raise InputError(f"{source}: input '{name}' has shape {list(given.shape)}, the token ids "
                             f"{list(ids.shape)}" + (f" after {past} cached tokens" if past else "") +
                             (f" (it takes [B, T, ...] of rank {rank})" if rank != 2 else ""))
        feeds[name] = value.astype(NUMPY_TYPES[specs[name].type])
    return feeds, ids


def per_token(relevance: np.ndarray, shape) -> np.ndarray:
    """Relevance per token [B, T]: as it is, or summed over the trailing axes of a tensor explained at (its leading
    axes [B, T])."""
    r = np.asarray(relevance)
    if r.ndim < 2 or list(r.shape[:2]) != list(shape):
        raise InputError(f"the relevance has shape {list(r.shape)}: not per token of ids {list(shape)}")
    return r.reshape(*r.shape[:2], -1).sum(-1)


def explained_positions(seed: np.ndarray) -> list[list[list[int]]]:
    """Per sample, the output entries the seed selects: [position, token] pairs of logits [B, T, V], [class] of a
    classifier's [B, C]."""
    return [[[int(v) for v in index] for index in np.argwhere(sample)] for sample in np.asarray(seed)]


def table(ids: np.ndarray, relevance: np.ndarray, tokens: list | None = None, colour: bool = False,
          rows: int = ROWS) -> str:
    """A terminal table per sample: position, id, (text), relevance and a bar; sequences longer than ``rows``
    show their ``rows`` most relevant tokens (by magnitude), in order."""
    lines = []
    for b in range(len(ids)):
        r = relevance[b]
        scale = float(np.abs(r).max()) or 1.0
        keep = np.arange(len(r)) if len(r) <= rows else np.sort(np.argsort(-np.abs(r), kind="stable")[:rows])
        if len(ids) > 1 or len(keep) < len(r):
            lines.append(f"sample {b}" + ("" if len(keep) == len(r) else f": the {rows} most relevant of {len(r)} "
                                                                         f"tokens"))
        lines.append(f"{'pos':>5} {'id':>8} " + (f"{'token':<16} " if tokens else "") + "relevance")
        for p in keep:
            bar = ("+" if r[p] >= 0 else "-") * int(round(20 * abs(r[p]) / scale))
            word = f"{tokens[p][:16]:<16} " if tokens else ""
            if colour and tokens:
                word = _coloured(word, r[p] / scale)
            lines.append(f"{p:>5} {int(ids[b, p]):>8} {word}{r[p]:>+11.4g} {bar}")
    return "\n".join(lines)


def _coloured(word: str, level: float) -> str:
    """``word`` on a red (positive) or blue (negative) background of strength |level| (24-bit terminal colour)."""
    fade = int(255 * (1 - min(abs(level), 1.0)))
    rgb = (255, fade, fade) if level >= 0 else (fade, fade, 255)
    return f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[30m{word}\x1b[0m"


def html_view(tokens: list[str], relevance: np.ndarray, title: str) -> str:
    """A page showing each sample's tokens on a red (positive) / blue (negative) background."""
    rows = []
    for b, r in enumerate(relevance):
        scale = float(np.abs(r).max()) or 1.0
        spans = []
        for word, v in zip(tokens, r):
            fade = int(255 * (1 - min(abs(v) / scale, 1.0)))
            rgb = f"255,{fade},{fade}" if v >= 0 else f"{fade},{fade},255"
            spans.append(f'<span style="background:rgb({rgb})" title="{v:+.4g}">{html.escape(word)}</span>')
        rows.append(f"<p>{' '.join(spans)}</p>")
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style=\"font-family:monospace\"><h3>{html.escape(title)}</h3>{''.join(rows)}</body>\n")


def run(model, out, tokens=None, text=None, tokenizer=None, target=None, rules="epsilon-gamma-box", output=None,
        input_shapes=None, cache=False, log=print, colour: bool | None = None, low_memory: bool = False,
        **options) -> list[Path]:
    """What ``lrpc explain --tokens/--text`` does; returns the written paths. ``out``: ``rel.json`` (``rel.npy``
    is written beside it; with a tokenizer also ``rel.html``), ``rel.npy`` or ``rel.html``. ``target``: see
    :mod:`lrpc.targets`; None: ``next`` for a decoder's logits [B, T, V], else ``top1`` (a classifier's class).
    ``options``: lrpc.Options fields and ``explain_at``. ``low_memory``: as for :func:`lrpc.explain.run`."""
    from .explain import prepare

    if (tokens is None) == (text is None):
        raise InputError("give exactly one of --tokens, --text")
    goal = targets.parse(target) if target is not None else None
    if goal is not None and goal.kind == "top" and goal.values[0] != 1:
        raise InputError(f"--target {goal}: one rank at a time for token ids (top1 or a class index)")
    o = Path(out)
    if o.suffix.lower() not in SUFFIXES:
        raise InputError(f"{o}: the output needs a suffix {', '.join(SUFFIXES)} (e.g. rel.json)")
    if not o.parent.exists():
        raise InputError(f"{o.parent}: output folder does not exist")
    if tokens is not None:
        arrays, words, source = read_tokens(tokens), None, str(tokens)
    else:
        (arrays, words), source = text_ids(text, tokenizer), "--text"
    if o.suffix.lower() == ".html" and words is None:
        raise InputError(f"{o}: an HTML view needs the tokens' text (--text with --tokenizer)")
    read = [(s, w) for s, w in ((tokens, "the token ids"), (tokenizer, "the tokenizer")) if s is not None]
    if isinstance(model, (str, os.PathLike)):
        read += [(model, "the model")] + [(f, "the model's external data") for f in sorted(external_data_files(model))]
    if isinstance(rules, (str, os.PathLike)) and Path(rules).is_file():
        read.append((rules, "the rule file"))
    read = protected(read)
    for key, edge in (("low", 0.0), ("high", 1.0)):
        if options.get(key) is None:
            options[key] = edge
    session, _ = prepare(model, rules, output=output, input_shapes=input_shapes, cache=cache, low_memory=low_memory,
                         **options)
    feeds, ids = model_feeds(session, arrays, source)
    if goal is None:
        goal = targets.parse("next" if len(session.seed_shape) == 3 else "top1")
    e = session.explain(feeds, goal)
    relevance = per_token(e.relevance if not isinstance(e.relevance, list) else e.relevance[0], ids.shape)
    pairs = explained_positions(e.seed)
    written = []
    stem = o.with_suffix("")
    outs = {o.suffix.lower(): o}
    if o.suffix.lower() == ".json":
        outs[".npy"] = stem.with_suffix(".npy")
        if words is not None:
            outs[".html"] = stem.with_suffix(".html")
    for suffix, path in outs.items():
        if suffix == ".json":
            samples = [{"ids": ids[b].tolist(), **({"tokens": words} if words is not None else {}),
                        "relevance": [float(v) for v in relevance[b]], "explained": pairs[b]} for b in range(len(ids))]
            # (one line per sample)
            payload = (f'{{"target": {json.dumps(str(goal))}, "samples": [\n'
                       + ",\n".join(json.dumps(sample) for sample in samples) + "\n]}\n")
        elif suffix == ".npy":
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(e.relevance if not isinstance(e.relevance, list) else e.relevance[0]))
            payload = buffer.getvalue()
        else:
            payload = html_view(words, relevance, f"relevance per token, target {goal}")
        write_atomic([payload] if isinstance(payload, bytes) else payload, path, read)
        written.append(path)
    if colour is None:
        colour = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    log(table(ids, relevance, words, colour))
    explained = "; ".join(",".join("=".join(map(str, index)) for index in s) for s in pairs if s)
    log(f"target {goal}" + (f" ({explained})" if explained else "") + f" -> {', '.join(map(str, written))}")
    return written

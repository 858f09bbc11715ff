"""Command line: ``lrpc compile | check | explain | canonize | rules``. Errors become one stderr line + exit code."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import composites
from .errors import InputError, LrpcError, one_line


def _bound(text: str):
    """A z-box bound: a number or a comma-separated per-channel list."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or a comma-separated list of numbers, got '{text}'") from None
    return vals[0] if len(vals) == 1 else vals


def _shape(text: str):
    """NAME=d0,d1,... (a dim of -1 stays dynamic)."""
    name, sep, dims = text.rpartition("=")
    try:
        values = [int(v) for v in dims.split(",")]
    except ValueError:
        values = None
    if not sep or not name or values is None:
        raise argparse.ArgumentTypeError(f"expected NAME=d0,d1,... (e.g. input=1,3,224,224), got '{text}'")
    return name, values


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'")
    return v


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line on stderr as every other error (argparse prints its usage text first), exit code 2."""

    def error(self, message):
        print(f"lrpc: error: {' '.join(message.split())} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lrpc", description="Compile ONNX models into forward + LRP relevance graphs.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="emit model + relevance graph")
    c.add_argument("model", help="input .onnx model")
    c.add_argument("-o", "--out", required=True, help="output .onnx path (written atomically)")
    c.add_argument("--layerwise", choices=["sums", "full"], help="add per-layer relevance outputs")
    c.add_argument("--seed", choices=["input", "top1", "switch"], default="input",
                   help="input: a relevance_seed graph input (default); top1: the graph seeds each sample's top-1 "
                        "output itself (output relevance_target names it): one run, only the model's inputs to feed; "
                        "switch: both, the top-1 seed where the bool input lrpc/top1 is fed true")
    c.add_argument("--for-provider", choices=["cpu", "cuda", "portable"], default="cpu",
                   help="cuda: MaxPool's backward from its arg-max indices and a scatter, which onnxruntime's CUDA "
                        "provider runs on the GPU (slower on the CPU); portable: only ops every common ONNX runtime "
                        "implements, constant subgraphs folded (docs/runtimes.md); default cpu")
    c.add_argument("--explain-at", metavar="TENSOR",
                   help="explain at this float tensor of the graph instead of the inputs (output relevance shaped "
                        "like it), e.g. a feature map")
    _rule_flags(c)

    ch = sub.add_parser("check", help="CI guard: compile, run, verify forward/finiteness/conservation/gradient",
                        description="Compile the model, run it on seeded random inputs (or --inputs) and check: "
                                    "supported (every op has a propagator), forward (outputs unchanged), finite (no "
                                    "NaN/Inf in the relevance of any compile the check runs), conservation "
                                    "(Σ relevance = Σ seed − what the layers' biases, zero denominators and "
                                    "stabilizers absorb; each layer sends down what its rule passes on; stabilizers "
                                    "absorb at most the tolerance), gradient (LRP-0 relevance equals gradient × "
                                    "input: compared with finite differences of the forward with its ReLU/MaxPool "
                                    "switches frozen; skipped, with the reason, where the model has smooth "
                                    "activations, gates, ReLU6/Clip or LRN). Exit code 0: all pass (or are skipped), "
                                    "1: a check fails, 2: unusable input.")
    ch.add_argument("model")
    _input_flags(ch)
    ch.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ch.add_argument("--rtol", type=_nonneg_float, default=1e-4,
                    help="forward outputs: max relative error (default 1e-4)")
    ch.add_argument("--conservation-tol", type=_nonneg_float, default=1e-3,
                    help="relevance left unaccounted or absorbed by stabilizers, relative to |Σ seed| (default 1e-3)")
    ch.add_argument("--gradient-tol", type=_nonneg_float, default=1e-4,
                    help="LRP-0 relevance against finite differences of the forward: relative error over 3 random "
                         "directions (default 1e-4)")
    ch.add_argument("--json", help="write the report as JSON")
    ch.add_argument("--junit", help="write the report as JUnit XML")
    ch.add_argument("--quiet", action="store_true", help="no per-layer table")
    _rule_flags(ch)

    i = sub.add_parser("inspect", help="per-layer relevance table: where does conservation break?")
    i.add_argument("model")
    _input_flags(i)
    i.add_argument("--target", default="top1", help="as for explain: class index, top1 (default), a dense target "
                                                    "(pixel:Y,X, box:Y0,X0,Y1,X1, mask:FILE, class:C) or a sequence "
                                                    "target (next, token:POS=ID, continuation:N)")
    i.add_argument("--tol", type=_nonneg_float, default=1e-3, help="|in/out − 1| that marks a layer (default 1e-3)")
    i.add_argument("--json", help="write the table as JSON")
    _rule_flags(i)

    k = sub.add_parser("canonize", help="write the canonical forward model")
    k.add_argument("model")
    k.add_argument("-o", "--out", required=True)
    k.add_argument("--output", help="graph output to explain (default: the first)")
    k.add_argument("--input-shape", type=_shape, action="append", default=[], metavar="NAME=D0,D1,...")
    _debug_flag(k)

    e = sub.add_parser("explain", help="explain images or tensors: write heatmap PNGs and raw relevance .npy")
    e.add_argument("model", help="plain .onnx model (compiled on the fly) or an already compiled one")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one PNG/JPEG/... image")
    src.add_argument("--images", help="a directory of images (one heatmap per image)")
    src.add_argument("--npy", help=".npy/.npz tensor fed as it is (batch included)")
    src.add_argument("--tokens", help="token ids: .npy [T] or [B, T] (or .npz with input_ids and other inputs); "
                                      "writes the relevance per token (-o rel.json, rel.npy beside it)")
    src.add_argument("--text", help="text, encoded by --tokenizer (needs the tokenizers package); as --tokens, and "
                                    "an HTML view rel.html")
    e.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="a local Hugging Face tokenizer.json for --text")
    e.add_argument("-o", "--out", required=True,
                   help="heatmap path (heat.png; heat.npy is written beside it) or, with --images, a directory; "
                        "with --tokens/--text: rel.json (rel.npy beside it), rel.npy or rel.html")
    e.add_argument("--target", default=None,
                   help="class index, top1 (default; with --tokens/--text: next on logits [B, T, V]), topK, for "
                        "dense outputs pixel:[C,]Y,X, box:[C,]Y0,X0,Y1,X1 (ends exclusive), mask:FILE (.npy/.png) or "
                        "class:C, for a decoder's logits [B, T, V] next, token:POS (its top-1), "
                        "token:POS=ID[,POS=ID...] or continuation:N (the input's last N tokens)")
    e.add_argument("--explain-at", metavar="TENSOR",
                   help="explain at this float tensor of the graph instead of the inputs, e.g. a feature map")
    _preprocess_flags(e)
    e.add_argument("--cmap", choices=["coldnhot", "bwr", "seismic", "gray"], default="coldnhot")
    e.add_argument("--level", type=_nonneg_float, default=1.0, help="colormap level (>1 saturates earlier)")
    e.add_argument("--overlay", action="store_true", help="blend the heatmap over the (resized, cropped) image")
    e.add_argument("--overlay-alpha", type=_nonneg_float, default=0.5, help="heatmap weight of --overlay")
    e.add_argument("--batch-size", type=int, default=8, help="images per run in --images mode (default 8)")
    e.add_argument("--no-cache", action="store_true",
                   help="compile without the on-disk cache ($LRPC_CACHE_DIR, else ~/.cache/lrpc)")
    e.add_argument("--no-progress", action="store_true", help="one line per image instead of a progress bar")
    e.add_argument("--manifest", action="store_true",
                   help="--images: append a JSON line per image (outputs, target, score; or the error) to "
                        "OUT/manifest.jsonl and skip the images an earlier run finished (resume; refused when "
                        "it was run with another model or other settings)")
    e.add_argument("--no-resume", action="store_true",
                   help="with --manifest or --ray: start a new manifest and explain every image again")
    e.add_argument("--relevance-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the .npy relevance files (float16: half the size)")
    e.add_argument("--relevance-pool", type=int, default=1, metavar="N",
                   help="store relevance summed over N x N pixel blocks (the total is kept; 1/N^2 of the size)")
    e.add_argument("--ray", metavar="ADDRESS",
                   help="--images: run the model in Ray Data actors (pip install 'lrpc[ray]'): auto (this machine's "
                        "cluster, else a local one), local, or a cluster address; keeps the manifest")
    e.add_argument("--ray-actors", type=int, metavar="N",
                   help="with --ray: actors (default one per GPU of the cluster, else one)")
    e.add_argument("--low-memory", action="store_true",
                   help="hold each weight once and turn onnxruntime's buffer-reuse plan off: a lower peak memory "
                        "(large batches, long texts), up to ~10%% more time on small inputs")
    _rule_flags(e)
    # z-box bounds default to the range of normalized images, (0 - mean)/std .. (1 - mean)/std
    e.set_defaults(low=None, high=None)

    a = sub.add_parser("audit", help="SpRAy: cluster the relevance maps of a class, write an HTML report",
                       description="Spectral relevance analysis of a directory written by `lrpc explain --images` "
                                   "(its .npy maps, or the rows of its manifest.jsonl) or of the Parquet shards "
                                   "of lrpc.ray.explain: downsample, normalise, "
                                   "spectral clustering with the number of clusters from the eigengap, a 2-D "
                                   "embedding, and per cluster its prototype heatmap and members. Needs "
                                   "scikit-learn (pip install 'lrpc[ray]').")
    a.add_argument("folder", help="output directory of lrpc explain --images, or of Parquet shards")
    a.add_argument("-o", "--out", required=True, help="HTML report (self-contained)")
    a.add_argument("--class", dest="cls",
                   help="audit only the maps of this target class (needs manifest.jsonl or shards)")
    a.add_argument("--clusters", type=int, help="number of clusters (default: chosen by the largest eigengap)")
    a.add_argument("--max-clusters", type=int, default=10, help="largest number the eigengap may choose (10)")
    a.add_argument("--size", type=int, default=32, help="maps are downsampled to at most SIZE pixels a side (32)")
    a.add_argument("--neighbors", type=int, help="k of the nearest-neighbour graph (default: about log2 N + 1)")
    a.add_argument("--examples", type=int, default=8, help="members shown per cluster (8)")
    a.add_argument("--json", help="also write the clusters (each map's cluster, the eigenvalues) as JSON")
    _debug_flag(a)

    r = sub.add_parser("rules", help="list composites and rules")
    _debug_flag(r)
    return p


def _input_flags(p) -> None:
    """The inputs of inspect and check: an .npz, an image, or seeded random data."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--inputs", help=".npz with one array per model input (default: seeded random, batch 1)")
    src.add_argument("--image", help="an image file, preprocessed as by `lrpc explain` (needs Pillow)")
    _preprocess_flags(p)


def _preprocess_flags(p) -> None:
    """How images become the model's input (explain, inspect, check)."""
    p.add_argument("--size", help="H,W (or one number) of the model input, for models with dynamic spatial dims")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--preset", choices=["imagenet"], help="mean/std of a known preprocessing")
    norm.add_argument("--mean", help="per-channel mean m1,m2,m3 (after scaling to [0, 1])")
    p.add_argument("--std", help="per-channel std s1,s2,s3 (with --mean)")
    p.add_argument("--grayscale", action="store_true", help="convert images to grayscale")
    p.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw", help="model input layout (default nchw)")


def _debug_flag(sub) -> None:
    # SUPPRESS keeps a --debug given before the subcommand from being reset by the subparser
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _rule_flags(c) -> None:
    c.add_argument("--rules", default="epsilon-gamma-box",
                   help="composite name or .json/.toml rule file (see `lrpc rules`)")
    c.add_argument("--output", help="graph output to explain (default: the first)")
    c.add_argument("--input-shape", type=_shape, action="append", default=[], metavar="NAME=D0,D1,...",
                   help="fix an input's dims (dynamic spatial dims must be resolved; -1 keeps a dim dynamic)")
    c.add_argument("--epsilon", type=_nonneg_float, default=1e-6, help="epsilon of the epsilon rule (default 1e-6)")
    c.add_argument("--stabilizer-eps", type=_nonneg_float, default=1e-6,
                   help="stabilizer epsilon of all other rules (default 1e-6)")
    c.add_argument("--stabilizer", choices=["sign", "clip", "norm-scale"], default="sign")
    c.add_argument("--gamma", type=_nonneg_float, default=0.25)
    c.add_argument("--alpha", type=float, default=2.0)
    c.add_argument("--beta", type=float, default=1.0)
    c.add_argument("--low", type=_bound, default=0.0, help="z-box lower bound: number or per-channel list (default 0)")
    c.add_argument("--high", type=_bound, default=1.0, help="z-box upper bound: number or per-channel list (default 1)")
    c.add_argument("--zero-bias", action="store_true", help="leave biases out of every denominator")
    c.add_argument("--maxpool", choices=["winner", "split"], default="winner",
                   help="MaxPool relevance: to the first arg-max (winner, as torch's gradient) or shared by tied "
                        "maxima")
    c.add_argument("--sum-rule", choices=composites.SUM_RULES, default=None,
                   help="rule of residual sums, over the composite's: norm (zennit's; the CNN composites'), sign-norm "
                        "(each output's relevance shared by the branches of its sign: stable where branches of both "
                        "signs nearly cancel, e.g. RepVGG) or epsilon (norm with the composite's epsilon; attnlrp's "
                        "and cp-lrp's)")
    _debug_flag(c)


def _options(args) -> composites.Options:
    return composites.Options(epsilon=args.epsilon, stabilizer_eps=args.stabilizer_eps, stabilizer=args.stabilizer,
                              gamma=args.gamma, alpha=args.alpha, beta=args.beta, low=args.low, high=args.high,
                              zero_bias=args.zero_bias, maxpool=args.maxpool, sum_rule=args.sum_rule)


def _join_negative_lists(argv: list[str]) -> list[str]:
    """argparse reads "--low -2.1,-2.0" as two options: glue number lists to their flag ("--low=-2.1,-2.0")."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--low", "--high", "--mean", "--std") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                [float(v) for v in argv[i + 1].split(",")]
            except ValueError:
                pass
            else:
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_join_negative_lists(list(sys.argv[1:] if argv is None else argv)))
    if not args.debug and args.command != "rules":
        _quiet_onnxruntime()
    from . import graph

    graph.FOLDING_LOGS = args.debug
    try:
        with warnings.catch_warnings():
            if not args.debug:  # (numpy's, Pillow's: lrpc says what is wrong in its one line)
                warnings.simplefilter("ignore")
            return _run(args)
    except LrpcError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lrpc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lrpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (``| head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would fail again)
        return 141
    except Exception as e:  # a bug in lrpc: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"lrpc: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for details)",
              file=sys.stderr)
        return 3
    finally:
        graph.FOLDING_LOGS = False


def _quiet_onnxruntime() -> None:
    """onnxruntime's own log lines off (--debug keeps them): the sessions that onnx-graphsurgeon's constant folding
    starts take no options, and their graph optimizers warn on stderr (a torchvision Swin: 117 coloured
    "UnsqueezeElimination cannot remove node" lines before lrpc's one-line message). Failures still raise."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)


def _run(args) -> int:
    from dataclasses import asdict

    from .atomic_write import refuse_inputs
    from .compiler import canonize_loaded, compile_loaded

    if args.command == "rules":
        print(composites.describe())
        return 0
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "check":
        return _check(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "audit":
        return _audit(args)
    refuse_inputs(args.out, _read_files(args))  # (before the work)
    if args.command == "canonize":
        model = canonize_loaded(args.model, output=args.output, input_shapes=dict(args.input_shape))
    else:
        model = compile_loaded(args.model, args.rules, output=args.output, layerwise=args.layerwise,
                               input_shapes=dict(args.input_shape), seed=args.seed, for_provider=args.for_provider,
                               explain_at=args.explain_at, **asdict(_options(args)))
    model.save(args.out, protect=_read_files(args))
    print(f"wrote {args.out}")
    return 0


def _read_files(args) -> list[tuple[str, str]]:
    """(path, what) of each file the command reads, which none of its outputs may overwrite: the model, its
    external data, a rule file, an --inputs archive, an --image."""
    from .loaded import external_data_files

    files = [(args.model, "the model")]
    files += [(f, "the model's external data") for f in sorted(external_data_files(args.model))]
    rules = getattr(args, "rules", None)
    if rules and Path(rules).is_file():
        files.append((rules, "the rule file"))
    for name, what in (("inputs", "the --inputs archive"), ("image", "the image")):
        if getattr(args, name, None):
            files.append((getattr(args, name), what))
    if getattr(args, "target", None):
        from .targets import parse

        with contextlib.suppress(LrpcError):  # (a bad target is reported where it is used)
            files.append((parse(args.target).path, "the target file"))
    return files


def _read_inputs(path):
    """The arrays of an --inputs .npz (one per model input), or None without one."""
    import numpy as np

    if not path:
        return None
    try:
        return dict(np.load(path))
    except Exception as e:
        raise InputError(f"{path}: cannot read inputs (.npz expected): {str(e).splitlines()[0]}") from None


def _inspect(args) -> int:
    from .atomic_write import write_atomic
    from .inspect import inspect, table

    result = inspect(args.model, args.rules, _options(args), _read_inputs(args.inputs), args.target, args.tol,
                     args.output, dict(args.input_shape), **_image_args(args))
    print(table(result))
    if result["warning"]:
        print(f"lrpc: warning: {result['warning']}", file=sys.stderr)
    if args.json:
        write_atomic(json.dumps(result, indent=1), args.json, protect=_read_files(args))
    return 0


def _image_args(args) -> dict:
    return {"image": args.image, "preset": args.preset, "mean": args.mean, "std": args.std, "size": args.size,
            "grayscale": args.grayscale, "layout": args.layout}


def _check(args) -> int:
    from .atomic_write import write_atomic
    from .check import run_check

    inputs = _read_inputs(args.inputs)
    report = run_check(args.model, args.rules, _options(args), inputs, args.rtol, args.conservation_tol,
                       output=args.output, seed=args.seed, input_shapes=dict(args.input_shape),
                       gradient_tol=args.gradient_tol, **_image_args(args))
    if args.quiet:
        report_text = "\n".join(line for line in report.text().splitlines() if line[:4] in ("PASS", "FAIL", "SKIP"))
    else:
        report_text = report.text()
    print(report_text)
    for path, text in ((args.json, report.to_json), (args.junit, report.to_junit)):
        if path:
            write_atomic(text, path, protect=_read_files(args))
    return 0 if report.passed else 1



def _explain(args) -> int:
    from dataclasses import asdict

    from .explain import run

    at = {"explain_at": args.explain_at} if args.explain_at else {}  # (the cache key of other runs unchanged)
    if args.tokens is not None or args.text is not None:
        from . import text

        text.run(args.model, args.out, tokens=args.tokens, text=args.text, tokenizer=args.tokenizer,
                 target=args.target, rules=args.rules, output=args.output,
                 input_shapes=dict(args.input_shape), cache=not args.no_cache, low_memory=args.low_memory, **at,
                 **asdict(_options(args)))
        return 0
    if args.tokenizer is not None:
        raise InputError("--tokenizer goes with --text")
    run(args.model, args.out, image=args.image, images=args.images, npy=args.npy, target=args.target or "top1",
        rules=args.rules,
        output=args.output, input_shapes=dict(args.input_shape), size=args.size, preset=args.preset, mean=args.mean,
        std=args.std, grayscale=args.grayscale, layout=args.layout, cmap=args.cmap, level=args.level,
        with_overlay=args.overlay, overlay_alpha=args.overlay_alpha, batch_size=args.batch_size,
        cache=not args.no_cache, progress=False if args.no_progress else None, manifest=args.manifest,
        ray=args.ray, concurrency=args.ray_actors, relevance_dtype=args.relevance_dtype,
        relevance_pool=args.relevance_pool, resume=not args.no_resume, low_memory=args.low_memory, **at,
        **asdict(_options(args)))
    return 0


def _audit(args) -> int:
    from .atomic_write import write_atomic
    from .audit import audit, report, summary

    for flag, value, low in (("--clusters", args.clusters, 1), ("--max-clusters", args.max_clusters, 2),
                             ("--size", args.size, 1), ("--neighbors", args.neighbors, 1),
                             ("--examples", args.examples, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    result = audit(args.folder, args.cls, args.clusters, args.size, args.neighbors, args.examples,
                   args.max_clusters)
    write_atomic(report(result), args.out)
    if args.json:
        write_atomic(json.dumps(summary(result), indent=1), args.json)
    sizes = ", ".join(str(int((result["labels"] == c).sum())) for c in range(result["clusters"]))
    print(f"{len(result['rows'])} maps, {result['clusters']} clusters (sizes {sizes}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

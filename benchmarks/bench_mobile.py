"""LRP ÷ forward of mobile nets (and ResNet-50 / VGG16 for reference), per export, batch and thread count, in one run.

    python benchmarks/bench_mobile.py                                   # the mobile families, both exports
    python benchmarks/bench_mobile.py --models mobilenet_v3_small --exports legacy --batches 1 --threads 1
    python benchmarks/bench_mobile.py --baseline /path/to/old/checkout  # before/after in the same process

Models are torchvision constructors with weights=None (seeded; BatchNorm statistics calibrated on random inputs
unless ``--raw-init``, see :func:`calibrate`), exported with the legacy (TorchScript, opset 17)
and the dynamo exporter, one file per batch size (static shapes: shape inference then resolves every dim, also
through ShuffleNet's channel shuffle), cached in ``--cache``; each is compiled with ``--composite`` (z-box bounds
-3, 3). Every session is ``lrpc.runtime.inference_session`` (lrpc.Session's options) on the CPU. Per model /
export / batch / thread count the forward and the compiled graph (and, with ``--baseline``, the same model
compiled by the lrpc package under that folder, in a child process) run in turn, ``--repeats`` times after a
warm-up, so drift hits all of them alike. Printed per side: the least process CPU time and the least wall time of
a run; LRP ÷ forward from each (and the median [range] of the per-round wall ratios); the node counts of the
forward and the compiled graph. On a machine shared with other jobs wall times measure the other jobs as much as
the graph (a short forward run right after a long LRP run is often preempted: MobileNetV3-small's forward alone
2.2 ms median, alternated with its LRP graph 7.1 ms median, 2.7 ms min): the CPU time of the process is what to
read there; with one thread it is the graph's own time, with more it adds the worker threads' spin-waiting.
A complete run with a baseline: ``benchmarks/results_mobile_cpu.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

MODELS = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "regnet_y_400mf",
          "squeezenet1_1", "resnet50", "vgg16")


def calibrate(model, batches: int = 2):
    """BatchNorm running statistics measured on standard-normal inputs (train-mode passes, cumulative average), so
    that activations keep their scale through the net as with trained weights. Without it (the constructors' running
    mean 0, variance 1) activations shrink layer by layer (EfficientNet-B0's logits ~1e-14 on N(0, 1) inputs), the
    stabilizer dominates every denominator, relevance shrinks by orders of magnitude per layer and reaches float32
    subnormals, whose arithmetic is ~100x slower on x86: the time then measures that, not the graph."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, 224, 224))
    return model.eval()


def export(name: str, exporter: str, batch: int, cache: Path, raw: bool = False) -> Path:
    """torchvision ``name`` (weights=None, seed 0, BatchNorm statistics calibrated unless ``raw``), exported once per
    exporter and batch size (static shapes: shape inference resolves every dim, e.g. through ShuffleNet's channel
    shuffle)."""
    path = cache / f"{name}.{exporter}.b{batch}{'.raw' if raw else ''}.onnx"
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if not raw:
        model = calibrate(model)
    x = torch.randn(batch, 3, 224, 224)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **names)
        else:
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **names)
            prog.save(str(path), external_data=False)
    return path


COMPILE = ("import sys, lrpc, onnx; m = lrpc.compile(sys.argv[1], sys.argv[3], low=-3.0, high=3.0); "
           "onnx.save(m, sys.argv[2])")


def compile_with(src: str | None, model: Path, out: Path, composite: str) -> None:
    """Compile in a child process with the lrpc package under ``src`` (None: this checkout's)."""
    root = src or str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", COMPILE, str(model), str(out), composite], env=env, check=True, cwd=root)


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def header(args) -> str:
    import onnx
    import onnxruntime as ort
    import torch
    import torchvision

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    return (f"# {datetime.datetime.now().isoformat(timespec='seconds')}  CPU: {cpu}, {os.cpu_count()} cores, "
            f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n"
            f"# onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, python {platform.python_version()}; lrpc {commit}"
            + (f", baseline {args.baseline}" if args.baseline else "")
            + f"\n# torchvision weights=None, BatchNorm statistics "
              f"{'as constructed' if args.raw_init else 'calibrated'}; "
              f"composite {args.composite}; {args.repeats} rounds after a warm-up, the sides in turn; cpu/wall ms: the "
              f"least process CPU time / wall time of a run over the rounds; ratios of those minima; rounds: median "
              f"[range] of the per-round wall ratios")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--exports", default="legacy,dynamo")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--composite", default="epsilon-gamma-box")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--baseline", help="a folder holding another lrpc package (e.g. a `git archive` of an older "
                                       "commit): its compiled graphs are timed in the same rounds")
    ap.add_argument("--raw-init", action="store_true", help="keep the constructors' BatchNorm statistics (mean 0, "
                                                             "variance 1) instead of calibrating them (see calibrate)")
    ap.add_argument("--cache", default=os.environ.get("LRPC_BENCH_CACHE", "/tmp/lrpc-bench-mobile"))
    args = ap.parse_args()

    from lrpc.runtime import inference_session

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(header(args))
    sides = ["fwd", "new"] + (["base"] if args.baseline else [])
    cols = f"{'model':20s} {'export':6s} {'thr':>3s} {'batch':>5s} "
    cols += " ".join(f"{k + ' cpu/wall ms':>19s}" for k in sides)
    cols += f" {'lrp/fwd cpu':>11s} {'wall':>5s} {'rounds':>15s}"
    if args.baseline:
        cols += f" {'base/fwd cpu':>12s} {'wall':>5s} {'new/base cpu':>12s}"
    cols += f" {'nodes fwd/lrp':>14s}" + (" base" if args.baseline else "")
    print(cols, flush=True)
    for name in args.models.split(","):
        for exporter in args.exports.split(","):
            for batch in map(int, args.batches.split(",")):
                path = export(name, exporter, batch, cache, args.raw_init)
                graphs = {"new": path.with_suffix(f".{args.composite}.lrp.onnx")}
                compile_with(None, path, graphs["new"], args.composite)
                if args.baseline:
                    graphs["base"] = path.with_suffix(f".{args.composite}.base.lrp.onnx")
                    compile_with(args.baseline, path, graphs["base"], args.composite)
                nodes = {k: node_count(p) for k, p in graphs.items()}
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                seed = np.zeros((batch, 1000), np.float32)
                seed[:, 3] = 1.0
                for threads in map(int, args.threads.split(",")):
                    sessions = {"fwd": inference_session(str(path), ["CPUExecutionProvider"], threads)}
                    sessions.update({k: inference_session(str(p), ["CPUExecutionProvider"], threads)
                                     for k, p in graphs.items()})
                    feeds = {k: {"input": x} if k == "fwd" else {"input": x, "relevance_seed": seed} for k in sessions}
                    wall: dict[str, list[float]] = {k: [] for k in sessions}
                    cpu: dict[str, list[float]] = {k: [] for k in sessions}
                    for r in range(args.repeats + 1):
                        for k, s in sessions.items():
                            t, c = time.perf_counter(), time.process_time()
                            s.run(None, feeds[k])
                            if r:  # (round 0 warms up)
                                wall[k].append(time.perf_counter() - t)
                                cpu[k].append(time.process_time() - c)
                    del sessions
                    row = f"{name:20s} {exporter:6s} {threads:3d} {batch:5d} "
                    row += " ".join(f"{min(cpu[k]) * 1e3:9.2f}/{min(wall[k]) * 1e3:9.2f}" for k in sides)
                    rounds = [a / f for a, f in zip(wall["new"], wall["fwd"])]
                    row += (f" {min(cpu['new']) / min(cpu['fwd']):11.2f} {min(wall['new']) / min(wall['fwd']):5.2f}"
                            f" {statistics.median(rounds):5.2f} [{min(rounds):3.1f}-{max(rounds):4.1f}]")
                    if args.baseline:
                        row += (f" {min(cpu['base']) / min(cpu['fwd']):12.2f}"
                                f" {min(wall['base']) / min(wall['fwd']):5.2f}"
                                f" {min(cpu['new']) / min(cpu['base']):12.3f}")
                    row += f" {node_count(path):6d}/{nodes['new']:<6d}" + (f" {nodes['base']}" if args.baseline else "")
                    print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

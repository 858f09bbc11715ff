"""LRP ÷ forward time of the zoo (models/families.py), per family and exporter, measured in one run.

    python benchmarks/bench_zoo.py                          # every family, both exporters
    python benchmarks/bench_zoo.py --models resnet18 timm/dla46_c --exporters legacy --runs 9

Each family is built with healthy random weights, exported (legacy: TorchScript at opset 17; dynamo), compiled
under epsilon-gamma-box (z-box bounds: the test input's range) and run with onnxruntime on the CPU, 1 thread,
batch 1, through ``lrpc.runtime.inference_session`` for both graphs (lrpc.Session's options). Forward and LRP
runs alternate (so drift hits both); medians are reported. Columns: forward ms, LRP ms (the compiled graph:
forward + relevance), their ratio, node counts of the compiled and the forward graph. Families lrpc does not
compile today are listed with the error. Needs the test extras (torch, torchvision, timm, onnxscript).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def lrp_forward_ms(forward: bytes, compiled: bytes, feeds: dict, seed: np.ndarray, runs: int = 5,
                   threads: int = 1) -> tuple[float, float]:
    """Median ms of a forward run and of a compiled (forward + LRP) run, onnxruntime CPU, ``threads`` threads,
    after one warm-up run each; the two alternate."""
    from lrpc.runtime import inference_session

    fwd = inference_session(forward, ["CPUExecutionProvider"], threads)
    lrp = inference_session(compiled, ["CPUExecutionProvider"], threads)
    lrp_feeds = {**feeds, "relevance_seed": seed}
    fwd.run(None, feeds)
    lrp.run(None, lrp_feeds)
    tf, tl = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fwd.run(None, feeds)
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        lrp.run(None, lrp_feeds)
        tl.append(time.perf_counter() - t)
    return 1e3 * statistics.median(tf), 1e3 * statistics.median(tl)


def top1_seed(y: np.ndarray) -> np.ndarray:
    """One-hot of each sample's top-1 output; for a dense [N, C, H, W] output, of each pixel's top class."""
    seed = np.zeros(y.shape, np.float32)
    np.put_along_axis(seed, y.argmax(axis=1)[:, None], 1.0, axis=1)
    return seed


def header() -> str:
    import onnx
    import onnxruntime
    import onnxscript
    import timm
    import torch
    import torchvision

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                   text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return (f"# {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.2f}\n# torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"timm {timm.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"onnxscript {onnxscript.__version__} (dynamo exporter), python {platform.python_version()}")


def main(argv=None) -> None:
    sys.path.insert(0, str(ROOT))
    import onnx
    import torch

    import lrpc
    from models import families

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(families.FAMILIES))
    p.add_argument("--exporters", nargs="*", default=list(families.EXPORTERS))
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    print(header())
    print(f"# epsilon-gamma-box, onnxruntime CPU, {args.threads} thread(s), batch 1, median of {args.runs} "
          f"alternating runs")
    print(f"{'model':40s} {'exporter':8s} {'input':>9s} {'fwd ms':>8s} {'LRP ms':>8s} {'ratio':>6s} "
          f"{'nodes':>6s} {'fwd nodes':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, x = families.build(name)
            shape = "x".join(map(str, x.shape[2:]))
            for exporter in args.exporters:
                row = f"{name:40s} {exporter:8s} {shape:>9s}"
                try:
                    path = families.export(model, Path(tmp) / f"{name.replace('/', '_')}-{exporter}.onnx",
                                           x.shape, exporter)
                except Exception as e:  # the exporter's own failure: reported, not lrpc's
                    print(f"{row}  export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                proto = onnx.load(str(path))
                xn = x.numpy()
                try:
                    compiled = lrpc.compile(proto, "epsilon-gamma-box", low=float(xn.min()), high=float(xn.max()))
                except lrpc.LrpcError as e:
                    print(f"{row}  not compiled: {str(e)[:150]}")
                    continue
                from lrpc.runtime import inference_session

                y = inference_session(path.read_bytes(), ["CPUExecutionProvider"], 1).run(None, {"input": xn})[0]
                fwd, lrp = lrp_forward_ms(path.read_bytes(), compiled.SerializeToString(), {"input": xn},
                                          top1_seed(y), args.runs, args.threads)
                print(f"{row} {fwd:8.2f} {lrp:8.2f} {lrp / fwd:6.2f} {len(compiled.graph.node):6d} "
                      f"{len(proto.graph.node):9d}", flush=True)
            del model


if __name__ == "__main__":
    main()

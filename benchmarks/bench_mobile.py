"""LRP ÷ forward of mobile nets (and ResNet-50 / VGG16 for reference), per export, batch and thread count, in one run.

    python benchmarks/bench_mobile.py                                   # the issue's models, both exports
    python benchmarks/bench_mobile.py --models mobilenet_v3_small --exports legacy --batches 1 --threads 1
    python benchmarks/bench_mobile.py --baseline /path/to/old/checkout  # before/after in the same process

Models are torchvision constructors with weights=None (seeded), exported with the legacy (TorchScript, opset 17)
and the dynamo exporter (dynamic batch), cached in ``--cache``; each is compiled with ``--composite``
(z-box bounds -3, 3). Every session is ``lrpc.runtime.inference_session`` (lrpc.Session's options) on the CPU.
Per model / export / thread count / batch the forward and the compiled graph (and, with ``--baseline``, the same
model compiled by the lrpc package under that folder, in a child process) run in turn, ``--repeats`` times after a
warm-up, so drift hits all of them alike. Printed: medians (ms), LRP ÷ forward as the median of the per-round
ratios with their min–max over the rounds (the spread on a shared machine), and the node counts of the forward
and the compiled graph."""
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


def export(name: str, exporter: str, cache: Path) -> Path:
    """torchvision ``name`` (weights=None, seed 0), exported once per exporter with a dynamic batch."""
    path = cache / f"{name}.{exporter}.onnx"
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **names,
                              dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
        else:
            prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **names,
                                     dynamic_shapes=({0: torch.export.Dim("n")},))
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
            + f"\n# composite {args.composite}, {args.repeats} rounds; ratio: median of per-round LRP ÷ forward "
              f"[min–max]")


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
    ap.add_argument("--cache", default=os.environ.get("LRPC_BENCH_CACHE", "/tmp/lrpc-bench-mobile"))
    args = ap.parse_args()

    from lrpc.runtime import inference_session

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(header(args))
    cols = f"{'model':20s} {'export':6s} {'thr':>3s} {'batch':>5s} {'fwd ms':>8s} {'lrp ms':>8s} {'lrp/fwd':>22s}"
    if args.baseline:
        cols += f" {'base ms':>8s} {'base/fwd':>22s} {'new/base':>8s}"
    cols += f" {'nodes fwd/lrp':>14s}" + (" base" if args.baseline else "")
    print(cols, flush=True)
    for name in args.models.split(","):
        for exporter in args.exports.split(","):
            path = export(name, exporter, cache)
            graphs = {"new": cache / f"{name}.{exporter}.{args.composite}.lrp.onnx"}
            compile_with(None, path, graphs["new"], args.composite)
            if args.baseline:
                graphs["base"] = cache / f"{name}.{exporter}.{args.composite}.base.lrp.onnx"
                compile_with(args.baseline, path, graphs["base"], args.composite)
            nodes = {k: node_count(p) for k, p in graphs.items()}
            for threads in map(int, args.threads.split(",")):
                sessions = {"fwd": inference_session(str(path), ["CPUExecutionProvider"], threads)}
                sessions.update({k: inference_session(str(p), ["CPUExecutionProvider"], threads)
                                 for k, p in graphs.items()})
                for batch in map(int, args.batches.split(",")):
                    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                    seed = np.zeros((batch, 1000), np.float32)
                    seed[:, 3] = 1.0
                    feeds = {k: {"input": x} if k == "fwd" else {"input": x, "relevance_seed": seed} for k in sessions}
                    times: dict[str, list[float]] = {k: [] for k in sessions}
                    for r in range(args.repeats + 1):
                        for k, s in sessions.items():
                            t = time.perf_counter()
                            s.run(None, feeds[k])
                            if r:  # (round 0 warms up)
                                times[k].append(time.perf_counter() - t)
                    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}

                    def ratio(k):
                        rs = [a / f for a, f in zip(times[k], times["fwd"])]
                        return f"{statistics.median(rs):6.2f} [{min(rs):5.2f}–{max(rs):5.2f}]"

                    row = (f"{name:20s} {exporter:6s} {threads:3d} {batch:5d} {ms['fwd']:8.2f} {ms['new']:8.2f} "
                           f"{ratio('new'):>22s}")
                    if args.baseline:
                        rel = statistics.median([a / b for a, b in zip(times["new"], times["base"])])
                        row += f" {ms['base']:8.2f} {ratio('base'):>22s} {rel:8.3f}"
                    row += f" {node_count(path):6d}/{nodes['new']:<6d}" + (f" {nodes['base']}" if args.baseline else "")
                    print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

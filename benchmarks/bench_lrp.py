"""Speed of compiled LRP vs the plain forward (onnxruntime) and vs zennit, measured in one run.

    python benchmarks/bench_lrp.py                       # ResNet-50 and VGG16, batch 1 and 8, 2 threads
    python benchmarks/bench_lrp.py --models resnet50 --batches 1 --composites epsilon --no-zennit
    python benchmarks/bench_lrp.py --device cuda         # CUDAExecutionProvider (skips without one)

Models are torchvision architectures with seeded random weights, exported offline (legacy exporter) to
a cache folder. Forward and LRP runs alternate, so drift hits both; medians are reported. Peak memory is
the peak RSS of a child process that creates the session and runs it once (it includes the interpreter).
Needs the test extras (torch, torchvision, zennit)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ZENNIT = {
    "epsilon-gamma-box": "EpsilonGammaBox",
    "epsilon-plus": "EpsilonPlus",
    "epsilon-plus-flat": "EpsilonPlusFlat",
    "epsilon-alpha2-beta1": "EpsilonAlpha2Beta1",
    "epsilon": None,
}


def export(name: str, cache: Path) -> Path:
    import torch
    import torchvision

    path = cache / f"{name}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return path


def session(model, threads: int, device: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # TF32 off: the same float32 arithmetic as the CPU (lrpc.Session's default)
    providers = ([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if device == "cuda"
                 else ["CPUExecutionProvider"])
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    s = ort.InferenceSession(str(data) if isinstance(data, Path) else data, so, providers=providers)
    return s


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_rss_mb(model_path: Path, feeds_path: Path, threads: int, device: str) -> float:
    code = f"""
import numpy as np, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_lrp import session
s = session({str(model_path)!r}, {threads}, {device!r})
feeds = dict(np.load({str(feeds_path)!r}))
s.run(None, feeds)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def zennit_time(name: str, composite: str, x: np.ndarray, threads: int, repeats: int) -> float | None:
    import torch
    import torchvision
    from zennit import composites as zc
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if ZENNIT.get(composite) is None:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    canonizers = [ResNetCanonizer()] if name.startswith("resnet") else [VGGCanonizer()]
    kwargs = {"low": -3.0, "high": 3.0} if composite == "epsilon-gamma-box" else {}
    comp = getattr(zc, ZENNIT[composite])(canonizers=canonizers, **kwargs)
    xt = torch.from_numpy(x)
    seed = torch.zeros(x.shape[0], 1000)
    seed[:, 3] = 1
    times = []
    with Gradient(model=model, composite=comp) as attributor:
        for _ in range(repeats + 1):
            times.append(timed(lambda: attributor(xt, seed)))
    return statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--composites", default="epsilon-gamma-box,epsilon,epsilon-alpha2-beta1")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--zennit-repeats", type=int, default=2)
    ap.add_argument("--no-zennit", action="store_true")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS in child processes")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cache", default=os.environ.get("LRPC_BENCH_CACHE", "/tmp/lrpc-bench"))
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()

    import onnxruntime as ort

    import lrpc

    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDAExecutionProvider in this onnxruntime: skipping (--device cuda)")
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    header = f"{'model':9s} {'composite':21s} {'batch':>5s} {'fwd ms':>8s} {'lrp ms':>8s} {'lrp/fwd':>7s} {'zennit ms':>9s} {'zennit/lrp':>10s} {'compile s':>9s} {'size x':>6s} {'mem x':>6s}"
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, device {args.device}")
    print(header)
    for name in args.models.split(","):
        path = export(name, cache)
        fwd = session(path, args.threads, args.device)
        if args.device == "cuda" and "CUDAExecutionProvider" not in fwd.get_providers():
            print("CUDA provider requested but not used by onnxruntime: skipping")
            return 0
        for composite in args.composites.split(","):
            t0 = time.perf_counter()
            compiled = lrpc.compile(path, composite, low=-3.0, high=3.0)
            compile_s = time.perf_counter() - t0
            size_ratio = compiled.ByteSize() / path.stat().st_size
            lrp_path = cache / f"{name}.{composite}.lrp.onnx"
            lrp_path.write_bytes(compiled.SerializeToString())
            lrp = session(lrp_path, args.threads, args.device)
            for batch in map(int, args.batches.split(",")):
                rng = np.random.default_rng(0)
                x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
                seed = np.zeros((batch, 1000), np.float32)
                seed[:, 3] = 1
                feeds = {"input": x, "relevance_seed": seed}
                fwd.run(None, {"input": x})
                lrp.run(None, feeds)
                tf, tl = [], []
                for _ in range(args.repeats):  # alternate, so drift hits both
                    tf.append(timed(lambda: fwd.run(None, {"input": x})))
                    tl.append(timed(lambda: lrp.run(None, feeds)))
                f_ms, l_ms = statistics.median(tf) * 1e3, statistics.median(tl) * 1e3
                z = None if args.no_zennit else zennit_time(name, composite, x, args.threads, args.zennit_repeats)
                mem = None
                if args.memory:
                    fp, lp = cache / "feeds_fwd.npz", cache / "feeds_lrp.npz"
                    np.savez(fp, input=x)
                    np.savez(lp, **feeds)
                    mem = peak_rss_mb(lrp_path, lp, args.threads, args.device) / peak_rss_mb(path, fp, args.threads, args.device)
                row = {"model": name, "composite": composite, "batch": batch, "forward_ms": f_ms, "lrp_ms": l_ms,
                       "lrp_over_forward": l_ms / f_ms, "zennit_ms": None if z is None else z * 1e3,
                       "zennit_over_lrp": None if z is None else z * 1e3 / l_ms, "compile_s": compile_s,
                       "size_ratio": size_ratio, "peak_rss_ratio": mem}
                rows.append(row)
                zs = f"{row['zennit_ms']:9.0f} {row['zennit_over_lrp']:10.1f}" if z is not None else f"{'-':>9s} {'-':>10s}"
                ms = f"{mem:6.2f}" if mem is not None else f"{'-':>6s}"
                print(f"{name:9s} {composite:21s} {batch:5d} {f_ms:8.1f} {l_ms:8.1f} {l_ms / f_ms:7.2f} {zs} {compile_s:9.2f} {size_ratio:6.3f} {ms}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

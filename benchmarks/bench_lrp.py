"""Speed of compiled LRP vs the plain forward (onnxruntime) and vs zennit, measured in one run.

    python benchmarks/bench_lrp.py                       # ResNet-50 and VGG16, batch 1 and 8, 2 threads
    python benchmarks/bench_lrp.py --models resnet50 --batches 1 --composites epsilon --no-zennit
    python benchmarks/bench_lrp.py --device cuda         # CUDAExecutionProvider (skips without one)
    python benchmarks/bench_lrp.py --device cuda --cuda-graph   # ... each batch captured as a CUDA graph

Models are torchvision architectures with seeded random weights, exported offline (legacy exporter) to
a cache folder. Forward and LRP runs alternate, so drift hits both; medians are reported. Memory (--memory):
on the CPU the peak RSS of a child process that creates the session and runs it once; on CUDA the GPU memory
that child's session holds after the run. On CUDA both graphs run through IO binding with inputs and outputs in
GPU memory (compute only); column "lrp+io ms" is the compiled graph fed and read as numpy (host copies
included), and zennit runs on the same GPU (TF32 off on both sides). Needs the test extras (torch,
torchvision, zennit)."""
from __future__ import annotations

import argparse
import json
import os
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
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return path


def session(model, threads: int, device: str, cuda_graph: int = 0, low_memory: bool = False):
    """An onnxruntime session of ``model`` (path or ModelProto) with lrpc.Session's options (both sides of every
    ratio). ``cuda_graph``: a batch size to pin the inputs to and capture the run as one CUDA graph
    (onnxruntime's ``enable_cuda_graph``; needs static shapes). ``low_memory``: lrpc.Session's option."""
    import onnx

    from lrpc.runtime import inference_session

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if cuda_graph:
        model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        for value in list(model.graph.input) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = cuda_graph
    data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    # TF32 off: the same float32 arithmetic as the CPU (lrpc.Session's default)
    return inference_session(data, providers, threads, cuda_options={"enable_cuda_graph": "1"} if cuda_graph else None,
                             low_memory=low_memory)


def runner(sess, feeds: dict, device: str, cuda_graph: bool = False):
    """A callable running ``sess`` once on ``feeds``. CPU: a plain run. CUDA: IO binding with the inputs already in
    GPU memory and the outputs left there (what a GPU pipeline pays: no host copies); with ``cuda_graph`` the
    outputs are preallocated (a captured graph replays on fixed addresses)."""
    import onnxruntime as ort

    from lrpc.runtime import bind

    if device == "cpu":
        return lambda: sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
    binding = bind(sess, values, [] if cuda_graph else names, "cuda")
    if cuda_graph:  # (before the capture: a plain run for the output shapes)
        for name, y in zip(names, sess.run(None, feeds)):
            binding.keep.append(ort.OrtValue.ortvalue_from_shape_and_type(y.shape, y.dtype, "cuda", 0))
            binding.bind_ortvalue_output(name, binding.keep[-1])
    return lambda: sess.run_with_iobinding(binding)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_memory_mb(snippet: str, device: str) -> float:
    """Memory of a child process that runs ``snippet`` once (``np``, ``bench_lrp`` and ``lrpc`` importable). CPU:
    its peak resident memory (VmHWM; includes the interpreter; ``getrusage``'s ru_maxrss would not do: Linux
    carries it over from the parent through fork and exec). CUDA: GPU memory in use after the run minus before
    it (onnxruntime's arena, weights and workspaces; torch's cached blocks for zennit; torch.cuda.mem_get_info)."""
    code = f"""
import numpy as np, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
import bench_lrp
gpu = {device!r} == "cuda"
if gpu:
    import torch
    free, total = torch.cuda.mem_get_info()
{snippet}
if gpu:
    print((free - torch.cuda.mem_get_info()[0]) / 2**20)
else:
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def onnxruntime_memory_mb(model_path: Path, feeds_path: Path, threads: int, device: str,
                          low_memory: bool = False) -> float:
    # (the session stays referenced until the memory is read: a collected session frees its arena)
    return peak_memory_mb(f"s = bench_lrp.session({str(model_path)!r}, {threads}, {device!r}, "
                          f"low_memory={low_memory})\ns.run(None, dict(np.load({str(feeds_path)!r})))", device)


def zennit_memory_mb(name: str, composite: str, feeds_path: Path, threads: int, device: str) -> float:
    return peak_memory_mb(f"bench_lrp.zennit_time({name!r}, {composite!r}, np.load({str(feeds_path)!r})['input'], "
                          f"{threads}, 0, {device!r})", device)


def zennit_time(name: str, composite: str, x: np.ndarray, threads: int, repeats: int,
                device: str = "cpu") -> float | None:
    import torch
    import torchvision
    from zennit import composites as zc
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if ZENNIT.get(composite) is None:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    canonizers = [ResNetCanonizer()] if name.startswith("resnet") else [VGGCanonizer()]
    kwargs = {"low": -3.0, "high": 3.0} if composite == "epsilon-gamma-box" else {}
    comp = getattr(zc, ZENNIT[composite])(canonizers=canonizers, **kwargs)
    xt = torch.from_numpy(x).to(device)
    seed = torch.zeros(x.shape[0], 1000, device=device)
    seed[:, 3] = 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":  # TF32 off, as on the onnxruntime side
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    times = []
    with Gradient(model=model, composite=comp) as attributor:
        for _ in range(repeats + 1):
            times.append(timed(lambda: (attributor(xt, seed), sync())))
    return statistics.median(times[1:]) if repeats else times[0]


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
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA: pin each batch size and replay both graphs as captured CUDA graphs")
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
    header = (f"{'model':9s} {'composite':21s} {'batch':>5s} {'fwd ms':>8s} {'lrp ms':>8s} {'lrp/fwd':>7s} "
              f"{'zennit ms':>9s} {'zennit/lrp':>10s} {'compile s':>9s} {'size x':>6s} {'mem x':>6s} "
              f"{'lrp/fwd MiB':12s} {'zen MiB':>7s}")
    if args.device == "cuda" and not args.cuda_graph:
        header += f" {'lrp+io ms':>8s}"
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, device {args.device}"
          + (", CUDA graphs" if args.cuda_graph else ""))
    print(header)
    for name in args.models.split(","):
        path = export(name, cache)
        fwd = session(path, args.threads, args.device)
        if args.device == "cuda" and "CUDAExecutionProvider" not in fwd.get_providers():
            print("CUDA provider requested but not used by onnxruntime: skipping")
            return 0
        for composite in args.composites.split(","):
            t0 = time.perf_counter()
            compiled = lrpc.compile(path, composite, low=-3.0, high=3.0, for_provider=args.device)
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
                graph = batch if args.cuda_graph else 0
                f_sess = session(path, args.threads, args.device, graph) if graph else fwd
                l_sess = session(lrp_path, args.threads, args.device, graph) if graph else lrp
                run_f = runner(f_sess, {"input": x}, args.device, bool(graph))
                run_l = runner(l_sess, feeds, args.device, bool(graph))
                run_host = lambda: l_sess.run(None, feeds)  # noqa: E731 (numpy in, numpy out)
                for warm in (run_f, run_l, run_f, run_l):
                    warm()
                tf, tl, th = [], [], []
                for _ in range(args.repeats):  # alternate, so drift hits both
                    tf.append(timed(run_f))
                    tl.append(timed(run_l))
                    if args.device == "cuda" and not graph:
                        th.append(timed(run_host))
                f_ms, l_ms = statistics.median(tf) * 1e3, statistics.median(tl) * 1e3
                h_ms = statistics.median(th) * 1e3 if th else None
                z = None if args.no_zennit else zennit_time(name, composite, x, args.threads, args.zennit_repeats,
                                                             args.device)
                mem, mem_mb = None, (None, None, None)
                if args.memory:
                    fp, lp = cache / "feeds_fwd.npz", cache / "feeds_lrp.npz"
                    np.savez(fp, input=x)
                    np.savez(lp, **feeds)
                    mem_mb = (onnxruntime_memory_mb(lrp_path, lp, args.threads, args.device),
                              onnxruntime_memory_mb(path, fp, args.threads, args.device),
                              None if z is None else zennit_memory_mb(name, composite, fp, args.threads, args.device))
                    mem = mem_mb[0] / mem_mb[1]
                row = {"model": name, "composite": composite, "batch": batch, "forward_ms": f_ms, "lrp_ms": l_ms,
                       "lrp_over_forward": l_ms / f_ms, "zennit_ms": None if z is None else z * 1e3,
                       "zennit_over_lrp": None if z is None else z * 1e3 / l_ms, "compile_s": compile_s,
                       "size_ratio": size_ratio, "peak_memory_ratio": mem,
                       "lrp_memory_mib": mem_mb[0], "forward_memory_mib": mem_mb[1], "zennit_memory_mib": mem_mb[2],
                       "lrp_host_io_ms": h_ms,
                       "device": args.device, "cuda_graph": bool(graph)}
                rows.append(row)
                zs = (f"{row['zennit_ms']:9.1f} {row['zennit_over_lrp']:10.1f}" if z is not None
                      else f"{'-':>9s} {'-':>10s}")
                ms = (f"{mem:6.2f} {mem_mb[0]:6.0f}/{mem_mb[1]:<5.0f}"
                      + (f" {mem_mb[2]:7.0f}" if mem_mb[2] else f" {'-':>7s}")
                      if mem is not None else f"{'-':>6s} {'':12s} {'':7s}")
                hs = f" {h_ms:8.1f}" if h_ms is not None else ""
                print(f"{name:9s} {composite:21s} {batch:5d} {f_ms:8.2f} {l_ms:8.2f} {l_ms / f_ms:7.2f} {zs} "
                      f"{compile_s:9.2f} {size_ratio:6.3f} {ms}{hs}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

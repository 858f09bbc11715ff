"""Where a (compiled) graph spends its time in onnxruntime: per op type, summed over nodes, and which execution
provider ran each, from onnxruntime's own profiler, in a session with lrpc.Session's options.

    python benchmarks/profile_ops.py /tmp/lrpc-bench/resnet50.epsilon-gamma-box.lrp.onnx --batch 8
    python benchmarks/profile_ops.py model.lrp.onnx --device cuda --runs 20

Inputs: random normal of each input's shape (batch ``--batch``), a one-hot seed (class 3) for
``relevance_seed``. Prints one line per (op type, provider): total ms per run, share, node count; and a line
counting the nodes not on the first provider (on CUDA: nodes that fell back to the CPU, with copies around them)."""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np

from lrpc.runtime import NUMPY_TYPES, inference_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    session = inference_session(args.model, providers, args.threads, profile=os.path.join(tempfile.mkdtemp(), "profile"))
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [args.batch if not isinstance(d, int) else d for d in i.shape]
        if i.type not in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            raise SystemExit(f"input {i.name!r} is {i.type}: this script feeds random floats only")
        feeds[i.name] = rng.standard_normal(shape).astype(NUMPY_TYPES[i.type])
        if i.name == "relevance_seed":
            feeds[i.name] = np.zeros(shape, NUMPY_TYPES[i.type])
            feeds[i.name].reshape(shape[0], -1)[:, 3] = 1
    session.run(None, feeds)  # warm-up (excluded below)
    for _ in range(args.runs):
        session.run(None, feeds)
    events = json.load(open(session.end_profiling()))
    runs = [e for e in events if e.get("name") == "model_run"]
    warm_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    totals, counts, providers_of = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < warm_end:
            continue
        key = (e["args"]["op_name"], e["args"].get("provider", "?"))
        totals[key] += e["dur"]
        providers_of[e["name"][: -len("_kernel_time")]] = key
    for name, key in providers_of.items():
        counts[key] += 1
    wall = sum(r["dur"] for r in runs[1:]) / max(len(runs) - 1, 1) / 1e3
    total = sum(totals.values()) / args.runs / 1e3
    print(f"{args.model}: batch {args.batch}, {session.get_providers()[0]}, {wall:.2f} ms per run (wall), "
          f"{total:.2f} ms in kernels")
    for (op, provider), us in totals.most_common(args.top):
        ms = us / args.runs / 1e3
        print(f"  {op:22s} {provider:24s} {ms:8.2f} ms {100 * ms / total:5.1f}%  {counts[(op, provider)]:4d} nodes")
    main_provider = session.get_providers()[0]
    off = [n for n, (op, p) in providers_of.items() if p != main_provider]
    print(f"  nodes not on {main_provider}: {len(off)}"
          + (f" ({', '.join(sorted({providers_of[n][0] for n in off}))})" if off else ""))


if __name__ == "__main__":
    main()

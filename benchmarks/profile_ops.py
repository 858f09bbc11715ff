r"""Where a (compiled) graph spends its time in onnxruntime: per op type, summed over nodes, and which execution
provider ran each, from onnxruntime's own profiler, in a session with lrpc.Session's options.

    python benchmarks/profile_ops.py /tmp/lrpc-bench/resnet50.epsilon-gamma-box.lrp.onnx --batch 8
    python benchmarks/profile_ops.py model.lrp.onnx --device cuda --runs 20
    python benchmarks/profile_ops.py /tmp/lrpc-bench/vgg16.epsilon-gamma-box.lrp.onnx \
        --forward /tmp/lrpc-bench/vgg16.onnx

Inputs: random normal of each float input's shape (batch ``--batch``), ones for integer inputs (token ids, masks),
a one-hot seed (class 3, or the last) for ``relevance_seed``. Prints one line per (op type, provider): total ms per
run, share, node count; and a line counting the nodes not on the first provider (on CUDA: nodes that fell back to
the CPU, with copies around them).
``--forward original.onnx`` profiles the original in turn and prints the compiled graph's kernel time, and its
convolutions' alone (and with the dense layers), as multiples of the forward's: the second number is the floor for
LRP ÷ forward that only fewer convolutions could lower (docs/performance.md). ``--stat min`` takes each node's least
time over the runs instead of the mean (a machine shared with other jobs)."""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np

from lrpc.runtime import NUMPY_TYPES, inference_session


def feeds_for(session, batch: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        if i.type in ("tensor(int64)", "tensor(int32)"):  # token ids, attention masks, token types: all 1
            feeds[i.name] = np.ones(shape, NUMPY_TYPES[i.type])
            continue
        if i.type not in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            raise SystemExit(f"input {i.name!r} is {i.type}: this script feeds random floats and integer ones only")
        feeds[i.name] = rng.standard_normal(shape).astype(NUMPY_TYPES[i.type])
        if i.name == "relevance_seed":
            feeds[i.name] = np.zeros(shape, NUMPY_TYPES[i.type])
            feeds[i.name].reshape(shape[0], -1)[:, min(3, int(np.prod(shape[1:])) - 1)] = 1
    return feeds


def kernel_times(session, runs: int, stat: str = "mean"):
    """(wall ms per run, {(op, provider): kernel ms per run}, {node: (op, provider)}) from the session's profile,
    the warm-up run excluded. ``stat="min"``: each node's least time over the runs (on a machine shared with other
    jobs the mean measures them too)."""
    events = json.load(open(session.end_profiling()))
    model_runs = [e for e in events if e.get("name") == "model_run"]
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    per_node, providers_of = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < warm_end:
            continue
        node = e["name"][: -len("_kernel_time")]
        providers_of[node] = (e["args"]["op_name"], e["args"].get("provider", "?"))
        per_node[node].append(e["dur"] / 1e3)
    totals = collections.Counter()
    for node, times in per_node.items():
        totals[providers_of[node]] += min(times) if stat == "min" else sum(times) / runs
    wall = sum(r["dur"] for r in model_runs[1:]) / max(len(model_runs) - 1, 1) / 1e3
    return wall, totals, providers_of


CONVOLUTIONS = ("Conv", "ConvTranspose", "FusedConv")
DENSE = ("MatMul", "Gemm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--forward", help="the original model: profiled in turn with the compiled one; prints the "
                                      "compiled graph's time and its convolutions' time as multiples of the forward")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--stat", choices=["mean", "min"], default="mean",
                    help="per node: mean kernel time over the runs, or the least (a shared machine)")
    args = ap.parse_args()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    paths = [args.model] + ([args.forward] if args.forward else [])
    sessions = [inference_session(p, providers, args.threads, profile=os.path.join(tempfile.mkdtemp(), "profile"))
                for p in paths]
    feeds = [feeds_for(s, args.batch) for s in sessions]
    for _ in range(args.runs + 1):  # the first run warms up (excluded); the models take turns
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    (wall, totals, providers_of), *forward = [kernel_times(s, args.runs, args.stat) for s in sessions]
    counts = collections.Counter(providers_of.values())
    total = sum(totals.values())
    session = sessions[0]
    print(f"{args.model}: batch {args.batch}, {session.get_providers()[0]}, {wall:.2f} ms per run (wall), "
          f"{total:.2f} ms in kernels")
    for (op, provider), ms in totals.most_common(args.top):
        print(f"  {op:22s} {provider:24s} {ms:8.2f} ms {100 * ms / total:5.1f}%  {counts[(op, provider)]:4d} nodes")
    main_provider = session.get_providers()[0]
    off = [n for n, (op, p) in providers_of.items() if p != main_provider]
    print(f"  nodes not on {main_provider}: {len(off)}"
          + (f" ({', '.join(sorted({providers_of[n][0] for n in off}))})" if off else ""))
    if forward:
        f_wall, f_totals, _ = forward[0]
        f_total = sum(f_totals.values())
        conv = sum(ms for (op, _), ms in totals.items() if op in CONVOLUTIONS)
        print(f"forward {args.forward}: {f_wall:.2f} ms per run (wall), {f_total:.2f} ms in kernels")
        dense = sum(ms for (op, _), ms in totals.items() if op in DENSE)
        print(f"  compiled / forward (kernel time): {total / f_total:.2f}; "
              f"its convolutions alone: {conv / f_total:.2f} "
              f"(the floor element-wise work adds to); with the dense layers (MatMul, Gemm): "
              f"{(conv + dense) / f_total:.2f}")


if __name__ == "__main__":
    main()

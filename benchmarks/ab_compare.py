"""Two compiled graphs of the same model timed alternately in one process: the way to judge an emitter change on a
shared machine, where whole benchmark runs drift by ±10–25% (see docs/performance.md).

    python benchmarks/ab_compare.py old.lrp.onnx new.lrp.onnx --batch 8 --repeats 15

Both graphs get the same random input (shape from the first model's input, batch ``--batch``) and a one-hot seed
(class 3); prints the median time of each, the ratio new/old, and the largest relevance difference relative to the
largest relevance (the change must not change the numbers beyond float32 round-off)."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in (args.old, args.new)]
    inputs = {i.name: i for i in sessions[0].get_inputs()}
    x_info = next(i for n, i in inputs.items() if n != "relevance_seed")
    shape = [args.batch] + [d if isinstance(d, int) else 1 for d in x_info.shape[1:]]
    feeds = {x_info.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    if "relevance_seed" in inputs:
        seed_shape = [args.batch] + [d if isinstance(d, int) else 1 for d in inputs["relevance_seed"].shape[1:]]
        seed = np.zeros(seed_shape, np.float32).reshape(args.batch, -1)
        seed[:, 3] = 1.0
        feeds["relevance_seed"] = seed.reshape(seed_shape)
    relevance = [s.run(["relevance"], feeds)[0] for s in sessions]  # (also the warm-up run)
    times: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        for s, t in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - start)
    old, new = (statistics.median(t) * 1e3 for t in times)
    diff = float(np.max(np.abs(relevance[0] - relevance[1])) / max(np.max(np.abs(relevance[0])), 1e-30))
    print(f"old {old:.1f} ms  new {new:.1f} ms  new/old {new / old:.3f}  max |ΔR| / max |R| {diff:.1e}")


if __name__ == "__main__":
    main()

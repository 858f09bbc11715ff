"""Throughput of `lrpc explain --images`: one process against the Ray Data executor with 1 and 2 actors.

    python benchmarks/bench_ray.py [--images 96] [--size 128] [--batch-size 8] [--cpus 2]

A torchvision ResNet-18 (random weights; the relevance's values do not change the time) exported to ONNX at
SIZE x SIZE, and IMAGES random PNGs. Each configuration runs `lrpc.explain.run` end to end in this process
(compiled once before, through the compile cache; the local Ray cluster is started once before, its actors are
started inside the timed run); images/s over the whole run, and the CPU time of this process (the driver: with Ray
it reads the results and writes the files, the actors draw them) per image. Needs torch, torchvision and ray[data].
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    args = p.parse_args()

    import ray
    import torch
    import torchvision
    from PIL import Image

    from lrpc.explain import run

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    os.environ.setdefault("LRPC_CACHE_DIR", str(work / "cache"))
    model = work / "resnet18.onnx"
    net = torchvision.models.resnet18(weights=None).eval()
    torch.onnx.export(net, torch.randn(1, 3, args.size, args.size), model, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:04}.png")
    common = dict(images=images, batch_size=args.batch_size, preset="imagenet", progress=False, log=lambda m: None,
                  cache=True, rules="epsilon-plus")
    run(model, work / "warm", **common)  # compiles into the cache
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ResNet-18 {args.size}x{args.size}, {args.images} images, batch {args.batch_size}, "
          f"{args.cpus} CPUs, epsilon-plus")
    for name, extra in (("single process", {}), ("ray, 1 actor", {"ray": "auto", "concurrency": 1}),
                        ("ray, 2 actors", {"ray": "auto", "concurrency": 2})):
        out = work / name.replace(" ", "_").replace(",", "")
        start, cpu = time.perf_counter(), time.process_time()
        run(model, out, **common, **extra)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"{name:16s} {seconds:7.2f} s  {args.images / seconds:6.2f} images/s  driver CPU "
              f"{1000 * cpu / args.images:6.1f} ms/image")
    ray.shutdown()


if __name__ == "__main__":
    main()

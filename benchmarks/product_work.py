"""The multiply-add work of a compiled graph over its forward's: the arithmetic floor of LRP ÷ forward.

    python benchmarks/product_work.py model.lrp.onnx [more.lrp.onnx ...]

Counts 2·(multiply-adds) of every Conv, ConvTranspose, Gemm and MatMul from the shapes ONNX shape inference gives
the compiled graph (static shapes needed: compile a fixed-batch export or pass ``--input-shape``), over those of the
nodes lrpc did not add (the forward). Where products take most of a forward's time, no lowering brings LRP ÷
forward below this ratio; element-wise work and layout conversions come on top. Nodes whose shapes stay unknown
are counted and reported (their work is left out)."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import shape_inference

PRODUCTS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def work(path: str) -> tuple[float, float, int]:
    """(forward FLOPs, all FLOPs, product nodes of unknown shape) of the compiled graph at ``path``."""
    model = shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    g = model.graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*g.value_info, *g.input, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    forward = total = 0.0
    unknown = 0
    for n in g.node:
        if n.op_type not in PRODUCTS:
            continue
        try:
            if n.op_type == "Conv":  # every output value: Cin/group · kernel multiply-adds
                f = 2.0 * np.prod(shapes[n.output[0]]) * np.prod(shapes[n.input[1]][1:])
            elif n.op_type == "ConvTranspose":  # every input value: Cout/group · kernel
                f = 2.0 * np.prod(shapes[n.input[0]]) * np.prod(shapes[n.input[1]][1:])
            else:
                f = 2.0 * np.prod(shapes[n.output[0]]) * shapes[n.input[0]][-1]
        except (KeyError, IndexError):
            f = 0.0
        if f <= 0:
            unknown += 1
            continue
        total += f
        if not n.name.startswith("lrp/"):
            forward += f
    return forward, total, unknown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="compiled graphs (*.lrp.onnx)")
    args = ap.parse_args()
    print(f"{'model':60s} {'forward MFLOP':>14s} {'compiled MFLOP':>15s} {'ratio':>6s} {'unknown':>8s}")
    for path in args.models:
        forward, total, unknown = work(path)
        ratio = total / forward if forward else float("nan")
        print(f"{path:60s} {forward / 1e6:14.1f} {total / 1e6:15.1f} {ratio:6.2f} {unknown:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

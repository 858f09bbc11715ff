"""A model's structure without its big weights: what onnx's checker and shape inference need (serializing the whole
model for them would dominate compile time on big models). numpy and onnx only."""
from __future__ import annotations

import numpy as np
import onnx

# big float weights (is_big) become typed graph inputs of their shape; smaller tensors (shape constants, biases) keep
# their values for data propagation
BIG = 4096  # elements


def is_big(data_type: int, dims) -> bool:
    """A float tensor of more than :data:`BIG` elements: one the checker and shape inference see as a graph input
    of its shape (:func:`structure_of_model`); :func:`lrpc.loaded.load` reads those without their data."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return data_type in floats and int(np.prod(list(dims) or [1])) > BIG


def structure_of_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the data of its big float initializers (they become graph inputs)."""
    s = onnx.ModelProto()
    s.ir_version = max(model.ir_version, 4)
    s.opset_import.extend(model.opset_import)
    g, sg = model.graph, s.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    declared = {i.name for i in g.input}
    for init in g.initializer:
        if is_big(init.data_type, init.dims):
            if init.name not in declared:
                sg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            sg.initializer.append(init)
    return s


def check_structure(model: onnx.ModelProto, full_check: bool = False) -> None:
    """onnx.checker on the model's structure (weights' values are not what it checks)."""
    onnx.checker.check_model(structure_of_model(model), full_check=full_check)

"""Variants of the real YOLOv8n model made with the onnx package, for tests of other layouts and types."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper


def transposed_output_model(source: Path, target: Path) -> Path:
    """The same detector with its output as `[1, N, 4+nc]` instead of `[1, 4+nc, N]`."""
    model = onnx.load(str(source))
    graph = model.graph
    old_output = graph.output[0]
    inner_name = old_output.name + "_channels_first"
    for node in graph.node:
        node.output[:] = [inner_name if name == old_output.name else name for name in node.output]
    graph.node.append(helper.make_node("Transpose", [inner_name], [old_output.name], perm=[0, 2, 1]))
    dims = [d.dim_value for d in old_output.type.tensor_type.shape.dim]
    graph.output.remove(old_output)
    graph.output.append(
        helper.make_tensor_value_info(old_output.name, onnx.TensorProto.FLOAT, [dims[0], dims[2], dims[1]])
    )
    onnx.save(model, str(target))
    return target


def without_metadata(source: Path, target: Path) -> Path:
    """The same detector with no class names, input size or stride in its metadata."""
    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.save(model, str(target))
    return target


def fp16_model(source: Path, target: Path) -> Path:
    """An fp16 copy with fp16 input and output, as a GPU deployment would use."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=False), str(target))
    return target

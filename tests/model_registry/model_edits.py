"""Valid ONNX files the registry must refuse: the real detector with its output reshaped or cut."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _rewire_output(
    source: Path,
    target: Path,
    make_node: Callable[[str, str], onnx.NodeProto],
    dims: list[int],
    extra: list[onnx.TensorProto],
) -> Path:
    model = onnx.load(str(source))
    graph = model.graph
    old_output = graph.output[0]
    inner = old_output.name + "_inner"
    for node in graph.node:
        node.output[:] = [inner if name == old_output.name else name for name in node.output]
    graph.initializer.extend(extra)
    graph.node.append(make_node(inner, old_output.name))
    graph.output.remove(old_output)
    graph.output.append(helper.make_tensor_value_info(old_output.name, onnx.TensorProto.FLOAT, dims))
    onnx.save(model, str(target))
    return target


def four_d_output_model(source: Path, target: Path) -> Path:
    """The detector with an extra leading axis on its output: `[1, 1, 84, 8400]`."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "edit_axes")
    return _rewire_output(
        source,
        target,
        lambda i, o: helper.make_node("Unsqueeze", [i, "edit_axes"], [o]),
        [1, 1, 84, 8400],
        [axes],
    )


def cut_rows_model(source: Path, target: Path, rows: int = 50) -> Path:
    """The detector with only the first `rows` output rows, so they no longer match its 80 class names."""
    tensors = [
        numpy_helper.from_array(np.array([0], np.int64), "edit_starts"),
        numpy_helper.from_array(np.array([rows], np.int64), "edit_ends"),
        numpy_helper.from_array(np.array([1], np.int64), "edit_axes"),
    ]
    return _rewire_output(
        source,
        target,
        lambda i, o: helper.make_node("Slice", [i, "edit_starts", "edit_ends", "edit_axes"], [o]),
        [1, rows, 8400],
        tensors,
    )


def dangling_input_model(source: Path, target: Path) -> Path:
    """A graph that fails the ONNX checker: a node reads a tensor nothing produces."""
    model = onnx.load(str(source))
    model.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(model, str(target))
    return target

"""What the registry accepts: a single-file ONNX model that devices can run and we know how to read.

A model passes when it passes the ONNX checker, loads in onnxruntime (CPU), takes one image tensor
`[batch, 3, height, width]`, runs once on a blank image with finite output, and its first output is

- a YOLO detector: `[batch, 4 + classes, anchors]` (Ultralytics export) or `[batch, anchors, 4 + classes]`,
- or a classifier: `[batch, classes]`.

Anything else is refused with a `ModelValidationError` that says why. The facts read on the way (input shape,
class names and their digest, precision, opset, producer, sha256, size) become the version's tags.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fleet_protocol.onnx_model import ModelLoadError, SessionOptions, open_session, parse_class_names
from fleet_protocol.signing import file_digest

Kind = Literal["detector", "classifier"]
Dim = int | str
DEFAULT_IMAGE_SIZE = 640
# Ops that only appear in quantized graphs (QDQ, dynamic quantization, QOperator format, weight-only int4).
QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
    }
)
_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16", 11: "fp64"}  # onnx.TensorProto data types


class ModelValidationError(ValueError):
    """The file is not a model the registry accepts; `reason` says why (and the message what to do)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} refused: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ModelFacts:
    """What validation learned about a model file."""

    path: Path
    sha256: str
    size: int
    kind: Kind
    layout: str
    input_name: str
    input_shape: tuple[Dim, ...]
    input_type: str
    output_name: str
    output_shape: tuple[int, ...]
    class_names: list[str]
    names_in_metadata: bool
    precision: str
    opset: int
    producer: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names_digest(self) -> str:
        return class_names_digest(self.class_names)

    def tags(self) -> dict[str, str]:
        """The facts as MLflow tag values (strings)."""
        return {
            "sha256": self.sha256,
            "size": str(self.size),
            "task": self.kind,
            "output_layout": self.layout,
            "input_name": self.input_name,
            "input_shape": json.dumps(list(self.input_shape)),
            "input_type": self.input_type,
            "output_shape": json.dumps(list(self.output_shape)),
            "num_classes": str(self.num_classes),
            "class_names_digest": self.class_names_digest,
            "class_names_source": "metadata" if self.names_in_metadata else "index",
            "precision": self.precision,
            "opset": str(self.opset),
            "producer": self.producer,
        }


def class_names_digest(names: Sequence[str]) -> str:
    """SHA-256 of the class names as a compact JSON list (UTF-8); equal digests mean equal label sets."""
    text = json.dumps(list(names), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def validate_model(path: Path) -> ModelFacts:
    """Check a model file and read its facts; raises ModelValidationError with the reason it is refused."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelValidationError(path, "file not found")
    if path.stat().st_size == 0:
        raise ModelValidationError(path, "the file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning-based and OS errors alike
        raise ModelValidationError(path, f"not an ONNX model (cannot be parsed: {error})") from error
    if any(_uses_external_data(tensor) for tensor in _initializers(model.graph)):
        raise ModelValidationError(
            path, "the weights live in external data files; save the model as one file to register it"
        )
    try:
        onnx.checker.check_model(str(path))
    except Exception as error:  # onnx.checker.ValidationError, or a C++ error for a malformed graph
        raise ModelValidationError(path, f"fails the ONNX checker: {_first_line(error)}") from error
    try:
        session, info = open_session(path, SessionOptions(providers=["cpu"], intra_op_threads=1))
    except ModelLoadError as error:
        raise ModelValidationError(path, f"onnxruntime cannot load it: {_first_line(error)}") from error
    input_shape = tuple(_dim(d) for d in info.input_shape)
    _check_input(path, input_shape, info.input_type)
    output = _smoke_run(path, session, info.input_name, input_shape, info.input_type, info.metadata)
    names = _metadata_names(path, info.metadata)
    kind, layout, count = _read_layout(path, info.output_names[0], output.shape, names)
    return ModelFacts(
        path=path,
        sha256=file_digest(path)[0],
        size=path.stat().st_size,
        kind=kind,
        layout=layout,
        input_name=info.input_name,
        input_shape=input_shape,
        input_type=info.input_type,
        output_name=info.output_names[0],
        output_shape=tuple(int(d) for d in output.shape),
        class_names=names if names is not None else [str(i) for i in range(count)],
        names_in_metadata=names is not None,
        precision=graph_precision(model),
        opset=_default_opset(model),
        producer=f"{model.producer_name} {model.producer_version}".strip() or "unknown",
        metadata=dict(info.metadata),
    )


def graph_precision(model: Any) -> str:
    """`int8` when the graph holds quantization ops, else the float type holding most weight elements."""
    graphs = list(_graphs(model.graph))
    if any(
        node.op_type in QUANT_OPS or node.op_type.startswith("QLinear") for g in graphs for node in g.node
    ):
        return "int8"
    elements: dict[str, int] = {}
    for tensor in _initializers(model.graph):
        kind = _FLOAT_TYPES.get(tensor.data_type)
        if kind is not None:
            elements[kind] = elements.get(kind, 0) + int(np.prod(tensor.dims, dtype=np.int64))
    if not elements:
        return "fp32"
    return max(elements, key=lambda kind: elements[kind])


def _graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _initializers(graph: Any) -> Iterator[Any]:
    """Weight tensors: initializers and Constant-node values, in every subgraph."""
    for g in _graphs(graph):
        yield from g.initializer
        for node in g.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.HasField("t"):
                        yield attribute.t


def _uses_external_data(tensor: Any) -> bool:
    return bool(tensor.HasField("data_location") and tensor.data_location == 1)  # TensorProto.EXTERNAL


def _default_opset(model: Any) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 0


def _dim(value: object) -> Dim:
    if isinstance(value, int) and value > 0:
        return value
    return str(value) if isinstance(value, str) and value else "?"


def _check_input(path: Path, shape: tuple[Dim, ...], input_type: str) -> None:
    if input_type not in ("tensor(float)", "tensor(float16)"):
        raise ModelValidationError(
            path, f"the input is {input_type}; expected a float or float16 image tensor"
        )
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise ModelValidationError(
            path, f"the input has shape {list(shape)}; expected one image tensor [batch, 3, height, width]"
        )


def _concrete_input(shape: tuple[Dim, ...], metadata: dict[str, str]) -> tuple[int, ...]:
    """The input shape with symbolic dimensions filled in: batch 1, channels 3, the image size."""
    height = width = DEFAULT_IMAGE_SIZE
    if "imgsz" in metadata:
        try:
            size = ast.literal_eval(metadata["imgsz"])
            height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        except (ValueError, SyntaxError, TypeError, IndexError):
            pass
    defaults = (1, 3, height, width)
    return tuple(d if isinstance(d, int) else defaults[i] for i, d in enumerate(shape))


def _smoke_run(
    path: Path,
    session: Any,
    input_name: str,
    shape: tuple[Dim, ...],
    input_type: str,
    metadata: dict[str, str],
) -> np.ndarray[Any, Any]:
    dtype = np.float16 if input_type == "tensor(float16)" else np.float32
    blank = np.full(_concrete_input(shape, metadata), 114 / 255, dtype=dtype)
    try:
        output = np.asarray(session.run(None, {input_name: blank})[0])
    except Exception as error:  # onnxruntime raises its own exception types for runtime failures
        raise ModelValidationError(path, f"inference on a blank image fails: {_first_line(error)}") from error
    if not np.issubdtype(output.dtype, np.floating):
        raise ModelValidationError(path, f"the first output is {output.dtype}; expected float scores")
    if not np.isfinite(output).all():
        raise ModelValidationError(path, "inference on a blank image gives NaN or infinite values")
    return output


def _metadata_names(path: Path, metadata: dict[str, str]) -> list[str] | None:
    if "names" not in metadata:
        return None
    try:
        names = parse_class_names(metadata["names"])
    except ModelLoadError as error:
        raise ModelValidationError(path, f"the 'names' metadata is unreadable: {error}") from error
    if not names:
        raise ModelValidationError(path, "the 'names' metadata lists no classes")
    return names


def _read_layout(
    path: Path, output_name: str, shape: tuple[int, ...], names: list[str] | None
) -> tuple[Kind, str, int]:
    """(kind, layout, class count) of the first output; refuses layouts we cannot decode."""
    understood = (
        "edgefleet understands YOLO detectors [batch, 4+classes, anchors] or [batch, anchors, 4+classes] "
        "and classifiers [batch, classes]"
    )
    if len(shape) == 2:
        classes = shape[1]
        if classes < 2:
            raise ModelValidationError(path, f"output {output_name} {list(shape)} has fewer than 2 classes")
        if names is not None and len(names) != classes:
            raise ModelValidationError(
                path,
                f"the metadata names {len(names)} classes but output {output_name} {list(shape)} "
                f"scores {classes}",
            )
        return "classifier", "[B,C]", classes
    if len(shape) != 3:
        raise ModelValidationError(path, f"output {output_name} has shape {list(shape)}; {understood}")
    rows, columns = shape[1], shape[2]
    if names is not None:
        if rows == 4 + len(names) and columns > rows:
            return "detector", "[B,4+nc,N]", len(names)
        if columns == 4 + len(names) and rows > columns:
            return "detector", "[B,N,4+nc]", len(names)
        raise ModelValidationError(
            path,
            f"the metadata names {len(names)} classes, so a detector output needs a dimension of "
            f"{4 + len(names)} beside a larger anchor dimension; output {output_name} is {list(shape)}",
        )
    small, large = min(rows, columns), max(rows, columns)
    if small < 5 or small == large:
        raise ModelValidationError(path, f"output {output_name} has shape {list(shape)}; {understood}")
    layout = "[B,4+nc,N]" if rows < columns else "[B,N,4+nc]"
    return "detector", layout, small - 4


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

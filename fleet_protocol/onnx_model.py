"""How every component opens an ONNX model: execution-provider choice, threads, and metadata.

onnxruntime is imported lazily so that the protocol package stays importable on machines that only
speak MQTT (the fleet manager without the agent extras, for example).
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

# Best first. CPU is always appended as the last resort so that unsupported nodes can fall back to it.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, or not a model this component understands."""


@dataclass(frozen=True)
class SessionOptions:
    """How to run a model: which providers and how many threads (0 = onnxruntime's default)."""

    providers: Sequence[str] | None = None
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    tensorrt_fp16: bool = True
    tensorrt_cache_dir: Path | None = None
    # Idle intra-op threads spin before they sleep; off, two sessions in one process (a device staging a new
    # model beside the one serving) stop starving each other on a small CPU.
    allow_spinning: bool = True


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model says about itself."""

    path: Path
    input_name: str
    input_shape: tuple[int | str | None, ...]
    input_type: str
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int | str | None, ...], ...]
    metadata: dict[str, str] = field(default_factory=dict)
    providers: tuple[str, ...] = ()

    @property
    def is_fp16(self) -> bool:
        return self.input_type == "tensor(float16)"


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Pick execution providers: the requested ones that exist, or the best available, then CPU.

    Raises ModelLoadError if a provider is requested explicitly but none of them is installed.
    """
    if requested:
        wanted = [PROVIDER_ALIASES.get(name.lower(), name) for name in requested]
        chosen = [name for name in wanted if name in available]
        missing = [name for name in wanted if name not in available]
        if missing:
            log.warning("execution providers not available here, skipped: %s", ", ".join(missing))
        if not chosen:
            raise ModelLoadError(
                f"none of the requested execution providers {wanted} is available; "
                f"this onnxruntime offers {list(available)}"
            )
    else:
        chosen = [name for name in PROVIDER_PREFERENCE if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _provider_options(name: str, options: SessionOptions) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        trt: dict[str, Any] = {"trt_fp16_enable": options.tensorrt_fp16}
        if options.tensorrt_cache_dir is not None:
            options.tensorrt_cache_dir.mkdir(parents=True, exist_ok=True)
            trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(options.tensorrt_cache_dir)}
        return trt
    return {}


def open_session(
    path: Path | str, options: SessionOptions | None = None
) -> tuple[ort.InferenceSession, ModelInfo]:
    """Open an ONNX model with the best execution provider available and read its metadata."""
    import onnxruntime as ort

    options = options or SessionOptions()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    if not options.allow_spinning:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = resolve_providers(options.providers, ort.get_available_providers())
    provider_specs = [(name, _provider_options(name, options)) for name in providers]
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options, providers=provider_specs)
    except Exception as error:  # onnxruntime raises several unrelated types for a bad file
        raise ModelLoadError(f"onnxruntime cannot load {path}: {error}") from error
    return session, describe_session(path, session)


def describe_session(path: Path, session: ort.InferenceSession) -> ModelInfo:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    outputs = session.get_outputs()
    return ModelInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=tuple(inputs[0].shape),
        input_type=inputs[0].type,
        output_names=tuple(o.name for o in outputs),
        output_shapes=tuple(tuple(o.shape) for o in outputs),
        metadata=dict(session.get_modelmeta().custom_metadata_map),
        providers=tuple(session.get_providers()),
    )


def parse_class_names(raw: str) -> list[str]:
    """Class names as exported by Ultralytics (a Python dict literal) or as a JSON list/dict."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"cannot parse class names metadata: {raw[:80]!r}") from error
    if isinstance(value, dict):
        return [str(value[key]) for key in sorted(value, key=int)]
    if isinstance(value, list | tuple):
        return [str(name) for name in value]
    raise ModelLoadError(f"class names metadata is neither a list nor a dict: {raw[:80]!r}")


def read_names_file(path: Path) -> list[str]:
    """Class names from a file: one per line, or a YAML data file with a `names` key."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        names = yaml.safe_load(text).get("names")
        if names is None:
            raise ModelLoadError(f"{path} has no 'names' key")
        return parse_class_names(repr(names))
    return [line.strip() for line in text.splitlines() if line.strip()]

"""Build faster variants of a YOLO detector and judge each by the pipeline devices run.

Variants of the source model (the first row, the baseline, named by its precision: `fp32` normally):

- `fp32-opt`: onnxruntime's offline graph optimization (constant folding, Conv+activation fusions) at the
  *extended* level, saved as a model file. The layout-specific (NCHWc) rewrites of the *all* level are left to
  the device's own session, so the file stays portable across CPUs; it uses onnxruntime contrib ops.
- `fp16`: weights and activations in float16 (onnxruntime.transformers.float16), fp32 input and output kept
  so it is a drop-in replacement. Pays off on GPUs; CPUs mostly compute it through casts.
- `int8-dynamic`: onnxruntime `quantize_dynamic` (uint8 weights, activations quantized at run time).
- `int8-static`: onnxruntime `quantize_static`, QDQ format, int8 per-channel weights, uint8 activations
  calibrated (99.999th percentile by default) on the data set's images, preprocessed exactly as the Detector
  does. The decode tail (every node after which no Conv follows: DFL reshape, box arithmetic, the final
  Concat) stays in float: it mixes box coordinates (0-640) and class scores (0-1) in one tensor, which one
  int8 scale cannot hold. So do the head's last Conv layers (box, class and DFL), which cost most accuracy.

Each variant is scored with `device_agent.evaluation.evaluate` (what `edgefleet eval` runs: conf 0.001,
IoU 0.7, COCO mAP) and timed as the median `session.run` over N runs on one preprocessed image, the variants
interleaved run by run so that load from other processes falls on all of them alike. A variant that fails to
build, load or run is reported with the reason and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.dataset import LabelledDataset, load_dataset
from device_agent.detector import Detector
from device_agent.evaluation import EVAL_PARAMS, evaluate, read_image
from fleet_protocol.onnx_model import SessionOptions
from fleet_protocol.signing import file_digest
from model_registry.validation import graph_precision

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("fp32-opt", "fp16", "int8-dynamic", "int8-static")
DEFAULT_CALIBRATION_IMAGES = 64
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")
# Clipping the top 0.001% of activation values: on COCO128 it kept YOLOv8n's static int8 mAP50-95 within
# ~0.012 of fp32 where plain min/max lost ~0.022 (64 calibration images, 64 held-out images).
CALIBRATION_PERCENTILE = 99.999
# Convs with at most this many Convs after them stay float in int8-static (-1: none, only the decode tail).
# YOLOv8n on COCO128, 64 calibration and 64 held-out images, mAP50-95 change and latency vs fp32 (loaded
# 2-core VM): -1: -0.012 at 0.51-0.53x; 1 (the last two Conv layers of each head branch and the DFL Conv):
# -0.007 at 0.76-0.79x; the whole Detect head float: -0.007 at 0.76x.
FLOAT_CONV_DEPTH = 1
DEFAULT_TIMING_RUNS = 30
WARMUP_RUNS = 3
# Progress: (stage, done, total); stage is "build", "evaluate <variant>" or "time".
Progress = Callable[[str, int, int], None]


class OptimizeError(ValueError):
    """The source model or the data set cannot be used at all (variants failing alone are not errors)."""


@dataclass
class VariantResult:
    """One row of the optimize table; `error` says why a variant has no figures."""

    variant: str
    path: Path | None = None
    precision: str = ""
    size: int | None = None
    map50_95: float | None = None
    map50: float | None = None
    latency_ms: float | None = None
    ratio: float | None = None
    build_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_ms is not None and self.map50_95 is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "path": str(self.path) if self.path else None,
            "precision": self.precision,
            "size": self.size,
            "map50_95": _round(self.map50_95, 5),
            "map50": _round(self.map50, 5),
            "latency_ms": _round(self.latency_ms, 3),
            "ratio": _round(self.ratio, 4),
            "build_s": round(self.build_s, 2),
            "error": self.error,
        }


@dataclass
class OptimizeReport:
    """The table, the settings that produced it, and the pick within the accuracy budget (if asked)."""

    source: Path
    source_sha256: str
    data: Path
    split: str
    images: int
    timing_runs: int
    providers: tuple[str, ...]
    rows: list[VariantResult]
    max_map_drop: float | None = None
    pick: str | None = None

    @property
    def baseline(self) -> VariantResult:
        return self.rows[0]

    def row(self, variant: str) -> VariantResult:
        for row in self.rows:
            if row.variant == variant:
                return row
        raise KeyError(variant)

    def tags(self, row: VariantResult) -> dict[str, str]:
        """The figures of a row as registry tags."""
        tags = {
            "optimized_from": self.source_sha256,
            "eval_data": self.data.name,
            "eval_split": self.split,
            "eval_images": str(self.images),
            "latency_runs": str(self.timing_runs),
            "latency_providers": ",".join(self.providers),
        }
        figures = {
            "map50_95": _round(row.map50_95, 5),
            "map50": _round(row.map50, 5),
            "latency_ms": _round(row.latency_ms, 3),
            "latency_ratio": _round(row.ratio, 4),
        }
        tags.update({key: str(value) for key, value in figures.items() if value is not None})
        return tags

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "source_sha256": self.source_sha256,
            "data": str(self.data),
            "split": self.split,
            "images": self.images,
            "timing_runs": self.timing_runs,
            "providers": list(self.providers),
            "max_map_drop": self.max_map_drop,
            "pick": self.pick,
            "rows": [row.to_dict() for row in self.rows],
        }


def pick_fastest(rows: Sequence[VariantResult], max_map_drop: float) -> str | None:
    """The fastest row whose mAP50-95 is at most `max_map_drop` below the baseline's (the first row)."""
    baseline = rows[0]
    if not baseline.ok or baseline.map50_95 is None:
        return None
    floor = baseline.map50_95 - max_map_drop
    within = [r for r in rows if r.ok and r.map50_95 is not None and r.map50_95 >= floor - 1e-12]
    return min(within, key=lambda r: r.latency_ms or float("inf")).variant if within else None


def optimize(
    source: Path,
    data: Path,
    out_dir: Path,
    *,
    limit: int | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_method: str = "percentile",
    float_conv_depth: int = FLOAT_CONV_DEPTH,
    timing_runs: int = DEFAULT_TIMING_RUNS,
    max_map_drop: float | None = None,
    variants: Sequence[str] = VARIANTS,
    session_options: SessionOptions | None = None,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Build, evaluate and time every variant of `source`; write the variant files into `out_dir`."""
    if calibration_method not in CALIBRATION_METHODS:
        raise OptimizeError(
            f"unknown calibration method {calibration_method!r}; use one of {CALIBRATION_METHODS}"
        )
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise OptimizeError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    report_progress: Progress = progress or (lambda stage, done, total: None)
    source = Path(source)
    dataset = _limited(load_dataset(data), limit)
    try:
        reference = Detector(source, session_options=session_options, warmup=False)
    except Exception as error:  # ModelLoadError or a malformed file: the source itself is unusable
        raise OptimizeError(f"cannot load the source model {source}: {error}") from error
    out_dir.mkdir(parents=True, exist_ok=True)
    source_sha, source_size = file_digest(source)
    # The source is the baseline row, named by its precision ("fp32" for the usual export).
    source_precision = _precision(source)
    rows = [VariantResult(source_precision, source, source_precision, source_size)]
    builders = _builders(reference, dataset, calibration_images, calibration_method, float_conv_depth)
    for done, variant in enumerate(variants):
        report_progress("build", done, len(variants))
        rows.append(_build(variant, builders[variant], source, out_dir, source_sha))
    report_progress("build", len(variants), len(variants))

    detectors = _load(rows, session_options)
    for row in rows:
        if row.variant in detectors:
            _evaluate(row, detectors, dataset, report_progress)
    _time(rows, detectors, read_image(dataset.images[0].path), timing_runs, report_progress)
    baseline_ms = rows[0].latency_ms
    for row in rows:
        if row.latency_ms is not None and baseline_ms:
            row.ratio = row.latency_ms / baseline_ms
    report = OptimizeReport(
        source=source,
        source_sha256=source_sha,
        data=Path(data),
        split=dataset.split,
        images=len(dataset.images),
        timing_runs=timing_runs,
        providers=reference.providers,
        rows=rows,
        max_map_drop=max_map_drop,
    )
    if max_map_drop is not None:
        report.pick = pick_fastest(rows, max_map_drop)
    return report


def _limited(dataset: LabelledDataset, limit: int | None) -> LabelledDataset:
    if limit is not None:
        if limit < 1:
            raise OptimizeError(f"--limit must be at least 1, got {limit}")
        dataset = dataclasses.replace(dataset, images=dataset.images[:limit])
    return dataset


def _precision(path: Path) -> str:
    import onnx

    return graph_precision(onnx.load(str(path), load_external_data=False))


Builder = Callable[[Path, Path], None]


def _builders(
    reference: Detector,
    dataset: LabelledDataset,
    calibration_images: int,
    calibration_method: str,
    float_conv_depth: int,
) -> dict[str, Builder]:
    return {
        "fp32-opt": build_graph_optimized,
        "fp16": build_fp16,
        "int8-dynamic": build_int8_dynamic,
        "int8-static": lambda src, dst: build_int8_static(
            src,
            dst,
            calibration_tensors(reference, dataset, calibration_images),
            calibration_method,
            float_conv_depth,
        ),
    }


def _build(variant: str, builder: Builder, source: Path, out_dir: Path, source_sha: str) -> VariantResult:
    target = out_dir / f"{source.stem}-{variant}.onnx"
    started = time.perf_counter()
    try:
        builder(source, target)
        stamp_metadata(target, variant, source_sha)
    except Exception as error:  # each quantizer/converter fails its own way; the row says how
        log.warning("variant %s could not be built: %s", variant, error)
        target.unlink(missing_ok=True)
        return VariantResult(
            variant, error=f"build failed: {_short(error)}", build_s=time.perf_counter() - started
        )
    return VariantResult(
        variant,
        path=target,
        precision=_precision(target),
        size=target.stat().st_size,
        build_s=time.perf_counter() - started,
    )


def _load(rows: list[VariantResult], options: SessionOptions | None) -> dict[str, Detector]:
    detectors: dict[str, Detector] = {}
    for row in rows:
        if row.error is not None or row.path is None:
            continue
        try:
            detectors[row.variant] = Detector(row.path, session_options=options, warmup=True)
        except Exception as error:  # the variant built but onnxruntime cannot load or run it here
            row.error = f"does not load: {_short(error)}"
    return detectors


def _evaluate(
    row: VariantResult, detectors: dict[str, Detector], dataset: LabelledDataset, progress: Progress
) -> None:
    stage = f"evaluate {row.variant}"
    try:
        report = evaluate(
            detectors[row.variant],
            dataset,
            EVAL_PARAMS,
            on_image=lambda done, total: progress(stage, done, total),
        )
    except Exception as error:  # a variant that fails at run time must not end the comparison
        row.error = f"evaluation failed: {_short(error)}"
        del detectors[row.variant]
        return
    row.map50_95 = report.metrics.map50_95
    row.map50 = report.metrics.map50


def _time(
    rows: list[VariantResult], detectors: dict[str, Detector], image: Any, runs: int, progress: Progress
) -> None:
    """Median inference time per variant; variants take turns run by run so drift hits all alike."""
    tensors = {variant: detector.preprocess(image)[0] for variant, detector in detectors.items()}
    samples: dict[str, list[float]] = {variant: [] for variant in detectors}
    failed: dict[str, str] = {}
    for variant, detector in detectors.items():
        try:
            for _ in range(WARMUP_RUNS):
                detector.infer(tensors[variant])
        except Exception as error:  # one bad variant must not stop the others
            failed[variant] = _short(error)
    for done in range(runs):
        progress("time", done, runs)
        for variant, detector in detectors.items():
            if variant in failed:
                continue
            started = time.perf_counter()
            detector.infer(tensors[variant])
            samples[variant].append((time.perf_counter() - started) * 1e3)
    progress("time", runs, runs)
    for row in rows:
        if row.variant in failed:
            row.error = f"inference failed: {failed[row.variant]}"
        elif samples.get(row.variant):
            row.latency_ms = statistics.median(samples[row.variant])


# -- the builders ------------------------------------------------------------------------------------------


def build_graph_optimized(source: Path, target: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    if not target.is_file():
        raise RuntimeError("onnxruntime wrote no optimized model")


def build_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    # The converter appends the input Cast after the nodes that read it; the ONNX checker wants them sorted.
    topological_sort(model.graph)
    onnx.save(model, str(target))


def build_int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as scratch:
        prepared = prepare_for_quantization(source, Path(scratch))
        # uint8 weights: onnxruntime's CPU ConvInteger kernel takes no int8 weights.
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QUInt8)


def prepare_for_quantization(source: Path, folder: Path) -> Path:
    """Shape inference and basic folding first, as onnxruntime recommends; static shapes need no sympy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return prepared


def calibration_tensors(reference: Detector, dataset: LabelledDataset, count: int) -> list[Any]:
    """Input tensors of the first `count` images, letterboxed and scaled exactly as the Detector does."""
    if count < 1:
        raise OptimizeError(f"calibration needs at least 1 image, got {count}")
    return [reference.preprocess(read_image(image.path))[0] for image in dataset.images[:count]]


def build_int8_static(
    source: Path,
    target: Path,
    tensors: Sequence[Any],
    calibration_method: str = "percentile",
    float_conv_depth: int = FLOAT_CONV_DEPTH,
) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as scratch:
        prepared = prepare_for_quantization(source, Path(scratch))
        model = onnx.load(str(prepared))
        input_name = model.graph.input[0].name
        excluded = float_head_nodes(model.graph, float_conv_depth)
        methods = {
            "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
        }

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._feeds = iter(tensors)

            def get_next(self) -> dict[str, Any] | None:
                tensor = next(self._feeds, None)
                return None if tensor is None else {input_name: tensor}

        # The calibrators print their progress; keep the CLI's stdout for the table.
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=methods[calibration_method],
                nodes_to_exclude=excluded,
                extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            )
        log.debug("quantize_static: %s", chatter.getvalue().strip())


def float_head_nodes(graph: Any, conv_depth: int = FLOAT_CONV_DEPTH) -> list[str]:
    """Names of the nodes int8-static leaves in float: the decode tail and the head's last Conv layers.

    The tail is every non-Conv node with no Conv after it (DFL reshapes, box arithmetic, the output Concat);
    the last Conv layers are those with at most `conv_depth` Convs on any path after them (YOLOv8 with 1: the
    last two Conv layers of each class branch, the last of each box branch, and the DFL Conv).
    """
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    convs_after = [0] * len(graph.node)
    # ONNX graphs are topologically sorted, so walking backwards sees every consumer before its producer.
    for index in range(len(graph.node) - 1, -1, -1):
        convs_after[index] = max(
            (
                convs_after[c] + (graph.node[c].op_type == "Conv")
                for output in graph.node[index].output
                for c in consumers.get(output, ())
            ),
            default=0,
        )
    return [
        node.name or f"node{index}"
        for index, node in enumerate(graph.node)
        if convs_after[index] <= (conv_depth if node.op_type == "Conv" else 0)
    ]


def topological_sort(graph: Any) -> None:
    """Reorder a graph's nodes so each comes after the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"the graph has a cycle or dangling inputs at {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def stamp_metadata(path: Path, variant: str, source_sha256: str) -> None:
    """Record in the file which variant it is and what it was built from; refresh its `precision`."""
    import onnx

    model = onnx.load(str(path))
    values = {
        "precision": graph_precision(model),
        "edgefleet_variant": variant,
        "edgefleet_source_sha256": source_sha256,
    }
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {**dict(kept), **values})
    onnx.save(model, str(path))


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]

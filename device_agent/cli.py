"""Command-line entry points of the device agent: `edgefleet detect`, `eval` and `agent ...`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import cv2
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from device_agent.detector import DetectionResult, Detector, DetectParams

if TYPE_CHECKING:
    from device_agent.evaluation import EvalReport
from fleet_protocol.onnx_model import ModelLoadError, SessionOptions

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

agent_app = typer.Typer(help="Run the device agent and its local HTTP API.", no_args_is_help=True)
stderr = Console(stderr=True, soft_wrap=True)  # never break paths across lines

ModelOption = Annotated[Path, typer.Option("--model", "-m", help="YOLOv8/YOLO11-layout ONNX detector.")]
ProvidersOption = Annotated[
    str | None,
    typer.Option(
        help="Execution providers to use, comma-separated (e.g. cuda,cpu); default: best available."
    ),
]
ThreadsOption = Annotated[int, typer.Option(help="onnxruntime intra-op threads (0 = onnxruntime's default).")]
NamesOption = Annotated[
    Path | None,
    typer.Option("--names", help="Class names for a model without them: one per line, or a data YAML."),
]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _load_detector(
    model: Path, providers: str | None, threads: int, params: DetectParams, names: Path | None = None
) -> Detector:
    options = SessionOptions(
        providers=[p.strip() for p in providers.split(",") if p.strip()] if providers else None,
        intra_op_threads=threads,
    )
    if names is not None and not names.is_file():
        raise CliError(f"--names: file not found: {names}")
    try:
        return Detector(model, params=params, session_options=options, names_file=names)
    except ModelLoadError as error:
        raise CliError(f"{error}\nGet a YOLOv8 ONNX model as described in models/README.md.") from error


def _expand_inputs(inputs: list[Path]) -> Iterator[Path]:
    """Files as given; directories expand to their images, sorted by name."""
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            yield path


def read_image_file(path: Path) -> np.ndarray:
    """Decode an image file into BGR; raises ValueError saying why it cannot be read."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
    if data.size == 0:
        raise ValueError(f"{path} is empty")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path} is not a decodable image (JPEG, PNG, BMP or WebP)")
    return image


def _result_json(image: str, result: DetectionResult) -> str:
    return json.dumps(
        {
            "image": image,
            "width": result.width,
            "height": result.height,
            "detections": [d.to_dict() for d in result.detections],
            "timing_ms": result.timing.to_dict(),
        }
    )


def _print_table(console: Console, image: str, result: DetectionResult) -> None:
    timing = result.timing
    table = Table(
        title=f"{image}  {result.width}x{result.height}  "
        f"pre {timing.pre_ms:.1f} ms · infer {timing.infer_ms:.1f} ms · post {timing.post_ms:.1f} ms",
        title_justify="left",
    )
    for column in ("class", "label", "conf", "x1", "y1", "x2", "y2"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for det in result.detections:
        table.add_row(str(det.class_id), det.label, f"{det.confidence:.3f}", *(f"{v:.0f}" for v in det.bbox))
    if not result.detections:
        table.add_row("", "(nothing detected)", "", "", "", "", "")
    console.print(table)


def _save_path(save_dir: Path, source: Path, taken: set[Path]) -> Path:
    candidate = save_dir / f"{source.stem}.jpg"
    counter = 1
    while candidate in taken:
        candidate = save_dir / f"{source.stem}_{counter}.jpg"
        counter += 1
    taken.add(candidate)
    return candidate


def detect_command(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or directories of images.")],
    model: ModelOption,
    conf: Annotated[float, typer.Option(min=0.0, max=1.0, help="Confidence threshold.")] = 0.25,
    iou: Annotated[float, typer.Option(min=0.0, max=1.0, help="NMS IoU threshold.")] = 0.45,
    max_det: Annotated[int, typer.Option(min=1, help="Most detections kept per image.")] = 300,
    classes: Annotated[
        str | None, typer.Option(help="Keep only these classes: names or ids, comma-separated.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="table (for people) or jsonl (one JSON object per image).")
    ] = "table",
    save: Annotated[Path | None, typer.Option(help="Write annotated JPEGs into this directory.")] = None,
    names: NamesOption = None,
    providers: ProvidersOption = None,
    threads: ThreadsOption = 0,
) -> None:
    """Detect objects in images and print the boxes."""
    if output_format not in {"table", "jsonl"}:
        raise typer.BadParameter("must be 'table' or 'jsonl'", param_hint="--format")
    try:
        detector = _load_detector(model, providers, threads, DetectParams(conf, iou, max_det), names)
        params = _with_classes(detector, classes)
        failures = _detect(detector, inputs, params, output_format, save)
    except CliError as error:
        stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    if failures:
        stderr.print(f"[red]{failures} image(s) could not be read[/red] (see above)")
        raise typer.Exit(1)


def _with_classes(detector: Detector, classes: str | None) -> DetectParams:
    if not classes:
        return detector.params
    try:
        ids = detector.class_ids(classes.split(","))
    except ValueError as error:
        raise CliError(f"--classes: {error}") from error
    return DetectParams(detector.params.conf, detector.params.iou, detector.params.max_det, ids)


def _detect(
    detector: Detector, inputs: list[Path], params: DetectParams, output_format: str, save: Path | None
) -> int:
    if save is not None:
        from device_agent.imaging import annotate

        save.mkdir(parents=True, exist_ok=True)
    stdout = Console(soft_wrap=True)
    failures = 0
    saved: set[Path] = set()
    for path in _expand_inputs(inputs):
        try:
            image = read_image_file(path)
        except ValueError as error:
            stderr.print(f"[red]skipped:[/red] {error}")
            failures += 1
            continue
        result = detector.run(image, params)
        if output_format == "jsonl":
            sys.stdout.write(_result_json(str(path), result) + "\n")
            sys.stdout.flush()
        else:
            _print_table(stdout, str(path), result)
        if save is not None:
            cv2.imwrite(str(_save_path(save, path, saved)), annotate(image, result.detections))
    return failures


def eval_command(
    model: ModelOption,
    data: Annotated[Path, typer.Option("--data", help="YOLO-format data YAML (e.g. coco128.yaml).")],
    conf: Annotated[float, typer.Option(min=0.0, max=1.0, help="Confidence threshold.")] = 0.001,
    iou: Annotated[float, typer.Option(min=0.0, max=1.0, help="NMS IoU threshold.")] = 0.7,
    max_det: Annotated[int, typer.Option(min=1, help="Most detections kept per image.")] = 300,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report as JSON here.")
    ] = None,
    names: NamesOption = None,
    providers: ProvidersOption = None,
    threads: ThreadsOption = 0,
) -> None:
    """Measure COCO-style mAP50 and mAP50-95 of a detector on a YOLO-format labelled set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from device_agent.dataset import DatasetError, load_dataset
    from device_agent.evaluation import evaluate

    params = DetectParams(conf, iou, max_det)
    try:
        dataset = load_dataset(data)
        detector = _load_detector(model, providers, threads, params, names)
    except (CliError, DatasetError) as error:
        stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("eval", total=len(dataset.images))
        report = evaluate(
            detector, dataset, params, on_image=lambda done, total: progress.update(task, completed=done)
        )
    Console().print(_eval_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _eval_table(report: EvalReport) -> Table:
    metrics = report.metrics
    table = Table(
        title=f"{report.model.name} on {report.data.name} ({report.split}): {metrics.images} images, "
        f"{int(metrics.instances.sum())} boxes, {report.wall_s:.1f} s",
        title_justify="left",
    )
    for column in ("class", "boxes", "AP50", "AP50-95"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for ap in metrics.per_class:
        if ap.instances:
            table.add_row(ap.name, str(ap.instances), f"{ap.ap50:.3f}", f"{ap.ap50_95:.3f}")
    table.add_section()
    table.add_row(
        "all",
        str(int(metrics.instances.sum())),
        f"{metrics.map50:.4f}",
        f"{metrics.map50_95:.4f}",
        style="bold",
    )
    return table


@agent_app.command("api")
def api_command(
    model: ModelOption,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Inference workers (threads) sharing the model.")] = 2,
    queue_size: Annotated[
        int, typer.Option(min=0, help="Requests that may wait for a worker before 503.")
    ] = 8,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest accepted upload, in MB.")] = 20.0,
    names: NamesOption = None,
    providers: ProvidersOption = None,
    threads: ThreadsOption = 0,
) -> None:
    """Serve the local HTTP API (POST /v1/detect, /healthz, /readyz, /metrics) for one model."""
    from device_agent.api import ApiSettings, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        detector = _load_detector(model, providers, threads, DetectParams(), names)
    except CliError as error:
        stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    settings = ApiSettings(
        workers=workers, queue_size=queue_size, max_upload_bytes=int(max_upload_mb * 1_000_000)
    )
    serve(detector, settings, host=host, port=port)


@agent_app.command("run")
def run_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Agent YAML file; EDGEFLEET_AGENT_* env vars add to it."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the device agent: detect on every source, keep results in the outbox, publish them over MQTT."""
    import signal

    from device_agent.agent import Agent
    from device_agent.config import ConfigError, load_settings
    from device_agent.outbox import OutboxFileError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(load_settings(config))
    except (ConfigError, ModelLoadError, OutboxFileError, ValueError) as error:
        stderr.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()

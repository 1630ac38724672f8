"""`edgefleet refiner ...`: serve (MQTT consumer + HTTP API), classify crops, measure the conditioning."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cloud_refiner.config import ConfigError, RefinerSettings, load_settings
from fleet_protocol.onnx_model import ModelLoadError

refiner_app = typer.Typer(
    help="The cloud refiner: finer labels for edge crops (dog -> golden retriever).", no_args_is_help=True
)
stderr = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Refiner YAML file; EDGEFLEET_REFINER_* env vars add to it."),
]
ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="ONNX classifier (overrides classifier.path).")
]
LogLevelOption = Annotated[str, typer.Option(help="debug, info, warning or error.")]


def _fail(message: str) -> typer.Exit:
    stderr.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(2)


def _settings(config: Path | None, model: Path | None = None) -> RefinerSettings:
    try:
        settings = load_settings(config)
        if model is not None:
            classifier = settings.classifier.model_copy(update={"path": model})
            settings = settings.model_copy(update={"classifier": classifier})
        return settings
    except ConfigError as error:
        raise _fail(str(error)) from None


def _load_error_hint(error: Exception) -> str:
    return f"{error}\nSee docs/refiner.md for the models and their settings."


@refiner_app.command("serve")
def serve_command(config: ConfigOption = None, log_level: LogLevelOption = "info") -> None:
    """Run a refiner: consume crops over MQTT (shared subscription), serve the HTTP API, log to MLflow."""
    from cloud_refiner.conditioning import MappingError
    from cloud_refiner.runtime import RefinerRuntime

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(config)
    try:
        runtime = RefinerRuntime(settings)
    except (ModelLoadError, MappingError) as error:
        raise _fail(_load_error_hint(error)) from None
    # Our own handlers: uvicorn restores the previous handlers and re-raises the signal after its shutdown,
    # which then only ends the wait below instead of killing the process before the graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: runtime.request_stop())
    signal.signal(signal.SIGINT, lambda *_: runtime.request_stop())
    runtime.start()
    info = runtime.service.info
    logging.getLogger("cloud_refiner").info(
        "refiner %s ready: %s %s (%s), mqtt %s, http %s",
        settings.instance_id,
        info.name,
        info.version,
        ",".join(info.providers),
        runtime.consumer.topic_filter if runtime.consumer else "off",
        f"{settings.api.host}:{settings.api.port}" if settings.api.enabled else "off",
    )
    try:
        if settings.api.enabled:
            runtime.serve_http(log_level=log_level)
        else:
            runtime.wait()
    finally:
        runtime.stop()


@refiner_app.command("classify")
def classify_command(
    images: Annotated[list[Path], typer.Argument(help="Crop images (JPEG, PNG, WebP).")],
    label: Annotated[str | None, typer.Option(help="Edge label of every crop, e.g. dog.")] = None,
    config: ConfigOption = None,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
) -> None:
    """Refine crop images locally, without MQTT: what a device would get back."""
    from cloud_refiner.conditioning import MappingError
    from cloud_refiner.runtime import build_service
    from cloud_refiner.service import CropRejectedError

    settings = _settings(config, model)
    try:
        service = build_service(settings).start()
    except (ModelLoadError, MappingError) as error:
        raise _fail(_load_error_hint(error)) from None
    failed = False
    try:
        for path in images:
            try:
                refinement = service.refine_now(path.read_bytes(), label)
            except OSError as error:
                stderr.print(f"{path}: cannot read: {error}")
                failed = True
                continue
            except CropRejectedError as error:
                stderr.print(f"{path}: {error}")
                failed = True
                continue
            top = [{"label": s.label, "score": round(s.score, 4)} for s in refinement.top_k]
            if as_json:
                record: dict[str, Any] = {
                    "image": str(path),
                    "edge_label": label,
                    "label": refinement.label,
                    "score": round(refinement.score, 4),
                    "conditioned": refinement.conditioned,
                    "top_k": top,
                }
                typer.echo(json.dumps(record))
            else:
                how = "conditioned" if refinement.conditioned else "unconditioned"
                others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in top)
                stdout.print(
                    f"{path}: [bold]{refinement.label}[/bold] {refinement.score:.3f} ({how}); top: {others}"
                )
    finally:
        service.stop()
    if failed:
        raise typer.Exit(1)


@refiner_app.command("eval")
def eval_command(
    data: Annotated[
        Path, typer.Option(help="YOLO data YAML whose ground-truth boxes give the crops.")
    ] = Path("../shared/data/coco128/coco128.yaml"),
    config: ConfigOption = None,
    model: ModelOption = None,
    split: Annotated[str, typer.Option(help="Split of the data YAML.")] = "val",
    min_side: Annotated[int, typer.Option(min=1, help="Smallest box side kept, pixels.")] = 48,
    pad: Annotated[float, typer.Option(min=0.0, max=1.0, help="Padding around each box, fraction.")] = 0.10,
    detector_url: Annotated[
        str | None,
        typer.Option(
            help="A device agent's HTTP API (e.g. http://127.0.0.1:8080 from `edgefleet agent api -m "
            "yolov8n_int8.onnx`): its detections give the edge labels. Without it the true class is the "
            "edge label (the upper bound)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Unconditioned vs class-conditioned top-1 on ground-truth crops (in the right ImageNet subset)."""
    from cloud_refiner.classifier import Classifier
    from cloud_refiner.conditioning import Conditioner, LabelSubsets, MappingError
    from cloud_refiner.evaluation import (
        DatasetError,
        EdgeDetection,
        classify_crops,
        conditioning_report,
        detect_over_http,
        ground_truth_crops,
        match_edge_labels,
    )

    settings = _settings(config, model)
    try:
        classifier = Classifier.from_config(settings.classifier)
        subsets = LabelSubsets.load(settings.conditioning.mapping_file, num_classes=len(classifier.names))
        crops = ground_truth_crops(data, subsets, min_side=min_side, pad=pad, split=split)
    except (ModelLoadError, MappingError, DatasetError) as error:
        raise _fail(_load_error_hint(error)) from None
    labels = None
    conditioner = Conditioner(classifier.names, subsets, settings.classifier.top_k)
    with Progress(console=stderr, transient=True) as progress:
        if detector_url is not None:
            images = sorted({c.image for c in crops})
            task = progress.add_task(f"detecting in {len(images)} images", total=len(images))
            detections: dict[Path, list[EdgeDetection]] = {}
            for image in images:
                try:
                    detections[image] = detect_over_http(detector_url, image)
                except (OSError, ValueError, KeyError) as error:
                    raise _fail(f"--detector-url {detector_url}: {image.name}: {error}") from None
                progress.advance(task)
            labels = match_edge_labels(crops, detections)
        task = progress.add_task(f"classifying {len(crops)} crops", total=len(crops))
        probs = classify_crops(classifier, crops, progress=lambda n: progress.advance(task, n))
    report = conditioning_report(probs, crops, conditioner, subsets, labels)
    info = classifier.info
    if as_json:
        typer.echo(json.dumps({"model": info.name, "version": info.version, **report.as_dict()}))
        return
    table = Table(title=f"{info.name} {info.version} on {report.crops} crops of {report.classes} classes")
    table.add_column("top-1 in the true class's ImageNet subset")
    table.add_column("hit rate", justify="right")
    table.add_row("unconditioned", f"{report.unconditioned_top1:.3f}")
    table.add_row("unconditioned, top-5 contains", f"{report.unconditioned_top5:.3f}")
    source = "edge detector's labels" if labels is not None else "true class as edge label (upper bound)"
    table.add_row(f"conditioned on the {source}", f"{report.conditioned_top1:.3f}")
    if labels is not None:
        table.caption = (
            f"edge labels: {report.edge_labelled} crops detected (IoU >= 0.5), "
            f"{report.edge_label_correct} of them with the true class; the rest answered unconditioned"
        )
    stdout.print(table)

"""Field tracking into a real MLflow store, on SQLite and PostgreSQL: devices on two registered versions of a
model publish telemetry, the real detectors' detections and crops over MQTT; the fleet manager logs one run
per version with per-device latency and detection counts over time, and sample crops; after a restart it
goes on in the same runs without logging a bucket twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from device_agent.detector import DetectionResult, Detector
from device_agent.imaging import encode_jpeg
from fleet_manager.field_tracking import model_at, percentile
from fleet_manager.service import FleetService
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import MessageProperties, MqttSession
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    DetectionItem,
    ModelRef,
    StageTimingMs,
    encode,
)
from fleet_protocol.topics import Topics
from tests.broker import MosquittoBroker
from tests.fleet_manager.conftest import RegisteredModels, topics_of, wait_until
from tests.fleet_manager.fleet_sim import SimDevice, SimFleet

FRAMES = 6
FRAMES_AFTER_RESTART = 3


def publish_frame(
    session: MqttSession, topics: Topics, device_id: str, model: ModelRef, result: DetectionResult, image: Any
) -> None:
    """One detection event from a real detector's result, and the crop of its first object."""
    items = [
        DetectionItem(
            det_id=new_det_id(), class_id=d.class_id, label=d.label, confidence=d.confidence, bbox=d.bbox
        )
        for d in result.detections
    ]
    timing = result.timing
    event = DetectionEvent(
        device_id=device_id,
        source="cam0",
        frame_seq=0,
        model=model,
        width=result.width,
        height=result.height,
        timing_ms=StageTimingMs(pre=timing.pre_ms, infer=timing.infer_ms, post=timing.post_ms),
        detections=items,
    )
    session.publish(topics.detections(device_id), encode(event)).wait(5)
    first = items[0]
    x1, y1, x2, y2 = (round(v) for v in first.bbox)
    meta = CropMeta(
        device_id=device_id,
        det_id=first.det_id,
        label=first.label,
        class_id=first.class_id,
        confidence=first.confidence,
        bbox=first.bbox,
        model=model,
    )
    props = MessageProperties(content_type="image/jpeg", user_properties=tuple(meta.to_user_properties()))
    session.publish(topics.crops(device_id), encode_jpeg(image[y1:y2, x1:x2]), properties=props).wait(5)


def field_runs(client: MlflowClient, prefix: str, name: str) -> dict[str, Run]:
    experiment = client.get_experiment_by_name(f"{prefix}{name}")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], "tags.`edgefleet.component` = 'field'")
    by_version: dict[str, Run] = {}
    for run in runs:
        version = run.data.tags["edgefleet.model_version"]
        assert version not in by_version, f"two field runs for version {version}"
        by_version[version] = run
    return by_version


def history(client: MlflowClient, run: Run, key: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run.info.run_id, key)]


def total(client: MlflowClient, prefix: str, name: str, version: str, key: str) -> float:
    run = field_runs(client, prefix, name).get(version)
    return sum(history(client, run, key)) if run is not None else -1.0


def test_field_runs_per_model_version(
    mqtt_broker: MosquittoBroker,
    make_service: Callable[..., FleetService],
    fleet_models: RegisteredModels,
    int8_detector: Detector,
    fp32_detector: Detector,
    bus_jpg: Path,
    tmp_path: Path,
) -> None:
    prefix = f"field-{uuid.uuid4().hex[:8]}/"
    overrides: dict[str, Any] = {
        "registry": fleet_models.overrides,  # the field runs go where the registry is, by default
        "field_tracking": {"enabled": True, "experiment_prefix": prefix, "interval_s": 1.0, "settle_s": 1.0},
    }
    name = fleet_models.name
    v1 = ModelRef(name=name, version=fleet_models.v1.version)
    v2 = ModelRef(name=name, version=fleet_models.v2.version)
    image = cv2.imread(str(bus_jpg))
    assert image is not None
    results = {v1.version: int8_detector.run(image), v2.version: fp32_detector.run(image)}
    assert all(r.detections for r in results.values()), "the detectors found nothing on bus.jpg"
    client = MlflowClient(tracking_uri=fleet_models.settings.tracking_uri)

    service = make_service(mqtt_broker, **overrides)
    topics = topics_of(service)
    devices = [
        SimDevice("cam-a", v1, latency_ms=20.0),
        SimDevice("cam-b", v1, latency_ms=24.0),  # telemetry only: counted for the model its status names
        SimDevice("cam-c", v2, latency_ms=35.0),
    ]
    with SimFleet(mqtt_broker, topics, devices, telemetry_s=0.2) as sim:
        for _ in range(FRAMES):
            publish_frame(sim.session, topics, "cam-a", v1, results[v1.version], image)
            publish_frame(sim.session, topics, "cam-c", v2, results[v2.version], image)
            sim._stop.wait(0.25)  # spread the frames over several buckets

        def all_logged() -> bool:
            runs = field_runs(client, prefix, name)
            return (
                total(client, prefix, name, v1.version, "fleet.frames") == FRAMES
                and total(client, prefix, name, v2.version, "fleet.frames") == FRAMES
                and bool(history(client, runs[v1.version], "latency_p95_ms.cam-b"))
            )

        wait_until(all_logged, 60, "every frame and cam-b's latency to reach MLflow")

    runs = field_runs(client, prefix, name)
    assert set(runs) == {v1.version, v2.version}
    run1, run2 = runs[v1.version], runs[v2.version]
    assert run1.data.tags["edgefleet.model_name"] == name
    assert run1.data.params["model_version"] == v1.version
    assert run1.data.params["variant"] == "int8"
    assert run2.data.params["variant"] == "fp32"

    # Linked both ways with the registered versions.
    for version, run in runs.items():
        registered = client.get_model_version(name, version)
        assert run.data.tags["edgefleet.registry.run_id"] == registered.run_id
        assert registered.tags["edgefleet.field_run_id"] == run.info.run_id

    # Latency from telemetry, per device and attributed to the version the device runs.
    assert set(history(client, run1, "latency_p95_ms.cam-a")) == {20.0}
    assert set(history(client, run1, "latency_p50_ms.cam-a")) == {16.0}
    assert set(history(client, run1, "latency_p95_ms.cam-b")) == {24.0}
    assert set(history(client, run2, "latency_p95_ms.cam-c")) == {35.0}
    assert not any(key.endswith(".cam-c") for key in run1.data.metrics)
    assert not any(key.endswith((".cam-a", ".cam-b")) for key in run2.data.metrics)
    assert all(20.0 <= v <= 24.0 for v in history(client, run1, "fleet.latency_p95_ms"))
    assert max(history(client, run1, "fleet.devices")) == 2

    # Detection counts per device, per label, and the frames' own timings, from the real detectors.
    for version, run, device in ((v1.version, run1, "cam-a"), (v2.version, run2, "cam-c")):
        result = results[version]
        assert sum(history(client, run, f"detections.{device}")) == FRAMES * len(result.detections)
        buses = sum(d.label == "bus" for d in result.detections)
        assert sum(history(client, run, "detections_by_label.bus")) == FRAMES * buses
        infer = history(client, run, f"infer_ms_mean.{device}")
        assert infer == pytest.approx([result.timing.infer_ms] * len(infer))
    assert sum(history(client, run1, "frames.cam-b")) == 0

    # One point per bucket: consecutive steps, bucket ends (whole seconds) as timestamps.
    points = client.get_metric_history(run1.info.run_id, "fleet.devices")
    assert [p.step for p in points] == list(range(len(points)))
    stamps = [p.timestamp for p in points]
    assert stamps == sorted(set(stamps))
    assert all(t % 1000 == 0 for t in stamps)

    check_artifacts(client, run2, results[v2.version], tmp_path)
    service.stop()
    assert {client.get_run(r.info.run_id).info.status for r in runs.values()} == {"FINISHED"}

    # A restart goes on in the same runs, from the bucket after the last one logged.
    restarted = make_service(mqtt_broker, **overrides)
    with SimFleet(mqtt_broker, topics_of(restarted), [SimDevice("cam-a", v1, latency_ms=40.0)]) as sim:
        for _ in range(FRAMES_AFTER_RESTART):
            publish_frame(sim.session, topics_of(restarted), "cam-a", v1, results[v1.version], image)
        expected = FRAMES + FRAMES_AFTER_RESTART

        def resumed() -> bool:
            # A bucket may hold samples from before and after the restart: its median lies between.
            latencies = history(client, run1, "latency_p95_ms.cam-a")
            return total(client, prefix, name, v1.version, "fleet.frames") == expected and max(latencies) > 20

        wait_until(resumed, 60, "the frames and telemetry sent after the restart to reach the same run")
    run1_again = field_runs(client, prefix, name)[v1.version]
    assert run1_again.info.run_id == run1.info.run_id
    assert run1_again.info.status == "RUNNING"
    points = client.get_metric_history(run1.info.run_id, "fleet.devices")
    assert [p.step for p in points] == list(range(len(points)))
    stamps = [p.timestamp for p in points]
    assert stamps == sorted(set(stamps)), "a bucket was logged twice"


def check_artifacts(client: MlflowClient, run: Run, result: DetectionResult, folder: Path) -> None:
    """Sample crops (real JPEGs of the boxes they claim), detection events as JSON, the latest bucket."""
    run_id = run.info.run_id
    buckets = client.list_artifacts(run_id, "samples")
    assert buckets, "no sample crops were logged"
    local = Path(client.download_artifacts(run_id, buckets[0].path, str(folder)))
    index = json.loads((local / "index.json").read_text())["crops"]
    assert index
    first = result.detections[0]
    for entry in index:
        assert (entry["device_id"], entry["label"]) == ("cam-c", first.label)
        crop = cv2.imdecode(np.frombuffer((local / entry["file"]).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        x1, y1, x2, y2 = (round(v) for v in entry["bbox"])
        assert crop is not None
        assert crop.shape[:2] == (y2 - y1, x2 - x1)

    events_files = client.list_artifacts(run_id, "detections")
    assert events_files
    events = json.loads(
        Path(client.download_artifacts(run_id, events_files[0].path, str(folder))).read_text()
    )
    labels = sorted(d.label for d in result.detections)
    for event in events["events"]:
        assert event["device_id"] == "cam-c"
        assert sorted(d["label"] for d in event["detections"]) == labels

    latest = json.loads(
        Path(client.download_artifacts(run_id, "latest_bucket.json", str(folder))).read_text()
    )
    tags = run.data.tags
    assert latest["model"] == {
        "name": tags["edgefleet.model_name"],
        "version": tags["edgefleet.model_version"],
    }
    assert set(latest["devices"]) <= {"cam-c"}


def test_telemetry_goes_to_the_model_running_at_the_time() -> None:
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    old, new, current = ("m", "1"), ("m", "2"), ("m", "3")
    evidence = [(t0, old), (t0 + timedelta(seconds=10), old), (t0 + timedelta(seconds=20), new)]
    assert model_at(evidence, t0 - timedelta(seconds=5), current) == old  # before any: the first seen
    assert model_at(evidence, t0 + timedelta(seconds=15), current) == old
    assert model_at(evidence, t0 + timedelta(seconds=20), current) == new
    assert model_at([], t0, current) == current
    assert model_at([], t0, None) is None
    assert percentile([10.0, 20.0, 30.0, 40.0], 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0

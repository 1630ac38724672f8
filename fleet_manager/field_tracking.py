"""Field tracking: how each model version performs on the devices that run it, as one MLflow run per version.

The core (`collect_bucket`, `sample_crops`, `recent_detections`; no MLflow) reads one time bucket of what
ingest stored and groups it by (model name, version), then by device:

- latency p50/p95 and fps from the telemetry history (`telemetry_samples`): per device the median of the
  bucket's samples (each sample already holds the device's own percentiles over its telemetry interval);
- frames published and objects detected, and the mean per-frame stage times, from `detections`.

Telemetry carries no model. A sample counts for the model the device ran at that moment, as the bucket
itself shows it (the first and last detection event of each model the device published in the bucket, OTA
`active` and `rolled_back` reports); with no such evidence, for the device's current active model.
Everything is bucketed by the time the fleet manager received it, so a detection is counted exactly once,
in the bucket it arrived in, even when a device's outbox delivers it hours late.

`FieldTracker` (the MLflow adapter) logs each bucket, `settle_s` after it ended, from its own thread: per
version, in experiment `<experiment_prefix><model name>`, one run tagged with the model name and version
(and, when the registry has that version, its registry run and source; the registered version gets the tag
`edgefleet.field_run_id` back). Metrics use a step per bucket and the bucket's end as timestamp, so the
MLflow UI plots them over time. Artifacts are what the fleet manager has: the crop JPEGs devices sent (not
whole annotated frames, which never leave the device) with their labels and boxes, the bucket's most recent
detection events as JSON, and `latest_bucket.json`, the per-device figures of the last bucket.

The run's tags record the last bucket logged (`edgefleet.field.until`), so a restarted fleet manager goes on
from there into the same runs, and a bucket is never logged twice into one run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_manager.config import FieldTrackingSettings, FleetSettings
from fleet_manager.db import Database
from fleet_manager.models import Crop, Detection, DetectionObject, Device, OtaEvent, TelemetrySample, utcnow
from fleet_protocol.payloads import OtaState

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ModelKey = tuple[str, str]  # (model name, version)

COMPONENT_TAG = "edgefleet.component"
MODEL_NAME_TAG = "edgefleet.model_name"
MODEL_VERSION_TAG = "edgefleet.model_version"
UNTIL_TAG = "edgefleet.field.until"  # end of the last bucket logged into the run
STEP_TAG = "edgefleet.field.next_step"
SAMPLES_TAG = "edgefleet.field.samples"
FIELD_RUN_TAG = "edgefleet.field_run_id"  # on the registered model version
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]+")
_FILE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_BATCH_METRICS = 990  # MLflow takes at most 1000 entities per log_batch; the last one also carries 3 tags
_LOCAL_DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")

# ---- the core: one bucket of the fleet database, by model version and device ---------------------------


@dataclass
class DeviceFigures:
    """One device's figures for one model version in one bucket."""

    latency_p50_ms: list[float] = field(default_factory=list)
    latency_p95_ms: list[float] = field(default_factory=list)
    fps: list[float] = field(default_factory=list)
    frames: int = 0  # detection events (published frames)
    detections: int = 0  # objects in them
    infer_ms_total: float = 0.0  # summed over the frames, so devices add up
    frame_ms_total: float = 0.0  # pre + infer + post

    def to_dict(self) -> dict[str, Any]:
        return {
            "telemetry_samples": len(self.fps),
            "latency_p50_ms": _median(self.latency_p50_ms),
            "latency_p95_ms": _median(self.latency_p95_ms),
            "fps": _median(self.fps),
            "frames": self.frames,
            "detections": self.detections,
            "infer_ms_mean": self.infer_ms_total / self.frames if self.frames else None,
            "frame_ms_mean": self.frame_ms_total / self.frames if self.frames else None,
        }


@dataclass
class VersionBucket:
    """What the devices running one model version reported in one bucket [start, end)."""

    name: str
    version: str
    start: datetime
    end: datetime
    devices: dict[str, DeviceFigures] = field(default_factory=dict)
    labels: dict[str, tuple[int, float]] = field(default_factory=dict)  # label -> (count, confidence sum)

    def device(self, device_id: str) -> DeviceFigures:
        figures = self.devices.get(device_id)
        if figures is None:
            figures = self.devices[device_id] = DeviceFigures()
        return figures

    def metrics(self, max_devices: int) -> dict[str, float]:
        """MLflow metrics: per device (the first `max_devices` by id) and fleet-wide."""
        values: dict[str, float] = {}
        for device_id in sorted(self.devices)[:max_devices]:
            for name, value in self.devices[device_id].to_dict().items():
                if name != "telemetry_samples" and value is not None:
                    values[f"{name}.{_metric_part(device_id)}"] = float(value)
        return values | self.fleet_metrics()

    def fleet_metrics(self) -> dict[str, float]:
        figures = list(self.devices.values())
        p50s = [v for f in figures for v in f.latency_p50_ms]
        p95s = [v for f in figures for v in f.latency_p95_ms]
        fps = [v for f in figures for v in f.fps]
        frames = sum(f.frames for f in figures)
        detections = sum(f.detections for f in figures)
        values: dict[str, float] = {
            "fleet.devices": len(figures),
            "fleet.frames": frames,
            "fleet.detections": detections,
        }
        if p50s:
            values["fleet.latency_p50_ms"] = statistics.median(p50s)
        if p95s:
            values["fleet.latency_p95_ms"] = percentile(p95s, 95)
            values["fleet.latency_p95_ms_max"] = max(p95s)
        if fps:
            values["fleet.fps_mean"] = statistics.fmean(fps)
        if frames:
            values["fleet.detections_per_frame"] = detections / frames
            values["fleet.infer_ms_mean"] = sum(f.infer_ms_total for f in figures) / frames
            values["fleet.frame_ms_mean"] = sum(f.frame_ms_total for f in figures) / frames
        if self.labels:
            count = sum(c for c, _ in self.labels.values())
            values["fleet.confidence_mean"] = sum(s for _, s in self.labels.values()) / count
        for label, (count, _) in self.labels.items():
            values[f"detections_by_label.{_metric_part(label)}"] = count
        return values

    def summary(self) -> dict[str, Any]:
        """The bucket as JSON: every device's figures and the fleet-wide ones."""
        return {
            "model": {"name": self.name, "version": self.version},
            "bucket": {"start": self.start.isoformat(), "end": self.end.isoformat()},
            "fleet": self.fleet_metrics(),
            "labels": {label: count for label, (count, _) in sorted(self.labels.items())},
            "devices": {d: self.devices[d].to_dict() for d in sorted(self.devices)},
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def collect_bucket(session: Session, start: datetime, end: datetime) -> dict[ModelKey, VersionBucket]:
    """Everything received in [start, end), by model version (only versions with data in the bucket)."""
    buckets: dict[ModelKey, VersionBucket] = {}

    def bucket(key: ModelKey) -> VersionBucket:
        found = buckets.get(key)
        if found is None:
            found = buckets[key] = VersionBucket(key[0], key[1], start, end)
        return found

    evidence: defaultdict[str, list[tuple[datetime, ModelKey]]] = defaultdict(list)
    frames = func.count()
    detection_rows = session.execute(
        select(
            Detection.device_id,
            Detection.model_name,
            Detection.model_version,
            frames,
            func.sum(Detection.object_count),
            func.avg(Detection.infer_ms),
            func.avg(Detection.pre_ms + Detection.infer_ms + Detection.post_ms),
            func.min(Detection.received_at),
            func.max(Detection.received_at),
        )
        .where(Detection.received_at >= start, Detection.received_at < end)
        .group_by(Detection.device_id, Detection.model_name, Detection.model_version)
    )
    for device_id, name, version, count, objects, infer, frame, first, last in detection_rows:
        figures = bucket((name, version)).device(device_id)
        figures.frames = int(count)
        figures.detections = int(objects or 0)
        figures.infer_ms_total = float(infer or 0.0) * figures.frames
        figures.frame_ms_total = float(frame or 0.0) * figures.frames
        evidence[device_id] += [(first, (name, version)), (last, (name, version))]
    _add_labels(session, start, end, bucket)
    _add_ota_evidence(session, start, end, evidence)
    _add_telemetry(session, start, end, evidence, bucket)
    return buckets


def _add_labels(
    session: Session, start: datetime, end: datetime, bucket: Callable[[ModelKey], VersionBucket]
) -> None:
    rows = session.execute(
        select(
            Detection.model_name,
            Detection.model_version,
            DetectionObject.label,
            func.count(),
            func.sum(DetectionObject.confidence),
        )
        .join(Detection, Detection.msg_id == DetectionObject.msg_id)
        # An object is written with its event, so both have the same received_at.
        .where(DetectionObject.received_at >= start, DetectionObject.received_at < end)
        .group_by(Detection.model_name, Detection.model_version, DetectionObject.label)
    )
    for name, version, label, count, confidence in rows:
        bucket((name, version)).labels[label] = (int(count), float(confidence or 0.0))


def _add_ota_evidence(
    session: Session,
    start: datetime,
    end: datetime,
    evidence: defaultdict[str, list[tuple[datetime, ModelKey]]],
) -> None:
    rows = session.execute(
        select(OtaEvent).where(
            OtaEvent.received_at >= start,
            OtaEvent.received_at < end,
            OtaEvent.state.in_([OtaState.ACTIVE.value, OtaState.ROLLED_BACK.value]),
        )
    ).scalars()
    for event in rows:
        if event.state == OtaState.ACTIVE.value and event.model_name and event.model_version:
            evidence[event.device_id].append((event.received_at, (event.model_name, event.model_version)))
        elif event.previous_name and event.previous_version:  # rolled back to the previous model
            evidence[event.device_id].append(
                (event.received_at, (event.previous_name, event.previous_version))
            )


def _add_telemetry(
    session: Session,
    start: datetime,
    end: datetime,
    evidence: defaultdict[str, list[tuple[datetime, ModelKey]]],
    bucket: Callable[[ModelKey], VersionBucket],
) -> None:
    samples: list[Any] = []
    device_ids = list(session.execute(select(Device.id).order_by(Device.id)).scalars())
    # By device: the history's index is (device_id, ts); a range on ts alone would scan the whole table.
    for first in range(0, len(device_ids), 500):
        samples += session.execute(
            select(
                TelemetrySample.device_id,
                TelemetrySample.ts,
                TelemetrySample.latency_p50_ms,
                TelemetrySample.latency_p95_ms,
                TelemetrySample.fps,
            ).where(
                TelemetrySample.device_id.in_(device_ids[first : first + 500]),
                TelemetrySample.ts >= start,
                TelemetrySample.ts < end,
            )
        ).all()
    current = _active_models(session, {row.device_id for row in samples} - set(evidence))
    for device_id, ts, p50, p95, fps in samples:
        key = model_at(sorted(evidence.get(device_id, [])), ts, current.get(device_id))
        if key is None:
            continue  # a device that never said which model it runs
        figures = bucket(key).device(device_id)
        figures.fps.append(fps)
        if p50 is not None:
            figures.latency_p50_ms.append(p50)
        if p95 is not None:
            figures.latency_p95_ms.append(p95)


def model_at(
    evidence: Sequence[tuple[datetime, ModelKey]], at: datetime, fallback: ModelKey | None
) -> ModelKey | None:
    """The model of the latest evidence at or before `at` (time-sorted); before the first, the first's;
    with none, `fallback`."""
    if not evidence:
        return fallback
    chosen = evidence[0][1]
    for seen_at, key in evidence:
        if seen_at > at:
            break
        chosen = key
    return chosen


def _active_models(session: Session, device_ids: Iterable[str]) -> dict[str, ModelKey]:
    ids = sorted(device_ids)
    models: dict[str, ModelKey] = {}
    for first in range(0, len(ids), 500):
        rows = session.execute(
            select(Device.id, Device.active_model_name, Device.active_model_version).where(
                Device.id.in_(ids[first : first + 500])
            )
        )
        for device_id, name, version in rows:
            if name and version:
                models[device_id] = (name, version)
    return models


@dataclass(frozen=True)
class SampleCrop:
    """A crop JPEG a device sent, with what the edge model said about it."""

    det_id: str
    device_id: str
    label: str
    confidence: float
    bbox: list[float] | None
    received_at: datetime
    jpeg: bytes

    @property
    def file_name(self) -> str:
        parts = (self.device_id, self.label, self.det_id)
        return "_".join(_FILE_UNSAFE.sub("-", part) for part in parts) + ".jpg"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file_name,
            "det_id": self.det_id,
            "device_id": self.device_id,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "bbox": self.bbox,
            "received_at": self.received_at.isoformat(),
        }


def sample_crops(
    session: Session, key: ModelKey, start: datetime, end: datetime, limit: int
) -> list[SampleCrop]:
    """Up to `limit` crops of the version received in [start, end): the newest of each device first."""
    if limit <= 0:
        return []
    candidates = session.execute(
        select(Crop.det_id, Crop.device_id)
        # A crop's own msg_id is not its event's: the model is found through the detected object.
        .join(DetectionObject, DetectionObject.det_id == Crop.det_id)
        .join(Detection, Detection.msg_id == DetectionObject.msg_id)
        .where(
            Crop.received_at >= start,
            Crop.received_at < end,
            Detection.model_name == key[0],
            Detection.model_version == key[1],
        )
        .order_by(Crop.received_at.desc(), Crop.det_id)
        .limit(limit * 20)
    ).all()
    chosen = _spread(candidates, limit)
    if not chosen:
        return []
    crops = {c.det_id: c for c in session.execute(select(Crop).where(Crop.det_id.in_(chosen))).scalars()}
    boxes = {
        o.det_id: o.bbox
        for o in session.execute(select(DetectionObject).where(DetectionObject.det_id.in_(chosen))).scalars()
    }
    return [
        SampleCrop(c.det_id, c.device_id, c.label, c.confidence, boxes.get(c.det_id), c.received_at, c.jpeg)
        for det_id in chosen
        if (c := crops.get(det_id)) is not None
    ]


def _spread(candidates: Sequence[Any], limit: int) -> list[str]:
    """Round robin over devices (newest first within each), so one busy device does not fill the samples."""
    per_device: dict[str, list[str]] = defaultdict(list)
    for det_id, device_id in candidates:
        per_device[device_id].append(det_id)
    chosen: list[str] = []
    rank = 0
    while len(chosen) < limit and any(rank < len(ids) for ids in per_device.values()):
        chosen += [ids[rank] for _, ids in sorted(per_device.items()) if rank < len(ids)]
        rank += 1
    return chosen[:limit]


def recent_detections(
    session: Session, key: ModelKey, start: datetime, end: datetime, limit: int
) -> list[dict[str, Any]]:
    """The version's newest `limit` detection events received in [start, end), with their objects."""
    if limit <= 0:
        return []
    events = list(
        session.execute(
            select(Detection)
            .where(
                Detection.received_at >= start,
                Detection.received_at < end,
                Detection.model_name == key[0],
                Detection.model_version == key[1],
            )
            .order_by(Detection.received_at.desc(), Detection.msg_id.desc())
            .limit(limit)
        ).scalars()
    )
    objects: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    if events:
        rows = session.execute(
            select(DetectionObject)
            .where(DetectionObject.msg_id.in_([e.msg_id for e in events]))
            .order_by(DetectionObject.det_id)
        ).scalars()
        for obj in rows:
            objects[obj.msg_id].append(
                {
                    "det_id": obj.det_id,
                    "label": obj.label,
                    "class_id": obj.class_id,
                    "confidence": obj.confidence,
                    "bbox": obj.bbox,
                    "track_id": obj.track_id,
                }
            )
    return [
        {
            "msg_id": e.msg_id,
            "device_id": e.device_id,
            "ts": e.ts.isoformat(),
            "received_at": e.received_at.isoformat(),
            "source": e.source,
            "frame_seq": e.frame_seq,
            "width": e.width,
            "height": e.height,
            "timing_ms": e.timing_ms,
            "detections": objects.get(e.msg_id, []),
        }
        for e in events
    ]


def _metric_part(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text)[:120]


# ---- the MLflow adapter -------------------------------------------------------------------------------


@dataclass
class _Run:
    run_id: str
    until: datetime | None  # end of the last bucket logged into it
    next_step: int
    samples: int


class FieldTracker:
    """Logs every bucket to MLflow from its own thread; `start()` it, `stop()` it with the service."""

    def __init__(
        self,
        db: Database,
        settings: FieldTrackingSettings,
        *,
        tracking_uri: str,
        registry_uri: str | None = None,
        artifact_root: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.artifact_root = artifact_root
        self.until: datetime | None = None  # end of the last bucket logged (or found empty)
        self.buckets_logged = 0
        self.last_error: str | None = None
        self._clock = clock
        self._client: MlflowClient | None = None
        self._runs: dict[ModelKey, _Run] = {}
        self._experiments: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, db: Database, settings: FleetSettings) -> FieldTracker:
        """The tracker `settings.field_tracking` describes; MLflow defaults are the registry's."""
        from model_registry.config import RegistrySettings

        registry = RegistrySettings(**settings.registry)
        field_settings = settings.field_tracking
        uri = field_settings.tracking_uri or registry.tracking_uri
        artifact_root = None
        if uri.startswith(_LOCAL_DB_SCHEMES):  # MLflow without a server: we choose where artifacts go
            default_root = registry.artifact_location if not registry.uses_server else None
            artifact_root = field_settings.artifact_root or default_root
            artifact_root = artifact_root or (settings.data_dir.resolve() / "field-artifacts").as_uri()
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return cls(
            db,
            field_settings,
            tracking_uri=uri,
            registry_uri=registry.tracking_uri,
            artifact_root=artifact_root,
        )

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._runs.clear()  # looked up again, and set RUNNING, on first use
        self._thread = threading.Thread(target=self._run, name="fleet-field-tracking", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread and mark this process's runs FINISHED (a restart sets them RUNNING again)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.log_pending()
                delay = self._next_due() - self._clock().timestamp()
            except Exception as error:  # MLflow and the database raise many types; all mean "retry later"
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("field tracking: %s; retrying in %.0f s", self.last_error, self._retry_s)
                delay = self._retry_s
            if self._stop.wait(min(max(delay, 0.05), self.settings.interval_s)):
                break
        self._finish_runs()

    @property
    def _retry_s(self) -> float:
        return min(self.settings.interval_s, 30.0)

    def _next_due(self) -> float:
        assert self.until is not None
        return self.until.timestamp() + self.settings.interval_s + self.settings.settle_s

    def _finish_runs(self) -> None:
        if self._client is None:
            return
        for run in self._runs.values():
            try:
                self._client.set_terminated(run.run_id, "FINISHED")
            except Exception as error:
                log.warning("field tracking: could not end MLflow run %s: %s", run.run_id, error)

    # ---- one pass -----------------------------------------------------------------------------------------

    def log_pending(self, now: datetime | None = None) -> int:
        """Log every bucket that ended at least `settle_s` before `now`; returns how many were logged."""
        client = self._open()
        now = now or self._clock()
        interval = timedelta(seconds=self.settings.interval_s)
        if self.until is None:
            self.until = self._resume_point(client) or _aligned(now - interval, self.settings.interval_s)
        oldest = _aligned(now - timedelta(seconds=self.settings.max_catch_up_s), self.settings.interval_s)
        if self.until < oldest:
            log.warning(
                "field tracking: skipping the buckets from %s to %s (max_catch_up_s)", self.until, oldest
            )
            self.until = oldest
        logged = 0
        settle = timedelta(seconds=self.settings.settle_s)
        while self.until + interval + settle <= now and not self._stop.is_set():
            start, end = self.until, self.until + interval
            self._log_bucket(client, start, end)
            self.until = end
            logged += 1
        self.buckets_logged += logged
        return logged

    def _log_bucket(self, client: MlflowClient, start: datetime, end: datetime) -> None:
        with self.db.read() as session:
            buckets = collect_bucket(session, start, end)
        for key in sorted(buckets):
            run = self._run_for(client, key)
            if run.until is not None and run.until >= end:
                continue  # logged before a failure or restart
            self._log_version(client, run, buckets[key])

    def _log_version(self, client: MlflowClient, run: _Run, bucket: VersionBucket) -> None:
        from mlflow.entities import Metric, RunTag

        key = (bucket.name, bucket.version)
        limit = min(self.settings.samples_per_bucket, max(0, self.settings.max_samples - run.samples))
        with self.db.read() as session:
            crops = sample_crops(session, key, bucket.start, bucket.end, limit)
            events = recent_detections(
                session, key, bucket.start, bucket.end, self.settings.detections_per_bucket
            )
        stamp = bucket.end.strftime("%Y%m%dT%H%M%S.%fZ")
        if crops:
            self._upload_crops(client, run.run_id, f"samples/{stamp}", crops)
        if events:
            client.log_dict(run.run_id, {"events": events}, f"detections/{stamp}.json")
        client.log_dict(run.run_id, bucket.summary(), "latest_bucket.json")
        timestamp = int(bucket.end.timestamp() * 1000)
        values = bucket.metrics(self.settings.max_device_metrics)
        metrics = [Metric(k, float(v), timestamp, run.next_step) for k, v in sorted(values.items())]
        tags = [
            RunTag(UNTIL_TAG, bucket.end.isoformat()),
            RunTag(STEP_TAG, str(run.next_step + 1)),
            RunTag(SAMPLES_TAG, str(run.samples + len(crops))),
        ]
        for first in range(0, len(metrics), _BATCH_METRICS):
            chunk = metrics[first : first + _BATCH_METRICS]
            last = first + _BATCH_METRICS >= len(metrics)
            client.log_batch(run.run_id, metrics=chunk, tags=tags if last else [])  # tags last: "done"
        run.until, run.next_step, run.samples = bucket.end, run.next_step + 1, run.samples + len(crops)

    @staticmethod
    def _upload_crops(client: MlflowClient, run_id: str, artifact_path: str, crops: list[SampleCrop]) -> None:
        with tempfile.TemporaryDirectory(prefix="field-samples-") as folder:
            for crop in crops:
                (Path(folder) / crop.file_name).write_bytes(crop.jpeg)
            index = {"crops": [crop.to_dict() for crop in crops]}
            (Path(folder) / "index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
            client.log_artifacts(run_id, folder, artifact_path)

    # ---- MLflow experiments and runs ----------------------------------------------------------------------

    def _open(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def _resume_point(self, client: MlflowClient) -> datetime | None:
        """The end of the last bucket any field run of ours logged."""
        prefix = self.settings.experiment_prefix
        experiments = [
            e.experiment_id
            for e in client.search_experiments(filter_string=f"name LIKE '{_quote(prefix)}%'")
            if e.name.startswith(prefix)
        ]
        ends: list[datetime] = []
        for first in range(0, len(experiments), 100):
            runs = client.search_runs(
                experiments[first : first + 100],
                filter_string=f"tags.`{COMPONENT_TAG}` = 'field'",
                max_results=10_000,
            )
            ends += [end for run in runs if (end := _parse_time(run.data.tags.get(UNTIL_TAG)))]
        return max(ends, default=None)

    def _experiment_id(self, client: MlflowClient, model_name: str) -> str:
        from mlflow.exceptions import MlflowException

        name = f"{self.settings.experiment_prefix}{model_name}"
        found_id = self._experiments.get(name)
        if found_id is not None:
            return found_id
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = f"{self.artifact_root.rstrip('/')}/field/{model_name}" if self.artifact_root else None
            try:
                found_id = client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by another process
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment is not None:
            found_id = experiment.experiment_id
        assert found_id is not None
        self._experiments[name] = found_id
        return found_id

    def _run_for(self, client: MlflowClient, key: ModelKey) -> _Run:
        run = self._runs.get(key)
        if run is not None:
            return run
        experiment_id = self._experiment_id(client, key[0])
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{COMPONENT_TAG}` = 'field' and tags.`{MODEL_VERSION_TAG}` = "
            f"'{_quote(key[1])}' and tags.`{MODEL_NAME_TAG}` = '{_quote(key[0])}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            tags = found[0].data.tags
            run = _Run(
                found[0].info.run_id,
                _parse_time(tags.get(UNTIL_TAG)),
                int(tags.get(STEP_TAG, "0")),
                int(tags.get(SAMPLES_TAG, "0")),
            )
            client.update_run(run.run_id, status="RUNNING")
        else:
            run = _Run(self._create_run(client, experiment_id, key), None, 0, 0)
        self._runs[key] = run
        return run

    def _create_run(self, client: MlflowClient, experiment_id: str, key: ModelKey) -> str:
        from mlflow.entities import Param

        name, version = key
        tags = {COMPONENT_TAG: "field", MODEL_NAME_TAG: name, MODEL_VERSION_TAG: version}
        params = {"model_name": name, "model_version": version}
        registered = self._registered_version(client, key)
        if registered is not None:
            tags["edgefleet.registry.run_id"] = registered.run_id or ""
            tags["edgefleet.registry.source"] = registered.source or ""
            registered_tags = registered.tags or {}
            params |= {
                k: registered_tags[k] for k in ("sha256", "variant", "precision") if k in registered_tags
            }
        tags["edgefleet.field.bucket_s"] = str(self.settings.interval_s)
        run = client.create_run(experiment_id, run_name=f"{name} v{version} (field)", tags=tags)
        run_id = str(run.info.run_id)
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        if registered is not None:
            try:
                client.set_model_version_tag(name, version, FIELD_RUN_TAG, run_id)
            except Exception as error:  # the link is a convenience; the run is what matters
                log.warning("field tracking: could not tag %s version %s: %s", name, version, error)
        log.info("field tracking: MLflow run %s for %s version %s", run_id, name, version)
        return run_id

    @staticmethod
    def _registered_version(client: MlflowClient, key: ModelKey) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_model_version(key[0], key[1])
        except MlflowException:  # not registered (e.g. a device's initial model)
            return None
        except Exception as error:  # the registry is elsewhere and unreachable: log the run unlinked
            log.warning("field tracking: cannot look up %s version %s in the registry: %s", *key, error)
            return None


def _aligned(moment: datetime, interval_s: float) -> datetime:
    """`moment` rounded down to a multiple of `interval_s` since the Unix epoch."""
    seconds = math.floor(moment.timestamp() / interval_s) * interval_s
    return datetime.fromtimestamp(seconds, timezone.utc)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).astimezone(timezone.utc)
    except ValueError:
        return None


def _quote(value: str) -> str:
    return value.replace("'", "\\'")

"""MLflow logging of a refiner, batched on a background thread and never on the hot path.

One MLflow run per refiner process (run name = instance id, tag `edgefleet.instance`). Its params name the
classifier (name, version, sha256, providers, preprocessing) and the batching; every `flush_interval_s` it
logs throughput and latency of the interval (`crops_per_s`, `latency_ms_p50`/`p95`/`max`, `batch_size_mean`,
`infer_ms_per_crop`) and running totals (`crops_refined_total`, `dropped_total.<reason>`, ...), rewrites
`label_distribution.json` (refined labels, overall and per edge label) and adds sample crops under
`samples/` (every `sample_every`-th crop, at most `max_samples`, listed with their labels in
`samples/index.json`).

The observer hooks only put small tuples on a bounded queue (a full queue counts the event as lost), so a
slow or unreachable tracking server costs the refiner nothing; the thread retries at the next flush.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud_refiner.batcher import BatchStats
from cloud_refiner.config import TrackingConfig
from cloud_refiner.service import RefineResult, RefinerObserver, RejectReason

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class _Refined:
    at: float  # time.monotonic() when it was refined
    latency_s: float
    edge_label: str | None
    label: str
    score: float
    conditioned: bool
    sample: bytes | None


@dataclass
class _Totals:
    """Running totals and the current interval's observations."""

    refined: int = 0
    conditioned: int = 0
    batches: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    replies_ok: int = 0
    replies_failed: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    by_edge: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    window_latencies: list[float] = field(default_factory=list)
    window_first_at: float | None = None  # the interval's first refined crop (it may predate the interval)
    window_batch_sizes: list[int] = field(default_factory=list)
    window_run_s: float = 0.0
    window_started: float = field(default_factory=time.monotonic)
    samples: list[tuple[str, _Refined]] = field(default_factory=list)  # not yet uploaded
    sample_index: list[dict[str, Any]] = field(default_factory=list)
    labels_changed: bool = False


class MlflowTracker(RefinerObserver):
    """Observer that logs to MLflow from its own thread; `start()` it, `stop()` it at shutdown."""

    def __init__(
        self,
        config: TrackingConfig,
        tracking_uri: str,
        *,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.tracking_uri = tracking_uri
        self.run_name = run_name
        self.params = {key: str(value)[:6000] for key, value in params.items()}
        self.tags = {"edgefleet.component": "refiner", "edgefleet.instance": run_name, **(tags or {})}
        self.run_id: str | None = None
        self.flushes = 0
        self.events_lost = 0
        self.last_error: str | None = None
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=config.queue_size)
        self._seen = itertools.count(1)
        self._samples_taken = 0
        self._stop = threading.Event()
        self._totals = _Totals()
        self._thread = threading.Thread(target=self._run, name="mlflow-tracker", daemon=True)

    # ---- observer hooks (hot path: cheap, never block) ------------------------------------------------

    def _put(self, event: tuple[Any, ...]) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self.events_lost += 1

    def crop_refined(self, source: str, result: RefineResult, data: bytes) -> None:
        sample = None
        if next(self._seen) % self.config.sample_every == 0 and self._samples_taken < self.config.max_samples:
            self._samples_taken += 1
            sample = data
        r = result.refinement
        self._put(
            (
                "refined",
                _Refined(
                    time.monotonic(), result.latency_s, r.edge_label, r.label, r.score, r.conditioned, sample
                ),
            )
        )

    def crop_rejected(self, source: str, reason: RejectReason) -> None:
        self._put(("dropped", reason.value))

    def crop_duplicate(self, source: str) -> None:
        self._put(("duplicate",))

    def batch_done(self, stats: BatchStats) -> None:
        self._put(("batch", stats.size, stats.run_s))

    def reply_sent(self, ok: bool) -> None:
        self._put(("reply", ok))

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> MlflowTracker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Flush what is left, end the run as FINISHED, and stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        client: MlflowClient | None = None
        while True:
            stopping = self._stop.wait(self.config.flush_interval_s)
            self._drain()
            try:
                if client is None:
                    client = self._open()
                self._flush(client)
                if stopping:
                    assert self.run_id is not None
                    client.set_terminated(self.run_id, "FINISHED")
            except Exception as error:  # MLflow raises many types (HTTP, SQL, files); all mean "retry later"
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning(
                    "MLflow logging failed (%s); retrying in %.0f s",
                    self.last_error,
                    self.config.flush_interval_s,
                )
            if stopping:
                return

    def _open(self) -> MlflowClient:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.config.experiment, artifact_location=self.config.artifact_location
                )
            except MlflowException:  # another replica created it meanwhile
                found = client.get_experiment_by_name(self.config.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in self.params.items()]
        for start in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[start : start + 100])
        log.info("logging to MLflow run %s (experiment %r)", self.run_id, self.config.experiment)
        return client

    # ---- the logging thread ------------------------------------------------------------------------------

    def _drain(self) -> None:
        totals = self._totals
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            kind = event[0]
            if kind == "refined":
                refined: _Refined = event[1]
                totals.refined += 1
                totals.conditioned += refined.conditioned
                totals.labels[refined.label] += 1
                totals.by_edge[refined.edge_label or "(none)"][refined.label] += 1
                totals.window_latencies.append(refined.latency_s)
                if totals.window_first_at is None:
                    totals.window_first_at = refined.at
                totals.labels_changed = True
                if refined.sample is not None:
                    name = f"{len(totals.sample_index) + len(totals.samples):05d}"
                    totals.samples.append((name, refined))
            elif kind == "batch":
                totals.batches += 1
                totals.window_batch_sizes.append(event[1])
                totals.window_run_s += event[2]
            elif kind == "dropped":
                totals.dropped[event[1]] += 1
            elif kind == "duplicate":
                totals.duplicates += 1
            elif kind == "reply":
                if event[1]:
                    totals.replies_ok += 1
                else:
                    totals.replies_failed += 1

    def _flush(self, client: MlflowClient) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        totals = self._totals
        now = time.monotonic()
        # Events are drained at flush time, so a slow flush can leave crops for the next interval: the rate
        # is taken over the interval stretched back to its first crop.
        started = min(totals.window_started, totals.window_first_at or totals.window_started)
        elapsed = max(now - started, 1e-3)
        values: dict[str, float] = {
            "crops_refined_total": totals.refined,
            "crops_per_s": len(totals.window_latencies) / elapsed,
            "batches_total": totals.batches,
            "conditioned_fraction": totals.conditioned / totals.refined if totals.refined else 0.0,
            "duplicates_total": totals.duplicates,
            "replies_ok_total": totals.replies_ok,
            "replies_failed_total": totals.replies_failed,
            "tracker_events_lost": self.events_lost,
        }
        if totals.window_latencies:
            latencies_ms = np.asarray(totals.window_latencies) * 1e3
            values |= {
                "latency_ms_p50": float(np.percentile(latencies_ms, 50)),
                "latency_ms_p95": float(np.percentile(latencies_ms, 95)),
                "latency_ms_max": float(latencies_ms.max()),
            }
        if totals.window_batch_sizes:
            crops = sum(totals.window_batch_sizes)
            values |= {
                "batch_size_mean": crops / len(totals.window_batch_sizes),
                "infer_ms_per_crop": totals.window_run_s * 1e3 / crops,
            }
        for reason, count in totals.dropped.items():
            values[f"dropped_total.{reason}"] = count
        timestamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp, self.flushes) for key, value in values.items()]
        client.log_batch(self.run_id, metrics=metrics)
        if totals.labels_changed:
            client.log_dict(self.run_id, self._label_distribution(), "label_distribution.json")
            totals.labels_changed = False
        if totals.samples:
            self._upload_samples(client)
        totals.window_latencies.clear()
        totals.window_batch_sizes.clear()
        totals.window_run_s = 0.0
        totals.window_first_at = None
        totals.window_started = now
        self.flushes += 1

    def _label_distribution(self) -> dict[str, Any]:
        totals = self._totals
        return {
            "crops": totals.refined,
            "conditioned": totals.conditioned,
            "refined": dict(totals.labels.most_common()),
            "by_edge_label": {
                edge: dict(counts.most_common()) for edge, counts in sorted(totals.by_edge.items())
            },
        }

    def _upload_samples(self, client: MlflowClient) -> None:
        assert self.run_id is not None
        totals = self._totals
        with tempfile.TemporaryDirectory(prefix="refiner-samples-") as folder:
            for name, refined in totals.samples:
                edge = _UNSAFE.sub("-", refined.edge_label or "none")
                file_name = f"{name}_{edge}_{_UNSAFE.sub('-', refined.label)}.jpg"
                path = Path(folder) / file_name
                path.write_bytes(refined.sample or b"")
                client.log_artifact(self.run_id, str(path), "samples")
                totals.sample_index.append(
                    {
                        "file": file_name,
                        "edge_label": refined.edge_label,
                        "label": refined.label,
                        "score": round(refined.score, 6),
                        "conditioned": refined.conditioned,
                    }
                )
        totals.samples.clear()
        client.log_dict(self.run_id, {"samples": totals.sample_index}, "samples/index.json")

"""Prometheus metrics of a refiner, in a registry of their own: queue, batches, latency, drops, replies."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cloud_refiner.batcher import BatchStats
from cloud_refiner.classifier import ClassifierInfo
from cloud_refiner.service import RefineResult, RefinerObserver, RejectReason

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RefinerMetrics(RefinerObserver):
    """The refiner's collectors; also an observer of the service, so it sees every crop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "edgefleet_refiner_queue_depth", "Crops waiting for the classifier.", registry=r
        )
        self.queue_capacity = Gauge(
            "edgefleet_refiner_queue_capacity", "Crops the queue holds at most.", registry=r
        )
        self.batch_size = Histogram(
            "edgefleet_refiner_batch_size", "Crops per classifier call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "edgefleet_refiner_batch_seconds",
            "Time one classifier call took (whole batch).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "edgefleet_refiner_latency_seconds",
            "From a crop's arrival to its refinement, by source (mqtt, http).",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refined = Counter(
            "edgefleet_refiner_crops_refined",
            "Crops classified, by source and whether the edge label conditioned them.",
            ["source", "conditioned"],
            registry=r,
        )
        self.dropped = Counter(
            "edgefleet_refiner_crops_dropped",
            "Crops not classified, by source and reason (empty, too_large, not_jpeg, undecodable, ...).",
            ["source", "reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "edgefleet_refiner_crops_duplicate",
            "Crops whose det_id was answered already (acknowledged, not answered again).",
            ["source"],
            registry=r,
        )
        self.replies = Counter(
            "edgefleet_refiner_replies",
            "MQTT replies by outcome: ok (broker acknowledged) or failed.",
            ["outcome"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "edgefleet_refiner_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.model_info = Gauge(
            "edgefleet_refiner_model_info",
            "The classifier (value 1): name, version, providers, input size, classes.",
            ["name", "version", "providers", "input_size", "classes"],
            registry=r,
        )
        self.requests = Counter(
            "edgefleet_refiner_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "edgefleet_refiner_http_request_seconds",
            "HTTP request durations by route.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )

    def bind(
        self,
        info: ClassifierInfo,
        queue_depth: Callable[[], int],
        queue_capacity: int,
        connected: Callable[[], bool] | None = None,
    ) -> None:
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.queue_capacity.set(queue_capacity)
        if connected is not None:
            self.mqtt_connected.set_function(lambda: 1.0 if connected() else 0.0)
        height, width = info.preprocess.crop
        self.model_info.labels(
            name=info.name,
            version=info.version,
            providers=",".join(info.providers),
            input_size=f"{width}x{height}",
            classes=str(info.num_classes),
        ).set(1)

    def crop_rejected(self, source: str, reason: RejectReason) -> None:
        self.dropped.labels(source=source, reason=reason.value).inc()

    def crop_duplicate(self, source: str) -> None:
        self.duplicates.labels(source=source).inc()

    def batch_done(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.run_s)

    def crop_refined(self, source: str, result: RefineResult, data: bytes) -> None:
        self.latency.labels(source=source).observe(result.latency_s)
        conditioned = "true" if result.refinement.conditioned else "false"
        self.refined.labels(source=source, conditioned=conditioned).inc()

    def reply_sent(self, ok: bool) -> None:
        self.replies.labels(outcome="ok" if ok else "failed").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

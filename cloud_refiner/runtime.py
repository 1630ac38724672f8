"""One refiner replica put together from its settings: classifier, service, metrics, MLflow, MQTT, HTTP.

runtime = RefinerRuntime.from_settings(load_settings(path))
runtime.start()   # service, MLflow thread, MQTT consumer
runtime.serve_http()  # blocks until SIGTERM/SIGINT (or runtime.wait() without the HTTP API)
runtime.stop()    # unsubscribe, drain, disconnect, finish the MLflow run
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from cloud_refiner.classifier import Classifier
from cloud_refiner.conditioning import Conditioner, LabelSubsets
from cloud_refiner.config import RefinerSettings
from cloud_refiner.metrics import RefinerMetrics
from cloud_refiner.mqtt import CropConsumer
from cloud_refiner.service import Observers, RefinerObserver, RefinerService
from cloud_refiner.tracking import MlflowTracker

log = logging.getLogger(__name__)


def build_service(settings: RefinerSettings, observer: RefinerObserver | None = None) -> RefinerService:
    """Load the classifier and the label mapping; ModelLoadError / MappingError when they are unusable."""
    classifier = Classifier.from_config(settings.classifier)
    subsets = None
    if settings.conditioning.enabled:
        subsets = LabelSubsets.load(settings.conditioning.mapping_file, num_classes=len(classifier.names))
    conditioner = Conditioner(classifier.names, subsets, settings.classifier.top_k)
    return RefinerService(
        classifier, conditioner, batching=settings.batching, limits=settings.limits, observer=observer
    )


def tracking_params(settings: RefinerSettings, service: RefinerService) -> dict[str, Any]:
    info = service.info
    pre = info.preprocess
    subsets = service.conditioner.subsets
    return {
        "instance_id": settings.instance_id,
        "classifier.name": info.name,
        "classifier.version": info.version,
        "classifier.sha256": info.sha256,
        "classifier.path": str(info.path),
        "classifier.providers": ",".join(info.providers),
        "classifier.classes": info.num_classes,
        "preprocess.source": info.preprocess_source,
        "preprocess.recipe": pre.model_dump_json(),
        "conditioning.mapping": subsets.source if subsets is not None else "off",
        "conditioning.labels": len(subsets) if subsets is not None else 0,
        "batching.max_batch": settings.batching.max_batch,
        "batching.max_wait_ms": settings.batching.max_wait_ms,
        "batching.queue_size": settings.batching.queue_size,
        "mqtt.client_id": settings.client_id if settings.broker.enabled else "off",
        "mqtt.share_group": settings.broker.share_group,
        "mqtt.receive_maximum": settings.broker.receive_maximum,
    }


class RefinerRuntime:
    """Everything one replica runs; see the module doc."""

    def __init__(self, settings: RefinerSettings) -> None:
        self.settings = settings
        self.metrics = RefinerMetrics()
        self._observers = Observers([self.metrics])
        self.service = build_service(settings, self._observers)
        self.tracker: MlflowTracker | None = None
        uri = settings.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            self.tracker = MlflowTracker(
                settings.tracking,
                uri,
                run_name=settings.instance_id,
                params=tracking_params(settings, self.service),
            )
            self._observers.observers.append(self.tracker)
        self.consumer = (
            CropConsumer(self.service, settings, self._observers) if settings.broker.enabled else None
        )
        consumer = self.consumer
        self.metrics.bind(
            self.service.info,
            lambda: self.service.queue_depth,
            self.service.queue_capacity,
            (lambda: consumer.connected) if consumer is not None else None,
        )
        self._stopped = threading.Event()

    @classmethod
    def from_settings(cls, settings: RefinerSettings) -> RefinerRuntime:
        return cls(settings)

    def start(self) -> RefinerRuntime:
        self.service.start()
        if self.tracker is not None:
            self.tracker.start()
        if self.consumer is not None:
            self.consumer.start()
        return self

    def ready(self) -> bool:
        return self.consumer is None or self.consumer.connected

    def serve_http(self, log_level: str = "info") -> None:
        """Serve the HTTP API in this thread until SIGTERM/SIGINT (needs the main thread)."""
        from cloud_refiner.api import create_app, make_server

        app = create_app(self.service, self.metrics, self.settings.api, ready=self.ready)
        make_server(app, self.settings.api, log_level=log_level).run()

    def request_stop(self) -> None:
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        """Graceful: stop taking crops, answer what arrived, then stop classifying and logging."""
        started = time.monotonic()
        if self.consumer is not None:
            self.consumer.stop(self.settings.drain_timeout_s)
        self.service.stop(drain=True)
        drained = time.monotonic()
        if self.tracker is not None:
            self.tracker.stop()
        log.info(
            "refiner %s stopped: crops drained in %.1f s, MLflow finished in %.1f s",
            self.settings.instance_id,
            drained - started,
            time.monotonic() - drained,
        )

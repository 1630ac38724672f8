"""Prometheus metrics of the local HTTP API, in a registry of their own (several apps may share a process).

`RequestMetricsMiddleware` counts every HTTP request by route template, method and status and times it;
`ApiMetrics` also holds the per-stage inference histograms, the inference pool gauges and the model info.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device_agent.detector import Detector, StageTimings

if TYPE_CHECKING:
    from device_agent.inference_pool import InferencePool

UNMATCHED_ROUTE = "unmatched"  # one label for every unknown path, so scanners cannot blow up the cardinality
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiMetrics:
    """The API's collectors, registered in `registry` (a new one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "edgefleet_api_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_api_request_duration_seconds",
            "Time from receiving a request to finishing its response, by route template and method.",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "edgefleet_inference_stage_seconds",
            "Time per image in each stage: decode (bytes to pixels), pre, infer, post.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.unhandled_errors = Counter(
            "edgefleet_api_unhandled_errors",
            "Unexpected exceptions turned into a JSON 500 by the catch-all, by exception type.",
            ["exception"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "edgefleet_model_info",
            "The model the API serves (value 1): path, providers, input size, class count.",
            ["path", "providers", "input_size", "classes"],
            registry=self.registry,
        )
        self.pool_pending = Gauge(
            "edgefleet_inference_pool_pending", "Inference jobs running or waiting.", registry=self.registry
        )
        self.pool_capacity = Gauge(
            "edgefleet_inference_pool_capacity",
            "Inference jobs the pool holds before answering 503: workers + queue size.",
            registry=self.registry,
        )

    def bind_pool(self, pool: InferencePool) -> None:
        self.pool_pending.set_function(lambda: pool.pending)
        self.pool_capacity.set(pool.capacity)

    def set_model(self, detector: Detector | None) -> None:
        """Show `detector` (or no model) in `edgefleet_model_info`."""
        self.model_info.clear()
        if detector is None:
            return
        spec = detector.spec
        self.model_info.labels(
            path=str(detector.model_path),
            providers=",".join(detector.providers),
            input_size=f"{spec.input_width}x{spec.input_height}",
            classes=str(len(detector.names)),
        ).set(1)

    def observe_stages(self, timing: StageTimings, decode_ms: float) -> None:
        for stage, ms in (
            ("decode", decode_ms),
            ("pre", timing.pre_ms),
            ("infer", timing.infer_ms),
            ("post", timing.post_ms),
        ):
            self.stages.labels(stage=stage).observe(ms / 1e3)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request (streaming bodies pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers if the app fails before starting a response

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = _route_label(scope.get("route"))
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - start)


def _route_label(route: BaseRoute | None) -> str:
    """The matched route's template (e.g. `/v1/detect`); the router stores the match in the shared scope."""
    return route.path if isinstance(route, Route) else UNMATCHED_ROUTE

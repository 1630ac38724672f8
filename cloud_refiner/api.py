"""The refiner's HTTP API: `POST /v1/refine`, `/healthz`, `/readyz`, `/metrics`.

`POST /v1/refine` takes one or more crops as multipart `file` fields (or one crop as the raw body) and an
optional edge label (`label`: one form field for all crops, one per crop, or the `label` query parameter),
and answers with the refined labels. Crops go through the same micro-batcher as the MQTT ones; decoding
runs on a worker thread, never on the event loop. At most `api.max_pending` HTTP crops wait at once, more
get 503 with Retry-After. Every error is JSON `{"error": code, "detail": what was wrong and what to do}`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_refiner.batcher import BatcherError
from cloud_refiner.config import ApiConfig
from cloud_refiner.metrics import RefinerMetrics
from cloud_refiner.service import CropRejectedError, RefineResult, RefinerService, RejectReason

log = logging.getLogger(__name__)

SOURCE = "http"
MULTIPART_ALLOWANCE = 64 * 1024
MAX_LABEL_CHARS = 128
UNMATCHED_ROUTE = "unmatched"
_STATUS_OF_REASON = {
    RejectReason.EMPTY: (400, "empty_image"),
    RejectReason.TOO_LARGE: (413, "payload_too_large"),
    RejectReason.NOT_JPEG: (415, "unsupported_media_type"),
    RejectReason.UNSUPPORTED_TYPE: (415, "unsupported_media_type"),
}


class ApiError(Exception):
    """Answered as JSON `{"error": code, "detail": detail}` with `status`."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Upload:
    name: str
    data: bytes


class PendingLimit:
    """Counts HTTP crops waiting for the classifier; refuses more than `limit` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self._lock = threading.Lock()

    def try_take(self, count: int) -> bool:
        with self._lock:
            if self.pending + count > self.limit:
                return False
            self.pending += count
            return True

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.pending -= count


def create_app(
    service: RefinerService,
    metrics: RefinerMetrics,
    config: ApiConfig | None = None,
    *,
    ready: Callable[[], bool] | None = None,
) -> FastAPI:
    """The API for `service`; `ready()` adds a condition to /readyz (e.g. the MQTT link being up)."""
    config = config or ApiConfig()
    limit = PendingLimit(config.max_pending)

    app = FastAPI(
        title="edgefleet cloud refiner",
        summary="Finer labels for edge detections.",
        version="1",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; /openapi.json is served
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError) -> Response:
        return error_response(error.status, error.error, error.detail, error.headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, error: HTTPException) -> Response:
        detail = (
            "no such endpoint; this API serves POST /v1/refine, GET /healthz, /readyz, /metrics and "
            "/openapi.json"
        )
        return error_response(
            error.status_code, "http_error", detail if error.status_code == 404 else error.detail
        )

    @app.post("/v1/refine", response_model=None)
    async def refine(
        request: Request,
        label: Annotated[
            str | None, Query(max_length=MAX_LABEL_CHARS, description="Edge label for every crop, e.g. dog.")
        ] = None,
    ) -> Response:
        """Refine one or more crops (multipart `file` fields, or the raw body) with an optional edge label."""
        uploads, labels = await read_uploads(request, config, label)
        if not limit.try_take(len(uploads)):
            for _ in uploads:
                metrics.crop_rejected(SOURCE, RejectReason.OVERLOADED)
            raise ApiError(
                503,
                "overloaded",
                f"{limit.pending} crops are already waiting (limit {limit.limit}); "
                f"retry in {config.retry_after_s} s",
                {"Retry-After": str(config.retry_after_s)},
            )
        try:
            results = await _refine_all(service, uploads, labels, config)
        finally:
            limit.release(len(uploads))
        info = service.info
        return JSONResponse(
            {
                "model": {"name": info.name, "version": info.version},
                "results": [
                    _result_json(upload, edge_label, result)
                    for upload, edge_label, result in zip(uploads, labels, results, strict=True)
                ],
            }
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """The classifier takes crops (and the broker link is up, when MQTT is on)."""
        if not service.running:
            return error_response(503, "not_ready", "the refiner is stopping")
        if ready is not None and not ready():
            return error_response(
                503, "not_ready", "not connected to the MQTT broker yet", {"Retry-After": "5"}
            )
        info = service.info
        return JSONResponse({"status": "ready", "model": {"name": info.name, "version": info.version}})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


async def _refine_all(
    service: RefinerService, uploads: list[Upload], labels: list[str | None], config: ApiConfig
) -> list[RefineResult]:
    received_at = time.perf_counter()
    prepared = await asyncio.gather(
        *(asyncio.to_thread(_prepare, service, index, u) for index, u in enumerate(uploads))
    )
    futures: list[Future[RefineResult]] = []
    for upload, edge_label, image in zip(uploads, labels, prepared, strict=True):
        try:
            submission = service.submit(
                upload.data, edge_label, source=SOURCE, received_at=received_at, timeout=0, prepared=image
            )
        except BatcherError as error:
            for future in futures:
                future.cancel()
            raise ApiError(
                503,
                "overloaded",
                f"{error}; retry in {config.retry_after_s} s",
                {"Retry-After": str(config.retry_after_s)},
            ) from error
        assert submission.future is not None
        futures.append(submission.future)
    return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))


def _prepare(service: RefinerService, index: int, upload: Upload) -> np.ndarray:
    try:
        return service.prepare(upload.data, source=SOURCE)
    except CropRejectedError as error:
        status, code = _STATUS_OF_REASON.get(error.reason, (422, "invalid_image"))
        raise ApiError(status, code, f"image {index} ({upload.name}): {error}") from error


def _result_json(upload: Upload, edge_label: str | None, result: RefineResult) -> dict[str, Any]:
    refinement = result.refinement
    return {
        "image": upload.name,
        "edge_label": edge_label,
        "label": refinement.label,
        "class_id": refinement.class_id,
        "score": round(refinement.score, 6),
        "conditioned": refinement.conditioned,
        "top_k": [
            {"label": s.label, "class_id": s.class_id, "score": round(s.score, 6)} for s in refinement.top_k
        ],
        "batch_size": result.batch_size,
        "latency_ms": round(result.latency_s * 1e3, 3),
    }


async def read_uploads(
    request: Request, config: ApiConfig, query_label: str | None
) -> tuple[list[Upload], list[str | None]]:
    """The crops of a multipart or raw-body request and one edge label (or None) per crop."""
    content_type = request.headers.get("content-type", "").lower().lstrip()
    is_multipart = content_type.startswith("multipart/form-data")
    limit = config.max_upload_bytes + (MULTIPART_ALLOWANCE if is_multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = await _read_body(request, limit)
    if not is_multipart:
        if not body:
            raise ApiError(
                400, "empty_body", "no image: send multipart `file` fields or the image as the body"
            )
        labels = [_check_label(query_label)]
        return [Upload("upload", body)], labels
    uploads, form_labels = await _parse_multipart(request, body, min(config.max_images, config.max_pending))
    if not uploads:
        raise ApiError(422, "missing_file", "the multipart body has no `file` field (curl -F file=@crop.jpg)")
    if form_labels and query_label is not None:
        raise ApiError(
            422, "invalid_parameter", "give the edge label as query parameter or form field, not both"
        )
    if not form_labels:
        return uploads, [_check_label(query_label)] * len(uploads)
    if len(form_labels) == 1:
        return uploads, [_check_label(form_labels[0])] * len(uploads)
    if len(form_labels) != len(uploads):
        raise ApiError(
            422,
            "invalid_parameter",
            f"{len(form_labels)} `label` fields for {len(uploads)} files: give one label, or one per file",
        )
    return uploads, [_check_label(value) for value in form_labels]


def _check_label(value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if len(value) > MAX_LABEL_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ApiError(422, "invalid_parameter", f"label must be 1-{MAX_LABEL_CHARS} printable characters")
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as error:
        raise ApiError(400, "client_disconnected", "the client closed the connection mid-body") from error
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"the request is larger than {limit} bytes; send fewer or smaller crops"
    )


async def _parse_multipart(request: Request, body: bytes, max_files: int) -> tuple[list[Upload], list[str]]:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(
            max_files=max_files, max_fields=max_files + 16
        ) as form:
            uploads: list[Upload] = []
            labels = []
            for key, value in form.multi_items():
                if key == "file" and isinstance(value, UploadFile):
                    name = (value.filename or f"file{len(uploads)}")[:255]
                    uploads.append(Upload(name, await value.read()))
                elif key == "label" and isinstance(value, str):
                    labels.append(value)
            return uploads, labels
    except HTTPException as error:  # Starlette's verdict: too many files/fields, malformed body
        raise ApiError(
            400, "malformed_multipart", f"the multipart body cannot be used: {error.detail}"
        ) from error
    except ApiError:
        raise
    except Exception as error:  # python-multipart raises assorted types on garbage
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {error}") from error


class RequestMetricsMiddleware:
    """Counts and times HTTP requests by route template; turns an escaped exception into a JSON 500."""

    def __init__(self, app: ASGIApp, metrics: RefinerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if started:
                raise
            status = 500
            await error_response(500, "internal_error", "unexpected error in the refiner; it is logged")(
                scope, receive, send
            )
        finally:
            route = scope.get("route")
            name = route.path if isinstance(route, Route) else UNMATCHED_ROUTE
            self.metrics.requests.labels(route=name, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=name).observe(time.perf_counter() - start)


def make_server(app: ASGIApp, config: ApiConfig, log_level: str = "info") -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )

"""The device agent's local HTTP API: `POST /v1/detect`, `/healthz`, `/readyz`, `/metrics`.

A thin adapter over `Detector`: the request body is read here under a byte limit, and everything costly
(header check, decoding, detection, drawing) runs on the `InferencePool`, never on the event loop. Every
error is JSON `{"error": code, "detail": what was wrong and what to do}`; a catch-all makes sure that even
a bug answers that way (as a logged, counted 500) rather than with a bare traceback.

    app = create_app(detector, ApiSettings(workers=2))   # or serve(detector, settings, port=8080)
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, TypeAlias

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from device_agent.detector import DetectionResult, Detector, DetectParams
from device_agent.imaging import (
    ImageLimits,
    InvalidImageError,
    UnsupportedImageTypeError,
    decode_image,
    encode_jpeg,
    sniff_format,
)
from device_agent.imaging import annotate as draw_detections
from device_agent.inference_pool import InferencePool, PoolClosedError, PoolSaturatedError
from device_agent.metrics import ApiMetrics, RequestMetricsMiddleware

log = logging.getLogger(__name__)

# The detector to serve, or a callable returning the current one (None while no model is loaded), so that
# the agent daemon can swap models without rebuilding the app.
DetectorSource: TypeAlias = Detector | Callable[[], Detector | None]

MAX_DET_LIMIT = 10_000
# Room for the multipart envelope (boundaries, part headers) on top of the image size limit.
MULTIPART_ALLOWANCE = 64 * 1024
MAX_FILENAME_CHARS = 255
SUPPORTED_TYPES_HINT = "send a JPEG, PNG, BMP or WebP image"


class ApiSettings(BaseModel):
    """Limits and capacity of the local HTTP API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_bytes: int = Field(
        default=20_000_000,
        gt=0,
        description="Largest accepted image upload in bytes; larger requests get 413.",
    )
    workers: int = Field(default=2, ge=1, description="Inference threads sharing the detector.")
    queue_size: int = Field(
        default=8,
        ge=0,
        description="Requests that may wait for a free worker; one more gets 503 with Retry-After.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Seconds a client is told to wait after a 503.")
    max_side: int = Field(
        default=16384, ge=1, description="Longest accepted image side in pixels (from the header)."
    )
    max_pixels: int = Field(
        default=50_000_000, ge=1, description="Most pixels (width x height) an image may have."
    )
    max_aspect_ratio: float = Field(
        default=20.0, ge=1.0, description="Largest accepted ratio of the long side to the short side."
    )
    jpeg_quality: int = Field(
        default=90, ge=1, le=100, description="JPEG quality of annotated images (annotate=true)."
    )

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_side, self.max_pixels, self.max_aspect_ratio)


class ApiError(Exception):
    """An error answered as JSON `{"error": code, "detail": detail}` with this status."""

    def __init__(
        self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})


class ErrorBody(BaseModel):
    error: str = Field(description="Short machine-readable code, e.g. `payload_too_large`.")
    detail: str = Field(description="What was wrong and what to do about it.")


class DetectionOut(BaseModel):
    class_id: int
    label: str
    confidence: float
    bbox: list[float] = Field(description="[x1, y1, x2, y2] in source-image pixels.")


class DetectResponse(BaseModel):
    image: str = Field(description="The uploaded file name, or 'upload' for a raw body.")
    width: int
    height: int
    detections: list[DetectionOut]
    timing_ms: dict[str, float] = Field(description="Milliseconds per stage: pre, infer, post.")


_BINARY = {"type": "string", "format": "binary"}
DETECT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image, as multipart field `file` or as the raw body (JPEG, PNG, BMP or WebP).",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}
            },
            **{
                media: {"schema": _BINARY} for media in ("image/jpeg", "image/png", "image/bmp", "image/webp")
            },
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


DETECT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": DetectResponse,
        "content": {"image/jpeg": {}},
        "description": "JSON, or a JPEG if annotate",
    },
    400: _error_doc("Empty body or malformed multipart."),
    413: _error_doc("Upload larger than max_upload_bytes."),
    415: _error_doc("Not a JPEG, PNG, BMP or WebP image (judged by its bytes)."),
    422: _error_doc("Bad query value, or an image that is corrupt, truncated or of unacceptable size."),
    503: _error_doc("No model loaded, or every worker busy and the queue full (see Retry-After)."),
}


def error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes
    name: str


@dataclass(frozen=True, slots=True)
class DetectOutcome:
    result: DetectionResult
    decode_ms: float
    jpeg: bytes | None


def create_app(
    detector: DetectorSource,
    settings: ApiSettings | None = None,
    *,
    pool: InferencePool | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The API app serving `detector` (or whatever detector the callable returns at each request).

    Without `pool`, the app makes its own from `settings.workers` / `settings.queue_size` and closes it
    at shutdown; a given pool is shared and left open. Metrics go to `registry` (a new one by default).
    """
    settings = settings or ApiSettings()
    metrics = ApiMetrics(registry)
    owns_pool = pool is None
    inference_pool = pool if pool is not None else InferencePool(settings.workers, settings.queue_size)
    metrics.bind_pool(inference_pool)
    current_detector = _as_callable(detector)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_pool:
            inference_pool.close(wait=False)

    app = FastAPI(
        title="edgefleet device agent",
        summary="Local object detection on this device.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; /openapi.json is served
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pool = inference_pool
    _add_error_handlers(app)
    _add_detect_route(app, current_detector, inference_pool, settings, metrics)
    _add_probe_routes(app, current_detector, inference_pool, metrics)
    app.add_middleware(CatchAllMiddleware, metrics=metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost, so it sees the catch-all's 500
    return app


def make_server(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn server for `app`; run it with `.run()`, or `await .serve()` inside an event loop."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws="none", lifespan="on", timeout_graceful_shutdown=10
    )
    return uvicorn.Server(config)


def serve(
    detector: DetectorSource,
    settings: ApiSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
) -> None:
    """Serve the API for `detector` until interrupted (Ctrl-C / SIGTERM)."""
    make_server(create_app(detector, settings), host=host, port=port, log_level=log_level).run()


def _add_detect_route(
    app: FastAPI,
    current_detector: Callable[[], Detector | None],
    pool: InferencePool,
    settings: ApiSettings,
    metrics: ApiMetrics,
) -> None:
    @app.post("/v1/detect", openapi_extra=DETECT_OPENAPI, responses=DETECT_RESPONSES, response_model=None)
    async def detect(
        request: Request,
        conf: Annotated[
            float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False, description="Confidence threshold.")
        ] = None,
        iou: Annotated[
            float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False, description="NMS IoU.")
        ] = None,
        max_det: Annotated[int | None, Query(ge=1, le=MAX_DET_LIMIT, description="Most detections.")] = None,
        classes: Annotated[
            str | None, Query(description="Keep only these classes: names or ids, comma-separated.")
        ] = None,
        annotate: Annotated[bool, Query(description="Answer with a JPEG with the boxes drawn.")] = False,
    ) -> Response:
        """Detect objects in one uploaded image."""
        detector = _require_detector(current_detector)
        params = _detect_params(detector, conf, iou, max_det, classes)
        upload = await read_upload(request, settings.max_upload_bytes)
        if sniff_format(upload.data) is None:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"the body is not a supported image (it starts with {upload.data[:8]!r}); "
                f"{SUPPORTED_TYPES_HINT}",
            )
        outcome = await _run_in_pool(pool, settings, detector, upload.data, params, annotate)
        metrics.observe_stages(outcome.result.timing, outcome.decode_ms)
        if outcome.jpeg is not None:
            return Response(outcome.jpeg, media_type="image/jpeg")
        result = outcome.result
        return JSONResponse(
            {
                "image": upload.name,
                "width": result.width,
                "height": result.height,
                "detections": [d.to_dict() for d in result.detections],
                "timing_ms": result.timing.to_dict(),
            }
        )


def _add_probe_routes(
    app: FastAPI, current_detector: Callable[[], Detector | None], pool: InferencePool, metrics: ApiMetrics
) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive and answering."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: _error_doc("No model loaded or shutting down.")})
    async def readyz() -> dict[str, Any]:
        """A model is loaded and the inference pool takes work."""
        detector = _require_detector(current_detector)
        if pool.closed:
            raise ApiError(503, "not_ready", "the inference pool is shut down; the agent is stopping")
        return {"status": "ready", "model": str(detector.model_path), "providers": list(detector.providers)}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        metrics.set_model(current_detector())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _as_callable(source: DetectorSource) -> Callable[[], Detector | None]:
    if isinstance(source, Detector):
        return lambda: source
    return source


def _require_detector(current_detector: Callable[[], Detector | None]) -> Detector:
    detector = current_detector()
    if detector is None:
        raise ApiError(
            503, "not_ready", "no model is loaded yet; retry once /readyz answers 200", {"Retry-After": "5"}
        )
    return detector


def _detect_params(
    detector: Detector, conf: float | None, iou: float | None, max_det: int | None, classes: str | None
) -> DetectParams:
    defaults = detector.params
    class_ids = defaults.classes
    labels = [label for label in (classes or "").split(",") if label.strip()]
    if labels:
        try:
            class_ids = detector.class_ids(labels)
        except ValueError as error:
            examples = ", ".join(detector.names[:3])
            raise ApiError(
                422,
                "invalid_parameter",
                f"query parameter 'classes': {error} "
                f"(names such as {examples}, or ids 0-{len(detector.names) - 1})",
            ) from error
    return DetectParams(
        conf=defaults.conf if conf is None else conf,
        iou=defaults.iou if iou is None else iou,
        max_det=defaults.max_det if max_det is None else max_det,
        classes=class_ids,
    )


async def _run_in_pool(
    pool: InferencePool,
    settings: ApiSettings,
    detector: Detector,
    data: bytes,
    params: DetectParams,
    draw: bool,
) -> DetectOutcome:
    try:
        future = pool.submit(
            detect_bytes, detector, data, params, settings.image_limits, draw, settings.jpeg_quality
        )
    except PoolSaturatedError as error:
        raise ApiError(
            503,
            "overloaded",
            f"{error}; retry in {settings.retry_after_s} s",
            {"Retry-After": str(settings.retry_after_s)},
        ) from error
    except PoolClosedError as error:
        raise ApiError(503, "shutting_down", "the agent is stopping and takes no more images") from error
    try:
        return await asyncio.wrap_future(future)
    except UnsupportedImageTypeError as error:
        raise ApiError(415, "unsupported_media_type", f"{error}; {SUPPORTED_TYPES_HINT}") from error
    except InvalidImageError as error:
        raise ApiError(422, "invalid_image", f"{error}; {SUPPORTED_TYPES_HINT} that decodes") from error


def detect_bytes(
    detector: Detector, data: bytes, params: DetectParams, limits: ImageLimits, draw: bool, jpeg_quality: int
) -> DetectOutcome:
    """Decode, detect and (if `draw`) annotate one image; runs on a pool worker."""
    start = time.perf_counter()
    image = decode_image(data, limits)
    decode_ms = (time.perf_counter() - start) * 1e3
    result = detector.run(image, params)
    jpeg = encode_jpeg(draw_detections(image, result.detections), jpeg_quality) if draw else None
    return DetectOutcome(result, decode_ms, jpeg)


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image bytes of a multipart (`file` field) or raw-body request; 400/413 as `ApiError`."""
    content_type = request.headers.get("content-type", "")
    is_multipart = content_type.lower().lstrip().startswith("multipart/form-data")
    body_limit = max_bytes + MULTIPART_ALLOWANCE if is_multipart else max_bytes
    _check_declared_length(request.headers.get("content-length"), body_limit)
    body = await read_body(request, body_limit)
    upload = await _parse_multipart(request, body) if is_multipart else Upload(body, "upload")
    if len(upload.data) > max_bytes:
        raise _too_large(max_bytes)
    if not upload.data:
        raise ApiError(
            400,
            "empty_body",
            "the request carries no image: send it as multipart field 'file' or as the raw body",
        )
    return upload


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it would exceed `limit`: chunked bodies included."""
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as error:
        raise ApiError(
            400, "client_disconnected", "the client closed the connection before sending the body"
        ) from error
    return b"".join(chunks)


def _check_declared_length(declared: str | None, limit: int) -> None:
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError as error:
        raise ApiError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a number") from error
    if length > limit:
        raise _too_large(limit)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the upload is larger than the limit of {limit} bytes; send a smaller image",
    )


async def _parse_multipart(request: Request, body: bytes) -> Upload:
    """Parse the already-read body as multipart by replaying it into a fresh Request."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
            field = form.get("file")
            if not isinstance(field, UploadFile):
                raise ApiError(
                    422,
                    "missing_file",
                    "the multipart body has no file field named 'file' (e.g. curl -F file=@image.jpg)",
                )
            return Upload(await field.read(), (field.filename or "upload")[:MAX_FILENAME_CHARS])
    except ApiError:
        raise
    except (
        HTTPException
    ) as error:  # Starlette's verdict on a malformed body (missing boundary, too many parts)
        raise ApiError(
            400, "malformed_multipart", f"the multipart body cannot be parsed: {error.detail}"
        ) from error
    except Exception as error:  # python-multipart raises assorted types on garbage; all mean a malformed body
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {error}") from error


def _add_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return error_response(error.status, error.error, error.detail, error.headers)

    async def on_http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(error.status_code, code, _http_detail(error), error.headers)

    async def on_validation_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = [_describe_validation_problem(problem) for problem in error.errors()]
        return error_response(422, "invalid_parameter", "; ".join(problems))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


def _http_detail(error: HTTPException) -> str:
    if error.status_code == 404:
        return (
            "no such endpoint; this API serves POST /v1/detect, GET /healthz, /readyz, /metrics and "
            "/openapi.json"
        )
    if error.status_code == 405:
        return (
            f"method not allowed here; allowed: {error.headers.get('Allow', '?') if error.headers else '?'}"
        )
    return str(error.detail)


def _describe_validation_problem(problem: Mapping[str, Any]) -> str:
    location = [str(part) for part in problem.get("loc", ())]
    where = f"{location[0]} parameter '{'.'.join(location[1:])}'" if len(location) > 1 else "request"
    value = problem.get("input")
    got = f" (got {value!r})" if isinstance(value, str | int | float) else ""
    return f"{where}: {problem.get('msg', 'invalid value')}{got}"


class CatchAllMiddleware:
    """Turn any exception that escapes the app into a logged, counted JSON 500 instead of a bare one."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_and_track(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except Exception as error:
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            self.metrics.unhandled_errors.labels(exception=type(error).__name__).inc()
            if response_started:
                raise  # too late for a JSON body; the server closes the connection
            detail = f"unexpected {type(error).__name__} in the agent; the error is logged, please report it"
            await error_response(500, "internal_error", detail)(scope, receive, send)

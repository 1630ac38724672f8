"""The local HTTP API on the real int8 detector: results, every error status, metrics, back-pressure."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from device_agent.api import ApiSettings, create_app, make_server
from device_agent.detector import Detector, DetectParams
from device_agent.inference_pool import InferencePool, PoolClosedError, PoolSaturatedError
from tests.device_agent.test_imaging import crafted_bmp, crafted_png, encode

DETECT = "/v1/detect"


@pytest.fixture(scope="module")
def bus_bytes(bus_jpg: Path) -> bytes:
    return bus_jpg.read_bytes()


@pytest.fixture(scope="module")
def bus_image(bus_jpg: Path) -> np.ndarray:
    image = cv2.imread(str(bus_jpg))
    assert image is not None
    return image


@pytest.fixture(scope="module")
def reference(int8_detector: Detector, bus_image: np.ndarray) -> list[dict[str, Any]]:
    """What the detector itself finds in bus.jpg, in the API's JSON form."""
    return [d.to_dict() for d in int8_detector.detect(bus_image)]


@pytest.fixture(scope="module")
def client(int8_detector: Detector) -> Iterator[TestClient]:
    with TestClient(create_app(int8_detector)) as test_client:
        yield test_client


def assert_same_detections(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [d["label"] for d in got] == [d["label"] for d in expected]
    for found, wanted in zip(got, expected, strict=True):
        assert found["class_id"] == wanted["class_id"]
        assert found["confidence"] == pytest.approx(wanted["confidence"], abs=2e-3)
        assert found["bbox"] == pytest.approx(wanted["bbox"], abs=0.5)


def assert_error(response: httpx.Response, status: int, error: str, *detail_words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    for word in detail_words:
        assert word in body["detail"]


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def sample_value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matching = [value for found, value in samples.get(name, []) if labels.items() <= found.items()]
    return sum(matching)


# --- detection results --------------------------------------------------------------------------------------


def test_multipart_upload_returns_the_detectors_boxes(
    client: TestClient, bus_bytes: bytes, reference: list[dict[str, Any]]
) -> None:
    response = client.post(DETECT, files={"file": ("bus.jpg", bus_bytes, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image", "width", "height", "detections", "timing_ms"}
    assert (body["image"], body["width"], body["height"]) == ("bus.jpg", 810, 1080)
    assert len(body["detections"]) == 5
    assert "bus" in {d["label"] for d in body["detections"]}
    assert_same_detections(body["detections"], reference)
    assert set(body["timing_ms"]) == {"pre", "infer", "post"}
    assert body["timing_ms"]["infer"] > 0


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain"])
def test_raw_body_works_whatever_content_type_the_client_claims(
    client: TestClient, bus_bytes: bytes, reference: list[dict[str, Any]], content_type: str
) -> None:
    response = client.post(DETECT, content=bus_bytes, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["image"] == "upload"
    assert_same_detections(response.json()["detections"], reference)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_png_bmp_and_webp_give_the_same_detections(
    client: TestClient, bus_image: np.ndarray, reference: list[dict[str, Any]], ext: str
) -> None:
    response = client.post(DETECT, content=encode(bus_image, ext))  # lossless: the very same pixels
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (810, 1080)
    assert_same_detections(response.json()["detections"], reference)


def test_annotate_returns_a_jpeg_of_the_same_size(
    client: TestClient, bus_bytes: bytes, bus_image: np.ndarray
) -> None:
    response = client.post(DETECT, params={"annotate": "true"}, content=bus_bytes)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    drawn = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert drawn is not None
    assert drawn.shape == bus_image.shape
    assert np.abs(drawn.astype(int) - bus_image.astype(int)).mean() > 1, "boxes were drawn"


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ({"classes": "person"}, DetectParams(classes=frozenset({0}))),
        ({"classes": " bus , 0 "}, DetectParams(classes=frozenset({0, 5}))),
        ({"conf": "0.85", "max_det": "2", "iou": "0.3"}, DetectParams(conf=0.85, iou=0.3, max_det=2)),
    ],
)
def test_query_parameters_reach_the_detector(
    client: TestClient,
    int8_detector: Detector,
    bus_bytes: bytes,
    bus_image: np.ndarray,
    query: dict[str, str],
    params: DetectParams,
) -> None:
    response = client.post(DETECT, params=query, content=bus_bytes)
    assert response.status_code == 200, response.text
    expected = [d.to_dict() for d in int8_detector.detect(bus_image, params)]
    assert_same_detections(response.json()["detections"], expected)
    if "classes" in query:
        wanted = {int8_detector.names[c] for c in params.classes or ()}
        assert {d["label"] for d in response.json()["detections"]} == wanted


def test_a_tiny_image_is_fine(client: TestClient) -> None:
    response = client.post(DETECT, content=encode(np.full((1, 1, 3), 200, np.uint8), ".png"))
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (1, 1)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter", "complaint"),
    [
        ({"conf": "1.5"}, "conf", "less than or equal to 1"),
        ({"conf": "-0.1"}, "conf", "greater than or equal to 0"),
        ({"conf": "abc"}, "conf", "'abc'"),
        ({"conf": "nan"}, "conf", "finite number"),
        ({"iou": "2"}, "iou", "'2'"),
        ({"max_det": "0"}, "max_det", "greater than or equal to 1"),
        ({"max_det": "1e9"}, "max_det", "'1e9'"),
        ({"classes": "unicorn"}, "classes", "unknown class 'unicorn'"),
        ({"classes": "person,80"}, "classes", "unknown class '80'"),
        ({"annotate": "maybe"}, "annotate", "'maybe'"),
    ],
)
def test_bad_query_values_answer_422_naming_the_parameter(
    client: TestClient, bus_bytes: bytes, query: dict[str, str], parameter: str, complaint: str
) -> None:
    response = client.post(DETECT, params=query, content=bus_bytes)
    assert_error(response, 422, "invalid_parameter", f"query parameter '{parameter}'", complaint)


@pytest.mark.parametrize(
    "body",
    [
        b"just some text",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00",
        b"PK\x03\x04\x14\x00\x00\x00",
        b"\x7fELF\x02\x01\x01\x00",
    ],
)
def test_non_images_answer_415_even_when_labelled_as_jpeg(client: TestClient, body: bytes) -> None:
    response = client.post(DETECT, content=body, headers={"content-type": "image/jpeg"})
    assert_error(response, 415, "unsupported_media_type", "JPEG, PNG, BMP or WebP")
    response = client.post(DETECT, files={"file": ("photo.jpg", body, "image/jpeg")})
    assert_error(response, 415, "unsupported_media_type")


@pytest.fixture(scope="module")
def bad_images(bus_bytes: bytes, bus_image: np.ndarray) -> dict[str, tuple[bytes, str]]:
    png = encode(bus_image, ".png")
    return {
        "truncated jpeg": (bus_bytes[: len(bus_bytes) // 2], "truncated or corrupt"),
        "truncated png": (png[: len(png) // 3], "truncated or corrupt"),
        "jpeg signature only": (b"\xff\xd8\xff" + bytes(200), "cannot read the JPEG header"),
        "100000x1 png": (crafted_png(100_000, 1), "side is longer than the limit"),
        "60000x60000 bmp": (crafted_bmp(60_000, 60_000), "3600000000 pixels"),
        "elongated png": (encode(np.zeros((40, 2000, 3), np.uint8), ".png"), "aspect ratio 50.0"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated jpeg",
        "truncated png",
        "jpeg signature only",
        "100000x1 png",
        "60000x60000 bmp",
        "elongated png",
    ],
)
def test_undecodable_or_absurd_images_answer_422(
    client: TestClient, bad_images: dict[str, tuple[bytes, str]], case: str
) -> None:
    body, reason = bad_images[case]
    assert_error(client.post(DETECT, content=body), 422, "invalid_image", reason)


@pytest.fixture(scope="module")
def small_limit_client(int8_detector: Detector) -> Iterator[TestClient]:
    with TestClient(create_app(int8_detector, ApiSettings(max_upload_bytes=100_000))) as test_client:
        yield test_client


def test_uploads_over_the_limit_answer_413(
    small_limit_client: TestClient, bus_bytes: bytes, zidane_jpg: Path
) -> None:
    assert len(bus_bytes) > 100_000
    assert_error(small_limit_client.post(DETECT, content=bus_bytes), 413, "payload_too_large", "100000 bytes")
    # The multipart envelope fits its allowance, so this is the file part itself being measured.
    multipart = small_limit_client.post(DETECT, files={"file": ("bus.jpg", bus_bytes, "image/jpeg")})
    assert_error(multipart, 413, "payload_too_large")
    zidane = zidane_jpg.read_bytes()
    assert len(zidane) < 100_000
    assert small_limit_client.post(DETECT, files={"file": ("zidane.jpg", zidane)}).status_code == 200


def test_empty_and_malformed_bodies_say_what_is_missing(client: TestClient, bus_bytes: bytes) -> None:
    assert_error(client.post(DETECT, content=b""), 400, "empty_body", "multipart field 'file'")
    no_file = client.post(DETECT, files={"image": ("bus.jpg", bus_bytes)})
    assert_error(no_file, 422, "missing_file", "'file'")
    text_field = client.post(DETECT, files={"file": (None, "a text field, not a file")})
    assert_error(text_field, 422, "missing_file")
    no_boundary = client.post(DETECT, content=b"abc", headers={"content-type": "multipart/form-data"})
    assert_error(no_boundary, 400, "malformed_multipart", "boundary")
    two_files = client.post(DETECT, files=[("file", ("a.jpg", bus_bytes)), ("file", ("b.jpg", bus_bytes))])
    assert_error(two_files, 400, "malformed_multipart", "Too many files")


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    assert_error(client.get("/v2/detect"), 404, "not_found", "/v1/detect")
    assert_error(client.get(DETECT), 405, "method_not_allowed", "POST")


# --- probes and metrics -------------------------------------------------------------------------------------


def test_healthz_and_readyz_when_a_model_is_loaded(client: TestClient, int8_detector: Detector) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == str(int8_detector.model_path)
    assert ready.json()["providers"] == list(int8_detector.providers)


def test_without_a_model_readyz_and_detect_answer_503(bus_bytes: bytes) -> None:
    with TestClient(create_app(lambda: None)) as no_model:
        assert no_model.get("/healthz").status_code == 200
        assert_error(no_model.get("/readyz"), 503, "not_ready", "/readyz")
        assert_error(no_model.post(DETECT, content=bus_bytes), 503, "not_ready")
        assert "edgefleet_model_info{" not in no_model.get("/metrics").text


def test_metrics_count_requests_stages_and_describe_the_model(
    int8_detector: Detector, bus_bytes: bytes
) -> None:
    settings = ApiSettings(workers=1, queue_size=3)
    with TestClient(create_app(int8_detector, settings)) as fresh:  # its own registry: exact counts
        assert fresh.post(DETECT, files={"file": ("bus.jpg", bus_bytes)}).status_code == 200
        assert fresh.post(DETECT, content=b"plain text").status_code == 415
        assert fresh.get("/nowhere/12345").status_code == 404
        response = fresh.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    requests = "edgefleet_api_requests_total"
    assert sample_value(samples, requests, route=DETECT, method="POST", status="200") == 1
    assert sample_value(samples, requests, route=DETECT, method="POST", status="415") == 1
    assert sample_value(samples, requests, route="unmatched", method="GET", status="404") == 1
    assert "/nowhere/12345" not in response.text, "unknown paths must not become label values"
    latency = "edgefleet_api_request_duration_seconds_count"
    assert sample_value(samples, latency, route=DETECT, method="POST") == 2
    for stage in ("decode", "pre", "infer", "post"):
        assert sample_value(samples, "edgefleet_inference_stage_seconds_count", stage=stage) == 1
    assert sample_value(samples, "edgefleet_inference_stage_seconds_sum", stage="infer") > 0
    [(model_labels, value)] = samples["edgefleet_model_info"]
    assert value == 1
    assert model_labels["path"] == str(int8_detector.model_path)
    assert "CPUExecutionProvider" in model_labels["providers"].split(",")
    assert model_labels["input_size"] == "640x640"
    assert sample_value(samples, "edgefleet_inference_pool_capacity") == 4
    assert sample_value(samples, "edgefleet_inference_pool_pending") == 0


def test_openapi_documents_the_upload(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][DETECT]["post"]
    content = operation["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "image/jpeg" in content
    assert {p["name"] for p in operation["parameters"]} == {"conf", "iou", "max_det", "classes", "annotate"}
    assert {"413", "415", "422", "503"} <= set(operation["responses"])


# --- back-pressure and failures -----------------------------------------------------------------------------


def test_saturated_pool_answers_503_with_retry_after(int8_detector: Detector, zidane_jpg: Path) -> None:
    pool = InferencePool(workers=1, queue_size=0)
    release = threading.Event()
    blocker = pool.submit(release.wait, 30)  # occupies the only worker; there is no queue
    try:
        with TestClient(create_app(int8_detector, pool=pool)) as busy:
            response = busy.post(DETECT, content=zidane_jpg.read_bytes())
            assert_error(response, 503, "overloaded", "busy")
            assert response.headers["retry-after"] == "1"
            assert busy.get("/healthz").status_code == 200
            release.set()
            assert blocker.result(timeout=10) is True
            assert busy.post(DETECT, content=zidane_jpg.read_bytes()).status_code == 200
        assert not pool.closed, "a pool handed in is left open for its owner"
    finally:
        release.set()
        pool.close()


def test_inference_pool_bounds_its_queue_and_frees_cancelled_slots() -> None:
    release = threading.Event()
    with InferencePool(workers=1, queue_size=1) as pool:
        running = pool.submit(release.wait, 30)
        waiting = pool.submit(release.wait, 30)
        with pytest.raises(
            PoolSaturatedError, match="1 inference workers are busy and 1 requests are waiting"
        ):
            pool.submit(release.wait, 30)
        assert pool.pending == 2
        assert waiting.cancel(), "a job that has not started can be cancelled"
        assert pool.pending == 1, "the cancelled job gave its slot back"
        replacement = pool.submit(lambda: "ran")
        release.set()
        assert running.result(timeout=10) is True
        assert replacement.result(timeout=10) == "ran"
    assert pool.pending == 0
    with pytest.raises(PoolClosedError):
        pool.submit(lambda: None)


def test_an_unexpected_error_becomes_a_counted_json_500(bus_bytes: bytes, int8_detector: Detector) -> None:
    failing = True

    def flaky_source() -> Detector:
        if failing:
            raise RuntimeError("model store unreadable")
        return int8_detector

    with TestClient(create_app(flaky_source)) as app_client:  # raise_server_exceptions stays on
        failing = True
        assert_error(app_client.post(DETECT, content=bus_bytes), 500, "internal_error", "RuntimeError")
        failing = False
        samples = metric_samples(app_client.get("/metrics").text)
    assert sample_value(samples, "edgefleet_api_unhandled_errors_total", exception="RuntimeError") == 1
    assert sample_value(samples, "edgefleet_api_requests_total", route=DETECT, status="500") == 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="workers"):
        ApiSettings(workers=0)
    with pytest.raises(ValidationError, match="max_uplod_bytes"):
        ApiSettings(max_uplod_bytes=5)  # type: ignore[call-arg]
    assert ApiSettings.model_fields["queue_size"].description


# --- a real server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(int8_detector: Detector) -> Iterator[int]:
    """uvicorn on a free loopback port (the socket is bound first, so there is no race for the port)."""
    app = create_app(int8_detector, ApiSettings(max_upload_bytes=100_000))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_real_server_refuses_a_chunked_body_once_it_passes_the_limit(live_server: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live_server, timeout=10)
    connection.putrequest("POST", DETECT)
    connection.putheader("Transfer-Encoding", "chunked")  # no Content-Length to check up front
    connection.endheaders()
    chunk = b"\xff\xd8\xff" + bytes(16_381)
    for _ in range(10):  # 160 kB against a 100 kB limit, and the body is never finished
        connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    response = connection.getresponse()  # answered before the body ends: the server stopped reading
    assert response.status == 413
    assert b"payload_too_large" in response.read()
    connection.close()


def test_real_server_refuses_a_declared_length_before_reading_it(live_server: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", live_server, timeout=10)
    connection.putrequest("POST", DETECT)
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()  # not one body byte sent
    response = connection.getresponse()
    assert response.status == 413
    assert b"100000 bytes" in response.read()
    connection.close()


def test_real_server_detects(live_server: int, zidane_jpg: Path) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{live_server}{DETECT}",
        params={"classes": "person"},
        content=zidane_jpg.read_bytes(),
    )
    assert response.status_code == 200, response.text
    assert {d["label"] for d in response.json()["detections"]} == {"person"}
    assert httpx.get(f"http://127.0.0.1:{live_server}/readyz").status_code == 200

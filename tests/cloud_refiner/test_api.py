"""The HTTP API in-process (Starlette's TestClient), on the real MobileNetV2 classifier."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cloud_refiner.api import PendingLimit, create_app
from cloud_refiner.classifier import Classifier
from cloud_refiner.conditioning import Conditioner, LabelSubsets
from cloud_refiner.config import ApiConfig, BatchingConfig, LimitsConfig
from cloud_refiner.metrics import RefinerMetrics
from cloud_refiner.service import RefinerService
from tests.cloud_refiner.conftest import Crops


@pytest.fixture(scope="module")
def client(mobilenet: Classifier) -> Iterator[TestClient]:
    metrics = RefinerMetrics()
    service = RefinerService(
        mobilenet,
        Conditioner(mobilenet.names, LabelSubsets.load(num_classes=1000)),
        batching=BatchingConfig(max_batch=8, max_wait_ms=5, queue_size=16),
        limits=LimitsConfig(max_crop_bytes=1_000_000),
        observer=metrics,
    ).start()
    metrics.bind(service.info, lambda: service.queue_depth, service.queue_capacity)
    config = ApiConfig(max_upload_bytes=1_500_000, max_images=4, max_pending=8)
    with TestClient(create_app(service, metrics, config)) as test_client:
        yield test_client
    service.stop()


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_refine_several_crops_with_one_edge_label_each(client: TestClient, crops: Crops) -> None:
    bus, person = crops[0][0], crops[1][0]
    response = client.post(
        "/v1/refine",
        files=[("file", ("bus.jpg", bus, "image/jpeg")), ("file", ("person.jpg", person, "image/jpeg"))],
        data={"label": ["truck", "person"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["name"] == "mobilenetv2-12-int8"
    first, second = body["results"]
    assert first["image"] == "bus.jpg"
    assert first["edge_label"] == "truck"
    assert first["conditioned"]
    truck_types = {"ambulance", "fire engine", "garbage truck", "moving van", "pickup", "police van"}
    assert first["label"] in truck_types | {"tow truck", "trailer truck"}
    assert len(first["top_k"]) == 5
    assert first["top_k"][0]["score"] >= first["top_k"][-1]["score"]
    assert second["edge_label"] == "person"
    assert not second["conditioned"]
    assert second["label"] == second["top_k"][0]["label"]


def test_raw_body_with_the_label_in_the_query(client: TestClient, crops: Crops) -> None:
    response = client.post(
        "/v1/refine?label=bus", content=crops[0][0], headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["conditioned"]
    assert result["label"] in {"minibus", "school bus", "trolleybus"}
    unlabelled = client.post("/v1/refine", content=crops[0][0]).json()["results"][0]
    assert not unlabelled["conditioned"]
    assert unlabelled["edge_label"] is None


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"content": b""}, 400, "empty_body"),
        ({"content": b"GIF89a not a crop"}, 415, "unsupported_media_type"),
        ({"content": b"\xff\xd8\xff" + b"\x00" * 1_200_000}, 413, "payload_too_large"),
        ({"content": b"\xff\xd8\xff" + b"\x00" * 2_000_000}, 413, "payload_too_large"),
        ({"content": b"\xff\xd8\xff\xe0 truncated"}, 422, "invalid_image"),
        ({"files": [("other", ("a.jpg", b"x"))]}, 422, "missing_file"),
        ({"files": [("file", ("a.jpg", b"x"))] * 5}, 400, "malformed_multipart"),
        (
            {"files": [("file", ("a.jpg", b"x"))] * 2, "data": {"label": ["a", "b", "c"]}},
            422,
            "invalid_parameter",
        ),
    ],
)
def test_bad_requests_get_json_errors(
    client: TestClient, kwargs: dict[str, Any], status: int, error: str
) -> None:
    response = client.post("/v1/refine", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"]


def test_probes_and_metrics(client: TestClient, crops: Crops) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    files = [("file", (f"{i}.jpg", jpeg, "image/jpeg")) for i, (jpeg, _) in enumerate(crops[:4])]
    assert client.post("/v1/refine", files=files).status_code == 200
    assert client.post("/v1/refine", content=b"GIF89a").status_code == 415
    values = samples(client.get("/metrics").text)
    assert values[("edgefleet_refiner_queue_depth", ())] == 0
    assert values[("edgefleet_refiner_queue_capacity", ())] == 16
    assert values[("edgefleet_refiner_batch_size_count", ())] >= 1
    assert values[("edgefleet_refiner_batch_size_sum", ())] >= 4
    refined = values[("edgefleet_refiner_latency_seconds_count", (("source", "http"),))]
    assert refined >= 4
    assert (
        values[
            ("edgefleet_refiner_crops_dropped_total", (("reason", "unsupported_type"), ("source", "http")))
        ]
        >= 1
    )
    assert any(name == "edgefleet_refiner_model_info" for name, _ in values)
    assert client.get("/nope").status_code == 404


def test_pending_limit_refuses_what_would_exceed_it() -> None:
    limit = PendingLimit(4)
    assert limit.try_take(3)
    assert not limit.try_take(2)
    limit.release(3)
    assert limit.try_take(4)
    assert limit.pending == 4

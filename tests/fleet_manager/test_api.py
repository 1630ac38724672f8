"""The REST API on SQLite and PostgreSQL: roles (401/403), device tokens and artifacts, rollout endpoints
(409 conflicts, 422 unknown models), device filters and detail, OpenAPI."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from fleet_manager.api.main import create_app
from fleet_manager.ingest import Incoming
from fleet_manager.models import Role, utcnow
from fleet_manager.provisioning import provision_device
from fleet_manager.service import FleetService
from fleet_protocol.mqtt import MessageProperties
from fleet_protocol.payloads import (
    CropMeta,
    DeviceState,
    ModelRef,
    ModelReported,
    OtaState,
    StatusPayload,
    encode,
)
from tests.broker import free_port
from tests.fleet_manager.conftest import RegisteredModels, ServerThread, make_token
from tests.fleet_manager.test_ingest import JPEG, detection, refined, telemetry


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def feed(service: FleetService, kind: str, device: str, payload: bytes, **kw: object) -> None:
    topic = f"{service.settings.topics.device_prefix(device)}/{kind}"
    service.ingestor.process([Incoming(topic=topic, payload=payload, received_at=utcnow(), **kw)])  # type: ignore[arg-type]


def status(device: str, state: DeviceState, model: ModelRef | None) -> bytes:
    return encode(StatusPayload(device_id=device, state=state, agent_version="0.1.0", active_model=model))


@pytest.fixture
def api(make_service: Callable[..., FleetService]) -> tuple[FleetService, TestClient]:
    service = make_service(None)
    return service, TestClient(create_app(service))


def test_roles_tokens_and_artifacts(
    api: tuple[FleetService, TestClient], fleet_models: RegisteredModels
) -> None:
    service, client = api
    v1 = ModelRef(name=fleet_models.name, version=fleet_models.v1.version)
    devices = {}
    for device_id in ("cam-a", "cam-b"):
        devices[device_id] = provision_device(
            service.db, service.settings, device_id, group="lobby", tags={}, actor="test"
        )
        feed(service, "status", device_id, status(device_id, DeviceState.ONLINE, v1))
    viewer, operator, admin = (
        make_token(service.db, role) for role in (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
    )
    body = {"model": fleet_models.name, "alias": "production", "target": {"device_ids": ["cam-a"]}}

    # No token, a bad token: 401 with the Bearer challenge.
    response = client.get("/api/v1/devices")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/api/v1/devices", headers=auth("eft_not-a-token")).status_code == 401
    assert client.get("/healthz").status_code == 200  # the only route without a token

    # Viewer: reads, cannot create or abort.
    assert client.get("/api/v1/devices", headers=auth(viewer)).json()["total"] == 2
    assert client.post("/api/v1/rollouts", json=body, headers=auth(viewer)).status_code == 403
    # Operator: can.
    created = client.post("/api/v1/rollouts", json=body, headers=auth(operator))
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    assert created.json()["model"]["version"] == fleet_models.v2.version
    assert client.post(f"/api/v1/rollouts/{rollout_id}/abort", headers=auth(viewer)).status_code == 403

    # One active rollout per device: 409, naming the device and the rollout holding it.
    conflict = client.post("/api/v1/rollouts", json=body, headers=auth(operator))
    assert conflict.status_code == 409
    assert conflict.json()["conflicts"] == {"cam-a": rollout_id}
    assert "already in an active rollout" in conflict.json()["detail"]
    unknown = dict(body, alias=None, version="999", target={"device_ids": ["cam-b"]})
    assert client.post("/api/v1/rollouts", json=unknown, headers=auth(operator)).status_code == 422
    nobody = dict(body, target={"groups": ["no-such-group"]})
    assert (
        "matches no registered device"
        in client.post("/api/v1/rollouts", json=nobody, headers=auth(operator)).json()["detail"]
    )
    assert client.get("/api/v1/rollouts/ro-nope", headers=auth(viewer)).status_code == 404

    # The controller starts the rollout: cam-a is told to run v2, so its device token may fetch v2 only.
    service.controller.tick()
    detail = client.get(f"/api/v1/rollouts/{rollout_id}", headers=auth(viewer)).json()
    assert detail["state"] == "running"
    assert detail["devices"][0]["phase"] == "sent"
    assert [w["devices"] for w in detail["wave_progress"]] == [1, 0, 0]
    token_a, token_b = devices["cam-a"].artifact_token, devices["cam-b"].artifact_token
    v2_url = f"/v1/artifacts/{fleet_models.name}/{fleet_models.v2.version}"
    v1_url = f"/v1/artifacts/{fleet_models.name}/{fleet_models.v1.version}"
    download = client.get(v2_url, headers=auth(token_a))
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == fleet_models.v2.sha256
    partial = client.get(v2_url, headers={**auth(token_a), "Range": "bytes=100-199"})
    assert partial.status_code == 206
    assert partial.content == download.content[100:200]
    assert client.get(v1_url, headers=auth(token_a)).status_code == 403  # not its desired model
    assert client.get(v2_url, headers=auth(token_b)).status_code == 403  # another device's artifact
    assert client.get(v2_url).status_code == 401
    assert client.get(v2_url, headers=auth(operator)).status_code == 200
    assert client.get(v2_url, headers=auth(viewer)).status_code == 403
    # A device token is no API token.
    for method, url in (
        ("GET", "/api/v1/devices"),
        ("POST", "/api/v1/rollouts"),
        ("POST", f"/api/v1/rollouts/{rollout_id}/pause"),
    ):
        assert client.request(method, url, json=body, headers=auth(token_a)).status_code == 403
    assert client.get("/api/v1/me", headers=auth(token_a)).json()["role"] == "device"

    # Operator steers the rollout.
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        response = client.post(f"/api/v1/rollouts/{rollout_id}/{action}", headers=auth(operator))
        assert response.status_code == 200, response.text
        assert response.json()["state"] == state
    again = client.post(f"/api/v1/rollouts/{rollout_id}/pause", headers=auth(operator))
    assert again.status_code == 409
    assert "aborted" in again.json()["detail"]

    # Tokens are admin business; a revoked token stops working at once.
    assert (
        client.post(
            "/api/v1/tokens", json={"name": "x", "role": "viewer"}, headers=auth(operator)
        ).status_code
        == 403
    )
    made = client.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}, headers=auth(admin))
    assert made.status_code == 201
    fresh = made.json()["token"]
    assert client.get("/api/v1/me", headers=auth(fresh)).json()["role"] == "operator"
    listed = client.get("/api/v1/tokens", headers=auth(admin)).json()
    assert all("token" not in t for t in listed)
    assert any(t["name"] == "ci" for t in listed)
    assert client.delete(f"/api/v1/tokens/{made.json()['id']}", headers=auth(admin)).status_code == 204
    assert client.get("/api/v1/me", headers=auth(fresh)).status_code == 401

    # Revoking a device revokes its artifact token.
    assert client.delete("/api/v1/devices/cam-a", headers=auth(operator)).status_code == 403
    assert client.delete("/api/v1/devices/cam-a", headers=auth(admin)).status_code == 204
    assert client.get(v2_url, headers=auth(token_a)).status_code == 403

    # The audit log names who did what.
    entries = client.get(f"/api/v1/audit?target_id={rollout_id}", headers=auth(viewer)).json()
    actions = [(e["action"], e["actor"].split(":")[-1]) for e in reversed(entries)]
    assert actions == [
        ("rollout.create", "test-operator"),
        ("rollout.start", "controller"),
        ("rollout.pause", "test-operator"),
        ("rollout.resume", "test-operator"),
        ("rollout.abort", "test-operator"),
    ]


def test_device_filters_and_detail(api: tuple[FleetService, TestClient]) -> None:
    service, client = api
    viewer = make_token(service.db, Role.VIEWER)
    layout = {
        "berlin-1": ("berlin", {"site": "berlin", "floor": "1"}, DeviceState.ONLINE, "2"),
        "berlin-2": ("berlin", {"site": "berlin", "floor": "2"}, DeviceState.OFFLINE, "1"),
        "paris-1": ("paris", {"site": "paris", "floor": "1"}, DeviceState.ONLINE, "1"),
        "paris-2": ("paris", {"site": "paris"}, DeviceState.ONLINE, "2"),
    }
    for device_id, (group, tags, state, version) in layout.items():
        provision_device(service.db, service.settings, device_id, group=group, tags=tags, actor="test")
        feed(service, "status", device_id, status(device_id, state, ModelRef(name="yolo", version=version)))
    feed(service, "status", "stray", status("stray", DeviceState.ONLINE, None))  # seen, never provisioned

    def ids(query: str) -> list[str]:
        response = client.get(f"/api/v1/devices?{query}", headers=auth(viewer))
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["items"]]

    assert ids("") == ["berlin-1", "berlin-2", "paris-1", "paris-2", "stray"]
    assert ids("group=berlin") == ["berlin-1", "berlin-2"]
    assert ids("tag=floor=1") == ["berlin-1", "paris-1"]
    assert ids("tag=site=paris&tag=floor=1") == ["paris-1"]
    assert ids("state=offline") == ["berlin-2"]
    assert ids("model=yolo@2") == ["berlin-1", "paris-2"]
    assert ids("model=yolo&state=online&group=paris") == ["paris-1", "paris-2"]
    assert ids("q=par") == ["paris-1", "paris-2"]
    assert ids("limit=2&offset=1") == ["berlin-2", "paris-1"]
    assert client.get("/api/v1/devices?tag=novalue", headers=auth(viewer)).status_code == 422

    # Detail: telemetry history, OTA history; detections with refined labels and crops.
    device = "berlin-1"
    for p95 in (11.0, 22.0):
        feed(service, "telemetry", device, encode(telemetry(device, p95)))
    report = ModelReported(
        device_id=device, rollout_id="ro-x", model=ModelRef(name="yolo", version="2"), state=OtaState.ACTIVE
    )
    feed(service, "model/reported", device, encode(report))
    event = detection(device, ["dog"])
    det = event.detections[0].det_id
    feed(service, "detections", device, encode(event))
    feed(service, "refined", device, encode(refined(device, det)))
    meta = CropMeta(
        device_id=device,
        det_id=det,
        label="dog",
        class_id=16,
        confidence=0.8,
        bbox=(1, 2, 30, 40),
        model=ModelRef(name="yolo", version="2"),
    )
    feed(
        service,
        "crops",
        device,
        JPEG,
        user_properties=MessageProperties(user_properties=tuple(meta.to_user_properties())).user_properties,
    )
    detail = client.get(f"/api/v1/devices/{device}", headers=auth(viewer)).json()
    assert detail["group"] == "berlin"
    assert detail["tags"] == {"site": "berlin", "floor": "1"}
    assert [s["latency_p95_ms"] for s in detail["telemetry_history"]] == [11.0, 22.0]
    assert detail["ota_history"][0]["state"] == "active"
    assert detail["ota_history"][0]["model"]["version"] == "2"
    since = (utcnow() + timedelta(hours=1)).isoformat()
    later = client.get(f"/api/v1/devices/{device}", params={"since": since}, headers=auth(viewer)).json()
    assert later["telemetry_history"] == []
    (shown,) = client.get(f"/api/v1/devices/{device}/detections", headers=auth(viewer)).json()
    assert shown["objects"][0]["refined"]["label"] == "golden retriever"
    assert shown["objects"][0]["has_crop"]
    crop = client.get(f"/api/v1/crops/{det}", headers=auth(viewer))
    assert crop.status_code == 200
    assert crop.headers["content-type"] == "image/jpeg"
    assert crop.content == JPEG
    assert client.get("/api/v1/devices/nope", headers=auth(viewer)).status_code == 404
    stats = client.get("/api/v1/stats", headers=auth(viewer)).json()
    assert stats["fleet"]["by_state"] == {"online": 4, "offline": 1}
    assert stats["ingest"]["stored"]["detections"] == 1

    # Operators may regroup and retag.
    operator = make_token(service.db, Role.OPERATOR)
    patched = client.patch(
        "/api/v1/devices/paris-2", json={"group": "lyon", "tags": {"site": "lyon"}}, headers=auth(operator)
    )
    assert patched.status_code == 200
    assert patched.json()["group"] == "lyon"
    assert ids("tag=site=lyon") == ["paris-2"]


def test_openapi_documents_routes_and_bearer(api: tuple[FleetService, TestClient]) -> None:
    service, _ = api
    with ServerThread(create_app(service), free_port()) as server:  # a real HTTP server this time
        spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in (
        "/api/v1/devices",
        "/api/v1/devices/{device_id}",
        "/api/v1/rollouts",
        "/api/v1/rollouts/{rollout_id}/rollback",
        "/api/v1/tokens",
        "/api/v1/audit",
        "/v1/artifacts/{name}/{version}",
    ):
        assert path in spec["paths"], path
    create = spec["paths"]["/api/v1/rollouts"]["post"]
    assert {"201", "409", "422"} <= set(create["responses"])

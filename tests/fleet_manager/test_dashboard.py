"""The web dashboard: server-side rendering, sign-in, roles and CSRF over HTTP (SQLite and PostgreSQL), and
the whole operator flow in a real Chromium (Playwright) against a real broker and a simulated fleet.

The browser test writes a screenshot of every page; set EDGEFLEET_SCREENSHOT_DIR (as
docs/screenshots/make_screenshots.py does) to keep them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import pytest
from fastapi.testclient import TestClient

from fleet_manager.api.main import create_app
from fleet_manager.ingest import Incoming
from fleet_manager.models import Role, utcnow
from fleet_manager.provisioning import provision_device
from fleet_manager.service import FleetService
from fleet_protocol.ids import new_det_id
from fleet_protocol.payloads import (
    CropMeta,
    DetectionEvent,
    DetectionItem,
    DeviceState,
    LabelScore,
    ModelRef,
    OutboxStats,
    RefinedPayload,
    StageLatency,
    StageTimingMs,
    StatusPayload,
    TelemetryPayload,
    encode,
)
from tests.broker import MosquittoBroker, free_port
from tests.fleet_manager.conftest import (
    RegisteredModels,
    ServerThread,
    make_token,
    topics_of,
    wait_until,
)
from tests.fleet_manager.fleet_sim import SimDevice, SimFleet

SCREENSHOT_LIMIT = 300 * 1024
REFINED_LABELS = {"person": "pedestrian", "bus": "city bus"}  # what the test's "cloud refiner" says
CSRF = re.compile(r'name="csrf-token" content="([0-9a-f]{64})"')


# ---- feeding the fleet manager as devices would ------------------------------------------------------


def feed(service: FleetService, kind: str, device: str, payload: bytes, **kw: Any) -> None:
    topic = f"{topics_of(service).device_prefix(device)}/{kind}"
    received = kw.pop("received_at", None) or utcnow()
    service.ingestor.process([Incoming(topic=topic, payload=payload, received_at=received, **kw)])


def online(
    service: FleetService, device: str, model: ModelRef, state: DeviceState = DeviceState.ONLINE
) -> None:
    status = StatusPayload(device_id=device, state=state, agent_version="0.1.0", active_model=model)
    feed(service, "status", device, encode(status))


def telemetry_history(service: FleetService, device: str, minutes: int = 30) -> None:
    """A recorded half hour of telemetry: throughput dips while latency peaks, as under load."""
    now = utcnow()
    for i in range(minutes):
        load = (i % 10) / 10
        payload = TelemetryPayload(
            device_id=device,
            interval_s=60,
            fps=14.0 - 5.0 * load,
            latency_ms={"total": StageLatency(p50=22.0 + 10 * load, p95=31.0 + 25 * load)},
            outbox=OutboxStats(depth=i % 4, bytes=1000),
            cpu_percent=35.0 + 30 * load,
            memory_mb=310.0,
            temperature_c=51.0 + 8 * load,
        )
        received = now - timedelta(minutes=minutes - i)
        feed(service, "telemetry", device, encode(payload), received_at=received)


def detections(
    service: FleetService, device: str, model: ModelRef, image: Path, detector: Any | None = None
) -> list[tuple[str, str]]:
    """Detections of `image` (by the real detector when given, else two fixed boxes), with JPEG crops and
    a refined label for each object; returns (det_id, edge label)."""
    frame = cv2.imread(str(image))
    assert frame is not None, f"cannot read {image}"
    height, width = frame.shape[:2]
    if detector is not None:
        found = [(d.class_id, d.label, d.confidence, d.bbox) for d in detector.detect(frame)[:6]]
    else:
        found = [
            (0, "person", 0.87, (50.0, 400.0, 250.0, 900.0)),
            (5, "bus", 0.81, (20.0, 230.0, 800.0, 750.0)),
        ]
    assert found, "the detector found nothing in the test image"
    items = [
        DetectionItem(det_id=new_det_id(), class_id=c, label=label, confidence=conf, bbox=box)
        for c, label, conf, box in found
    ]
    event = DetectionEvent(
        device_id=device,
        source="cam0",
        frame_seq=42,
        model=model,
        width=width,
        height=height,
        timing_ms=StageTimingMs(pre=2.1, infer=18.4, post=0.9),
        detections=items,
    )
    feed(service, "detections", device, encode(event))
    for item in items:
        x1, y1, x2, y2 = (int(v) for v in item.bbox)
        ok, jpeg = cv2.imencode(".jpg", frame[y1:y2, x1:x2], [cv2.IMWRITE_JPEG_QUALITY, 80])
        assert ok
        meta = CropMeta(
            device_id=device,
            det_id=item.det_id,
            label=item.label,
            class_id=item.class_id,
            confidence=item.confidence,
            bbox=item.bbox,
            model=model,
        )
        feed(service, "crops", device, jpeg.tobytes(), user_properties=tuple(meta.to_user_properties()))
        label = REFINED_LABELS.get(item.label, item.label)
        refined = RefinedPayload(
            device_id=device,
            det_id=item.det_id,
            edge_label=item.label,
            refined_label=label,
            score=0.9,
            top_k=[LabelScore(label=label, score=0.9)],
            refiner_model=ModelRef(name="refiner", version="1"),
            latency_ms=35.0,
        )
        feed(service, "refined", device, encode(refined))
    return [(item.det_id, item.label) for item in items]


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


# ---- server-side: pages, sign-in, roles, CSRF (no browser) -------------------------------------------


def test_pages_roles_and_csrf(
    make_service: Callable[..., FleetService], fleet_models: RegisteredModels, bus_jpg: Path
) -> None:
    service = make_service(None)
    v1 = ModelRef(name=fleet_models.name, version=fleet_models.v1.version)
    for device_id, group in (("cam-a", "lobby"), ("cam-b", "lobby"), ("cam-c", "dock")):
        provision_device(
            service.db, service.settings, device_id, group=group, tags={"site": "berlin"}, actor="test"
        )
        online(service, device_id, v1)
    online(service, "cam-c", v1, DeviceState.OFFLINE)
    telemetry_history(service, "cam-a", minutes=5)
    objects = detections(service, "cam-a", v1, bus_jpg)
    viewer, operator = make_token(service.db, Role.VIEWER), make_token(service.db, Role.OPERATOR)
    device_token = make_token(service.db, Role.DEVICE, device_id="cam-a")
    client = TestClient(create_app(service), follow_redirects=False)

    # Not signed in: pages redirect to the sign-in page (keeping where to go), scripts get 401.
    assert client.get("/").headers["location"] == "/login"
    assert client.get("/devices?group=lobby").headers["location"] == "/login?next=%2Fdevices%3Fgroup%3Dlobby"
    assert client.get("/devices?partial=1", headers={"X-Requested-With": "fetch"}).status_code == 401
    assert client.post("/rollouts", data={"model_ref": "x@1"}).headers["location"] == "/login"
    login_page = client.get("/login")
    assert login_page.status_code == 200
    assert 'name="token"' in login_page.text
    assert "default-src 'self'" in login_page.headers["content-security-policy"]
    assert client.get("/static/dashboard.js").status_code == 200
    assert "&lt;script&gt;" in client.get('/login?next=/"><script>x()</script>').text  # escaped

    # Bad tokens: unknown → 401, a device token → 403; neither gets a cookie.
    bad = client.post("/login", data={"token": "eft_nope"})
    assert bad.status_code == 401
    assert "unknown or revoked" in bad.text
    assert "set-cookie" not in bad.headers
    assert client.post("/login", data={"token": device_token}).status_code == 403
    # A sign-in posted from another site is refused before the token is even looked at.
    assert (
        client.post("/login", data={"token": viewer}, headers={"Origin": "https://evil.example"}).status_code
        == 403
    )

    # Viewer: the cookie is HttpOnly and SameSite=Strict; pages render; no way to act.
    signed_in = client.post("/login", data={"token": viewer, "next": "/devices"})
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/devices"
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/" in cookie
    assert viewer not in signed_in.text
    assert client.post("/login", data={"token": viewer, "next": "//evil.example/"}).headers["location"] == "/"
    overview = client.get("/")
    assert overview.status_code == 200
    assert re.search(r'data-count="online">2<', overview.text), "2 devices online"
    assert re.search(r'data-count="offline">1<', overview.text)
    assert f"{fleet_models.name}@{fleet_models.v1.version}" in overview.text
    assert overview.text.count('<svg class="chart"') == 2
    assert 'class="chart-bar s2"' in overview.text  # cam-a's p95 latency in the histogram
    lobby = client.get("/devices?group=lobby")
    assert 'data-total="2"' in lobby.text
    assert 'data-device="cam-a"' in lobby.text
    assert 'data-device="cam-c"' not in lobby.text
    assert 'data-total="1"' in client.get("/devices?state=offline&partial=1").text
    assert 'data-total="3"' in client.get("/devices?tag=site%3Dberlin").text
    assert "ignored: write key=value" in client.get("/devices?tag=nonsense").text
    device = client.get("/devices/cam-a")
    assert device.status_code == 200
    assert "city bus" in device.text
    assert 'class="chart"' in device.text
    assert "<polyline" in device.text
    crop = client.get(f"/crops/{objects[0][0]}.jpg")
    assert crop.status_code == 200
    assert crop.headers["content-type"] == "image/jpeg"
    assert crop.content[:2] == b"\xff\xd8"
    assert client.get("/devices/nope").status_code == 404
    models = wait_until(  # read from MLflow on a thread; the page shows "loading" until then
        lambda: (
            (r := client.get("/models?partial=1")).status_code == 200
            and f'data-model="{fleet_models.name}"' in r.text
            and r
        ),
        30,
        "the models page to show the registry",
    )
    assert f"@production → v{fleet_models.v2.version}" in models.text
    rollouts = client.get("/rollouts")
    assert 'id="rollout-form"' not in rollouts.text  # no create form for viewers

    rollout = service.controller.create(_spec(fleet_models, {"device_ids": ["cam-a"]}), "test")
    page = client.get(f"/rollouts/{rollout.id}")
    assert page.status_code == 200
    assert re.search(r'data-state="(pending|running)"', page.text)
    assert "data-action=" not in page.text, "a viewer sees no action buttons"
    token = csrf_of(page.text)
    # A viewer forging the POST, even with a valid CSRF token: 403, and nothing happens.
    forged = client.post(f"/rollouts/{rollout.id}/abort", data={"csrf_token": token})
    assert forged.status_code == 403
    assert "operator role" in forged.text
    forged_create = client.post(
        "/rollouts", data={"csrf_token": token, "model_ref": f"{fleet_models.name}@1"}
    )
    assert forged_create.status_code == 403
    assert service.controller.get(rollout.id)[0].state in ("pending", "running")

    # Operator: action buttons; a POST without (or with another session's) CSRF token is refused.
    client.cookies.clear()
    client.post("/login", data={"token": operator})
    page = client.get(f"/rollouts/{rollout.id}")
    assert 'data-action="pause"' in page.text
    assert 'data-action="abort"' in page.text
    assert client.post(f"/rollouts/{rollout.id}/pause", data={}).status_code == 403
    assert client.post(f"/rollouts/{rollout.id}/pause", data={"csrf_token": token}).status_code == 403
    op_token = csrf_of(page.text)
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}, {"Origin": "http://evil.example"}):
        refused = client.post(f"/rollouts/{rollout.id}/pause", data={"csrf_token": op_token}, headers=headers)
        assert refused.status_code == 403, headers
    paused = client.post(  # a proxy terminating TLS: the Origin's scheme may differ, its host may not
        f"/rollouts/{rollout.id}/pause",
        data={"csrf_token": op_token},
        headers={"Origin": "https://testserver"},
    )
    assert paused.status_code == 303
    assert service.controller.get(rollout.id)[0].state == "paused"
    resumed = client.post(
        f"/rollouts/{rollout.id}/resume", data={"csrf_token": op_token}, headers={"X-Requested-With": "fetch"}
    )
    assert resumed.status_code == 200
    assert resumed.json()["ok"]
    assert resumed.json()["state"] in ("pending", "running")
    again = client.post(
        f"/rollouts/{rollout.id}/resume", data={"csrf_token": op_token}, headers={"X-Requested-With": "fetch"}
    )
    assert again.status_code == 409
    assert "cannot resume" in again.json()["error"]

    # The models page's "Roll out…" link fills the form in.
    prefilled = client.get(f"/rollouts?model={fleet_models.name}%40{fleet_models.v1.version}")
    assert f'value="{fleet_models.name}@{fleet_models.v1.version}"' in prefilled.text
    assert f'<option value="{fleet_models.name}@production">' in prefilled.text  # the model's refs

    # The create form: errors come back on the form (values kept), conflicts name the devices.
    form = {
        "csrf_token": op_token,
        "model_ref": f"{fleet_models.name}@production",
        "groups": "lobby",
        "waves": "50, 100",
        "success_pct": "100",
        "error_pct": "10",
        "on_error": "pause",
        "probation_s": "1",
        "require_telemetry": "on",
    }
    conflict = client.post("/rollouts", data=form)
    assert conflict.status_code == 409
    assert "cam-a" in conflict.text
    assert rollout.id in conflict.text
    assert 'value="50, 100"' in conflict.text
    invalid = client.post("/rollouts", data={**form, "groups": "dock", "waves": "50, 90"})
    assert invalid.status_code == 422
    assert "Waves: " in invalid.text
    unknown = client.post(
        "/rollouts", data={**form, "groups": "dock", "model_ref": f"{fleet_models.name}@999"}
    )
    assert unknown.status_code == 422
    assert "not in the registry" in unknown.text
    created = client.post("/rollouts", data={**form, "groups": "dock"})
    assert created.status_code == 303, created.text
    new_id = created.headers["location"].removeprefix("/rollouts/")
    made, rows = service.controller.get(new_id)
    assert made.model_version == fleet_models.v2.version
    assert [r.device_id for r in rows] == ["cam-c"]
    assert made.waves == [50.0, 100.0]
    assert made.probation_s == 1.0
    assert made.success_threshold == 1.0

    # Sign out: the cookie goes, and so does access.
    out = client.post("/logout", data={"csrf_token": op_token})
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    assert client.get("/").status_code == 303


def _spec(models: RegisteredModels, target: dict[str, Any]) -> Any:
    from fleet_manager.rollouts import RolloutSpec

    return RolloutSpec.model_validate(
        {"model": models.name, "alias": "production", "target": target, "waves": [100], "probation_s": 0.3}
    )


# ---- the browser: the operator flow in Chromium ----------------------------------------------------


def chromium_executable() -> str:
    path = (
        os.environ.get("EDGEFLEET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not path:
        pytest.fail(
            "the dashboard's browser tests need Chromium: run `make chromium` (Debian/Ubuntu: "
            "`sudo apt-get install chromium`), or point EDGEFLEET_CHROMIUM at a Chrome/Chromium binary",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable())
        try:
            yield chromium
        finally:
            chromium.close()


class Screenshots:
    """Full-page PNGs of each page, each checked to be a PNG small enough to commit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.taken: list[str] = []

    def __call__(self, page: Any, name: str) -> None:
        path = self.folder / f"{name}.png"
        page.wait_for_load_state("networkidle")
        page.evaluate("() => { document.getElementById('toast').hidden = true; }")
        page.screenshot(path=str(path), full_page=True)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
        assert len(data) < SCREENSHOT_LIMIT, f"{path} is {len(data) // 1024} KiB, over the 300 KiB limit"
        self.taken.append(name)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_operator_flow_in_chromium(
    browser: Any,
    make_service: Callable[..., FleetService],
    mqtt_broker: MosquittoBroker,
    fleet_models: RegisteredModels,
    bus_jpg: Path,
    int8_detector: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    service = make_service(mqtt_broker)
    name, v1, v2 = fleet_models.name, fleet_models.v1.version, fleet_models.v2.version
    start_model = ModelRef(name=name, version=v1)
    lobby = [f"cam-{i:02d}" for i in range(4)]
    dock = [f"cam-{i:02d}" for i in range(4, 8)]
    for device_id in lobby + dock:
        group, site = ("lobby", "berlin") if device_id in lobby else ("dock", "hamburg")
        provision_device(
            service.db, service.settings, device_id, group=group, tags={"site": site}, actor="test"
        )
    telemetry_history(service, "cam-00")
    objects = detections(service, "cam-00", start_model, bus_jpg, int8_detector)
    operator, viewer = make_token(service.db, Role.OPERATOR), make_token(service.db, Role.VIEWER)
    shot = Screenshots(Path(os.environ.get("EDGEFLEET_SCREENSHOT_DIR") or tmp_path / "screenshots"))
    sim_devices = [SimDevice(d, start_model, latency_ms=24.0 + i) for i, d in enumerate(lobby + dock)]

    with (
        ServerThread(create_app(service), free_port()) as server,
        SimFleet(mqtt_broker, topics_of(service), sim_devices) as sim,
    ):
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("dialog", lambda dialog: dialog.accept())
        problems: list[str] = []  # script errors and Content-Security-Policy violations
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)

        # Sign in: the dashboard sends us to the sign-in page first.
        page.goto(server.url + "/devices")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Fdevices$"))
        shot(page, "login")
        page.fill("#token", operator)
        page.click("button[type=submit]")
        expect(page).to_have_url(server.url + "/devices")
        cookie = next(c for c in context.cookies() if c["name"] == "edgefleet_session")
        assert cookie["httpOnly"]
        assert cookie["sameSite"] == "Strict"

        # The devices, filled in live as the simulated fleet comes online.
        expect(page.locator("#devices tbody tr")).to_have_count(8)
        expect(page.locator("#devices .badge.st-online")).to_have_count(8, timeout=20_000)
        shot(page, "devices")
        page.select_option("#f-group", "lobby")
        page.click(".filters button[type=submit]")
        expect(page).to_have_url(re.compile(r"group=lobby"))
        expect(page.locator("#devices tbody tr")).to_have_count(4)
        page.select_option("#f-group", "")
        page.select_option("#f-tag", "site=hamburg")
        page.click(".filters button[type=submit]")
        expect(page.locator("#devices tbody tr")).to_have_count(4)
        assert page.locator('#devices tr[data-device="cam-07"]').count() == 1

        # The models page reads the registry: both versions, the alias and its history.
        page.click("nav >> text=Models")
        model = page.locator(f'section[data-model="{name}"]')
        expect(model.locator("table.versions tbody tr")).to_have_count(2)
        expect(model.locator("h2 .alias")).to_have_text(f"@production → v{v2}")
        expect(model.locator(".alias-history tbody tr")).to_have_count(1)
        shot(page, "models")

        # Create a rollout of @production to the lobby and watch it complete, without reloading the page.
        page.click("nav >> text=Rollouts")
        page.fill("#model_ref", f"{name}@production")
        page.fill("#groups", "lobby")
        page.fill("#waves", "50, 100")
        page.fill("#success_pct", "100")
        page.fill("#probation_s", "0.5")
        page.click("#create-rollout")
        page.wait_for_url(re.compile(r"/rollouts/ro-"))
        first = page.url.rsplit("/", 1)[1]
        page.evaluate("window.__sameDocument = true")
        state = page.locator("#rollout-state")
        expect(state).to_have_attribute("data-state", "completed", timeout=45_000)
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded instead of updating"
        expect(page.locator('#rollout-devices tbody tr[data-phase="active"]')).to_have_count(4)
        assert all(sim.model_of(d) == (name, v2) for d in lobby)
        assert page.locator("button[data-action=pause]").count() == 0  # nothing to pause when complete

        # Pause and resume one: the dock devices hold their updates while we steer.
        sim.hold()
        page.click("nav >> text=Rollouts")
        page.fill("#model_ref", f"{name}@{v2}")
        page.fill("#groups", "dock")
        page.fill("#waves", "25, 100")
        page.fill("#success_pct", "100")
        page.fill("#probation_s", "0.5")
        page.click("#create-rollout")
        page.wait_for_url(re.compile(r"/rollouts/ro-"))
        second = page.url.rsplit("/", 1)[1]
        assert second != first
        expect(state).to_have_attribute("data-state", "running")
        expect(page.locator('#rollout-devices tr[data-phase="sent"]')).to_have_count(1)
        page.click("button[data-action=pause]")
        expect(state).to_have_attribute("data-state", "paused")
        expect(page.locator("#toast")).to_contain_text("paused")
        expect(page.locator("button[data-action=resume]")).to_be_visible()
        page.click("nav >> text=Overview")
        expect(page.locator('[data-count="online"]')).to_have_text("8")
        expect(page.locator(f'#active-rollouts tr[data-rollout="{second}"] .badge')).to_have_text("paused")
        shot(page, "overview")
        page.goto(f"{server.url}/rollouts/{second}")
        page.click("button[data-action=resume]")
        expect(state).to_have_attribute("data-state", "running")
        sim.release()
        expect(state).to_have_attribute("data-state", "completed", timeout=45_000)
        expect(page.locator("#timeline")).to_contain_text("rollout.pause")
        expect(page.locator("#timeline")).to_contain_text("rollout.resume")
        shot(page, "rollout")

        # Abort one: the lobby is told to go back to v1, then the rollout is aborted mid-way.
        sim.hold()
        page.click("nav >> text=Rollouts")
        page.fill("#model_ref", f"{name}@{v1}")
        page.fill("#groups", "lobby")
        page.fill("#waves", "50, 100")
        page.click("#create-rollout")
        page.wait_for_url(re.compile(r"/rollouts/ro-"))
        third = page.url.rsplit("/", 1)[1]
        expect(page.locator('#rollout-devices tr[data-phase="sent"]')).to_have_count(2)
        page.click("button[data-action=abort]")  # confirm() is accepted
        expect(state).to_have_attribute("data-state", "aborted")
        expect(page.locator('#rollout-devices tr[data-phase="cancelled"]')).to_have_count(4)
        expect(page.locator("#actions button[data-action]")).to_have_count(1)  # only rollback is left
        sim.release()
        page.click("nav >> text=Rollouts")
        for rollout_id, expected in ((first, "completed"), (second, "completed"), (third, "aborted")):
            expect(page.locator(f'#rollouts tr[data-rollout="{rollout_id}"] .badge')).to_have_text(expected)
        shot(page, "rollouts")

        # The device page: status, charts from the telemetry history, detections with crops, OTA history.
        page.goto(f"{server.url}/devices/cam-00")
        expect(page.locator("#active-model")).to_have_text(f"{name}@{v2}")
        expect(page.locator("#chart-fps polyline")).to_have_count(1)
        expect(page.locator("#chart-latency polyline")).to_have_count(2)
        expect(page.locator(".det")).to_have_count(len(objects))
        first_crop = page.locator(f'.det[data-det="{objects[0][0]}"] img')
        expect(first_crop).to_be_visible()
        assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", first_crop.element_handle())
        for det_id, label in objects:
            refined = REFINED_LABELS.get(label, label)
            expect(page.locator(f'.det[data-det="{det_id}"] .refined')).to_contain_text(refined)
        expect(page.locator("#ota-history tbody tr").first).to_be_visible()
        expect(page.locator("#ota-history")).to_contain_text("active")
        shot(page, "device")
        assert problems == []
        context.close()

        # A viewer: sees everything, gets no buttons and no create form; a forged POST gets 403.
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{server.url}/rollouts/{second}")
        page.fill("#token", viewer)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{server.url}/rollouts/{second}")
        expect(page.locator("[data-role]")).to_have_text("viewer")
        expect(page.locator("#rollout-state")).to_have_attribute("data-state", "completed")
        assert page.locator("button[data-action]").count() == 0
        page.goto(f"{server.url}/rollouts")
        assert page.locator("#rollout-form").count() == 0
        assert page.locator("#rollouts tbody tr").count() == 3
        forged = page.evaluate(
            """async (id) => {
                const csrf = document.querySelector('meta[name="csrf-token"]').content;
                const body = () => new URLSearchParams({csrf_token: csrf});
                const post = (url) => fetch(url, {method: "POST", body: body()});
                return [(await post(`/rollouts/${id}/rollback`)).status, (await post("/rollouts")).status];
            }""",
            second,
        )
        assert forged == [403, 403]
        assert service.controller.get(second)[0].state == "completed"
        page.click("#logout")
        expect(page).to_have_url(re.compile(r"/login$"))
        page.goto(server.url + "/")
        expect(page).to_have_url(re.compile(r"/login"))
        context.close()
    assert shot.taken == ["login", "devices", "models", "overview", "rollout", "rollouts", "device"]

"""OTA fault injection on one running agent: every fault ends with the agent serving a verified model and a
truthful retained `model/reported`. Real Mosquitto, real onnxruntime, the artifact app on a real uvicorn.

One agent serves the whole module (faults that leave the device running need no fresh process); each test
starts from whatever model the previous one left active and names a model with bytes of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.detector import Detector
from fleet_protocol.onnx_model import SessionOptions
from fleet_protocol.payloads import ModelRef, ModelReported, OtaState, encode
from fleet_protocol.signing import generate_keypair, load_private_key
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker
from tests.device_agent.agent_runner import AgentProcess, wait_until, write_agent_config
from tests.device_agent.ota_helpers import (
    TOKEN,
    ArtifactServer,
    content_slow_model,
    desired_for,
    relabelled,
    reports,
    states_of,
    wait_report,
    wrong_output_model,
)
from tests.device_agent.test_ota_e2e import publish_desired, watcher

TOPICS = Topics()
FACTOR = 1.5


@dataclass(frozen=True)
class Calibration:
    """This machine's speed now, so the latency budget and the slow model scale with it (a shared CI box
    can be several times slower than an idle laptop): the budget is 4x a normal frame, and the slow model
    needs about 2.5x the rollback limit per real frame."""

    frame_ms: float
    conv_ms: float

    @property
    def budget_ms(self) -> float:
        return max(400.0, 4 * self.frame_ms)

    @property
    def slow_convs(self) -> int:
        return max(4, min(64, math.ceil(2.5 * self.budget_ms * FACTOR / self.conv_ms)))


def calibrate(int8_model: Path, frame: Any, folder: Path) -> Calibration:
    options = SessionOptions(intra_op_threads=1)  # as the agent runs it

    def median_ms(path: Path) -> float:
        detector = Detector(path, session_options=options)
        return sorted(detector.run(frame).timing.total_ms for _ in range(3))[1]

    frame_ms = median_ms(int8_model)
    four = median_ms(content_slow_model(int8_model, folder / "calibrate.onnx", convs=4))
    return Calibration(frame_ms=frame_ms, conv_ms=max(1.0, (four - frame_ms) / 4))


@dataclass
class Fleet:
    agent: AgentProcess
    server: ArtifactServer
    broker: MosquittoBroker
    inbox: Inbox
    key: Any
    models: Path
    source_model: Path
    calibration: Calibration

    @property
    def device(self) -> str:
        return self.agent.device_id

    def running(self) -> ModelRef:
        active = self.agent.status()["active_model"]
        return ModelRef(name=active["name"], version=active["version"])

    def variant(self, version: str, source: Path | None = None) -> Path:
        return relabelled(source or self.source_model, self.models / f"variant-{version}.onnx", version)

    def send(self, path: Path, version: str, rollout: str, *, serve: bool = True, **overrides: Any) -> None:
        if serve:
            self.server.add("yolov8n", version, path)
        options: dict[str, Any] = {"private_key": self.key, **overrides}
        desired = desired_for(
            self.device,
            path,
            name="yolov8n",
            version=version,
            base_url=self.server.base_url,
            rollout_id=rollout,
            **options,
        )
        publish_desired(self.broker, self.device, encode(desired))

    def outcome(self, rollout: str, states: set[OtaState], timeout: float = 90) -> ModelReported:
        return wait_report(
            self.inbox,
            lambda r: (
                r.rollout_id == rollout
                and r.state in states
                and (r.state is not OtaState.ACTIVE or r.progress == 1.0)
            ),
            timeout,
            f"{sorted(s.value for s in states)} for {rollout}",
        )

    def assert_serving(self, expected: ModelRef) -> None:
        status = self.agent.status()
        assert status["active_model"] == expected.model_dump()
        before = status["frames_processed"]
        wait_until(lambda: self.agent.status()["frames_processed"] > before, 20, "frames still processed")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker, int8_model: Path, shared: Path
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("ota-faults")
    private_pem, public_pem = generate_keypair()
    (root / "registry.key").write_bytes(private_pem)
    (root / "data" / "trust").mkdir(parents=True)
    (root / "data" / "trust" / "registry.pub").write_bytes(public_pem)
    models = root / "models-src"
    models.mkdir()
    server = ArtifactServer(root / "artifacts").start()
    video = shared / "data/video/vtest.avi"
    capture = cv2.VideoCapture(str(video))
    ok, frame = capture.read()
    capture.release()
    assert ok
    calibration = calibrate(int8_model, frame, models)
    config = write_agent_config(
        root,
        device_id=f"ota-faults-{int(time.time() * 1000) % 10**8}",
        broker_port=mqtt_broker.port,
        model=int8_model,
        sources=[
            {
                "id": "hall",
                "kind": "video",
                "uri": str(video),
                "fps": 5,
                "loop": True,
            }
        ],
        publish={"mode": "every_frame", "publish_empty": True},
        crops={"enabled": False},
        ota={
            "token": TOKEN,
            "latency_budget_ms": calibration.budget_ms,
            "rollback_factor": FACTOR,
            "probation_s": 1.0,
            "probation_frames": 3,
            "retry_min_s": 0.2,
            "retry_max_s": 1.0,
            "download_timeout_s": 5,
        },
    )
    agent = AgentProcess(config)
    inbox = Inbox()
    watch = watcher(mqtt_broker, TOPICS.device_prefix(agent.device_id) + "/#", inbox)
    agent.start()
    try:
        agent.wait_status()
        wait_report(inbox, lambda r: r.state is OtaState.ACTIVE, 60, "at start")
        key = load_private_key(root / "registry.key")
        yield Fleet(agent, server, mqtt_broker, inbox, key, models, int8_model, calibration)
        assert agent.alive, agent.log_tail()
    finally:
        watch.disconnect()
        publish_desired(mqtt_broker, agent.device_id, b"")
        agent.kill9()
        server.kill()


def test_wrong_sha256_fails_in_verifying_and_keeps_the_model(fleet: Fleet) -> None:
    running = fleet.running()
    path = fleet.variant("10")
    fleet.send(path, "10", "r-sha", sha256="ab" * 32)  # a valid signature over the wrong digest
    failed = fleet.outcome("r-sha", {OtaState.FAILED, OtaState.ACTIVE})
    assert failed.state is OtaState.FAILED
    assert failed.error is not None
    assert "sha256 mismatch" in failed.error
    assert failed.previous_model == running
    assert states_of(fleet.inbox, "r-sha") == [OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.FAILED]
    fleet.assert_serving(running)


def test_bad_signature_is_refused_before_any_download(fleet: Fleet) -> None:
    running = fleet.running()
    path = fleet.variant("11")
    stranger = Ed25519PrivateKey.generate()
    fleet.send(path, "11", "r-sig", private_key=stranger)
    failed = fleet.outcome("r-sig", {OtaState.FAILED, OtaState.ACTIVE})
    assert failed.state is OtaState.FAILED
    assert failed.error is not None
    assert "does not verify" in failed.error
    assert states_of(fleet.inbox, "r-sig") == [OtaState.FAILED]
    assert not [r for r in fleet.server.requests() if r["path"].endswith("/yolov8n/11")]
    fleet.assert_serving(running)


def test_unsigned_model_is_refused(fleet: Fleet) -> None:
    running = fleet.running()
    path = fleet.variant("12")
    fleet.send(path, "12", "r-unsigned", private_key=None)
    failed = fleet.outcome("r-unsigned", {OtaState.FAILED, OtaState.ACTIVE})
    assert failed.state is OtaState.FAILED
    assert failed.error is not None
    assert "unsigned" in failed.error
    assert failed.previous_model == running
    fleet.assert_serving(running)


def test_valid_onnx_with_the_wrong_output_shape_fails_in_staging(fleet: Fleet) -> None:
    running = fleet.running()
    path = wrong_output_model(fleet.source_model, fleet.models / "wrong-output.onnx")
    fleet.send(path, "13", "r-shape")
    failed = fleet.outcome("r-shape", {OtaState.FAILED, OtaState.ACTIVE})
    assert failed.state is OtaState.FAILED
    assert failed.error is not None
    assert "output shape [1, 80, 8400]" in failed.error
    assert states_of(fleet.inbox, "r-shape") == [
        OtaState.DOWNLOADING,
        OtaState.VERIFYING,
        OtaState.STAGING,
        OtaState.FAILED,
    ]
    fleet.assert_serving(running)


def test_truncated_download_resumes_with_range(fleet: Fleet) -> None:
    path = fleet.variant("14")
    size = path.stat().st_size
    fleet.server.add("yolov8n", "14", path, truncate_first_at=size * 2 // 5)
    fleet.send(path, "14", "r-trunc", serve=False)
    done = fleet.outcome("r-trunc", {OtaState.FAILED, OtaState.ACTIVE, OtaState.ROLLED_BACK})
    assert done.state is OtaState.ACTIVE, done.error
    assert done.model == ModelRef(name="yolov8n", version="14")
    gets = [r for r in fleet.server.requests() if r["path"].endswith("/yolov8n/14")]
    assert [(r["range"], r["status"]) for r in gets] == [(None, 200), (f"bytes={size * 2 // 5}-", 206)]
    retried = [r for r in reports(fleet.inbox) if r.rollout_id == "r-trunc" and r.error]
    assert retried, "no download error was reported before the resume"
    assert any(reason in (retried[0].error or "") for reason in ("ended early", "broke off"))
    fleet.assert_serving(ModelRef(name="yolov8n", version="14"))


def test_download_server_dying_mid_transfer_then_returning_converges(fleet: Fleet, tmp_path: Path) -> None:
    path = fleet.variant("15")
    size = path.stat().st_size
    second = ArtifactServer(tmp_path / "second")
    second.add("yolov8n", "15", path, rate_bps=size / 4)  # about 4 s for the whole file
    second.start()
    try:
        desired = desired_for(
            fleet.device,
            path,
            name="yolov8n",
            version="15",
            base_url=second.base_url,
            rollout_id="r-dies",
            private_key=fleet.key,
        )
        publish_desired(fleet.broker, fleet.device, encode(desired))
        wait_report(
            fleet.inbox,
            lambda r: r.rollout_id == "r-dies" and r.state is OtaState.DOWNLOADING and r.progress >= 0.15,
            60,
            "download progress",
        )
        second.kill()
        down = wait_report(
            fleet.inbox,
            lambda r: r.rollout_id == "r-dies" and r.state is OtaState.DOWNLOADING and r.error is not None,
            30,
            "a download error while the server is down",
        )
        assert down.progress >= 0.15
        time.sleep(1.0)  # a few failed attempts against a closed port
        second.set_faults("yolov8n", "15")
        second.start()
        done = fleet.outcome("r-dies", {OtaState.FAILED, OtaState.ACTIVE, OtaState.ROLLED_BACK})
        assert done.state is OtaState.ACTIVE, done.error
        resumed = [r for r in second.requests() if r["range"] is not None]
        assert resumed
        assert resumed[-1]["status"] == 206
        fleet.assert_serving(ModelRef(name="yolov8n", version="15"))
    finally:
        second.kill()


def test_model_far_slower_on_real_frames_is_rolled_back_in_probation(fleet: Fleet) -> None:
    running = fleet.running()
    convs = fleet.calibration.slow_convs
    path = content_slow_model(fleet.source_model, fleet.models / "slow.onnx", convs=convs)
    fleet.send(path, "16", "r-slow")
    active = wait_report(
        fleet.inbox,
        lambda r: r.rollout_id == "r-slow" and r.state in (OtaState.ACTIVE, OtaState.FAILED),
        90,
        "activation of the slow model",
    )
    assert active.state is OtaState.ACTIVE, active.error  # the smoke inference (gray frame) was fast enough
    back = fleet.outcome("r-slow", {OtaState.ROLLED_BACK, OtaState.ACTIVE})
    assert back.state is OtaState.ROLLED_BACK
    assert back.error is not None
    assert "p95 latency" in back.error
    slow_ms = float(back.error.split("p95 latency ")[1].split(" ms")[0])
    assert slow_ms > fleet.calibration.budget_ms * FACTOR
    assert back.model == ModelRef(name="yolov8n", version="16")
    assert back.previous_model == running
    assert states_of(fleet.inbox, "r-slow")[-2:] == [OtaState.ACTIVE, OtaState.ROLLED_BACK]
    fleet.assert_serving(running)


def test_malformed_desired_and_commands_are_counted_and_ignored(fleet: Fleet) -> None:
    before = fleet.agent.status()
    session = watcher(fleet.broker, TOPICS.device_prefix(fleet.device) + "/nothing", Inbox())
    try:
        garbage = [b"{not json", b"\xff\xfe", b'{"schema": "edgefleet.model_desired/1"}', b"[]"]
        for payload in garbage:
            assert session.publish(TOPICS.model_desired(fleet.device), payload, qos=1).wait(10)
        commands = [("reboot", b"not json"), ("ota/retry", b"[1]"), ("hello", b"{}")]
        for command, payload in commands:
            assert session.publish(TOPICS.cmd(fleet.device, command), payload, qos=1).wait(10)
    finally:
        session.disconnect()
    wait_until(
        lambda: fleet.agent.status()["commands_received"] == before["commands_received"] + 3, 20, "commands"
    )
    after = fleet.agent.status()
    assert after["malformed_messages"] == before["malformed_messages"] + len(garbage) + 2
    assert after["active_model"] == before["active_model"]
    fleet.assert_serving(ModelRef.model_validate(before["active_model"]))

"""A minimal test-side fleet: answers `model/desired` with `model/reported`, sends status and telemetry.

Not the agent (`edgefleet sim` runs the agent's real OTA code); it walks the OTA states quickly so rollout
tests can steer per-device outcomes: fail verification, report latency over a gate, stay silent. With
`tokens` set it downloads each desired artifact over HTTP with the device's token and checks its sha256,
as a real device would before reporting `verifying`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from fleet_protocol.payloads import (
    DeviceState,
    ModelRef,
    ModelReported,
    OtaState,
    OutboxStats,
    StageLatency,
    StatusPayload,
    TelemetryPayload,
    decode_model_desired,
    encode,
)
from fleet_protocol.topics import Topics
from tests.broker import MosquittoBroker


@dataclass
class SimDevice:
    device_id: str
    model: ModelRef
    latency_ms: float = 20.0
    fail_verify: bool = False
    telemetry: bool = True
    frozen: bool = False  # keeps only the latest desired model, acts on it when thawed
    desired_msg_ids: list[str] = field(default_factory=list)
    # every model/desired as it arrived, frozen or not: (msg_id, or "clear" when empty; retained)
    desired_arrivals: list[tuple[str, bool]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)


class SimFleet:
    """Devices sharing one MQTT session (the test broker has no ACL)."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topics: Topics,
        devices: list[SimDevice],
        *,
        step_s: float = 0.02,
        telemetry_s: float = 0.2,
        tokens: dict[str, str] | None = None,
    ) -> None:
        self.topics = topics
        self.devices = {d.device_id: d for d in devices}
        self.step_s = step_s
        self.telemetry_s = telemetry_s
        self.tokens = tokens
        self.downloads: dict[str, list[int]] = defaultdict(list)  # device -> HTTP status codes
        self._work: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._gate = threading.Event()
        self._gate.set()
        self._parked: dict[str, bytes] = {}
        self._latest: dict[
            str, bytes
        ] = {}  # a device acts on its newest desired model only, as the agent does
        self.session = MqttSession(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=f"sim-{uuid.uuid4().hex[:8]}",
                clean_start=True,
                session_expiry_s=0,
                topic_root=topics.root,
            )
        )
        self.session.subscribe(f"{topics.root}/devices/+/model/desired", self._on_desired)
        self._threads = [
            threading.Thread(target=self._worker, daemon=True, name="sim-ota"),
            threading.Thread(target=self._telemetry_loop, daemon=True, name="sim-telemetry"),
        ]

    def start(self) -> SimFleet:
        self.session.connect()
        assert self.session.wait_connected(10), "simulated fleet could not connect"
        for device in self.devices.values():
            self._status(device)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._work.put(("", b""))
        for thread in self._threads:
            thread.join(5)
        self.session.disconnect()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self) -> None:
        """Devices stop acting on desired models (they queue up) until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def freeze(self, device_ids: list[str]) -> None:
        """These devices receive desired models but act only on the latest one, once thawed."""
        with self._lock:
            for device_id in device_ids:
                self.devices[device_id].frozen = True

    def thaw(self) -> None:
        with self._lock:
            parked, self._parked = self._parked, {}
            for device in self.devices.values():
                device.frozen = False
        for device_id, payload in parked.items():
            self._work.put((device_id, payload))

    def model_of(self, device_id: str) -> tuple[str, str]:
        with self._lock:
            model = self.devices[device_id].model
            return model.name, model.version

    # ---- what a device does ---------------------------------------------------------------------------

    def _on_desired(self, message: Message) -> None:
        device_id = self.topics.parse(message.topic).device_id
        if device_id in self.devices:
            desired = decode_model_desired(message.payload) if message.payload else None
            arrival = (desired.msg_id if desired is not None else "clear", message.retain)
            with self._lock:
                self.devices[device_id].desired_arrivals.append(arrival)
                self._latest[device_id] = message.payload
            self._work.put((device_id, message.payload))

    def _worker(self) -> None:
        while not self._stop.is_set():
            device_id, payload = self._work.get()
            if not device_id:
                return
            while not self._gate.wait(0.1):
                if self._stop.is_set():
                    return
            device = self.devices[device_id]
            with self._lock:
                if payload is not self._latest.get(device_id):
                    continue  # superseded by a newer desired model before we got to it
                if device.frozen:
                    self._parked[device_id] = payload
                    continue
            desired = decode_model_desired(payload)
            if desired is None:
                continue
            with self._lock:
                device.desired_msg_ids.append(desired.msg_id)
                if desired.msg_id in self._seen:
                    continue
                self._seen.add(desired.msg_id)
                current = device.model
            target = desired.model_ref
            if (target.name, target.version) == (current.name, current.version):
                continue  # already running it: a no-op, as on the agent
            self._report(device, desired.rollout_id, target, OtaState.DOWNLOADING, previous=current)
            if self.tokens is not None:
                status = self._download(device_id, desired.url, desired.sha256)
                if status != 200:
                    self._report(
                        device,
                        desired.rollout_id,
                        target,
                        OtaState.FAILED,
                        previous=current,
                        error=f"download refused: HTTP {status}",
                    )
                    continue
            self._report(device, desired.rollout_id, target, OtaState.VERIFYING, previous=current)
            if device.fail_verify:
                self._report(
                    device,
                    desired.rollout_id,
                    target,
                    OtaState.FAILED,
                    previous=current,
                    error="signature does not verify against the trust store",
                )
                continue
            for state in (OtaState.STAGING, OtaState.ACTIVATING):
                self._report(device, desired.rollout_id, target, state, previous=current)
            with self._lock:
                device.model = target
            self._report(device, desired.rollout_id, target, OtaState.ACTIVE, previous=current)
            self._status(device)

    def _download(self, device_id: str, url: str, sha256: str) -> int:
        assert self.tokens is not None
        response = httpx.get(url, headers={"Authorization": f"Bearer {self.tokens[device_id]}"}, timeout=30)
        self.downloads[device_id].append(response.status_code)
        if response.status_code == 200 and hashlib.sha256(response.content).hexdigest() != sha256:
            return 599
        return response.status_code

    def _report(
        self,
        device: SimDevice,
        rollout_id: str,
        model: ModelRef,
        state: OtaState,
        *,
        previous: ModelRef,
        error: str | None = None,
    ) -> None:
        device.states.append(state.value)
        report = ModelReported(
            device_id=device.device_id,
            rollout_id=rollout_id,
            model=model,
            state=state,
            progress=1.0 if state is OtaState.ACTIVE else 0.5,
            error=error,
            previous_model=previous,
        )
        self.session.publish(self.topics.model_reported(device.device_id), encode(report), qos=1, retain=True)
        time.sleep(self.step_s)

    def _status(self, device: SimDevice) -> None:
        status = StatusPayload(
            device_id=device.device_id,
            state=DeviceState.ONLINE,
            agent_version="0.1.0",
            active_model=device.model,
        )
        self.session.publish(self.topics.status(device.device_id), encode(status), qos=1, retain=True)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_s):
            for device in list(self.devices.values()):
                if not device.telemetry:
                    continue
                latency = StageLatency(p50=device.latency_ms * 0.8, p95=device.latency_ms)
                payload = TelemetryPayload(
                    device_id=device.device_id,
                    interval_s=self.telemetry_s,
                    fps=10.0,
                    latency_ms={"total": latency},
                    outbox=OutboxStats(depth=0, bytes=0),
                    cpu_percent=30.0,
                    memory_mb=200.0,
                )
                self.session.publish(self.topics.telemetry(device.device_id), encode(payload), qos=0)

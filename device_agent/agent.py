"""The device agent daemon: sources → pipeline → outbox → publisher, plus telemetry and the local API.

Threads: one per source (capture), one inference loop, paho's network thread, the outbox publisher, the
telemetry timer and the local API server. The caller's thread only waits for a stop request.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from device_agent.api import ApiSettings, create_app, make_server
from device_agent.azure import azure_session
from device_agent.config import AgentSettings
from device_agent.detector import Detector, DetectParams
from device_agent.model_store import ModelStore
from device_agent.ota import OtaManager
from device_agent.outbox import Outbox, OutboxFullError, OutboxLimits
from device_agent.pipeline import ActiveModel, DetectionPipeline, ModelSlot, RecentEvents
from device_agent.publisher import OutboxPublisher
from device_agent.sources import Frame, FrameSource
from device_agent.telemetry import TelemetryCollector
from fleet_protocol import __version__
from fleet_protocol.errors import PayloadError, TopicError
from fleet_protocol.mqtt import (
    Message,
    MqttSession,
    MqttSettings,
    OutgoingMessage,
    PublishHandle,
    PublishingSession,
    session_settings,
)
from fleet_protocol.onnx_model import SessionOptions
from fleet_protocol.payloads import (
    DeviceState,
    ModelRef,
    ModelReported,
    RefinedPayload,
    StatusPayload,
    decode,
    decode_model_desired,
    encode,
)
from fleet_protocol.topics import Topics

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 5.0


class Agent:
    """One device agent; `run()` blocks until `stop()` (or a signal handler calling it)."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.broker.topic_root)
        self._stop = threading.Event()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.ota: OtaManager | None = None
        if settings.ota.enabled:
            self.ota = OtaManager(
                settings.ota,
                ModelStore(settings.models_dir),
                trust_store=settings.trust_store,
                load=self._load_model_file,
                load_configured=lambda: _load_model(settings),
                configured_path=settings.model.path,
                report=self._publish_model_reported,
                device_id=settings.device_id,
                on_model_changed=self._on_model_changed,
            )
            self.model = ModelSlot(self.ota.boot())  # the model the OTA record says is current, verified
        else:
            self.model = ModelSlot(_load_model(settings))
        self.outbox = Outbox(settings.outbox_path, _outbox_limits(settings))
        self.session: PublishingSession
        if settings.transport == "azure":  # Azure IoT Hub / IoT Edge; loads the SDK only here
            self.session = azure_session(settings, self.topics, birth=self._birth)
        else:
            self.session = MqttSession(
                _mqtt_settings(settings), will=self._status_message(DeviceState.OFFLINE), birth=self._birth
            )
        self.publisher = OutboxPublisher(
            self.outbox,
            self.session,
            window=settings.outbox.inflight,
            on_rtt=self._on_rtt,
            rtt_probe_interval_s=settings.link.rtt_probe_interval_s,
            crop_hold_rtt_ms=settings.link.crop_hold_rtt_ms,
            crop_resume_rtt_ms=settings.link.crop_resume_rtt_ms,
        )
        self.telemetry = TelemetryCollector(settings.device_id)
        self.recent = RecentEvents(settings.recent_events)
        self.sources = [FrameSource(config) for config in settings.sources]
        self.pipeline = DetectionPipeline(
            settings.device_id,
            self.model,
            self.outbox,
            self.topics,
            params=_detect_params(settings, self.model.get().detector),
            publish=settings.publish,
            crops=settings.crops,
            recent=self.recent,
            on_enqueued=self.publisher.notify,
            on_produced=_produced_log_writer(settings.produced_log),
        )
        self.malformed_messages = 0
        self.commands_received = 0
        self.frames_failed = 0
        self._threads: list[threading.Thread] = []
        self._api_server: uvicorn.Server | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    def run(self) -> None:
        self.start()
        self._stop.wait()
        self.shutdown()

    def start(self) -> None:
        device_id = self.settings.device_id
        self.session.subscribe(self.topics.refined(device_id), self._on_refined)
        self.session.subscribe(self.topics.cmd_filter(device_id), self._on_command)
        if self.ota is not None:
            self.ota.start(self.model)  # reports where it stands; the retained desired arrives after connect
            self.session.subscribe(self.topics.model_desired(device_id), self._on_model_desired)
        self.session.connect()
        self.publisher.start()
        for source in self.sources:
            source.start()
        self._spawn("inference", self._inference_loop)
        self._spawn("telemetry", self._telemetry_loop)
        if self.settings.api.enabled:
            self._start_api()
        log.info(
            "agent %s running: model %s on %s, %d source(s), broker %s:%d",
            self.settings.device_id,
            self.model.get().ref.name,
            ",".join(self.model.get().detector.providers),
            len(self.sources),
            self.session.settings.host,
            self.session.settings.port,
        )

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Publish `stopping`, flush what the broker takes within the budget, then say `offline` and leave."""
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S - 0.5
        self._stop.set()
        for source in self.sources:
            source.stop()
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic() - 2.5))
        if self.ota is not None:
            self.ota.stop(timeout=0.5)
        if self.session.connected:
            self._publish_status(DeviceState.STOPPING)
            flushed = self.publisher.flush(timeout=max(0.1, deadline - time.monotonic() - 0.5))
            log.info("shutdown: outbox %s", "flushed" if flushed else "not empty; the rest goes next start")
        self.publisher.stop(timeout=1.0)
        if self.session.connected:
            self._publish_status(DeviceState.OFFLINE).wait(max(0.1, deadline - time.monotonic()))
        self.session.disconnect()
        if self._api_server is not None:
            self._api_server.should_exit = True
        self.outbox.close()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---- loops -----------------------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            frames = [f for f in (s.next_frame(timeout=0) for s in self.sources) if f is not None]
            if not frames:
                # Nothing new anywhere: wait on the first live source rather than spin.
                waiting = next((s for s in self.sources if not s.finished.is_set()), None)
                if waiting is None:
                    self._stop.wait(0.2)
                    continue
                frame = waiting.next_frame(timeout=0.05)
                frames = [frame] if frame is not None else []
            for frame in frames:
                self._process(frame)

    def _process(self, frame: Frame) -> None:
        try:
            self.pipeline.process(frame)
        except OutboxFullError as error:
            log.error("outbox full, %d detection message(s) refused: %s", len(error.rejected), error)
        except Exception as error:  # one bad frame must not stop detection
            self.frames_failed += 1
            log.exception("frame %s/%d failed", frame.source_id, frame.seq)
            if self.ota is not None:
                self.ota.record_frame(self.pipeline.last_model, None, f"{type(error).__name__}: {error}")
            return
        if self.pipeline.last_result is not None:
            self.telemetry.record_frame(self.pipeline.last_result.timing)
            if self.ota is not None:
                total_ms = self.pipeline.last_result.timing.total_ms
                self.ota.record_frame(self.pipeline.last_model, total_ms, None)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            try:
                dropped = sum(s.frames_dropped for s in self.sources)
                payload = self.telemetry.snapshot(
                    self.outbox.stats(), dropped, crops_held=self.publisher.crops_held
                )
                self.session.publish(self.topics.telemetry(self.settings.device_id), encode(payload), qos=0)
            except Exception:
                log.exception("telemetry report failed")

    def _on_rtt(self, rtt_ms: float) -> None:
        self.telemetry.record_link_rtt(rtt_ms)

    # ---- MQTT ------------------------------------------------------------------------------------------

    def _on_refined(self, message: Message) -> None:
        try:
            refined = decode(RefinedPayload, message.payload)
        except PayloadError as error:
            self.malformed_messages += 1
            log.warning("ignored a malformed message on %s: %s", message.topic, error)
            return
        self.recent.add_refined(refined)

    def _on_model_desired(self, message: Message) -> None:
        try:
            desired = decode_model_desired(message.payload)
        except PayloadError as error:
            self.malformed_messages += 1
            log.warning("ignored a malformed model/desired: %s", error)
            return
        if desired is not None and desired.device_id != self.settings.device_id:
            log.warning("model/desired names device %r; applying it to this device anyway", desired.device_id)
        if self.ota is not None:
            self.ota.desired(desired)

    def _on_command(self, message: Message) -> None:
        self.commands_received += 1
        try:
            command = self.topics.parse(message.topic).command
            body = json.loads(message.payload) if message.payload else {}
            if not isinstance(body, dict):
                raise ValueError("a command payload must be a JSON object (or empty)")
        except (TopicError, ValueError, RecursionError) as error:  # bad JSON or UTF-8, or nested too deep
            self.malformed_messages += 1
            log.warning("ignored a malformed command on %s: %s", message.topic, error)
            return
        if command == "ota/retry" and self.ota is not None:
            log.info("command ota/retry: trying the desired model again")
            self.ota.retry()
        else:
            log.info("command %r received; this agent has no handler for it (ignored)", command)

    def _publish_model_reported(self, report: ModelReported) -> None:
        topic = self.topics.model_reported(self.settings.device_id)
        self.session.publish(topic, encode(report), qos=1, retain=True)

    def _on_model_changed(self) -> None:
        if self.session.connected:
            self._publish_status(DeviceState.ONLINE)  # the retained status names the active model

    def _load_model_file(self, path: Path, ref: ModelRef) -> ActiveModel:
        options = _session_options(self.settings)
        detector = Detector(path, session_options=options, warmup=False)  # staging's smoke test warms it
        return ActiveModel(detector, ref, _detect_params(self.settings, detector))

    def _status_payload(self, state: DeviceState) -> StatusPayload:
        active = self.model.get()
        return StatusPayload(
            device_id=self.settings.device_id,
            state=state,
            agent_version=__version__,
            active_model=active.ref,
            providers=list(active.detector.providers),
            hardware=_hardware(),
        )

    def _status_message(self, state: DeviceState) -> OutgoingMessage:
        return OutgoingMessage(
            self.topics.status(self.settings.device_id),
            encode(self._status_payload(state)),
            qos=1,
            retain=True,
        )

    def _birth(self) -> OutgoingMessage:
        return self._status_message(DeviceState.ONLINE)

    def _publish_status(self, state: DeviceState) -> PublishHandle:
        message = self._status_message(state)
        return self.session.publish(message.topic, message.payload, qos=1, retain=True)

    # ---- local API -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        payload = self._status_payload(DeviceState.ONLINE if self.session.connected else DeviceState.OFFLINE)
        stats = self.outbox.stats()
        return {
            **payload.model_dump(mode="json", by_alias=True, exclude={"msg_id", "schema_name"}),
            "broker_connected": self.session.connected,
            "frames_processed": self.telemetry.frames_processed,
            "frames_failed": self.frames_failed,
            "frames_dropped": sum(s.frames_dropped for s in self.sources),
            "malformed_messages": self.malformed_messages,
            "commands_received": self.commands_received,
            "ota": self.ota.snapshot() if self.ota is not None else None,
            "subscriptions": self.session.topic_filters,
            "outbox": {
                "depth": stats.depth,
                "bytes": stats.bytes,
                "dropped": stats.dropped,
                "crops_waiting": stats.waiting.get("crop", 0),
                "crops_held": self.publisher.crops_held,
            },
            "sources": [
                {
                    "id": source.config.id,
                    "kind": source.config.kind,
                    "captured": source.frames_captured,
                    "ended": source.finished.is_set(),
                }
                for source in self.sources
            ],
        }

    def _start_api(self) -> None:
        from device_agent.agent_api import add_agent_routes

        api = self.settings.api
        app = create_app(
            lambda: self.model.get().detector,
            ApiSettings(
                workers=api.workers, queue_size=api.queue_size, max_upload_bytes=api.max_upload_bytes
            ),
        )
        add_agent_routes(app, self.status, self.recent)
        self._api_server = make_server(app, host=api.host, port=api.port, log_level="warning")
        self._spawn("local-api", self._api_server.run)


def _load_model(settings: AgentSettings) -> ActiveModel:
    model = settings.model
    detector = Detector(model.path, session_options=_session_options(settings), names_file=model.names_file)
    ref = ModelRef(name=_model_name(model.path), version="local")
    return ActiveModel(detector, ref, _detect_params(settings, detector))


def _session_options(settings: AgentSettings) -> SessionOptions:
    model = settings.model
    # No spinning: while an OTA update stages, two sessions share the CPU with the inference loop.
    return SessionOptions(providers=model.providers, intra_op_threads=model.threads, allow_spinning=False)


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip("._-") or "model"


def _detect_params(settings: AgentSettings, detector: Detector) -> DetectParams:
    model = settings.model
    classes = detector.class_ids(model.classes) if model.classes else None
    return DetectParams(conf=model.conf, iou=model.iou, max_det=model.max_det, classes=classes)


def _outbox_limits(settings: AgentSettings) -> OutboxLimits:
    outbox = settings.outbox
    return OutboxLimits(
        max_bytes=outbox.max_bytes,
        max_age_s=outbox.max_age_s,
        drop_detections_when_full=outbox.drop_detections_when_full,
    )


def _mqtt_settings(settings: AgentSettings) -> MqttSettings:
    broker = settings.broker
    return session_settings(
        broker,
        settings.device_id,
        max_inflight=settings.outbox.inflight,
        reconnect_min_delay_s=broker.reconnect_min_s,
        reconnect_max_delay_s=broker.reconnect_max_s,
    )


def _produced_log_writer(path: Path | None) -> Callable[[list[str]], None] | None:
    """Append the msg_id of every message committed to the outbox to `path` (an audit trail)."""
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a", encoding="utf-8", buffering=1)

    def write(msg_ids: list[str]) -> None:
        handle.write("".join(f"{msg_id}\n" for msg_id in msg_ids))

    return write


def _hardware() -> dict[str, str | int | float | bool]:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count() or 0,
        "python": platform.python_version(),
    }

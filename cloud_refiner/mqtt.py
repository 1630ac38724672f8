"""The MQTT adapter: consume crops from the shared subscription, answer on each crop's response topic.

Delivery: the session is persistent (`clean_start=False`, a fixed client id per instance) and acknowledges
crops by hand. A crop is acknowledged only when its reply has been acknowledged by the broker, so a refiner
killed at any point leaves its unanswered crops with the broker, which hands them to the restarted replica
(same instance id) with whatever was queued for it meanwhile. The broker sends at most `receive_maximum`
unacknowledged crops (MQTT 5 flow control), which bounds what this process holds. A crop that cannot be
refined (bad metadata, not a JPEG, empty, too large, corrupt) is logged, counted and acknowledged: it would
fail the same way again. A det_id answered recently is acknowledged without a second answer.

Stopping: `stop()` unsubscribes first (the broker stops routing crops here), answers what already arrived
for up to `drain_timeout_s`, then disconnects; the session stays for a restart under the same id.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from cloud_refiner.config import RefinerSettings
from cloud_refiner.service import (
    Admission,
    CropRejectedError,
    RefineResult,
    RefinerObserver,
    RefinerService,
    RejectReason,
)
from fleet_protocol.errors import ProtocolError
from fleet_protocol.mqtt import (
    Message,
    MessageProperties,
    MqttSession,
    MqttSettings,
    PublishHandle,
    session_settings,
)
from fleet_protocol.payloads import CropMeta, LabelScore, ModelRef, RefinedPayload, encode
from fleet_protocol.topics import TopicKind, Topics

log = logging.getLogger(__name__)

SOURCE = "mqtt"
MAX_CORRELATION_BYTES = 256
SUBMIT_TIMEOUT_S = 30.0  # the queue holds every crop the broker may send, so this only guards against bugs
DRAIN_QUIET_S = 0.5


class CropMessageError(ValueError):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IncomingCrop:
    """A crop message taken apart and checked against the contract."""

    device_id: str
    meta: CropMeta
    response_topic: str
    correlation_data: bytes


def parse_crop(message: Message, topics: Topics) -> IncomingCrop:
    """Check a crop message's topic and MQTT 5 properties; CropMessageError says what is wrong."""
    try:
        parsed = topics.parse(message.topic)
    except ProtocolError as error:
        raise CropMessageError(RejectReason.BAD_METADATA, str(error)) from None
    if parsed.kind is not TopicKind.CROPS:
        raise CropMessageError(RejectReason.BAD_METADATA, f"{message.topic} is not a crops topic")
    props = message.properties
    try:
        meta = CropMeta.from_user_properties(props.user_properties)
    except ProtocolError as error:
        raise CropMessageError(RejectReason.BAD_METADATA, f"crop metadata: {error}") from None
    if meta.device_id != parsed.device_id:
        raise CropMessageError(
            RejectReason.BAD_METADATA,
            f"the crop says device {meta.device_id!r} but came on {parsed.device_id!r}'s topic",
        )
    expected = topics.refined(parsed.device_id)
    response_topic = props.response_topic or expected
    if response_topic != expected:
        # Answering anywhere else would let a device make the refiner publish on other topics.
        raise CropMessageError(
            RejectReason.BAD_RESPONSE_TOPIC, f"response topic {response_topic!r} is not {expected!r}"
        )
    correlation = props.correlation_data if props.correlation_data is not None else meta.det_id.encode()
    if len(correlation) > MAX_CORRELATION_BYTES:
        raise CropMessageError(
            RejectReason.BAD_METADATA, f"correlation data of {len(correlation)} bytes (at most 256)"
        )
    return IncomingCrop(parsed.device_id, meta, response_topic, correlation)


def mqtt_settings(settings: RefinerSettings) -> MqttSettings:
    broker = settings.broker
    return session_settings(
        broker,
        settings.client_id,
        clean_start=False,
        manual_ack=True,
        receive_maximum=broker.receive_maximum,
    )


class CropConsumer:
    """Consumes crops for a `RefinerService` and publishes `RefinedPayload` replies."""

    def __init__(
        self,
        service: RefinerService,
        settings: RefinerSettings,
        observer: RefinerObserver | None = None,
        session: MqttSession | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.observer = observer or RefinerObserver()
        self.topics = Topics(settings.broker.topic_root)
        self.topic_filter = self.topics.refiner_shared_subscription(settings.broker.share_group)
        self.session = session or MqttSession(mqtt_settings(settings))
        info = service.info
        self.model = ModelRef(name=info.name, version=info.version)
        self._lock = threading.Lock()
        # det_id -> crop messages to acknowledge once its reply is acknowledged (the first and any twins)
        self._unacked: dict[str, list[Message]] = {}
        self._last_message_at = time.monotonic()
        self.received = 0

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._unacked)

    def start(self) -> CropConsumer:
        self.session.subscribe(self.topic_filter, self._on_crop, qos=1)
        self.session.connect()
        return self

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Unsubscribe, answer what already arrived (up to `drain_timeout_s`), disconnect."""
        if self.session.connected:
            self.session.unsubscribe(self.topic_filter)
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self._last_message_at > DRAIN_QUIET_S
            if quiet and self.in_flight == 0:
                break
            time.sleep(0.05)
        if self.in_flight:
            log.warning(
                "stopping with %d crops unanswered; the broker keeps them for a restart", self.in_flight
            )
        self.session.disconnect()

    # ---- paho's network thread ------------------------------------------------------------------------

    def _on_crop(self, message: Message) -> None:
        received_at = time.perf_counter()
        self._last_message_at = time.monotonic()
        self.received += 1
        try:
            crop = parse_crop(message, self.topics)
        except CropMessageError as error:
            self._drop(message, error.reason, str(error))
            return
        det_id = crop.meta.det_id
        with self._lock:
            twin_waiting = det_id in self._unacked
            if twin_waiting:
                self._unacked[det_id].append(message)
        if twin_waiting:  # the first copy is still being answered; this one is acked with it
            self.observer.crop_duplicate(SOURCE)
            return
        try:
            submission = self.service.submit(
                message.payload,
                crop.meta.label,
                source=SOURCE,
                key=det_id,
                received_at=received_at,
                timeout=SUBMIT_TIMEOUT_S,
                jpeg_only=True,
            )
        except CropRejectedError as error:
            log.warning("dropped crop %s from %s: %s", det_id, crop.device_id, error)
            self.session.ack(message)
            return
        except Exception as error:  # queue full for SUBMIT_TIMEOUT_S or stopping: keep it unacknowledged
            log.error(
                "could not queue crop %s from %s (%s); it stays with the broker",
                det_id,
                crop.device_id,
                error,
            )
            return
        if submission.admission is Admission.DUPLICATE or submission.future is None:
            self.session.ack(message)
            return
        with self._lock:
            self._unacked.setdefault(det_id, []).append(message)
        submission.future.add_done_callback(lambda future: self._answer(crop, future))

    def _drop(self, message: Message, reason: RejectReason, detail: str) -> None:
        log.warning("dropped a crop on %s (%d bytes): %s", message.topic, len(message.payload), detail)
        self.observer.crop_rejected(SOURCE, reason)
        self.session.ack(message)

    # ---- the batcher's worker thread --------------------------------------------------------------------

    def _answer(self, crop: IncomingCrop, future: Future[RefineResult]) -> None:
        det_id = crop.meta.det_id
        try:
            result = future.result()
            refinement = result.refinement
            reply = RefinedPayload(
                device_id=crop.device_id,
                det_id=det_id,
                edge_label=crop.meta.label,
                refined_label=refinement.label,
                score=refinement.score,
                top_k=[LabelScore(label=s.label, score=s.score) for s in refinement.top_k],
                refiner_model=self.model,
                latency_ms=min((time.perf_counter() - result.received_at) * 1e3, 3_600_000.0),
            )
            payload = encode(reply)
        except Exception:
            log.exception("could not refine crop %s from %s; acknowledging it", det_id, crop.device_id)
            self._finish(det_id, ok=False)
            return
        properties = MessageProperties(
            content_type="application/json", correlation_data=crop.correlation_data
        )
        self.session.publish(
            crop.response_topic,
            payload,
            qos=1,
            properties=properties,
            on_ack=lambda handle: self._replied(det_id, handle),
        )

    # ---- paho's thread (PUBACK of a reply), or the publishing thread when it failed at once -------------

    def _replied(self, det_id: str, handle: PublishHandle) -> None:
        if not handle.ok:
            log.warning(
                "reply for %s not accepted by the broker: %s", det_id, handle.error or handle.reason_code
            )
        self._finish(det_id, ok=handle.ok)

    def _finish(self, det_id: str, *, ok: bool) -> None:
        with self._lock:
            messages = self._unacked.pop(det_id, [])
        for message in messages:
            self.session.ack(message)
        self.observer.reply_sent(ok)

"""The fleet manager's MQTT adapter: one persistent session that feeds ingest and publishes desired models.

It subscribes to `<root>/devices/+/#` with manual acknowledgements: a message is acked (PUBACK) only after
ingest committed it, and the broker keeps at most `receive_maximum` unacknowledged messages in flight, so
a fleet manager that dies loses nothing the broker handed over; the broker redelivers it.
"""

from __future__ import annotations

import logging
import os

from fleet_manager.config import BrokerSettings
from fleet_manager.ingest import Incoming, Ingestor
from fleet_manager.models import utcnow
from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from fleet_protocol.topics import Topics

log = logging.getLogger(__name__)

MAX_RECEIVE_MAXIMUM = 65_535


class FleetMqtt:
    """Ingest's feed and the rollout controller's `DesiredPublisher`."""

    def __init__(
        self, settings: BrokerSettings, ingestor: Ingestor, *, receive_maximum: int = 10_000
    ) -> None:
        base = settings.mqtt_settings()
        # Manual acks need fleet_protocol's MqttSession to offer them; without, paho acks on receipt.
        self.manual_ack = "manual_ack" in MqttSettings.model_fields
        if self.manual_ack:
            base = base.model_copy(
                update={"manual_ack": True, "receive_maximum": min(MAX_RECEIVE_MAXIMUM, receive_maximum)}
            )
        self.settings = base
        self.topics = Topics(settings.topic_root)
        self.ingestor = ingestor
        self.session = MqttSession(self.settings)
        self.session.subscribe(self.topics.fleet_subscription(), self._on_message, qos=1)

    def start(self) -> None:
        self.session.connect()

    def wait_connected(self, timeout: float) -> bool:
        return self.session.wait_connected(timeout)

    def stop(self) -> None:
        self.session.disconnect()

    @property
    def connected(self) -> bool:
        return self.session.connected

    def publish_desired(self, device_id: str, payload: bytes) -> bool:
        """Retained QoS 1 `model/desired` (an empty payload deletes the retained message); False when the
        client refused it. Accepted QoS 1 messages stay with the client until the broker acknowledges
        them, across reconnects, in order."""
        handle = self.session.publish(self.topics.model_desired(device_id), payload, qos=1, retain=True)
        if handle.error is not None:
            log.warning("could not publish the desired model of %s: %s", device_id, handle.error)
            return False
        return True

    def clear_retained(self, device_id: str) -> None:
        """Delete the device's retained messages (a revoked device), so ingest never sees it again."""
        for topic in retained_topics(self.topics, device_id):
            self.session.publish(topic, b"", qos=1, retain=True)

    def _on_message(self, message: Message) -> None:
        self.ingestor.submit(
            Incoming(
                topic=message.topic,
                payload=message.payload,
                received_at=utcnow(),
                retain=message.retain,
                user_properties=message.properties.user_properties,
                acker=self.session if self.manual_ack else None,
                receipt=message,
            )
        )


def retained_topics(topics: Topics, device_id: str) -> tuple[str, ...]:
    """The topics on which a device leaves retained messages, its own and the fleet manager's."""
    return (topics.status(device_id), topics.model_reported(device_id), topics.model_desired(device_id))


def clear_retained_once(settings: BrokerSettings, device_id: str, timeout_s: float = 5.0) -> str | None:
    """Connect once (the CLI, beside a running fleet manager: another client id, no session kept), delete the
    device's retained messages and disconnect; None on success, else what went wrong."""
    base = settings.mqtt_settings()
    once = base.model_copy(
        update={
            "client_id": f"{base.client_id}-revoke-{os.getpid()}",
            "clean_start": True,
            "session_expiry_s": 0,
        }
    )
    session = MqttSession(once)
    session.connect()
    try:
        if not session.wait_connected(timeout_s):
            return f"could not connect to the broker at {once.host}:{once.port}"
        handles = [
            session.publish(topic, b"", qos=1, retain=True)
            for topic in retained_topics(Topics(settings.topic_root), device_id)
        ]
        for handle in handles:
            if not handle.wait(timeout_s) or handle.error is not None:
                return f"the broker did not accept clearing {device_id}'s retained messages ({handle.error})"
        return None
    finally:
        session.disconnect()

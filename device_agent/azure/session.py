"""The agent's session over Azure IoT Hub / IoT Edge, through azure-iot-device 2.x (its asyncio clients).

`AzureSession` takes the place of the agent's `MqttSession` (both are a `PublishingSession`), so the agent
core, the outbox publisher and the OTA manager run unchanged. What each MQTT-contract topic becomes:

- `detections`, `crops`, `telemetry`: a device-to-cloud message with app property `edgefleet_kind` = the
  topic kind. JSON ones carry content type `application/json`, encoding `utf-8` and message id = the
  payload's `msg_id`; crops carry `image/jpeg`, their user properties as app properties and correlation
  id = `det_id`.
- `status`, `model/reported` (retained): reported properties `status` and `model` (the twin keeps the
  latest value, as the broker keeps a retained message).
- `model/desired` (subscribed): the desired property `model`. Every change, by patch or by the full twin
  read after each connect, is handed to the subscriber as a `model/desired` message; null or absent clears.
- `refined`, `cmd/#` (subscribed): not mapped; nothing arrives on them over Azure (docs/azure.md).

Delivery: `send_message` completes when the hub's PUBACK arrives, and only then does the publish handle
succeed, so the outbox deletes a row only after the hub took it. In-flight messages survive a dropped link:
the SDK (connection_retry on) keeps them in paho, which sends them again after reconnecting. A reported
patch completes on the hub's 204 response; the latest value per property waits while the link is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from functools import partial
from itertools import count
from typing import Any

import paho.mqtt.client as paho
from azure.iot.device import X509
from azure.iot.device import Message as HubMessage
from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.device.constant import TELEMETRY_MESSAGE_SIZE_LIMIT

from device_agent.azure.twin import (
    MODEL_PROPERTY,
    REPORTED_PROPERTY,
    DesiredProperties,
    HubPublish,
    ReportedProperties,
    desired_model_payload,
    message_id_of,
)
from device_agent.config import AgentSettings, AzureConfig
from fleet_protocol.mqtt import (
    MQTT_DEFAULT_RECEIVE_MAXIMUM,
    NO_PROPERTIES,
    AckCallback,
    Backoff,
    Birth,
    ConnectListener,
    Message,
    MessageHandler,
    MessageProperties,
    MqttSettings,
    PublishHandle,
    announce_connected,
)
from fleet_protocol.payloads import CROP_CONTENT_TYPE
from fleet_protocol.topics import TopicKind, Topics

log = logging.getLogger(__name__)

HubClient = IoTHubDeviceClient | IoTHubModuleClient
KIND_PROPERTY = "edgefleet_kind"
JSON_CONTENT_TYPE = "application/json"
CLOSE_TIMEOUT_S = 5.0
RETRY_S = 2.0  # wait before sending a refused reported patch, or reading the twin, again
# The SDK waits for a twin response forever and never asks again (a response lost with the link would hang
# every later reported patch): give up after this long and ask again.
TWIN_TIMEOUT_S = 30.0
_NOTHING: Any = object()  # no desired model handed to the subscriber yet


def create_client(config: AzureConfig, device_id: str) -> HubClient:
    """The SDK client for the configured identity; ValueError says what is missing or wrong."""
    options: dict[str, Any] = {
        "keep_alive": config.keepalive_s,
        "connection_retry_interval": config.retry_interval_s,
        "websockets": config.websockets,
        # AzureSession reads the whole twin after every connect itself (see _read_twin).
        "ensure_desired_properties": False,
    }
    trust = {"server_verification_cert": config.server_ca.read_text()} if config.server_ca else {}
    ttl = {"sastoken_ttl": config.sastoken_ttl_s}
    gateway = {"gateway_hostname": config.gateway_hostname} if config.gateway_hostname else {}
    if config.auth == "edge":
        try:
            return IoTHubModuleClient.create_from_edge_environment(**options, **ttl)
        except OSError as error:
            raise ValueError(
                f"azure.auth 'edge' needs the IoT Edge module environment ({error}): run the agent as an IoT "
                "Edge module (the edge runtime sets IOTEDGE_*), set EdgeHubConnectionString and "
                "EdgeModuleCACertificateFile for local development, or use auth 'connection_string'"
            ) from error
    if config.auth == "connection_string":
        assert config.connection_string is not None  # AzureConfig checks it
        text = config.connection_string.get_secret_value()
        client_type = IoTHubModuleClient if "ModuleId" in _field_names(text) else IoTHubDeviceClient
        return client_type.create_from_connection_string(text, **options, **ttl, **trust)
    hub_device = config.device_id or device_id
    assert config.hostname is not None  # AzureConfig checks it
    if config.auth == "symmetric_key":
        assert config.shared_access_key is not None
        return IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=config.shared_access_key.get_secret_value(),
            hostname=config.hostname,
            device_id=hub_device,
            **options,
            **ttl,
            **trust,
            **gateway,
        )
    assert config.x509_cert is not None
    assert config.x509_key is not None
    phrase = config.x509_pass_phrase.get_secret_value() if config.x509_pass_phrase else None
    x509 = X509(str(config.x509_cert), str(config.x509_key), phrase)  # type: ignore[no-untyped-call]
    if config.module_id is not None:
        return IoTHubModuleClient.create_from_x509_certificate(
            x509, config.hostname, hub_device, config.module_id, **options, **trust, **gateway
        )
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=x509, hostname=config.hostname, device_id=hub_device, **options, **trust, **gateway
    )


def _field_names(connection_string: str) -> set[str]:
    return {part.split("=", 1)[0].strip() for part in connection_string.split(";") if "=" in part}


def hub_message(kind: TopicKind, payload: bytes, properties: MessageProperties | None) -> HubMessage:
    """The device-to-cloud message for one agent message; ValueError if it is over IoT Hub's size limit."""
    message = HubMessage(payload)  # type: ignore[no-untyped-call]
    message.custom_properties[KIND_PROPERTY] = kind.value
    props = properties or NO_PROPERTIES
    if kind is TopicKind.CROPS:
        user = dict(props.user_properties)
        message.content_type = props.content_type or CROP_CONTENT_TYPE
        message.custom_properties.update(user)
        message.message_id = user.get("msg_id")
        if props.correlation_data is not None:
            message.correlation_id = props.correlation_data.decode("utf-8", "replace")
    else:
        message.content_type = JSON_CONTENT_TYPE
        message.content_encoding = "utf-8"
        message.message_id = message_id_of(payload)
    if message.get_size() > TELEMETRY_MESSAGE_SIZE_LIMIT:
        raise ValueError(
            f"a {kind.value} message of {len(payload)} bytes is over IoT Hub's device-to-cloud limit of "
            f"{TELEMETRY_MESSAGE_SIZE_LIMIT} bytes (for crops: lower crops.max_side or the JPEG quality)"
        )
    return message


def _settle_from(handle: HubPublish, future: Future[None]) -> None:
    if future.cancelled():
        handle.settle("not delivered: the session closed first")
        return
    error = future.exception()
    handle.settle(None if error is None else f"not delivered: {type(error).__name__}: {error}")


class AzureSession:
    """The agent's link to Azure IoT Hub or an IoT Edge hub; `connect()` starts its own event-loop thread.

    One connect/disconnect cycle per instance (the SDK client cannot be used again after its shutdown).
    """

    def __init__(
        self,
        settings: AgentSettings,
        topics: Topics,
        *,
        birth: Birth | None = None,
    ) -> None:
        config = settings.azure
        endpoint = config.gateway_hostname or config.hostname or f"azure-iot ({config.auth})"
        self.settings = MqttSettings(
            host=endpoint,
            port=443 if config.websockets else 8883,
            client_id=settings.device_id,
            keepalive_s=config.keepalive_s,
            topic_root=topics.root,
        )
        self.receive_maximum = MQTT_DEFAULT_RECEIVE_MAXIMUM
        self.session_present = True  # the SDK connects with clean_session=False
        self.connect_count = 0
        self._device_id = settings.device_id
        self._topics = topics
        self._birth_message = birth
        self._hub = create_client(config, settings.device_id)
        # The SDK annotates this handler as taking one argument; it is called with none.
        self._hub.on_connection_state_change = self._on_connection_state_change  # type: ignore[assignment]
        self._retry = Backoff(1.0, float(config.retry_interval_s))
        self._guard = threading.Lock()  # online state, handlers, listeners
        self._delivery = threading.Lock()  # one desired model handed over at a time, in order
        self._online = threading.Event()
        self._closing = False
        self._patches_enabled = False
        self._handlers: dict[str, MessageHandler] = {}
        self._listeners: list[ConnectListener] = []
        self._desired = DesiredProperties()
        self._delivered_model: Any = _NOTHING
        self._reported = ReportedProperties()
        self._mids = count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._reporter: asyncio.Task[None] | None = None

    # ---- connection -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    def connect(self) -> None:
        """Start connecting (retrying with backoff until it works); returns at once."""
        if self._loop is not None:
            raise RuntimeError("an AzureSession connects once: make a new one to connect again")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="azure-iot", daemon=True)
        self._thread.start()
        self._run(self._open())

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._online.wait(timeout)

    def disconnect(self, *, publish_will: bool = False) -> None:
        """Close the link for good; IoT Hub has no will (it tracks the connection state itself)."""
        loop, thread = self._loop, self._thread
        self._closing = True
        self._online.clear()
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(CLOSE_TIMEOUT_S)
        except Exception as error:  # a hung shutdown must not keep the agent from exiting
            log.warning("closing the Azure IoT client did not finish cleanly: %s", error)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()
        self._reported.fail_all("not delivered: the session closed first")

    def abort(self) -> None:
        self.disconnect()

    def add_connect_listener(self, listener: ConnectListener) -> None:
        with self._guard:
            self._listeners.append(listener)

    async def _open(self) -> None:
        while not self._closing:
            try:
                await self._hub.connect()
                self._went_online()
                # The setter subscribes to twin patches and blocks until the hub answers: not on this loop.
                await asyncio.to_thread(
                    setattr, self._hub, "on_twin_desired_properties_patch_received", self._on_desired_patch
                )
                self._patches_enabled = True
                await self._read_twin()
                return
            except Exception as error:  # the SDK's ClientError family (credentials, TLS, network)
                if self._closing:
                    return
                delay = self._retry.next_delay()
                log.warning("cannot connect to %s (%s); retrying in %.1f s", self.settings.host, error, delay)
                await asyncio.sleep(delay)

    async def _close(self) -> None:
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()
        await self._hub.shutdown()

    async def _on_connection_state_change(self) -> None:
        if self._hub.connected:
            self._went_online()
        elif self._online.is_set():
            self._online.clear()
            if not self._closing:
                log.warning("lost the link to %s; the SDK reconnects", self.settings.host)

    def _went_online(self) -> None:
        with self._guard:
            if self._online.is_set() or self._closing:
                return
            self._online.set()
            self.connect_count += 1
            listeners = list(self._listeners)
        self._retry.reset()
        log.info("connected to %s as %r", self.settings.host, self._device_id)
        announce_connected(self, self._birth_message, listeners, True)
        self._kick_reporter()
        if self._patches_enabled:
            self._run(self._read_twin())  # desired changes made while the link was down

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        loop = self._loop
        if loop is None or self._closing:
            coroutine.close()
            return
        asyncio.run_coroutine_threadsafe(coroutine, loop)

    # ---- publish / subscribe --------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        on_ack: AckCallback | None = None,
    ) -> PublishHandle:
        """Send one agent message to the hub (see the module docstring for what it becomes).

        ValueError (raised here, before anything is sent) for a topic outside the contract or a message
        over IoT Hub's size limit: sending it again could not help.
        """
        handle = HubPublish(next(self._mids), qos, on_ack)
        kind = self._topics.parse(topic).kind
        name = REPORTED_PROPERTY.get(kind)
        if name is not None:
            self._reported.put(name, json.loads(payload), handle)
            self._kick_reporter()
            return handle
        message = hub_message(kind, payload, properties)
        loop = self._loop
        if loop is None or self._closing or (qos == 0 and not self.connected):
            handle.settle("not sent: not connected to the hub")
            return handle
        future = asyncio.run_coroutine_threadsafe(self._hub.send_message(message), loop)
        future.add_done_callback(partial(_settle_from, handle))
        return handle

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Hand what matches `topic_filter` to `handler`; only the desired model arrives over Azure."""
        with self._guard:
            self._handlers[topic_filter] = handler
        desired = self._topics.model_desired(self._device_id)
        if not paho.topic_matches_sub(topic_filter, desired):
            log.info("%s: not mapped on the Azure transport; nothing will arrive on it", topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._guard:
            self._handlers.pop(topic_filter, None)

    @property
    def topic_filters(self) -> list[str]:
        with self._guard:
            return list(self._handlers)

    def ack(self, message: Message) -> bool:
        return True  # messages are acknowledged by the SDK

    # ---- twin ------------------------------------------------------------------------------------------

    async def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        # A coroutine, so the SDK runs patches one after another, in order, on its handler loop.
        if self._desired.apply_patch(patch):
            self._deliver_model()

    async def _read_twin(self) -> None:
        while self.connected and not self._closing:
            try:
                twin = await asyncio.wait_for(self._hub.get_twin(), TWIN_TIMEOUT_S)
            except Exception as error:  # refused or link lost; a reconnect reads it again
                log.warning("reading the twin failed (%s); retrying in %.0f s", error, RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            if self._desired.apply_twin(twin.get("desired", {})):
                self._deliver_model()
            return

    def _deliver_model(self) -> None:
        """Hand the desired model to the `model/desired` subscribers if it changed since the last one."""
        topic = self._topics.model_desired(self._device_id)
        with self._delivery:
            value = self._desired.get(MODEL_PROPERTY)
            before = self._delivered_model
            unchanged = value == before or (value is None and before is _NOTHING)
            self._delivered_model = value
            if unchanged:
                return
            message = Message(
                topic=topic,
                payload=desired_model_payload(value, self._device_id),
                qos=1,
                retain=True,
                connection=self.connect_count,
            )
            with self._guard:
                handlers = [h for f, h in self._handlers.items() if paho.topic_matches_sub(f, topic)]
            log.info("desired model from the twin (version %s): %s", self._desired.version, value)
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    log.exception("handler %r failed on the desired model", handler)

    def _kick_reporter(self) -> None:
        loop = self._loop
        if loop is None or self._closing:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing more is sent
            loop.call_soon_threadsafe(self._ensure_reporter)

    def _ensure_reporter(self) -> None:
        """On the loop: start the reported-properties sender unless it runs (it drains what waits)."""
        if self.connected and not self._closing and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while self.connected and not self._closing:
            batch = self._reported.take()
            if batch is None:
                return
            patch, handles = batch
            try:
                await asyncio.wait_for(self._hub.patch_twin_reported_properties(patch), TWIN_TIMEOUT_S)
            except Exception as error:  # refused, or the link dropped: the values wait for the next try
                self._reported.give_back(patch, handles)
                log.warning("reported %s refused (%s); retrying in %.0f s", sorted(patch), error, RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            for handle in handles:
                handle.settle()

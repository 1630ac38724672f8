"""The MQTT session every component uses: a thin typed wrapper over paho-mqtt 2 (MQTT 5, callback API 2).

What it adds to paho:
- a persistent session (`clean_start=False` + Session Expiry Interval) and subscriptions re-sent on every
  connect, in case the broker lost the session (restart without persistence, session expired);
- an optional will, and a birth message published on every (re)connect;
- jittered exponential reconnect backoff: paho's own backoff doubles without jitter, so a fleet that lost
  its broker would reconnect in lockstep. Paho calls `on_disconnect` (or `on_connect_fail`) exactly once
  before each of its reconnect waits; there we set paho's delay to the next jittered value;
- handlers that get a typed `Message`; an exception in a handler is logged, never kills the network loop;
- `publish` returns a `PublishHandle` that completes when the broker acknowledges (PUBACK for QoS 1);
- with `manual_ack`, `ack_many` acknowledges a whole batch of received messages as one write;
- a clean disconnect that lets the broker read everything sent before the DISCONNECT (`_close_gracefully`);
- a cheaper receive path than paho's own (`_Client`): one recv() fills a buffer that many packets are read
  from, instead of three or more recv() calls and a select() per packet;
- a cheaper publish path (`_Client`): publish properties packed once, not on every send; a PUBACK without
  properties read without building paho's `ReasonCode` and `Properties`; and the next queued message found
  at once instead of by scanning every message in flight.

Paho 2.2 facts the callers rely on (read in its source): a QoS 1/2 message stays in paho's memory until
its PUBACK/PUBCOMP, whatever the connection does. Published while disconnected, it is queued and sent after
the next CONNACK; in flight when the link dropped, it is re-sent with DUP after the next CONNACK, whether or
not the broker kept the session (without a session the broker takes it as a new message). Paho keeps at
most `max_inflight` QoS>0 messages on the wire and queues the rest in memory, except right after a
reconnect, when it sends every unacknowledged one at once. It does not honour the broker's Receive Maximum
by itself, so `receive_maximum` exposes it for callers that bound what they hand over.
Paho calls `on_publish` while holding its message lock: ack callbacks must be short and must not publish.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MessageState, MQTTErrorCode, _ConnectionState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from fleet_protocol.topics import DEFAULT_ROOT

log = logging.getLogger(__name__)

MQTT_DEFAULT_RECEIVE_MAXIMUM = 65_535  # what a CONNACK without Receive Maximum means (MQTT 5, 3.2.2.3.3)
DISCONNECT_WITH_WILL = 0x04
FAILURE_THRESHOLD = 0x80  # MQTT 5 reason codes from 0x80 up are failures
# Topics whose matching handlers are remembered: matching every message against every filter with paho's
# topic_matches_sub cost ~18% of the fleet manager's ingest CPU. A fleet has a few topics per device.
ROUTE_CACHE_MAX = 65_536
READ_CHUNK = 65_536  # bytes asked of the socket at once: many PUBLISH packets of a backlog per recv()
CLOSE_LINGER_S = 1.0  # after our DISCONNECT, how long to wait for the broker to close its side
_PUBACK = struct.Struct("!BBH")  # fixed header (PUBACK, remaining length 2) + packet id: reason 0, success


class MqttSettings(BaseModel):
    """How to reach the broker and how the session behaves; components embed this in their config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str = Field(min_length=1)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=1)
    session_expiry_s: int = Field(default=3600, ge=0)
    clean_start: bool = False
    reconnect_min_delay_s: float = Field(default=0.5, gt=0)
    reconnect_max_delay_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=100, ge=1)  # QoS>0 messages paho keeps on the wire at once
    # Consumers that must not lose a message: received QoS>0 messages are acknowledged only by `ack()`, and
    # the broker sends at most `receive_maximum` unacknowledged ones at a time (MQTT 5 flow control).
    manual_ack: bool = False
    receive_maximum: int | None = Field(default=None, ge=1, le=65535)
    topic_root: str = DEFAULT_ROOT

    @property
    def uses_tls(self) -> bool:
        return any(path is not None for path in (self.tls_ca, self.tls_cert, self.tls_key))


class BrokerConnection(Protocol):
    """Where and as whom to connect: each component's broker settings (with its own descriptions)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> SecretStr | None: ...
    @property
    def tls_ca(self) -> Path | None: ...
    @property
    def tls_cert(self) -> Path | None: ...
    @property
    def tls_key(self) -> Path | None: ...
    @property
    def keepalive_s(self) -> int: ...
    @property
    def session_expiry_s(self) -> int: ...
    @property
    def topic_root(self) -> str: ...


def session_settings(broker: BrokerConnection, client_id: str, **extra: Any) -> MqttSettings:
    """The `MqttSettings` of a component's broker settings; `extra`: other MqttSettings fields."""
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        username=broker.username,
        password=broker.password.get_secret_value() if broker.password else None,
        tls_ca=broker.tls_ca,
        tls_cert=broker.tls_cert,
        tls_key=broker.tls_key,
        keepalive_s=broker.keepalive_s,
        session_expiry_s=broker.session_expiry_s,
        topic_root=broker.topic_root,
        **extra,
    )


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """The MQTT 5 publish properties edgefleet uses."""

    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def to_paho(self) -> Properties | None:
        if self == NO_PROPERTIES:
            return None
        return _paho_publish_properties(self)

    @classmethod
    def from_paho(cls, props: Properties | None) -> MessageProperties:
        if props is None:
            return NO_PROPERTIES
        user = getattr(props, "UserProperty", None) or ()
        return cls(
            content_type=getattr(props, "ContentType", None),
            correlation_data=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
            user_properties=tuple((str(key), str(value)) for key, value in user),
        )


NO_PROPERTIES = MessageProperties()


class _PackedOnce(Properties):
    """Publish properties that keep their packed bytes: paho packs a message's properties on every send
    (~15 µs each), and these are shared by many messages. Changing one forgets the packed bytes."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "_packed", None)
        super().__setattr__(name, value)  # type: ignore[no-untyped-call]

    def __delattr__(self, name: str) -> None:
        object.__setattr__(self, "_packed", None)
        super().__delattr__(name)

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            object.__setattr__(self, "_packed", packed)
        return packed


@functools.lru_cache(maxsize=128)
def _paho_publish_properties(properties: MessageProperties) -> Properties:
    """Built once per distinct value (building one costs ~20 µs; every detection carries the same one).

    Shared between messages: paho only reads a message's properties, and packs them (`_PackedOnce`).
    """
    props = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if properties.content_type is not None:
        props.ContentType = properties.content_type
    if properties.correlation_data is not None:
        props.CorrelationData = properties.correlation_data
    if properties.response_topic is not None:
        props.ResponseTopic = properties.response_topic
    if properties.user_properties:
        props.UserProperty = list(properties.user_properties)
    return props


@dataclass(frozen=True, slots=True)
class Message:
    """A received message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: MessageProperties = NO_PROPERTIES
    mid: int = 0  # the packet id, for `MqttSession.ack` (manual_ack); 0 for QoS 0
    connection: int = 0  # `MqttSession.connect_count` when it arrived: a mid means nothing on a later link


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message the session itself sends: the will, or the birth message."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    properties: MessageProperties = NO_PROPERTIES


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated


MessageHandler = Callable[[Message], None]
AckCallback = Callable[["PublishHandle"], None]
ConnectListener = Callable[[bool], None]  # called with session_present after every successful connect
Birth = OutgoingMessage | Callable[[], OutgoingMessage]  # the message itself, or made afresh on each connect


_HANDLE_EVENT_LOCK = threading.Lock()


class PublishHandle:
    """One publish; `done` when the broker acknowledged it (QoS 1/2), it was written (QoS 0), or it failed.

    `reason_code` is the broker's MQTT 5 reason (0 = success, 0x10 = no matching subscribers, >= 0x80 =
    refused); `error` says why the message never reached the broker (then `reason_code` is None).
    """

    __slots__ = ("_done", "_event", "_on_ack", "error", "mid", "qos", "reason_code")

    def __init__(self, mid: int, qos: int, on_ack: AckCallback | None) -> None:
        self.mid = mid
        self.qos = qos
        self.reason_code: int | None = None
        self.error: str | None = None
        self._on_ack = on_ack
        self._done = False
        self._event: threading.Event | None = None  # made by the first wait(): most are never waited on

    @property
    def done(self) -> bool:
        return self._done

    @property
    def ok(self) -> bool:
        """Acknowledged with a success reason code."""
        return self.done and self.reason_code is not None and self.reason_code < FAILURE_THRESHOLD

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until done; True if the broker accepted the message."""
        with _HANDLE_EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._done:
                    self._event.set()
        self._event.wait(timeout)
        return self.ok

    def _complete(self, reason_code: int | None, error: str | None = None) -> None:
        self.reason_code, self.error = reason_code, error
        self._done = True  # before reading _event: wait() checks _done after making the event
        event = self._event
        if event is not None:
            event.set()
        if self._on_ack is not None:
            try:
                self._on_ack(self)
            except Exception:
                log.exception("ack callback for message id %d failed", self.mid)


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    match_filter: str  # without the `$share/<group>/` prefix: what incoming topics are matched against
    handler: MessageHandler
    qos: int


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is uniform in [cap/2, cap], cap = min*2^n."""

    def __init__(self, min_delay_s: float, max_delay_s: float) -> None:
        if min_delay_s <= 0 or max_delay_s < min_delay_s:
            raise ValueError(f"backoff needs 0 < min <= max, got min={min_delay_s} max={max_delay_s}")
        self.min_delay_s, self.max_delay_s = min_delay_s, max_delay_s
        self.attempts = 0

    def next_delay(self) -> float:
        cap = min(self.max_delay_s, self.min_delay_s * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return random.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempts = 0


class _BufferedSocket:
    """The broker connection with a receive buffer: one recv() of up to READ_CHUNK bytes serves the small
    reads paho makes per packet (the command byte, each length byte, then the rest).

    `_Client.loop_read` empties the buffer before it returns, so nothing waits in it while select() (paho's
    or a shared event loop's) waits for the socket. `pending()` is there for TLS: paho asks a socket that
    has it for the bytes TLS decrypted already, and then skips select()'s wait.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.refill = True  # False: an empty buffer reads as "no data yet" instead of asking the socket
        self._buffer = b""
        self._position = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._position

    def recv(self, buffer_size: int) -> bytes:
        if self._position >= len(self._buffer):
            if not self.refill:
                raise BlockingIOError  # paho keeps the partial packet and reads on when select() says so
            data: bytes = self.raw.recv(max(buffer_size, READ_CHUNK))  # raises as the socket's recv does
            if len(data) <= buffer_size:
                return data
            self._buffer, self._position = data, 0
        start = self._position
        self._position = min(start + buffer_size, len(self._buffer))
        return self._buffer[start : self._position]

    def pending(self) -> int:
        decrypted = getattr(self.raw, "pending", None)
        return self.buffered + (decrypted() if decrypted is not None else 0)

    def send(self, buffer: bytes | bytearray) -> int:
        sent: int = self.raw.send(buffer)
        return sent

    def close(self) -> None:
        self.raw.close()

    def fileno(self) -> int:
        number: int = self.raw.fileno()
        return number

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


Received = Callable[[str, bytes, int, bool, int], None]  # topic, payload, qos, retain, packet id


class _Client(paho.Client):
    """paho's client with a cheaper receive path and batched PUBACKs (overrides read in paho 2.2's source).

    - its socket is a `_BufferedSocket`, and `loop_read` handles every packet that one read of the socket
      brought before paho goes back to select() (paho reads one packet per select());
    - a QoS 0/1 PUBLISH without properties (most messages here) goes straight to `receive`: paho's own path
      builds a `Properties` (~25 µs: it sets up and clears some 40 attributes) and an `MQTTMessage` with a
      `threading.Condition` for every message. Any other PUBLISH takes paho's path to `on_message`;
    - `queue_pubacks` queues the PUBACKs of a batch as one write (paho's `ack` queues one packet and wakes
      its network thread per message).

    and a cheaper publish path:
    - a PUBACK without properties (what a broker sends unless it explains a failure) is read here: paho's
      `decode_puback` builds two `ReasonCode`s and two `Properties` per PUBACK (~30 µs), where these share
      one per reason code, and passes on Mosquitto's 0x95 (packet too large), which paho's path takes for a
      malformed packet (`_puback_reason`). Any other PUBACK or PUBCOMP takes paho's path;
    - the messages paho queued beyond `max_inflight` are also kept in `_queued`, in order, so that each
      PUBACK sends the next one at once: paho's `_update_inflight` walks every message in flight first.
    """

    receive: Received | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Guarded by paho's _out_message_mutex, as _out_messages is: the messages that may be in state
        # queued, in publish order. Stale entries (sent after a reconnect, acknowledged, or their packet id
        # reused) are skipped when they come up.
        self._queued: deque[paho.MQTTMessage] = deque()
        super().__init__(*args, **kwargs)

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())

    def _sock_close(self) -> None:
        if self._state == _ConnectionState.MQTT_CS_DISCONNECTING and self._sock is not None:
            _close_gracefully(self._sock)  # paho just wrote our DISCONNECT
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)  # may read the socket
        sock = self._sock
        if not isinstance(sock, _BufferedSocket):
            return rc
        sock.refill = False  # the rest only from the buffer: each round takes at least one byte of it
        try:
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and sock.buffered and self._sock is sock:
                rc = super().loop_read(max_packets)
        finally:
            sock.refill = True
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        received = self._plain_publish()
        receive = self.receive
        if received is None or receive is None:
            return super()._handle_publish()
        with self._in_callback_mutex:
            try:
                receive(*received)
            except Exception as error:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", error)
                if not self.suppress_exceptions:
                    raise
        qos, mid = received[2], received[4]
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _plain_publish(self) -> tuple[str, bytes, int, bool, int] | None:
        """The PUBLISH packet just read, if it is QoS 0/1 (MQTT 5) without properties and well formed."""
        header: int = self._in_packet["command"]
        packet: bytearray = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos > 1 or self._protocol != paho.MQTTv5 or len(packet) < 2:
            return None
        topic_end = 2 + (packet[0] << 8 | packet[1])
        properties_at = topic_end + 2 * qos  # a QoS 1 message has a packet id before its properties
        if len(packet) <= properties_at or packet[properties_at] != 0:  # 0: a properties length of 0
            return None
        try:
            topic = packet[2:topic_end].decode()
        except UnicodeDecodeError:
            return None  # paho's path reports it
        mid = packet[topic_end] << 8 | packet[topic_end + 1] if qos else 0
        return topic, bytes(packet[properties_at + 1 :]), qos, bool(header & 0x01), mid

    def queue_pubacks(self, mids: list[int]) -> None:
        """PUBACKs (success) for the QoS 1 messages `mids`, in this order, queued as one packet."""
        acks = b"".join([_PUBACK.pack(paho.PUBACK, 2, mid) for mid in mids])
        self._packet_queue(paho.PUBACK, acks, 0, 0)

    def publish(
        self,
        topic: str,
        payload: paho.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        if qos == 0:
            return super().publish(topic, payload, qos, retain, properties)
        with self._out_message_mutex:  # reentrant: paho's publish takes it too; so does _update_inflight
            info = super().publish(topic, payload, qos, retain, properties)
            message = self._out_messages.get(info.mid)
            if message is not None and message.state == MessageState.MQTT_MS_QUEUED:
                self._queued.append(message)
        return info

    def _update_inflight(self) -> MQTTErrorCode:
        """Send queued messages while the window has room (paho calls this under _out_message_mutex)."""
        queued, messages = self._queued, self._out_messages
        while queued and self._inflight_messages < self._max_inflight_messages:
            message = queued.popleft()
            if message.state != MessageState.MQTT_MS_QUEUED or messages.get(message.mid) is not message:
                continue
            self._inflight_messages += 1
            message.state = _AWAITING_ACK[message.qos]
            rc = self._send_publish(
                message.mid,
                message._topic,
                message.payload,
                message.qos,
                message.retain,
                message.dup,
                properties=message.properties,
            )
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _messages_reconnect_reset_out(self) -> None:
        with self._out_message_mutex:
            # paho marks which messages are re-sent after the CONNACK and which wait (2.2 re-sends them all)
            super()._messages_reconnect_reset_out()
            self._queued = deque(
                m for m in self._out_messages.values() if m.state == MessageState.MQTT_MS_QUEUED
            )

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet: bytearray = self._in_packet["packet"]
        reason = _plain_puback_reason(packet) if cmd == "PUBACK" and self._protocol == paho.MQTTv5 else None
        if reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = packet[0] << 8 | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _close_gracefully(sock: Any, linger_s: float = CLOSE_LINGER_S) -> None:
    """Half-close the connection, then read until the broker closes its side (it does on DISCONNECT).

    paho closes the socket as soon as the DISCONNECT is written. Closing a socket with unread data (a
    SUBACK, a PUBLISH still arriving) sends a reset instead of a FIN, and the broker may then throw away what
    it had not read yet. Seen with Mosquitto 2.0.11: a consumer's last PUBACKs, queued just before
    `disconnect()`, lost in 4 of 10 runs (tests/cloud_refiner/test_session_ack.py), so the broker sent those
    messages again. What arrives meanwhile is discarded, as paho would.
    """
    raw = sock.raw if isinstance(sock, _BufferedSocket) else sock
    deadline = time.monotonic() + linger_s
    try:
        raw.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([raw], [], [], left)[0]:
                return
            try:
                if not raw.recv(READ_CHUNK):
                    return  # the broker closed its side
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
    except (OSError, ValueError):
        return  # the link is gone already: nothing to wait for


_NO_PUBACK_PROPERTIES = _properties(PacketTypes.PUBACK)  # shared: on_publish callbacks only read it
_AWAITING_ACK = {1: MessageState.MQTT_MS_WAIT_FOR_PUBACK, 2: MessageState.MQTT_MS_WAIT_FOR_PUBREC}


def _plain_puback_reason(packet: bytearray) -> ReasonCode | None:
    """The reason code of a PUBACK without properties (MQTT 5, 3.4.2: remaining length 2 means success; 3,
    or 4 with a properties length of 0, carries a reason code); None for any other packet."""
    size = len(packet)
    if size == 2:
        return _puback_reason(0)
    if size == 3 or (size == 4 and packet[3] == 0):
        return _puback_reason(packet[2])
    return None


@functools.cache
def _puback_reason(value: int) -> ReasonCode | None:
    """One shared `ReasonCode` per PUBACK reason (on_publish callbacks only read it).

    A failure MQTT 5 lists for other packets only is passed on as that failure: Mosquitto 2.0 answers a
    PUBLISH over its `message_size_limit` with a PUBACK carrying 0x95 (packet too large), which paho's path
    takes for a malformed packet: it drops the link and sends the message again after reconnecting, forever.
    None for any other value: paho's path then reports the malformed packet.
    """
    for packet_type in (PacketTypes.PUBACK, PacketTypes.DISCONNECT):
        with contextlib.suppress(KeyError, ValueError):  # unknown, or not for this packet type
            reason = ReasonCode(packet_type, identifier=value)
            if packet_type == PacketTypes.PUBACK or value >= FAILURE_THRESHOLD:
                return reason
    return None


class PublishingSession(Protocol):
    """What the device agent and its outbox publisher need of a session: `MqttSession` or another transport.

    `settings` names the endpoint in logs; `receive_maximum` bounds the publisher's in-flight window.
    """

    settings: MqttSettings
    receive_maximum: int

    @property
    def connected(self) -> bool: ...

    @property
    def topic_filters(self) -> list[str]: ...

    def connect(self) -> None: ...

    def disconnect(self, *, publish_will: bool = False) -> None: ...

    def add_connect_listener(self, listener: ConnectListener) -> None: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        on_ack: AckCallback | None = None,
    ) -> PublishHandle: ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None: ...


class MqttSession:
    """One MQTT 5 connection with a persistent session; `connect()` starts paho's network thread."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: OutgoingMessage | None = None,
        birth: Birth | None = None,
    ) -> None:
        self.settings = settings
        self._birth = birth
        self._backoff = Backoff(settings.reconnect_min_delay_s, settings.reconnect_max_delay_s)
        self._connected = threading.Event()
        self._lock = threading.Lock()  # guards the subscriptions and the ack bookkeeping below
        # Held while acks are checked against the link and queued, and while the link is marked down: a
        # packet id queued after paho's reconnect would acknowledge another message on the new link.
        # Reentrant: with no network thread, paho writes at once and reports a failure from within.
        self._ack_lock = threading.RLock()
        self._subscriptions: dict[str, _Subscription] = {}
        self._routes: dict[str, tuple[MessageHandler, ...]] = {}  # topic -> handlers; reset on (un)subscribe
        self._pending: dict[int, PublishHandle] = {}
        self._early_acks: dict[int, int] = {}  # acks that arrived before publish() registered the handle
        self._connect_listeners: list[ConnectListener] = []
        self.receive_maximum = MQTT_DEFAULT_RECEIVE_MAXIMUM
        self.session_present = False
        self.connect_count = 0
        self._stopping = False  # set by disconnect()/abort(): no reconnect, no "disconnected" warning
        self._client = self._new_client(will)

    # ---- connection -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self) -> None:
        """Start connecting in paho's network thread; returns at once (see `wait_connected`)."""
        props = _properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        if self.settings.receive_maximum is not None:
            props.ReceiveMaximum = self.settings.receive_maximum
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=self.settings.clean_start,
            properties=props,
        )
        self._stopping = False
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def disconnect(self, *, publish_will: bool = False) -> None:
        """Clean disconnect; the broker discards the will unless `publish_will` (MQTT 5 reason 0x04)."""
        reason = ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL) if publish_will else None
        self._stopping = True
        self._client.disconnect(reasoncode=reason)
        self._client.loop_stop()
        self._connected.clear()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the will) and stop the loop; tests."""
        sock = self._client.socket()
        if isinstance(sock, _BufferedSocket):
            sock = sock.raw
        self._stopping = True
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._client.loop_stop()
        self._connected.clear()

    def add_connect_listener(self, listener: ConnectListener) -> None:
        self._connect_listeners.append(listener)

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
        """Hand a message to paho; QoS>0 messages are kept (and re-sent after reconnects) until acked.

        `on_ack` is called once, from paho's thread or from this call, when the handle is done.
        """
        props = properties.to_paho() if properties is not None else None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        handle = PublishHandle(info.mid, qos, on_ack)
        queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        )
        if not queued:
            handle._complete(None, f"not sent: {paho.error_string(info.rc)}")
            return handle
        with self._lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = handle
        if early is not None:
            handle._complete(early)
        return handle

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route messages matching `topic_filter` to `handler`; kept and re-subscribed on every connect."""
        match_filter = topic_filter
        if topic_filter.startswith("$share/"):
            match_filter = topic_filter.split("/", 2)[2]
        with self._lock:  # on_connect reads the subscriptions after setting `connected`, under this lock
            self._subscriptions[topic_filter] = _Subscription(topic_filter, match_filter, handler, qos)
            self._routes.clear()
            send_now = self.connected
        if send_now:
            self._client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))

    @property
    def topic_filters(self) -> list[str]:
        """The filters subscribed to (and re-subscribed on every connect), oldest first."""
        with self._lock:
            return list(self._subscriptions)

    def ack(self, message: Message) -> bool:
        """Acknowledge a QoS>0 message received with `manual_ack`; False if it is not ours to ack any more.

        A message that arrived on an earlier connection is not acked: its packet id may name another message
        now, and the broker re-sends the unacknowledged one on the new link anyway (consumers dedupe).
        """
        return self.ack_many((message,))

    def ack_many(self, messages: Iterable[Message]) -> bool:
        """Acknowledge messages received with `manual_ack`, in their order, as one write (`ack` says which
        are not ours to ack any more: those are skipped); False if any was skipped."""
        if not self.settings.manual_ack:
            return True
        with self._ack_lock:
            link = self.connect_count if self.connected else None
            acks = [m for m in messages if m.qos > 0]
            current = [m for m in acks if m.connection == link]
            qos1 = [m.mid for m in current if m.qos == 1]
            if qos1:
                self._client.queue_pubacks(qos1)
            for message in current:
                if message.qos == 2:
                    self._client.ack(message.mid, message.qos)
        return len(current) == len(acks)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            self._routes.clear()
            send_now = self.connected
        if send_now:
            self._client.unsubscribe(topic_filter)

    # ---- paho callbacks (paho's network thread) --------------------------------------------------------

    def _new_client(self, will: OutgoingMessage | None) -> _Client:
        client = _Client(CallbackAPIVersion.VERSION2, client_id=self.settings.client_id, protocol=paho.MQTTv5)
        client.enable_logger(log)
        client.suppress_exceptions = True  # belt and braces: our callbacks already catch their errors
        client.max_inflight_messages_set(self.settings.max_inflight)
        client.max_queued_messages_set(0)  # unbounded: callers bound what they hand over
        client.manual_ack_set(self.settings.manual_ack)
        if self.settings.username is not None:
            client.username_pw_set(self.settings.username, self.settings.password)
        if self.settings.uses_tls:
            context = ssl.create_default_context(
                cafile=str(self.settings.tls_ca) if self.settings.tls_ca else None
            )
            if self.settings.tls_cert is not None:
                key = str(self.settings.tls_key) if self.settings.tls_key else None
                context.load_cert_chain(str(self.settings.tls_cert), key)
            client.tls_set_context(context)
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain, will.properties.to_paho())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.receive = self._receive
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error(
                "broker %s:%d refused client %r: %s (check credentials, client id and ACL)",
                self.settings.host,
                self.settings.port,
                self.settings.client_id,
                reason,
            )
            return
        self._backoff.reset()
        self.session_present = flags.session_present
        self.receive_maximum = getattr(props, "ReceiveMaximum", MQTT_DEFAULT_RECEIVE_MAXIMUM)
        self.connect_count += 1
        log.info(
            "connected to %s:%d as %r (session present: %s)",
            self.settings.host,
            self.settings.port,
            self.settings.client_id,
            flags.session_present,
        )
        with self._lock:
            self._connected.set()
            subscriptions = [
                (s.topic_filter, SubscribeOptions(qos=s.qos)) for s in self._subscriptions.values()
            ]
        if subscriptions:
            client.subscribe(subscriptions)
        announce_connected(self, self._birth, list(self._connect_listeners), flags.session_present)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._ack_lock:
            was_connected = self._connected.is_set()
            self._connected.clear()
        self._fail_unsent_qos0()
        if self._stopping:
            client.loop_stop()  # from paho's own thread this only flags it to end now, not after a backoff
            return
        delay = self._schedule_reconnect()
        if was_connected:
            log.warning("disconnected from %s:%d (%s); reconnecting in %.1f s", *self._where(), reason, delay)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        delay = self._schedule_reconnect()
        log.info("cannot reach broker %s:%d; retrying in %.1f s", *self._where(), delay)

    def _schedule_reconnect(self) -> float:
        delay = self._backoff.next_delay()
        # Paho types the delays as int but waits with float arithmetic (sleep until a float deadline).
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        return delay

    def _where(self) -> tuple[str, int]:
        return self.settings.host, self.settings.port

    def _fail_unsent_qos0(self) -> None:
        """QoS 0 messages still queued when the link dropped are discarded by paho without a callback."""
        with self._lock:
            lost = [mid for mid, handle in self._pending.items() if handle.qos == 0]
            handles = [self._pending.pop(mid) for mid in lost]
        for handle in handles:
            handle._complete(None, "connection lost before the QoS 0 message was written")

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early_acks[mid] = reason.value
        if handle is not None:
            handle._complete(reason.value)

    def _on_message(self, client: paho.Client, userdata: Any, raw: paho.MQTTMessage) -> None:
        """A message paho decoded: one with properties, or QoS 2 (the others come to `_receive` directly)."""
        properties = MessageProperties.from_paho(getattr(raw, "properties", None))
        self._receive(raw.topic, bytes(raw.payload), raw.qos, bool(raw.retain), raw.mid, properties)

    def _receive(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        mid: int,
        properties: MessageProperties = NO_PROPERTIES,
    ) -> None:
        message = Message(
            topic=topic,
            payload=payload,
            qos=qos,
            retain=retain,
            properties=properties,
            mid=mid,
            connection=self.connect_count,
        )
        with self._lock:
            handlers = self._handlers_for(message.topic)
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                log.exception("handler %r failed on a message on %s", handler, message.topic)

    def _handlers_for(self, topic: str) -> tuple[MessageHandler, ...]:
        """The handlers of the subscriptions matching `topic`, in subscription order; call under the lock."""
        handlers = self._routes.get(topic)
        if handlers is None:
            subscriptions = self._subscriptions.values()
            handlers = tuple(
                sub.handler for sub in subscriptions if paho.topic_matches_sub(sub.match_filter, topic)
            )
            if len(self._routes) >= ROUTE_CACHE_MAX:
                del self._routes[next(iter(self._routes))]  # the oldest entry: insertion order
            self._routes[topic] = handlers
        return handlers

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Properties
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error(
                    "broker refused a subscription of %r: %s (check the ACL)", self.settings.client_id, reason
                )


def announce_connected(
    session: PublishingSession,
    birth: Birth | None,
    listeners: list[ConnectListener],
    session_present: bool,
) -> None:
    """After a connect: publish the birth message, then tell the listeners; their failures are logged."""
    if birth is not None:
        try:
            message = birth() if callable(birth) else birth
            session.publish(message.topic, message.payload, message.qos, message.retain, message.properties)
        except Exception:
            log.exception("publishing the birth message failed")
    for listener in listeners:
        try:
            listener(session_present)
        except Exception:
            log.exception("connect listener %r failed", listener)

"""`edgefleet sim`: many simulated devices in one process, running the agent's own MQTT, outbox and OTA code.

Real, per device (the very classes the agent runs):
- `fleet_protocol.mqtt.MqttSession`: persistent session, a retained `offline` status as its will, a retained
  `online` status as its birth message, jittered reconnect backoff; its own broker account when given;
- `Outbox` (a SQLite WAL file in the device's data dir) drained by `OutboxPublisher` (a row is deleted on
  its PUBACK);
- `OtaManager` with a `ModelStore`: `model/desired` → download with resume (HTTP Range) → verify size, sha256
  and the Ed25519 signature against the trust store → persisted states → `model/reported` (retained) →
  activation → probation on the frames' latencies, with the device's own rollback.

Simulated (the simulator says so in its help and its log):
- frames and detections: synthetic events at `rate_hz`, with made-up boxes and timings;
- telemetry: the p95 latency it reports is `latency_ms` (or `slow_latency_ms`, see the faults);
- the model: every device shares one onnxruntime session per model version, loaded from the first device's
  verified file; staging's smoke inference is skipped. Downloads, hashes and signatures stay per device.

Faults: `fail_verify` of the devices corrupt what they download (its last byte), so the sha256 check fails;
`slow` of the devices report `slow_latency_ms` while they run a model they activated after the simulator
started. Which devices is decided as they first download (or activate), spread evenly in that order (every
5th at 0.2), so any wave of a rollout sees the share; once chosen, a device stays faulty until the
simulator restarts.

Threads: the outbox publisher and the OTA worker per device (as on a device); one network thread for every
device's MQTT connection (`SharedNetwork`: epoll, where paho's per-client thread and its `select()` stop at
file descriptor 1023), and one scheduler thread for every device's frames, detections and telemetry.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import selectors
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import paho.mqtt.client as paho
import typer
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from rich.console import Console

from device_agent.config import OtaConfig
from device_agent.detector import Detector
from device_agent.downloader import (
    DownloadCancelled,
    DownloadRequest,
    DownloadResult,
    ProgressCallback,
    download,
)
from device_agent.model_store import ModelStore
from device_agent.ota import OtaManager
from device_agent.outbox import MessageKind, Outbox, OutboxFullError, OutboxLimits, OutboxMessage
from device_agent.pipeline import ActiveModel, ModelSlot
from device_agent.publisher import OutboxPublisher
from fleet_protocol import __version__
from fleet_protocol.errors import PayloadError, TopicError
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import (
    Message,
    MessageProperties,
    MqttSession,
    MqttSettings,
    OutgoingMessage,
    PublishHandle,
)
from fleet_protocol.onnx_model import SessionOptions
from fleet_protocol.payloads import (
    DetectionEvent,
    DetectionItem,
    DeviceState,
    ModelRef,
    ModelReported,
    OutboxStats,
    StageLatency,
    StageTimingMs,
    StatusPayload,
    TelemetryPayload,
    decode_model_desired,
    encode,
)
from fleet_protocol.topics import Topics, validate_device_id

log = logging.getLogger(__name__)

SIMULATED = "simulated"  # the provider name the devices report: no device ran this model
FRAME_WIDTH, FRAME_HEIGHT = 1280, 720
DETECTION_PROPERTIES = MessageProperties(content_type="application/json")
STOP_WORKERS = 16
# The scheduler runs every event due within this much of now in one round: a thousand devices' frames alone
# are 2,000 events a second, and a sleep between each two is a hand-over of the interpreter lock.
SCHEDULE_SLACK_S = 0.02
# Each device's outbox publisher is woken by every enqueue and on every (re)connect; its poll only paces
# retries, so a slow one costs nothing, while a thousand 2-s polls are 500 wake-ups (two SQLite reads each)
# a second.
PUBLISHER_POLL_S = 10.0
OFFLINE_ACK_TIMEOUT_S = 3.0
DISCONNECT_TIMEOUT_S = 3.0
SWITCH_INTERVAL_S = 0.05


class DeviceCredentials(BaseModel):
    """A provisioned device's secrets (from `edgefleet fleet provision`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    password: SecretStr | None = Field(default=None, description="Broker password (username: the id).")
    token: SecretStr | None = Field(default=None, description="Artifact download token.")


class SimConfig(BaseModel):
    """What `edgefleet sim` runs: how many devices, where they connect, how they behave, which faults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: int = Field(default=10, ge=1, le=100_000, description="Simulated devices.")
    prefix: str = Field(default="sim-", description="Device ids are <prefix><index, 4 digits>.")
    first: int = Field(default=0, ge=0, description="Index of the first device (several simulators).")
    data_dir: Path = Field(
        default=Path("edgefleet-data/sim"), description="One folder per device: outbox, models, OTA record."
    )
    model: Path = Field(description="The ONNX detector every device starts with.")
    model_ref: ModelRef = Field(description="How the devices name the model they start with.")
    broker_host: str = Field(default="127.0.0.1", description="MQTT broker host.")
    broker_port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker port.")
    topic_root: str = Field(default="edgefleet/v1", description="Root of the topic tree.")
    tls_ca: Path | None = Field(default=None, description="CA file; setting it turns TLS on.")
    keepalive_s: int = Field(default=60, ge=5, le=3600, description="MQTT keepalive.")
    credentials: dict[str, DeviceCredentials] = Field(
        default_factory=dict, description="Broker password and artifact token per device id (optional)."
    )
    token: SecretStr | None = Field(
        default=None, description="Artifact token for devices without their own (e.g. an operator token)."
    )
    trust_store: Path | None = Field(
        default=None, description="Folder of trusted Ed25519 public keys; default: <data_dir>/trust."
    )
    allow_unsigned: bool = Field(default=False, description="Accept unsigned models (development only).")
    rate_hz: float = Field(default=0.2, ge=0, le=100, description="Detection events per second per device.")
    objects: int = Field(default=2, ge=0, le=50, description="Detections per event.")
    fps: float = Field(default=2.0, gt=0, le=100, description="Frames per second judged by OTA probation.")
    telemetry_s: float = Field(default=5.0, ge=0.1, le=3600, description="Seconds between telemetry.")
    latency_ms: float = Field(default=40.0, gt=0, le=600_000, description="Frame latency p95 reported.")
    slow_latency_ms: float = Field(
        default=400.0, gt=0, le=600_000, description="The p95 the slow devices report."
    )
    fail_verify: float = Field(default=0.0, ge=0, le=1, description="Share of devices whose downloads fail.")
    slow: float = Field(default=0.0, ge=0, le=1, description="Share of devices slow on a new model.")
    probation_s: float = Field(default=5.0, ge=0, description="The devices' own probation, seconds.")
    probation_frames: int = Field(default=5, ge=0, description="Frames the devices' own probation needs.")
    latency_budget_ms: float = Field(
        default=1000.0, gt=0, description="Device-side budget: probation rolls back above budget x 1.5."
    )
    connect_rate: float = Field(default=200.0, gt=0, description="Devices started (connecting) per second.")
    max_downloads: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Downloads at once in this process: its devices share one machine's CPU and disk.",
    )
    outbox_max_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, description="Each device's outbox.")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        validate_device_id(f"{value}0000")
        return value

    @field_validator("topic_root")
    @classmethod
    def _valid_root(cls, value: str) -> str:
        Topics(value)  # raises TopicError (a ValueError) with the reason
        return value

    def device_id(self, index: int) -> str:
        return f"{self.prefix}{index:04d}"

    @property
    def device_ids(self) -> list[str]:
        return [self.device_id(i) for i in range(self.first, self.first + self.devices)]

    @property
    def trust_dir(self) -> Path:
        return self.trust_store or self.data_dir / "trust"


def load_credentials(path: Path) -> dict[str, DeviceCredentials]:
    """`{device_id: {password, token}}` from a YAML or JSON file; ValueError says what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read the credentials file {path}: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of device id to {{password, token}}")
    try:
        return {str(key): DeviceCredentials.model_validate(value) for key, value in raw.items()}
    except ValidationError as error:
        raise ValueError(f"{path}: {error}") from None


def parse_model_ref(text: str) -> ModelRef:
    name, sep, version = text.partition("@")
    if not sep:
        raise ValueError(f"model ref {text!r}: write NAME@VERSION, e.g. yolov8n@3")
    try:
        return ModelRef(name=name, version=version)
    except ValidationError as error:
        raise ValueError(f"model ref {text!r}: {error.errors()[0]['msg']}") from None


class EvenShare:
    """Picks `share` of the items it is asked about, spread evenly in asking order (0.2: every 5th)."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.asked = 0
        self.picked = 0
        self._lock = threading.Lock()

    def next(self) -> bool:
        with self._lock:
            self.asked += 1
            k = self.asked
            picked = math.floor(k * self.share + 1e-9) > math.floor((k - 1) * self.share + 1e-9)
            self.picked += picked
            return picked


class DownloadSlots:
    """At most `count` downloads at once, granted in the order they were asked for.

    A waiter sleeps on its device's `Event` until it is granted a slot or its device says that its job may
    have been superseded (`SimDevice` sets the event on every `model/desired` and when it stops); waiting
    with a timeout to look at the cancel flag instead woke a thousand queued threads every few seconds.
    """

    RECHECK_S = 30.0  # a safety net only: every path that cancels a job also sets the waiter's event

    def __init__(self, count: int) -> None:
        self._free = count
        self._lock = threading.Lock()
        self._queue: deque[threading.Event] = deque()
        self._granted: set[threading.Event] = set()

    def acquire(self, signal: threading.Event, cancelled: Callable[[], bool]) -> bool:
        """True with a slot (give it back with `release`); False when `cancelled()` said so first."""
        with self._lock:
            if self._free > 0 and not self._queue:
                self._free -= 1
                return True
            signal.clear()
            self._queue.append(signal)
        while True:
            signal.wait(self.RECHECK_S)
            with self._lock:
                signal.clear()
                if signal in self._granted:
                    self._granted.discard(signal)
                    return True
                if cancelled():
                    self._queue.remove(signal)
                    return False

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def release(self) -> None:
        with self._lock:
            if not self._queue:
                self._free += 1
                return
            turn = self._queue.popleft()
            self._granted.add(turn)
            turn.set()


class SharedNetwork:
    """The network side of many paho clients on one thread, with epoll (the `selectors` module).

    paho's `loop_start()` gives every client a thread whose `select()` cannot watch a file descriptor above
    1023, which a process of a thousand clients (and their outbox files) passes at once; here one thread
    reads, writes, pings and reconnects for all of them through paho's external-loop API (`loop_read`,
    `loop_write`, `loop_misc` and the socket callbacks). Everything paho does on the wire stays the same.
    """

    MISC_INTERVAL_S = 1.0  # keepalive pings and timeouts (paho's own loop checks once per second too)
    MAX_BUFFERED_READS = 1024  # loop_read calls per readiness for bytes the socket object buffers itself

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._dirty: set[paho.Client] = set()  # clients that queued packets since the last round
        self._woken = False
        self._due: list[tuple[float, int, SharedLoopSession]] = []  # (when, tie-breaker, session) to connect
        self._order = itertools.count()
        self._clients: list[paho.Client] = []
        self._writing: set[paho.Client] = set()  # waiting for the socket to take more
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-network", daemon=True)
        self._ident: int | None = None

    @property
    def sockets(self) -> int:
        """Client sockets open now."""
        return len(self._selector.get_map()) - 1

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        with self._lock:
            self._clients.append(client)

    def connect_later(self, session: SharedLoopSession, delay_s: float) -> None:
        """(Re)connect `session` after `delay_s`, on the network thread (any thread may ask)."""
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + delay_s, next(self._order), session))
        self._wake()

    # ---- paho's socket callbacks (open/close on the network thread, register_write from any thread) ----

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        stale = self._selector.get_map().get(sock.fileno())
        if stale is not None:  # a closed socket whose number the new one reuses
            self._selector.unregister(stale.fileobj)
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._writing.discard(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() == self._ident:
            return  # the network thread itself: it looks at want_write() after every write
        with self._lock:
            self._dirty.add(client)
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        next_misc = time.monotonic() + self.MISC_INTERVAL_S
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                next_due = self._due[0][0] if self._due else math.inf
            timeout = max(0.0, min(next_due, next_misc) - now)
            for key, mask in self._selector.select(timeout):
                client = key.data
                if client is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                if mask & selectors.EVENT_READ:
                    self._read(client)
                if mask & selectors.EVENT_WRITE:
                    self._write(client)
            with self._lock:
                dirty, self._dirty, self._woken = self._dirty, set(), False
            for client in dirty:
                self._write(client)
            self._connect_due()
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + self.MISC_INTERVAL_S
                with self._lock:
                    clients = list(self._clients)
                for client in clients:
                    self._guard(client.loop_misc)
                    if client.want_write():  # a packet queued while the network thread was writing
                        self._write(client)

    def _read(self, client: paho.Client) -> None:
        """Read what arrived; then what the socket object itself still buffers (TLS decrypts ahead, and a
        buffering wrapper may read several packets at once): epoll does not report bytes already read off
        the kernel's socket, so they would wait for the next network input."""
        self._guard(client.loop_read)
        for _ in range(self.MAX_BUFFERED_READS):
            sock = client.socket()
            if sock is None or _buffered(sock) <= 0:
                return
            try:
                if client.loop_read() != paho.MQTT_ERR_SUCCESS:
                    return
            except Exception:
                log.exception("sim: network step failed")
                return

    def _write(self, client: paho.Client) -> None:
        self._guard(client.loop_write)
        sock = client.socket()
        if sock is None:
            return
        if client.want_write():  # the socket took only part: wait until it can take more
            if client not in self._writing:
                self._writing.add(client)
                self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        elif client in self._writing:
            self._writing.discard(client)
            self._selector.modify(sock, selectors.EVENT_READ, client)

    def _connect_due(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > now:
                    return
                _, _, session = heapq.heappop(self._due)
            session.open_connection()

    @staticmethod
    def _guard(step: Callable[[], Any]) -> None:
        try:
            step()
        except Exception:  # one client's trouble must not stop the others
            log.exception("sim: network step failed")


class SharedLoopSession(MqttSession):
    """`MqttSession` (same session, will, birth, subscriptions, acks) driven by a `SharedNetwork`."""

    def __init__(
        self,
        settings: MqttSettings,
        network: SharedNetwork,
        *,
        will: OutgoingMessage | None = None,
        birth: Callable[[], OutgoingMessage] | None = None,
    ) -> None:
        super().__init__(settings, will=will, birth=birth)
        self._network = network
        network.attach(self._client)

    def connect(self) -> None:
        """As `MqttSession.connect`, but the shared network thread opens the connection."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
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
        self._network.connect_later(self, 0.0)

    def open_connection(self) -> None:
        """On the network thread: open the socket and send CONNECT (a failure schedules the next try)."""
        if self._stopping:
            return
        try:
            self._client.reconnect()
        except (OSError, ValueError) as error:  # refused, unreachable, TLS, timeout
            log.debug("%s: connect failed: %s", self.settings.client_id, error)
            self._on_connect_fail(self._client, None)

    def _schedule_reconnect(self) -> float:
        # Called by the session when a connection drops or fails: the same jittered backoff, our thread.
        delay = self._backoff.next_delay()
        self._network.connect_later(self, delay)
        return delay


class SharedDetector(Detector):
    """One onnxruntime session that many simulated devices use; warmed up once, not once per device."""

    _warmed = False
    _warm_lock = threading.Lock()

    def warmup(self, runs: int = 1) -> None:
        with self._warm_lock:
            if not self._warmed:
                super().warmup(runs)
                self._warmed = True


class SharedModels:
    """A loaded detector per model version, shared by every simulated device (the simulator's shortcut)."""

    def __init__(self, configured: Path, configured_ref: ModelRef) -> None:
        self.configured_path = configured
        self.configured_ref = configured_ref
        self._options = SessionOptions(intra_op_threads=1, allow_spinning=False)
        self._detectors: dict[tuple[str, str], Detector] = {}
        self._lock = threading.Lock()

    def configured(self) -> ActiveModel:
        return self.load(self.configured_path, self.configured_ref)

    def load(self, path: Path, ref: ModelRef) -> ActiveModel:
        """The session of `ref`, opened from `path` the first time (a bad file fails that staging)."""
        key = (ref.name, ref.version)
        with self._lock:
            detector = self._detectors.get(key)
            if detector is None:
                detector = SharedDetector(path, session_options=self._options, warmup=False)
                self._detectors[key] = detector
                log.info("sim: loaded %s@%s once for every device (%s)", ref.name, ref.version, path.name)
        return ActiveModel(detector, ref)


@dataclass
class _Counters:
    detections: int = 0
    telemetry: int = 0
    outbox_full: int = 0
    malformed: int = 0


class SimDevice:
    """One simulated device: the agent's session, outbox, publisher and OTA manager; synthetic frames."""

    def __init__(self, fleet: SimFleet, device_id: str) -> None:
        self.fleet = fleet
        self.device_id = device_id
        config = fleet.config
        self.root = config.data_dir / device_id
        self.root.mkdir(parents=True, exist_ok=True)
        secrets = config.credentials.get(device_id, DeviceCredentials())
        self.faulty: bool | None = None  # corrupts its downloads; decided at its first download
        self.slow: bool | None = None  # slow on a new model; decided at its first activation
        self.counters = _Counters()
        self._download_turn = threading.Event()  # see DownloadSlots
        self._stopping = False
        self.frame_seq = 0
        self._rng = random.Random(device_id)
        self.ota = OtaManager(
            fleet.ota_config(secrets.token),
            ModelStore(self.root / "models"),
            trust_store=config.trust_dir,
            load=fleet.models.load,
            load_configured=fleet.models.configured,
            configured_path=config.model,
            report=self._report,
            device_id=device_id,
            on_model_changed=self._model_changed,
            fetch=self._fetch,
            smoke_test=False,
        )
        self.slot = ModelSlot(self.ota.boot())
        self.boot_ref = self.slot.get().ref
        self.outbox = Outbox(self.root / "outbox.sqlite3", OutboxLimits(max_bytes=config.outbox_max_bytes))
        topics = fleet.topics
        self.session = SharedLoopSession(
            MqttSettings(
                host=config.broker_host,
                port=config.broker_port,
                client_id=device_id,
                username=device_id if secrets.password is not None else None,
                password=secrets.password.get_secret_value() if secrets.password is not None else None,
                tls_ca=config.tls_ca,
                keepalive_s=config.keepalive_s,
                max_inflight=20,
                topic_root=config.topic_root,
                reconnect_min_delay_s=0.5,
                reconnect_max_delay_s=30.0,
            ),
            fleet.network,
            will=self._status(DeviceState.OFFLINE),
            birth=lambda: self._status(DeviceState.ONLINE),
        )
        self.publisher = OutboxPublisher(
            self.outbox, self.session, window=20, poll_interval_s=PUBLISHER_POLL_S
        )
        self.session.subscribe(topics.model_desired(device_id), self._on_desired)
        self.session.subscribe(topics.cmd_filter(device_id), self._on_command)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.ota.start(self.slot)
        self.session.connect()
        self.publisher.start()

    def stop_updates(self) -> None:
        """Stop the OTA worker (a job under way is recorded as cleanly stopped, to resume next start)."""
        self._stopping = True
        self._download_turn.set()  # a download waiting for a slot gives up
        self.ota.stop(timeout=1.0)

    def say_offline(self) -> PublishHandle | None:
        """Publish the retained `offline` status (the will covers a crash; a clean stop says it itself)."""
        if not self.session.connected:
            return None
        message = self._status(DeviceState.OFFLINE)
        return self.session.publish(message.topic, message.payload, qos=1, retain=True)

    def stop_publishing(self) -> None:
        """Stop the outbox publisher (what is not acknowledged stays in the outbox) and leave the broker."""
        self.publisher.stop(timeout=2.0)
        self.session.disconnect()

    # ---- MQTT in ---------------------------------------------------------------------------------------

    def _on_desired(self, message: Message) -> None:
        try:
            desired = decode_model_desired(message.payload)
        except PayloadError as error:
            self.counters.malformed += 1
            log.warning("%s: ignored a malformed model/desired: %s", self.device_id, error)
            return
        self.ota.desired(desired)
        self._download_turn.set()  # a download waiting for a slot looks whether it was superseded

    def _on_command(self, message: Message) -> None:
        try:
            command = self.fleet.topics.parse(message.topic).command
        except TopicError:
            self.counters.malformed += 1
            return
        if command == "ota/retry":
            self.ota.retry()

    # ---- OTA hooks -------------------------------------------------------------------------------------

    def _report(self, report: ModelReported) -> None:
        topic = self.fleet.topics.model_reported(self.device_id)
        self.session.publish(topic, encode(report), qos=1, retain=True)

    def _model_changed(self) -> None:
        if self.slow is None and self.slot.get().ref != self.boot_ref:
            self.slow = self.fleet.slow_share.next()
        if self.session.connected:
            message = self._status(DeviceState.ONLINE)
            self.session.publish(message.topic, message.payload, qos=1, retain=True)

    def _fetch(
        self,
        request: DownloadRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> DownloadResult:
        if self.faulty is None:
            self.faulty = self.fleet.fail_share.next()
        slots = self.fleet.download_slots
        if not slots.acquire(self._download_turn, lambda: self._stopping or bool(cancel and cancel.is_set())):
            raise DownloadCancelled
        try:
            result = download(request, progress=progress, cancel=cancel)
        finally:
            slots.release()
        if self.faulty and result.received > 0:
            _corrupt_last_byte(request.target)  # a fault: the sha256 check must catch it
        return result

    # ---- what the device produces ----------------------------------------------------------------------

    def _status(self, state: DeviceState) -> OutgoingMessage:
        payload = StatusPayload(
            device_id=self.device_id,
            state=state,
            agent_version=__version__,
            active_model=self.slot.get().ref,
            providers=[SIMULATED],
            hardware={"simulated": True},
        )
        return OutgoingMessage(self.fleet.topics.status(self.device_id), encode(payload), qos=1, retain=True)

    @property
    def is_slow(self) -> bool:
        return bool(self.slow) and self.slot.get().ref != self.boot_ref

    def frame_latency_ms(self) -> float:
        p95 = self.fleet.config.slow_latency_ms if self.is_slow else self.fleet.config.latency_ms
        return p95 * self._rng.uniform(0.6, 1.0)

    def frame(self) -> None:
        """One frame went through the (simulated) model: probation judges its latency."""
        self.frame_seq += 1
        active = self.slot.get()
        self.ota.record_frame(active, self.frame_latency_ms(), None)

    def detect(self) -> None:
        """One synthetic detection event into the outbox; the publisher sends it."""
        active = self.slot.get()
        names = active.detector.names or ["object"]
        latency = self.frame_latency_ms()
        items = []
        for _ in range(self.fleet.config.objects):
            x1 = self._rng.uniform(0, FRAME_WIDTH - 100)
            y1 = self._rng.uniform(0, FRAME_HEIGHT - 100)
            class_id = self._rng.randrange(len(names))
            items.append(
                DetectionItem(
                    det_id=new_det_id(),
                    class_id=class_id,
                    label=names[class_id],
                    confidence=round(self._rng.uniform(0.3, 0.95), 3),
                    bbox=(x1, y1, x1 + self._rng.uniform(10, 100), y1 + self._rng.uniform(10, 100)),
                )
            )
        event = DetectionEvent(
            device_id=self.device_id,
            source="sim",
            frame_seq=self.frame_seq,
            model=active.ref,
            width=FRAME_WIDTH,
            height=FRAME_HEIGHT,
            timing_ms=StageTimingMs(pre=latency * 0.2, infer=latency * 0.7, post=latency * 0.1),
            detections=items,
        )
        message = OutboxMessage(
            msg_id=event.msg_id,
            topic=self.fleet.topics.detections(self.device_id),
            payload=encode(event),
            kind=MessageKind.DETECTION,
            properties=DETECTION_PROPERTIES,
        )
        try:
            self.outbox.enqueue([message])
        except OutboxFullError:
            self.counters.outbox_full += 1
            return
        self.counters.detections += 1
        self.publisher.notify()

    def telemetry(self) -> None:
        if not self.session.connected:
            return  # QoS 0, as the agent's telemetry: nothing queues while offline
        config = self.fleet.config
        p95 = config.slow_latency_ms if self.is_slow else config.latency_ms
        stats = self.outbox.stats()
        payload = TelemetryPayload(
            device_id=self.device_id,
            interval_s=config.telemetry_s,
            fps=config.fps,
            latency_ms={"total": StageLatency(p50=p95 * 0.8, p95=p95)},
            outbox=OutboxStats(depth=stats.depth, bytes=stats.bytes, dropped=dict(stats.dropped)),
            cpu_percent=round(self._rng.uniform(10, 60), 1),
            memory_mb=256.0,
        )
        self.session.publish(self.fleet.topics.telemetry(self.device_id), encode(payload), qos=0)
        self.counters.telemetry += 1

    def snapshot(self) -> dict[str, Any]:
        report = self.ota.last_report
        return {
            "model": _ref_text(self.slot.get().ref),
            "ota_state": report.state.value if report else None,
            "ota_model": _ref_text(report.model) if report and report.model else None,
            "rollout_id": report.rollout_id if report else None,
            "error": report.error if report else None,
            "connected": self.session.connected,
            "faulty": bool(self.faulty),
            "slow": bool(self.slow),
            "detections": self.counters.detections,
        }


class SimFleet:
    """N simulated devices sharing one scheduler thread; `start()`, `snapshot()`, `stop()`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self.models = SharedModels(config.model, config.model_ref)
        self.fail_share = EvenShare(config.fail_verify)
        self.slow_share = EvenShare(config.slow)
        self._ota_shared = self._make_ota_config(config.token)
        self.network = SharedNetwork()
        self.download_slots = DownloadSlots(config.max_downloads)
        self.devices: list[SimDevice] = []
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self.started_at: float | None = None

    def ota_config(self, token: SecretStr | None) -> OtaConfig:
        return self._ota_shared if token is None else self._make_ota_config(token)

    def _make_ota_config(self, token: SecretStr | None) -> OtaConfig:
        config = self.config
        return OtaConfig(
            models_dir=None,
            trust_store=config.trust_dir,
            allow_unsigned=config.allow_unsigned,
            token=token,
            tls_ca=config.tls_ca,
            retry_min_s=0.5,
            retry_max_s=10.0,
            give_up_after_s=600.0,
            latency_budget_ms=config.latency_budget_ms,
            probation_s=config.probation_s,
            probation_frames=config.probation_frames,
        )

    # ---- lifecycle -------------------------------------------------------------------------------------

    def build(self, workers: int = 32) -> None:
        """Open every device's outbox, OTA record and session (on a few threads: mostly disk work)."""
        if not self.config.model.is_file():
            raise ValueError(f"model file not found: {self.config.model}")
        self.models.configured()  # load it once, before the devices race for it
        with ThreadPoolExecutor(workers, thread_name_prefix="sim-build") as pool:
            self.devices = list(pool.map(lambda d: SimDevice(self, d), self.config.device_ids))

    def start(self) -> None:
        """Connect the devices at `connect_rate` per second, then run their frames and telemetry."""
        if not self.devices:
            self.build()
        self.started_at = time.monotonic()
        self.network.start()
        interval = 1.0 / self.config.connect_rate
        for index, device in enumerate(self.devices):
            if self._stop.is_set():
                break
            device.start()
            delay = self.started_at + (index + 1) * interval - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
        self._scheduler = threading.Thread(target=self._schedule, name="sim-scheduler", daemon=True)
        self._scheduler.start()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for device in self.devices:
            if not device.session.wait_connected(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stop(self) -> None:
        """Each device stops its updates, says `offline` (retained), leaves the broker, closes its outbox.

        Each step runs for every device at once: a thousand devices one after the other take minutes.
        """
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(5)
        with ThreadPoolExecutor(STOP_WORKERS, thread_name_prefix="sim-stop") as pool:
            list(pool.map(lambda d: _quietly(d, d.stop_updates), self.devices))
            handles = [h for h in (d.say_offline() for d in self.devices) if h is not None]
            deadline = time.monotonic() + OFFLINE_ACK_TIMEOUT_S
            for handle in handles:
                handle.wait(max(0.0, deadline - time.monotonic()))
            list(pool.map(lambda d: _quietly(d, d.stop_publishing), self.devices))
        deadline = time.monotonic() + DISCONNECT_TIMEOUT_S
        while self.network.sockets > 0 and time.monotonic() < deadline:  # DISCONNECTs still going out
            time.sleep(0.05)
        self.network.stop()
        for device in self.devices:
            _quietly(device, device.outbox.close)

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the scheduler: frames, detections, telemetry --------------------------------------------------

    def _schedule(self) -> None:
        config = self.config
        periods = {"frame": 1.0 / config.fps, "telemetry": config.telemetry_s}
        if config.rate_hz > 0:
            periods["detect"] = 1.0 / config.rate_hz
        now = time.monotonic()
        spread = random.Random(0)
        queue: list[tuple[float, int, str]] = []
        for index in range(len(self.devices)):
            for kind, period in periods.items():  # spread the devices over each period
                queue.append((now + spread.uniform(0, period), index, kind))
        heapq.heapify(queue)
        while not self._stop.is_set():
            due, index, kind = queue[0]
            wait = due - time.monotonic()
            if wait > SCHEDULE_SLACK_S:
                if self._stop.wait(min(wait, 0.5)):
                    return
                continue
            heapq.heapreplace(queue, (max(due + periods[kind], time.monotonic()), index, kind))
            device = self.devices[index]
            try:
                if kind == "frame":
                    device.frame()
                elif kind == "detect":
                    device.detect()
                else:
                    device.telemetry()
            except Exception:
                log.exception("sim: %s of %s failed", kind, device.device_id)

    # ---- reading ---------------------------------------------------------------------------------------

    def snapshot(self, *, per_device: bool = False) -> dict[str, Any]:
        devices = {d.device_id: d.snapshot() for d in self.devices}
        summary: dict[str, Any] = {
            "devices": len(devices),
            "connected": sum(1 for d in devices.values() if d["connected"]),
            "models": dict(Counter(d["model"] for d in devices.values())),
            "ota_states": dict(Counter(d["ota_state"] or "none" for d in devices.values())),
            "faulty": sum(1 for d in devices.values() if d["faulty"]),
            "slow": sum(1 for d in devices.values() if d["slow"]),
            "detections": sum(d["detections"] for d in devices.values()),
            "uptime_s": round(time.monotonic() - self.started_at, 1) if self.started_at else 0.0,
        }
        if per_device:
            summary["per_device"] = devices
        return summary

    def write_status(self, path: Path) -> None:
        """The snapshot with every device's state, as JSON, replaced atomically."""
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.snapshot(per_device=True), indent=1), encoding="utf-8")
        os.replace(temporary, path)


def _quietly(device: SimDevice, step: Callable[[], object]) -> None:
    try:
        step()
    except Exception:
        log.exception("sim: stopping %s failed", device.device_id)


def _buffered(sock: Any) -> int:
    pending = getattr(sock, "pending", None)
    return int(pending()) if callable(pending) else 0


def _corrupt_last_byte(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))


def _ref_text(ref: ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


# ---- the command ------------------------------------------------------------------------------------------

console = Console(stderr=True, soft_wrap=True)


def sim_command(
    devices: Annotated[int, typer.Option("--devices", "-n", help="How many devices.")] = 10,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="ONNX detector the devices start with (required).")
    ] = None,
    model_ref: Annotated[
        str | None,
        typer.Option(help="NAME@VERSION the devices report for it (default: <file stem>@local)."),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="A folder per device lives here.")] = Path(
        "edgefleet-data/sim"
    ),
    prefix: Annotated[str, typer.Option(help="Device id prefix.")] = "sim-",
    first: Annotated[int, typer.Option(help="Index of the first device.")] = 0,
    broker_host: Annotated[str, typer.Option(help="MQTT broker host.")] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option(help="MQTT broker port.")] = 1883,
    topic_root: Annotated[str, typer.Option(help="Root of the topic tree.")] = "edgefleet/v1",
    tls_ca: Annotated[Path | None, typer.Option(help="CA file (turns TLS on).")] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON {device_id: {password, token}} of provisioned devices."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="EDGEFLEET_SIM_TOKEN", help="Artifact token for devices without their own."),
    ] = None,
    trust_store: Annotated[
        Path | None, typer.Option(help="Folder of trusted public keys (default: <data-dir>/trust).")
    ] = None,
    allow_unsigned: Annotated[bool, typer.Option(help="Accept unsigned models (development only).")] = False,
    rate: Annotated[float, typer.Option(help="Detection events per second per device.")] = 0.2,
    objects: Annotated[int, typer.Option(help="Detections per event.")] = 2,
    fps: Annotated[float, typer.Option(help="Frames per second the OTA probation judges.")] = 2.0,
    telemetry_interval: Annotated[float, typer.Option(help="Seconds between telemetry reports.")] = 5.0,
    latency_ms: Annotated[float, typer.Option(help="p95 frame latency the devices report.")] = 40.0,
    slow_latency_ms: Annotated[float, typer.Option(help="p95 the slow devices report.")] = 400.0,
    fail_verify: Annotated[
        float, typer.Option(help="Share of devices that corrupt their downloads (sha256 check fails).")
    ] = 0.0,
    slow: Annotated[
        float, typer.Option(help="Share of devices that report --slow-latency-ms on a newly activated model.")
    ] = 0.0,
    probation_s: Annotated[float, typer.Option(help="The devices' own OTA probation, seconds.")] = 5.0,
    probation_frames: Annotated[int, typer.Option(help="Frames the devices' own probation needs.")] = 5,
    latency_budget_ms: Annotated[
        float, typer.Option(help="Device-side latency budget (probation).")
    ] = 1000.0,
    connect_rate: Annotated[float, typer.Option(help="Devices connecting per second.")] = 200.0,
    max_downloads: Annotated[
        int,
        typer.Option(help="Downloads at once in this process (the devices share its CPU; real ones do not)."),
    ] = 16,
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: on Ctrl-C).")] = 0.0,
    status_file: Annotated[
        Path | None, typer.Option(help="Write every device's state here (JSON) every report.")
    ] = None,
    report_every: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="Log level of the agent code (the sim logs at info).")] = (
        "warning"
    ),
) -> None:
    """Run N simulated devices in this process, for rollout tests at scale.

    Each device runs the agent's real MQTT session (will, birth, retained status), its SQLite outbox
    and publisher, and its OTA code: model/desired → download with resume → size, sha256 and Ed25519
    checks → persisted states → model/reported. SIMULATED: frames, detections and telemetry are
    synthetic, and the model is not loaded per device: all devices share one onnxruntime session per
    model version, and staging's smoke inference is skipped. Device ids are <prefix>0000, <prefix>0001,
    ...; each device has a folder under --data-dir.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        console.print(f"[red]error:[/red] unknown --log-level {log_level!r}", markup=True, highlight=False)
        raise typer.Exit(2)
    logging.getLogger().setLevel(level)
    log.setLevel(logging.INFO)
    try:
        if model is None:
            raise ValueError("--model is required: the ONNX detector the devices start with")
        config = SimConfig(
            devices=devices,
            prefix=prefix,
            first=first,
            data_dir=data_dir,
            model=model,
            model_ref=parse_model_ref(model_ref)
            if model_ref
            else ModelRef(name=_stem(model), version="local"),
            broker_host=broker_host,
            broker_port=broker_port,
            topic_root=topic_root,
            tls_ca=tls_ca,
            credentials=load_credentials(credentials) if credentials else {},
            token=SecretStr(token) if token else None,
            trust_store=trust_store,
            allow_unsigned=allow_unsigned,
            rate_hz=rate,
            objects=objects,
            fps=fps,
            telemetry_s=telemetry_interval,
            latency_ms=latency_ms,
            slow_latency_ms=slow_latency_ms,
            fail_verify=fail_verify,
            slow=slow,
            probation_s=probation_s,
            probation_frames=probation_frames,
            latency_budget_ms=latency_budget_ms,
            connect_rate=connect_rate,
            max_downloads=max_downloads,
        )
        if not config.model.is_file():
            raise ValueError(f"--model {config.model}: no such file")
        if not config.allow_unsigned and not config.trust_dir.is_dir():
            raise ValueError(
                f"trust store {config.trust_dir} does not exist: put the registry's public key there "
                "(--trust-store), or pass --allow-unsigned for unsigned models"
            )
    except (ValueError, ValidationError, TopicError) as error:
        console.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    # A thousand devices' threads share one interpreter lock: longer turns mean far fewer forced hand-overs
    # (each a futex storm among the waiting threads); the devices' own work is short and mostly I/O.
    sys.setswitchinterval(float(os.environ.get("EDGEFLEET_SIM_SWITCH_S", SWITCH_INTERVAL_S)))
    run_fleet(config, duration_s=duration, status_file=status_file, report_every_s=report_every)


def run_fleet(
    config: SimConfig,
    *,
    duration_s: float = 0.0,
    status_file: Path | None = None,
    report_every_s: float = 10.0,
) -> dict[str, Any]:
    """Run the simulator until `duration_s` passes (0: until SIGINT/SIGTERM); returns the last snapshot."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info(
        "sim: %d SIMULATED devices (%s … %s): real MQTT session, outbox and OTA code; synthetic frames, "
        "detections and telemetry; one shared model session per version, no smoke inference",
        config.devices,
        config.device_id(config.first),
        config.device_id(config.first + config.devices - 1),
    )
    fleet = SimFleet(config)
    started = time.monotonic()
    try:
        fleet.build()
        log.info("sim: %d devices built in %.1f s; connecting", config.devices, time.monotonic() - started)
        fleet.start()
        log.info("sim: all devices started in %.1f s", time.monotonic() - started)
        for summary in _reports(fleet, stop, duration_s, report_every_s, started):
            log.info("sim: %s", json.dumps(summary))
            if status_file is not None:
                fleet.write_status(status_file)
    finally:
        log.info("sim: stopping")
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    final = fleet.snapshot()
    if status_file is not None:
        fleet.write_status(status_file)
    log.info("sim: stopped: %s", json.dumps(final))
    return final


def _reports(
    fleet: SimFleet, stop: threading.Event, duration_s: float, every_s: float, started: float
) -> Iterator[dict[str, Any]]:
    deadline = started + duration_s if duration_s > 0 else math.inf
    while True:
        wait = min(every_s, deadline - time.monotonic())
        if wait <= 0 or stop.wait(wait):
            return
        yield fleet.snapshot()


def _stem(path: Path) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem).lstrip("._-")
    return cleaned or "model"

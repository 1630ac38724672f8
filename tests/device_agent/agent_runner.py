"""Run the real device agent (`edgefleet agent run`) as a process in tests, and record what reaches MQTT.

- `write_agent_config`: an agent YAML for a test (small fps, one model thread, produced log, local API port).
- `AgentProcess`: start / `kill -9` / SIGTERM the agent; its log goes to a file (a pipe nobody reads would
  block the agent once full); `produced()` reads its audit log of committed msg_ids; `status()` its API.
- `MsgIdRecorder`: a persistent-session (clean_start=False), QoS 1 subscriber that records every detection
  and crop msg_id it receives, duplicates included, with a digest of each payload.
- `ThrottledProxy`: a TCP relay in front of the broker whose device-to-broker direction is rate limited,
  a slow uplink on which the agent builds and drains a backlog.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from fleet_protocol.topics import Topics
from tests.broker import MosquittoBroker, free_port

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
TOPICS = Topics()
ULID_LENGTH = 26


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `predicate` until it holds; fail saying `what` did not happen within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write_agent_config(
    tmp_path: Path,
    *,
    device_id: str,
    broker_port: int,
    model: Path,
    sources: list[dict[str, Any]],
    **sections: Any,
) -> Path:
    """An agent YAML under `tmp_path`; `sections` override or add top-level keys (outbox, crops, ...)."""
    config: dict[str, Any] = {
        "device_id": device_id,
        "data_dir": str(tmp_path / "data"),
        "broker": {
            "host": "127.0.0.1",
            "port": broker_port,
            "keepalive_s": 5,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
        "model": {"path": str(model), "classes": ["person"], "threads": 1},
        "sources": sources,
        "publish": {"mode": "every_frame"},
        "crops": {"max_side": 96, "bytes_per_second": 20_000},
        "telemetry_interval_s": 1.0,
        "api": {"port": free_port()},
        "produced_log": str(tmp_path / "produced.txt"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class AgentProcess:
    """One `edgefleet agent run --config ...`; can be started again after a kill (same data dir)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: dict[str, Any] = yaml.safe_load(config_path.read_text())
        self.log_path = config_path.with_name("agent.log")
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def device_id(self) -> str:
        return str(self.config["device_id"])

    @property
    def outbox_path(self) -> Path:
        return Path(self.config["data_dir"]) / "outbox.sqlite3"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> AgentProcess:
        assert not self.alive, "the agent is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts} ----\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [EDGEFLEET, "agent", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
            )
        return self

    def kill9(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the agent publishes `stopping`, flushes what the broker takes, exits."""
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        return self._process.wait(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        port = self.config["api"]["port"]
        response = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def events(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Recent detection events (committed to the outbox), newest first, from GET /v1/events."""
        port = self.config["api"]["port"]
        response = httpx.get(f"http://127.0.0.1:{port}/v1/events", params={"limit": limit}, timeout=10)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def wait_status(self, timeout: float = 90.0) -> dict[str, Any]:
        """The first /v1/status answer once the local API is up; fails if the agent exits first."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive, f"the agent exited:\n{self.log_tail()}"
            try:
                return self.status()
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no /v1/status within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def produced(self) -> list[str]:
        """msg_ids the agent committed to its outbox, in order (its audit log; whole lines only)."""
        path = Path(self.config["produced_log"])
        if not path.exists():
            return []
        lines = path.read_text().split("\n")
        complete = lines[:-1]  # the last piece is "" after a newline, or a line still being written
        bad = [line for line in complete if len(line) != ULID_LENGTH]
        assert not bad, f"corrupt lines in the produced log: {bad[:3]}"
        return complete


class MsgIdRecorder:
    """Persistent QoS 1 subscriber to one device's detections, crops, status and telemetry."""

    def __init__(self, broker_port: int, device_id: str) -> None:
        self.device_id = device_id
        self.received: list[str] = []  # detection and crop msg_ids, in arrival order, duplicates included
        self.digests: dict[str, set[str]] = {}  # msg_id -> digests of the payloads that carried it
        self.kind_of: dict[str, str] = {}  # msg_id -> "detections" | "crops"
        self.statuses: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.session = MqttSession(
            MqttSettings(
                port=broker_port,
                client_id=f"recorder-{new_msg_id()[-10:].lower()}",
                clean_start=False,
                session_expiry_s=3600,
                reconnect_min_delay_s=0.2,
                reconnect_max_delay_s=1.0,
            )
        )
        self.session.subscribe(TOPICS.device_prefix(device_id) + "/#", self._on_message, qos=1)

    def start(self) -> MsgIdRecorder:
        self.session.connect()
        assert self.session.wait_connected(20), "the recorder could not connect to the broker"
        return self

    def stop(self) -> None:
        self.session.disconnect()

    def _on_message(self, message: Message) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        if kind == "detections":
            msg_id = json.loads(message.payload)["msg_id"]
        elif kind == "crops":
            msg_id = dict(message.properties.user_properties)["msg_id"]
        elif kind in ("status", "telemetry"):
            with self._lock:
                (self.statuses if kind == "status" else self.telemetry).append(json.loads(message.payload))
            return
        else:
            return
        digest = hashlib.sha256(message.payload).hexdigest()
        with self._lock:
            self.received.append(msg_id)
            self.digests.setdefault(msg_id, set()).add(digest)
            self.kind_of[msg_id] = kind

    def unique(self) -> set[str]:
        with self._lock:
            return set(self.received)

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for m in self.received if kind is None or self.kind_of[m] == kind)

    def onlines(self) -> int:
        with self._lock:
            return sum(1 for s in self.statuses if s.get("state") == "online")

    def duplicates(self) -> int:
        with self._lock:
            return len(self.received) - len(set(self.received))

    def changed_duplicates(self) -> list[str]:
        """msg_ids that arrived with different payloads (a duplicate must be the same message)."""
        with self._lock:
            return [m for m, digests in self.digests.items() if len(digests) > 1]

    def wait_for_all(self, msg_ids: list[str], timeout: float) -> set[str]:
        """Wait until every msg_id arrived; returns the ones still missing at the timeout."""
        wanted = set(msg_ids)
        deadline = time.monotonic() + timeout
        while (missing := wanted - self.unique()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return missing

    def wait_quiet(self, quiet_s: float = 1.5, timeout: float = 30.0) -> None:
        """Wait until nothing new has arrived for `quiet_s` (what was on its way has landed)."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_count = len(self.received)
            if now_count != last:
                last, since = now_count, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    def duplicate_histogram(self) -> Counter[int]:
        with self._lock:
            return Counter(Counter(self.received).values())


class ThrottledProxy:
    """TCP relay 127.0.0.1:`port` -> broker; device-to-broker bytes limited to `rate` B/s (None: no limit)."""

    CHUNK = 1024

    def __init__(self, broker: MosquittoBroker, rate: float | None) -> None:
        self.broker = broker
        self.rate = rate
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A small receive buffer, inherited by accepted sockets, keeps the backlog in the agent, not here.
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(8)
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                device, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.broker.host, self.broker.port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(device)
                continue
            with self._lock:
                self._sockets += [device, upstream]
            for src, dst, throttled in ((device, upstream, True), (upstream, device, False)):
                threading.Thread(target=self._pump, args=(src, dst, throttled), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while True:
                data = src.recv(self.CHUNK if throttled else 65536)
                if not data:
                    break
                dst.sendall(data)
                rate = self.rate
                if throttled and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

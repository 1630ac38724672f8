"""A real Mosquitto broker for tests: a private process on a free loopback port, persistence on.

`MosquittoBroker` writes its config, persistence file and log into its own directory, so tests can stop,
kill and restart it (on the same port) to inject outages. Fixtures: `mqtt_broker` (one for the whole test
session; a test that stops it must restart it before returning, in a try/finally) and `private_broker`
(one per test, for tests that need a broker of their own).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_protocol.mqtt import Message

STOP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 2000


def find_mosquitto() -> str:
    """Path of the `mosquitto` binary (PATH, then /usr/sbin), or fail saying how to install it."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(
            "the `mosquitto` broker binary is not installed (looked on PATH and in /usr/sbin): "
            "run `apt-get install mosquitto` (Debian/Ubuntu) or `brew install mosquitto` (macOS)"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MosquittoBroker:
    """One `mosquitto` process with a generated config under `workdir`; the port survives restarts."""

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        autosave_interval_s: int = 1,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 1000,
        message_size_limit: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.password_file = password_file
        self.acl_file = acl_file
        self.autosave_interval_s = autosave_interval_s
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.message_size_limit = message_size_limit
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> MosquittoBroker:
        if self.running:
            raise RuntimeError(f"mosquitto on port {self.port} is already running; stop() it first")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        self.config_path.write_text(self._config())
        self._process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until a TCP connect to the listener succeeds; fail with the broker's log if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited on start (port {self.port}): {self._diagnostics()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"mosquitto did not accept connections on {self.host}:{self.port} "
                        f"within {timeout} s: {self._diagnostics()}"
                    ) from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Clean stop (SIGTERM): Mosquitto writes its persistence file before it exits."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): whatever was not yet autosaved is lost, as after a crash."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same persistence."""
        if self.running:
            self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            "persistence true",
            f"persistence_location {self.workdir / 'data'}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self.autosave_interval_s}",
            f"max_queued_messages {self.max_queued_messages}",
            # Outgoing QoS>0 window per client, and the Receive Maximum announced to MQTT 5 clients.
            f"max_inflight_messages {self.max_inflight_messages}",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # Run as whoever runs the tests: as root, Mosquitto would otherwise switch to the `mosquitto`
            # user, which cannot write the persistence file into this directory.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.message_size_limit is not None:
            lines.append(f"message_size_limit {self.message_size_limit}")
        return "\n".join(lines) + "\n"

    def _diagnostics(self) -> str:
        stderr = b""
        if self._process is not None and self._process.poll() is not None and self._process.stderr:
            stderr = self._process.stderr.read()
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        stderr_tail = stderr.decode(errors="replace")[-LOG_TAIL_CHARS:]
        return f"stderr: {stderr_tail!r}; log: {log[-LOG_TAIL_CHARS:]!r}"


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by `mosquitto_passwd`) for `users` (name -> password)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("`mosquitto_passwd` is not installed: run `apt-get install mosquitto` (it ships with it)")
    path.write_text("")
    for user, password in users.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for the whole test session; a test that stops it must restart it (try/finally)."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker of this test's own, free to be stopped, killed and restarted."""
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.kill()


class Inbox:
    """Collects the messages a handler receives; `wait_for` blocks until a predicate holds."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.messages), timeout)

    def payloads(self) -> list[bytes]:
        with self._changed:
            return [m.payload for m in self.messages]

    def of(self, suffix: str) -> list[Message]:
        """The messages whose topic ends with `suffix` (e.g. '/detections')."""
        with self._changed:
            return [m for m in self.messages if m.topic.endswith(suffix)]

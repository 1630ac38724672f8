"""A private Mosquitto for benchmarks: a throwaway config on a free loopback port, started and stopped here.

The same broker settings as the tests' `tests/broker.py` (persistence on, TCP_NODELAY, a 1000-message
inflight window), without pytest: benchmarks run as plain scripts.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

READY_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateMosquitto:
    """`with PrivateMosquitto(workdir) as broker:` a running `mosquitto` at broker.host:broker.port."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateMosquitto:
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise SystemExit(
                "the `mosquitto` broker is not installed: `apt-get install mosquitto` (Debian/Ubuntu) or "
                "`brew install mosquitto` (macOS)"
            )
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {self.workdir / 'data'}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                    "max_inflight_messages 1000",
                    "set_tcp_nodelay true",
                    f"log_dest file {self.workdir / 'mosquitto.log'}",
                    # as root, Mosquitto would switch to the `mosquitto` user, who cannot write here
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                ]
            )
            + "\n"
        )
        self._process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited on start; see {self.workdir / 'mosquitto.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise TimeoutError(f"mosquitto did not listen on port {self.port} within 10 s") from None
                time.sleep(0.02)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

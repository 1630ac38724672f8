"""The local stack's child processes: each in its own process group with its log in a file, stopped in order.

Children get a session of their own, so a Ctrl-C in the terminal reaches only `edgefleet up`, which then
stops them in a chosen order (agents before the broker, so their `offline` status still gets through). On
Linux each child is also told to get SIGTERM when `edgefleet up` dies (prctl PR_SET_PDEATHSIG), so even a
`kill -9` of it leaves no orphans behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
LOG_TAIL_CHARS = 3000


def edgefleet_command() -> list[str]:
    """How to run this installation's `edgefleet` CLI: its console script, else `python -m`."""
    script = Path(sys.executable).with_name("edgefleet")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "fleet_protocol.cli"]


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function asking the kernel to SIGTERM the child when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_death_signal


@dataclass
class Child:
    """One child process: what runs, where its output goes, and how it ended."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    stopped_by_us: bool = False
    outcome: str = field(default="not started")

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only prctl runs between fork and exec, a call into an already loaded library.
                preexec_fn=_parent_death_signal(),
            )
        self.outcome = "running"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def crashed(self) -> bool:
        """It ended although nobody asked it to."""
        return self.process is not None and not self.stopped_by_us and self.process.poll() is not None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def signal_group(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class Supervisor:
    """Starts children and stops them tier by tier: SIGTERM, then SIGKILL after `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.children: list[Child] = []

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str], log_path: Path) -> Child:
        child = Child(name, list(args), log_path, env)
        self.children.append(child)
        child.start()
        return child

    def crashed(self) -> Child | None:
        return next((c for c in self.children if c.crashed), None)

    def stop_tier(self, tier: Sequence[Child], *, hurry: Callable[[], bool] = lambda: False) -> None:
        """Ask every child of the tier to stop at once; kill those still running after the timeout."""
        for child in tier:
            if child.process is None:
                continue
            child.stopped_by_us = True
            if child.running:
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.timeout_s
        while any(c.running for c in tier) and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
        for child in tier:
            if child.process is None:
                continue
            if child.running:
                child.signal_group(signal.SIGKILL)
                child.process.wait()
                child.outcome = f"killed after {self.timeout_s:g} s"
            else:
                code = child.process.wait()
                # uvicorn re-raises the SIGTERM it handled once it has shut down: that is a clean stop too.
                clean = code in (0, -signal.SIGTERM)
                child.outcome = "stopped" if clean else f"exited with code {code}"

"""`edgefleet up` end to end: the real CLI in a subprocess, checked through the fleet manager's REST API.

One run of the whole local stack (Mosquitto, fleet manager, refiner, three agents on the shared video and
images) for `DURATION_S` seconds: the devices come online, the canary rollout of the fp32 model completes
with every device on it, refined labels arrive, the printed `mosquitto_sub` credentials work, and the command
then exits 0 on its own, leaving none of its child processes behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import free_port
from tests.fleet_manager.conftest import wait_until

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
DURATION_S = 100.0  # start-up takes about a minute on two busy cores; the canary about 20 s more
DEVICES = ["cam-1", "cam-2", "cam-3"]
FP32_VERSION = "2"  # a fresh registry: int8 becomes version 1 (production), fp32 version 2


def _output(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _watch_credentials_work(command: str) -> bool:
    """Connect and subscribe as the printed `mosquitto_sub` line says; True once a message arrives."""
    args = shlex.split(command)
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("-")}
    received = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-watch", protocol=paho.MQTTv5)
    client.username_pw_set(option["-u"], option["-P"])
    client.on_connect = lambda c, *_: c.subscribe(option["-t"], qos=1)
    client.on_message = lambda *_: received.set()
    client.connect(option["-h"], int(option["-p"]))
    client.loop_start()
    try:
        return received.wait(15)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.slow
def test_edgefleet_up_runs_the_fleet_rolls_out_and_stops_cleanly(tmp_path: Path, shared: Path) -> None:
    workdir = tmp_path / "stack"
    log = tmp_path / "up.log"
    http_port, broker_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | {"COLUMNS": "250"}
    args = [EDGEFLEET, "up", "--shared", str(shared), "--workdir", str(workdir)]
    args += ["--broker-port", str(broker_port), "--http-port", str(http_port), "--duration", str(DURATION_S)]
    with log.open("wb") as out:
        up = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    children: dict[int, float] = {}  # pid -> create time, to tell a leftover from a reused pid

    def note_children() -> None:
        for child in psutil.Process(up.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                children.setdefault(child.pid, child.create_time())

    def running() -> bool:
        assert up.poll() is None, f"edgefleet up ended early ({up.returncode}):\n{_output(log)[-4000:]}"
        return True

    try:
        banner = wait_until(
            lambda: running() and "edgefleet local stack is up" in _output(log), 150, "the stack to start"
        )
        assert banner
        note_children()
        output = _output(log)
        token = (workdir / "operator.token").read_text().strip()
        assert f"http://127.0.0.1:{http_port}/" in output
        assert token in output
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        online = api.get("/api/v1/devices", params={"state": "online"}).json()
        assert sorted(d["id"] for d in online["items"]) == DEVICES

        watch = re.search(r"^\s*watch MQTT\s+(mosquitto_sub .*)$", output, re.MULTILINE)
        assert watch is not None, output
        assert f"-p {broker_port} " in watch.group(1)
        assert _watch_credentials_work(watch.group(1))

        def canary_completed() -> dict[str, Any] | None:
            running()
            note_children()
            rollouts = api.get("/api/v1/rollouts").json()
            canary = [r for r in rollouts if r["model"] == {"name": "yolov8n", "version": FP32_VERSION}]
            return canary[0] if canary and canary[0]["state"] == "completed" else None

        canary = wait_until(canary_completed, DURATION_S, "the canary rollout to complete", interval=1)
        assert canary["waves"][0] < 100  # a canary wave came first
        assert canary["device_count"] == 3
        devices = api.get("/api/v1/devices", params={"group": "local"}).json()["items"]
        assert {d["id"]: (d["state"], d["active_model"]) for d in devices} == {
            d: ("online", {"name": "yolov8n", "version": FP32_VERSION}) for d in DEVICES
        }

        def refined_labels() -> list[dict[str, Any]]:
            running()
            found = []
            for device in DEVICES:
                events = api.get(f"/api/v1/devices/{device}/detections", params={"limit": 200}).json()
                found += [o["refined"] for e in events for o in e["objects"] if o["refined"]]
            return found

        refined = wait_until(refined_labels, 30, "refined labels in the devices' detections", interval=1)
        assert all(r["label"] and r["refiner"].startswith("efficientnet-lite2@") for r in refined)

        code = up.wait(timeout=DURATION_S + 60)
        output = _output(log)
        assert code == 0, output[-4000:]
        assert f"--duration {DURATION_S:g} s reached" in output, output[-2000:]
        assert "stopped everything" in output, output[-2000:]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGKILL)
            up.wait()
    assert len(children) >= 6, children  # the broker, three agents, the fleet manager, the refiner
    left = []
    for pid, created in children.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.cmdline()))
                process.kill()
        except psutil.NoSuchProcess:
            continue
    assert not left, f"child processes left behind: {left}"

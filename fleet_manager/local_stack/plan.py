"""What `edgefleet up` will run, checked before anything starts, and the settings each part gets.

`resolve_plan` turns the command-line options into a `StackPlan` (absolute paths, ports) and fails with a
`StackError` saying what to install or where to get the models when something is missing. The `*_settings`
functions render each component's settings (what its `--config` file holds) from the plan.
"""

from __future__ import annotations

import math
import os
import pwd
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_protocol.topics import DEFAULT_ROOT

HOST = "127.0.0.1"
TOPIC_ROOT = DEFAULT_ROOT
MODEL_NAME = "yolov8n"
INT8_FILE = "yolov8n_int8.onnx"
FP32_FILE = "yolov8n.onnx"
CLASSIFIER_FILE = "efficientnet-lite2.onnx"
FLEET_ACCOUNT = "edgefleet-fleet"
REFINER_ACCOUNT = "edgefleet-refiner"
WATCH_ACCOUNT = "edgefleet-watch"  # for the printed mosquitto_sub line: reads the whole device tree
MAX_DEVICES = 20
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
# Device-side OTA on the demo: a short probation and a generous latency budget, as a busy laptop is slow.
AGENT_PROBATION_S = 5.0
AGENT_PROBATION_FRAMES = 5
AGENT_LATENCY_BUDGET_MS = 5000.0
TELEMETRY_INTERVAL_S = 2.0
MODELS_HINT = (
    "The models come with the project's shared folder (../shared/models, see ../shared/MANIFEST.md): "
    "pass --shared DIR (or set EDGEFLEET_SHARED), or --models DIR with your own files of these names "
    "(export a YOLOv8n with Ultralytics as models/README.md shows)."
)


class StackError(Exception):
    """Something the user has to fix; the message says what."""


@dataclass(frozen=True)
class StackPlan:
    """Everything resolved: files, ports, sizes; the workdir layout follows from `workdir`."""

    workdir: Path
    int8_model: Path
    fp32_model: Path
    classifier: Path
    video: Path
    images: Path
    mosquitto: str
    broker_port: int
    http_port: int
    refiner_port: int
    devices: int
    fps: float
    rollout: bool
    duration_s: float | None
    reset: bool

    @property
    def device_ids(self) -> list[str]:
        return [f"cam-{i}" for i in range(1, self.devices + 1)]

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def broker_dir(self) -> Path:
        return self.workdir / "broker"

    @property
    def broker_pid_file(self) -> Path:
        return self.broker_dir / "mosquitto.pid"

    @property
    def fleet_dir(self) -> Path:
        return self.workdir / "fleet"

    @property
    def password_file(self) -> Path:
        return self.fleet_dir / "mosquitto" / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.fleet_dir / "mosquitto" / "acl"

    @property
    def refiner_dir(self) -> Path:
        return self.workdir / "refiner"

    @property
    def registry_dir(self) -> Path:
        return self.workdir / "registry"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.registry_dir / 'mlflow.db'}"

    @property
    def signing_key(self) -> Path:
        return self.workdir / "keys" / "signing.pem"

    @property
    def public_key(self) -> Path:
        return self.signing_key.with_suffix(".pub")

    @property
    def token_file(self) -> Path:
        return self.workdir / "operator.token"

    @property
    def state_file(self) -> Path:
        return self.workdir / "stack.json"

    def agent_dir(self, device_id: str) -> Path:
        return self.workdir / "agents" / device_id

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def refiner_url(self) -> str:
        return f"http://{HOST}:{self.refiner_port}"


def find_mosquitto() -> str:
    """The `mosquitto` binary (PATH, then the sbin folders), or a StackError saying how to install it."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise StackError(
            "the Mosquitto MQTT broker is not installed (looked for `mosquitto` on PATH and in /usr/sbin): "
            "install it with `sudo apt-get install mosquitto mosquitto-clients` (Debian/Ubuntu) or "
            "`brew install mosquitto` (macOS); `edgefleet up` starts its own broker, the system service "
            "may stay off"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _port(requested: int, what: str, option: str) -> int:
    """`requested`, checked to be free; 0 picks a free one."""
    if requested == 0:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, requested))
        except OSError as error:
            raise StackError(
                f"the {what} port {HOST}:{requested} is taken ({error.strerror}): is another `edgefleet up` "
                f"running? Pass {option} PORT, or {option} 0 for any free port"
            ) from None
    return requested


def _file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise StackError(f"{what} not found: {path}. {hint}")
    return path.resolve()


def resolve_plan(
    *,
    shared: Path,
    models: Path | None,
    video: Path | None,
    images: Path | None,
    workdir: Path,
    reset: bool,
    broker_port: int,
    http_port: int,
    devices: int,
    fps: float,
    rollout: bool,
    duration_s: float | None,
) -> StackPlan:
    """Check the inputs (models, data, broker, ports) and fix every path; StackError says what is wrong."""
    models_dir = models or shared / "models"
    data_hint = (
        "The sample data comes with the project's shared folder (../shared/data): pass --shared DIR, or "
        "--video FILE / --images DIR with your own."
    )
    if not 1 <= devices <= MAX_DEVICES:
        raise StackError(f"--devices must be between 1 and {MAX_DEVICES}, not {devices}")
    int8_model = _file(models_dir / INT8_FILE, "the int8 detector", MODELS_HINT)
    fp32_model = _file(models_dir / FP32_FILE, "the fp32 detector", MODELS_HINT)
    classifier = _file(models_dir / CLASSIFIER_FILE, "the refiner's classifier", MODELS_HINT)
    plan_video = _file(video or shared / "data" / "video" / "vtest.avi", "the sample video", data_hint)
    plan_images = (images or shared / "data" / "images").resolve()
    if not plan_images.is_dir() or not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in plan_images.iterdir() if p.is_file()
    ):
        raise StackError(f"no image folder with images at {plan_images}. {data_hint}")
    return StackPlan(
        workdir=workdir.resolve(),
        int8_model=int8_model,
        fp32_model=fp32_model,
        classifier=classifier,
        video=plan_video,
        images=plan_images,
        mosquitto=find_mosquitto(),
        broker_port=_port(broker_port, "broker", "--broker-port"),
        http_port=_port(http_port, "fleet manager", "--http-port"),
        refiner_port=free_port(),
        devices=devices,
        fps=fps,
        rollout=rollout,
        duration_s=duration_s,
        reset=reset,
    )


# ---- the settings of each part ----------------------------------------------------------------------------


def mosquitto_conf(plan: StackPlan) -> str:
    """Loopback-only Mosquitto with persistence and the fleet manager's generated accounts and ACL."""
    data = plan.broker_dir / "data"
    lines = [
        "# Generated by `edgefleet up`; rewritten on every start.",
        f"pid_file {plan.broker_pid_file}",
        "persistence true",
        f"persistence_location {data}/",
        "persistence_file mosquitto.db",
        "autosave_interval 30",
        "max_inflight_messages 1000",
        "max_queued_messages 100000",
        "message_size_limit 2097152",
        "set_tcp_nodelay true",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"listener {plan.broker_port} {HOST}",
        "protocol mqtt",
        "allow_anonymous false",
        f"password_file {plan.password_file}",
        f"acl_file {plan.acl_file}",
    ]
    if os.geteuid() == 0:
        # As root Mosquitto would switch to the `mosquitto` user, who cannot write into the workdir.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n"


def fleet_settings(plan: StackPlan) -> dict[str, Any]:
    """The fleet manager's settings (FleetSettings fields); its broker password comes from the environment."""
    return {
        "data_dir": str(plan.fleet_dir),
        "database_url": f"sqlite:///{plan.fleet_dir / 'fleet.sqlite3'}",
        "broker": {
            "host": HOST,
            "port": plan.broker_port,
            "username": FLEET_ACCOUNT,
            "client_id": "edgefleet-fleet",
            "topic_root": TOPIC_ROOT,
        },
        "mosquitto": {
            "password_file": str(plan.password_file),
            "acl_file": str(plan.acl_file),
            "pid_file": str(plan.broker_pid_file),
        },
        "provisioning": {"broker_host": HOST, "broker_port": plan.broker_port},
        "ingest": {"telemetry_history_interval_s": 10.0},
        "rollouts": {"tick_s": 0.5},
        "api": {"host": HOST, "port": plan.http_port, "public_url": plan.api_url},
        "registry": {
            "data_dir": str(plan.registry_dir),
            "mlflow_uri": plan.mlflow_uri,
        },
    }


def agent_settings(plan: StackPlan, provisioned: dict[str, Any]) -> dict[str, Any]:
    """A device agent's settings: what provisioning generated, with this machine's model, data and sources."""
    device_id = str(provisioned["device_id"])
    data_dir = plan.agent_dir(device_id)
    image_fps = max(0.1, plan.fps / 4)
    return {
        **provisioned,
        "data_dir": str(data_dir),
        # One inference thread per agent: several agents share a laptop's cores.
        "model": {"path": str(plan.int8_model), "threads": 1},
        "sources": [
            {"id": "video", "kind": "video", "uri": str(plan.video), "fps": plan.fps, "loop": True},
            {"id": "images", "kind": "images", "uri": str(plan.images), "fps": image_fps, "loop": True},
        ],
        "api": {"enabled": False},  # N agents on one machine would need N ports; the fleet API shows all
        "ota": {
            **provisioned.get("ota", {}),
            "trust_store": str(data_dir / "trust"),
            "retry_max_s": 5.0,
            "probation_s": AGENT_PROBATION_S,
            "probation_frames": AGENT_PROBATION_FRAMES,
            "latency_budget_ms": AGENT_LATENCY_BUDGET_MS,
        },
        "telemetry_interval_s": TELEMETRY_INTERVAL_S,
    }


def refiner_settings(plan: StackPlan) -> dict[str, Any]:
    """One cloud refiner; it logs to an MLflow store of its own (the registry's is being made meanwhile)."""
    return {
        "instance_id": "refiner-1",
        "broker": {
            "host": HOST,
            "port": plan.broker_port,
            "username": REFINER_ACCOUNT,
            "topic_root": TOPIC_ROOT,
        },
        "classifier": {"path": str(plan.classifier), "threads": 1},
        "api": {"host": HOST, "port": plan.refiner_port},
        "tracking": {
            "tracking_uri": f"sqlite:///{plan.refiner_dir / 'mlflow.db'}",
            "artifact_location": (plan.refiner_dir / "artifacts").as_uri(),
        },
        "drain_timeout_s": 2.0,
    }


def canary_waves(devices: int) -> list[float]:
    """One device first, then all: the first wave's share is 100/N rounded down (a single device)."""
    if devices == 1:
        return [100.0]
    return [float(max(1, math.floor(100 / devices))), 100.0]


def mosquitto_sub_command(plan: StackPlan, password: str) -> str:
    """A command line that prints every message of the fleet but the binary crops."""
    devices = f"{TOPIC_ROOT}/devices"
    return (
        f"mosquitto_sub -h {HOST} -p {plan.broker_port} -V mqttv5 -u {WATCH_ACCOUNT} -P '{password}' "
        f"-t '{devices}/+/#' -T '{devices}/+/crops' -v"
    )

"""The fleet manager at scale: ingest rate, API latency under load, rollout convergence for 1,000 devices.

    .venv/bin/python -m benchmarks.fleet [--only ingest,api,rollout] [--messages 50000] [--publishers 100]
        [--clients 100] [--client-rate 1] [--api-seconds 15] [--devices 1000] [--sim-processes 0]

Everything real: a private `mosquitto`, `edgefleet fleet serve` as a process on a fresh SQLite database,
`edgefleet sim` for the devices. Each figure is printed beside a bare baseline:

- ingest: `--messages` device messages (80% detections with 2 objects each, 20% telemetry) from
  `--publishers` MQTT clients. Main figure: the fleet manager drains a backlog (published while it was
  stopped, all QoS 1; it starts while the broker is down, so its start-up work is done before the broker
  comes back): messages persisted per second, from its first committed batch to its last (its ingest
  counters). Also live (published while it runs, telemetry QoS 0; the publishers share the CPU).
  Baselines: the same rows with plain `sqlite3` executemany into the same schema (no MQTT, no decoding);
  `Ingestor.process` in this process (decoding and writing, no MQTT); a bare `MqttSession` subscribed and
  acking as the fleet manager does (MQTT, no database). Target: >= 5,000 msgs/s persisted.
- api: a mix of viewer endpoints (device list, device detail, recent detections, stats, rollouts) on the
  database ingest filled, from client threads with keep-alive connections: `--clients` clients each
  sending `--client-rate` requests per second (a dashboard polling; open loop: a late answer sends the next
  request at once); beside one client alone, `/healthz` (no token, no database) under the same load, and
  the same clients back to back (saturation: the capacity). Target: p95 < 100 ms with 100 clients.
- rollout: `--devices` simulated devices (the agent's real MQTT session, outbox and OTA code, one shared
  model session: see docs/sim.md) on v1 of a registered model; a rollout of v2 (3.5 MB) to all of them in
  one wave, timed from the API call until every device reported `active` on v2 (seen on MQTT), and until
  the rollout is `completed`. Baseline: the same rollout to one device. Target: <= 60 s for 1,000 devices.
  The devices run in one simulator process per core (`--sim-processes`; at least 250 devices each), side by
  side with `--first`: one interpreter cannot use two cores. Also printed: each OTA step's median/p95.

Everything shares this machine's cores: the broker, the fleet manager, the load generator, and (for the
rollout) a thousand simulated devices in one process.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from fleet_manager.config import IngestSettings
from fleet_manager.db import Database
from fleet_manager.ingest import Incoming, Ingestor
from fleet_manager.models import Role
from fleet_manager.tokens import create_token
from fleet_protocol.ids import new_det_id
from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from fleet_protocol.payloads import (
    DetectionEvent,
    DetectionItem,
    ModelRef,
    ModelReported,
    OtaState,
    OutboxStats,
    StageLatency,
    StageTimingMs,
    TelemetryPayload,
    decode,
    encode,
)
from fleet_protocol.signing import generate_keypair
from fleet_protocol.topics import Topics
from tests.broker import MosquittoBroker, free_port

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
ROOT = "bench/v1"
INGEST_TARGET = 5_000.0
API_TARGET_MS = 100.0
ROLLOUT_TARGET_S = 60.0
DEVICES_PER_SIMULATOR = 250  # at least this many devices per simulator process (see simulator_processes)


# ---- processes ------------------------------------------------------------------------------------------


class FleetServer:
    """`edgefleet fleet serve` on its own SQLite database, as a process."""

    def __init__(
        self, workdir: Path, broker: MosquittoBroker, extra_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{workdir / 'fleet.sqlite3'}"
        self.log = workdir / "serve.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
            "EDGEFLEET_FLEET_DATA_DIR": str(workdir / "fleet"),
            "EDGEFLEET_FLEET_DATABASE_URL": self.database_url,
            "EDGEFLEET_FLEET_BROKER__PORT": str(broker.port),
            "EDGEFLEET_FLEET_BROKER__CLIENT_ID": f"fleet-{uuid.uuid4().hex[:8]}",
            "EDGEFLEET_FLEET_BROKER__TOPIC_ROOT": ROOT,
            "EDGEFLEET_FLEET_API__PORT": str(self.port),
            "EDGEFLEET_FLEET_API__PUBLIC_URL": self.url,
            "EDGEFLEET_REGISTRY_DATA_DIR": str(workdir / "registry"),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def token(self, role: Role) -> str:
        """An API token, made directly in the database (migrated first)."""
        db = Database(self.database_url)
        try:
            db.migrate()
            with db.write() as session:
                _, plain = create_token(session, name=f"bench-{role.value}", role=role, created_by="bench")
            return plain
        finally:
            db.dispose()

    def start(self, settle_s: float = 30.0, *, wait_mqtt: bool = True) -> FleetServer:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [EDGEFLEET, "fleet", "serve", "--log-level", "warning"], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"edgefleet fleet serve exited; see {self.log}")
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=1).json()
                if health.get("mqtt_connected") or not wait_mqtt:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"edgefleet fleet serve did not come up in 60 s; see {self.log}")
            time.sleep(0.2)
        if settle_s > 0:
            settle(self.process.pid, timeout=settle_s)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until the process uses under `quiet` of a core (start-up work such as the registry preload)."""
    if not Path(f"/proc/{pid}/stat").exists():
        time.sleep(2)
        return
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - before < quiet:
            return
        before = now


def proc_stats(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "?"
    fields = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in status}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return f"RSS {int(fields['VmRSS'].split()[0]) // 1024} MiB, {fields['Threads']} threads, {fds} fds"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


# ---- ingest ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Burst:
    """Pre-encoded device messages: (topic, payload, kind)."""

    messages: list[tuple[str, bytes, str]]
    devices: list[str]

    @property
    def detections(self) -> int:
        return sum(1 for m in self.messages if m[2] == "detections")


def make_burst(count: int, devices: int) -> Burst:
    topics = Topics(ROOT)
    ids = [f"bench-{i:04d}" for i in range(devices)]
    rng = random.Random(7)
    model = ModelRef(name="bench-yolo", version="1")
    messages: list[tuple[str, bytes, str]] = []
    for n in range(count):
        device_id = ids[n % devices]
        if n % 5 == 4:
            payload = TelemetryPayload(
                device_id=device_id,
                interval_s=5.0,
                fps=10.0,
                latency_ms={"total": StageLatency(p50=30.0, p95=45.0)},
                outbox=OutboxStats(depth=0, bytes=0),
                cpu_percent=40.0,
                memory_mb=300.0,
            )
            messages.append((topics.telemetry(device_id), encode(payload), "telemetry"))
            continue
        items = []
        for _ in range(2):
            x, y = rng.uniform(0, 1000), rng.uniform(0, 600)
            items.append(
                DetectionItem(
                    det_id=new_det_id(),
                    class_id=0,
                    label="person",
                    confidence=0.8,
                    bbox=(x, y, x + 50, y + 80),
                )
            )
        event = DetectionEvent(
            device_id=device_id,
            source="cam0",
            frame_seq=n,
            model=model,
            width=1280,
            height=720,
            timing_ms=StageTimingMs(pre=3.0, infer=25.0, post=2.0),
            detections=items,
        )
        messages.append((topics.detections(device_id), encode(event), "detections"))
    return Burst(messages, ids)


def bare_sqlite_rate(workdir: Path, burst: Burst, batch: int) -> float:
    """Plain sqlite3 executemany of the detection and object rows (telemetry: a device row update)."""
    url = f"sqlite:///{workdir / 'bare.sqlite3'}"
    db = Database(url)
    db.migrate()
    db.dispose()
    rows = [
        (decode(DetectionEvent, p) if k == "detections" else decode(TelemetryPayload, p), k)
        for _, p, k in burst.messages
    ]
    conn = sqlite3.connect(workdir / "bare.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    now = datetime.now(timezone.utc).isoformat()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO devices (id, created_at, state, providers, hardware, provisioned) "
        "VALUES (?, ?, 'online', '[]', '{}', 0)",
        [(d, now) for d in burst.devices],
    )
    conn.execute("COMMIT")
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        detections: list[tuple[Any, ...]] = []
        objects: list[tuple[Any, ...]] = []
        telemetry: list[tuple[Any, ...]] = []
        for payload, _kind in chunk:
            if not isinstance(payload, DetectionEvent):
                telemetry.append((now, 45.0, payload.device_id))
                continue
            detections.append(
                (
                    payload.msg_id,
                    payload.device_id,
                    now,
                    now,
                    payload.source,
                    payload.frame_seq,
                    "bench-yolo",
                    "1",
                    payload.width,
                    payload.height,
                    3.0,
                    25.0,
                    2.0,
                    len(payload.detections),
                )
            )
            objects.extend(
                (d.det_id, payload.msg_id, payload.device_id, now, d.class_id, d.label, d.confidence, *d.bbox)
                for d in payload.detections
            )
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO detections (msg_id, device_id, ts, received_at, source, frame_seq, model_name, "
            "model_version, width, height, pre_ms, infer_ms, post_ms, object_count) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (msg_id) DO NOTHING",
            detections,
        )
        conn.executemany(
            "INSERT INTO detection_objects (det_id, msg_id, device_id, received_at, class_id, label, "
            "confidence, x1, y1, x2, y2) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (det_id) DO NOTHING",
            objects,
        )
        conn.executemany("UPDATE devices SET telemetry_at = ?, latency_p95_ms = ? WHERE id = ?", telemetry)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def in_process_ingest_rate(workdir: Path, burst: Burst, batch: int) -> float:
    """`Ingestor.process` (decode + write, as the writer thread does) without MQTT, batches of `batch`."""
    db = Database(f"sqlite:///{workdir / 'inproc.sqlite3'}")
    db.migrate()
    ingestor = Ingestor(db, Topics(ROOT), IngestSettings(telemetry_history_interval_s=60))
    now = datetime.now(timezone.utc)
    incoming = [Incoming(topic=t, payload=p, received_at=now) for t, p, _ in burst.messages]
    started = time.perf_counter()
    for start in range(0, len(incoming), batch):
        ingestor.process(incoming[start : start + batch])
    elapsed = time.perf_counter() - started
    stored = ingestor.stats.snapshot()["stored"]
    db.dispose()
    assert stored.get("detections", 0) == burst.detections, stored
    return len(incoming) / elapsed


def publish_burst(
    broker: MosquittoBroker, burst: Burst, publishers: int, *, all_qos1: bool = False
) -> tuple[float, float]:
    """Publish the burst from `publishers` clients (QoS 1); returns (first publish, last PUBACK) times."""
    sessions = []
    for i in range(publishers):
        session = MqttSession(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=f"bench-pub-{i}",
                clean_start=True,
                session_expiry_s=0,
                max_inflight=200,
            )
        )
        session.connect()
        sessions.append(session)
    for session in sessions:
        assert session.wait_connected(10)
    shares = [burst.messages[i::publishers] for i in range(publishers)]
    handles: list[list[Any]] = [[] for _ in range(publishers)]
    barrier = threading.Barrier(publishers + 1)

    def run(index: int) -> None:
        session = sessions[index]
        barrier.wait()
        for topic, payload, kind in shares[index]:
            qos = 1 if all_qos1 or kind == "detections" else 0
            handles[index].append(session.publish(topic, payload, qos=qos))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(publishers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    first = time.perf_counter()
    for thread in threads:
        thread.join()
    for group in handles:
        for handle in group:
            handle.wait(120)
    acked = time.perf_counter()
    for session in sessions:
        session.disconnect()
    return first, acked


def ingest_counts(api: httpx.Client) -> tuple[int, int]:
    """Detections and telemetry messages persisted (`received` counts a message once its batch committed)."""
    ingest = api.get("/api/v1/stats").json()["ingest"]
    return ingest["stored"].get("detections", 0), ingest["received"].get("telemetry", 0)


def wait_persisted(api: httpx.Client, detections: int, telemetry: int, at_least_telemetry: int) -> float:
    """Poll until the counts are reached (telemetry sent QoS 0 may lose a few); returns the time."""
    deadline = time.monotonic() + 600
    while True:
        got_detections, got_telemetry = ingest_counts(api)
        if got_detections >= detections and got_telemetry >= min(telemetry, at_least_telemetry):
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise SystemExit(f"ingest stalled at {got_detections} detections, {got_telemetry} telemetry")
        time.sleep(0.2)


def drain_rate(api: httpx.Client, detections: int, telemetry: int, at_least_telemetry: int) -> float:
    """Messages per second from the first persisted batch to the last."""
    while sum(ingest_counts(api)) == 0:
        time.sleep(0.05)
    first_at, first = time.perf_counter(), sum(ingest_counts(api))
    done = wait_persisted(api, detections, telemetry, at_least_telemetry)
    return (detections + telemetry - first) / (done - first_at)


def receive_rate(broker: MosquittoBroker, burst: Burst, publishers: int) -> float:
    """A bare `MqttSession` subscribed as the fleet manager is (manual acks), acking each message on
    arrival, draining the same backlog: what MQTT alone costs the fleet manager's process."""
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=f"bench-receive-{uuid.uuid4().hex[:6]}",
        session_expiry_s=600,
        manual_ack=True,
        receive_maximum=50_000,
    )
    done = threading.Event()
    seen = [0, 0.0]
    current: list[MqttSession] = []

    def on_message(message: Message) -> None:
        if seen[0] == 0:
            seen[1] = time.perf_counter()
        seen[0] += 1
        current[0].ack(message)
        if seen[0] == len(burst.messages):
            done.set()

    for attempt in range(2):  # first only to leave a subscribed persistent session behind
        session = MqttSession(settings)
        current[:] = [session]
        session.subscribe(f"{ROOT}/devices/+/#", on_message)
        session.connect()
        assert session.wait_connected(10)
        if attempt == 0:
            session.disconnect()
            publish_burst(broker, burst, publishers, all_qos1=True)
    if not done.wait(600):
        raise SystemExit(f"the bare receiver got {seen[0]} of {len(burst.messages)} messages")
    rate = len(burst.messages) / (time.perf_counter() - seen[1])
    session.disconnect()
    return rate


def bench_ingest(args: argparse.Namespace, workdir: Path, broker: MosquittoBroker) -> FleetServer:
    print(f"\n== ingest: {args.messages} messages (80% detections x 2 objects, 20% telemetry), SQLite")
    burst = make_burst(args.messages, args.publishers)
    batch = IngestSettings().batch_max
    bare = bare_sqlite_rate(workdir, burst, batch)
    inproc = in_process_ingest_rate(workdir, burst, batch)
    receive = receive_rate(broker, burst, args.publishers)
    server = FleetServer(workdir / "ingest", broker)
    (workdir / "ingest").mkdir()
    viewer = server.token(Role.VIEWER)
    telemetry = len(burst.messages) - burst.detections

    try:
        # 1. A backlog: the fleet manager's persistent session is subscribed, but the process is stopped
        # while the burst is published (all QoS 1, so the broker keeps telemetry too). It starts while the
        # broker is down (its start-up work, e.g. the registry preload, is over before the clock starts),
        # then the broker comes back with the backlog and the fleet manager drains it.
        server.start()
        server.stop()
        publish_burst(broker, burst, args.publishers, all_qos1=True)
        broker.stop()
        server.start(wait_mqtt=False)
        broker.start()
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {viewer}"}, timeout=30)
        drained = drain_rate(api, burst.detections, telemetry, telemetry)
        # 2. Live: published while it runs (telemetry QoS 0, as devices send it); the publishers share
        # the CPU.
        burst2 = make_burst(args.messages, args.publishers)
        first, acked = publish_burst(broker, burst2, args.publishers)
        done = wait_persisted(api, 2 * burst.detections, 2 * telemetry, telemetry + int(0.99 * telemetry))
        live = len(burst2.messages) / (done - first)
        print(f"  {'bare sqlite3 executemany (same rows)':<48} {bare:>10,.0f} msgs/s")
        print(
            f"  {'Ingestor.process in-process (no MQTT)':<48} {inproc:>10,.0f} msgs/s"
            f"   {inproc / bare:5.2f}x bare"
        )
        print(f"  {'MQTT receive + manual ack only (no DB)':<48} {receive:>10,.0f} msgs/s")
        print(
            f"  {'fleet serve draining a backlog: persisted':<48} {drained:>10,.0f} msgs/s"
            f"   {drained / bare:5.2f}x bare"
            f"   target >= {INGEST_TARGET:,.0f}: {'met' if drained >= INGEST_TARGET else 'NOT met'}"
        )
        intake = len(burst2.messages) / (acked - first)
        print(
            f"  {f'fleet serve, live from {args.publishers} publishers: persisted':<48} {live:>10,.0f} msgs/s"
            f"   {live / bare:5.2f}x bare   (the publishers' own rate: {intake:,.0f} msgs/s)"
        )
        api.close()
    except BaseException:
        server.stop()
        raise
    return server


# ---- API ---------------------------------------------------------------------------------------------


def load(
    port: int,
    token: str | None,
    paths: Callable[[random.Random], str],
    clients: int,
    seconds: float,
    rate: float,
) -> tuple[list[float], int, float]:
    """`clients` threads, each on its own keep-alive connection, sending GETs for `seconds`: `rate` requests
    per second each (open loop: a late response makes the next request go at once), or back to back when
    `rate` is 0. Returns the latencies (ms), the errors and the elapsed time."""
    latencies: list[float] = []
    errors = [0]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    barrier = threading.Barrier(clients + 1)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        barrier.wait()
        start = time.perf_counter()
        end = start + seconds
        due = start + (rng.uniform(0, 1 / rate) if rate else 0.0)
        mine: list[float] = []
        while True:
            if rate:
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                due += 1 / rate
            sent = time.perf_counter()
            if sent >= end:
                break
            try:
                connection.request("GET", paths(rng), headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    errors[0] += 1
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append((time.perf_counter() - sent) * 1e3)
        connection.close()
        latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(seconds + 120)
    return latencies, errors[0], time.perf_counter() - started


def always(path: str) -> Callable[[random.Random], str]:
    return lambda rng: path


def bench_api(args: argparse.Namespace, server: FleetServer, devices: list[str]) -> None:
    print(
        f"\n== api: viewer endpoints (device list, device detail, detections, stats, rollouts), "
        f"{args.api_seconds:g} s per line"
    )
    viewer = server.token(Role.VIEWER)

    def mix(rng: random.Random) -> str:
        device = rng.choice(devices)
        return rng.choice(
            [
                "/api/v1/devices?limit=50",
                f"/api/v1/devices/{device}",
                f"/api/v1/devices/{device}/detections?limit=20",
                "/api/v1/stats",
                "/api/v1/rollouts",
            ]
        )

    def healthz(rng: random.Random) -> str:
        return "/healthz"

    n = args.clients
    runs: list[tuple[str, str | None, Callable[[random.Random], str], int, float, bool]] = [
        ("1 client, back to back", viewer, mix, 1, 0.0, False),
        (f"{n} clients x 1 req/s, /healthz (no token/db)", None, healthz, n, args.client_rate, False),
        (
            f"{n} clients x {args.client_rate:g} req/s (dashboard polling)",
            viewer,
            mix,
            n,
            args.client_rate,
            True,
        ),
        (f"{n} clients, back to back (saturation)", viewer, mix, n, 0.0, False),
    ]
    by_endpoint = []
    for name, path in (
        ("device list", "/api/v1/devices?limit=50"),
        ("device detail", f"/api/v1/devices/{devices[0]}"),
        ("detections", f"/api/v1/devices/{devices[0]}/detections?limit=20"),
        ("stats", "/api/v1/stats"),
        ("rollouts", "/api/v1/rollouts"),
    ):
        latencies, _, _ = load(server.port, viewer, always(path), 1, 1.0, 0.0)
        by_endpoint.append(f"{name} {percentile(latencies, 0.5):.1f}")
    print(f"  one client alone, p50 ms by endpoint: {', '.join(by_endpoint)}")
    for label, token, paths, clients, rate, judged in runs:
        latencies, errors, elapsed = load(server.port, token, paths, clients, args.api_seconds, rate)
        p95 = percentile(latencies, 0.95)
        verdict = ""
        if judged:
            verdict = f"   target p95 < {API_TARGET_MS:.0f} ms: {'met' if p95 < API_TARGET_MS else 'NOT met'}"
        print(
            f"  {label:<48} p50 {percentile(latencies, 0.5):7.1f} ms  p95 {p95:7.1f} ms  "
            f"p99 {percentile(latencies, 0.99):7.1f} ms  {len(latencies) / elapsed:6.0f} req/s  "
            f"errors {errors}{verdict}"
        )


# ---- rollout -----------------------------------------------------------------------------------------


# The OTA steps a device reports on its way to the new model, in order (for the per-step breakdown).
STEPS = (
    OtaState.DOWNLOADING,
    OtaState.VERIFYING,
    OtaState.STAGING,
    OtaState.ACTIVATING,
    OtaState.ACTIVE,
)


class Reports:
    """When each device was sent its desired model, and first reported each OTA step on the target version."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.active: dict[str, float] = {}
        self.desired: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.steps: dict[str, dict[OtaState, float]] = {}
        self.changed = threading.Condition()

    def __call__(self, message: Message) -> None:
        now = time.perf_counter()
        device_id = message.topic.split("/")[-3]
        with self.changed:
            if message.topic.endswith("/model/desired"):
                self.desired.setdefault(device_id, now)
                return
            report = decode(ModelReported, message.payload)
            on_target = report.model is not None and report.model.version == self.version
            if on_target and not message.retain:
                self.steps.setdefault(device_id, {}).setdefault(report.state, now)
            if on_target and report.state is OtaState.ACTIVE and not message.retain:
                self.active.setdefault(device_id, now)
            elif on_target and report.state is OtaState.FAILED:
                self.failed[device_id] = report.error or "failed"
            self.changed.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.active) + len(self.failed) >= count, timeout)

    def step_times(self) -> str:
        """Median and p95 seconds of each step (desired → downloading → verifying → ... → active)."""
        with self.changed:
            spans: dict[str, list[float]] = {}
            for device_id, seen in self.steps.items():
                if OtaState.DOWNLOADING not in seen:
                    continue  # already on the target: nothing to install
                previous = ("sent", self.desired.get(device_id))
                for step in STEPS:
                    at = seen.get(step)
                    if at is None:
                        continue
                    if previous[1] is not None:
                        spans.setdefault(f"{previous[0]}->{step.value}", []).append(at - previous[1])
                    previous = (step.value, at)
        return "   ".join(
            f"{name} {percentile(values, 0.5):.2f}/{percentile(values, 0.95):.2f}"
            for name, values in spans.items()
        )


def register_models(workdir: Path) -> tuple[str, Any, Any, bytes, dict[str, str]]:
    """Two versions of one model in a fresh local MLflow registry: v1 the int8 file, v2 the same with one
    metadata entry more (other bytes, same size class)."""
    import onnx

    from model_registry.config import RegistrySettings
    from model_registry.registry import ModelRegistry

    private_pem, public_pem = generate_keypair()
    key = workdir / "signing.pem"
    key.write_bytes(private_pem)
    key.chmod(0o600)
    source = SHARED / "models" / "yolov8n_int8.onnx"
    variant = onnx.load(str(source))
    entry = variant.metadata_props.add()
    entry.key, entry.value = "edgefleet_bench", "v2"
    second = workdir / "yolov8n_int8_v2.onnx"
    onnx.save(variant, str(second))
    settings = RegistrySettings(data_dir=workdir / "registry", signing_key=key)
    registry = ModelRegistry(settings)
    v1 = registry.register(source, "bench-yolo", variant="int8")
    v2 = registry.register(second, "bench-yolo", variant="int8")
    env = {
        "EDGEFLEET_REGISTRY_DATA_DIR": str(settings.data_dir),
        "EDGEFLEET_REGISTRY_MLFLOW_URI": settings.tracking_uri,
    }
    return "bench-yolo", v1, v2, public_pem, env


def rollout_once(
    api: httpx.Client, body: dict[str, Any], reports: Reports, count: int, timeout: float
) -> dict[str, float]:
    started = time.perf_counter()
    created = api.post("/api/v1/rollouts", json=body)
    if created.status_code != 201:
        raise SystemExit(f"rollout refused: {created.status_code} {created.text}")
    rollout_id = created.json()["id"]
    if not reports.wait(count, timeout):
        raise SystemExit(f"only {len(reports.active)} of {count} devices reported active in {timeout:.0f} s")
    all_active = max(reports.active.values()) - started if reports.active else float("nan")
    while api.get(f"/api/v1/rollouts/{rollout_id}").json()["state"] != "completed":
        if time.perf_counter() - started > timeout:
            raise SystemExit("the rollout did not complete")
        time.sleep(0.1)
    return {
        "first desired": min(reports.desired.values()) - started if reports.desired else float("nan"),
        "all active": all_active,
        "completed": time.perf_counter() - started,
        "failed": float(len(reports.failed)),
    }


def simulator_processes(args: argparse.Namespace) -> int:
    """How many `edgefleet sim` processes share the devices: one interpreter lock cannot use two cores, and
    its hand-overs between a thousand devices' threads cost more the more threads share it."""
    if args.sim_processes > 0:
        return int(args.sim_processes)
    return max(1, min(os.cpu_count() or 1, int(args.devices) // DEVICES_PER_SIMULATOR))


def start_simulators(
    args: argparse.Namespace,
    folder: Path,
    trust: Path,
    broker: MosquittoBroker,
    model_ref: str,
    token: str,
) -> list[subprocess.Popen[bytes]]:
    """The devices sim-0000 … in `simulator_processes` side-by-side simulators (`--first`), each logging
    to its own sim-<k>.log."""
    count = simulator_processes(args)
    sims: list[subprocess.Popen[bytes]] = []
    for index in range(count):
        first = args.devices * index // count
        devices = args.devices * (index + 1) // count - first
        sim_args = [
            EDGEFLEET,
            "sim",
            "--devices",
            str(devices),
            "--first",
            str(first),
            "--model",
            str(SHARED / "models" / "yolov8n_int8.onnx"),
            "--model-ref",
            model_ref,
            "--data-dir",
            str(folder / "devices"),
            "--trust-store",
            str(trust),
            "--broker-port",
            str(broker.port),
            "--topic-root",
            ROOT,
            "--rate",
            "0.05",
            "--telemetry-interval",
            "10",
            "--probation-s",
            "1",
            "--probation-frames",
            "2",
            "--fps",
            "2",
            "--connect-rate",
            str(500 / count),
            "--report-every",
            "10",
        ]
        with (folder / f"sim-{index}.log").open("ab") as log:
            sims.append(
                subprocess.Popen(
                    sim_args, env={**os.environ, "EDGEFLEET_SIM_TOKEN": token}, stdout=log, stderr=log
                )
            )
    return sims


def sims_cpu(sims: list[subprocess.Popen[bytes]]) -> float:
    return sum(cpu_seconds(sim.pid) for sim in sims)


def sims_stats(sims: list[subprocess.Popen[bytes]]) -> str:
    return f"{len(sims)} process(es): " + "; ".join(proc_stats(sim.pid) for sim in sims)


def bench_rollout(args: argparse.Namespace, workdir: Path, broker: MosquittoBroker) -> None:
    print(
        f"\n== rollout: {args.devices} simulated devices (edgefleet sim, {simulator_processes(args)} "
        "process(es)), v1 -> v2 (3.5 MB), one wave"
    )
    folder = workdir / "rollout"
    folder.mkdir()
    name, v1, v2, public_pem, registry_env = register_models(folder)
    trust = folder / "trust"
    trust.mkdir()
    (trust / "registry.pem").write_bytes(public_pem)
    server = FleetServer(folder, broker, registry_env)
    operator = server.token(Role.OPERATOR)
    server.start()
    assert server.process is not None
    fleet_pid = server.process.pid
    sims = start_simulators(args, folder, trust, broker, f"{name}@{v1.version}", operator)
    sim_log = folder / "sim-*.log"
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator}"}, timeout=60)
    watcher: MqttSession | None = None
    try:
        started = time.perf_counter()
        while True:
            if any(sim.poll() is not None for sim in sims):
                raise SystemExit(f"edgefleet sim exited; see {sim_log}")
            page = api.get(
                "/api/v1/devices", params={"state": "online", "model": f"{name}@{v1.version}", "limit": 1}
            )
            if page.json()["total"] >= args.devices:
                break
            if time.perf_counter() - started > 300:
                raise SystemExit(f"the simulated devices did not all come online in 300 s; see {sim_log}")
            time.sleep(0.5)
        print(
            f"  {args.devices} devices online in {time.perf_counter() - started:.1f} s; "
            f"sim: {sims_stats(sims)}"
        )
        for sim in sims:
            settle(sim.pid, quiet=0.6 / len(sims), timeout=20)
        spec = {
            "model": name,
            "version": v2.version,
            "waves": [100],
            "probation_s": 0,
            "success_threshold": 1.0,
            "require_telemetry": False,
        }
        results = []
        for label, target, count in (
            ("one device (baseline)", {"device_ids": ["sim-0000"]}, 1),
            (f"all {args.devices} devices", {"all": True}, args.devices - 1),
        ):
            reports = Reports(v2.version)
            watcher = MqttSession(
                MqttSettings(
                    host=broker.host,
                    port=broker.port,
                    client_id=f"bench-watch-{uuid.uuid4().hex[:6]}",
                    clean_start=True,
                    session_expiry_s=0,
                )
            )
            watcher.subscribe(f"{ROOT}/devices/+/model/reported", reports)
            watcher.subscribe(f"{ROOT}/devices/+/model/desired", reports)
            watcher.connect()
            assert watcher.wait_connected(10)
            time.sleep(1.0)  # the retained messages arrive first
            with reports.changed:
                reports.desired.clear()
            cpu_before = sims_cpu(sims), cpu_seconds(fleet_pid)
            figures = rollout_once(api, {**spec, "target": target}, reports, count, 600)
            figures["sim cpu"] = sims_cpu(sims) - cpu_before[0]
            figures["fleet cpu"] = cpu_seconds(fleet_pid) - cpu_before[1]
            results.append((label, figures, reports.step_times()))
            watcher.disconnect()
            watcher = None
        for label, figures, steps in results:
            print(
                f"  {label:<28} first desired +{figures['first desired']:5.2f} s"
                f"   all active +{figures['all active']:6.1f} s"
                f"   rollout completed +{figures['completed']:6.1f} s   failed {figures['failed']:.0f}"
                f"   sim CPU {figures['sim cpu']:6.1f} s   fleet manager CPU {figures['fleet cpu']:5.1f} s"
            )
            print(f"  {'':<28} per step, median/p95 s: {steps}")
        total = results[-1][1]["all active"]
        moved = args.devices * v2.size / 1e9
        print(
            f"  {args.devices} devices: desired published -> all active in {total:.1f} s "
            f"({moved:.1f} GB downloaded, verified, installed)   target <= {ROLLOUT_TARGET_S:.0f} s: "
            f"{'met' if total <= ROLLOUT_TARGET_S else 'NOT met'}"
        )
        print(f"  sim at the end: {sims_stats(sims)}")
    finally:
        if watcher is not None:
            watcher.disconnect()
        api.close()
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        for sim in sims:
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="ingest,api,rollout", help="comma-separated parts to run")
    parser.add_argument("--messages", type=int, default=50_000, help="ingest burst size")
    parser.add_argument("--publishers", type=int, default=100, help="MQTT clients publishing the burst")
    parser.add_argument("--clients", type=int, default=100, help="concurrent API clients")
    parser.add_argument("--api-seconds", type=float, default=15.0)
    parser.add_argument("--client-rate", type=float, default=1.0, help="requests per second per API client")
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices for the rollout")
    parser.add_argument(
        "--sim-processes",
        type=int,
        default=0,
        help="simulator processes sharing the devices (0: one per core, at most one per 250 devices)",
    )
    parser.add_argument("--dir", type=Path, default=Path("runs"), help="where the temporary files go")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"ingest", "api", "rollout"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from ingest, api, rollout")
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"benchmarks/fleet.py on {os.cpu_count()} cores (Python {sys.version.split()[0]})")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=args.dir) as scratch:
        workdir = Path(scratch)
        broker = MosquittoBroker(workdir / "mosquitto", max_queued_messages=10 * args.messages).start()
        try:
            if "ingest" in parts or "api" in parts:
                server = bench_ingest(args, workdir, broker)
                try:
                    if "api" in parts:
                        bench_api(args, server, [f"bench-{i:04d}" for i in range(args.publishers)])
                finally:
                    server.stop()
            if "rollout" in parts:
                bench_rollout(args, workdir, broker)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()

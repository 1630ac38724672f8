"""The agent's delivery guarantees under faults, on the real agent process, a real Mosquitto and vtest.avi.

Every test compares the agent's own record of committed msg_ids (`produced_log`) with what a persistent
QoS 1 subscriber received: a broker outage of 30 s, `kill -9` at 5 random moments while draining a backlog
over a slow link, a tiny outbox cap, and malformed payloads on every topic the agent subscribes to.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent.outbox import Outbox, OutboxLimits
from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.payloads import MAX_PAYLOAD_BYTES, ModelDesired, RefinedPayload
from tests.broker import MosquittoBroker
from tests.device_agent.agent_runner import (
    TOPICS,
    AgentProcess,
    MsgIdRecorder,
    ThrottledProxy,
    wait_until,
    write_agent_config,
)

OUTAGE_S = 30.0
CRASH_SEED = 20240917
KILLS = 5
SLOW_LINK_BYTES_PER_S = 3000
CAP_BYTES = 64 * 1024  # the smallest cap the agent accepts
CAP_CROP_BUDGET = 30_000  # crop bytes per second: bounds the crops of one frame's batch


def unique_id(prefix: str) -> str:
    return f"{prefix}-{new_msg_id()[-8:].lower()}"


def video(shared: Path, fps: float = 4.0) -> list[dict[str, Any]]:
    uri = str(shared / "data" / "video" / "vtest.avi")
    return [{"id": "hall", "kind": "video", "uri": uri, "fps": fps, "loop": True}]


class FileSizeSampler:
    """Samples the outbox's database + WAL size on disk every `interval_s` on a thread of its own, for the
    whole run: the largest sum seen, the largest database file, and how often it looked (a status poll
    alone would sample 10x less)."""

    def __init__(self, db: Path, interval_s: float = 0.002) -> None:
        self.files = (db, Path(f"{db}-wal"))
        self.interval_s = interval_s
        self.largest = 0
        self.largest_db = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-sizes", daemon=True)

    def start(self) -> FileSizeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            db, wal = (_size(path) for path in self.files)
            self.largest = max(self.largest, db + wal)
            self.largest_db = max(self.largest_db, db)
            self.samples += 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # not created yet, or the WAL removed at a clean close
        return 0


def wait_alive_until(agent: AgentProcess, predicate: Any, timeout: float, what: str) -> None:
    def check() -> bool:
        assert agent.alive, f"the agent exited while waiting for {what}:\n{agent.log_tail()}"
        try:
            return bool(predicate())
        except httpx.HTTPError:  # the local API is not up yet
            return False

    wait_until(check, timeout, what)


def check_delivery(agent: AgentProcess, recorder: MsgIdRecorder, name: str) -> None:
    """After the agent stopped: everything it committed arrived; duplicates are whole repeated messages."""
    produced = agent.produced()
    missing = recorder.wait_for_all(produced, 30)
    received = recorder.unique()
    unknown = received - set(produced)
    duplicates = recorder.duplicates()
    print(
        f"\n{name}: produced {len(produced)} msg_ids, received {len(recorder.received)} messages "
        f"({len(received)} unique), lost {len(missing)}, duplicates {duplicates} "
        f"(copies per msg_id: {dict(sorted(recorder.duplicate_histogram().items()))})"
    )
    assert not missing, f"{len(missing)} committed msg_id(s) never arrived, e.g. {sorted(missing)[:3]}"
    assert not unknown, f"messages arrived that the agent never recorded as committed: {sorted(unknown)[:3]}"
    assert not recorder.changed_duplicates(), "a repeated msg_id carried a different payload"


@pytest.mark.slow
def test_a_30_s_broker_outage_loses_nothing(
    private_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path: Path
) -> None:
    device_id = unique_id("outage")
    recorder = MsgIdRecorder(private_broker.port, device_id).start()
    config = write_agent_config(
        tmp_path,
        device_id=device_id,
        broker_port=private_broker.port,
        model=int8_model,
        sources=video(shared),
    )
    agent = AgentProcess(config).start()
    try:
        wait_alive_until(agent, lambda: recorder.count("detections") >= 5, 120, "the first detections")

        private_broker.stop()
        down_at = time.monotonic()
        wait_alive_until(agent, lambda: not agent.status()["broker_connected"], 30, "the agent to notice")
        produced_before = len(agent.produced())
        first = agent.status()
        depths = [first["outbox"]["depth"]]
        while time.monotonic() - down_at < OUTAGE_S:
            time.sleep(2.0)
            depths.append(agent.status()["outbox"]["depth"])
        produced_during = len(agent.produced()) - produced_before
        last = agent.status()
        private_broker.start()
        outage_s = time.monotonic() - down_at
        print(f"\noutage {outage_s:.1f} s: produced {produced_during} msg_ids, outbox depth {depths}")

        assert outage_s >= OUTAGE_S
        assert last["broker_connected"] is False
        assert last["frames_processed"] >= first["frames_processed"] + 20, "detection stopped in the outage"
        assert produced_during >= 20
        assert last["outbox"]["depth"] >= produced_during  # all of it waits in the outbox
        assert depths == sorted(depths)
        assert depths[-1] > depths[0]

        missing = recorder.wait_for_all(agent.produced(), 120)
        assert not missing, f"{len(missing)} msg_id(s) still missing after the broker came back"
        assert agent.status()["broker_connected"] is True
        assert agent.terminate() == 0
        check_delivery(agent, recorder, "outage")
    finally:
        agent.kill9()
        recorder.stop()


@pytest.mark.slow
def test_kill_9_at_5_random_moments_while_draining_a_backlog_loses_nothing(
    private_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path: Path
) -> None:
    rng = random.Random(CRASH_SEED)
    moments = [round(rng.uniform(0.2, 3.0), 2) for _ in range(KILLS)]
    print(f"\ncrash: seed {CRASH_SEED}, kill -9 {moments} s after the backlog formed / each reconnection")
    device_id = unique_id("crash")
    recorder = MsgIdRecorder(private_broker.port, device_id).start()
    # The agent reaches the broker over a slow uplink: it produces faster than the link carries, so the
    # outbox always holds a backlog that the publisher is draining when the kill comes.
    proxy = ThrottledProxy(private_broker, rate=SLOW_LINK_BYTES_PER_S)
    config = write_agent_config(
        tmp_path, device_id=device_id, broker_port=proxy.port, model=int8_model, sources=video(shared)
    )
    agent = AgentProcess(config).start()
    try:
        wait_alive_until(agent, lambda: agent.status()["outbox"]["depth"] >= 20, 120, "a backlog")
        backlog_at_kill = []
        for moment in moments:
            time.sleep(moment)
            agent.kill9()
            with Outbox(agent.outbox_path) as outbox:
                backlog_at_kill.append(outbox.stats().depth)
            onlines = recorder.onlines()
            agent.start()
            wait_alive_until(
                agent, lambda n=onlines: recorder.onlines() > n, 120, "the restarted agent to be online"
            )
        received_before_drain = recorder.count()
        print(f"crash: outbox depth after each kill {backlog_at_kill}; received {received_before_drain}")
        assert all(depth > 0 for depth in backlog_at_kill), "a kill came after the backlog was drained"
        assert received_before_drain > 0, "nothing was drained over the slow link"

        proxy.rate = None  # the link recovers: the last life drains everything
        missing = recorder.wait_for_all(agent.produced(), 120)
        assert not missing, f"{len(missing)} msg_id(s) still missing after the link recovered"
        assert agent.terminate() == 0
        check_delivery(agent, recorder, "crash")
        assert agent.starts == KILLS + 1
    finally:
        agent.kill9()
        proxy.close()
        recorder.stop()


@pytest.mark.slow
def test_a_tiny_outbox_cap_drops_crops_first_and_reports_the_drops(
    private_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path: Path
) -> None:
    device_id = unique_id("cap")
    recorder = MsgIdRecorder(private_broker.port, device_id).start()
    private_broker.stop()  # the link is down from the start: only the cap limits the outbox
    config = write_agent_config(
        tmp_path,
        device_id=device_id,
        broker_port=private_broker.port,
        model=int8_model,
        sources=video(shared),
        outbox={"max_bytes": CAP_BYTES},
        recent_events=5000,
        crops={
            "max_side": 160,
            "jpeg_quality": 90,
            "confidence_change": 0.05,
            "bytes_per_second": CAP_CROP_BUDGET,
        },
    )
    agent = AgentProcess(config).start()
    started = time.monotonic()
    db, wal = agent.outbox_path, Path(f"{agent.outbox_path}-wal")
    samples: list[dict[str, float]] = []
    on_disk = FileSizeSampler(db).start()

    def sample() -> dict[str, float]:
        outbox = agent.status()["outbox"]
        row = {
            "t": round(time.monotonic() - started, 1),
            "bytes": outbox["bytes"],
            "depth": outbox["depth"],
            "crop": outbox["dropped"].get("crop", 0),
            "detection": outbox["dropped"].get("detection", 0),
            "db": db.stat().st_size if db.exists() else 0,
            "wal": wal.stat().st_size if wal.exists() else 0,
        }
        samples.append(row)
        return row

    try:
        agent.wait_status()
        wait_alive_until(
            agent,
            lambda: (row := sample())["crop"] > 0 and row["detection"] > 0,
            150,
            "crop and detection drops",
        )
        at_restart = samples[-1]
        private_broker.start()

        def reported_drops() -> dict[str, int] | None:
            sample()
            return next(
                (
                    t["outbox"]["dropped"]
                    for t in recorder.telemetry
                    if t["outbox"]["dropped"].get("crops", 0) >= at_restart["crop"]
                ),
                None,
            )

        wait_alive_until(agent, lambda: reported_drops() is not None, 60, "telemetry reporting the drops")
        reported = reported_drops()
        assert reported is not None
        final = sample()
        detection_ids = {event["msg_id"] for event in agent.events(1000)}  # every committed event
        assert 0 < len(detection_ids) < 1000
        assert agent.terminate() == 0
        on_disk.stop()
        produced = agent.produced()
        assert detection_ids <= set(produced)
        # No stored detection was dropped (not configured): every committed event arrives.
        assert not recorder.wait_for_all(sorted(detection_ids), 30), "committed events were dropped"
        recorder.wait_quiet()
        missing = set(produced) - recorder.unique()
        # Up to the newest event the API listed, what is not an event is a crop.
        last_event = max(produced.index(m) for m in detection_ids)
        crops_produced = [m for m in produced[: last_event + 1] if m not in detection_ids]
        missing_crops = [m for m in crops_produced if m in missing]
        first_crop_drop = next(s["t"] for s in samples if s["crop"] > 0)
        print(
            f"\ncap: first crop drop at {first_crop_drop} s, first detection refused at {at_restart['t']} s, "
            f"done at {samples[-1]['t']} s"
        )
        print(
            f"cap {CAP_BYTES} B: {len(samples)} samples, "
            f"max payload bytes {max(s['bytes'] for s in samples)}, "
            f"max db file {max(s['db'] for s in samples)} B, max wal {max(s['wal'] for s in samples)} B, "
            f"max db + wal {on_disk.largest} B in {on_disk.samples} samples of the files; "
            f"dropped before the broker came back: {at_restart['crop']} crops, {at_restart['detection']} "
            f"detections (refused); telemetry then said {reported}; committed: {len(detection_ids)} events, "
            f"{len(crops_produced)} crops, of which {len(missing_crops)} crops were dropped from the outbox"
        )
        batch = CAP_CROP_BUDGET + 16 * 1024  # one frame: its crops (within the budget) and its event
        limits = OutboxLimits(max_bytes=CAP_BYTES)
        assert all(s["bytes"] <= limits.room_bytes for s in samples)
        # The files on disk (database + WAL) never pass the cap plus the batch being enqueued; the database
        # file alone never passes its share of the cap.
        print(f"cap + one batch {CAP_BYTES + batch} B; the database file's share {limits.db_bytes} B")
        assert on_disk.samples > 1000  # sampled all along (every 2 ms), not just at the status polls
        assert on_disk.largest <= CAP_BYTES + batch
        assert on_disk.largest_db <= limits.db_bytes
        # Crops go first: no detection was refused before crops were dropped...
        assert all(s["crop"] > 0 for s in samples if s["detection"] > 0)
        # ...and what the cap took were the oldest crops, each counted.
        assert 0 < len(missing_crops) <= final["crop"]
        assert missing_crops == crops_produced[: len(missing_crops)], "the oldest crops go first"
        assert reported["crops"] >= at_restart["crop"]
        assert reported["detections"] >= at_restart["detection"]
        assert final["crop"] >= reported["crops"]
        assert final["detection"] >= reported["detections"]
    finally:
        on_disk.stop()
        agent.kill9()
        recorder.stop()
        if not private_broker.running:
            private_broker.start()


# ---- malformed payloads on every subscribed topic (one agent on the session's broker) ----------------------


def malformed_payloads(schema: str, device_id: str) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    envelope = {"msg_id": new_msg_id(), "device_id": device_id, "ts": "2024-01-01T00:00:00Z"}
    return [
        ("garbage", rng.randbytes(2048)),
        ("nul-bytes", b"\x00" * 64),
        ("truncated-json", f'{{"schema": "{schema}", "det_id": '.encode()),
        ("json-array", b"[1, 2, 3]"),
        ("json-string", b'"hello"'),
        (
            "wrong-schema",
            json.dumps({"schema": "edgefleet.detection/1", **envelope, "detections": []}).encode(),
        ),
        ("future-major", json.dumps({"schema": schema.rsplit("/", 1)[0] + "/99", **envelope}).encode()),
        ("wrong-types", json.dumps({"schema": schema, **envelope, "msg_id": 42, "det_id": ["x"]}).encode()),
        ("envelope-only", json.dumps({"schema": schema, **envelope}).encode()),
        (
            "oversized",
            f'{{"schema": "{schema}", "det_id": "'.encode() + b"a" * (4 * MAX_PAYLOAD_BYTES) + b'"}',
        ),
        ("deeply-nested", b"[" * (MAX_PAYLOAD_BYTES - 1024)),
        ("invalid-utf8", b"\xff\xfe\xfd\xfc" * 8),
        ("invalid-utf8-in-json", f'{{"schema": "{schema}", "det_id": "'.encode() + b"\xc3\x28" + b'"}'),
        ("lone-surrogate", f'{{"schema": "{schema}", "det_id": "\\ud800"}}'.encode()),
    ]


SUBSCRIPTIONS = {  # every topic filter a device subscribes to (Topics.device_subscriptions): a topic under it
    "refined": lambda device_id: TOPICS.refined(device_id),
    "model/desired": lambda device_id: TOPICS.model_desired(device_id),
    "cmd/#": lambda device_id: TOPICS.cmd(device_id, "fuzz"),
}
SCHEMAS = {
    "refined": str(RefinedPayload.model_fields["schema_name"].default),
    "model/desired": str(ModelDesired.model_fields["schema_name"].default),
    "cmd/#": "edgefleet.cmd/1",
}
# A command's body is any JSON object (or nothing): of the payloads above, these are malformed commands.
NOT_A_JSON_OBJECT = frozenset(
    {
        "garbage",
        "nul-bytes",
        "truncated-json",
        "json-array",
        "json-string",
        "deeply-nested",
        "invalid-utf8",
        "invalid-utf8-in-json",
    }
)


def expected_malformed(subscription: str, payloads: list[tuple[str, bytes]]) -> int:
    if subscription == "cmd/#":
        return sum(1 for name, _ in payloads if name in NOT_A_JSON_OBJECT)
    return len(payloads)  # none is a valid refined result or desired model (nor the empty "clear")


@pytest.fixture(scope="module")
def steady_agent(
    mqtt_broker: MosquittoBroker, int8_model: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProcess, MsgIdRecorder]]:
    tmp = tmp_path_factory.mktemp("malformed")
    device_id = unique_id("malformed")
    recorder = MsgIdRecorder(mqtt_broker.port, device_id).start()
    config = write_agent_config(
        tmp, device_id=device_id, broker_port=mqtt_broker.port, model=int8_model, sources=video(shared)
    )
    agent = AgentProcess(config).start()
    try:
        wait_alive_until(agent, lambda: recorder.count("detections") >= 3, 120, "the first detections")
        yield agent, recorder
        assert agent.terminate() == 0
    finally:
        agent.kill9()
        recorder.stop()


def test_the_agent_reports_the_subscriptions_these_tests_cover(
    steady_agent: tuple[AgentProcess, MsgIdRecorder],
) -> None:
    agent, _ = steady_agent
    subscribed = agent.status()["subscriptions"]
    covered = {
        TOPICS.refined(agent.device_id),
        TOPICS.model_desired(agent.device_id),
        TOPICS.cmd_filter(agent.device_id),
    }
    assert covered == set(TOPICS.device_subscriptions(agent.device_id))
    assert set(subscribed) == covered, f"cover every subscription in SUBSCRIPTIONS: {subscribed}"


@pytest.mark.parametrize("subscription", list(SUBSCRIPTIONS))
def test_malformed_payloads_are_logged_ignored_and_the_agent_keeps_publishing(
    mqtt_broker: MosquittoBroker, steady_agent: tuple[AgentProcess, MsgIdRecorder], subscription: str
) -> None:
    agent, recorder = steady_agent
    topic = SUBSCRIPTIONS[subscription](agent.device_id)
    payloads = malformed_payloads(SCHEMAS[subscription], agent.device_id)
    expected = expected_malformed(subscription, payloads)
    before = agent.status()
    log_offset = agent.log_path.stat().st_size
    detections_before = recorder.count("detections")

    inject = MqttSession(MqttSettings(port=mqtt_broker.port, client_id=f"fuzz-{new_msg_id()[-10:].lower()}"))
    inject.connect()
    assert inject.wait_connected(10)
    try:
        for name, payload in payloads:
            assert inject.publish(topic, payload, qos=1).wait(10), f"the broker refused {name}"
    finally:
        inject.disconnect()

    wait_alive_until(
        agent,
        lambda: agent.status()["malformed_messages"] >= before["malformed_messages"] + expected,
        30,
        f"{expected} malformed payloads on {subscription} to be counted",
    )
    wait_alive_until(
        agent,
        lambda: recorder.count("detections") >= detections_before + 5,
        60,
        "detections after the payloads",
    )
    after = agent.status()
    with agent.log_path.open("rb") as log:
        log.seek(log_offset)
        logged = log.read().decode(errors="replace")
    print(
        f"\n{subscription}: {len(payloads)} payloads, {expected} malformed; malformed count "
        f"{before['malformed_messages']} -> {after['malformed_messages']}"
    )
    assert after["malformed_messages"] == before["malformed_messages"] + expected
    assert logged.count("ignored a malformed") == expected
    assert "Traceback" not in logged, f"a handler failed:\n{logged[-3000:]}"
    assert after["frames_processed"] > before["frames_processed"]
    assert after["frames_failed"] == before["frames_failed"]
    assert after["broker_connected"] is True
    assert after["active_model"] == before["active_model"]

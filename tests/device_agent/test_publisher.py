"""OutboxPublisher against a real Mosquitto: full drain, broker outage, MQTT 5 properties, restarts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from device_agent.outbox import MessageKind, Outbox, OutboxMessage
from device_agent.publisher import OutboxPublisher
from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import Message, MessageProperties, MqttSession, MqttSettings
from fleet_protocol.payloads import MAX_CROP_BYTES, MAX_PAYLOAD_BYTES
from tests.broker import MosquittoBroker

_client_ids = count()


def settings_for(broker: MosquittoBroker, name: str) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        client_id=f"{name}-{next(_client_ids)}",
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
        session_expiry_s=300,
    )


def detection(topic: str, size: int = 300) -> OutboxMessage:
    msg_id = new_msg_id()
    payload = msg_id.encode() + b" " + b"x" * (size - len(msg_id) - 1)
    return OutboxMessage(msg_id=msg_id, topic=topic, payload=payload, kind=MessageKind.DETECTION)


class Collector:
    """A QoS 1 persistent-session subscriber counting the msg_id at the head of each payload."""

    def __init__(self, broker: MosquittoBroker, topic_filter: str) -> None:
        self.counts: Counter[str] = Counter()
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self.session = MqttSession(settings_for(broker, "collector"))
        self.session.subscribe(topic_filter, self._on_message, qos=1)
        self.session.connect()
        assert self.session.wait_connected(10)
        time.sleep(0.2)  # SUBACK

    def _on_message(self, message: Message) -> None:
        with self._changed:
            self.counts[message.payload.split(b" ", 1)[0].decode()] += 1
            self.messages.append(message)
            self._changed.notify_all()

    def wait_for_ids(self, msg_ids: set[str], timeout: float) -> set[str]:
        """Wait until every id arrived; returns the ids still missing."""
        with self._changed:
            self._changed.wait_for(lambda: msg_ids <= self.counts.keys(), timeout)
            return msg_ids - self.counts.keys()


class Agent:
    """The device side: an outbox, a session and a publisher over it."""

    def __init__(self, broker: MosquittoBroker, outbox_path: Path, **publisher_options: object) -> None:
        self.outbox = Outbox(outbox_path)
        self.session = MqttSession(settings_for(broker, "device"))
        self.publisher = OutboxPublisher(self.outbox, self.session, **publisher_options)  # type: ignore[arg-type]
        self.session.connect()
        self.publisher.start()

    def enqueue(self, messages: list[OutboxMessage]) -> None:
        self.outbox.enqueue(messages)
        self.publisher.notify()

    def close(self) -> None:
        self.publisher.stop()
        self.session.disconnect()
        self.outbox.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    opened: list[Agent] = []
    yield opened
    for agent in opened:
        agent.close()


def test_drains_2000_messages_and_empties_the_outbox(
    mqtt_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(mqtt_broker, "t/drain/#")
    rtts_ms: list[float] = []
    agent = Agent(mqtt_broker, tmp_path / "outbox.db", on_rtt=rtts_ms.append, rtt_probe_interval_s=0.05)
    agents.append(agent)
    messages = [detection("t/drain/cam-1/detections") for _ in range(2000)]

    for start in range(0, len(messages), 100):  # the pipeline enqueues in batches
        agent.enqueue(messages[start : start + 100])

    assert agent.publisher.flush(timeout=20), agent.publisher.counters()
    missing = collector.wait_for_ids({m.msg_id for m in messages}, timeout=10)
    collector.session.disconnect()
    assert not missing, f"{len(missing)} of 2000 msg_ids never arrived"
    assert agent.outbox.stats().depth == 0
    counters = agent.publisher.counters()
    assert (counters.acked, counters.inflight, counters.rejected) == (2000, 0, 0)
    assert rtts_ms, "no link RTT was measured"
    assert all(0 < rtt < 10_000 for rtt in rtts_ms), rtts_ms


def test_a_broker_receive_maximum_below_the_window_bounds_what_paho_holds(
    tmp_path: Path, agents: list[Agent]
) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto", max_inflight_messages=5).start()  # Receive Maximum 5
    held: list[int] = []
    try:
        collector = Collector(broker, "t/rmax/#")
        agent = Agent(broker, tmp_path / "outbox.db", window=50)  # paho's own max_inflight is 100
        agents.append(agent)
        messages = [detection("t/rmax/cam-1/detections") for _ in range(500)]
        draining = threading.Event()

        def sample() -> None:
            while not draining.is_set():
                held.append(agent.publisher.counters().inflight)
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        agent.enqueue(messages)
        flushed = agent.publisher.flush(timeout=20)
        draining.set()
        sampler.join()

        assert flushed, agent.publisher.counters()
        assert not collector.wait_for_ids({m.msg_id for m in messages}, timeout=10)
        collector.session.disconnect()
        assert agent.session.receive_maximum == 5
        assert max(held) <= 5, f"paho was handed {max(held)} rows against a Receive Maximum of 5"
        assert agent.session.connect_count == 1  # the broker never dropped the link
    finally:
        for agent in agents:
            agent.close()
        agents.clear()
        broker.kill()


def test_paho_is_handed_two_windows_and_no_more(
    mqtt_broker: MosquittoBroker, tmp_path: Path, agents: list[Agent]
) -> None:
    collector = Collector(mqtt_broker, "t/windows/#")
    outbox = Outbox(tmp_path / "outbox.db")
    messages = [detection("t/windows/cam-1/detections") for _ in range(1000)]
    outbox.enqueue(messages)  # a backlog, as after an outage
    session = MqttSession(settings_for(mqtt_broker, "device").model_copy(update={"max_inflight": 20}))
    publisher = OutboxPublisher(outbox, session, window=20)
    session.connect()
    assert session.wait_connected(10)
    held: list[int] = []
    published = session.publish

    def publish_and_sample(*args: object, **kwargs: object) -> object:
        held.append(publisher.counters().inflight)
        return published(*args, **kwargs)  # type: ignore[arg-type]

    session.publish = publish_and_sample  # type: ignore[method-assign]
    publisher.start()
    try:
        assert publisher.flush(timeout=20), publisher.counters()
        assert not collector.wait_for_ids({m.msg_id for m in messages}, timeout=10)
    finally:
        publisher.stop()
        session.disconnect()
        collector.session.disconnect()
        outbox.close()
    # counted as each row goes to paho, its whole batch included: two windows, one on the wire, one queued
    assert max(held) == 40


def test_broker_outage_loses_nothing(
    private_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(private_broker, "t/outage/#")
    agent = Agent(private_broker, tmp_path / "outbox.db")
    agents.append(agent)
    before = [detection("t/outage/cam-1/detections") for _ in range(3000)]
    during = [detection("t/outage/cam-1/detections") for _ in range(500)]
    agent.enqueue(before)
    while agent.publisher.counters().acked < 300:  # stop the broker mid-drain
        time.sleep(0.001)

    private_broker.stop()
    for start in range(0, len(during), 50):  # detections keep coming while the broker is down
        agent.enqueue(during[start : start + 50])
        time.sleep(0.05)
    depth_during_outage = agent.outbox.stats().depth
    time.sleep(max(0.0, 5.0 - 0.05 * len(during) / 50))
    assert not agent.session.connected
    private_broker.start()

    assert agent.publisher.flush(timeout=20), agent.publisher.counters()
    sent = {m.msg_id for m in before + during}
    missing = collector.wait_for_ids(sent, timeout=10)
    collector.session.disconnect()
    duplicates = sum(collector.counts.values()) - len(collector.counts)
    counters = agent.publisher.counters()
    print(f"outage: depth during outage {depth_during_outage}, duplicates {duplicates}, {counters}")
    assert not missing, f"{len(missing)} of {len(sent)} msg_ids lost across the outage"
    assert depth_during_outage >= len(during)
    assert agent.outbox.stats().depth == 0
    assert counters.acked == len(sent)


def test_mqtt5_properties_of_a_crop_arrive_intact(
    mqtt_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(mqtt_broker, "t/props/#")
    agent = Agent(mqtt_broker, tmp_path / "outbox.db")
    agents.append(agent)
    msg_id = new_msg_id()
    props = MessageProperties(
        content_type="image/jpeg",
        response_topic="t/props/cam-1/refined",
        correlation_data=b"01J9DETECTIONID0000000000",
        user_properties=(("msg_id", msg_id), ("label", "dog"), ("bbox", "[1.0,2.0,30.5,40.25]")),
    )
    crop = OutboxMessage(
        msg_id=msg_id,
        topic="t/props/cam-1/crops",
        payload=msg_id.encode() + b" \xff\xd8\xff\xe0jpeg-bytes\x00",
        kind=MessageKind.CROP,
        properties=props,
    )

    agent.enqueue([crop])

    assert agent.publisher.flush(timeout=10)
    assert not collector.wait_for_ids({msg_id}, timeout=10)
    collector.session.disconnect()
    received = collector.messages[0]
    assert received.payload == crop.payload
    assert received.properties == MessageProperties(
        content_type="image/jpeg",
        correlation_data=b"01J9DETECTIONID0000000000",
        response_topic="t/props/cam-1/refined",
        user_properties=props.user_properties,
    )


def test_rows_left_by_a_stopped_agent_are_published_by_the_next_one(
    private_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(private_broker, "t/restart/#")
    private_broker.stop()
    first = Agent(private_broker, tmp_path / "outbox.db")
    assert first.publisher.flush(timeout=2)  # an empty outbox is flushed, broker or not
    messages = [detection("t/restart/cam-1/detections") for _ in range(200)]
    first.enqueue(messages)

    assert not first.publisher.flush(timeout=0.5)  # nothing can drain while the broker is down
    first.close()  # the agent stops (or dies) with its outbox full
    private_broker.start()
    second = Agent(private_broker, tmp_path / "outbox.db")
    agents.append(second)

    assert second.publisher.flush(timeout=10)
    assert not collector.wait_for_ids({m.msg_id for m in messages}, timeout=10)
    collector.session.disconnect()
    assert second.outbox.stats().depth == 0


@pytest.mark.parametrize("refusal", ["not authorized (0x87)", "over the broker's size limit (0x95)"])
def test_a_row_the_broker_refuses_for_good_is_dropped_and_does_not_block_the_fifo(
    tmp_path: Path,
    agents: list[Agent],
    refusal: str,
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic write t/acl/allowed/#\ntopic read t/acl/#\n")
    too_large = refusal.endswith("(0x95)")
    size_limit = 2_000 if too_large else None
    broker = MosquittoBroker(tmp_path / "mosquitto", acl_file=acl, message_size_limit=size_limit).start()
    try:
        collector = Collector(broker, "t/acl/#")
        agent = Agent(broker, tmp_path / "outbox.db")
        agents.append(agent)
        if too_large:  # within the contract's caps, over this broker's
            refused = detection("t/acl/allowed/detections", size=3_000)
        else:
            refused = detection("t/acl/forbidden/detections")
        allowed = detection("t/acl/allowed/detections")

        agent.enqueue([refused, allowed])

        assert agent.publisher.flush(timeout=10), agent.publisher.counters()
        assert not collector.wait_for_ids({allowed.msg_id}, timeout=10)
        collector.session.disconnect()
        assert refused.msg_id not in collector.counts
        assert agent.publisher.counters().rejected == 1
        assert agent.outbox.stats().depth == 0
    finally:
        for agent in agents:
            agent.close()
        agents.clear()
        broker.kill()


def test_rows_over_the_contract_size_are_dropped_unsent_and_do_not_block_the_fifo(
    mqtt_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(mqtt_broker, "t/oversize/#")
    agent = Agent(mqtt_broker, tmp_path / "outbox.db")
    agents.append(agent)
    too_large = [  # left by an older agent, say: the pipeline never stores them
        detection("t/oversize/cam-1/detections", size=MAX_PAYLOAD_BYTES + 1),
        OutboxMessage(
            new_msg_id(), "t/oversize/cam-1/crops", b"\xff" * (MAX_CROP_BYTES + 1), MessageKind.CROP
        ),
    ]
    fine = [
        detection("t/oversize/cam-1/detections", size=MAX_PAYLOAD_BYTES),
        detection("t/oversize/cam-1/detections"),
    ]

    agent.enqueue([too_large[0], fine[0], too_large[1], fine[1]])

    assert agent.publisher.flush(timeout=20), agent.publisher.counters()
    assert not collector.wait_for_ids({m.msg_id for m in fine}, timeout=10)
    collector.session.disconnect()
    assert not {m.msg_id for m in too_large} & collector.counts.keys()
    counters = agent.publisher.counters()
    assert (counters.acked, counters.rejected) == (2, 2)
    assert agent.outbox.stats().depth == 0


def test_rows_beyond_what_memory_keeps_are_read_back_in_fifo_order_once_each(
    private_broker: MosquittoBroker,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    collector = Collector(private_broker, "t/memory/#")
    path = tmp_path / "outbox.db"
    backlog = [detection("t/memory/cam-1/detections") for _ in range(120)]
    with Outbox(path) as earlier:  # left by a previous run: only in SQLite
        earlier.enqueue(backlog)
    private_broker.stop()
    agent = Agent(private_broker, path, memory_rows=40)
    agents.append(agent)
    live: list[OutboxMessage] = []
    for _ in range(60):  # during the outage, far more than the publisher keeps in memory
        crop_id = new_msg_id()
        crop = OutboxMessage(crop_id, "t/memory/cam-1/crops", crop_id.encode() + b" jpeg", MessageKind.CROP)
        batch = [*(detection("t/memory/cam-1/detections") for _ in range(3)), crop]
        agent.enqueue(batch)
        live += batch
    private_broker.start()

    assert agent.publisher.flush(timeout=20), agent.publisher.counters()
    sent = backlog + live
    assert not collector.wait_for_ids({m.msg_id for m in sent}, timeout=10)
    collector.session.disconnect()
    order = [m.payload.split(b" ", 1)[0].decode() for m in collector.messages]
    assert order == [m.msg_id for m in sent]  # FIFO, nothing twice
    assert agent.publisher.counters().published == len(sent)
    assert agent.outbox.stats().depth == 0

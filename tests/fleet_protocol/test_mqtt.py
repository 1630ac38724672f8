"""MqttSession against a real Mosquitto: properties, handlers, queued publishes, will, birth, sessions."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_protocol.mqtt import (
    Backoff,
    Message,
    MessageProperties,
    MqttSession,
    MqttSettings,
    OutgoingMessage,
    _PackedOnce,
    _plain_puback_reason,
)
from tests.broker import Inbox, MosquittoBroker

REPO_ROOT = Path(__file__).resolve().parents[2]
_client_ids = count()


def settings_for(broker: MosquittoBroker, name: str, **overrides: object) -> MqttSettings:
    values: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": f"{name}-{next(_client_ids)}",
        "reconnect_min_delay_s": 0.1,
        "reconnect_max_delay_s": 0.5,
        "session_expiry_s": 300,
    }
    values.update(overrides)
    return MqttSettings.model_validate(values)


@pytest.fixture
def sessions() -> Iterator[list[MqttSession]]:
    """Sessions a test opens; each is disconnected at teardown."""
    opened: list[MqttSession] = []
    yield opened
    for session in opened:
        session.disconnect()


def open_session(opened: list[MqttSession], settings: MqttSettings, **kwargs: object) -> MqttSession:
    session = MqttSession(settings, **kwargs)  # type: ignore[arg-type]
    opened.append(session)
    session.connect()
    assert session.wait_connected(10), f"no connection to {settings.host}:{settings.port}"
    return session


def subscribed(session: MqttSession, topic_filter: str) -> Inbox:
    """Subscribe and wait for the SUBACK round trip (a QoS 1 ping through the same filter is overkill)."""
    inbox = Inbox()
    session.subscribe(topic_filter, inbox, qos=1)
    time.sleep(0.2)
    return inbox


def test_properties_arrive_intact_and_publish_is_acked(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    receiver = open_session(sessions, settings_for(mqtt_broker, "receiver"))
    sender = open_session(sessions, settings_for(mqtt_broker, "sender"))
    inbox = subscribed(receiver, "t/props/#")
    sent = MessageProperties(
        content_type="image/jpeg",
        correlation_data=b"\x00det-1\xff",
        response_topic="t/props/refined",
        user_properties=(("msg_id", "01J0000000000000000000000"), ("label", "dog"), ("label", "dup key ok")),
    )

    handle = sender.publish("t/props/crops", b"\xff\xd8jpeg", qos=1, properties=sent)

    assert handle.wait(5), f"no PUBACK: error={handle.error} reason={handle.reason_code}"
    assert inbox.wait_for(lambda msgs: len(msgs) == 1)
    received = inbox.messages[0]
    assert (received.topic, received.payload, received.qos) == ("t/props/crops", b"\xff\xd8jpeg", 1)
    assert received.properties == sent


def test_handler_exception_is_logged_and_the_loop_keeps_running(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = open_session(sessions, settings_for(mqtt_broker, "fragile"))
    sender = open_session(sessions, settings_for(mqtt_broker, "sender"))
    inbox = Inbox()

    def explode_on_first(message: Message) -> None:
        inbox(message)
        if message.payload == b"first":
            raise RuntimeError("handler bug")

    receiver.subscribe("t/fragile", explode_on_first)
    time.sleep(0.2)
    sender.publish("t/fragile", b"first").wait(5)
    sender.publish("t/fragile", b"second").wait(5)

    assert inbox.wait_for(lambda msgs: len(msgs) == 2), inbox.payloads()
    assert receiver.connected
    assert "handler bug" in caplog.text


def test_routing_follows_subscribe_and_unsubscribe_after_topics_were_seen(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    """The topic -> handlers match is cached; a new or dropped subscription must still take effect."""
    receiver = open_session(sessions, settings_for(mqtt_broker, "router"))
    sender = open_session(sessions, settings_for(mqtt_broker, "sender"))
    wide = subscribed(receiver, "t/route/#")
    sender.publish("t/route/cam-1", b"1", qos=1).wait(5)
    assert wide.wait_for(lambda msgs: len(msgs) == 1)

    receiver.unsubscribe("t/route/#")
    narrow = subscribed(receiver, "t/route/+")
    sender.publish("t/route/cam-1", b"2", qos=1).wait(5)

    assert narrow.wait_for(lambda msgs: len(msgs) == 1)
    time.sleep(0.2)
    assert wide.payloads() == [b"1"]
    assert narrow.payloads() == [b"2"]


def test_shared_subscription_routes_to_its_handler(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    receiver = open_session(sessions, settings_for(mqtt_broker, "refiner"))
    sender = open_session(sessions, settings_for(mqtt_broker, "device"))
    inbox = subscribed(receiver, "$share/refiners/t/share/+/crops")

    sender.publish("t/share/cam-1/crops", b"crop").wait(5)

    assert inbox.wait_for(lambda msgs: len(msgs) == 1)
    assert inbox.messages[0].topic == "t/share/cam-1/crops"


def test_qos1_published_while_disconnected_is_sent_after_reconnect(
    private_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    receiver = open_session(sessions, settings_for(private_broker, "receiver"))
    sender = open_session(sessions, settings_for(private_broker, "sender"))
    inbox = subscribed(receiver, "t/queued")

    private_broker.stop()
    deadline = time.monotonic() + 5
    while sender.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not sender.connected
    handle = sender.publish("t/queued", b"while-down", qos=1)
    assert not handle.done  # paho keeps it in memory until a PUBACK
    private_broker.start()

    assert handle.wait(10), f"not acked after reconnect: {handle.error} {handle.reason_code}"
    assert inbox.wait_for(lambda msgs: b"while-down" in [m.payload for m in msgs])
    assert sender.connect_count == 2


def test_messages_beyond_the_window_go_out_in_order_also_after_a_broker_restart(
    private_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    """paho keeps `max_inflight` on the wire and queues the rest; `_Client` sends the next queued one on
    each PUBACK from its own queue, which holds nothing stale after a reconnect."""
    receiver = open_session(sessions, settings_for(private_broker, "receiver"))
    sender = open_session(sessions, settings_for(private_broker, "sender", max_inflight=5))
    inbox = subscribed(receiver, "t/window")

    live = [b"live-%03d" % i for i in range(200)]
    handles = [sender.publish("t/window", payload, qos=1) for payload in live]
    assert all(handle.wait(10) for handle in handles)
    assert {handle.reason_code for handle in handles} == {0}
    assert inbox.wait_for(lambda msgs: len(msgs) >= len(live))
    assert inbox.payloads() == live

    private_broker.stop()
    deadline = time.monotonic() + 5
    while sender._client.socket() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not sender.connected
    # No socket: paho marks each "to publish", and (2.2) sends them all after the CONNACK.
    offline = [b"offline-%03d" % i for i in range(60)]
    handles = [sender.publish("t/window", payload, qos=1) for payload in offline]
    private_broker.start()

    assert all(handle.wait(10) for handle in handles), [h.reason_code for h in handles if not h.ok]
    assert inbox.wait_for(lambda msgs: {b"offline-059"} <= {m.payload for m in msgs})
    # first arrivals: a resend may repeat one (and the broker re-deliver the receiver's last few)
    arrived = list(dict.fromkeys(p for p in inbox.payloads() if p.startswith(b"offline")))
    assert arrived == offline
    assert not sender._client._queued  # nothing left waiting, nothing stale kept alive


def test_a_puback_reason_code_reaches_the_handle(
    mqtt_broker: MosquittoBroker, sessions: list[MqttSession]
) -> None:
    """Mosquitto answers a publish nobody subscribed to with 0x10 (no matching subscribers): a success."""
    sender = open_session(sessions, settings_for(mqtt_broker, "sender"))
    handle = sender.publish("t/nobody-listens", b"x", qos=1)
    assert handle.wait(5)
    assert handle.reason_code == 0x10


def test_a_message_over_the_brokers_size_limit_is_refused_and_the_link_stays(tmp_path: Path) -> None:
    """Mosquitto 2.0 answers it with a PUBACK carrying 0x95, a code MQTT 5 lists for other packets only."""
    broker = MosquittoBroker(tmp_path / "broker", message_size_limit=1_000).start()
    session = MqttSession(settings_for(broker, "big"))
    try:
        session.connect()
        assert session.wait_connected(10)
        too_large = session.publish("t/big", bytes(2_000), qos=1)
        assert not too_large.wait(5)
        assert (too_large.done, too_large.reason_code) == (True, 0x95)
        assert session.publish("t/small", b"fits", qos=1).wait(5)
        assert session.connect_count == 1  # no reconnect, no endless re-send
    finally:
        session.disconnect()
        broker.stop()


def test_plain_pubacks_are_read_without_paho_and_the_rest_left_to_it() -> None:
    assert _plain_puback_reason(bytearray(b"\x00\x07")).value == 0  # type: ignore[union-attr]
    assert _plain_puback_reason(bytearray(b"\x00\x07\x10")).value == 0x10  # type: ignore[union-attr]
    assert _plain_puback_reason(bytearray(b"\x00\x07\x87\x00")).value == 0x87  # type: ignore[union-attr]
    assert _plain_puback_reason(bytearray(b"\x00\x07\x87\x03\x1f\x00\x00")) is None  # a reason string
    assert _plain_puback_reason(bytearray(b"\x00\x07\x05")) is None  # no such reason: paho reports it
    assert _plain_puback_reason(bytearray(b"\x00\x07\x95")).value == 0x95  # type: ignore[union-attr]
    assert _plain_puback_reason(bytearray(b"\x00\x07\x10")) is _plain_puback_reason(
        bytearray(b"\x00\x09\x10")
    )


def test_publish_properties_are_packed_once_and_again_after_a_change() -> None:
    props = MessageProperties(content_type="application/json", user_properties=(("k", "v"),)).to_paho()
    assert props is not None
    plain = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    plain.ContentType, plain.UserProperty = "application/json", [("k", "v")]
    assert props.pack() == plain.pack()  # type: ignore[no-untyped-call]
    assert props.pack() is props.pack()  # type: ignore[no-untyped-call]
    copy: Any = _PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    copy.ContentType = "text/plain"
    before = copy.pack()
    copy.ContentType = "application/json"
    assert copy.pack() != before
    del copy.ContentType
    assert copy.pack() == b"\x00"


def test_persistent_session_keeps_messages_published_while_the_consumer_was_away(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    consumer_settings = settings_for(mqtt_broker, "fleet")
    consumer = MqttSession(consumer_settings)
    consumer.subscribe("t/away", Inbox(), qos=1)
    consumer.connect()
    assert consumer.wait_connected(10)
    time.sleep(0.2)
    consumer.disconnect()  # session expiry 300 s: the broker keeps the subscription and queues for it
    sender = open_session(sessions, settings_for(mqtt_broker, "device"))
    for i in range(5):
        assert sender.publish("t/away", f"m{i}".encode()).wait(5)

    inbox = Inbox()
    again = MqttSession(consumer_settings)
    again.subscribe("t/away", inbox, qos=1)
    sessions.append(again)
    again.connect()

    assert again.wait_connected(10)
    assert inbox.wait_for(lambda msgs: len(msgs) == 5), inbox.payloads()
    assert again.session_present
    assert sorted(inbox.payloads()) == [f"m{i}".encode() for i in range(5)]


def test_birth_is_published_again_and_subscriptions_restored_when_the_broker_lost_the_session(
    private_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    connects = count(1)
    birth = lambda: OutgoingMessage("t/dev/status", f"online {next(connects)}".encode())  # noqa: E731
    device = open_session(sessions, settings_for(private_broker, "device"), birth=birth)
    commands = subscribed(device, "t/dev/cmd/#")

    private_broker.kill()
    for leftover in (private_broker.workdir / "data").iterdir():  # the broker comes back with no sessions
        leftover.unlink()
    private_broker.start()
    deadline = time.monotonic() + 10
    while device.connect_count < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert device.connect_count == 2
    assert not device.session_present
    time.sleep(0.2)  # the SUBSCRIBE sent on connect
    observer = open_session(sessions, settings_for(private_broker, "observer"))
    status = subscribed(observer, "t/dev/status")
    observer.publish("t/dev/cmd/reboot", b"now").wait(5)

    assert commands.wait_for(lambda msgs: any(m.topic == "t/dev/cmd/reboot" for m in msgs))
    assert status.wait_for(lambda msgs: len(msgs) >= 1)
    assert status.messages[-1].payload == b"online 2"
    assert status.messages[-1].retain


_DOOMED_CLIENT = textwrap.dedent(
    """
    import sys, time
    from fleet_protocol.mqtt import MqttSession, MqttSettings, OutgoingMessage
    host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    settings = MqttSettings(host=host, port=port, client_id="doomed-device", keepalive_s=2)
    session = MqttSession(
        settings,
        will=OutgoingMessage(topic, b"offline"),
        birth=OutgoingMessage(topic, b"online"),
    )
    session.connect()
    if not session.wait_connected(10):
        sys.exit("no connection")
    print("connected", flush=True)
    time.sleep(60)
    """
)


def test_will_is_retained_offline_after_the_client_is_killed(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    topic = "t/doomed/status"
    observer = open_session(sessions, settings_for(mqtt_broker, "observer"))
    live = subscribed(observer, topic)
    child = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_CLIENT, mqtt_broker.host, str(mqtt_broker.port), topic],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "connected"
        assert live.wait_for(lambda msgs: [m.payload for m in msgs] == [b"online"])
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert live.wait_for(lambda msgs: len(msgs) == 2), live.payloads()
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert live.messages[1].payload == b"offline"
    late = subscribed(open_session(sessions, settings_for(mqtt_broker, "late")), topic)
    assert late.wait_for(lambda msgs: len(msgs) == 1)
    assert (late.messages[0].payload, late.messages[0].retain) == (b"offline", True)


@pytest.mark.parametrize("publish_will", [False, True])
def test_clean_disconnect_suppresses_the_will_unless_asked(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
    publish_will: bool,
) -> None:
    topic = f"t/leaving-{publish_will}/status"
    observer = open_session(sessions, settings_for(mqtt_broker, "observer"))
    inbox = subscribed(observer, topic)
    leaving = MqttSession(
        settings_for(mqtt_broker, "leaving"), will=OutgoingMessage(topic, b"offline", retain=False)
    )
    leaving.connect()
    assert leaving.wait_connected(10)

    leaving.disconnect(publish_will=publish_will)

    time.sleep(0.5)
    assert inbox.payloads() == ([b"offline"] if publish_will else [])


def test_abort_drops_the_link_without_disconnect_so_the_will_fires(
    mqtt_broker: MosquittoBroker,
    sessions: list[MqttSession],
) -> None:
    topic = "t/aborted/status"
    observer = open_session(sessions, settings_for(mqtt_broker, "observer"))
    inbox = subscribed(observer, topic)
    session = MqttSession(settings_for(mqtt_broker, "aborted"), will=OutgoingMessage(topic, b"offline"))
    session.connect()
    assert session.wait_connected(10)

    session.abort()

    assert inbox.wait_for(lambda msgs: len(msgs) == 1)
    assert inbox.messages[0].payload == b"offline"
    assert not session.connected


def test_a_backlog_arrives_intact_and_ack_many_acknowledges_only_what_this_link_received(
    private_broker: MosquittoBroker,
) -> None:
    """A backlog of small messages, some with properties and one larger than a socket read, arrives intact
    and in order; `ack_many` acks a batch in one call; what it acked never comes back, the rest does."""
    settings = settings_for(private_broker, "fleet", manual_ack=True, receive_maximum=1000)
    inbox = Inbox()
    consumer = MqttSession(settings)
    consumer.subscribe("t/backlog/#", inbox, qos=1)
    consumer.connect()
    assert consumer.wait_connected(10)
    time.sleep(0.2)
    consumer.disconnect()  # the broker keeps the session and queues the backlog for it
    sender = MqttSession(settings_for(private_broker, "device", max_inflight=200))
    sender.connect()
    assert sender.wait_connected(10)
    crop = MessageProperties(content_type="image/jpeg", user_properties=(("det_id", "d-1"),))
    backlog = [(f"t/backlog/cam-{i % 3}/detections", b"%04d" % i, MessageProperties()) for i in range(300)]
    backlog[7] = ("t/backlog/cam-1/crops", b"\xff\xd8" + bytes(200_000), crop)  # more than one socket read
    backlog[20] = ("t/backlog/cam-2/crops", b"\xff\xd8small", crop)
    handles = [sender.publish(topic, payload, qos=1, properties=props) for topic, payload, props in backlog]
    assert all(handle.wait(10) for handle in handles)
    sender.disconnect()

    consumer.connect()
    assert inbox.wait_for(lambda msgs: len(msgs) == len(backlog), 15), len(inbox.messages)
    assert [(m.topic, m.payload, m.properties) for m in inbox.messages] == backlog
    assert {(m.qos, m.connection) for m in inbox.messages} == {(1, 2)}
    assert consumer.ack_many(inbox.messages[:250])
    time.sleep(0.5)  # the PUBACKs reach the broker
    consumer.abort()  # a crash: the last 50 were never acknowledged
    assert not consumer.ack_many(inbox.messages[250:])  # not connected: not ours to ack any more

    consumer.connect()
    assert inbox.wait_for(lambda msgs: len(msgs) == len(backlog) + 50, 15), len(inbox.messages)
    redelivered = inbox.messages[len(backlog) :]
    assert [m.payload for m in redelivered] == [payload for _, payload, _ in backlog[250:]]
    assert not consumer.ack_many(inbox.messages[250:300])  # received on the link before: skipped
    assert consumer.ack_many(redelivered)
    time.sleep(0.5)
    consumer.disconnect()

    after = Inbox()
    again = MqttSession(settings)
    again.subscribe("t/backlog/#", after, qos=1)
    again.connect()
    assert again.wait_connected(10)
    time.sleep(1.0)
    again.disconnect()
    assert after.messages == []  # everything was acknowledged: nothing comes back


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(0.5, 8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert all(cap / 2 <= delay <= cap for delay, cap in zip(delays, caps, strict=True)), delays
    many = [Backoff(0.5, 8.0).next_delay() for _ in range(50)]
    assert len(set(many)) > 40  # a fleet reconnecting at once spreads out
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_settings_reject_nonsense_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="port"):
        MqttSettings(client_id="x", port=0)
    with pytest.raises(ValueError, match="client_id"):
        MqttSettings(client_id="")

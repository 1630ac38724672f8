"""What the refiner relies on in fleet_protocol's MqttSession: manual acks, the client's Receive Maximum."""

from __future__ import annotations

import time

from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import Message, MqttSession, MqttSettings
from tests.broker import Inbox, MosquittoBroker

TOPIC_FILTER = "$share/refiners/t/+/crops"


def consumer(broker: MosquittoBroker, client_id: str, inbox: Inbox, receive_maximum: int) -> MqttSession:
    session = MqttSession(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            manual_ack=True,
            receive_maximum=receive_maximum,
            session_expiry_s=60,
        )
    )
    session.subscribe(TOPIC_FILTER, inbox)
    session.connect()
    assert session.wait_connected(10)
    return session


def test_unacked_messages_are_bounded_by_receive_maximum_and_redelivered(
    private_broker: MosquittoBroker,
) -> None:
    client_id = f"refiner-{new_msg_id()[-8:]}"
    held = Inbox()
    first = consumer(private_broker, client_id, held, receive_maximum=3)
    publisher = MqttSession(MqttSettings(host=private_broker.host, port=private_broker.port, client_id="pub"))
    publisher.connect()
    assert publisher.wait_connected(10)
    time.sleep(0.3)  # let the subscription settle
    for index in range(8):
        assert publisher.publish("t/dev/crops", str(index).encode(), qos=1).wait(10)
    assert held.wait_for(lambda m: len(m) >= 3, 10)
    time.sleep(0.5)
    assert [m.payload for m in held.messages] == [b"0", b"1", b"2"]  # the broker waits for our acks
    stale: Message = held.messages[0]
    first.abort()  # a crash: nothing was acknowledged
    assert not first.ack(stale)  # not connected: not ours to ack any more

    again = Inbox()
    second = consumer(private_broker, client_id, again, receive_maximum=100)
    assert again.wait_for(lambda m: len(m) >= 8, 15)
    assert [m.payload for m in again.messages] == [str(i).encode() for i in range(8)]
    for message in again.messages:
        assert second.ack(message)
    second.disconnect()

    after = Inbox()
    third = consumer(private_broker, client_id, after, receive_maximum=100)
    time.sleep(1.0)
    assert after.messages == []  # everything was acknowledged: nothing comes back
    third.disconnect()
    publisher.disconnect()

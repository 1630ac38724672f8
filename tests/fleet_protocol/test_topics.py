"""The topic tree: builders, subscriptions and the parser, checked against paho's own filter matching."""

from __future__ import annotations

import dataclasses

import pytest
from paho.mqtt.client import topic_matches_sub

from fleet_protocol.errors import TopicError
from fleet_protocol.topics import (
    DEFAULT_ROOT,
    DELIVERY,
    ParsedTopic,
    TopicKind,
    Topics,
    parse_topic,
    validate_device_id,
)

TOPICS = Topics()
DEVICE = "jetson-07.lab_A"


def all_device_topics(topics: Topics, device_id: str) -> dict[TopicKind, str]:
    built: dict[TopicKind, str] = {}
    for kind in TopicKind:
        if kind is not TopicKind.CMD:
            built[kind] = topics.device_topic(device_id, kind)
    built[TopicKind.CMD] = topics.cmd(device_id, "reboot")
    return built


def test_builders_follow_the_contract_table() -> None:
    prefix = f"edgefleet/v1/devices/{DEVICE}"
    assert TOPICS.status(DEVICE) == f"{prefix}/status"
    assert TOPICS.telemetry(DEVICE) == f"{prefix}/telemetry"
    assert TOPICS.detections(DEVICE) == f"{prefix}/detections"
    assert TOPICS.crops(DEVICE) == f"{prefix}/crops"
    assert TOPICS.refined(DEVICE) == f"{prefix}/refined"
    assert TOPICS.model_desired(DEVICE) == f"{prefix}/model/desired"
    assert TOPICS.model_reported(DEVICE) == f"{prefix}/model/reported"
    assert TOPICS.cmd(DEVICE, "ota/retry") == f"{prefix}/cmd/ota/retry"
    assert TOPICS.cmd_filter(DEVICE) == f"{prefix}/cmd/#"
    assert TOPICS.fleet_subscription() == "edgefleet/v1/devices/+/#"
    assert TOPICS.refiner_shared_subscription() == "$share/refiners/edgefleet/v1/devices/+/crops"


def test_custom_root_is_used_everywhere() -> None:
    topics = Topics("acme/site-3/v1")
    assert topics.status("cam1") == "acme/site-3/v1/devices/cam1/status"
    assert topics.fleet_subscription() == "acme/site-3/v1/devices/+/#"
    assert topics.refiner_shared_subscription("gpu") == "$share/gpu/acme/site-3/v1/devices/+/crops"
    assert topics.parse("acme/site-3/v1/devices/cam1/refined") == ParsedTopic("cam1", TopicKind.REFINED)
    with pytest.raises(TopicError, match="outside the contract"):
        topics.parse(TOPICS.status("cam1"))


@pytest.mark.parametrize("kind", list(TopicKind))
def test_parse_inverts_every_builder(kind: TopicKind) -> None:
    topic = all_device_topics(TOPICS, DEVICE)[kind]
    parsed = parse_topic(topic)
    assert (parsed.device_id, parsed.kind) == (DEVICE, kind)
    assert parsed.command == ("reboot" if kind is TopicKind.CMD else None)


def test_fleet_subscription_matches_every_device_topic_and_nothing_outside() -> None:
    for topic in all_device_topics(TOPICS, DEVICE).values():
        assert topic_matches_sub(TOPICS.fleet_subscription(), topic)
    assert not topic_matches_sub(TOPICS.fleet_subscription(), "edgefleet/v2/devices/a/status")
    assert not topic_matches_sub(TOPICS.fleet_subscription(), "other/v1/devices/a/status")


def test_refiner_shared_subscription_matches_crops_only() -> None:
    shared = TOPICS.refiner_shared_subscription()
    group, filter_ = shared.split("/", 2)[1:]
    assert group == "refiners"
    matched = [
        kind for kind, topic in all_device_topics(TOPICS, DEVICE).items() if topic_matches_sub(filter_, topic)
    ]
    assert matched == [TopicKind.CROPS]


def test_device_subscriptions_reach_only_its_own_inbound_topics() -> None:
    own = TOPICS.device_subscriptions(DEVICE)
    mine = all_device_topics(TOPICS, DEVICE)
    theirs = all_device_topics(TOPICS, "other-device")
    reachable = {kind for kind, topic in mine.items() if any(topic_matches_sub(sub, topic) for sub in own)}
    assert reachable == {TopicKind.MODEL_DESIRED, TopicKind.REFINED, TopicKind.CMD}
    assert not any(topic_matches_sub(sub, topic) for sub in own for topic in theirs.values())


def test_delivery_settings_cover_every_kind() -> None:
    assert set(DELIVERY) == set(TopicKind)
    retained = {kind for kind, delivery in DELIVERY.items() if delivery.retain}
    assert retained == {TopicKind.STATUS, TopicKind.MODEL_DESIRED, TopicKind.MODEL_REPORTED}
    assert DELIVERY[TopicKind.TELEMETRY].qos == 0
    assert all(d.qos == 1 for kind, d in DELIVERY.items() if kind is not TopicKind.TELEMETRY)


@pytest.mark.parametrize("device_id", ["a", "A" * 64, "cam-01", "rpi_4.kitchen", "0"])
def test_valid_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    assert parse_topic(TOPICS.status(device_id)).device_id == device_id


@pytest.mark.parametrize(
    "device_id",
    ["", "A" * 65, "a/b", "a+b", "a#", "+", "#", " cam", "cam 1", ".", "..", "-cam", "caméra", "a\x00"],
)
def test_invalid_device_ids_are_refused_by_builders(device_id: str) -> None:
    with pytest.raises(TopicError, match="invalid device id"):
        TOPICS.status(device_id)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("edgefleet/v1/devices/cam1/unknown", "unknown kind 'unknown'"),
        ("edgefleet/v1/devices/cam1/status/", "unknown kind 'status/'"),
        ("edgefleet/v1/devices/cam1/model", "unknown kind 'model'"),
        ("edgefleet/v1/devices/cam1", "unknown kind ''"),
        ("edgefleet/v1/devices/cam1/cmd/", "invalid command"),
        ("edgefleet/v1/devices/cam1/cmd/a//b", "invalid command"),
        ("edgefleet/v1/devices//status", "invalid device id ''"),
        ("edgefleet/v1/devices/+/status", "subscription filter"),
        ("edgefleet/v1/devices/cam1/#", "subscription filter"),
        ("edgefleet/v2/devices/cam1/status", "outside the contract"),
        ("/edgefleet/v1/devices/cam1/status", "outside the contract"),
        ("$SYS/broker/uptime", "outside the contract"),
        ("edgefleet/v1/cam1/status", "outside the contract"),
    ],
)
def test_parse_rejects_topics_outside_the_tree(topic: str, reason: str) -> None:
    with pytest.raises(TopicError, match="topic") as caught:
        parse_topic(topic)
    assert reason in str(caught.value)
    assert repr(topic) in str(caught.value)


@pytest.mark.parametrize(
    "root", ["", "/edgefleet", "edgefleet/", "edgefleet//v1", "$SYS", "a/+/b", "a/#", "a b"]
)
def test_invalid_roots_are_refused(root: str) -> None:
    with pytest.raises(TopicError, match="invalid topic root"):
        Topics(root)


def test_commands_and_share_groups_are_validated() -> None:
    with pytest.raises(TopicError, match="needs a command"):
        TOPICS.device_topic(DEVICE, TopicKind.CMD)
    with pytest.raises(TopicError, match="only cmd topics"):
        TOPICS.device_topic(DEVICE, TopicKind.STATUS, "reboot")
    with pytest.raises(TopicError, match="invalid command"):
        TOPICS.cmd(DEVICE, "#")
    with pytest.raises(TopicError, match="shared-subscription group"):
        TOPICS.refiner_shared_subscription("a/b")


def test_topics_is_frozen_and_defaults_to_v1() -> None:
    assert Topics().root == DEFAULT_ROOT == "edgefleet/v1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        TOPICS.root = "x"  # type: ignore[misc]

"""The topic tree of the MQTT contract v1: builders, subscriptions, delivery settings and a parser.

Every device topic lives under ``{root}/devices/{device_id}/`` (root ``edgefleet/v1`` unless configured).
Builders validate what they are given, so a bad device id fails where it is made, not at the broker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from fleet_protocol.errors import TopicError

DEFAULT_ROOT = "edgefleet/v1"
DEFAULT_SHARE_GROUP = "refiners"

# Letters, digits, '-', '_', '.'; 1-64 characters, the first a letter or digit (so never '.', '..' or
# something that reads as a CLI option: device ids also name files and directories).
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_COMMAND_CHARS = 128
_MAX_ROOT_CHARS = 128


class TopicKind(str, Enum):
    """What a device topic carries; the value is the topic suffix after ``devices/{device_id}/``."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    DETECTIONS = "detections"
    CROPS = "crops"
    REFINED = "refined"
    MODEL_DESIRED = "model/desired"
    MODEL_REPORTED = "model/reported"
    CMD = "cmd"


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a topic is published: MQTT QoS and the retain flag."""

    qos: int
    retain: bool


DELIVERY: Mapping[TopicKind, Delivery] = MappingProxyType(
    {
        TopicKind.STATUS: Delivery(qos=1, retain=True),
        TopicKind.TELEMETRY: Delivery(qos=0, retain=False),
        TopicKind.DETECTIONS: Delivery(qos=1, retain=False),
        TopicKind.CROPS: Delivery(qos=1, retain=False),
        TopicKind.REFINED: Delivery(qos=1, retain=False),
        TopicKind.MODEL_DESIRED: Delivery(qos=1, retain=True),
        TopicKind.MODEL_REPORTED: Delivery(qos=1, retain=True),
        TopicKind.CMD: Delivery(qos=1, retain=False),
    }
)

_KIND_OF_SUFFIX = {kind.value: kind for kind in TopicKind if kind is not TopicKind.CMD}
_KIND_LIST = ", ".join([*_KIND_OF_SUFFIX, "cmd/<command>"])


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A device topic taken apart; `command` is the part after ``cmd/`` for command topics, else None."""

    device_id: str
    kind: TopicKind
    command: str | None = None


def validate_device_id(device_id: str) -> str:
    """Return `device_id` unchanged if it is a valid device id, else raise TopicError saying why."""
    if not isinstance(device_id, str) or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise TopicError(
            f"invalid device id {device_id!r}: use 1-64 characters from letters, digits, '-', '_' and '.', "
            "starting with a letter or digit (no '/', '+', '#', spaces)"
        )
    return device_id


def validate_command(command: str) -> str:
    """Return `command` (e.g. ``reboot`` or ``ota/retry``) if it is a valid command name, else raise."""
    if (
        not isinstance(command, str)
        or len(command) > _MAX_COMMAND_CHARS
        or not all(_SEGMENT_RE.fullmatch(level) for level in command.split("/"))
    ):
        raise TopicError(
            f"invalid command {command!r}: use one or more '/'-separated levels of letters, digits, '-', '_' "
            f"and '.', each starting with a letter or digit, at most {_MAX_COMMAND_CHARS} characters"
        )
    return command


def _validate_root(root: str) -> None:
    if len(root) > _MAX_ROOT_CHARS or not all(_SEGMENT_RE.fullmatch(level) for level in root.split("/")):
        raise TopicError(
            f"invalid topic root {root!r}: use '/'-separated levels of letters, digits, '-', '_' and '.' "
            f"(e.g. {DEFAULT_ROOT!r}), no wildcards, no leading '$' or '/', "
            f"at most {_MAX_ROOT_CHARS} characters"
        )


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree under one root; `Topics()` is the default ``edgefleet/v1`` tree."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        _validate_root(self.root)

    def device_prefix(self, device_id: str) -> str:
        """``{root}/devices/{device_id}`` (no trailing slash)."""
        return f"{self.root}/devices/{validate_device_id(device_id)}"

    def device_topic(self, device_id: str, kind: TopicKind, command: str | None = None) -> str:
        """The topic of `kind` for one device; command topics need `command`, the others refuse one."""
        if kind is TopicKind.CMD:
            if command is None:
                raise TopicError("a cmd topic needs a command name, e.g. 'reboot' (or use cmd_filter())")
            return f"{self.device_prefix(device_id)}/cmd/{validate_command(command)}"
        if command is not None:
            raise TopicError(f"only cmd topics take a command, not {kind.value!r}")
        return f"{self.device_prefix(device_id)}/{kind.value}"

    def status(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.STATUS)

    def telemetry(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.TELEMETRY)

    def detections(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.DETECTIONS)

    def crops(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.CROPS)

    def refined(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.REFINED)

    def model_desired(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.MODEL_DESIRED)

    def model_reported(self, device_id: str) -> str:
        return self.device_topic(device_id, TopicKind.MODEL_REPORTED)

    def cmd(self, device_id: str, command: str) -> str:
        return self.device_topic(device_id, TopicKind.CMD, command)

    def cmd_filter(self, device_id: str) -> str:
        """``{root}/devices/{device_id}/cmd/#``: every command for one device."""
        return f"{self.device_prefix(device_id)}/cmd/#"

    def device_subscriptions(self, device_id: str) -> tuple[str, ...]:
        """What a device agent subscribes to: its desired model, refined labels and commands."""
        return (self.model_desired(device_id), self.refined(device_id), self.cmd_filter(device_id))

    def fleet_subscription(self) -> str:
        """The fleet manager's filter: ``{root}/devices/+/#``."""
        return f"{self.root}/devices/+/#"

    def refiner_shared_subscription(self, group: str = DEFAULT_SHARE_GROUP) -> str:
        """The refiners' shared filter ``$share/{group}/{root}/devices/+/crops``: replicas split the load."""
        if _SEGMENT_RE.fullmatch(group) is None:
            raise TopicError(f"invalid shared-subscription group {group!r} (letters, digits, -, _, .)")
        return f"$share/{group}/{self.root}/devices/+/{TopicKind.CROPS.value}"

    def parse(self, topic: str) -> ParsedTopic:
        """Take a concrete device topic apart; raise TopicError for anything outside this tree."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is outside the contract: expected {prefix}<device_id>/<kind>")
        if "+" in topic or "#" in topic:
            raise TopicError(f"topic {topic!r} is a subscription filter, not a topic a message arrives on")
        device_id, _, suffix = topic[len(prefix) :].partition("/")
        try:
            validate_device_id(device_id)
            if suffix.startswith("cmd/"):
                return ParsedTopic(device_id, TopicKind.CMD, validate_command(suffix[len("cmd/") :]))
        except TopicError as error:
            raise TopicError(f"topic {topic!r}: {error}") from None
        kind = _KIND_OF_SUFFIX.get(suffix)
        if kind is None:
            raise TopicError(f"topic {topic!r} has unknown kind {suffix!r}: expected one of {_KIND_LIST}")
        return ParsedTopic(device_id, kind)


DEFAULT_TOPICS = Topics()


def parse_topic(topic: str, root: str = DEFAULT_ROOT) -> ParsedTopic:
    """Take a concrete device topic under `root` apart (see `Topics.parse`)."""
    topics = DEFAULT_TOPICS if root == DEFAULT_ROOT else Topics(root)
    return topics.parse(topic)

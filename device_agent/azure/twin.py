"""What the Azure transport keeps of the twin, without the SDK: desired properties and pending reported ones.

Twin names (fixed, documented in docs/azure.md):
- desired `model`: a `model/desired` payload (the envelope fields may be left out; null or absent: no model);
- reported `model`: the latest `model/reported` payload; reported `status`: the latest `status` payload.

IoT Hub changes a twin with JSON merge patches (RFC 7386): objects merge key by key and null deletes a key,
so a desired patch may carry only the leaves that changed. `DesiredProperties` therefore keeps the whole
desired document, replaced by each full twin read and merged with each patch, ordered by `$version`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any

from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import AckCallback, PublishHandle
from fleet_protocol.payloads import ModelDesired, utc_now
from fleet_protocol.topics import TopicKind

MODEL_PROPERTY = "model"
STATUS_PROPERTY = "status"
# Topics whose retained MQTT payload becomes a reported property (the twin keeps the latest, like retain).
REPORTED_PROPERTY: Mapping[TopicKind, str] = {
    TopicKind.MODEL_REPORTED: MODEL_PROPERTY,
    TopicKind.STATUS: STATUS_PROPERTY,
}
_DESIRED_SCHEMA = ModelDesired.model_fields["schema_name"].default
_MSG_ID = re.compile(rb'"msg_id":"([0-9A-HJKMNP-TV-Z]{26})"')
_MSG_ID_SEARCH_BYTES = 512  # the envelope comes first in every payload


class HubPublish(PublishHandle):
    """A publish handle the Azure session settles when the hub acknowledges (or refuses) the message."""

    __slots__ = ()

    def __init__(self, mid: int, qos: int, on_ack: AckCallback | None) -> None:
        super().__init__(mid, qos, on_ack)

    def settle(self, error: str | None = None) -> None:
        """Done: accepted (reason 0) when `error` is None, else not delivered for the reason given."""
        self._complete(None if error else 0, error)


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`target` changed by a twin patch, in place: objects merge, null deletes, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = _plain(value)
    return target


def _plain(value: Any) -> Any:
    """A copy without null members (a null in a patch deletes, so it never lands in the document)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    return value


def _without_metadata(section: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in section.items() if not key.startswith("$")}


class DesiredProperties:
    """The twin's desired properties as this device last heard them; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._document: dict[str, Any] = {}
        self._version: int | None = None

    @property
    def version(self) -> int | None:
        return self._version

    def apply_twin(self, desired: Mapping[str, Any]) -> bool:
        """A full read of the desired section; False if it is older than what a patch already brought."""
        version = desired.get("$version")
        with self._lock:
            if isinstance(version, int) and self._version is not None and version < self._version:
                return False
            self._document = merge_patch({}, _without_metadata(desired))
            self._version = version if isinstance(version, int) else self._version
            return True

    def apply_patch(self, patch: Mapping[str, Any]) -> bool:
        """A desired-properties patch; False if its `$version` was already seen (a full read covered it)."""
        version = patch.get("$version")
        with self._lock:
            if isinstance(version, int) and self._version is not None and version <= self._version:
                return False
            merge_patch(self._document, _without_metadata(patch))
            self._version = version if isinstance(version, int) else self._version
            return True

    def get(self, key: str) -> Any:
        with self._lock:
            return json.loads(json.dumps(self._document.get(key)))  # a copy the caller may keep


def desired_model_payload(value: Any, device_id: str) -> bytes:
    """The `model/desired` payload for the twin's desired `model` value: empty (clears) for None.

    A deployment sets one desired model for many devices, so the twin may leave out the envelope: it gets
    this device's id, the current time and a fresh msg_id (the OTA manager compares the model itself).
    """
    if value is None:
        return b""
    if isinstance(value, dict):
        value = {
            "schema": _DESIRED_SCHEMA,
            "msg_id": new_msg_id(),
            "device_id": device_id,
            "ts": utc_now().isoformat(),
            **value,
        }
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def message_id_of(payload: bytes) -> str | None:
    """The envelope's msg_id of a JSON payload (it leads the payload), or None."""
    found = _MSG_ID.search(payload, 0, _MSG_ID_SEARCH_BYTES)
    return found[1].decode("ascii") if found else None


class ReportedProperties:
    """Reported properties waiting to be patched: the latest value per name wins, like a retained topic.

    Every wait ends with one patch of everything waiting, so a value replaced before it was sent settles
    with the one that replaced it (the twin never holds the older one, as a retained topic would not).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self._handles: list[HubPublish] = []

    def put(self, name: str, value: Any, handle: HubPublish) -> None:
        with self._lock:
            self._values[name] = value
            self._handles.append(handle)

    def take(self) -> tuple[dict[str, Any], list[HubPublish]] | None:
        """Everything waiting, as one patch and the handles it settles; None when nothing waits."""
        with self._lock:
            if not self._values:
                return None
            patch, self._values = self._values, {}
            handles, self._handles = self._handles, []
            return patch, handles

    def give_back(self, patch: dict[str, Any], handles: list[HubPublish]) -> None:
        """A patch that failed: its values wait again, unless a newer value for the name came meanwhile."""
        with self._lock:
            self._values = {**patch, **self._values}
            self._handles = handles + self._handles

    def fail_all(self, why: str) -> None:
        """Nothing more will be sent (shutdown): settle every waiting handle as not delivered."""
        with self._lock:
            handles, self._handles = self._handles, []
            self._values.clear()
        for handle in handles:
            handle.settle(why)

"""The errors of the MQTT contract: one type per kind of input, each message says what was wrong."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every contract error (a ValueError, so callers that catch bad input keep working)."""


class TopicError(ProtocolError):
    """A topic, topic root, device id or command name outside the contract."""


class PayloadError(ProtocolError):
    """A payload that cannot be encoded or decoded: bad JSON or UTF-8, wrong schema, bad fields, too large.

    `schema` is the payload schema that was expected (e.g. ``edgefleet.detection/1``); `fields` names the
    offending fields as dotted paths (``detections.0.bbox``), empty when the whole payload is at fault.
    """

    def __init__(self, message: str, *, schema: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.schema = schema
        self.fields = fields

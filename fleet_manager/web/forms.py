"""The rollout form: field values in, a `RolloutSpec` (or a message naming each bad field) out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fleet_manager.rollouts import RolloutSpec, RolloutValidationError

_SPLIT = re.compile(r"[\s,;]+")

# The form's fields, their defaults, and how an error in the spec maps back to a field label.
DEFAULTS: dict[str, str] = {
    "model_ref": "",
    "device_ids": "",
    "groups": "",
    "tags": "",
    "target_all": "",
    "waves": "10, 50, 100",
    "success_pct": "90",
    "error_pct": "10",
    "on_error": "pause",
    "probation_s": "60",
    "max_latency_p95_ms": "",
    "require_telemetry": "on",
    "auto_rollback": "",
    "max_concurrent": "",
}
LABELS = {
    "model": "Model",
    "version": "Model",
    "alias": "Model",
    "target": "Target",
    "waves": "Waves",
    "success_threshold": "Success threshold",
    "error_threshold": "Error threshold",
    "on_error": "On error",
    "probation_s": "Probation",
    "max_latency_p95_ms": "Latency gate",
    "require_telemetry": "Require telemetry",
    "auto_rollback": "Automatic rollback",
    "max_concurrent": "Concurrent downloads",
}


# The form asks for percentages where the spec takes shares.
_RANGES = {
    "success_threshold": "give a percentage above 0 and at most 100",
    "error_threshold": "give a percentage from 0 to below 100",
}


class FormError(ValueError):
    """The form cannot become a rollout; the message says which fields and why."""


@dataclass
class RolloutForm:
    """The form's values as typed (strings), to render it again after an error."""

    values: dict[str, str] = field(default_factory=lambda: dict(DEFAULTS))

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> RolloutForm:
        values = {key: str(data.get(key, "")).strip()[:2000] for key in DEFAULTS}
        return cls(values)

    @classmethod
    def prefilled(cls, model_ref: str | None) -> RolloutForm:
        form = cls()
        if model_ref:
            form.values["model_ref"] = model_ref[:200]
        return form

    def spec(self) -> RolloutSpec:
        v = self.values
        problems: list[str] = []
        try:
            name, version, alias = RolloutSpec.parse_model_ref(v["model_ref"])
        except RolloutValidationError as error:
            raise FormError(f"Model: {error}") from None
        target: dict[str, Any] = {"all": v["target_all"] == "on"}
        if not target["all"]:
            target["device_ids"] = _items(v["device_ids"])
            target["groups"] = _items(v["groups"])
            tags: dict[str, str] = {}
            for item in _items(v["tags"]):
                key, sep, value = item.partition("=")
                if not sep or not key or not value:
                    problems.append(f"Tags: write key=value, got {item!r}")
                tags[key] = value
            target["tags"] = tags
        waves = _numbers(v["waves"], "Waves", problems)
        body: dict[str, Any] = {
            "model": name,
            "version": version,
            "alias": alias,
            "target": target,
            "waves": waves,
            "success_threshold": _percent(v["success_pct"], "Success threshold", problems),
            "error_threshold": _percent(v["error_pct"], "Error threshold", problems),
            "on_error": v["on_error"] or "pause",
            "probation_s": _number(v["probation_s"], "Probation", problems, default=60.0),
            "max_latency_p95_ms": _number(v["max_latency_p95_ms"], "Latency gate", problems),
            "require_telemetry": v["require_telemetry"] == "on",
            "auto_rollback": v["auto_rollback"] == "on",
            "max_concurrent": _integer(v["max_concurrent"], "Concurrent downloads", problems),
        }
        if problems:
            raise FormError("; ".join(problems))
        try:
            return RolloutSpec.model_validate(body)
        except ValidationError as error:
            raise FormError(_explain(error)) from None


def _items(text: str) -> list[str]:
    return [item for item in _SPLIT.split(text) if item]


def _number(text: str, label: str, problems: list[str], default: float | None = None) -> float | None:
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        problems.append(f"{label}: {text!r} is not a number")
        return default


def _integer(text: str, label: str, problems: list[str]) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        problems.append(f"{label}: {text!r} is not a whole number")
        return None


def _percent(text: str, label: str, problems: list[str]) -> float | None:
    value = _number(text, label, problems)
    return None if value is None else value / 100.0


def _numbers(text: str, label: str, problems: list[str]) -> list[float]:
    values = []
    for item in _items(text.replace("%", " ")):
        value = _number(item, label, problems)
        if value is not None:
            values.append(value)
    if not values:
        problems.append(f"{label}: give cumulative percentages, e.g. 10, 50, 100")
    return values


def _explain(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        loc = [str(part) for part in problem["loc"]]
        label = LABELS.get(loc[0], loc[0]) if loc else "Form"
        message = _RANGES.get(loc[0], str(problem["msg"]).removeprefix("Value error, ")) if loc else ""
        lines.append(f"{label}: {message}")
    return "; ".join(dict.fromkeys(lines))

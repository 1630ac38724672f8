"""The dashboard's Jinja2 environment (templates and static files ship inside the package) and filters."""

from __future__ import annotations

import hashlib
from datetime import datetime
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from fleet_manager.models import utcnow

STATIC_PACKAGE = "fleet_manager"
STATIC_DIR = "static"


def static_dir() -> str:
    return str(resources.files(STATIC_PACKAGE) / STATIC_DIR)


def _static_versions() -> dict[str, str]:
    """A content hash per static file, appended to its URL so browsers never run a stale script."""
    versions = {}
    for entry in (resources.files(STATIC_PACKAGE) / STATIC_DIR).iterdir():
        if entry.is_file():
            versions[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()[:10]
    return versions


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = ((now or utcnow()) - value).total_seconds()
    if seconds < 0:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def when(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat()


def num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def pct(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f} %"


def size(value: int | None) -> str:
    if value is None:
        return "—"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def short(value: str | None, length: int = 12) -> str:
    if not value:
        return "—"
    return value if len(value) <= length else value[:length] + "…"


def rid(value: str | None) -> str:
    """A rollout id shortened for narrow tables: its prefix and the last (random) characters."""
    if not value:
        return "—"
    return value if len(value) <= 16 else f"{value[:3]}…{value[-8:]}"


def ref(name: str | None, version: str | None) -> str:
    if not name:
        return "—"
    return f"{name}@{version}" if version else name


def details(value: dict[str, Any] | None, limit: int = 160) -> str:
    """An audit entry's details on one line."""
    if not value:
        return ""
    parts = []
    for key, item in value.items():
        if item is None or key == "spec":
            continue
        parts.append(f"{key}={item}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def make_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("fleet_manager", "templates"),
        autoescape=select_autoescape(["html", "svg"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    versions = _static_versions()

    def static(name: str) -> str:
        version = versions.get(name)
        return f"/static/{name}" + (f"?v={version}" if version else "")

    env.globals["static"] = static
    env.filters.update(
        ago=ago, when=when, iso=iso, num=num, pct=pct, size=size, short=short, rid=rid, details=details
    )
    env.globals["ref"] = ref
    return env

"""The docs stay true to the code: committed JSON Schemas, relative links, dependency rules, setting names."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, get_args, get_origin
from urllib.parse import unquote

import pytest
from pydantic import BaseModel

from cloud_refiner.config import RefinerSettings
from device_agent.config import AgentSettings
from fleet_manager.config import FleetSettings
from fleet_protocol.payloads import write_json_schemas
from model_registry.config import RegistrySettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
SCHEMA_DIR = DOCS / "schemas"
LINKED_PAGES = sorted([*DOCS.glob("*.md"), REPO_ROOT / "README.md"])
# The pages whose setting names are checked against the settings classes (others have their own style).
SETTINGS_PAGES = ("architecture.md", "mqtt-contract.md", "operations.md", "security.md", "troubleshooting.md")
PACKAGES = ("fleet_protocol", "device_agent", "cloud_refiner", "model_registry", "fleet_manager")
SETTINGS: dict[str, type[BaseModel]] = {
    "AGENT": AgentSettings,
    "FLEET": FleetSettings,
    "REFINER": RefinerSettings,
    "REGISTRY": RegistrySettings,
}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1", re.DOTALL)
_INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_ENV_NAME = re.compile(r"EDGEFLEET_(AGENT|FLEET|REFINER|REGISTRY)_([A-Z0-9_]*)")
_DOTTED = re.compile(r"`([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)`")
_FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".conf", ".sql", ".onnx", ".pem", ".pub", ".txt")


def _prose(text: str) -> str:
    """The page without fenced code blocks and code spans: links there are examples, not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    prose = _prose(page.read_text(encoding="utf-8"))
    return [*_INLINE_LINK.findall(prose), *_REFERENCE_LINK.findall(prose)]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, punctuation but '-' and '_' dropped, ' ' -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for _, heading in _HEADING.findall(text):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _broken_link(page: Path, target: str) -> str | None:
    """Why `target` (a link on `page`) leads nowhere, or None when it resolves."""
    path_part, _, anchor = target.partition("#")
    destination = (page.parent / unquote(path_part)).resolve() if path_part else page
    if not destination.exists():
        return f"{page.relative_to(REPO_ROOT)}: {target!r} -> {destination} does not exist"
    if anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
        return f"{page.relative_to(REPO_ROOT)}: {target!r} -> {destination.name} has no heading #{anchor}"
    return None


def test_committed_schemas_equal_generated(tmp_path: Path) -> None:
    generated = {path.name: path.read_bytes() for path in write_json_schemas(tmp_path)}
    committed = {path.name: path.read_bytes() for path in SCHEMA_DIR.glob("*.json")}
    assert sorted(committed) == sorted(generated), "run: edgefleet protocol schema docs/schemas"
    stale = [name for name, data in generated.items() if committed[name] != data]
    assert not stale, f"docs/schemas is out of date ({stale}): run `edgefleet protocol schema docs/schemas`"


def test_link_checker_sees_links_and_anchors() -> None:
    # The checker itself: code is skipped, titles and nested brackets are handled, anchors are GitHub's.
    text = '[a](x.md) `[b](y.md)` [c [d]](z.md "title")\n```\n[e](w.md)\n```\n[ref]: ../r.md\n'
    assert sorted([*_INLINE_LINK.findall(_prose(text)), *_REFERENCE_LINK.findall(_prose(text))]) == [
        "../r.md",
        "x.md",
        "z.md",
    ]
    assert _slug("`model/reported`") == "modelreported"
    assert _slug("Mosquitto 0x95 packet too large") == "mosquitto-0x95-packet-too-large"
    assert _slug("Signing, trust [stores](x.md)") == "signing-trust-stores"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = [
        problem
        for target in _links(page)
        if not _SCHEME.match(target) and (problem := _broken_link(page, target)) is not None
    ]
    assert not problems, "\n".join(problems)


def _allowed_imports() -> dict[str, set[str]]:
    """The dependency table of architecture.md: package -> the packages it may import."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Dependency rules", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, re.MULTILINE)
    return {package: set(re.findall(r"`(\w+)`", allowed)) & set(PACKAGES) for package, allowed in rows}


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Each other edgefleet package `package` imports, with the modules that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_dependency_rules_in_architecture_hold() -> None:
    allowed = _allowed_imports()
    assert sorted(allowed) == sorted(PACKAGES), "architecture.md's dependency table must list every package"
    violations = [
        f"{package} imports {other} ({', '.join(sorted(modules))}), which architecture.md does not allow"
        for package in PACKAGES
        for other, modules in _imported_packages(package).items()
        if other not in allowed[package]
    ]
    assert not violations, "\n".join(violations)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings section class of a field's annotation (`X`, `X | None`), or None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and get_origin(annotation) is not list:
                return arg
    return None


def _resolves(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the key path names a field of `model` (a dict field takes any key below it)."""
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    section = _model_of(field.annotation)
    if section is None:
        return get_origin(field.annotation) is dict
    return _resolves(section, path[1:])


def _sections() -> set[str]:
    return {
        name
        for settings in SETTINGS.values()
        for name, field in settings.model_fields.items()
        if _model_of(field.annotation) is not None
    }


def test_settings_checker_resolves_nested_fields() -> None:
    assert _resolves(AgentSettings, ["outbox", "max_bytes"])
    assert _resolves(FleetSettings, ["registry", "mlflow_uri"])  # a dict of overrides
    assert not _resolves(AgentSettings, ["outbox", "max_megabytes"])
    assert "broker" in _sections()


@pytest.mark.parametrize("name", SETTINGS_PAGES)
def test_setting_names_exist(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    unknown = []
    for component, key in _ENV_NAME.findall(text):
        path = [part for part in key.strip("_").lower().split("__") if part]
        if path and not _resolves(SETTINGS[component], path):
            unknown.append(f"EDGEFLEET_{component}_{key}")
    sections = _sections()
    for dotted in _DOTTED.findall(text):
        path = dotted.split(".")
        if path[0] not in sections or dotted.endswith(_FILE_SUFFIXES):
            continue
        if not any(_resolves(settings, path) for settings in SETTINGS.values()):
            unknown.append(dotted)
    assert not unknown, f"{name} names settings the code does not have: {sorted(set(unknown))}"

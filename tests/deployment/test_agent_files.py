"""Static checks of the device agent's service files: they parse, say what they must, and agree with the code.

Nothing runs as a service here, so the systemd unit, the launchd job and the example settings are checked
as files: parsed, loaded through the agent's own settings loader, and (where the tools exist) verified.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from device_agent.config import AgentSettings, load_settings
from device_agent.sources import FrameSource, SourceConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_DIR = REPO_ROOT / "deployment" / "agent"
EXAMPLE_YAML = AGENT_DIR / "agent.example.yaml"
SYSTEMD_UNIT = AGENT_DIR / "edgefleet-agent.service"
LAUNCHD_PLIST = AGENT_DIR / "com.edgefleet.agent.plist"

AGENT_BINARY = "/opt/edgefleet/.venv/bin/edgefleet"
AGENT_COMMAND = f"{AGENT_BINARY} agent run --config /etc/edgefleet/agent.yaml"
ENV_FILE = "/etc/edgefleet/agent.env"
STATE_DIR = "/var/lib/edgefleet"
# The agent's shutdown budget (outbox drain); the service manager must wait longer before SIGKILL.
AGENT_SHUTDOWN_S = 5.0
# Example values that describe one particular device; every other value in the example is the default.
DEVICE_SPECIFIC = {
    "device_id",
    "data_dir",
    "sources",
    "broker.host",
    "broker.port",
    "broker.username",
    "broker.tls_ca",
    "model.path",
}
# Sandboxing options that hide cameras or GPUs from the agent (see the comments in the unit).
DEVICE_BREAKING_OPTIONS = ("PrivateDevices", "ProtectClock", "DevicePolicy", "DeviceAllow", "PrivateUsers")

UnitFile = dict[str, dict[str, list[str]]]


@pytest.fixture(autouse=True)
def _no_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own EDGEFLEET_AGENT_* variables must not leak into the loaded settings."""
    for name in list(os.environ):
        if name.startswith("EDGEFLEET_AGENT_"):
            monkeypatch.delenv(name)


# --- the example settings ------------------------------------------------------------------------------


def test_example_loads_and_names_every_top_level_setting() -> None:
    raw = yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))
    settings = load_settings(EXAMPLE_YAML)

    assert set(raw) == set(AgentSettings.model_fields)
    assert settings.broker.password is None, "the broker password must come from agent.env, not the file"
    assert str(settings.data_dir) == STATE_DIR
    assert settings.outbox_path == Path(STATE_DIR) / "outbox.sqlite3"
    assert {source.kind for source in settings.sources} >= {"video", "images"}


def test_example_documents_every_field_of_every_section() -> None:
    text = EXAMPLE_YAML.read_text(encoding="utf-8")
    undocumented = [
        f"{section}.{field}"
        for section, model in _nested_sections()
        for field in model.model_fields
        # A key may be shown commented out ("# tls_cert: ...") when it has no useful default.
        if not re.search(rf"^\s*(#\s*)?(-\s*)?{re.escape(field)}:", _section_text(text, section), re.M)
    ]
    assert not undocumented, f"add these settings to {EXAMPLE_YAML.name}: {undocumented}"


def test_example_values_are_the_defaults_except_the_device_specific_ones() -> None:
    differing = _non_default_settings(load_settings(EXAMPLE_YAML))

    assert set(differing) == DEVICE_SPECIFIC, (
        "the example claims its other values are the defaults; these differ: "
        f"{ {path: differing[path] for path in set(differing) - DEVICE_SPECIFIC} }"
    )


def test_broker_password_from_the_environment_merges_into_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = load_settings(EXAMPLE_YAML)
    monkeypatch.setenv("EDGEFLEET_AGENT_BROKER__PASSWORD", "from-agent-env")

    settings = load_settings(EXAMPLE_YAML)

    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == "from-agent-env"
    assert settings.broker.model_dump(exclude={"password"}) == from_file.broker.model_dump(
        exclude={"password"}
    )


def test_example_sources_work_when_pointed_at_real_files(shared: Path, int8_model: Path) -> None:
    raw_sources = yaml.safe_load(EXAMPLE_YAML.read_text(encoding="utf-8"))["sources"]
    real_uris = {"video": shared / "data" / "video" / "vtest.avi", "images": shared / "data" / "images"}
    for source in raw_sources:
        source["uri"] = str(real_uris[source["kind"]])

    settings = load_settings(EXAMPLE_YAML, model={"path": str(int8_model)}, sources=raw_sources)

    assert settings.model.path == int8_model
    assert settings.model.conf == load_settings(EXAMPLE_YAML).model.conf, "other model keys must survive"
    for config in settings.sources:
        assert _first_frame_shape(config) is not None, f"source {config.id} ({config.kind}) gave no frame"


# --- the launchd job -----------------------------------------------------------------------------------


def test_launchd_plist_has_the_keys_launchd_needs() -> None:
    job = plistlib.loads(LAUNCHD_PLIST.read_bytes())

    assert job["Label"] == LAUNCHD_PLIST.stem
    assert AGENT_COMMAND in " ".join(job["ProgramArguments"])
    assert job["UserName"] not in {"", "root"}
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"]["SuccessfulExit"] is False, "must restart after a failed exit"
    assert job["KeepAlive"]["Crashed"] is True
    assert job["ExitTimeOut"] > AGENT_SHUTDOWN_S
    assert job["WorkingDirectory"] == STATE_DIR == str(load_settings(EXAMPLE_YAML).data_dir)
    assert Path(job["StandardOutPath"]).is_absolute()
    assert Path(job["StandardErrorPath"]).is_absolute()
    environment = job["EnvironmentVariables"]
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert all(isinstance(value, str) for value in environment.values())


@pytest.mark.parametrize("env_file_exists", [True, False])
def test_launchd_wrapper_reads_the_env_file_and_becomes_the_agent(
    tmp_path: Path, env_file_exists: bool
) -> None:
    fake_agent = tmp_path / "edgefleet"
    fake_agent.write_text('#!/bin/sh\necho "pid=$$ password=$EDGEFLEET_AGENT_BROKER__PASSWORD args=$*"\n')
    fake_agent.chmod(0o755)
    env_file = tmp_path / "agent.env"
    if env_file_exists:
        env_file.write_text("EDGEFLEET_AGENT_BROKER__PASSWORD=s3cret\n")
    program, *arguments = plistlib.loads(LAUNCHD_PLIST.read_bytes())["ProgramArguments"]
    script = arguments[-1].replace(ENV_FILE, str(env_file)).replace(AGENT_BINARY, str(fake_agent))

    process = subprocess.Popen([program, *arguments[:-1], script], stdout=subprocess.PIPE, text=True)
    output, _ = process.communicate(timeout=30)

    assert process.returncode == 0
    # `exec`: the agent takes over the shell's process, so launchd's SIGTERM reaches it directly.
    password = "s3cret" if env_file_exists else ""
    assert (
        output.strip()
        == f"pid={process.pid} password={password} args=agent run --config /etc/edgefleet/agent.yaml"
    )


# --- the systemd unit ----------------------------------------------------------------------------------


def test_systemd_unit_runs_the_agent_as_its_own_user_and_restarts_it() -> None:
    unit = parse_unit_file(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]

    assert _last(unit, "Service", "User") == "edgefleet"
    assert "DynamicUser" not in service, "the outbox must persist: a dynamic user cannot own it"
    assert _last(unit, "Service", "ExecStart") == AGENT_COMMAND
    assert _last(unit, "Service", "Restart") == "on-failure"
    assert 1 <= _seconds(_last(unit, "Service", "RestartSec")) <= 60
    assert _last(unit, "Service", "KillSignal") == "SIGTERM"
    assert _seconds(_last(unit, "Service", "TimeoutStopSec")) > AGENT_SHUTDOWN_S
    assert _last(unit, "Service", "EnvironmentFile") == f"-{ENV_FILE}"
    assert "network-online.target" in _words(unit, "Unit", "After")
    assert "network-online.target" in _words(unit, "Unit", "Wants")
    assert _last(unit, "Install", "WantedBy") == "multi-user.target"


def test_systemd_unit_keeps_state_writable_and_devices_reachable() -> None:
    unit = parse_unit_file(SYSTEMD_UNIT.read_text(encoding="utf-8"))

    assert f"/var/lib/{_last(unit, 'Service', 'StateDirectory')}" == STATE_DIR
    assert STATE_DIR in _words(unit, "Service", "ReadWritePaths")
    assert (
        _last(unit, "Service", "WorkingDirectory") == STATE_DIR == str(load_settings(EXAMPLE_YAML).data_dir)
    )
    assert _last(unit, "Service", "NoNewPrivileges") == "yes"
    assert _last(unit, "Service", "ProtectSystem") == "strict"
    assert _last(unit, "Service", "ProtectHome") in {"yes", "read-only"}
    assert _last(unit, "Service", "PrivateTmp") == "yes"
    assert "video" in _words(unit, "Service", "SupplementaryGroups")
    present = [option for option in DEVICE_BREAKING_OPTIONS if option in unit["Service"]]
    assert not present, f"{present} would hide cameras or GPUs from the agent"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    unit = parse_unit_file(text)
    keys = [key for section in unit.values() for key in section]
    assert set(unit) == {"Unit", "Service", "Install"}
    assert all(re.fullmatch(r"[A-Z][A-Za-z]+", key) for key in keys), keys
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the parse above is all this machine can check
    # verify also checks that ExecStart's program exists: point it at one that does.
    installed = Path(sys.executable).with_name("edgefleet")
    stand_in = installed if installed.is_file() else Path(sys.executable)
    copy = tmp_path / SYSTEMD_UNIT.name
    copy.write_text(text.replace(AGENT_BINARY, str(stand_in)), encoding="utf-8")

    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)

    # Warnings about the unit (unknown keys, bad values) are printed but leave the exit status 0.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if copy.name in line]
    assert result.returncode == 0, result.stderr
    assert not complaints, complaints


def test_unit_file_parser_handles_repeated_keys_continuations_and_comments() -> None:
    unit = parse_unit_file(
        "# comment\n[Service]\nEnvironment=A=1\n; another\nEnvironment=B=2\nExecStart=/bin/x \\\n  --flag\n"
    )

    assert unit == {"Service": {"Environment": ["A=1", "B=2"], "ExecStart": ["/bin/x --flag"]}}
    with pytest.raises(ValueError, match="line 1"):
        parse_unit_file("User=edgefleet\n")


# --- helpers -------------------------------------------------------------------------------------------


def parse_unit_file(text: str) -> UnitFile:
    """A systemd unit file as {section: {key: [values in order]}}; keys may repeat, lines may continue."""
    sections: UnitFile = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        if current is None or not equals:
            raise ValueError(f"line {number}: {raw!r} is neither a [Section] header nor a Key=value line")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _last(unit: UnitFile, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] has no {key}="
    return values[-1]


def _words(unit: UnitFile, section: str, key: str) -> list[str]:
    return [word for value in unit.get(section, {}).get(key, []) for word in value.split()]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|ms)?", value)
    assert match, f"unexpected time span {value!r}"
    factor = {"ms": 0.001, "min": 60.0}.get(match[2] or "s", 1.0)
    return float(match[1]) * factor


def _nested_sections() -> list[tuple[str, type[BaseModel]]]:
    """(top-level key, model) for every section of AgentSettings, lists of models included."""
    sections = []
    for name, field in AgentSettings.model_fields.items():
        for candidate in (field.annotation, *get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                sections.append((name, candidate))
    return sections


def _section_text(text: str, section: str) -> str:
    """The lines under a top-level key, comments included, up to the next top-level key."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[A-Za-z_]", lines[i])), len(lines))
    return "\n".join(lines[start + 1 : end])


def _non_default_settings(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of the settings that are required or differ from their default, with their values."""
    differing: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            differing |= _non_default_settings(value, f"{prefix}{name}.")
        elif field.is_required() or value != field.get_default(call_default_factory=True):
            differing[f"{prefix}{name}"] = value
    return differing


def _first_frame_shape(config: SourceConfig) -> tuple[int, ...] | None:
    source = FrameSource(config)
    source.start()
    try:
        frame = source.next_frame(timeout=10)
    finally:
        source.stop()
    return None if frame is None else frame.image.shape

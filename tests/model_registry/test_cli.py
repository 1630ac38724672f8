"""`edgefleet registry ...` as a user runs it (in process, through Typer's test runner)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleet_protocol.signing import ModelManifest, TrustStore, file_digest
from model_registry.cli import registry_app
from model_registry.registry import ModelRegistry
from tests.model_registry.conftest import KeyPair, unique_name

VARIANTS = ("fp32-opt", "fp16", "int8-dynamic", "int8-static")


def invoke(env: dict[str, str], *args: str | Path) -> Result:
    return CliRunner().invoke(registry_app, [str(a) for a in args], env=env)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    env = {"EDGEFLEET_REGISTRY_DATA_DIR": str(tmp_path / "data")}

    result = invoke(env, "keygen")

    private, public = tmp_path / "data" / "keys" / "signing.pem", tmp_path / "data" / "keys" / "signing.pub"
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes()
    key_id = next(iter(TrustStore.of(public.read_bytes()).keys))
    assert key_id in result.output
    before = private.read_bytes()

    again = invoke(env, "keygen")

    assert again.exit_code == 2
    assert "never overwrites" in again.stderr
    assert private.read_bytes() == before


def test_register_promote_resolve_download_and_history(
    registry_env: dict[str, str], signing_keys: KeyPair, int8_model: Path, fp32_model: Path, tmp_path: Path
) -> None:
    name = unique_name("cli")
    registered = invoke(registry_env, "register", int8_model, "--name", name, "--json", "--actor", "ci")
    assert registered.exit_code == 0, registered.output
    assert json.loads(registered.stdout)["sha256"] == file_digest(int8_model)[0]
    second = invoke(registry_env, "register", fp32_model, "--name", name, "--alias", "canary")
    assert second.exit_code == 0, second.output
    assert "canary" in second.stdout

    promoted = invoke(registry_env, "promote", name, "1", "--alias", "production", "--actor", "alice")
    assert promoted.exit_code == 0, promoted.output
    assert f"{name}@production → version 1" in promoted.stdout

    resolved = invoke(registry_env, "resolve", f"{name}@production")
    assert resolved.exit_code == 0, resolved.output
    manifest = json.loads(resolved.stdout)
    assert manifest["version"] == "1"
    signed = ModelManifest(manifest["name"], manifest["version"], manifest["sha256"], manifest["size"])
    assert TrustStore.of(signing_keys.public_pem).verify(signed, manifest["signature"])

    target = tmp_path / "got.onnx"
    downloaded = invoke(registry_env, "download", f"{name}@production", "-o", target)
    assert downloaded.exit_code == 0, downloaded.output
    assert file_digest(target)[0] == manifest["sha256"] == file_digest(int8_model)[0]
    by_number = invoke(registry_env, "download", name, "2", "-o", tmp_path)
    assert by_number.exit_code == 0, by_number.output
    assert file_digest(tmp_path / fp32_model.name)[0] == file_digest(fp32_model)[0]

    history = invoke(registry_env, "history", name, "--json")
    assert history.exit_code == 0, history.output
    moves = [(m["alias"], m["from_version"], m["to_version"], m["actor"]) for m in json.loads(history.stdout)]
    assert moves[0][:3] == ("canary", None, "2")
    assert moves[1] == ("production", None, "1", "alice")

    listed = invoke(registry_env, "list", name)
    assert listed.exit_code == 0
    assert "production" in listed.stdout
    assert "canary" in listed.stdout
    shown = invoke(registry_env, "show", f"{name}@canary")
    assert shown.exit_code == 0
    assert file_digest(fp32_model)[0] in shown.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("resolve", "nameonly"), "expected NAME@ALIAS"),
        (("show", "nameonly"), "which version"),
        (("download", "x@a", "3"), "not both"),
        (("promote", "no-such-model", "1", "--alias", "production"), "no model named"),
        (("register", "missing.onnx", "--name", "m"), "not found"),
    ],
)
def test_usage_errors_exit_2_and_say_what_to_do(
    registry_env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    result = invoke(registry_env, *args)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_an_invalid_model_is_refused_with_the_reason(registry_env: dict[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07junk" * 64)

    result = invoke(registry_env, "register", junk, "--name", unique_name("junk"))

    assert result.exit_code == 2
    assert "refused" in result.stderr


def test_optimize_shows_all_four_variants_and_registers_the_pick(
    registry_env: dict[str, str],
    registry: ModelRegistry,
    fp32_model: Path,
    coco128_yaml: Path,
    tmp_path: Path,
) -> None:
    name = unique_name("optimized")
    report_path = tmp_path / "report.json"
    result = invoke(
        registry_env,
        *("optimize", fp32_model, "--data", coco128_yaml, "--limit", "4", "--calibration", "4"),
        *("--runs", "3", "--max-map-drop", "0.05", "--out", tmp_path / "variants", "--json", report_path),
        *("--register", name, "--alias", "candidate", "--actor", "ci"),
    )

    assert result.exit_code == 0, result.output
    for variant in VARIANTS:
        assert variant in result.stdout
    report = json.loads(report_path.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", *VARIANTS]
    for variant in VARIANTS:
        row = rows[variant]
        assert row["error"] is None, row
        assert row["size"] == (tmp_path / "variants" / f"yolov8n-{variant}.onnx").stat().st_size
        assert 0 < row["map50_95"] <= 1
        assert row["latency_ms"] > 0
        assert row["ratio"] > 0
    assert rows["fp32"]["ratio"] == 1.0
    assert (rows["fp16"]["precision"], rows["int8-static"]["precision"]) == ("fp16", "int8")
    assert rows["int8-dynamic"]["size"] < rows["fp16"]["size"] < rows["fp32"]["size"]
    # The pick is the fastest row within the budget, and it is what got registered, with its figures.
    within = [r for r in rows.values() if r["map50_95"] >= rows["fp32"]["map50_95"] - 0.05]
    assert report["pick"] == min(within, key=lambda r: r["latency_ms"])["variant"]
    picked = registry.resolve(name, "candidate")
    assert picked.variant == report["pick"]
    assert float(picked.tags["map50_95"]) == pytest.approx(rows[report["pick"]]["map50_95"], abs=1e-5)
    assert float(picked.tags["latency_ratio"]) == pytest.approx(rows[report["pick"]]["ratio"])
    assert picked.tags["eval_images"] == "4"
    assert picked.signature
    assert [v.version for v in registry.list_versions(name)] == ["1"]


def test_an_unreachable_tracking_server_is_an_error_message_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_REGISTRY_DATA_DIR": str(tmp_path / "data"),
        "EDGEFLEET_REGISTRY_MLFLOW_URI": "http://127.0.0.1:9",  # the discard port: nothing listens
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }

    result = invoke(env, "list")

    assert result.exit_code == 2
    assert "EDGEFLEET_REGISTRY_MLFLOW_URI" in result.stderr
    assert "Traceback" not in result.output

"""The registry's Python API on a real MLflow store: register, alias, resolve, download, history."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from fleet_protocol.signing import ModelManifest, SigningError, TrustStore, file_digest
from model_registry.config import RegistrySettings
from model_registry.registry import (
    ALIAS_MOVE_PREFIX,
    IntegrityError,
    ModelRegistry,
    NotFoundError,
    RegistryError,
)
from model_registry.validation import ModelValidationError
from tests.model_registry.conftest import KeyPair, unique_name


def test_register_promote_resolve_download_gives_the_same_bytes(
    registry: ModelRegistry, int8_model: Path, fp32_model: Path, tmp_path: Path
) -> None:
    name = unique_name("yolo")
    first = registry.register(int8_model, name, actor="ci")
    second = registry.register(fp32_model, name, variant="fp32", alias="canary", actor="ci")

    assert (first.version, second.version) == ("1", "2")
    registry.set_alias(name, "production", first.version, actor="alice")
    resolved = registry.resolve(name, "production")
    downloaded = registry.download(name, resolved.version, tmp_path / "out.onnx")

    assert resolved.version == first.version
    assert resolved.sha256 == file_digest(int8_model)[0] == file_digest(downloaded)[0]
    assert resolved.size == int8_model.stat().st_size == downloaded.stat().st_size
    assert registry.resolve(name, "canary").sha256 == file_digest(fp32_model)[0]
    # The cached copy is handed out again, still verified.
    assert registry.local_file(name, 1) == registry.local_file(name, "1")


def test_a_version_carries_its_facts_and_a_signature_the_public_key_verifies(
    registry: ModelRegistry, signing_keys: KeyPair, int8_model: Path
) -> None:
    name = unique_name("signed")
    info = registry.register(int8_model, name, extra_tags={"dataset": "coco128"})

    assert info.signature is not None
    assert TrustStore.of(signing_keys.public_pem).verify(info.manifest, info.signature) == info.signing_key_id
    assert info.manifest == ModelManifest(name, "1", file_digest(int8_model)[0], int8_model.stat().st_size)
    for tag in ("sha256", "size", "input_shape", "class_names_digest", "precision", "variant", "opset"):
        assert info.tags[tag], tag
    assert info.tags["producer"] == "onnx.quantize 0.1.0"
    assert (info.precision, info.variant, info.input_shape) == ("int8", "int8", (1, 3, 640, 640))
    assert info.tags["dataset"] == "coco128"
    assert info.tags["registered_by"] == "cli"
    # What MLflow stores is what a fresh registry reads back.
    assert ModelRegistry(registry.settings).get(name, 1) == info
    # A manifest for other bytes does not verify.
    forged = ModelManifest(name, "1", "0" * 64, info.size)
    with pytest.raises(SigningError):
        TrustStore.of(signing_keys.public_pem).verify(forged, info.signature)


def test_alias_history_lists_every_move_in_order_with_its_actor(
    registry: ModelRegistry, int8_model: Path
) -> None:
    name = unique_name("history")
    for _ in range(3):
        registry.register(int8_model, name)
    registry.set_alias(name, "production", 1, actor="alice")
    registry.set_alias(name, "canary", 2, actor="bob")
    registry.set_alias(name, "production", 3, actor="carol")
    registry.set_alias(name, "production", 2, actor="dave")
    registry.remove_alias(name, "canary", actor="erin")

    moves = registry.alias_history(name)

    assert [(m.alias, m.from_version, m.to_version, m.actor) for m in moves] == [
        ("production", None, "1", "alice"),
        ("canary", None, "2", "bob"),
        ("production", "1", "3", "carol"),
        ("production", "3", "2", "dave"),
        ("canary", "2", None, "erin"),
    ]
    assert [m.at for m in moves] == sorted(m.at for m in moves)
    assert registry.resolve(name, "production").version == "2"
    with pytest.raises(NotFoundError, match="no alias 'canary'"):
        registry.resolve(name, "canary")
    # The history lives in MLflow itself (registered-model tags), so any client of the store sees it.
    from mlflow import MlflowClient

    tags = MlflowClient(registry.settings.tracking_uri).get_registered_model(name).tags
    stored = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(ALIAS_MOVE_PREFIX)]
    assert [s["actor"] for s in stored] == ["alice", "bob", "carol", "dave", "erin"]


def test_invalid_models_are_refused_and_leave_nothing_registered(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    name = unique_name("refused")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf \xff\xfe" * 100)

    with pytest.raises(ModelValidationError, match="not an ONNX model"):
        registry.register(garbage, name)

    assert name not in [m.name for m in registry.list_models()]


def test_signing_is_mandatory_unless_unsigned_is_asked_for(
    registry_settings: RegistrySettings,
    int8_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EDGEFLEET_SIGNING_KEY", raising=False)
    keyless = ModelRegistry(registry_settings.model_copy(update={"signing_key": None, "data_dir": tmp_path}))
    name = unique_name("keyless")

    with pytest.raises(SigningError, match="keygen"):
        keyless.register(int8_model, name)
    assert name not in [m.name for m in keyless.list_models()]

    info = keyless.register(int8_model, name, unsigned=True)
    assert info.signature is None
    assert "signature" not in info.tags


def test_a_tampered_artifact_is_caught_on_download(
    registry: ModelRegistry, registry_settings: RegistrySettings, int8_model: Path, tmp_path: Path
) -> None:
    name = unique_name("tamper")
    info = registry.register(int8_model, name)
    stored = Path(url2pathname(urlparse(info.source).path)) / int8_model.name
    assert stored.is_file()
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")
    fresh_cache = ModelRegistry(registry_settings.model_copy(update={"cache_dir": tmp_path / "cache"}))

    with pytest.raises(IntegrityError, match="altered"):
        fresh_cache.local_file(name, info.version)
    assert not list((tmp_path / "cache").rglob("*.onnx"))


def test_bad_names_versions_and_reserved_tags_are_refused(registry: ModelRegistry, int8_model: Path) -> None:
    name = unique_name("errors")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register(int8_model, "bad/name")
    with pytest.raises(RegistryError, match="may not set"):
        registry.register(int8_model, name, extra_tags={"sha256": "0" * 64})
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.register(int8_model, name, alias="latest")
    registry.register(int8_model, name)
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.get(name, 9)
    with pytest.raises(NotFoundError, match="no model named"):
        registry.get(unique_name("absent"), 1)
    with pytest.raises(RegistryError, match="invalid version"):
        registry.set_alias(name, "production", "one")
    versions = registry.list_versions(name)
    assert [v.version for v in versions] == ["1"]

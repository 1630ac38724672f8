"""RefinerSettings: sources, validation, and a description on every field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from cloud_refiner.config import ConfigError, RefinerSettings, load_settings


def test_every_setting_is_described() -> None:
    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                missing += walk(annotation, f"{prefix}{name}.")
        return missing

    assert walk(RefinerSettings, "") == []


def test_file_environment_and_defaults_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "refiner.yaml"
    path.write_text("instance_id: r-1\nbroker: {host: mqtt.example.com, receive_maximum: 16}\n")
    monkeypatch.setenv("EDGEFLEET_REFINER_BROKER__PASSWORD", "s3cret")
    monkeypatch.setenv("EDGEFLEET_REFINER_BATCHING__MAX_BATCH", "4")
    settings = load_settings(path)
    assert settings.instance_id == "r-1"
    assert settings.client_id == "refiner-r-1"
    assert settings.broker.host == "mqtt.example.com"
    assert settings.broker.receive_maximum == 16
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.batching.max_batch == 4
    assert settings.classifier.path.name == "efficientnet-lite2.onnx"


def test_bad_settings_name_each_field(tmp_path: Path) -> None:
    path = tmp_path / "refiner.yaml"
    path.write_text("batching: {queue_size: 8}\nclassifier: {threads: -1}\ninstance_id: 'no spaces'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    text = str(caught.value)
    assert "classifier.threads" in text
    assert "instance_id" in text
    path.write_text("batching: {queue_size: 8}\n")
    with pytest.raises(ConfigError, match=r"queue_size \(8\) must be at least"):
        load_settings(path)
    path.write_text("broker: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")

"""The shared settings loader: YAML file, environment, keyword arguments; errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from fleet_protocol.settings import ConfigError, YamlFileSettings, load_yaml_settings


class _Link(BaseModel):
    host: str = Field(default="127.0.0.1", description="Host.")
    port: int = Field(default=1883, ge=1, le=65535, description="Port.")
    password: SecretStr | None = Field(default=None, description="Secret.")


class _WidgetSettings(YamlFileSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_WIDGET_")

    name: str = Field(default="widget", description="Name.")
    link: _Link = Field(default_factory=_Link, description="Link.")


def _load(path: Path | None, **overrides: object) -> _WidgetSettings:
    return load_yaml_settings(_WidgetSettings, path, overrides, component="widget")


def test_keywords_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text("name: from-file\nlink: {host: mqtt.example.com, port: 8883}\n", encoding="utf-8")
    monkeypatch.setenv("EDGEFLEET_WIDGET_LINK__PASSWORD", "s3cret")
    monkeypatch.setenv("EDGEFLEET_WIDGET_LINK__PORT", "1884")
    settings = _load(path)
    assert settings.name == "from-file"
    assert settings.link.host == "mqtt.example.com", "the environment merges into the file's section"
    assert settings.link.port == 1884
    assert settings.link.password is not None
    assert settings.link.password.get_secret_value() == "s3cret"
    overridden = _load(path, name="from-kwargs", link={"port": 2000})
    assert (overridden.name, overridden.link.port) == ("from-kwargs", 2000)
    assert overridden.link.host == "mqtt.example.com", "a keyword section merges too"
    assert _load(None).link.host == "127.0.0.1", "no file: defaults and the environment only"
    assert _load(None).link.port == 1884


def test_errors_name_the_component_the_file_and_each_field(tmp_path: Path) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text("link: {port: 0}\ncolour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        _load(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"invalid widget configuration in {path}:"
    assert any(line.startswith("  link.port: Input should be greater than or equal to 1") for line in lines)
    assert any(line.startswith("  colour: Extra inputs are not permitted") for line in lines)
    with pytest.raises(ConfigError, match=r"^invalid widget configuration:\n  link.port: "):
        _load(None, link={"port": "x"})


def test_bad_yaml_gives_its_line_and_a_missing_file_its_path(tmp_path: Path) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text("name: ok\nlink: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        _load(path)
    assert str(caught.value).startswith(str(path))
    assert "line 2, column 7" in str(caught.value), "YAML's own position of the problem"
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml$"):
        _load(tmp_path / "missing.yaml")

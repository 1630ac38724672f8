"""Settings read from a YAML file, the environment and keyword arguments, the same way in every component.

A component's settings class subclasses `YamlFileSettings` and names its environment prefix in its
`model_config` (e.g. `SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_")`); its `load_settings(path,
**overrides)` calls `load_yaml_settings`. Values come from (highest first) the keyword arguments, the
environment variables (nested with `__`, e.g. `EDGEFLEET_AGENT_BROKER__PASSWORD`), then the YAML file.
Environment values merge into the file's sections, so secrets can stay out of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import yaml
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad field."""


class YamlFileSettings(BaseSettings):
    """Base of a component's settings: keyword arguments, then the environment, then the YAML file."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid", yaml_file=None)
    _config_file: ClassVar[Path | None] = None  # set on the subclass `load_yaml_settings` makes per file

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._config_file))
        return tuple(sources)


SettingsT = TypeVar("SettingsT", bound=YamlFileSettings)


def load_yaml_settings(
    settings_cls: type[SettingsT], path: Path | None, overrides: dict[str, Any], *, component: str
) -> SettingsT:
    """`settings_cls` from `path` (YAML), the environment and `overrides`.

    ConfigError if the file is missing or not YAML, or names each bad field ("invalid <component>
    configuration in <path>:" and one line per field).
    """
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path is not None:
            yaml.safe_load(path.read_text(encoding="utf-8"))  # fail early with YAML's own line numbers
        name = f"{settings_cls.__name__}FromFile"
        from_file = cast("type[SettingsT]", type(name, (settings_cls,), {"_config_file": path}))
        return from_file(**overrides)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    except ValidationError as error:
        raise ConfigError(_describe(error, component, path)) from error


def _describe(error: ValidationError, component: str, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid {component} configuration{where}:"]
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {field}: {problem['msg']}")
    return "\n".join(lines)

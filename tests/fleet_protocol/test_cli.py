"""The root command survives components that are not installed or fail to load."""

from __future__ import annotations

from importlib.metadata import EntryPoint

from typer.testing import CliRunner

from fleet_protocol.cli import ENTRY_POINT_GROUP, _register, app


def test_missing_extra_names_the_pip_install() -> None:
    _register(EntryPoint("gone", "fleet_manager.no_such_module:app", ENTRY_POINT_GROUP))
    result = CliRunner().invoke(app, ["gone"])
    assert result.exit_code == 2
    assert "pip install 'edgefleet[fleet]'" in result.output


def test_broken_component_fails_alone_and_says_what_broke() -> None:
    _register(EntryPoint("broken", "fleet_protocol.cli:no_such_command", ENTRY_POINT_GROUP))
    result = CliRunner().invoke(app, ["broken"])
    assert result.exit_code == 2
    assert "fleet_protocol.cli:no_such_command" in result.output
    assert "AttributeError" in result.output
    assert CliRunner().invoke(app, ["protocol", "--help"]).exit_code == 0

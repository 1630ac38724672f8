"""The `edgefleet` root command.

Each component registers its sub-commands under the ``edgefleet.commands`` entry-point group, so this
module imports none of them: a device install without the fleet extras still has a working CLI.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet_protocol import __version__

ENTRY_POINT_GROUP = "edgefleet.commands"

app = typer.Typer(
    name="edgefleet",
    help="Computer vision on a fleet of edge devices.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
protocol_app = typer.Typer(help="The MQTT contract: topics and payload schemas.", no_args_is_help=True)
app.add_typer(protocol_app, name="protocol")


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@protocol_app.command("schema")
def write_schemas(
    out_dir: Annotated[
        Path, typer.Argument(help="Directory to write one JSON Schema file per payload into.")
    ],
) -> None:
    """Write the JSON Schema of every payload in the MQTT contract."""
    from fleet_protocol.payloads import write_json_schemas

    for path in write_json_schemas(out_dir):
        typer.echo(path)


# The extra that brings each component's dependencies, by the component's top-level package.
EXTRA_OF_PACKAGE = {
    "device_agent": "agent",
    "fleet_manager": "fleet",
    "model_registry": "registry",
    "cloud_refiner": "refiner",
}


def _missing_extra_command(entry_point: EntryPoint, error: ImportError) -> Any:
    extra = EXTRA_OF_PACKAGE.get(entry_point.module.split(".")[0], entry_point.name)

    def command() -> None:
        typer.echo(
            f"'edgefleet {entry_point.name}' is not available here ({error}). "
            f"Install it with: pip install 'edgefleet[{extra}]'",
            err=True,
        )
        raise typer.Exit(2)

    # Escaped so Rich's markup in --help does not eat the [extra].
    command.__doc__ = f"(not installed: pip install 'edgefleet\\[{extra}]')"
    return command


def _broken_command(entry_point: EntryPoint, error: Exception) -> Any:
    def command() -> None:
        typer.echo(
            f"'edgefleet {entry_point.name}' failed to load from {entry_point.value}: "
            f"{type(error).__name__}: {error}. Reinstall edgefleet (pip install -e . or the wheel).",
            err=True,
        )
        raise typer.Exit(2)

    command.__doc__ = "(failed to load: run it to see why)"
    return command


def _register(entry_point: EntryPoint) -> None:
    try:
        target = entry_point.load()
    except ImportError as error:
        app.command(name=entry_point.name)(_missing_extra_command(entry_point, error))
        return
    except Exception as error:  # one broken component must not take the whole CLI down with it
        app.command(name=entry_point.name)(_broken_command(entry_point, error))
        return
    if isinstance(target, typer.Typer):
        app.add_typer(target, name=entry_point.name)
    else:
        app.command(name=entry_point.name)(target)


def main() -> None:
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        _register(entry_point)
    app(prog_name="edgefleet")


if __name__ == "__main__":
    main()

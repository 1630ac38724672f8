"""The `edgefleet up` command: options, checks, then the run (fleet_manager.local_stack.stack)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

DEFAULT_BROKER_PORT = 18830  # not 1883: a system Mosquitto may own that one
DEFAULT_HTTP_PORT = 8000


def up_command(
    shared: Annotated[
        Path,
        typer.Option(
            envvar="EDGEFLEET_SHARED",
            help="The shared folder with models/ and data/ (../shared/MANIFEST.md).",
        ),
    ] = Path("../shared"),
    models: Annotated[
        Path | None,
        typer.Option(
            help="Folder with yolov8n_int8.onnx, yolov8n.onnx and efficientnet-lite2.onnx "
            "[default: SHARED/models]",
            show_default=False,
        ),
    ] = None,
    video: Annotated[
        Path | None,
        typer.Option(
            help="Video every agent plays in a loop [default: SHARED/data/video/vtest.avi]",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Image folder every agent reads in a loop [default: SHARED/data/images]", show_default=False
        ),
    ] = None,
    workdir: Annotated[
        Path,
        typer.Option(help="Where the stack keeps its state, configs and logs; a re-run reuses it."),
    ] = Path("runs/stack"),
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Empty the workdir first: new database, registry, broker and agents."),
    ] = False,
    broker_port: Annotated[
        int, typer.Option(min=0, max=65535, help="Mosquitto's port on 127.0.0.1 (0: any free port).")
    ] = DEFAULT_BROKER_PORT,
    http_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="The fleet manager's port (API and dashboard; 0: any free port)."
        ),
    ] = DEFAULT_HTTP_PORT,
    devices: Annotated[int, typer.Option(min=1, max=20, help="Device agents to run.")] = 3,
    fps: Annotated[
        float,
        typer.Option(
            min=0.1, max=30.0, help="Video frames per second per agent (its image folder: a quarter)."
        ),
    ] = 2.0,
    rollout: Annotated[
        bool, typer.Option("--rollout/--no-rollout", help="Start the canary rollout of the fp32 model.")
    ] = True,
    duration: Annotated[
        float | None,
        typer.Option(
            min=1.0, help="Stop cleanly after this many seconds (start-up included); default: Ctrl-C."
        ),
    ] = None,
) -> None:
    """Run a whole fleet on this machine: broker, fleet manager, refiner, agents, and a canary rollout.

    Mosquitto with generated accounts and ACLs, the fleet manager (SQLite, a local MLflow registry),
    one cloud refiner, and DEVICES agents on the sample video and images.
    The int8 model is registered as `production` and rolled out to every device;
    the fp32 model, a newer version, then rolls out as a canary: one device, then all.
    Ctrl-C or SIGTERM stops everything. See docs/local-stack.md.
    """
    from fleet_manager.local_stack.plan import StackError, resolve_plan
    from fleet_manager.local_stack.stack import LocalStack

    console = Console(soft_wrap=True)
    try:
        plan = resolve_plan(
            shared=shared,
            models=models,
            video=video,
            images=images,
            workdir=workdir,
            reset=reset,
            broker_port=broker_port,
            http_port=http_port,
            devices=devices,
            fps=fps,
            rollout=rollout,
            duration_s=duration,
        )
    except StackError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(LocalStack(plan, console).run())

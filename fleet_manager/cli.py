"""`edgefleet fleet ...`: serve, provision and revoke devices, tokens, broker accounts, rollouts.

Every command reads the same settings as the server (`--config FILE`, `EDGEFLEET_FLEET_*`) and works on
the database directly, so it needs no running server; a running server's controller picks up rollout
changes made here on its next tick. Errors print without a traceback and exit with code 2.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fleet_manager.config import ConfigError, FleetSettings, load_settings
from fleet_manager.db import Database
from fleet_manager.models import BrokerRole, Role

fleet_app = typer.Typer(
    help="The fleet manager: devices, rollouts, API tokens, broker accounts; `serve` runs it.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="API tokens (viewer, operator, admin).", no_args_is_help=True)
account_app = typer.Typer(help="Broker accounts of services (fleet manager, refiners).", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged model rollouts.", no_args_is_help=True)
fleet_app.add_typer(token_app, name="token")
fleet_app.add_typer(account_app, name="broker-account")
fleet_app.add_typer(rollout_app, name="rollout")

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="EDGEFLEET_FLEET_CONFIG",
        help="Fleet manager settings (YAML).",
        show_default=False,
    ),
]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


_state: dict[str, Any] = {}


@fleet_app.callback()
def _main(config: ConfigOption = None) -> None:
    _state["config"] = config


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


@contextmanager
def _errors() -> Iterator[None]:
    from sqlalchemy.exc import OperationalError

    from fleet_manager.db import UnsupportedDatabaseError
    from fleet_manager.provisioning import ProvisioningError
    from fleet_manager.registry import RegistryUnavailableError
    from fleet_manager.rollouts import RolloutError

    try:
        yield
    except (
        CliError,
        ConfigError,
        ProvisioningError,
        RolloutError,
        RegistryUnavailableError,
        UnsupportedDatabaseError,
    ) as error:
        stderr.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except OperationalError as error:
        stderr.print(
            f"[red]error:[/red] cannot use the database ({error.orig}); check database_url "
            "(EDGEFLEET_FLEET_DATABASE_URL) and that the database is reachable",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(2) from None


def _settings(**overrides: Any) -> FleetSettings:
    return load_settings(_state.get("config"), **overrides)


@contextmanager
def _database(settings: FleetSettings) -> Iterator[Database]:
    db = Database(settings.resolved_database_url)
    try:
        db.migrate()
        yield db
    finally:
        db.dispose()


# ---- serve ------------------------------------------------------------------------------------------------


@fleet_app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: api.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: api.port).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the fleet manager: migrations, MQTT ingest, rollout controller, HTTP API (uvicorn)."""
    import uvicorn

    from fleet_manager.api.main import create_app
    from fleet_manager.service import FleetService

    if config is not None:
        _state["config"] = config
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _errors():
        settings = _settings()
        service = FleetService(settings)
        app = create_app(service, manage_service=True)
    uvicorn.run(
        app,
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level=log_level.lower(),
        access_log=False,
    )


@fleet_app.command()
def migrate() -> None:
    """Bring the database schema up to date (serve does this at start too)."""
    with _errors():
        settings = _settings()
        with _database(settings):
            pass
    stdout.print(f"database is up to date: {_redact(settings.resolved_database_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ---- devices ----------------------------------------------------------------------------------------------


@fleet_app.command()
def provision(
    device_id: Annotated[str, typer.Argument(help="The device's id (also its broker username).")],
    group: Annotated[str | None, typer.Option(help="Device group.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Tag key=value; repeat for several.")] = None,
    rotate: Annotated[
        bool, typer.Option(help="Issue new credentials to an already provisioned device.")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write agent.yaml (no secrets) and agent.env (mode 0600) here instead of printing."
        ),
    ] = None,
) -> None:
    """Register a device: broker account + ACL entries, artifact token; print its agent config (YAML)."""
    from fleet_manager.provisioning import (
        agent_config,
        agent_config_yaml,
        agent_env,
        parse_tags,
        provision_device,
    )

    with _errors():
        settings = _settings()
        tags = parse_tags(tag or [])
        with _database(settings) as db:
            result = provision_device(
                db, settings, device_id, group=group, tags=tags, actor=_actor(), rotate=rotate
            )
    _report_reload(settings, result.reloaded, result.reload_error)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = agent_config(settings, device_id)
        (out_dir / "agent.yaml").write_text(
            agent_config_yaml(config, device_id=device_id, with_secrets=False)
        )
        env_path = out_dir / "agent.env"
        fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(agent_env(result.broker_password, result.artifact_token))
        os.chmod(env_path, 0o600)
        stderr.print(
            f"provisioned {device_id}: wrote {out_dir / 'agent.yaml'} and {env_path} (secrets, 0600)"
        )
        return
    config = agent_config(settings, device_id, password=result.broker_password, token=result.artifact_token)
    stderr.print(f"provisioned {device_id}; its agent config follows (the secrets are shown only now)")
    typer.echo(agent_config_yaml(config, device_id=device_id, with_secrets=True), nl=False)


@fleet_app.command()
def revoke(device_id: Annotated[str, typer.Argument(help="The device to remove.")]) -> None:
    """Remove a device: its broker account and ACL entries, its tokens, and its registration."""
    from fleet_manager.mqtt import clear_retained_once
    from fleet_manager.provisioning import revoke_device

    with _errors():
        settings = _settings()
        with _database(settings) as db:
            reloaded, error = revoke_device(db, settings, device_id, actor=_actor())
    stdout.print(f"revoked {device_id}")
    _report_reload(settings, reloaded, error)
    problem = clear_retained_once(settings.broker, device_id)
    if problem:
        root = f"{settings.broker.topic_root}/devices/{device_id}"
        stderr.print(
            f"[yellow]warning:[/yellow] {problem}; its retained status and model messages stay on the broker "
            f"until deleted: mosquitto_pub -r -n -t {root}/status (and {root}/model/reported, "
            f"{root}/model/desired) as the fleet manager's account",
            markup=True,
            highlight=False,
        )


def _report_reload(settings: FleetSettings, reloaded: bool, error: str | None) -> None:
    if reloaded:
        stderr.print("the broker reloaded its password and ACL files")
    elif error:
        stderr.print(f"[yellow]warning:[/yellow] {error}", markup=True, highlight=False)
    else:
        stderr.print(
            f"wrote {settings.password_file} and {settings.acl_file}; reload the broker to apply them "
            "(SIGHUP, e.g. `systemctl reload mosquitto`), or set mosquitto.pid_file to have it done"
        )


@fleet_app.command("broker-files")
def broker_files() -> None:
    """Rewrite the Mosquitto password and ACL files from the database (and reload the broker)."""
    from fleet_manager.provisioning import sync_broker

    with _errors():
        settings = _settings()
        with _database(settings) as db:
            reloaded, error = sync_broker(db, settings)
    stdout.print(f"wrote {settings.password_file} and {settings.acl_file}")
    _report_reload(settings, reloaded, error)


@fleet_app.command()
def devices(
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value; all must match.")] = None,
    state: Annotated[str | None, typer.Option(help="online, stopping, offline or unknown.")] = None,
    model: Annotated[str | None, typer.Option(help="Active model: name or name@version.")] = None,
    limit: Annotated[int, typer.Option(help="Most rows.")] = 200,
) -> None:
    """List devices."""
    from fleet_manager.devices import DeviceFilter, list_devices
    from fleet_manager.provisioning import parse_tags

    with _errors():
        settings = _settings()
        flt = DeviceFilter(group=group, tags=parse_tags(tag or []), state=state, model=model)
        with _database(settings) as db, db.read() as session:
            total, rows = list_devices(session, flt, limit=limit)
            table = Table("device", "group", "tags", "state", "model", "ota", "last seen")
            for d in rows:
                table.add_row(
                    d.id,
                    d.group_name or "",
                    ",".join(f"{k}={v}" for k, v in sorted(d.tag_map.items())),
                    d.state,
                    f"{d.active_model_name}@{d.active_model_version}" if d.active_model_name else "",
                    d.ota_state or "",
                    d.last_seen_at.isoformat(timespec="seconds") if d.last_seen_at else "",
                )
    stdout.print(table)
    stdout.print(f"{len(rows)} of {total} device(s)")


# ---- tokens ---------------------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[Role, typer.Option(help="viewer, operator or admin.", case_sensitive=False)],
    name: Annotated[str | None, typer.Option(help="Who or what uses it (default: the role).")] = None,
) -> None:
    """Create an API token and print it (only its hash is stored)."""
    from fleet_manager.tokens import create_token

    with _errors():
        if role is Role.DEVICE:
            raise CliError("device tokens come with `edgefleet fleet provision`")
        settings = _settings()
        with _database(settings) as db, db.write() as session:
            row, plain = create_token(session, name=name or role.value, role=role, created_by=_actor())
            session.flush()
            token_id = row.id
    stderr.print(f"token {token_id} ({role.value}); it is shown only now:")
    typer.echo(plain)


@token_app.command("list")
def token_list(include_revoked: Annotated[bool, typer.Option(help="Show revoked ones too.")] = False) -> None:
    """List API tokens (never their values)."""
    from fleet_manager.tokens import list_tokens

    with _errors():
        settings = _settings()
        with _database(settings) as db, db.read() as session:
            rows = list_tokens(session, include_revoked=include_revoked)
            table = Table("id", "name", "role", "device", "prefix", "created", "by", "revoked")
            for t in rows:
                table.add_row(
                    str(t.id),
                    t.name,
                    t.role,
                    t.device_id or "",
                    t.prefix + "…",
                    t.created_at.isoformat(timespec="seconds"),
                    t.created_by,
                    t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "",
                )
    stdout.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="The token's id (see `token list`).")]) -> None:
    """Revoke an API token."""
    from fleet_manager.tokens import TokenNotFoundError, revoke_token

    with _errors():
        settings = _settings()
        try:
            with _database(settings) as db, db.write() as session:
                revoke_token(session, token_id, _actor())
        except TokenNotFoundError as error:
            raise CliError(str(error)) from None
    stdout.print(f"revoked token {token_id}")


# ---- service broker accounts ---------------------------------------------------------------------------


@account_app.command("create")
def account_create(
    username: Annotated[str, typer.Argument(help="Account name, e.g. edgefleet-fleet or edgefleet-refiner.")],
    role: Annotated[str, typer.Option(help="fleet (the fleet manager) or refiner.")],
) -> None:
    """Create (or reset the password of) a service's broker account; prints the password once."""
    from fleet_manager.provisioning import create_service_account

    with _errors():
        try:
            broker_role = BrokerRole(role)
        except ValueError:
            raise CliError(f"--role must be fleet or refiner, not {role!r}") from None
        settings = _settings()
        with _database(settings) as db:
            password, reloaded, error = create_service_account(
                db, settings, username, broker_role, actor=_actor()
            )
    _report_reload(settings, reloaded, error)
    stderr.print(f"broker account {username} ({broker_role.value}); its password is shown only now:")
    typer.echo(password)


@account_app.command("list")
def account_list() -> None:
    """List the service broker accounts (devices: `edgefleet fleet devices`)."""
    from fleet_manager.provisioning import list_service_accounts

    with _errors():
        settings = _settings()
        with _database(settings) as db:
            rows = list_service_accounts(db)
    table = Table("username", "role", "created")
    for username, role, created in rows:
        table.add_row(username, role, created.isoformat(timespec="seconds"))
    stdout.print(table)


@account_app.command("delete")
def account_delete(username: Annotated[str, typer.Argument(help="The account to remove.")]) -> None:
    """Remove a service's broker account."""
    from fleet_manager.provisioning import delete_service_account

    with _errors():
        settings = _settings()
        with _database(settings) as db:
            delete_service_account(db, settings, username, actor=_actor())
    stdout.print(f"deleted broker account {username}")


# ---- rollouts ---------------------------------------------------------------------------------------------


def _controller(db: Database, settings: FleetSettings) -> Any:
    from fleet_manager.rollouts import RolloutController
    from fleet_manager.service import LazyCatalog

    return RolloutController(db, LazyCatalog(settings.registry), public_url=settings.api.public_url)


@rollout_app.command("create")
def rollout_create(
    model: Annotated[
        str, typer.Argument(help="NAME@VERSION or NAME@ALIAS, e.g. yolov8n@3 or yolov8n@production.")
    ],
    all_devices: Annotated[bool, typer.Option("--all", help="Every registered device.")] = False,
    device: Annotated[list[str] | None, typer.Option(help="A device id; repeat for several.")] = None,
    group: Annotated[list[str] | None, typer.Option(help="A device group; repeat for several.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value; devices must carry all.")] = None,
    waves: Annotated[str, typer.Option(help="Cumulative percentages per wave.")] = "10,50,100",
    success_threshold: Annotated[float, typer.Option(help="Share of a wave that must be proven.")] = 0.9,
    error_threshold: Annotated[float, typer.Option(help="Failed share of a wave that stops it.")] = 0.1,
    on_error: Annotated[str, typer.Option(help="pause or abort.")] = "pause",
    probation_s: Annotated[float, typer.Option(help="Seconds a device must stay healthy.")] = 60.0,
    max_latency_p95_ms: Annotated[float | None, typer.Option(help="Latency gate on telemetry p95.")] = None,
    auto_rollback: Annotated[
        bool, typer.Option(help="Roll back automatically on the error threshold.")
    ] = False,
    max_concurrent: Annotated[int | None, typer.Option(help="Most devices installing at once.")] = None,
) -> None:
    """Create a rollout; a running `edgefleet fleet serve` starts it on its next tick."""
    from pydantic import ValidationError

    from fleet_manager.provisioning import parse_tags
    from fleet_manager.rollouts import RolloutSpec, RolloutTarget

    with _errors():
        name, version, alias = RolloutSpec.parse_model_ref(model)
        try:
            spec = RolloutSpec(
                model=name,
                version=version,
                alias=alias,
                target=RolloutTarget(
                    all=all_devices, device_ids=device or [], groups=group or [], tags=parse_tags(tag or [])
                ),
                waves=[float(w) for w in waves.split(",") if w.strip()],
                success_threshold=success_threshold,
                error_threshold=error_threshold,
                on_error=on_error,  # type: ignore[arg-type]  # validated by pydantic
                probation_s=probation_s,
                max_latency_p95_ms=max_latency_p95_ms,
                auto_rollback=auto_rollback,
                max_concurrent=max_concurrent,
            )
        except (ValidationError, ValueError) as error:
            raise CliError(f"invalid rollout: {error}") from None
        settings = _settings()
        with _database(settings) as db:
            rollout = _controller(db, settings).create(spec, _actor())
    stdout.print(
        f"rollout {rollout.id}: {rollout.model_name}@{rollout.model_version} to {rollout.device_count} "
        f"device(s) in waves {waves} ({rollout.state})"
    )


@rollout_app.command("list")
def rollout_list(limit: Annotated[int, typer.Option(help="Most rows.")] = 50) -> None:
    """List rollouts, newest first."""
    with _errors():
        settings = _settings()
        with _database(settings) as db:
            rows = _controller(db, settings).list_rollouts(limit=limit)
    table = Table("id", "model", "state", "wave", "devices", "created", "by")
    for r in rows:
        table.add_row(
            r.id,
            f"{r.model_name}@{r.model_version}",
            r.state,
            f"{r.current_wave + 1}/{len(r.waves)}",
            str(r.device_count),
            r.created_at.isoformat(timespec="seconds"),
            r.created_by,
        )
    stdout.print(table)


@rollout_app.command("show")
def rollout_show(rollout_id: str) -> None:
    """A rollout's state and per-wave progress (JSON)."""
    from fleet_manager.rollouts import RolloutController

    with _errors():
        settings = _settings()
        with _database(settings) as db:
            rollout, rows = _controller(db, settings).get(rollout_id)
    waves = RolloutController.progress(rollout, rows)
    body = {
        "id": rollout.id,
        "model": f"{rollout.model_name}@{rollout.model_version}",
        "state": rollout.state,
        "current_wave": rollout.current_wave + 1,
        "message": rollout.message,
        "waves": [
            {"percent": w.percent, "devices": w.devices, "proven": w.proven, "phases": w.phases}
            for w in waves
        ],
    }
    typer.echo(json.dumps(body, indent=2))


def _action(name: str, rollout_id: str, reason: str | None) -> None:
    with _errors():
        settings = _settings()
        with _database(settings) as db:
            controller = _controller(db, settings)
            if name == "resume":
                rollout = controller.resume(rollout_id, _actor())
            else:
                rollout = getattr(controller, name)(rollout_id, _actor(), reason)
    stdout.print(f"rollout {rollout.id}: {rollout.state}")


ReasonOption = Annotated[str | None, typer.Option(help="Why (goes into the audit log).")]


@rollout_app.command("pause")
def rollout_pause(rollout_id: str, reason: ReasonOption = None) -> None:
    """Pause: no new devices get the model; those installing carry on."""
    _action("pause", rollout_id, reason)


@rollout_app.command("resume")
def rollout_resume(rollout_id: str) -> None:
    """Resume a paused rollout (failures so far are acknowledged)."""
    _action("resume", rollout_id, None)


@rollout_app.command("abort")
def rollout_abort(rollout_id: str, reason: ReasonOption = None) -> None:
    """Abort: devices that have not activated the model keep theirs."""
    _action("abort", rollout_id, reason)


@rollout_app.command("rollback")
def rollout_rollback(rollout_id: str, reason: ReasonOption = None) -> None:
    """Roll the rollout's devices back to the model each ran before."""
    _action("rollback", rollout_id, reason)

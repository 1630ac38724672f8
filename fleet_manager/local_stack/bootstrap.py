"""Preparing the stack's state in the workdir: the lock, the signing key, accounts and tokens, the models.

Accounts, tokens and registry versions are made with the very functions behind `edgefleet fleet provision`,
`edgefleet fleet broker-account create`, `edgefleet fleet token create` and `edgefleet registry register`
(in this process: one database migration and one MLflow import instead of a dozen CLI start-ups).

A re-run reuses the workdir: the database, the registry (versions are registered again only when their
file changed), the broker's persistence and each agent's outbox and models stay; passwords and the operator
token are issued anew each time. `--reset` deletes the workdir's contents first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from fleet_manager.local_stack.plan import (
    FLEET_ACCOUNT,
    MODEL_NAME,
    REFINER_ACCOUNT,
    WATCH_ACCOUNT,
    StackError,
    StackPlan,
    agent_settings,
    fleet_settings,
)

MARKER = ".edgefleet-stack"
LOCK = ".lock"
TOKEN_NAME = "edgefleet-up"
ACTOR = "edgefleet up"


@dataclass
class Secrets:
    """Passwords and tokens issued for this run; they reach the children through their environment."""

    fleet_password: str = ""
    refiner_password: str = ""
    watch_password: str = ""
    operator_token: str = ""
    device_env: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Models:
    production: str  # the int8 version, alias `production`
    canary: str  # the fp32 version, newer


# ---- the workdir -------------------------------------------------------------------------------------------


def claim_workdir(plan: StackPlan) -> IO[str]:
    """Lock the workdir for this run (kept until the returned file closes); reset it when asked."""
    workdir = plan.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    entries = [p for p in workdir.iterdir() if p.name != LOCK]
    if entries and not (workdir / MARKER).is_file():
        raise StackError(
            f"{workdir} is not empty and was not made by `edgefleet up`: choose another --workdir "
            "(nothing there was changed)"
        )
    lock = (workdir / LOCK).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StackError(
            f"another `edgefleet up` is running in {workdir}: stop it (Ctrl-C), or use another --workdir"
        ) from None
    if plan.reset:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    (workdir / MARKER).write_text("made by `edgefleet up`; `edgefleet up --reset` empties this folder\n")
    plan.logs_dir.mkdir(exist_ok=True)
    # A pid file left by a killed broker must not send the fleet manager's SIGHUP to a stranger.
    plan.broker_pid_file.unlink(missing_ok=True)
    return lock


def ensure_signing_key(plan: StackPlan) -> str:
    """The registry's signing key pair in the workdir (made once, as `edgefleet registry keygen` does);
    every agent's trust store gets the public key. Returns the key id."""
    from fleet_protocol.signing import generate_keypair, key_id, load_public_key

    if not plan.signing_key.is_file():
        private_pem, public_pem = generate_keypair()
        plan.signing_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_secret(plan.signing_key, private_pem.decode())
        plan.public_key.write_bytes(public_pem)
    public_pem = plan.public_key.read_bytes()
    for device_id in plan.device_ids:
        trust = plan.agent_dir(device_id) / "trust"
        trust.mkdir(parents=True, exist_ok=True)
        (trust / plan.public_key.name).write_bytes(public_pem)
    return key_id(load_public_key(public_pem, str(plan.public_key)))


# ---- accounts and tokens -----------------------------------------------------------------------------------


def provision(plan: StackPlan) -> Secrets:
    """Devices, service accounts and an operator token in the fleet database; writes the broker files and
    every agent's config. Nothing signals the broker here: it starts afterwards and reads the files."""
    from fleet_manager.config import FleetSettings
    from fleet_manager.db import Database
    from fleet_manager.models import BrokerRole, Device, Role
    from fleet_manager.provisioning import (
        agent_config,
        agent_env,
        create_service_account,
        provision_device,
    )
    from fleet_manager.tokens import create_token, list_tokens, revoke_token

    values = fleet_settings(plan)
    values["mosquitto"]["pid_file"] = None
    settings = FleetSettings(**values)
    db = Database(settings.resolved_database_url)
    secrets = Secrets()
    try:
        db.migrate()
        for device_id in plan.device_ids:
            with db.read() as session:
                known = session.get(Device, device_id)
                rotate = known is not None and known.provisioned
            result = provision_device(
                db, settings, device_id, group="local", tags={}, actor=ACTOR, rotate=rotate
            )
            config = agent_settings(plan, agent_config(settings, device_id))
            folder = plan.agent_dir(device_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "agent.yaml").write_text(_yaml(config, f"device agent {device_id}"))
            env_text = agent_env(result.broker_password, result.artifact_token)
            _write_secret(folder / "agent.env", env_text)
            secrets.device_env[device_id] = _parse_env(env_text)
        for username, role, attribute in (
            (FLEET_ACCOUNT, BrokerRole.FLEET, "fleet_password"),
            (REFINER_ACCOUNT, BrokerRole.REFINER, "refiner_password"),
            (WATCH_ACCOUNT, BrokerRole.FLEET, "watch_password"),
        ):
            password, _, _ = create_service_account(db, settings, username, role, actor=ACTOR)
            setattr(secrets, attribute, password)
        with db.write() as session:
            for old in list_tokens(session):
                if old.name == TOKEN_NAME:
                    revoke_token(session, old.id, ACTOR)
            _, secrets.operator_token = create_token(
                session, name=TOKEN_NAME, role=Role.OPERATOR, created_by=ACTOR
            )
    finally:
        db.dispose()
    _write_secret(plan.token_file, secrets.operator_token + "\n")
    fleet_values = fleet_settings(plan)
    plan.workdir.joinpath("fleet.yaml").write_text(_yaml(fleet_values, "fleet manager"))
    return secrets


def _yaml(values: dict[str, Any], what: str) -> str:
    header = (
        f"# Settings of the {what}, generated by `edgefleet up` on every start (edits are overwritten).\n"
        "# Secrets are not here: they reach the process through its environment.\n"
    )
    return header + yaml.safe_dump(values, sort_keys=False)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _parse_env(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value for key, value in pairs}


# ---- the model registry ------------------------------------------------------------------------------------


def register_models(plan: StackPlan) -> Models:
    """int8 as `production`, fp32 as a newer version: registered and signed once, found again on re-runs."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow announces its migrations at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from fleet_protocol.signing import SigningError
    from model_registry.registry import RegistryError
    from model_registry.validation import ModelValidationError

    try:
        return _register_models(plan)
    except (RegistryError, ModelValidationError, SigningError) as error:
        raise StackError(f"registering the models failed: {error}") from None


def _register_models(plan: StackPlan) -> Models:
    from fleet_protocol.signing import file_digest
    from model_registry.config import RegistrySettings
    from model_registry.registry import ModelRegistry, NotFoundError

    registry = ModelRegistry(
        RegistrySettings(
            data_dir=plan.registry_dir,
            mlflow_uri=plan.mlflow_uri,
            artifact_root=str(plan.registry_dir / "artifacts"),
            signing_key=plan.signing_key,
        )
    )
    try:
        known = {v.sha256: v.version for v in registry.list_versions(MODEL_NAME) if v.signature}
    except NotFoundError:
        known = {}

    def version_of(path: Path, variant: str) -> str:
        sha256, _ = file_digest(path)
        if sha256 in known:
            return known[sha256]
        return registry.register(path, MODEL_NAME, variant=variant, actor=ACTOR).version

    production = version_of(plan.int8_model, "int8")
    canary = version_of(plan.fp32_model, "fp32")
    if int(canary) < int(production):
        canary = registry.register(plan.fp32_model, MODEL_NAME, variant="fp32", actor=ACTOR).version
    if "production" not in registry.get(MODEL_NAME, production).aliases:
        registry.set_alias(MODEL_NAME, "production", production, ACTOR)
    return Models(production=production, canary=canary)

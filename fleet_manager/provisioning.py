"""Provisioning: register a device with its broker account, ACL entries and artifact token; revoke it all.

Also the service accounts (fleet manager, refiners) the generated broker files must contain. Every change
commits to the database first, then rewrites the Mosquitto files from it and asks the broker to reload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fleet_manager import audit
from fleet_manager.broker_auth import ReloadError, reload_broker, write_broker_files
from fleet_manager.config import FleetSettings
from fleet_manager.db import Database
from fleet_manager.models import (
    ApiToken,
    BrokerAccount,
    BrokerRole,
    Device,
    DeviceLock,
    DevicePhase,
    DeviceTag,
    Role,
    RolloutDevice,
    utcnow,
)
from fleet_manager.security import mosquitto_hash, new_broker_password
from fleet_manager.tokens import create_token
from fleet_protocol.errors import TopicError
from fleet_protocol.topics import validate_device_id

log = logging.getLogger(__name__)

_TAG_KEY = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ProvisioningError(ValueError):
    """A provisioning request cannot be done; the message says why and what to do."""


@dataclass
class Provisioned:
    """What a newly provisioned device needs; the secrets are shown once and never stored in clear."""

    device_id: str
    broker_username: str
    broker_password: str
    artifact_token: str
    reloaded: bool
    reload_error: str | None = None
    warnings: list[str] = field(default_factory=list)


def parse_tags(pairs: list[str]) -> dict[str, str]:
    """`["site=berlin", "floor=2"]` → dict; ProvisioningError names a malformed pair."""
    import re

    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(_TAG_KEY, key) or not value or len(value) > 128:
            raise ProvisioningError(
                f"invalid tag {pair!r}: use key=value "
                "(key: letters, digits, '.', '_', '-'; value: 1 to 128 characters)"
            )
        tags[key] = value
    return tags


def _check_device_id(device_id: str) -> str:
    try:
        return validate_device_id(device_id)
    except TopicError as error:
        raise ProvisioningError(str(error)) from None


def set_device_tags(session: Session, device: Device, tags: dict[str, str]) -> None:
    existing = {tag.key: tag for tag in device.tags}
    for key, tag in existing.items():
        if key not in tags:
            device.tags.remove(tag)
            session.delete(tag)
    for key, value in tags.items():
        if key in existing:
            existing[key].value = value
        else:
            device.tags.append(DeviceTag(key=key, value=value))


def provision_device(
    db: Database,
    settings: FleetSettings,
    device_id: str,
    *,
    group: str | None,
    tags: dict[str, str],
    actor: str,
    rotate: bool = False,
) -> Provisioned:
    """Register `device_id` (or take over one seen on MQTT), give it a broker account and artifact token.

    A device that is already provisioned is refused unless `rotate`, which replaces both secrets.
    """
    _check_device_id(device_id)
    if group is not None:
        _check_device_id(group)  # groups follow the same naming rules
    password = new_broker_password()
    with db.write() as session:
        account = session.get(BrokerAccount, device_id)
        if account is not None and account.role != BrokerRole.DEVICE.value:
            raise ProvisioningError(
                f"{device_id!r} is the name of a {account.role} broker account, not a device"
            )
        device = session.get(Device, device_id)
        if device is not None and device.provisioned and not rotate:
            raise ProvisioningError(
                f"device {device_id!r} is already provisioned: use --rotate to issue new credentials, "
                "or revoke it first"
            )
        if device is None:
            device = Device(id=device_id, created_at=utcnow(), state="unknown", providers=[], hardware={})
            session.add(device)
        device.provisioned = True
        device.group_name = group
        set_device_tags(session, device, tags)
        if account is None:
            account = BrokerAccount(username=device_id, role=BrokerRole.DEVICE.value, device_id=device_id)
            session.add(account)
        account.password_hash = mosquitto_hash(password)
        account.created_at = utcnow()
        session.execute(
            update(ApiToken)
            .where(ApiToken.device_id == device_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        _, token = create_token(
            session, name=f"device:{device_id}", role=Role.DEVICE, created_by=actor, device_id=device_id
        )
        audit.record(
            session,
            actor,
            "device.rotate" if rotate else "device.provision",
            "device",
            device_id,
            group=group,
            tags=tags,
        )
    reloaded, error = sync_broker(db, settings)
    return Provisioned(device_id, device_id, password, token, reloaded, error)


def revoke_device(
    db: Database, settings: FleetSettings, device_id: str, *, actor: str
) -> tuple[bool, str | None]:
    """Remove the device, its broker account, ACL entries and tokens, and take it out of active rollouts."""
    _check_device_id(device_id)
    with db.write() as session:
        device = session.get(Device, device_id)
        account = session.get(BrokerAccount, device_id)
        if device is None and account is None:
            raise ProvisioningError(f"no device {device_id!r}")
        if account is not None and account.role != BrokerRole.DEVICE.value:
            raise ProvisioningError(f"{device_id!r} is a {account.role} broker account, not a device")
        session.execute(delete(BrokerAccount).where(BrokerAccount.username == device_id))
        session.execute(
            update(ApiToken)
            .where(ApiToken.device_id == device_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        session.execute(delete(DeviceLock).where(DeviceLock.device_id == device_id))
        session.execute(
            update(RolloutDevice)
            .where(
                RolloutDevice.device_id == device_id,
                RolloutDevice.phase.in_(
                    [DevicePhase.WAITING.value, DevicePhase.QUEUED.value, DevicePhase.SENT.value]
                ),
            )
            .values(
                phase=DevicePhase.CANCELLED.value,
                error="device revoked",
                publish_pending=False,
                updated_at=utcnow(),
            )
        )
        if device is not None:
            session.delete(device)
        audit.record(session, actor, "device.revoke", "device", device_id)
    return sync_broker(db, settings)


def create_service_account(
    db: Database, settings: FleetSettings, username: str, role: BrokerRole, *, actor: str
) -> tuple[str, bool, str | None]:
    """A broker account for the fleet manager or a refiner; returns (password, reloaded, reload error)."""
    _check_device_id(username)
    if role is BrokerRole.DEVICE:
        raise ProvisioningError("device accounts are made by provisioning the device")
    password = new_broker_password()
    with db.write() as session:
        if session.get(Device, username) is not None:
            raise ProvisioningError(f"{username!r} is a device id; pick another account name")
        account = session.get(BrokerAccount, username)
        if account is not None and account.role != role.value:
            raise ProvisioningError(f"{username!r} is already a {account.role} account")
        if account is None:
            account = BrokerAccount(username=username, role=role.value)
            session.add(account)
        account.password_hash = mosquitto_hash(password)
        account.created_at = utcnow()
        audit.record(session, actor, "broker_account.set", "broker_account", username, role=role.value)
    reloaded, error = sync_broker(db, settings)
    return password, reloaded, error


def delete_service_account(db: Database, settings: FleetSettings, username: str, *, actor: str) -> None:
    with db.write() as session:
        account = session.get(BrokerAccount, username)
        if account is None or account.role == BrokerRole.DEVICE.value:
            raise ProvisioningError(f"no service account {username!r} (devices are removed with revoke)")
        session.delete(account)
        audit.record(session, actor, "broker_account.delete", "broker_account", username)
    sync_broker(db, settings)


def list_service_accounts(db: Database) -> list[tuple[str, str, datetime]]:
    with db.read() as session:
        rows = session.execute(
            select(BrokerAccount)
            .where(BrokerAccount.role != BrokerRole.DEVICE.value)
            .order_by(BrokerAccount.username)
        ).scalars()
        return [(r.username, r.role, r.created_at) for r in rows]


def sync_broker(db: Database, settings: FleetSettings) -> tuple[bool, str | None]:
    """Rewrite the Mosquitto files from the database and SIGHUP the broker when a pid file is configured.

    Returns (reloaded, error); a failed reload is reported, not raised: the database change stands, and
    the next reload (or broker restart) applies the files.
    """
    write_broker_files(db, settings.password_file, settings.acl_file, settings.topics)
    try:
        return reload_broker(settings.mosquitto.pid_file), None
    except ReloadError as error:
        log.warning("%s", error)
        return False, str(error)


# ---- the agent configuration ------------------------------------------------------------------------


def agent_config(
    settings: FleetSettings, device_id: str, *, password: str | None = None, token: str | None = None
) -> dict[str, Any]:
    """The device agent's settings (device_agent's AgentSettings) for a provisioned device.

    Secrets are included only when given; otherwise they belong in the agent's environment file.
    """
    prov = settings.provisioning
    broker: dict[str, Any] = {
        "host": prov.broker_host or settings.broker.host,
        "port": prov.broker_port or settings.broker.port,
        "username": device_id,
    }
    if password is not None:
        broker["password"] = password
    if prov.broker_tls_ca is not None:
        broker["tls_ca"] = str(prov.broker_tls_ca)
    broker["topic_root"] = settings.broker.topic_root
    ota: dict[str, Any] = {"enabled": True}
    if token is not None:
        ota["token"] = token
    return {
        "device_id": device_id,
        "data_dir": prov.device_data_dir,
        "broker": broker,
        "model": {"path": prov.initial_model_path},
        "sources": [{"id": "camera0", "kind": "camera", "uri": "0"}],
        "ota": ota,
    }


def agent_env(password: str, token: str) -> str:
    """The agent's environment file: the two secrets (keep it mode 0600)."""
    return f"EDGEFLEET_AGENT_BROKER__PASSWORD={password}\nEDGEFLEET_AGENT_OTA__TOKEN={token}\n"


def agent_config_yaml(config: dict[str, Any], *, device_id: str, with_secrets: bool) -> str:
    header = [
        f"# edgefleet agent settings for device {device_id}, made by `edgefleet fleet provision`.",
        "# Set `sources` (and `model.path`, the model it starts with) for this device; the rest is ready.",
        "# Every key is documented in deployment/agent/agent.example.yaml.",
    ]
    if with_secrets:
        header.append(
            "# CONTAINS SECRETS (broker password, artifact token): keep this file mode 0600, or move them "
            "to agent.env."
        )
    else:
        header.append(
            "# The secrets are in agent.env (EDGEFLEET_AGENT_BROKER__PASSWORD, EDGEFLEET_AGENT_OTA__TOKEN)."
        )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body

"""Provisioning against a real Mosquitto running on the generated password and ACL files (SQLite and
PostgreSQL): a device reaches only its own topics, a revoked device cannot connect; the agent config it
prints loads in the agent; the CLI."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from device_agent.config import load_settings as load_agent_settings
from fleet_manager.cli import fleet_app
from fleet_manager.models import BrokerRole
from fleet_manager.mqtt import clear_retained_once
from fleet_manager.provisioning import (
    ProvisioningError,
    agent_config,
    agent_config_yaml,
    create_service_account,
    provision_device,
    revoke_device,
)
from fleet_manager.security import mosquitto_hash, mosquitto_verify
from fleet_manager.service import FleetService
from fleet_protocol.mqtt import MqttSession, MqttSettings
from fleet_protocol.topics import Topics
from tests.broker import Inbox, find_mosquitto, free_port, write_password_file
from tests.fleet_manager.conftest import REPO_ROOT, RegisteredModels, fleet_settings, wait_until

ROOT = "edgefleet/v1"
TEMPLATE = REPO_ROOT / "deployment" / "mosquitto" / "mosquitto.conf"


def session(broker: TemplateBroker, username: str | None, password: str | None) -> MqttSession:
    return MqttSession(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            client_id=f"{username or 'anon'}-{uuid.uuid4().hex[:6]}",
            username=username,
            password=password,
            clean_start=True,
            reconnect_min_delay_s=0.2,
            reconnect_max_delay_s=0.5,
        )
    )


def connected(
    broker: TemplateBroker, username: str | None, password: str | None, **subs: Inbox
) -> MqttSession:
    client = session(broker, username, password)
    for topic_filter, inbox in subs.items():
        client.subscribe(topic_filter.replace("__", "/"), inbox)
    client.connect()
    assert client.wait_connected(10), f"{username} could not connect"
    return client


def refused(broker: TemplateBroker, username: str | None, password: str | None) -> bool:
    client = session(broker, username, password)
    client.connect()
    try:
        return not client.wait_connected(2)
    finally:
        client.disconnect()


def test_mosquitto_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    """Our `$7$` hashes and mosquitto_passwd's verify each other."""
    mine = mosquitto_hash("s3cret")
    assert mine.startswith("$7$101$")
    assert mosquitto_verify("s3cret", mine)
    assert not mosquitto_verify("other", mine)
    theirs = (
        write_password_file(tmp_path / "passwd", {"alice": "s3cret"}).read_text().split(":", 1)[1].strip()
    )
    assert mosquitto_verify("s3cret", theirs)


def test_generated_broker_files_confine_devices(
    tmp_path: Path, database_url: str, make_service: Callable[..., FleetService]
) -> None:
    service = make_service(None, start=False)
    settings = fleet_settings(
        tmp_path,
        database_url,
        None,
        broker={"topic_root": ROOT},
        mosquitto={"pid_file": str(tmp_path / "mosquitto.pid")},
    )
    db = service.db
    fleet_password, _, error = create_service_account(
        db, settings, "edgefleet-fleet", BrokerRole.FLEET, actor="test"
    )
    assert error is not None
    assert "pid" in error
    refiner_password, _, _ = create_service_account(
        db, settings, "edgefleet-refiner", BrokerRole.REFINER, actor="t"
    )
    cam_a = provision_device(db, settings, "cam-a", group="lobby", tags={"site": "berlin"}, actor="test")
    cam_b = provision_device(db, settings, "cam-b", group=None, tags={}, actor="test")
    with pytest.raises(ProvisioningError, match="already provisioned"):
        provision_device(db, settings, "cam-a", group=None, tags={}, actor="test")
    with pytest.raises(ProvisioningError, match="invalid device id"):
        provision_device(db, settings, "cam/+", group=None, tags={}, actor="test")
    with pytest.raises(ProvisioningError, match="edgefleet-fleet"):
        provision_device(db, settings, "edgefleet-fleet", group=None, tags={}, actor="test")

    acl = settings.acl_file.read_text()
    assert f"pattern write {ROOT}/devices/%u/detections" in acl
    assert f"pattern read {ROOT}/devices/%u/model/desired" in acl
    assert "cam-a" not in acl  # devices need no lines of their own: the patterns cover them
    passwd = settings.password_file.read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {
        "cam-a",
        "cam-b",
        "edgefleet-fleet",
        "edgefleet-refiner",
    }
    assert cam_a.broker_password not in passwd

    # The printed agent config is a valid agent configuration.
    config_path = tmp_path / "agent.yaml"
    text = agent_config_yaml(
        agent_config(settings, "cam-a", password=cam_a.broker_password, token=cam_a.artifact_token),
        device_id="cam-a",
        with_secrets=True,
    )
    config_path.write_text(text)
    agent = load_agent_settings(config_path)
    assert agent.device_id == "cam-a"
    assert agent.broker.username == "cam-a"
    assert agent.broker.password is not None
    assert agent.broker.password.get_secret_value() == cam_a.broker_password
    assert agent.ota.token is not None
    assert agent.ota.token.get_secret_value() == cam_a.artifact_token

    broker = TemplateBroker(tmp_path, settings.password_file, settings.acl_file, tmp_path / "mosquitto.pid")
    try:
        topics = Topics(ROOT)
        fleet_inbox, a_inbox, b_inbox, refiner_inbox = Inbox(), Inbox(), Inbox(), Inbox()
        fleet = connected(broker, "edgefleet-fleet", fleet_password, **{f"{ROOT}/devices/+/#": fleet_inbox})
        fleet.publish(topics.model_desired("cam-a"), b'{"for": "a"}', retain=True).wait(5)
        fleet.publish(topics.model_desired("cam-b"), b'{"for": "b"}', retain=True).wait(5)
        device_a = connected(
            broker,
            "cam-a",
            cam_a.broker_password,
            **{topics.model_desired("cam-a"): a_inbox, topics.model_desired("cam-b"): a_inbox},
        )
        device_b = connected(broker, "cam-b", cam_b.broker_password, **{topics.refined("cam-b"): b_inbox})
        refiner = connected(
            broker,
            "edgefleet-refiner",
            refiner_password,
            **{topics.refiner_shared_subscription(): refiner_inbox},
        )
        # A reads its own desired model, never B's.
        assert a_inbox.wait_for(lambda m: len(m) >= 1, 5)
        assert not a_inbox.wait_for(lambda m: len(m) >= 2, 1.0)
        assert [m.topic for m in a_inbox.messages] == [topics.model_desired("cam-a")]
        # A publishes under its own topics only: not as B, not B's or its own desired model.
        device_a.publish(topics.detections("cam-b"), b"spoof").wait(5)
        device_a.publish(topics.status("cam-b"), b"spoof").wait(5)
        device_a.publish(topics.model_desired("cam-a"), b"self-service", retain=True).wait(5)
        device_a.publish(topics.refined("cam-b"), b"spoof").wait(5)
        device_a.publish(topics.detections("cam-a"), b"mine").wait(5)
        assert fleet_inbox.wait_for(lambda m: any(x.payload == b"mine" for x in m), 5)
        assert not fleet_inbox.wait_for(
            lambda m: any(x.payload in (b"spoof", b"self-service") for x in m), 1.0
        )
        assert not b_inbox.wait_for(lambda m: len(m) > 0, 0.5)
        # The refiner takes crops through the shared subscription and answers on the device's refined topic.
        device_b.publish(topics.crops("cam-b"), b"\xff\xd8\xffcrop").wait(5)
        assert refiner_inbox.wait_for(lambda m: len(m) == 1, 5)
        refiner.publish(topics.refined("cam-b"), b"golden retriever").wait(5)
        assert b_inbox.wait_for(lambda m: [x.payload for x in m] == [b"golden retriever"], 5)
        device_a.publish(topics.status("cam-a"), b'{"state": "online"}', qos=1, retain=True).wait(5)
        device_a.publish(topics.model_reported("cam-a"), b'{"state": "active"}', qos=1, retain=True).wait(5)
        for client in (device_a, device_b, refiner, fleet):
            client.disconnect()

        # Wrong password, no account: refused.
        assert refused(broker, "cam-a", "wrong")
        assert refused(broker, None, None)
        # Revoked (the fleet manager rewrites the files and SIGHUPs the broker): cam-a can no longer connect.
        reloaded, error = revoke_device(db, settings, "cam-a", actor="test")
        assert reloaded
        assert error is None
        assert "cam-a" not in settings.password_file.read_text()
        assert refused(broker, "cam-a", cam_a.broker_password)
        connected(broker, "cam-b", cam_b.broker_password).disconnect()
        # Its retained messages go too, so a fleet manager subscribing afresh never sees cam-a again.
        fleet_broker = settings.broker.model_copy(
            update={"port": broker.port, "username": "edgefleet-fleet", "password": SecretStr(fleet_password)}
        )
        assert clear_retained_once(fleet_broker, "cam-a") is None
        fresh = Inbox()
        watcher = connected(broker, "edgefleet-fleet", fleet_password, **{f"{ROOT}/devices/+/#": fresh})
        assert fresh.wait_for(lambda m: any(x.topic == topics.model_desired("cam-b") for x in m), 5)
        assert not fresh.wait_for(lambda m: any("/cam-a/" in x.topic for x in m), 1.0), [
            (x.topic, x.payload) for x in fresh.messages
        ]
        watcher.disconnect()
    finally:
        broker.stop()


class TemplateBroker:
    """Mosquitto started from deployment/mosquitto/mosquitto.conf, with this test's paths and port."""

    host = "127.0.0.1"

    def __init__(self, tmp_path: Path, password_file: Path, acl_file: Path, pid_file: Path) -> None:
        self.port = free_port()
        data = tmp_path / "mosquitto-data"
        data.mkdir()
        text = TEMPLATE.read_text()
        for old, new in (
            ("/var/lib/edgefleet-fleet/mosquitto/passwd", str(password_file)),
            ("/var/lib/edgefleet-fleet/mosquitto/acl", str(acl_file)),
            ("/run/mosquitto/mosquitto.pid", str(pid_file)),
            ("/var/lib/mosquitto/", f"{data}/"),
            ("listener 1883", f"listener {self.port} {self.host}"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        # As root, Mosquitto would switch to the `mosquitto` user, who cannot write into the test's folder.
        text += f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {tmp_path / 'mosquitto.log'}\n"
        config = tmp_path / "mosquitto.conf"
        config.write_text(text)
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stderr=subprocess.DEVNULL)
        self.pid_file = pid_file

        def listening() -> bool:
            assert self.process.poll() is None, (tmp_path / "mosquitto.log").read_text()
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        wait_until(listening, 10, "mosquitto to listen")
        assert int(pid_file.read_text()) == self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_cli_provision_tokens_rollouts(
    tmp_path: Path, database_url: str, fleet_models: RegisteredModels
) -> None:
    env = {
        "EDGEFLEET_FLEET_DATA_DIR": str(tmp_path / "fleet"),
        "EDGEFLEET_FLEET_DATABASE_URL": database_url,
        "EDGEFLEET_FLEET_BROKER__HOST": "mqtt.example.com",
        "EDGEFLEET_FLEET_PROVISIONING__BROKER_PORT": "8883",
        "EDGEFLEET_REGISTRY_DATA_DIR": str(fleet_models.settings.data_dir),
        "EDGEFLEET_REGISTRY_MLFLOW_URI": fleet_models.settings.tracking_uri,
        "COLUMNS": "200",
    }
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(fleet_app, list(args), env=env)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = run("provision", "cam-1", "--group", "dock", "--tag", "site=hamburg", "--tag", "floor=0")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["device_id"] == "cam-1"
    assert config["broker"]["host"] == "mqtt.example.com"
    assert config["broker"]["port"] == 8883
    assert config["broker"]["username"] == "cam-1"
    assert config["broker"]["password"]
    assert config["ota"]["token"].startswith("eft_")
    assert "shown only now" in err
    code, _, err = run("provision", "cam-1")
    assert code == 2
    assert "already provisioned" in err
    code, _, err = run("provision", "bad/id")
    assert code == 2
    assert "invalid device id" in err
    code, _, err = run("provision", "cam-2", "--tag", "novalue")
    assert code == 2
    assert "invalid tag" in err
    out_dir = tmp_path / "cam-2"
    code, _, err = run("provision", "cam-2", "--group", "dock", "--out-dir", str(out_dir))
    assert code == 0, err
    written = yaml.safe_load((out_dir / "agent.yaml").read_text())
    assert "password" not in written["broker"]
    assert "token" not in written["ota"]
    assert (out_dir / "agent.env").stat().st_mode & 0o777 == 0o600
    assert "EDGEFLEET_AGENT_BROKER__PASSWORD=" in (out_dir / "agent.env").read_text()

    code, out, _ = run("devices", "--group", "dock")
    assert code == 0
    assert "cam-1" in out
    assert "cam-2" in out
    assert "site=hamburg" in out
    code, out, err = run("token", "create", "--role", "operator", "--name", "ci")
    assert code == 0
    assert out.strip().startswith("eft_")
    code, out, _ = run("token", "list")
    assert code == 0
    assert "ci" in out
    assert out.count("eft_") >= 1
    assert "device:cam-1" in out
    code, _, err = run("token", "create", "--role", "superuser")
    assert code == 2

    code, out, err = run(
        "rollout", "create", f"{fleet_models.name}@production", "--group", "dock", "--waves", "50,100"
    )
    assert code == 0, err
    rollout_id = out.split()[1].rstrip(":")
    assert "to 2 device(s)" in out
    code, _, err = run("rollout", "create", f"{fleet_models.name}@1", "--device", "cam-2")
    assert code == 2
    assert "already in an active rollout" in err
    code, _, err = run("rollout", "create", f"{fleet_models.name}@nope", "--all")
    assert code == 2
    assert "not in the registry" in err
    code, out, _ = run("rollout", "pause", rollout_id, "--reason", "window closed")
    assert code == 0
    assert "paused" in out
    code, out, _ = run("rollout", "show", rollout_id)
    assert code == 0
    assert '"state": "paused"' in out
    code, out, _ = run("rollout", "abort", rollout_id)
    assert code == 0
    assert "aborted" in out

    code, _, err = run("revoke", "cam-1")
    assert code == 0, err
    assert "retained status and model messages stay on the broker" in err  # no broker here to clear them
    code, _, err = run("revoke", "cam-1")
    assert code == 2
    assert "no device" in err
    assert "cam-1" not in (tmp_path / "fleet" / "mosquitto" / "passwd").read_text()
    env["EDGEFLEET_FLEET_API__PORT"] = "not-a-port"
    code, _, err = run("devices")
    assert code == 2
    assert "api.port" in err


def test_cli_names_an_unsupported_database_url(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_FLEET_DATA_DIR": str(tmp_path / "fleet"),
        "EDGEFLEET_FLEET_DATABASE_URL": "mysql://fleet@db.example.com/fleet",
    }

    result = CliRunner().invoke(fleet_app, ["devices"], env=env)

    assert result.exit_code == 2
    assert "unsupported database 'mysql'" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)

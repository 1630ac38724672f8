"""The Azure transport (`transport: azure`) against a local TLS Mosquitto standing in for IoT Hub.

The real azure-iot-device SDK connects with TLS (a throwaway CA made here, trusted through the SDK's own
options), on port 8883 as the SDK always does: the broker listens on a random 127.x.y.z address so runs do
not collide. The test plays the hub's side of the twin protocol on the broker (`HubStandIn`): it answers
the SDK's twin GET and reported-PATCH requests on `$iothub/twin/res/...`, publishes desired-property patches
on `$iothub/twin/PATCH/properties/desired/...` and reads the device-to-cloud messages. What this cannot
test (SAS validation, Edge hub routing, module provisioning, ...) is listed in docs/azure.md.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.agent import Agent
from device_agent.azure.session import AzureSession
from device_agent.azure.twin import DesiredProperties, desired_model_payload, merge_patch
from device_agent.config import load_settings
from fleet_protocol.ids import new_msg_id
from fleet_protocol.mqtt import Message, MessageProperties, MqttSession, MqttSettings
from fleet_protocol.payloads import (
    DetectionEvent,
    ModelReported,
    OtaState,
    decode,
    decode_model_desired,
)
from fleet_protocol.signing import generate_keypair, load_private_key
from fleet_protocol.topics import Topics
from tests.broker import Inbox, MosquittoBroker
from tests.device_agent.agent_runner import wait_until
from tests.device_agent.ota_helpers import TOKEN, ArtifactServer, desired_for, relabelled

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = REPO_ROOT / "deployment" / "azure" / "deployment.template.json"
HUB_PORT = 8883  # the SDK always connects to 8883 (443 with websockets)
HUB_HOSTNAME = "edgefleet-test.azure-devices.net"
TOPICS = Topics()


# ---- a TLS broker on a loopback address of its own -------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, host: str) -> TlsFiles:
    """A throwaway CA and a server certificate for `host` (an IP address SAN) signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test CA")])
    ca_cert = (
        _certificate(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _certificate(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), ca_name, server_key.public_key(), now
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


def _certificate(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )


def free_loopback_address(port: int) -> str:
    """A 127.x.y.z address on which `port` is free (Linux routes all of 127/8 to the loopback)."""
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return host
    raise AssertionError(f"no loopback address with port {port} free")


class TlsMosquitto(MosquittoBroker):
    """Mosquitto with one TLS listener (the hub's MQTT endpoint stand-in)."""

    def __init__(self, workdir: Path, host: str, tls: TlsFiles) -> None:
        super().__init__(workdir, port=HUB_PORT)
        self.host = host
        self.tls = tls

    def _config(self) -> str:
        return super()._config() + f"certfile {self.tls.cert}\nkeyfile {self.tls.key}\n"

    def pause(self) -> None:
        """SIGSTOP: connections stay open, but nothing is answered (no PUBACK) until `resume`."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def hub_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMosquitto]:
    folder = tmp_path_factory.mktemp("azure-hub")
    host = free_loopback_address(HUB_PORT)
    broker = TlsMosquitto(folder / "mosquitto", host, make_tls_files(folder / "tls", host))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# ---- the hub's side of the twin protocol -----------------------------------------------------------------


class HubStandIn:
    """Plays IoT Hub on the broker for one identity: answers twin requests, patches desired, reads D2C."""

    def __init__(self, broker: TlsMosquitto, device_id: str, module_id: str | None = None) -> None:
        self.base = f"devices/{device_id}" + (f"/modules/{module_id}" if module_id else "")
        self.desired: dict[str, Any] = {"$version": 1}
        self.reported: dict[str, Any] = {"$version": 1}
        self.reported_patches: list[dict[str, Any]] = []
        self.twin_reads = 0
        self.events = Inbox()
        self._changed = threading.Condition()
        # A persistent session: requests the SDK sends while this side reconnects wait for it on the broker.
        self.session = MqttSession(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=f"hub-{new_msg_id()}",
                tls_ca=broker.tls.ca,
                reconnect_min_delay_s=0.2,
                reconnect_max_delay_s=0.5,
            )
        )
        self.session.subscribe(f"{self.base}/messages/events/#", self.events)
        self.session.subscribe("$iothub/twin/GET/#", self._on_get)
        self.session.subscribe("$iothub/twin/PATCH/properties/reported/#", self._on_reported)
        self.session.connect()
        assert self.session.wait_connected(10), "the hub stand-in cannot reach the TLS broker"

    def close(self) -> None:
        self.session.disconnect()

    def patch_desired(self, patch: dict[str, Any]) -> None:
        """What a back end's desired-property update makes IoT Hub send to the device."""
        with self._changed:
            version = self.desired["$version"] + 1
            merge_patch(self.desired, patch)
            self.desired["$version"] = version
        body = json.dumps({**patch, "$version": version}).encode()
        topic = f"$iothub/twin/PATCH/properties/desired/?$version={version}"
        assert self.session.publish(topic, body, qos=1).wait(10)

    def wait_reported(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.reported), timeout):
                raise AssertionError(f"reported properties never showed {what}: {self.reported}")

    def d2c(self, kind: str) -> list[tuple[dict[str, str], Message]]:
        """(system and app properties from the topic, message) of each D2C message of one edgefleet kind."""
        found = []
        for message in list(self.events.messages):
            properties = {
                k: v[0] for k, v in parse_qs(message.topic.split("/messages/events/", 1)[1]).items()
            }
            if properties.get("edgefleet_kind") == kind:
                found.append((properties, message))
        return found

    def _on_get(self, message: Message) -> None:
        rid = _rid(message.topic)
        with self._changed:
            self.twin_reads += 1
            body = json.dumps({"desired": self.desired, "reported": self.reported}).encode()
            version = self.desired["$version"]
        self.session.publish(f"$iothub/twin/res/200/?$rid={rid}&$version={version}", body, qos=0)

    def _on_reported(self, message: Message) -> None:
        patch = json.loads(message.payload)
        with self._changed:
            merge_patch(self.reported, patch)
            self.reported["$version"] += 1
            self.reported_patches.append(patch)
            version = self.reported["$version"]
            self._changed.notify_all()
        self.session.publish(
            f"$iothub/twin/res/204/?$rid={_rid(message.topic)}&$version={version}", b"", qos=0
        )


def _rid(topic: str) -> str:
    return parse_qs(topic.split("?", 1)[1])["$rid"][0]


def _sas_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# ---- the agent as an IoT Edge module ---------------------------------------------------------------------


@pytest.fixture
def edge_module_environment(monkeypatch: pytest.MonkeyPatch, hub_broker: TlsMosquitto) -> tuple[str, str]:
    """The IoT Edge local-development environment `create_from_edge_environment` falls back to."""
    for name in list(os.environ):
        if name.startswith(("IOTEDGE_", "EDGEFLEET_AGENT_")):
            monkeypatch.delenv(name)
    device, module = f"edge-{new_msg_id()[-6:].lower()}", "edgefleet-agent"
    monkeypatch.setenv(
        "EdgeHubConnectionString",
        f"HostName={HUB_HOSTNAME};DeviceId={device};ModuleId={module};SharedAccessKey={_sas_key()};"
        f"GatewayHostName={hub_broker.host}",
    )
    monkeypatch.setenv("EdgeModuleCACertificateFile", str(hub_broker.tls.ca))
    return device, module


def test_agent_as_edge_module_sends_d2c_survives_an_outage_and_follows_the_twin_desired_model(
    tmp_path: Path,
    hub_broker: TlsMosquitto,
    edge_module_environment: tuple[str, str],
    int8_model: Path,
    shared: Path,
) -> None:
    hub_device, module = edge_module_environment
    private_pem, public_pem = generate_keypair()
    (tmp_path / "registry.key").write_bytes(private_pem)
    (tmp_path / "data" / "trust").mkdir(parents=True)
    (tmp_path / "data" / "trust" / "registry.pub").write_bytes(public_pem)
    server = ArtifactServer(tmp_path / "artifacts").start()
    hub = HubStandIn(hub_broker, hub_device, module)
    settings = load_settings(
        device_id="lobby-cam-az",
        data_dir=tmp_path / "data",
        transport="azure",
        azure={"auth": "edge", "retry_interval_s": 1},
        model={"path": int8_model, "classes": ["person"], "threads": 1},
        sources=[{"id": "hall", "kind": "video", "uri": str(shared / "data/video/vtest.avi"), "loop": True}],
        publish={"mode": "every_frame", "publish_empty": True},
        crops={"max_side": 64, "bytes_per_second": 20_000},
        api={"enabled": False},
        telemetry_interval_s=1.0,
        ota={"token": TOKEN, "latency_budget_ms": 3000, "probation_s": 0.5, "probation_frames": 3},
        produced_log=tmp_path / "produced.txt",
    )
    agent = Agent(settings)
    assert isinstance(agent.session, AzureSession)
    try:
        agent.start()
        # Detections arrive as D2C messages of the module, JSON with the payload's msg_id as message id.
        assert hub.events.wait_for(lambda _: len(hub.d2c("detections")) >= 3, 20), hub.events.messages[:3]
        properties, message = hub.d2c("detections")[0]
        assert message.topic.startswith(f"devices/{hub_device}/modules/{module}/messages/events/")
        event = decode(DetectionEvent, message.payload)
        assert event.device_id == "lobby-cam-az"
        assert properties["$.mid"] == event.msg_id
        assert (properties["$.ct"], properties["$.ce"]) == ("application/json", "utf-8")
        # Status and the OTA state go to the module twin's reported properties.
        hub.wait_reported(lambda r: r.get("status", {}).get("state") == "online", 10, "status online")
        hub.wait_reported(lambda r: r.get("model", {}).get("state") == "active", 10, "the model active")
        assert hub.reported["model"]["model"] == {"name": "yolov8n_int8", "version": "local"}
        assert hub.twin_reads >= 1, "the agent reads the whole twin after connecting"

        _outage_keeps_rows_until_the_hub_acknowledges(agent, hub_broker, hub, tmp_path / "produced.txt")
        _desired_model_in_the_twin_runs_the_ota(agent, hub, server, int8_model, tmp_path)
    finally:
        agent.shutdown()
        hub.close()
        server.kill()
    statuses = [p["status"]["state"] for p in hub.reported_patches if "status" in p]
    assert statuses[-1] == "offline", statuses


def _outage_keeps_rows_until_the_hub_acknowledges(
    agent: Agent, broker: TlsMosquitto, hub: HubStandIn, produced_log: Path
) -> None:
    # The hub answers nothing: rows go out but stay in the outbox, since no send completes without a PUBACK.
    broker.pause()
    try:
        time.sleep(0.3)  # PUBACKs the broker wrote before it stopped arrive now
        before = agent.publisher.counters()
        wait_until(
            lambda: agent.publisher.counters().published >= before.published + 3, 15, "rows sent, unanswered"
        )
        during = agent.publisher.counters()
        assert during.acked == before.acked, "a row counted as delivered without the hub's PUBACK"
        assert agent.outbox.stats().depth >= during.inflight >= 3, "unacknowledged rows left the outbox"
    finally:
        broker.resume()
    # The hub is away: rows wait in the outbox and go out after the SDK reconnects.
    broker.stop()
    try:
        wait_until(lambda: not agent.session.connected, 10, "the agent to notice the outage")
        acked = agent.publisher.counters().acked
        wait_until(lambda: agent.outbox.stats().depth >= 3, 15, "detections to wait in the outbox")
        assert agent.publisher.counters().acked == acked, "nothing can be acknowledged while the hub is away"
    finally:
        broker.start()
    wait_until(lambda: agent.session.connected, 15, "the agent to reconnect")
    produced = produced_log.read_text().split()
    assert hub.events.wait_for(lambda _: not _missing(hub, produced), 20), (
        f"{len(_missing(hub, produced))} of {len(produced)} messages never reached the hub"
    )
    wait_until(lambda: agent.outbox.stats().depth < 10, 15, "the outbox to drain")
    crops = hub.d2c("crops")
    assert crops, "no crop reached the hub"
    assert {properties["$.ct"] for properties, _ in crops} == {"image/jpeg"}
    assert all(message.payload.startswith(b"\xff\xd8") for _, message in crops), "not JPEG bytes"


def _missing(hub: HubStandIn, produced: list[str]) -> set[str]:
    """The msg_ids committed to the outbox that no D2C message carried."""
    received = {properties["$.mid"] for kind in ("detections", "crops") for properties, _ in hub.d2c(kind)}
    return set(produced) - received


def _desired_model_in_the_twin_runs_the_ota(
    agent: Agent, hub: HubStandIn, server: ArtifactServer, int8_model: Path, tmp_path: Path
) -> None:
    variant = relabelled(int8_model, tmp_path / "variant.onnx", "azure")
    server.add("yolov8n_int8", "7", variant)
    desired = desired_for(
        "lobby-cam-az",
        variant,
        name="yolov8n_int8",
        version="7",
        base_url=server.base_url,
        rollout_id="r-azure",
        private_key=load_private_key(tmp_path / "registry.key"),
    )
    # A deployment's twin carries the model without the envelope (one desired model for many devices).
    twin_model = desired.model_dump(mode="json", by_alias=True, exclude={"schema_name", "msg_id", "ts"})
    twin_model.pop("device_id")
    hub.patch_desired({"model": twin_model})
    hub.wait_reported(
        lambda r: (
            r.get("model", {}).get("rollout_id") == "r-azure"
            and r["model"]["state"] == "active"
            and r["model"].get("progress") == 1.0
        ),
        40,
        "the desired model active after probation",
    )
    report = ModelReported.model_validate(hub.reported["model"])
    assert report.model is not None
    assert (report.model.name, report.model.version) == ("yolov8n_int8", "7")
    states = [p["model"]["state"] for p in hub.reported_patches if p.get("model", {}).get("rollout_id")]
    assert states[0] in {"downloading", "verifying"}, states
    assert OtaState.ACTIVE.value in states
    assert any(r["path"].endswith("/yolov8n_int8/7") for r in server.requests()), "nothing was downloaded"
    assert agent.model.get().ref.version == "7"


# ---- a device identity from a connection string in the environment ---------------------------------------


def test_device_connection_string_from_the_environment_sends_crops_with_their_properties(
    tmp_path: Path, hub_broker: TlsMosquitto, monkeypatch: pytest.MonkeyPatch, int8_model: Path
) -> None:
    device = f"dev-{new_msg_id()[-6:].lower()}"
    monkeypatch.setenv(
        "EDGEFLEET_AGENT_AZURE__CONNECTION_STRING",
        f"HostName={HUB_HOSTNAME};DeviceId={device};SharedAccessKey={_sas_key()};"
        f"GatewayHostName={hub_broker.host}",
    )
    settings = load_settings(
        device_id=device,
        transport="azure",
        azure={"auth": "connection_string", "server_ca": hub_broker.tls.ca, "retry_interval_s": 1},
        model={"path": int8_model},
        sources=[{"id": "cam", "kind": "camera", "uri": "0"}],
    )
    assert settings.azure.connection_string is not None
    hub = HubStandIn(hub_broker, device)
    session = AzureSession(settings, TOPICS)
    try:
        session.connect()
        assert session.wait_connected(10), "the SDK did not connect over TLS"
        crop = b"\xff\xd8fake-jpeg\xff\xd9"
        det_id = new_msg_id()
        properties = MessageProperties(
            content_type="image/jpeg",
            correlation_data=det_id.encode(),
            user_properties=(("msg_id", det_id), ("label", "person"), ("confidence", "0.91")),
        )
        handle = session.publish(TOPICS.crops(device), crop, properties=properties)
        assert handle.wait(10), handle.error
        assert handle.reason_code == 0
        assert hub.events.wait_for(lambda _: bool(hub.d2c("crops")), 10)
        (found, message), *_ = hub.d2c("crops")
        assert message.topic.startswith(f"devices/{device}/messages/events/")
        assert message.payload == crop
        assert found["$.ct"] == "image/jpeg"
        assert (found["$.mid"], found["$.cid"]) == (det_id, det_id)
        assert (found["label"], found["confidence"]) == ("person", "0.91")
        with pytest.raises(ValueError, match="over IoT Hub's device-to-cloud limit"):
            session.publish(TOPICS.crops(device), b"\0" * 300_000, properties=properties)
        # No desired model in the twin yet: nothing is handed over; a patch that sets one is.
        desired = Inbox()
        session.subscribe(TOPICS.model_desired(device), desired)
        wait_until(lambda: hub.twin_reads >= 1, 10, "the twin read after connecting")
        hub.patch_desired({"model": {"rollout_id": "r1", "name": "m", "version": "2"}})
        assert desired.wait_for(lambda got: bool(got), 10), "the desired patch never reached the subscriber"
        assert json.loads(desired.messages[0].payload)["rollout_id"] == "r1"
    finally:
        session.disconnect()
        hub.close()


# ---- twin bookkeeping, the manifest, and a device without the extra --------------------------------------


def test_desired_patches_merge_in_version_order_and_null_clears() -> None:
    desired = DesiredProperties()
    assert desired.apply_patch({"model": {"name": "a", "version": "1", "url": "http://x/a/1"}, "$version": 3})
    assert not desired.apply_twin({"model": {"name": "old"}, "$version": 2}), "an older full read is ignored"
    assert desired.apply_patch({"model": {"version": "2"}, "$version": 4})
    assert desired.get("model") == {"name": "a", "version": "2", "url": "http://x/a/1"}
    assert not desired.apply_patch({"model": {"version": "9"}, "$version": 4}), "a version is applied once"
    assert desired.apply_patch({"model": None, "$version": 5})
    assert desired.get("model") is None
    assert desired_model_payload(None, "cam-1") == b""


def test_deployment_manifest_configures_routes_and_desires_a_valid_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = json.loads(MANIFEST.read_text())["modulesContent"]
    agent_module = manifest["$edgeAgent"]["properties.desired"]["modules"]["edgefleetAgent"]
    assert agent_module["settings"]["image"] == "${EDGEFLEET_AGENT_IMAGE}"
    assert json.loads(agent_module["settings"]["createOptions"])["HostConfig"]["Binds"]
    routes = manifest["$edgeHub"]["properties.desired"]["routes"]
    assert any(r.startswith("FROM /messages/modules/edgefleetAgent/") for r in routes.values()), routes
    # The module's environment names real settings, holds no secret, and the device id comes from IoT Edge.
    env = {name: entry["value"] for name, entry in agent_module["env"].items()}
    assert not [name for name in env if any(s in name for s in ("KEY", "STRING", "PASS", "TOKEN"))]
    for name in list(os.environ):
        if name.startswith("EDGEFLEET_AGENT_"):
            monkeypatch.delenv(name)
    for name, value in {**env, "IOTEDGE_DEVICEID": "lobby-gw-01"}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(model={"path": "m.onnx"}, sources=[{"id": "cam", "kind": "camera", "uri": "0"}])
    assert (settings.transport, settings.azure.auth, settings.device_id) == ("azure", "edge", "lobby-gw-01")
    model = manifest["edgefleetAgent"]["properties.desired"]["model"]
    desired = decode_model_desired(desired_model_payload(model, "any-device"))
    assert desired is not None
    assert (desired.device_id, desired.name) == ("any-device", model["name"])


def test_importing_the_agent_loads_no_azure_code_and_a_missing_extra_names_the_install() -> None:
    probe = (
        "import sys\n"
        "import device_agent.agent, device_agent.config, device_agent.azure\n"
        "assert not [m for m in sys.modules if m.startswith('azure')], 'azure imported'\n"
        "sys.modules['azure.iot.device'] = None  # as on a device without the extra\n"
        "from device_agent.azure import AzureExtraMissingError, azure_session\n"
        "try:\n"
        "    azure_session(None, None)\n"
        "except AzureExtraMissingError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install 'edgefleet[azure]'" in result.stdout

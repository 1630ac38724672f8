"""What the agent starts on, from the OTA record on disk (real files, real onnxruntime, no broker)."""

from __future__ import annotations

import shutil
from pathlib import Path

from device_agent.config import OtaConfig
from device_agent.detector import Detector
from device_agent.model_store import STATE_FILE, ModelStore, OtaJob, OtaRecord, StoredModel
from device_agent.ota import OtaManager
from device_agent.pipeline import ActiveModel, ModelSlot
from fleet_protocol.payloads import ModelDesired, ModelRef, ModelReported, OtaState
from fleet_protocol.signing import file_digest
from tests.device_agent.ota_helpers import relabelled

CONFIGURED = ModelRef(name="yolov8n_int8", version="local")


def manager(tmp_path: Path, int8_model: Path, sent: list[ModelReported], **config: object) -> OtaManager:
    def load(path: Path, ref: ModelRef) -> ActiveModel:
        return ActiveModel(Detector(path, warmup=False), ref)

    return OtaManager(
        OtaConfig.model_validate(config),
        ModelStore(tmp_path / "models"),
        trust_store=tmp_path / "trust",
        load=load,
        load_configured=lambda: ActiveModel(Detector(int8_model), CONFIGURED),
        configured_path=int8_model,
        report=sent.append,
        device_id="boot-test",
    )


def stored(store: ModelStore, source: Path, version: str) -> tuple[StoredModel, ModelDesired]:
    path = relabelled(source, store.root / "tmp.onnx", version)
    digest, size = file_digest(path)
    desired = ModelDesired(
        device_id="boot-test",
        rollout_id=f"r-{version}",
        name="yolov8n",
        version=version,
        sha256=digest,
        size=size,
        url="http://127.0.0.1:1/x",
    )
    model = store.stored(desired, None)
    shutil.move(path, store.path_of(model))
    return model, desired


def test_a_damaged_current_file_falls_back_to_the_previous_model(tmp_path: Path, int8_model: Path) -> None:
    sent: list[ModelReported] = []
    ota = manager(tmp_path, int8_model, sent)
    old, _ = stored(ota.store, int8_model, "1")
    new, desired = stored(ota.store, int8_model, "2")
    job = OtaJob(desired=desired, state=OtaState.ACTIVE, committed=True)
    ota.store.save(OtaRecord(current=new, previous=old, job=job))
    with ota.store.path_of(new).open("r+b") as handle:  # one flipped byte deep inside the weights
        handle.seek(1_000_000)
        byte = handle.read(1)
        handle.seek(1_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))

    active = ota.boot()
    assert active.ref == ModelRef(name="yolov8n", version="1")
    record = ota.store.load()
    assert record.current == old
    assert record.job is not None
    assert record.job.state is OtaState.ROLLED_BACK
    ota.start(ModelSlot(active))
    ota.stop()
    assert sent[0].state is OtaState.ROLLED_BACK
    assert sent[0].model == ModelRef(name="yolov8n", version="2")
    assert sent[0].previous_model == ModelRef(name="yolov8n", version="1")
    assert "failed verification" in (sent[0].error or "")


def test_an_unreadable_record_is_set_aside_and_the_configured_model_runs(
    tmp_path: Path, int8_model: Path
) -> None:
    sent: list[ModelReported] = []
    ota = manager(tmp_path, int8_model, sent)
    (ota.store.root / STATE_FILE).write_text('{"format": 1, "current": {"name": ')
    active = ota.boot()
    assert active.ref == CONFIGURED
    assert list(ota.store.root.glob("ota-state.corrupt-*"))
    ota.start(ModelSlot(active))
    ota.stop()
    assert (sent[0].state, sent[0].model) == (OtaState.ACTIVE, CONFIGURED)


def test_too_many_crashes_on_probation_roll_back_at_start(tmp_path: Path, int8_model: Path) -> None:
    sent: list[ModelReported] = []
    ota = manager(tmp_path, int8_model, sent, max_restarts=1)
    new, desired = stored(ota.store, int8_model, "3")
    digest, size = file_digest(int8_model)
    configured = StoredModel(
        name=CONFIGURED.name, version="local", sha256=digest, size=size, file=str(int8_model), origin="config"
    )
    job = OtaJob(desired=desired, state=OtaState.ACTIVE, committed=False, restarts=1)
    ota.store.save(OtaRecord(current=new, previous=configured, job=job))

    active = ota.boot()  # the second crash on probation: this model does not get a third chance
    assert active.ref == CONFIGURED
    record = ota.store.load()
    assert record.current is None
    assert record.job is not None
    assert (record.job.state, record.job.restarts) == (OtaState.ROLLED_BACK, 2)
    ota.start(ModelSlot(active))
    ota.stop()
    assert sent[0].state is OtaState.ROLLED_BACK
    assert "restarted 2 times while on probation" in (sent[0].error or "")

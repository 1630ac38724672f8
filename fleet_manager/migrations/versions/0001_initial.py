"""Initial schema: devices, ingest tables, tokens, broker accounts, rollouts, append-only audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_device_id"), ["device_id"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_ts"), ["ts"], unique=False)
        batch_op.create_index("ix_audit_target", ["target_type", "target_id"], unique=False)

    op.create_table(
        "broker_accounts",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username"),
    )
    with op.batch_alter_table("broker_accounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_broker_accounts_device_id"), ["device_id"], unique=False)

    op.create_table(
        "crops",
        sa.Column("det_id", sa.String(length=26), nullable=False),
        sa.Column("msg_id", sa.String(length=26), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("jpeg", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("det_id"),
    )
    with op.batch_alter_table("crops", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_crops_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_crops_received_at"), ["received_at"], unique=False)

    op.create_table(
        "detection_objects",
        sa.Column("det_id", sa.String(length=26), nullable=False),
        sa.Column("msg_id", sa.String(length=26), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("track_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("det_id"),
    )
    with op.batch_alter_table("detection_objects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_detection_objects_msg_id"), ["msg_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_detection_objects_received_at"), ["received_at"], unique=False)

    op.create_table(
        "detections",
        sa.Column("msg_id", sa.String(length=26), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("frame_seq", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("pre_ms", sa.Float(), nullable=False),
        sa.Column("infer_ms", sa.Float(), nullable=False),
        sa.Column("post_ms", sa.Float(), nullable=False),
        sa.Column("object_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("msg_id"),
    )
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.create_index("ix_detections_device_ts", ["device_id", "ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_detections_received_at"), ["received_at"], unique=False)

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=True),
        sa.Column("provisioned", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("active_model_name", sa.String(length=128), nullable=True),
        sa.Column("active_model_version", sa.String(length=64), nullable=True),
        sa.Column("providers", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("telemetry", sa.JSON(), nullable=True),
        sa.Column("telemetry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fps", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("ota_state", sa.String(length=16), nullable=True),
        sa.Column("ota_rollout_id", sa.String(length=64), nullable=True),
        sa.Column("ota_model_name", sa.String(length=128), nullable=True),
        sa.Column("ota_model_version", sa.String(length=64), nullable=True),
        sa.Column("ota_progress", sa.Float(), nullable=True),
        sa.Column("ota_error", sa.Text(), nullable=True),
        sa.Column("ota_previous_name", sa.String(length=128), nullable=True),
        sa.Column("ota_previous_version", sa.String(length=64), nullable=True),
        sa.Column("ota_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("desired_rollout_id", sa.String(length=64), nullable=True),
        sa.Column("desired_name", sa.String(length=128), nullable=True),
        sa.Column("desired_version", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(
            "ix_devices_active_model", ["active_model_name", "active_model_version"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_devices_group_name"), ["group_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_state"), ["state"], unique=False)

    op.create_table(
        "ota_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("msg_id", sa.String(length=26), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("previous_name", sa.String(length=128), nullable=True),
        sa.Column("previous_version", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("msg_id"),
    )
    with op.batch_alter_table("ota_events", schema=None) as batch_op:
        batch_op.create_index("ix_ota_events_device_ts", ["device_id", "ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_ota_events_received_at"), ["received_at"], unique=False)

    op.create_table(
        "refinements",
        sa.Column("det_id", sa.String(length=26), nullable=False),
        sa.Column("msg_id", sa.String(length=26), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("edge_label", sa.String(length=128), nullable=False),
        sa.Column("refined_label", sa.String(length=128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("top_k", sa.JSON(), nullable=False),
        sa.Column("refiner_name", sa.String(length=128), nullable=False),
        sa.Column("refiner_version", sa.String(length=64), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("det_id"),
    )
    with op.batch_alter_table("refinements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_refinements_received_at"), ["received_at"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.String(length=512), nullable=True),
        sa.Column("variant", sa.String(length=32), nullable=True),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("success_threshold", sa.Float(), nullable=False),
        sa.Column("error_threshold", sa.Float(), nullable=False),
        sa.Column("on_error", sa.String(length=16), nullable=False),
        sa.Column("probation_s", sa.Float(), nullable=False),
        sa.Column("max_latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("require_telemetry", sa.Boolean(), nullable=False),
        sa.Column("auto_rollback", sa.Boolean(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("acknowledged_failures", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_state"), ["state"], unique=False)

    op.create_table(
        "telemetry_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fps", sa.Float(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("memory_mb", sa.Float(), nullable=False),
        sa.Column("temperature_c", sa.Float(), nullable=True),
        sa.Column("link_rtt_ms", sa.Float(), nullable=True),
        sa.Column("outbox_depth", sa.BigInteger(), nullable=False),
        sa.Column("outbox_dropped", sa.BigInteger(), nullable=False),
        sa.Column("frames_dropped", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("telemetry_samples", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_device_ts", ["device_id", "ts"], unique=False)

    op.create_table(
        "device_locks",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "key"),
    )
    with op.batch_alter_table("device_tags", schema=None) as batch_op:
        batch_op.create_index("ix_device_tags_key_value", ["key", "value"], unique=False)

    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("ota_state", sa.String(length=16), nullable=True),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("prev_name", sa.String(length=128), nullable=True),
        sa.Column("prev_version", sa.String(length=64), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("proven_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("desired_payload", sa.LargeBinary(), nullable=True),
        sa.Column("desired_seq", sa.Integer(), nullable=False),
        sa.Column("publish_pending", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),
    )
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollout_devices_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollout_devices_phase"), ["phase"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_rollout_devices_publish_pending"), ["publish_pending"], unique=False
        )
        batch_op.create_index(
            "ix_rollout_devices_rollout_wave", ["rollout_id", "wave", "position"], unique=False
        )

    _audit_log_append_only()


def downgrade() -> None:
    _drop_audit_triggers()
    with op.batch_alter_table("rollout_devices", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_devices_rollout_wave")
        batch_op.drop_index(batch_op.f("ix_rollout_devices_publish_pending"))
        batch_op.drop_index(batch_op.f("ix_rollout_devices_phase"))
        batch_op.drop_index(batch_op.f("ix_rollout_devices_device_id"))

    op.drop_table("rollout_devices")
    with op.batch_alter_table("device_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_device_tags_key_value")

    op.drop_table("device_tags")
    op.drop_table("device_locks")
    with op.batch_alter_table("telemetry_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_device_ts")

    op.drop_table("telemetry_samples")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollouts_state"))

    op.drop_table("rollouts")
    with op.batch_alter_table("refinements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_refinements_received_at"))

    op.drop_table("refinements")
    with op.batch_alter_table("ota_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ota_events_received_at"))
        batch_op.drop_index("ix_ota_events_device_ts")

    op.drop_table("ota_events")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_state"))
        batch_op.drop_index(batch_op.f("ix_devices_group_name"))
        batch_op.drop_index("ix_devices_active_model")

    op.drop_table("devices")
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_detections_received_at"))
        batch_op.drop_index("ix_detections_device_ts")

    op.drop_table("detections")
    with op.batch_alter_table("detection_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_detection_objects_received_at"))
        batch_op.drop_index(batch_op.f("ix_detection_objects_msg_id"))

    op.drop_table("detection_objects")
    with op.batch_alter_table("crops", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_crops_received_at"))
        batch_op.drop_index(batch_op.f("ix_crops_device_id"))

    op.drop_table("crops")
    with op.batch_alter_table("broker_accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_accounts_device_id"))

    op.drop_table("broker_accounts")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_target")
        batch_op.drop_index(batch_op.f("ix_audit_log_ts"))

    op.drop_table("audit_log")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_device_id"))

    op.drop_table("api_tokens")


def _audit_log_append_only() -> None:
    """The audit log refuses UPDATE and DELETE at the database level."""
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$"
    )
    op.execute(
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
    )


def _drop_audit_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        return
    op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
    op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")

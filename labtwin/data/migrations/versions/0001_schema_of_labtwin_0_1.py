"""Schema 1: the tables of labtwin 0.1, before migrations existed.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

A database made by labtwin 0.1 has these tables and no ``alembic_version``;
``labtwin.data.migrate`` checks their columns and adopts it as schema 1. Early
0.1 databases lack the tables added later (impedance, then anomalies and
cell_states), which 0.1 itself created on open: so does this revision, and it
leaves every table that exists as it is.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

DOUBLE = sa.DOUBLE_PRECISION


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("lab", sa.Text),
        sa.Column("channel", sa.Text),
        sa.Column("cell_id", sa.Text),
        sa.Column("protocol", sa.Text),
        sa.Column("n_steps", sa.Integer),
        sa.Column("started_at", sa.Text),
        sa.Column("stopped_at", sa.Text),
        sa.Column("exit_status", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("reported_samples", sa.Integer),
        sa.Column("reported_last_seq", sa.Integer),
        sa.Column("cell_time_s", DOUBLE),
        sa.Column("flow_run_id", sa.Text),
        sa.Column("start_doc", sa.Text),
        sa.Column("stop_doc", sa.Text),
        if_not_exists=True,
    )
    op.create_table(
        "batches",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "seq"),
        if_not_exists=True,
    )
    op.create_table(
        "samples",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("i", sa.Integer, nullable=False),
        sa.Column("time_s", DOUBLE),
        sa.Column("voltage_v", DOUBLE),
        sa.Column("current_a", DOUBLE),
        sa.Column("capacity_ah", DOUBLE),
        sa.Column("temperature_c", DOUBLE),
        sa.Column("step", sa.Integer),
        sa.Column("cycle", sa.Integer),
        if_not_exists=True,
    )
    op.create_index("samples_run_seq", "samples", ["run_id", "seq"], if_not_exists=True)
    op.create_table(
        "impedance",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("i", sa.Integer, nullable=False),
        sa.Column("frequency_hz", DOUBLE),
        sa.Column("z_real_ohm", DOUBLE),
        sa.Column("z_imag_ohm", DOUBLE),
        sa.PrimaryKeyConstraint("run_id", "seq", "i"),
        if_not_exists=True,
    )
    op.create_table(
        "step_events",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step_index", sa.Integer, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("channel", sa.Text),
        sa.Column("label", sa.Text),
        sa.Column("cycle", sa.Integer),
        sa.Column("step", sa.Text),
        sa.Column("time_s", DOUBLE),
        sa.Column("reason_kind", sa.Text),
        sa.Column("reason_name", sa.Text),
        sa.Column("doc", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step_index", "event"),
        if_not_exists=True,
    )
    op.create_table(
        "anomalies",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("cell", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("time_s", DOUBLE, nullable=False),
        sa.Column("detected_time_s", DOUBLE),
        sa.Column("step", sa.Integer),
        sa.Column("cycle", sa.Integer),
        sa.Column("action", sa.Text),
        sa.Column("message", sa.Text),
        sa.Column("doc", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "cell", "kind", "time_s"),
        if_not_exists=True,
    )
    op.create_table(
        "cell_states",
        sa.Column("cell", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("time_s", DOUBLE, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("cell", "run_id", "time_s"),
        if_not_exists=True,
    )


def downgrade() -> None:
    for table in ("cell_states", "anomalies", "step_events", "impedance", "samples", "batches", "runs"):
        op.drop_table(table)

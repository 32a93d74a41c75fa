"""Schema 2: a sample is unique on (run_id, seq, i); anomalies are indexed by cell; a run has an id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Schema 1 relied on the ``batches`` row alone to keep a re-delivered batch's
samples out; the unique index makes the database itself refuse a duplicate
sample, and it serves ``WHERE run_id = ? ORDER BY seq, i`` as the old
(run_id, seq) index did, so that one goes. A cell's anomalies are read across
runs (``Store.anomalies(cell=...)``): schema 1 scanned the table for them.
Both are indexes, not table rewrites, so a years-old SQLite file migrates
in the time it takes to build them.

On SQLite, 0.1's ``run_id TEXT PRIMARY KEY`` accepted NULL (SQLite enforces
NOT NULL only on INTEGER primary keys unless told); SQLAlchemy's DDL says NOT
NULL, as PostgreSQL always did. The runs table (a row per run) is rebuilt
with it on SQLite; on PostgreSQL the column already is NOT NULL. The
downgrade keeps it: 0.1 never wrote a run without an id.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("samples_run_seq_i", "samples", ["run_id", "seq", "i"], unique=True)
    op.drop_index("samples_run_seq", table_name="samples")
    op.create_index("anomalies_cell_time", "anomalies", ["cell", "time_s"])
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("runs", copy_from=_runs_of_schema_2(), recreate="always"):
            pass  # copied into the table as written below, rows and all


def _runs_of_schema_2() -> sa.Table:
    """The runs table as this revision leaves it (given whole, so SQLite's copy keeps DOUBLE PRECISION)."""
    return sa.Table(
        "runs",
        sa.MetaData(),
        sa.Column("run_id", sa.Text, primary_key=True, nullable=False),
        *(sa.Column(name, sa.Text) for name in ("lab", "channel", "cell_id", "protocol")),
        sa.Column("n_steps", sa.Integer),
        *(sa.Column(name, sa.Text) for name in ("started_at", "stopped_at", "exit_status", "reason")),
        sa.Column("reported_samples", sa.Integer),
        sa.Column("reported_last_seq", sa.Integer),
        sa.Column("cell_time_s", sa.DOUBLE_PRECISION),
        *(sa.Column(name, sa.Text) for name in ("flow_run_id", "start_doc", "stop_doc")),
    )


def downgrade() -> None:
    op.drop_index("anomalies_cell_time", table_name="anomalies")
    op.create_index("samples_run_seq", "samples", ["run_id", "seq"])
    op.drop_index("samples_run_seq_i", table_name="samples")

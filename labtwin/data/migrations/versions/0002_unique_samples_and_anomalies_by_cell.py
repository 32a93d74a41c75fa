"""Schema 2: a sample is unique on (run_id, seq, i); anomalies are indexed by cell.

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
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("samples_run_seq_i", "samples", ["run_id", "seq", "i"], unique=True)
    op.drop_index("samples_run_seq", table_name="samples")
    op.create_index("anomalies_cell_time", "anomalies", ["cell", "time_s"])


def downgrade() -> None:
    op.drop_index("anomalies_cell_time", table_name="anomalies")
    op.create_index("samples_run_seq", "samples", ["run_id", "seq"])
    op.drop_index("samples_run_seq_i", table_name="samples")

"""Schema 6: a run's samples also kept as column blocks, one per write, so a long run reads in milliseconds.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

The sample rows stay the record (SQL over them, digests, gap fill); a block is a copy of the rows one write
inserted, as compressed float64 columns, so ``Store.samples`` of a million-sample run reads blocks instead of
building a Python tuple per row (1.9 s). A run whose blocks do not add up to its batches (samples stored before
this schema) is read from its rows. An addition only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "sample_blocks",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("first_seq", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "first_seq"),
    )


def downgrade() -> None:
    """Schema 5 reads every run from its rows: the blocks are a copy, dropping them loses nothing."""
    op.drop_table("sample_blocks")

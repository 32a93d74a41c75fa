"""Schema 3: a batch row holds its samples' digest; a batch that collides with a stored one but differs is kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Schema 2 keyed a batch on (run_id, seq) alone, so a second batch under a
stored key was dropped as a duplicate whatever it held: a forged batch sent
ahead of the real one made the store keep the forgery and lose the truth
(issue 13). ``batches.digest`` is the sha256 of the samples as stored
(``labtwin.data.digest``); rows stored before this revision get NULL, and the
store computes their digest from their rows when a batch collides with one.
``batch_conflicts`` keeps each colliding batch that differs, whole.

Both are additions: SQLite adds the column in place (ALTER TABLE ADD COLUMN),
so a large file migrates without copying its batches.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("digest", sa.Text))  # NULL for the batches stored so far: "unknown"
    op.create_table(
        "batch_conflicts",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("incoming_digest", sa.Text, nullable=False),
        sa.Column("stored_digest", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("received_at", sa.Text, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "seq", "incoming_digest"),
    )


def downgrade() -> None:
    """Schema 2 has nowhere to keep a conflicting batch: going down drops them (and the digests) for good."""
    op.drop_table("batch_conflicts")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("digest")

"""Schema 4: a run's outages (the stretches no agent read the instrument) have a table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

An agent killed mid-run and restarted resumes the run from its spool and publishes an ``Outage`` document: the
span, and the charge the instrument passed in it when the instrument can say (issue 14: a resumed run's
record showed no gap). No existing table holds an event of another kind (step events are keyed on a step and
its started/ended), so this adds one; an addition only, nothing is copied.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "outages",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("from_time_s", sa.DOUBLE_PRECISION, nullable=False),
        sa.Column("channel", sa.Text),
        sa.Column("cause", sa.Text),
        sa.Column("step_index", sa.Integer),
        sa.Column("to_time_s", sa.DOUBLE_PRECISION),
        sa.Column("span_s", sa.DOUBLE_PRECISION),
        sa.Column("wall_span_s", sa.DOUBLE_PRECISION),
        sa.Column("charge_ah", sa.DOUBLE_PRECISION),
        sa.Column("doc", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "from_time_s"),
    )


def downgrade() -> None:
    """Schema 3 has nowhere to keep an outage: going down drops them."""
    op.drop_table("outages")

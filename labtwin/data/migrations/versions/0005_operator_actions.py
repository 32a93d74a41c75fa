"""Schema 5: operator actions (pause, resume, stop from the dashboard) are recorded with who and when.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

A lab must be able to say who paused a cell and when (issue 15): the dashboard writes one row per action it
sends, with the outcome the agent gave, and the run page shows them on the run's timeline. An addition only.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "operator_actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text),
        sa.Column("lab", sa.Text, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("user_name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("wall_time", sa.Text, nullable=False),
        sa.Column("time_s", sa.DOUBLE_PRECISION),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("operator_actions_run", "operator_actions", ["run_id"])


def downgrade() -> None:
    """Schema 4 has nowhere to keep an operator action: going down drops them."""
    op.drop_index("operator_actions_run", "operator_actions")
    op.drop_table("operator_actions")

"""delivered_messages.part: per-part delivery progress (a split message resumes, not re-sends)

Revision ID: 0004
Revises: 0003

Rows written before this revision recorded every platform message of one outbox position at
once, in posting order; they are numbered 0, 1, ... by id within their (job, position), so the
new unique (job_id, position, part) holds for them too.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CONSTRAINT = "uq_delivered_messages_job_position_part"


def upgrade() -> None:
    with op.batch_alter_table("delivered_messages") as batch:
        batch.add_column(sa.Column("part", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE delivered_messages SET part = (SELECT COUNT(*) FROM delivered_messages AS earlier"
        " WHERE earlier.job_id = delivered_messages.job_id"
        " AND earlier.position = delivered_messages.position"
        " AND earlier.id < delivered_messages.id)")
    with op.batch_alter_table("delivered_messages") as batch:
        batch.create_unique_constraint(CONSTRAINT, ["job_id", "position", "part"])


def downgrade() -> None:
    with op.batch_alter_table("delivered_messages") as batch:
        batch.drop_constraint(CONSTRAINT, type_="unique")
        batch.drop_column("part")

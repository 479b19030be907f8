"""trust: audit log, request log (quotas), confirmations, and fair-share columns on jobs

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("community_id", sa.Integer(),
                  sa.ForeignKey("communities.id", ondelete="CASCADE"), nullable=True),
        sa.Column("actor_user_id", sa.Integer(),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("subject_user_id", sa.Integer(),
                  sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("job_id", sa.String(16), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_audit_events_community_created", "audit_events",
                    ["community_id", "created_at"])
    op.create_table(
        "request_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("community_id", sa.Integer(),
                  sa.ForeignKey("communities.id", ondelete="CASCADE"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_request_log_person_created", "request_log", ["person_id", "created_at"])
    op.create_index("ix_request_log_community_created", "request_log",
                    ["community_id", "created_at"])
    op.create_table(
        "confirmations",
        sa.Column("code", sa.String(16), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("requester", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("held", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.create_index("ix_jobs_requester_state", "jobs", ["requester", "kind", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_requester_state", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("held")
        batch.drop_column("requester")
    op.drop_table("confirmations")
    op.drop_index("ix_request_log_community_created", table_name="request_log")
    op.drop_index("ix_request_log_person_created", table_name="request_log")
    op.drop_table("request_log")
    op.drop_index("ix_audit_events_community_created", table_name="audit_events")
    op.drop_table("audit_events")

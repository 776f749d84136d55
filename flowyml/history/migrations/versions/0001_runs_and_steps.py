"""Runs, their steps, and the housekeeping table.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flowyml_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("duration_s", sa.Float),
        sa.Column("backend", sa.String(32)),
        sa.Column("workers", sa.Integer),
        sa.Column("host", sa.String(255)),
        sa.Column("host_id", sa.String(128)),
        sa.Column("pid", sa.Integer),
        sa.Column("pid_started", sa.Float),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("user", sa.String(255)),
        sa.Column("command", sa.Text),
        sa.Column("flowyml_version", sa.String(32)),
        sa.Column("dask_version", sa.String(32)),
        sa.Column("pandas_version", sa.String(32)),
        sa.Column("params", sa.JSON),
        sa.Column("sources", sa.JSON),
        sa.Column("tasks", sa.Integer),
        sa.Column("cached_tasks", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("report_path", sa.Text),
    )
    op.create_index("ix_flowyml_runs_run_id", "flowyml_runs", ["run_id"])
    op.create_index("ix_flowyml_runs_pipeline", "flowyml_runs", ["pipeline"])
    op.create_index("ix_flowyml_runs_status", "flowyml_runs", ["status"])
    op.create_index("ix_flowyml_runs_started_at", "flowyml_runs", ["started_at"])
    op.create_table(
        "flowyml_steps",
        sa.Column("run", sa.String(32), sa.ForeignKey("flowyml_runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tasks", sa.Integer),
        sa.Column("cached_tasks", sa.Integer),
        sa.Column("attempts", sa.Integer),
        sa.Column("duration_s", sa.Float),
        sa.Column("partitions", sa.Integer),
        sa.Column("rows_in", sa.BigInteger),
        sa.Column("rows_out", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
    )
    meta = op.create_table(
        "flowyml_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text),
    )
    # Runs prune old runs once a day, the first a day after the history is made.
    op.bulk_insert(meta, [{"name": "pruned_at", "value": datetime.now(UTC).isoformat()}])


def downgrade() -> None:
    op.drop_table("flowyml_meta")
    op.drop_table("flowyml_steps")
    op.drop_index("ix_flowyml_runs_started_at", "flowyml_runs")
    op.drop_index("ix_flowyml_runs_status", "flowyml_runs")
    op.drop_index("ix_flowyml_runs_pipeline", "flowyml_runs")
    op.drop_index("ix_flowyml_runs_run_id", "flowyml_runs")
    op.drop_table("flowyml_runs")

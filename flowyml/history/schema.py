"""The history's tables, as SQLAlchemy Core sees them; the migrations in ``migrations/versions`` make them.

A table changed here needs a new migration there (``tests/test_history.py``
checks that the migrated database and these tables agree).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["meta", "metadata", "runs", "steps"]

metadata = sa.MetaData()

#: One row per run: what ran, where, with what, and how it ended.
runs = sa.Table(
    "flowyml_runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # a uuid: run ids are short, and many hosts may share
    sa.Column("run_id", sa.String(32), nullable=False, index=True),
    sa.Column("pipeline", sa.String(200), nullable=False, index=True),
    # running, succeeded, failed, interrupted, lost
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("duration_s", sa.Float),
    sa.Column("backend", sa.String(32)),
    sa.Column("workers", sa.Integer),
    sa.Column("host", sa.String(255)),
    sa.Column("host_id", sa.String(128)),  # this boot of this machine (or container), as processes see it
    sa.Column("pid", sa.Integer),
    sa.Column("pid_started", sa.Float),  # the process's start time: a reused pid is not this run
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

#: One row per step of a run that ended.
steps = sa.Table(
    "flowyml_steps",
    metadata,
    sa.Column("run", sa.String(32), sa.ForeignKey("flowyml_runs.id", ondelete="CASCADE"), primary_key=True),
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

#: Housekeeping: when runs were last pruned.
meta = sa.Table(
    "flowyml_meta",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text),
)

"""Reading the history: runs as a DataFrame, one run in full, steps over recent runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .config import HistoryConfigError, parse_age
from .database import open_engine, transaction
from .maintenance import mark_lost
from .recorder import flush
from .schema import runs, steps

__all__ = ["RUN_COLUMNS", "open_history", "read_run", "read_runs", "read_steps", "since_time"]

#: The columns of ``flowyml.history.runs()``, in order.
RUN_COLUMNS = ("run_id", "pipeline", "status", "started_at", "ended_at", "duration_s", "tasks", "cached_tasks",
               "backend", "workers", "host", "user", "error", "report_path", "command", "flowyml_version",
               "dask_version", "pandas_version")

#: The step columns of ``flowyml.history.steps()`` (then the run's ``started_at`` and ``run_status``).
STEP_COLUMNS = ("run_id", "position", "name", "status", "duration_s", "tasks", "cached_tasks", "attempts",
                "partitions", "rows_in", "rows_out", "error")


def open_history(url: str | None) -> sa.Engine:
    """The history's engine, its runs whose process died marked lost first."""
    if url is None:
        raise HistoryConfigError("the run history is off (FLOWYML_HISTORY=off): unset it, or pass url=")
    flush()  # this process's runs that ended are read complete
    engine = open_engine(url)
    mark_lost(engine)
    return engine


def since_time(since: str | timedelta | datetime | None) -> datetime | None:
    """``"7d"``, a ``timedelta`` (that long ago) or a ``datetime`` (naive: UTC) as an aware UTC time."""
    if since is None:
        return None
    if isinstance(since, str):
        text = since
        try:
            since = datetime.fromisoformat(text)
        except ValueError:
            since = parse_age(text, "since")
    if isinstance(since, timedelta):
        return datetime.now(UTC) - since
    return since if since.tzinfo is not None else since.replace(tzinfo=UTC)


def read_runs(engine: sa.Engine, pipeline: str | None = None, status: str | None = None,
              since: datetime | None = None, limit: int | None = 100) -> list[dict[str, Any]]:
    """Runs, newest first, as dicts of ``RUN_COLUMNS``."""
    query = sa.select(*(runs.c[name] for name in RUN_COLUMNS)).order_by(runs.c.started_at.desc())
    if pipeline is not None:
        query = query.where(runs.c.pipeline == pipeline)
    if status is not None:
        query = query.where(runs.c.status == status)
    if since is not None:
        query = query.where(runs.c.started_at >= since)
    if limit is not None:
        query = query.limit(limit)
    rows = transaction(engine, lambda c: c.execute(query).mappings().all())
    return [_aware(dict(row)) for row in rows]


def read_run(engine: sa.Engine, run_id: str) -> dict[str, Any] | None:
    """One run with every field, and its steps in order; None when no run has that id.

    A unique prefix of a run id names it too.
    """
    def read(connection: sa.Connection) -> dict[str, Any] | None:
        found = connection.execute(sa.select(runs).where(runs.c.run_id.startswith(run_id, autoescape=True))
                                   .limit(2)).mappings().all()
        exact = [row for row in found if row["run_id"] == run_id]
        if len(found) != 1 and not exact:
            return None
        row = dict(exact[0] if exact else found[0])
        row["steps"] = [dict(s) for s in connection.execute(
            sa.select(steps).where(steps.c.run_id == row["run_id"]).order_by(steps.c.position)).mappings()]
        return row

    row = transaction(engine, read)
    return _aware(row) if row is not None else None


def read_steps(engine: sa.Engine, pipeline: str, last: int) -> list[dict[str, Any]]:
    """The steps of the pipeline's ``last`` ended runs, oldest run first."""
    recent = (sa.select(runs.c.run_id, runs.c.started_at, runs.c.status.label("run_status"))
              .where(runs.c.pipeline == pipeline, runs.c.status != "running")
              .order_by(runs.c.started_at.desc()).limit(last).subquery())
    query = (sa.select(*(steps.c[name] for name in STEP_COLUMNS), recent.c.started_at, recent.c.run_status)
             .join(recent, steps.c.run_id == recent.c.run_id)
             .order_by(recent.c.started_at, steps.c.position))
    rows = transaction(engine, lambda c: c.execute(query).mappings().all())
    return [_aware(dict(row)) for row in rows]


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite keeps no time zone: its times come back naive, and are UTC."""
    for name in ("started_at", "ended_at", "heartbeat_at"):
        value = row.get(name)
        if isinstance(value, datetime) and value.tzinfo is None:
            row[name] = value.replace(tzinfo=UTC)
    return row

"""Reading the history: runs as a DataFrame, one run in full, steps over recent runs."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .config import HistoryConfigError, HistoryWarning, parse_age
from .database import open_engine, transaction
from .maintenance import mark_lost
from .recorder import flush
from .schema import runs, steps

__all__ = ["RUN_COLUMNS", "open_history", "read_run", "read_runs", "read_steps", "recent", "since_time"]

#: Seconds a read waits for the records this process is still writing.
READ_WAIT = 60.0

#: The columns of ``flowyml.history.runs()``, in order.
RUN_COLUMNS = ("run_id", "pipeline", "status", "started_at", "ended_at", "duration_s", "tasks", "cached_tasks",
               "backend", "workers", "host", "user", "error", "report_path", "command", "flowyml_version",
               "dask_version", "pandas_version")

#: The step columns of ``flowyml.history.steps()`` (then the run's ``started_at`` and ``run_status``).
STEP_COLUMNS = ("run_id", "position", "name", "status", "duration_s", "tasks", "cached_tasks", "attempts",
                "partitions", "rows_in", "rows_out", "error", "traceback")


def open_history(url: str | None) -> sa.Engine:
    """The history's engine, its runs whose process died marked lost first."""
    if url is None:
        raise HistoryConfigError("the run history is off (FLOWYML_HISTORY=off): unset it, or pass url=")
    if not flush(READ_WAIT):  # this process's runs that ended are read complete
        warnings.warn(f"flowyml: runs of this process are still being recorded after {READ_WAIT:g} s; "
                      "the history is read without them", HistoryWarning, stacklevel=3)
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
    # In UTC: SQLite keeps times without their zone, and compares them as text.
    return since.astimezone(UTC) if since.tzinfo is not None else since.replace(tzinfo=UTC)


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
    rows = transaction(engine, lambda c: c.execute(query).mappings().all(), write=False)
    return [_aware(dict(row)) for row in rows]


def read_run(engine: sa.Engine, run_id: str) -> dict[str, Any] | None:
    """One run with every field, and its steps in order; None when no run has that id.

    A unique prefix of a run id names it too; of runs sharing an id (ids are
    short, and hosts many), the newest.
    """
    def read(connection: sa.Connection) -> dict[str, Any] | None:
        found = connection.execute(
            sa.select(runs).where(runs.c.run_id.startswith(run_id, autoescape=True))
            .order_by(runs.c.started_at.desc()).limit(50)).mappings().all()
        exact = [row for row in found if row["run_id"] == run_id]
        if not exact and len({row["run_id"] for row in found}) != 1:
            return None
        row = dict(exact[0] if exact else found[0])
        row["steps"] = [dict(s) for s in connection.execute(
            sa.select(*(steps.c[name] for name in STEP_COLUMNS[1:])).where(steps.c.run == row["id"])
            .order_by(steps.c.position)).mappings()]
        for s in row["steps"]:
            s["run_id"] = row["run_id"]
        return row

    row = transaction(engine, read, write=False)
    return _aware(row) if row is not None else None


def read_steps(engine: sa.Engine, pipeline: str, last: int) -> list[dict[str, Any]]:
    """The steps of the pipeline's ``last`` ended runs, oldest run first."""
    recent = (sa.select(runs.c.id, runs.c.run_id, runs.c.started_at, runs.c.status.label("run_status"))
              .where(runs.c.pipeline == pipeline, runs.c.status != "running")
              .order_by(runs.c.started_at.desc()).limit(last).subquery())
    query = (sa.select(recent.c.run_id, *(steps.c[name] for name in STEP_COLUMNS[1:]), recent.c.started_at,
                       recent.c.run_status)
             .join(recent, steps.c.run == recent.c.id)
             .order_by(recent.c.started_at, steps.c.position))
    rows = transaction(engine, lambda c: c.execute(query).mappings().all(), write=False)
    return [_aware(dict(row)) for row in rows]


def recent(engine: sa.Engine, pipeline: str, last: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pipeline's ``last`` runs, oldest first, and their steps: what the trends page charts."""
    return list(reversed(read_runs(engine, pipeline, None, None, last))), read_steps(engine, pipeline, last)


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite keeps no time zone: its times come back naive, and are UTC."""
    for name in ("started_at", "ended_at", "heartbeat_at"):
        value = row.get(name)
        if isinstance(value, datetime) and value.tzinfo is None:
            row[name] = value.replace(tzinfo=UTC)
    return row

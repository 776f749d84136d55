"""Keeping the history true and small: runs whose process died are marked lost, old runs are pruned."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .config import LOST_AFTER, retention
from .database import transaction
from .schema import meta, runs, steps

__all__ = ["mark_lost", "prune", "prune_by_retention", "prune_due"]

#: How often runs prune the history themselves (``FLOWYML_HISTORY_RETENTION``).
PRUNE_EVERY = timedelta(days=1)


def mark_lost(engine: sa.Engine) -> int:
    """Mark ``lost`` the runs still ``running`` whose process is gone; how many.

    A run of this host is lost once its process is gone (its pid is not
    running, or runs a process started at another time). A run of another
    host is lost once its heartbeat is older than ``LOST_AFTER``.
    """
    import psutil

    host = socket.gethostname()
    stale = datetime.now(UTC) - LOST_AFTER

    def mark(connection: sa.Connection) -> int:
        rows = connection.execute(
            sa.select(runs.c.run_id, runs.c.host, runs.c.pid, runs.c.pid_started, runs.c.heartbeat_at)
            .where(runs.c.status == "running")
        ).all()
        lost = [row for row in rows if _gone(row, host, stale, psutil)]
        for row in lost:
            connection.execute(
                runs.update().where(runs.c.run_id == row.run_id, runs.c.status == "running")
                .values(status="lost", ended_at=row.heartbeat_at,
                        error="the run's process ended without completing its record (killed, or out of memory)")
            )
        return len(lost)

    return transaction(engine, mark)


def _gone(row: Any, host: str, stale: datetime, psutil: Any) -> bool:
    if row.host == host and row.pid is not None:
        try:
            process = psutil.Process(row.pid)
            return row.pid_started is not None and abs(process.create_time() - row.pid_started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # not ours to inspect: judge by the heartbeat
            pass
    beat = row.heartbeat_at
    if beat is not None and beat.tzinfo is None:  # SQLite hands back naive UTC datetimes
        beat = beat.replace(tzinfo=UTC)
    return beat is not None and beat < stale


def prune(engine: sa.Engine, older_than: timedelta) -> int:
    """Delete the runs that started more than ``older_than`` ago, with their steps; how many."""
    cutoff = datetime.now(UTC) - older_than

    def delete(connection: sa.Connection) -> int:
        old = sa.select(runs.c.run_id).where(runs.c.started_at < cutoff, runs.c.status != "running")
        connection.execute(steps.delete().where(steps.c.run_id.in_(old)))
        return connection.execute(
            runs.delete().where(runs.c.started_at < cutoff, runs.c.status != "running")).rowcount

    return transaction(engine, delete)


def prune_due(connection: sa.Connection) -> bool:
    """Whether this run prunes the history now: at most once per ``PRUNE_EVERY``, claimed atomically.

    One statement in the run's completing transaction: of many runs ending at
    once, one prunes. The row is made by the first migration; ISO 8601 times
    in UTC compare as strings.
    """
    if retention() is None:
        return False
    now = datetime.now(UTC)
    claimed = connection.execute(
        meta.update().where(meta.c.name == "pruned_at", meta.c.value < (now - PRUNE_EVERY).isoformat())
        .values(value=now.isoformat()))
    return claimed.rowcount == 1


def prune_by_retention(engine: sa.Engine) -> None:
    """Delete the runs older than ``FLOWYML_HISTORY_RETENTION`` (default 90 days)."""
    keep = retention()
    if keep is not None:
        prune(engine, keep)

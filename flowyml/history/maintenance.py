"""Keeping the history true and small: runs whose process died are marked lost, old runs are pruned."""

from __future__ import annotations

import functools
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .config import LOST_AFTER
from .database import transaction
from .schema import meta, runs, steps

__all__ = ["host_id", "mark_lost", "prune", "prune_due"]

#: How often runs prune the history themselves (``FLOWYML_HISTORY_RETENTION``).
PRUNE_EVERY = timedelta(days=1)


def mark_lost(engine: sa.Engine) -> int:
    """Mark ``lost`` the runs still ``running`` whose process is gone; how many.

    A run of this host (the same boot of the same machine, seen from the same
    process namespace) is lost once its process is gone: its pid runs
    nothing, or a process started at another time. A run of another host is
    lost once its heartbeat is older than ``LOST_AFTER``. Best effort: a
    history this process may only read is read as it is.
    """
    import psutil

    here = host_id()
    stale = datetime.now(UTC) - LOST_AFTER
    columns = (runs.c.id, runs.c.host_id, runs.c.pid, runs.c.pid_started, runs.c.heartbeat_at)
    try:
        running = transaction(engine, lambda c: c.execute(sa.select(*columns).where(runs.c.status == "running"))
                              .all(), write=False)
        lost = [row for row in running if _gone(row, here, stale, psutil)]
        if not lost:
            return 0

        def mark(connection: sa.Connection) -> int:
            for row in lost:
                connection.execute(
                    runs.update().where(runs.c.id == row.id, runs.c.status == "running")
                    .values(status="lost", ended_at=row.heartbeat_at,
                            error="the run's process ended without completing its record "
                                  "(killed, or out of memory)"))
            return len(lost)

        return transaction(engine, mark)
    except sa.exc.SQLAlchemyError:
        return 0


@functools.cache
def host_id() -> str:
    """This boot of this machine as its processes see it: process ids mean the same to all that share it.

    The kernel's boot id and this process's pid namespace (containers of one
    machine have their own); the host name where Linux's are not to be had.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return f"host:{socket.gethostname()}"


def _gone(row: Any, here: str, stale: datetime, psutil: Any) -> bool:
    if row.host_id == here and row.pid is not None:
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
        old = sa.select(runs.c.id).where(runs.c.started_at < cutoff, runs.c.status != "running")
        connection.execute(steps.delete().where(steps.c.run.in_(old)))
        return connection.execute(
            runs.delete().where(runs.c.started_at < cutoff, runs.c.status != "running")).rowcount

    return transaction(engine, delete)


def prune_due(connection: sa.Connection) -> bool:
    """Whether this run prunes the history now: at most once per ``PRUNE_EVERY``, claimed atomically.

    One statement in the run's completing transaction: of many runs ending at
    once, one prunes. The row is made by the first migration; ISO 8601 times
    in UTC compare as strings.
    """
    now = datetime.now(UTC)
    claimed = connection.execute(
        meta.update().where(meta.c.name == "pruned_at", meta.c.value < (now - PRUNE_EVERY).isoformat())
        .values(value=now.isoformat()))
    return claimed.rowcount == 1

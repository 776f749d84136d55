"""What a running task knows about itself: step, partition, attempt, run.

Sinks (``write_parquet``), log records and the cache read it; users may too::

    from flowyml.context import current_task

    @step(per_partition=True)
    def tag(df):
        return df.assign(partition=current_task().partition)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

__all__ = ["TaskContext", "current_task"]


class TaskContext(NamedTuple):
    """The task being run: ``step`` name, ``partition`` (None for a whole step),
    ``attempt`` (1 for the first) and ``run_id`` (unique per ``Pipeline.run``)."""

    step: str
    partition: int | None
    attempt: int
    run_id: str


#: The running task, as a TaskContext or, set by the task wrappers on every
#: call, as the plain tuple ``(step, partition, attempt, run_id)``: a tuple
#: costs far less to make than a TaskContext, and most tasks never ask.
_current: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("flowyml_task", default=None)


def current_task() -> TaskContext | None:
    """The task running in this thread, or None outside a flowyml task."""
    value = _current.get()
    if value is None or type(value) is TaskContext:
        return value
    return TaskContext._make(value)


@contextmanager
def running(context: TaskContext) -> Iterator[TaskContext]:
    """Mark ``context`` as the current task for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def _dask_worker() -> Any:
    """The Dask worker running this code, or None (read by tasks.py and memory.py)."""
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except ValueError:  # not inside a distributed worker
        return None

"""What a running task knows about itself: step, partition, attempt, run.

Sinks (``write_parquet``), log records and the cache read it; users may too::

    from flowyml.context import current_task

    @step(per_partition=True)
    def tag(df):
        return df.assign(partition=current_task().partition)
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["TaskContext", "current_task"]


@dataclass(frozen=True)
class TaskContext:
    """The task being run: ``step`` name, ``partition`` (None for a whole step),
    ``attempt`` (1 for the first) and ``run_id`` (unique per ``Pipeline.run``)."""

    step: str
    partition: int | None
    attempt: int
    run_id: str


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "flowyml_task", default=None
)


def current_task() -> TaskContext | None:
    """The task running in this thread, or None outside a flowyml task."""
    return _current.get()


@contextmanager
def running(context: TaskContext) -> Iterator[TaskContext]:
    """Mark ``context`` as the current task for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)

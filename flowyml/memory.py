"""A warning before a whole-dataset step concatenates more than a share of a worker's memory.

A step that is not ``per_partition`` receives its partitioned input as one
object, ``pandas.concat`` of every partition, built in one task on one
worker. When that object is a large share of the worker's memory the task
is where a job runs out of memory, so the worker says so *before* it
concatenates, naming the step, the partitions, the bytes and the fix
(``per_partition=True``, or ``split_every=k`` for a tree of small groups).

A worker's memory is, in order: ``FLOWYML_WORKER_MEMORY`` (``"4GB"``), the
Dask worker's ``memory_limit`` on ``distributed``, else this machine's RAM
(psutil). The warning fires above :data:`SHARE` of it, counting each
partition as ``DataFrame.memory_usage(deep=False)`` does: cheap, exact for
numeric and Arrow-backed columns, an underestimate for Python-object ones.
It is logged under ``flowyml.memory`` from the worker, so on ``process`` and
``distributed`` it reaches the driver with the step's other logs; on ``sync``
and ``thread`` it is also a :class:`~flowyml.exceptions.MemoryWarning`, which
notebooks show without any logging set up.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from .context import _dask_worker
from .exceptions import MemoryWarning

__all__ = ["SHARE", "check_concat", "shallow_bytes", "worker_memory"]

log = logging.getLogger("flowyml.memory")

#: Warn when one concatenation would hold more than this share of a worker's memory.
SHARE = 0.5


def worker_memory() -> int | None:
    """Bytes one worker may use: ``FLOWYML_WORKER_MEMORY``, the Dask worker's limit, or the RAM."""
    configured = os.environ.get("FLOWYML_WORKER_MEMORY")
    if configured:
        from dask.utils import parse_bytes

        return int(parse_bytes(configured))
    worker = _dask_worker()
    if worker is not None:
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        if limit:
            return int(limit)
    import psutil

    return int(psutil.virtual_memory().total)


def check_concat(step: str, parts: Sequence[Any]) -> None:
    """Warn (see the module docstring) if concatenating ``parts`` for ``step`` is too big."""
    total = sum(_shallow_bytes(part) for part in parts)
    limit = worker_memory()
    if not limit or total <= SHARE * limit:
        return
    from dask.utils import format_bytes

    message = (
        f"step {step!r} concatenates {len(parts)} partitions, {format_bytes(total)} in memory, in "
        f"one task: more than {round(SHARE * 100)}% of a worker's {format_bytes(limit)}. Make it "
        f"per_partition=True if it works row by row, or give it split_every=k to combine at most "
        f"k partitions a task as a tree (see 'Tree reductions' in docs/partitions.md); "
        f"FLOWYML_WORKER_MEMORY sets the memory assumed"
    )
    log.warning("%s", message)
    if _in_driver():  # elsewhere the log record is forwarded to the driver instead
        warnings.warn(message, MemoryWarning, stacklevel=2)


def shallow_bytes(value: Any) -> int:
    """A cheap estimate of ``value``'s bytes in memory.

    A DataFrame or Series counts as :func:`check_concat` counts it (Python
    objects as their pointers); anything else as ``dask.sizeof`` estimates it.
    """
    import pandas as pd

    if isinstance(value, (pd.DataFrame, pd.Series)):
        return _shallow_bytes(value)
    from dask.sizeof import sizeof

    return int(sizeof(value))


def _shallow_bytes(part: Any) -> int:
    """``part.memory_usage(index=True, deep=False)``'s total, without the Series it builds.

    That Series costs about half a millisecond a frame: a whole step over
    many small partitions (a monthly summary each) paid more for the check
    than for its own work.
    """
    if part.ndim == 1:  # a Series counts itself without building anything
        return int(part.memory_usage(index=True, deep=False))
    index = int(part.index.memory_usage(deep=False))
    return index + sum(int(column.memory_usage(index=False, deep=False)) for _, column in part.items())


def _in_driver() -> bool:
    """True on ``sync`` and ``thread``: this task runs in the process that started the run."""
    import multiprocessing

    return multiprocessing.parent_process() is None and _dask_worker() is None

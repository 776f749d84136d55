"""The backend contract and its registry."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

__all__ = ["BACKENDS", "Backend", "RunHooks", "register"]

BACKENDS: dict[str, type[Backend]] = {}


class RunHooks(Protocol):
    """What a backend reports while a graph runs (progress, the report).

    Local backends call ``task_started``/``task_finished`` with keys as Dask runs
    them; a backend that cannot see results (distributed) hands the outcomes its
    workers published to ``task_reported`` instead (a later report of the same
    task replaces the record). ``add_report_html`` adds a section to the run's
    HTML report (distributed: Dask's performance report, workers lost).
    ``watches_starts`` False says ``task_started`` does nothing, so a backend
    may skip calling it. ``pipeline`` names the run's pipeline (distributed:
    its Dask span). ``graph``, where present, is the run's compiled graph
    (distributed: announced to the scheduler's flowyml page, see
    :mod:`flowyml.dashboard`).
    """

    run_id: str
    pipeline: str
    watches_starts: bool

    def task_reported(self, outcome: Any) -> None: ...

    def task_started(self, key: Hashable) -> None: ...

    def task_finished(self, key: Hashable, outcome: Any) -> None: ...

    def add_report_html(self, html: str) -> None: ...


class Backend:
    """One way to run a Dask graph. Subclasses only pick and manage the scheduler.

    ``execute(dsk, keys, hooks)`` returns the results of ``keys`` in order.
    ``pickles`` says whether tasks cross a process boundary (so steps and inputs
    must pickle). ``key_suffix(run_id)`` names the run in task keys where runs may
    share a scheduler.
    """

    name: ClassVar[str]
    pickles: ClassVar[bool] = False
    #: Fuse straight per-partition chains into one task each (see ``fuse.py``):
    #: for schedulers that send every task result back through one process.
    fuses_partitions: ClassVar[bool] = False
    #: Key the whole-step tasks of a function added under several names by the
    #: function (see ``compile.py``): for schedulers whose cost grows with the
    #: number of distinct task prefixes (Dask's distributed scheduler).
    groups_copies: ClassVar[bool] = False
    #: Has a ``client`` and a dashboard that users read before a run (distributed).
    has_client: ClassVar[bool] = False

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self.dashboard_link: str | None = None
        #: The scheduler's flowyml page (``/flowyml``), when it serves one (distributed).
        self.flowyml_page_link: str | None = None

    def start(self) -> None:
        """Begin starting the pool or cluster without waiting for it; ``open`` waits.

        A run calls it once it knows it has tasks to execute, so the start
        overlaps what the run still does on the driver (compiling, cache
        checks). Safe to call again. Default: nothing to begin early.
        """

    def open(self) -> None:
        """Start the pool or cluster (or finish what ``start`` began); return once it is ready.

        Called by the first run that executes tasks: once per ``with`` block,
        else once per run.
        """

    def cancel_start(self) -> None:
        """Stop a ``start`` that no run went on to ``open`` (the run failed before its tasks).

        Leaves alone a pool or cluster that a run did open. Default: nothing.
        """

    def close(self) -> None:
        """Stop what ``start`` and ``open`` started, even half-way; safe to call twice."""

    def key_suffix(self, run_id: str) -> str:
        return ""

    def check_local_paths(self, paths: Sequence[Any]) -> None:
        """Raise unless the workers see these local paths (:class:`flowyml.io.shared.LocalPath`).

        Called once the backend is open, before a run's tasks are sent. Workers
        of the local backends share this machine's disk: nothing to check.
        """

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        raise NotImplementedError


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available by its ``name``."""
    BACKENDS[cls.name] = cls
    return cls

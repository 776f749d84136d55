"""ParallelExecutor: which Dask scheduler runs a pipeline, and its workers.

A backend is a thin strategy over one contract (:class:`Backend`): open a
pool or cluster, run a task graph, close. Backends register themselves in
``BACKENDS``; the one used comes from the ``backend`` argument, else the
``FLOWYML_BACKEND`` environment variable, else ``"process"``.

======================  ==========================  ==================================
backend                 Dask scheduler              for
======================  ==========================  ==================================
``process`` (default)   multiprocessing             CPU-bound pandas / pure Python
``thread``              threaded                    I/O, and pandas calls that drop the GIL
``sync``                synchronous                 debugging (one thread, pdb works)
``distributed``         ``distributed.Client``      the dashboard, more than one machine
======================  ==========================  ==================================
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..exceptions import BackendError
from . import local  # noqa: F401  registers sync, thread, process
from .base import BACKENDS, Backend, RunHooks

__all__ = ["BACKENDS", "Backend", "ParallelExecutor", "RunHooks", "RunSession"]

DEFAULT_BACKEND = "process"


class ParallelExecutor:
    """Runs pipelines on one Dask scheduler.

    Parameters
    ----------
    max_workers : int, optional
        Worker threads or processes; default: the CPU count.
    backend : {"process", "thread", "sync", "distributed"}, optional
        Default: ``FLOWYML_BACKEND``, else ``"process"``.
    address : str, optional
        ``distributed`` only: a running scheduler (default ``FLOWYML_SCHEDULER_ADDRESS``).
    client : distributed.Client, optional
        ``distributed`` only: use this client (flowyml never closes it).
    security : distributed.security.Security, optional
        ``distributed`` only: TLS settings for ``address``.
    performance_report : path, optional
        ``distributed`` only: write Dask's performance report of each run
        there (``{run_id}`` in the path is replaced) and link it from
        ``result.save_report("run.html")``.
    no_workers_timeout : float, optional
        ``distributed`` only: seconds a run waits while no worker is connected
        to the scheduler before it fails with :class:`~flowyml.BackendError`
        (default ``FLOWYML_NO_WORKERS_TIMEOUT``, else 120; ``float("inf")``
        waits forever).

    The pool or cluster starts only when a run has tasks to execute (a run
    whose results are all cached starts none), in the background while the
    run is still planned. Inside ``with executor:`` the first such run starts
    it and it lives across runs until the block ends; outside, each run
    starts and cleans up its own.

    Examples
    --------
    >>> executor = ParallelExecutor(max_workers=2, backend="thread")
    >>> executor.backend, executor.max_workers
    ('thread', 2)
    """

    def __init__(
        self,
        max_workers: int | None = None,
        backend: str | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        security: Any = None,
        performance_report: str | os.PathLike[str] | None = None,
        no_workers_timeout: float | None = None,
    ) -> None:
        name = backend if backend is not None else os.environ.get("FLOWYML_BACKEND") or DEFAULT_BACKEND
        if (client is not None or address is not None) and backend is None and not os.environ.get("FLOWYML_BACKEND"):
            name = "distributed"  # a client or address only makes sense there
        if name == "distributed":
            from . import distributed  # noqa: F401  imports distributed only when asked

        if name not in BACKENDS:
            source = "backend" if backend is not None else "FLOWYML_BACKEND"
            raise BackendError(
                f"unknown {source}={name!r}; valid backends are "
                f"{', '.join(repr(b) for b in sorted(_known_backends()))}"
            )
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise BackendError(f"max_workers must be a positive int, got {max_workers!r}")
        options = {
            "address": address,
            "client": client,
            "security": security,
            "performance_report": performance_report,
            "no_workers_timeout": no_workers_timeout,
        }
        if name != "distributed" and any(v is not None for v in options.values()):
            given = [k for k, v in options.items() if v is not None]
            raise BackendError(
                f"{', '.join(given)} only apply to backend='distributed', not {name!r}"
            )
        self.backend: str = name
        self._impl: Backend = BACKENDS[name](max_workers, **options)
        self._entered = 0
        self._opened_in_block = False  # a run (or reading .client) opened the ``with`` block's pool
        self._lock = threading.Lock()

    @property
    def max_workers(self) -> int:
        """How many tasks may run at once."""
        return self._impl.max_workers

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (``distributed`` only), else None.

        Inside ``with``, reading it starts the cluster if no run has yet.
        """
        if self._impl.has_client:
            self._open_in_block()
        return getattr(self._impl, "client", None)

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address (``distributed`` only; inside ``with``, reading it starts the cluster)."""
        if self._impl.has_client:
            self._open_in_block()
        return self._impl.dashboard_link

    @property
    def flowyml_page_link(self) -> str | None:
        """The flowyml page on the Dask dashboard (``.../flowyml``), when the scheduler serves it.

        Always on flowyml's own ``LocalCluster``; on another cluster, when its
        scheduler runs with ``--preload flowyml.dashboard``; else None. Inside
        ``with``, reading it starts the cluster.
        """
        if self._impl.has_client:
            self._open_in_block()
        return self._impl.flowyml_page_link

    def __repr__(self) -> str:
        return f"ParallelExecutor(backend={self.backend!r}, max_workers={self.max_workers})"

    def __enter__(self) -> ParallelExecutor:
        with self._lock:
            self._entered += 1  # nothing starts yet: the first run with tasks to execute starts it
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with self._lock:
            self._entered -= 1
            if self._entered:
                return
            self._opened_in_block = False
        self._impl.close()

    def close(self) -> None:
        """Stop the pool or cluster now, if started (``with`` does this for you)."""
        with self._lock:
            self._entered = 0
            self._opened_in_block = False
        self._impl.close()

    def _open_in_block(self) -> bool:
        """Inside ``with``: open the block's pool or cluster unless open already; False outside."""
        with self._lock:  # held while it starts: concurrent runs in the block wait for one start
            if not self._entered:
                return False
            if not self._opened_in_block:
                self._impl.open()
                self._opened_in_block = True
            return True

    @contextmanager
    def session(self) -> Iterator[RunSession]:
        """The backend as one run uses it (see :class:`RunSession`); released when the run ends."""
        session = RunSession(self)
        try:
            yield session
        finally:
            session.end()


class RunSession:
    """The executor's backend as one run sees it.

    ``start()`` begins starting the pool or cluster in the background, as
    soon as the run knows it has tasks to execute; ``open()`` waits until it
    is ready, just before the tasks are sent. A run that calls neither (its
    results are all cached) starts nothing. Inside ``with``, both act on the
    block's pool, which outlives the run; outside, the pool is the run's own
    and :meth:`end` stops it.
    """

    def __init__(self, executor: ParallelExecutor) -> None:
        self._executor = executor
        self._started = False
        self._owned = False  # opened for this run alone: closed when it ends

    def start(self) -> None:
        """Begin starting the pool or cluster without waiting for it (safe to call again)."""
        if not self._started:
            self._started = True
            self._executor._impl.start()

    def open(self) -> Backend:
        """The backend, open: waits for the start (begun here if ``start`` was not called)."""
        self._started = True
        if not self._owned and not self._executor._open_in_block():
            self._executor._impl.open()
            self._owned = True
        return self._executor._impl

    def end(self) -> None:
        """Release the run's pool; a ``with`` block's stays for the next run."""
        impl = self._executor._impl
        if self._owned:
            impl.close()
        elif self._started and not self._executor._entered:
            impl.cancel_start()  # the run stopped before its tasks: stop what it began


def _known_backends() -> set[str]:
    return set(BACKENDS) | {"distributed"}

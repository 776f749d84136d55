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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..exceptions import BackendError
from . import local  # noqa: F401  registers sync, thread, process
from .base import BACKENDS, Backend, RunHooks

__all__ = ["BACKENDS", "Backend", "ParallelExecutor", "RunHooks"]

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

    Inside ``with executor:`` its pool or cluster lives across runs; outside,
    each run starts and cleans up its own.

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

    @property
    def max_workers(self) -> int:
        """How many tasks may run at once."""
        return self._impl.max_workers

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (``distributed`` only, while open), else None."""
        return getattr(self._impl, "client", None)

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address (``distributed`` only, once started)."""
        return self._impl.dashboard_link

    def __repr__(self) -> str:
        return f"ParallelExecutor(backend={self.backend!r}, max_workers={self.max_workers})"

    def __enter__(self) -> ParallelExecutor:
        if not self._entered:
            self._impl.open()
        self._entered += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._entered -= 1
        if not self._entered:
            self._impl.close()

    def close(self) -> None:
        """Stop the pool or cluster now (``with`` does this for you)."""
        self._entered = 0
        self._impl.close()

    @contextmanager
    def session(self) -> Iterator[Backend]:
        """The open backend for one run: the ``with`` block's, or one opened for it."""
        if self._entered:
            yield self._impl
            return
        self._impl.open()
        try:
            yield self._impl
        finally:
            self._impl.close()


def _known_backends() -> set[str]:
    return set(BACKENDS) | {"distributed"}

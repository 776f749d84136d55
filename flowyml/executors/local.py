"""The single-machine backends: Dask's synchronous, threaded and multiprocessing schedulers.

Each only chooses the pool Dask's own ``get`` runs on, and keeps it across
runs inside ``with executor:``. Tasks are submitted one at a time
(``chunksize=1``): flowyml's tasks are whole steps or partitions, where
batching several into one submission would serialize them on one worker.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any

import dask.local
import dask.multiprocessing
import dask.threaded

from .base import Backend, RunHooks, register

__all__ = ["ProcessBackend", "SyncBackend", "ThreadBackend"]


def dask_callbacks(hooks: RunHooks) -> list[tuple]:
    """Dask local-scheduler callbacks (start, start_state, pretask, posttask, finish)."""

    def pretask(key, dsk, state):
        hooks.task_started(key)

    def posttask(key, result, dsk, state, worker_id):
        hooks.task_finished(key, result)

    return [(None, None, pretask, posttask, None)]


class _SettlingPool:
    """Wraps an executor so a failed run waits for its running tasks to end.

    Dask's local scheduler raises at the first failed task while others still
    run; waiting for them keeps a reused pool clean for the next run and means
    no task of a failed run is still writing when ``run`` returns.
    """

    def __init__(self, pool: Executor, max_workers: int) -> None:
        self._pool = pool
        self._max_workers = max_workers
        self.running: set[Future] = set()

    def submit(self, fn, *args, **kwargs) -> Future:
        future = self._pool.submit(fn, *args, **kwargs)
        self.running.add(future)
        future.add_done_callback(self.running.discard)
        return future

    def settle(self) -> None:
        wait(list(self.running))


@register
class SyncBackend(Backend):
    """Dask's synchronous scheduler: every task in the calling thread, in order."""

    name = "sync"

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        super().__init__(1)

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        return list(dask.local.get_sync(dsk, list(keys), callbacks=dask_callbacks(hooks)))


class _PoolBackend(Backend):
    """A backend whose pool lives from ``open`` to ``close``."""

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        super().__init__(max_workers)
        self._pool: Executor | None = None

    def _make_pool(self) -> Executor:
        raise NotImplementedError

    def open(self) -> None:
        if self._pool is None:
            self._pool = self._make_pool()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _get(self, pool: _SettlingPool, dsk: Mapping, keys: list, hooks: RunHooks) -> Any:
        raise NotImplementedError

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        if self._pool is None:
            self.open()
        pool = _SettlingPool(self._pool, self.max_workers)
        try:
            return list(self._get(pool, dsk, list(keys), hooks))
        except BaseException:
            pool.settle()
            raise


@register
class ThreadBackend(_PoolBackend):
    """Dask's threaded scheduler on a pool of ``max_workers`` threads."""

    name = "thread"

    def _make_pool(self) -> Executor:
        return ThreadPoolExecutor(self.max_workers, thread_name_prefix="flowyml-thread")

    def _get(self, pool, dsk, keys, hooks):
        return dask.threaded.get(dsk, keys, pool=pool, callbacks=dask_callbacks(hooks), chunksize=1)


def initialize_worker(log_queue: Any = None, log_level: int = 0) -> None:
    """Runs once in each worker process of the process backend."""
    from .. import logs, tasks

    tasks.KILLABLE_TIMEOUTS = True
    if log_queue is not None:  # what steps log or print reaches the driver's log
        logs.worker_setup(log_queue, log_level)


def _ready() -> None:
    """A no-op task: submitting one per worker starts every process."""


@register
class ProcessBackend(_PoolBackend):
    """Dask's multiprocessing scheduler on a reused pool of spawned processes.

    Dask's own ``multiprocessing.get`` starts a new pool per call (about 0.9 s
    here) and batches 6 tasks per submission; this keeps one pool for the
    executor's life and submits one task at a time.
    """

    name = "process"
    pickles = True

    def _make_pool(self) -> Executor:
        from ..logs import ProcessLogBridge

        context = multiprocessing.get_context("spawn")
        self._logs = ProcessLogBridge(context)
        pool = ProcessPoolExecutor(
            self.max_workers, mp_context=context, initializer=initialize_worker, initargs=self._logs.initargs
        )
        # Processes start on demand; start them all now, so that inside
        # ``with executor:`` no run pays the start-up (about 0.5 s a process).
        wait([pool.submit(_ready) for _ in range(self.max_workers)])
        return pool

    def close(self) -> None:
        super().close()
        bridge, self._logs = getattr(self, "_logs", None), None
        if bridge is not None:  # after the pool: its workers' last records are in
            bridge.stop()

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        try:
            return super().execute(dsk, keys, hooks)
        finally:
            if getattr(self, "_logs", None) is not None:
                self._logs.flush()  # the run's worker log lines are out before it returns

    def _get(self, pool, dsk, keys, hooks):
        return dask.multiprocessing.get(
            dsk,
            keys,
            pool=pool,
            chunksize=1,
            optimize_graph=False,  # keep one task per step/partition: keys stay step names
            callbacks=dask_callbacks(hooks),
        )

"""The single-machine backends: Dask's synchronous, threaded and multiprocessing schedulers.

Each only chooses the pool Dask's own ``get`` runs on, and keeps it across
runs inside ``with executor:``. Tasks are submitted one at a time
(``chunksize=1``): flowyml's tasks are whole steps or partitions, where
batching several into one submission would serialize them on one worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import cloudpickle
import dask.local
import dask.multiprocessing
import dask.threaded

from .._compat import (
    multiprocessing_get_id,
    pool_is_broken,
    pool_processes,
    seeded_graph,
    wait_until_readable,
)
from ..bulk import graph_prepared
from ..pickling import dumps
from ..tasks import WorkerSettings, install_worker_settings
from .base import Backend, RunHooks, register
from .processes import PRELOAD, dies_with_driver, prepare_worker, process_context

if TYPE_CHECKING:
    from ..logs import ProcessLogBridge

__all__ = ["ProcessBackend", "SyncBackend", "ThreadBackend"]


def dask_callbacks(hooks: RunHooks) -> list[tuple]:
    """Dask local-scheduler callbacks (start, start_state, pretask, posttask, finish)."""

    started, finished = hooks.task_started, hooks.task_finished  # looked up once, not per task

    def pretask(key, dsk, state):
        started(key)

    def posttask(key, result, dsk, state, worker_id):
        finished(key, result)

    def start_state(dsk, state):
        # The graph converted, ordered and its scheduler state built: all of it
        # lives until the run ends, and the collector need not scan it again.
        graph_prepared()

    # No progress display to feed: Dask skips the start callback altogether.
    return [(None, start_state, pretask if getattr(hooks, "watches_starts", True) else None, posttask, None)]


class _SettlingPool:
    """Wraps the process pool so a failed run waits for its running tasks to end.

    As :func:`_drain` does for threads, where tasks cannot wait for each other
    across processes: it tracks every future, a cost per task that vanishes
    next to what the process pool itself spends on each.
    """

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self.running: set[Future] = set()

    def submit(self, fn, *args, **kwargs) -> Future:
        future = self._pool.submit(fn, *args, **kwargs)
        self.running.add(future)
        future.add_done_callback(self.running.discard)
        return future

    def settle(self) -> None:
        wait(list(self.running))


def _drain(pool: Executor, workers: int) -> None:
    """Return once every task submitted to the thread ``pool`` so far has ended.

    Dask's local scheduler raises at the first failed task while others still
    run; waiting for them keeps the reused pool clean for the next run, and no
    task of a failed run is still writing when ``run`` returns. ``workers``
    tasks that wait for each other can only all be running once the pool has
    nothing else left, so the run pays nothing per task for this.
    """
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(barrier.wait)
    barrier.wait()


@register
class SyncBackend(Backend):
    """Dask's synchronous scheduler: every task in the calling thread, in order."""

    name = "sync"

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        super().__init__(1)

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        wanted: list[Any] = list(keys)  # Dask's Key type: str, int or tuples of them
        return list(dask.local.get_sync(dsk, wanted, callbacks=dask_callbacks(hooks)))


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

    def _get(self, pool: Executor | None, dsk: Mapping, keys: list, hooks: RunHooks) -> Any:
        raise NotImplementedError

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        if self._pool is None:
            self.open()
        try:
            return list(self._get(self._pool, dsk, list(keys), hooks))
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM (the CLI turns it into KeyboardInterrupt): stop now,
            # do not wait for running steps, which may take hours.
            self._interrupt()
            raise
        except BaseException:
            if self._pool is not None:  # None only if closed meanwhile: nothing left to wait for
                _drain(self._pool, self.max_workers)
            raise

    def _interrupt(self) -> None:
        """Return at once after an interrupt; threads cannot be stopped and run on."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


@register
class ThreadBackend(_PoolBackend):
    """Dask's threaded scheduler on a pool of ``max_workers`` threads."""

    name = "thread"

    def _make_pool(self) -> Executor:
        return ThreadPoolExecutor(self.max_workers, thread_name_prefix="flowyml-thread")

    def _get(self, pool, dsk, keys, hooks):
        return dask.threaded.get(dsk, keys, pool=pool, callbacks=dask_callbacks(hooks), chunksize=1)


def initialize_worker(
    ready: Any = None, settings: WorkerSettings | None = None, log_queue: Any = None, log_level: int = 0,
    slots: Any = None, die_with_parent: bool = False, preload: Sequence[str] = (),
    environ: Mapping[str, str] | None = None, flush_barrier: Any = None,
) -> None:
    """Runs once in each worker process of the process backend.

    ``settings`` are the ones the backend gives every worker; this process's
    slot in ``slots`` adds the hook that records each attempt, to name it if
    this process dies. They are installed with
    :func:`~flowyml.tasks.install_worker_settings`, the one way the worker
    side is configured. ``preload`` are modules to import now (a forkserver's
    workers have them already): the pool starts while the run is still
    planned, so its first tasks need not import them. ``environ`` is the
    driver's environment (see :mod:`flowyml.executors.processes`).
    ``flush_barrier`` (one party per worker) lets this worker store results in
    a thread of its own (:mod:`flowyml.behind`).
    """
    import importlib

    from .. import logs

    prepare_worker(environ, die_with_parent)

    if log_queue is not None:  # what steps log or print reaches the driver's log
        logs.worker_setup(log_queue, log_level)
    # The driver decides what Ctrl-C means (it stops the pool): a worker hit by
    # the terminal's SIGINT mid-task would only report a confusing failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = settings if settings is not None else WorkerSettings()
    if slots is not None:
        settings = replace(settings, on_attempt=slots.claim())
    install_worker_settings(settings)
    if flush_barrier is not None:
        from .. import behind

        behind.install(flush_barrier)
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:  # the task that needs it will say so
            pass
    if ready is not None:
        ready.put(None)  # tell the parent this process is up


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start worker processes without re-running the user's script in each.

    A new worker process (spawned, or forked by the forkserver) imports
    ``__main__`` again from its file, so a script without an ``if __name__ ==
    "__main__":`` guard would run its pipeline again in every worker (and
    fail). flowyml's tasks never need the main module there: cloudpickle sends functions and classes defined in
    ``__main__`` by value. So while the processes start, the main module shows
    no file for ``multiprocessing`` to re-import; a notebook already shows none.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    try:
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[name]
        yield
    finally:
        main.__dict__.update(saved)


def _ready() -> None:
    """A no-op task: submitting one per worker starts every process."""


@register
class ProcessBackend(_PoolBackend):
    """Dask's multiprocessing scheduler on a reused pool of worker processes.

    Dask's own ``multiprocessing.get`` starts a new pool per call, paying its
    start-up on every run, and batches several tasks per submission; this
    keeps one pool for the executor's life and submits one task at a time.
    """

    name = "process"
    pickles = True
    fuses_partitions = True

    def __init__(self, max_workers: int | None = None, **options: Any) -> None:
        super().__init__(max_workers, **options)
        self._slots: Any = None
        self._processes: dict[int, Any] = {}
        self._logs: ProcessLogBridge | None = None  # the first pool's; kept when a broken pool is replaced
        self._starting: tuple[Any, list[Future]] | None = None  # spawned, not yet waited for (start)
        self._settling: _SettlingPool | None = None  # the running graph's tasks
        self._flush_barrier: Any = None  # the pool's workers' (see _flush_stores)

    def start(self) -> None:
        """Begin what takes long; ``open`` waits until every worker is up.

        Someone must import flowyml, pandas and Dask, for most of a second: the
        forkserver (once per driver process), or each spawned worker. Either
        starts now, and the run compiles and checks its cache meanwhile. Forks
        of a forkserver take milliseconds: ``open`` asks for them, and a
        server still importing answers when it is done.
        """
        if self._pool is not None:
            return
        context = process_context()
        if context.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()  # returns at once; the server imports in the background
        else:
            self._pool, self._starting = self._launch()

    def _launch(self) -> tuple[Executor, tuple[Any, list[Future]]]:
        from ..logs import ProcessLogBridge
        from ..recovery import WorkerSlots

        context = process_context()
        ready = context.SimpleQueue()
        if self._logs is None:  # kept when a broken pool is replaced
            self._logs = ProcessLogBridge(context)
        self._slots = WorkerSlots(context, self.max_workers)
        main = dies_with_driver(context)  # a driver killed outright leaves no worker behind
        # An overrunning attempt runs in a child process that is killed (timeouts.py).
        settings = WorkerSettings(killable_timeouts=True)
        self._flush_barrier = context.Barrier(self.max_workers)
        pool = ProcessPoolExecutor(
            self.max_workers, mp_context=context, initializer=initialize_worker,
            initargs=(ready, settings, *self._logs.initargs, self._slots, main,
                      [name for name in PRELOAD if name in sys.modules], dict(os.environ),
                      self._flush_barrier),
        )
        # Processes start on demand: one no-op per worker spawns them all now
        # (each submit spawns one), so the first tasks spread over all.
        try:
            with _main_module_hidden():
                futures = [pool.submit(_ready) for _ in range(self.max_workers)]
        except BaseException:  # Ctrl-C or no more processes: none of those spawned may stay
            for process in pool_processes(pool).values():
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._processes = pool_processes(pool)  # kept: a broken pool forgets them
        return pool, (ready, futures)

    def open(self) -> None:
        self.start()
        if self._pool is None:
            self._pool, self._starting = self._launch()
        if self._starting is None:
            return
        ready, futures = self._starting
        try:
            self._wait_until_started(ready, futures)
        except BaseException:  # Ctrl-C, or a worker that died while starting: kill them all
            self._interrupt()
            raise
        self._starting = None

    def _wait_until_started(self, ready: Any, futures: list[Future]) -> None:
        """Until every worker has run its initializer (and so can take a task at once)."""
        for _ in range(self.max_workers):
            while not wait_until_readable(ready, 0.5):  # a worker that dies while starting must not hang us
                if pool_is_broken(self._pool, futures):
                    from ..exceptions import BackendError

                    raise BackendError(
                        "a worker process of the process backend died while starting "
                        "(out of memory, or a crash importing the modules it needs?); try fewer "
                        "max_workers, or backend='thread' to see the error in this process"
                    )
            ready.get()
        wait(futures)

    def cancel_start(self) -> None:
        if self._starting is not None:  # spawned, never used: nothing to wait for
            self._interrupt()

    def close(self) -> None:
        self.cancel_start()
        if self._settling is None or not self._settling.running:
            # Idle workers have nothing to finish: stop them at once rather than
            # wait while each tears down an interpreter full of pandas (a
            # quarter of a second, paid by every job that opens an executor).
            self._interrupt()
        super().close()
        bridge, self._logs = self._logs, None
        if bridge is not None:  # after the pool: its workers' last records are in
            bridge.stop()

    def _get(self, pool, dsk, keys, hooks):
        from concurrent.futures.process import BrokenProcessPool

        from ..recovery import execute_with_recovery

        def run_graph(graph, wanted, callbacks, cache):
            # What dask.multiprocessing.get does, minus its cull (a graph seeded
            # with finished results lacks their tasks) and its fusion (keys stay
            # step names).
            settling = _SettlingPool(self._pool)
            self._settling = settling
            if cache:  # the results of a run before a worker died
                graph, cache = seeded_graph(graph, cache)
            return dask.local.get_async(
                settling.submit,
                self.max_workers,
                graph,
                wanted,
                cache=cache,
                get_id=multiprocessing_get_id(),
                dumps=dumps,
                loads=cloudpickle.loads,
                pack_exception=dask.multiprocessing.pack_exception,
                raise_exception=dask.multiprocessing.reraise,
                callbacks=callbacks,
                chunksize=1,
            )

        return execute_with_recovery(run_graph, self._restart, dsk, keys, hooks, BrokenProcessPool)

    def execute(self, dsk: Mapping, keys: Sequence[Hashable], hooks: RunHooks) -> list[Any]:
        if self._pool is None or self._starting is not None:
            self.open()
        self._settling = None
        try:
            try:
                values = list(self._get(None, dsk, list(keys), hooks))
            except KeyboardInterrupt:
                raise
            except BaseException:
                if self._settling is not None:
                    self._settling.settle()
                self._flush_stores()
                raise
            self._flush_stores()
            return values
        except KeyboardInterrupt:  # while the graph runs, or while waiting for it to settle or flush
            self._interrupt()
            raise
        finally:
            if self._logs is not None:
                self._logs.flush()  # the run's worker log lines are out before it returns

    def _flush_stores(self) -> None:
        """Until every worker has stored the results its store thread holds (one task each).

        The tasks wait for each other at the pool's barrier, so that each
        worker takes one. Every worker is idle now, none of them at the
        barrier: a barrier broken before (by whatever means) is reset, or
        each would pass it at once and one worker could take two flushes
        while another, still storing, took none. A worker that dies during
        the flush breaks the pool, which terminates the others: the wait ends.
        """
        from ..behind import flush_task

        pool = self._pool
        if pool is None:
            return
        if self._flush_barrier is not None and self._flush_barrier.broken:
            self._flush_barrier.reset()
        try:
            flushes = [pool.submit(flush_task) for _ in range(self.max_workers)]
        except RuntimeError:  # a broken pool: every worker's pending stores are lost (recomputed next run)
            return
        wait(flushes)

    def _restart(self) -> list[Any]:
        """Replace a broken pool; return the processes that died (not those it terminated)."""
        from ..recovery import DeadWorker

        pool, processes, slots = self._pool, self._processes, self._slots
        records = slots.records() if slots is not None else {}
        self._pool = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # joins every process
        dead = []
        for pid, process in processes.items():
            process.join(timeout=5)
            # A broken pool terminates the survivors (SIGTERM): those are not the dead.
            if process.exitcode is not None and process.exitcode != -signal.SIGTERM:
                dead.append(DeadWorker(pid, process.exitcode, records.get(pid)))
        if not dead:  # all SIGTERM: someone else terminated one; any could be it
            dead = [DeadWorker(pid, p.exitcode, None) for pid, p in processes.items()]
        self.open()
        return dead

    def _interrupt(self) -> None:
        """Kill the workers now (a step may run for hours) and drop the pool."""
        pool, processes = self._pool, self._processes
        self._pool, self._processes, self._starting = None, {}, None
        for process in processes.values():
            try:
                process.kill()
            except Exception:
                pass
        for process in processes.values():
            process.join(timeout=5)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

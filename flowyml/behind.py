"""Work a process-pool worker does behind its tasks: storing results while they travel on.

A process-pool worker returns a task's value to the driver, which sends it
to the next tasks. Storing it in the cache first would put the store's time
(Parquet encoding, a file write) on the run's critical path for nothing: the
worker's store thread stores it while it travels
(``StoreTask(behind=True)``, :func:`flowyml.fuse.store_behind`). The value
has left for the driver as it is stored: nothing in this process changes it.

- The driver waits for every worker's thread at the end of each run (one
  :func:`flush_task` per worker, which a barrier of one party per worker
  spreads over all), so a finished run's results are in the cache. The
  barrier waits without a timeout: a slow store must not break it (a broken
  barrier no longer gives each worker one flush), and a worker that dies
  cannot leave the others waiting, since the pool then terminates them all.
  A worker killed before the flush loses its pending entries, and so do the
  others, which the broken pool terminates; the next run recomputes them.
- A result larger than :data:`MAX_BYTES` is stored by its task before it
  returns: held by the thread, it would add to what the worker's next task
  loads, and raise the worker's peak memory by its size.
- The thread lives only while it has something to store. A worker that forks
  (a step with a killable timeout, :mod:`flowyml.timeouts`, or any other
  fork) first waits for it to end (:func:`settle`, also run before every
  ``os.fork``), and forks single-threaded.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_BYTES", "flush_task", "install", "put", "settle"]

#: A result larger than this in memory (its shallow size,
#: :func:`flowyml.memory.shallow_bytes`) is stored by its task, not behind it.
#: Held by the thread, a result adds its size (and its encoding's buffers) to
#: the worker's peak while the next task loads its inputs; below 64 MiB that
#: is small next to a worker's memory, and its store (a fraction of a second)
#: is still worth taking off the critical path.
MAX_BYTES = 64 << 20


class _Behind:
    """One worker's thread, started by :meth:`put` and ended once nothing is pending."""

    def __init__(self, barrier: Any) -> None:
        self.barrier = barrier
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None  # working: None once it has nothing left
        self._last: threading.Thread | None = None  # the latest started, which may still be ending

    def put(self, func: Callable[..., Any], arguments: tuple[Any, ...]) -> None:
        with self._idle:
            self._pending.append((func, arguments))
            if self._thread is None:
                self._thread = self._last = threading.Thread(target=self._work, name="flowyml-store", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._idle:
                if not self._pending:
                    self._thread = None
                    self._idle.notify_all()
                    return
                func, arguments = self._pending.popleft()
            try:
                func(*arguments)
            except BaseException:  # the work warns of its own errors; nothing may stop the thread
                import logging

                logging.getLogger("flowyml").exception("work behind a task failed")
            del arguments

    def settle(self) -> None:
        """Return once everything put so far is done and the thread has ended."""
        with self._idle:
            if threading.current_thread() is self._thread:
                return  # the work itself forks: it cannot wait for its own end
            while self._thread is not None:
                self._idle.wait()
            last = self._last
        if last is not None:
            # Done, but perhaps still ending even where it was done before this
            # call began: once joined, the process has one thread again.
            last.join()


_behind: _Behind | None = None  # this worker's, when its backend works behind


_settles_at_fork = False  # settle() is registered to run before os.fork (once a process)


def install(barrier: Any) -> None:
    """In a process-pool worker: do :func:`put` work in a thread; ``barrier`` has a party per worker.

    Every fork of this process waits for the thread first (user code, a nested
    run): a child forked while it runs would inherit its locks half held.
    """
    global _behind, _settles_at_fork
    _behind = _Behind(barrier)
    if not _settles_at_fork and hasattr(os, "register_at_fork"):  # not on Windows, which never forks
        os.register_at_fork(before=settle)
        _settles_at_fork = True


def put(func: Callable[..., Any], *arguments: Any) -> bool:
    """Call ``func(*arguments)`` in this worker's thread; False (not called) where there is none."""
    if _behind is None:
        return False
    _behind.put(func, arguments)
    return True


def settle() -> None:
    """Until this worker's thread has done everything put so far, and ended."""
    if _behind is not None:
        _behind.settle()


def flush_task() -> None:
    """A task for every worker of a pool at once: return when this worker's work is done."""
    if _behind is not None:
        _behind.settle()
        _behind.barrier.wait()  # no timeout: see the module docstring

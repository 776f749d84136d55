"""Building many small objects at once without the garbage collector's repeated passes.

Planning, compiling and folding a run's report allocate one or a few small
objects per task and create no reference cycles. CPython's collector runs a
pass every 700 allocations and, as objects survive, full passes over the
whole heap: in a notebook holding large data, compiling a pipeline of many
thousands of steps spent more time in those passes than in compiling. Inside
:func:`no_gc_passes` the collector waits; it runs as usual right after, once.
Never used around user code (steps run with the collector on).

While a run executes, :func:`settled_heap` moves what exists before the run
(the graph, the plan, the user's own data) out of the collector's sight, and
pauses it while Dask converts, orders and indexes the graph (its code alone,
no task runs yet): those 100,000 objects at 100,000 tasks live until the run
ends, yet every full pass rescanned them, and the collector's share of a run
grew from 2 to 16 us a task. Once the scheduler's state is built
(:func:`graph_prepared`), that too is settled and the collector runs as usual
for the tasks, user code's allocations included.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["graph_prepared", "no_gc_passes", "settled_heap"]

_lock = threading.Lock()
_settled_runs = 0  # runs inside settled_heap
_preparing = 0  # of those, runs whose graph Dask is still preparing
_collector_was_on = True
_local = threading.local()


@contextmanager
def no_gc_passes() -> Iterator[None]:
    """Pause automatic garbage collection for the block (re-entrant, restores the old state)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def settled_heap(until_prepared: bool = True) -> Iterator[None]:
    """Keep what exists now out of the collector's full passes for the block.

    ``gc.freeze`` moves every tracked object to a generation the collector
    never scans, and ``gc.unfreeze`` moves them back (to the oldest one): a
    cycle that was garbage before the block is collected after it, not lost.
    With ``until_prepared``, the collector also waits until this thread calls
    :func:`graph_prepared` (Dask's ``start_state`` callback), or the block
    ends. Runs in other threads may overlap: the heap thaws, and the collector
    resumes, when the last one is done with it.
    """
    global _settled_runs, _preparing, _collector_was_on
    with _lock:
        _settled_runs += 1
        gc.freeze()
        if until_prepared:
            _preparing += 1
            if _preparing == 1:
                _collector_was_on = gc.isenabled()
                gc.disable()
    _local.preparing = until_prepared
    try:
        yield
    finally:
        graph_prepared()
        with _lock:
            _settled_runs -= 1
            if _settled_runs == 0:
                gc.unfreeze()


def graph_prepared() -> None:
    """The scheduler's state is built: settle it too, and let the collector run again."""
    global _preparing
    if not getattr(_local, "preparing", False):
        return
    _local.preparing = False
    with _lock:
        gc.freeze()
        _preparing -= 1
        if _preparing == 0 and _collector_was_on:
            gc.enable()

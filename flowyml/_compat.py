"""Every private API of dask, distributed, pandas and the standard library flowyml relies on.

Each use of another project's private name (a leading underscore, or an
underscored module) is wrapped here in one small function with a fallback for
when a release removes it, and each has a test in ``tests/test_compat.py``
that exercises it against the installed versions. A new release then breaks
one named function here, not a run.

- :func:`graph_expression`: ``dask._expr.LLGExpr`` and ``HLGExpr`` with their
  ``_determ_token``; without them, the graph as is (``client.get`` then
  hashes every task to name it).
- :func:`seeded_graph`: ``dask._task_spec.convert_legacy_graph`` and
  ``DataNode``; without them, the graph as is and the results as ``cache=``.
- :func:`multiprocessing_get_id`: ``dask.multiprocessing._process_get_id``;
  without it, the same function, written here.
- :func:`pool_is_broken`: ``ProcessPoolExecutor._broken``; without it, a
  start-up future that failed.
- :func:`pool_processes`: ``ProcessPoolExecutor._processes``; without it, no
  process is known (a dead one is not named, none is killed on Ctrl-C).
- :func:`wait_until_readable`: ``multiprocessing.SimpleQueue._reader``;
  without it, polling ``SimpleQueue.empty()``.
- :func:`topic_events` and :func:`drop_topics`: the distributed scheduler's
  ``_broker._topics``; without them, ``Scheduler.get_events``, and the run's
  events stay on the scheduler (a bounded number per topic).
- :func:`arrow_to_pandas`: ``pandas.io._util.arrow_table_to_pandas``; without
  it, ``pyarrow.Table.to_pandas``.

Imports happen inside the functions: this module is imported by the
distributed backend on a scheduler, and by the Parquet reader on workers, and
must cost nothing there.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "arrow_to_pandas",
    "drop_topics",
    "graph_expression",
    "multiprocessing_get_id",
    "pool_is_broken",
    "pool_processes",
    "seeded_graph",
    "topic_events",
    "wait_until_readable",
]


# -- dask ------------------------------------------------------------------------------


def graph_expression(graph: Any, token: str) -> Any:
    """``graph`` (a dict or a ``HighLevelGraph``) as the expression ``client.get`` takes, named ``token``.

    Named by the token, the graph is not tokenized: ``client.get`` would
    otherwise hash every task (pickling each of flowyml's task objects) just
    to name the graph. Where Dask has no such expressions, ``client.get``
    takes the graph as is.
    """
    try:
        from dask._expr import HLGExpr, LLGExpr
        from dask.highlevelgraph import HighLevelGraph
    except ImportError:
        return graph
    try:
        if isinstance(graph, HighLevelGraph):
            return HLGExpr(dsk=graph, _determ_token=token)
        return LLGExpr(graph, _determ_token=token)
    except TypeError:  # the token's keyword is gone: let Dask name it
        return graph


def seeded_graph(graph: Mapping, finished: dict) -> tuple[Mapping, dict | None]:
    """``graph`` and ``cache=`` for ``dask.local.get_async``, with ``finished`` results seeded in.

    A process pool rebuilt after a worker died reruns the graph with what had
    finished. The results go into the graph itself, as ``DataNode`` entries
    that every Dask since 2024.12 loads before running anything: given only as
    ``cache=``, dask 2024.12's ``get_async`` loses them (it finds a task's
    inputs with ``get_dependencies(dsk, key)``, which keeps only keys of the
    graph, and the task fails with "Not enough arguments provided"). The
    conversion reads the results' names as keys, not as literal tuples. A
    Dask without task specs takes the graph as is and the results as ``cache=``.
    """
    try:
        from dask._task_spec import DataNode, convert_legacy_graph
    except ImportError:
        return graph, finished
    seeded = dict(convert_legacy_graph(graph, all_keys=set(graph) | set(finished)))
    seeded.update((key, DataNode(key, value)) for key, value in finished.items())
    return seeded, None


def multiprocessing_get_id() -> Callable[[], Any]:
    """The ``get_id`` that ``dask.multiprocessing.get`` gives ``dask.local.get_async``.

    It names the worker process a task ran in; the fallback does what Dask's
    does. Returned rather than called: ``get_async`` sends it to the workers.
    """
    import dask.multiprocessing

    return getattr(dask.multiprocessing, "_process_get_id", _process_id)


def _process_id() -> Any:
    return multiprocessing.current_process().ident


# -- the standard library's process pools ------------------------------------------------


def pool_is_broken(pool: Any, started: Iterable[Any] = ()) -> bool:
    """True once a worker of the ``ProcessPoolExecutor`` died: the pool runs nothing more.

    ``started`` are futures submitted to the pool; where the pool no longer
    says it is broken, one of them that failed says so.
    """
    broken = getattr(pool, "_broken", None)
    if broken is not None:
        return bool(broken)
    return any(future.done() and not future.cancelled() and future.exception() is not None
               for future in started)


def pool_processes(pool: Any) -> dict[int, Any]:
    """pid -> ``multiprocessing.Process`` of the pool's workers, a copy (a broken pool forgets them).

    Empty where the pool does not say: the backend then cannot name the
    process that died nor kill the workers on Ctrl-C, and a pool that keeps
    breaking fails the run after a few restarts.
    """
    return dict(getattr(pool, "_processes", None) or {})


def wait_until_readable(queue: Any, timeout: float) -> bool:
    """True once ``queue`` (a ``multiprocessing.SimpleQueue``) has an item, False after ``timeout`` s.

    A ``SimpleQueue`` has no ``get`` with a timeout; its reading end does.
    """
    reader = getattr(queue, "_reader", None)
    if reader is not None:
        return reader.poll(timeout)
    deadline = time.monotonic() + timeout
    while queue.empty():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


# -- distributed's scheduler --------------------------------------------------------------


def _broker_topics(scheduler: Any) -> Any:
    """The scheduler's event topics (name -> topic with ``events`` and ``count``), or None."""
    broker = getattr(scheduler, "_broker", None)
    return getattr(broker, "_topics", None)


def topic_events(scheduler: Any, topic: str) -> tuple[int, Sequence[tuple[float, Any]]]:
    """On the scheduler: how many events ``topic`` ever got, and the ``(time, message)`` it still holds.

    The count tells whether a subscriber missed some. Where the scheduler's
    broker is out of reach, the count is that of the events it holds.
    """
    topics = _broker_topics(scheduler)
    if topics is None:
        events = tuple(scheduler.get_events(topic))
        return len(events), events
    found = topics.get(topic)  # get, not []: the topics are a defaultdict
    return (found.count, found.events) if found is not None else (0, ())


def drop_topics(scheduler: Any, names: Iterable[str]) -> None:
    """On the scheduler: forget these topics and their events (a long-lived one keeps every run's).

    Where the broker is out of reach, the events stay; the scheduler keeps a
    bounded number per topic.
    """
    topics = _broker_topics(scheduler)
    if topics is None:
        return
    for name in names:
        topics.pop(name, None)


# -- pandas ---------------------------------------------------------------------------------


def arrow_to_pandas(table: Any, dtype_backend: Any = None, to_pandas_kwargs: Any = None) -> Any:
    """A ``pyarrow.Table`` as a DataFrame, converted the way ``pandas.read_parquet`` converts a file.

    pandas' own helper gives the same dtypes as ``read_parquet`` (string
    columns, ``dtype_backend``); without it (pandas < 2.2), ``Table.to_pandas``
    with the types mapper ``read_parquet`` itself uses for ``dtype_backend``.
    """
    try:
        from pandas.io._util import arrow_table_to_pandas
    except ImportError:
        converting = dict(to_pandas_kwargs or {})
        if dtype_backend is not None:
            converting.setdefault("types_mapper", _types_mapper(dtype_backend))
        return table.to_pandas(**converting)
    options: dict[str, Any] = {"to_pandas_kwargs": to_pandas_kwargs}
    if dtype_backend is not None:
        options["dtype_backend"] = dtype_backend
    return arrow_table_to_pandas(table, **options)


def _types_mapper(dtype_backend: str) -> Callable[[Any], Any]:
    """Arrow type -> pandas dtype for ``dtype_backend``, as ``pandas.read_parquet`` maps them."""
    import pandas as pd
    import pyarrow as pa

    if dtype_backend == "pyarrow":
        return pd.ArrowDtype
    nullable = {
        pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype(),
        pa.string(): pd.StringDtype(), pa.large_string(): pd.StringDtype(),
        pa.float32(): pd.Float32Dtype(), pa.float64(): pd.Float64Dtype(),
    }
    return nullable.get

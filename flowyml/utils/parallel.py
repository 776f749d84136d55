"""``parallel_map``: parallelism inside one step.

A step that must call a slow function on many items (HTTP requests, files,
a model per row group) can fan out within its own task::

    from flowyml import step
    from flowyml.utils.parallel import parallel_map

    @step
    def fetch_all(urls):
        return parallel_map(download, urls, max_workers=8)

Use it for I/O-bound calls (``backend="thread"``, the default) or for
CPU-bound pure Python (``backend="process"``); for work on partitions of a
data set, prefer ``per_partition=True`` steps, which Dask schedules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import cloudpickle

from ..exceptions import FlowymlError

__all__ = ["parallel_map"]

T = TypeVar("T")
R = TypeVar("R")

BACKENDS = ("thread", "process", "sync")


def parallel_map(
    func: Callable[[T], R],
    items: Iterable[T],
    max_workers: int | None = None,
    backend: str = "thread",
) -> list[R]:
    """Call ``func`` on every item in parallel; results come back in input order.

    Parameters
    ----------
    func : callable
        Called once per item (lambdas and local functions work on every backend).
    items : iterable
        The inputs.
    max_workers : int, optional
        Threads or processes; default: the CPU count (at most the number of items).
    backend : {"thread", "process", "sync"}
        ``thread`` for I/O, ``process`` for CPU-bound Python, ``sync`` to debug.

    Returns
    -------
    list
        ``[func(item) for item in items]``, computed in parallel.

    Raises
    ------
    Exception
        The first failure, with its own type and traceback; a note and its
        ``flowyml_index`` attribute give the failing item's index. Items not
        yet started are cancelled.

    Examples
    --------
    >>> parallel_map(lambda x: x * x, range(5), max_workers=2)
    [0, 1, 4, 9, 16]
    """
    if backend not in BACKENDS:
        raise FlowymlError(
            f"parallel_map: unknown backend={backend!r}; valid backends are {', '.join(map(repr, BACKENDS))}"
        )
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise FlowymlError(f"parallel_map: max_workers must be a positive int, got {max_workers!r}")
    items = list(items)
    if not items:
        return []
    workers = min(max_workers or os.cpu_count() or 1, len(items))
    if backend == "sync" or workers == 1:
        return [_call(func, item, index) for index, item in enumerate(items)]
    if backend == "thread":
        pool: Executor = ThreadPoolExecutor(workers, thread_name_prefix="flowyml-map")
        submit = lambda index, item: pool.submit(_call, func, item, index)  # noqa: E731
    else:
        from ..executors.processes import dies_with_driver, prepare_worker, process_context

        context = process_context()
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=prepare_worker,
                                   initargs=(dict(os.environ), dies_with_driver(context)))
        payload = cloudpickle.dumps(func)  # pickled once, not once per item
        submit = lambda index, item: pool.submit(_call_pickled, payload, item, index)  # noqa: E731
    with pool:
        futures = [submit(index, item) for index, item in enumerate(items)]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _call(func: Callable[[Any], Any], item: Any, index: int) -> Any:
    try:
        return func(item)
    except Exception as exc:
        exc.add_note(f"parallel_map: raised by item {index} ({_short(item)})")
        exc.flowyml_index = index  # type: ignore[attr-defined]
        raise


_functions: dict[bytes, Callable[[Any], Any]] = {}


def _call_pickled(payload: bytes, item: Any, index: int) -> Any:
    func = _functions.get(payload)
    if func is None:
        func = _functions[payload] = cloudpickle.loads(payload)
    return _call(func, item, index)


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."

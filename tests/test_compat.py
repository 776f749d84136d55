"""Every private API flowyml uses (``flowyml._compat``), against the installed versions, and its fallback.

Each function gets two tests: one on the installed dask, distributed, pandas
and Python, checking what flowyml relies on it for; one with the private name
hidden, checking the fallback. From the releases in ``CHECKED`` on (those this
file was last checked against), the private name must still be there: a
release that drops one fails here, naming it, while runs still work through
the fallback. Python's own private names are checked on every version.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import pickle
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from operator import add

import dask.local
import dask.multiprocessing
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packaging.version import Version

from flowyml import _compat

from .conftest import _open

#: The releases whose private APIs this file was last checked against.
CHECKED = {"dask": "2026.8.0", "distributed": "2026.8.0", "pandas": "3.1.1"}


def must_have(package: str) -> bool:
    """The installed ``package`` is at least the release checked: its private APIs must be there."""
    return Version(importlib.metadata.version(package)) >= Version(CHECKED[package])


def hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make ``import module`` (and ``from module import ...``) fail, as if a release removed it."""
    monkeypatch.setitem(sys.modules, module, None)


# -- dask ----------------------------------------------------------------------------------

GRAPH = {"a": (add, 1, 2), "b": (add, "a", 1)}


def _materialized(graph):
    return graph.__dask_graph__() if hasattr(graph, "__dask_graph__") else graph


def test_graph_expression_is_named_by_the_token_and_computes_the_graph():
    expression = _compat.graph_expression(dict(GRAPH), "flowyml-r1")
    assert dask.local.get_sync(_materialized(expression), ["b"]) == (4,)
    if must_have("dask"):
        assert expression is not GRAPH and expression.deterministic_token == "flowyml-r1"


def test_graph_expression_keeps_a_high_level_graphs_annotations():
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    layer = MaterializedLayer(dict(GRAPH), annotations={"resources": {"GPU": 1}})
    graph = HighLevelGraph({"flowyml-r1": layer}, {"flowyml-r1": set()})
    expression = _compat.graph_expression(graph, "flowyml-r1")
    assert dask.local.get_sync(dict(_materialized(expression)), ["b"]) == (4,)
    if must_have("dask"):
        assert expression.__dask_annotations__()["resources"] == {"a": {"GPU": 1}, "b": {"GPU": 1}}


def test_graph_expression_without_dask_expressions_is_the_graph(monkeypatch):
    hide(monkeypatch, "dask._expr")
    graph = dict(GRAPH)
    assert _compat.graph_expression(graph, "flowyml-r1") is graph


def test_seeded_graph_runs_the_rest_of_a_graph_from_finished_results():
    # A graph rebuilt after a worker died: "a" finished, "b" is still to run.
    graph = {"a": (add, 1, 2), "b": (add, "a", 1)}
    seeded, cache = _compat.seeded_graph(graph, {"a": 30})
    assert dask.local.get_sync(seeded, ["b"], cache=cache) == (31,)  # "a" is not computed again
    if must_have("dask"):
        assert cache is None  # the results travel in the graph, as dask 2024.12 needs


def test_seeded_graph_without_task_specs_hands_the_results_over_as_cache(monkeypatch):
    hide(monkeypatch, "dask._task_spec")
    graph = {"b": (add, "a", 1)}
    assert _compat.seeded_graph(graph, {"a": 3}) == (graph, {"a": 3})


def test_multiprocessing_get_id_names_this_process_and_pickles_by_reference():
    get_id = _compat.multiprocessing_get_id()
    assert get_id() == multiprocessing.current_process().ident
    assert pickle.loads(pickle.dumps(get_id)) is get_id  # get_async sends it to the workers
    if must_have("dask"):
        assert get_id is dask.multiprocessing._process_get_id


def test_multiprocessing_get_id_fallback(monkeypatch):
    monkeypatch.delattr(dask.multiprocessing, "_process_get_id")
    get_id = _compat.multiprocessing_get_id()
    assert get_id is not None and get_id() == multiprocessing.current_process().ident
    assert pickle.loads(pickle.dumps(get_id)) is get_id


# -- the standard library's process pools ---------------------------------------------------


def _die() -> None:
    os._exit(3)


def test_a_pool_names_its_processes_and_says_when_one_died():
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pid = pool.submit(os.getpid).result()
        assert hasattr(pool, "_broken") and hasattr(pool, "_processes")
        processes = _compat.pool_processes(pool)
        assert list(processes) == [pid] and processes[pid].pid == pid
        processes.clear()  # a copy: the pool keeps its own
        assert _compat.pool_processes(pool)
        assert not _compat.pool_is_broken(pool)
        dying = pool.submit(_die)
        with pytest.raises(BrokenProcessPool):
            dying.result()
        assert _compat.pool_is_broken(pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _PoolWithoutPrivates:
    """A process pool as a Python without ``_broken`` and ``_processes`` would show it."""


def test_pool_fallbacks_read_the_start_up_futures_and_know_no_process():
    failed, finished = Future(), Future()
    failed.set_exception(BrokenProcessPool("a worker died"))
    finished.set_result(None)
    pool = _PoolWithoutPrivates()
    assert _compat.pool_is_broken(pool, [finished, failed])
    assert not _compat.pool_is_broken(pool, [finished])
    assert _compat.pool_processes(pool) == {}


def test_wait_until_readable_on_a_simple_queue():
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    try:
        assert hasattr(queue, "_reader")
        assert not _compat.wait_until_readable(queue, 0.01)
        queue.put("ready")
        assert _compat.wait_until_readable(queue, 5)
        assert queue.get() == "ready"
    finally:
        queue.close()


class _QueueWithoutReader:
    """A SimpleQueue as a Python without ``_reader`` would show it: ``empty()`` only."""

    def __init__(self, items: int) -> None:
        self.items = items

    def empty(self) -> bool:
        return not self.items


def test_wait_until_readable_fallback_polls_empty():
    assert _compat.wait_until_readable(_QueueWithoutReader(1), 5)
    assert not _compat.wait_until_readable(_QueueWithoutReader(0), 0.02)


# -- distributed's scheduler ----------------------------------------------------------------


def _has_broker(dask_scheduler) -> bool:
    return _compat._broker_topics(dask_scheduler) is not None


def _events(dask_scheduler, topic: str) -> tuple[int, list]:
    count, events = _compat.topic_events(dask_scheduler, topic)
    return count, [message for _, message in events]


def _drop(dask_scheduler, topic: str) -> None:
    _compat.drop_topics(dask_scheduler, [topic])


def test_topic_events_and_drop_topics_on_a_scheduler(_executors):
    client = _open("distributed", _executors).client
    topic = "flowyml-compat-test"
    client.log_event(topic, {"n": 1})
    client.log_event(topic, {"n": 2})
    assert client.run_on_scheduler(_events, topic=topic) == (2, [{"n": 1}, {"n": 2}])
    client.run_on_scheduler(_drop, topic=topic)
    assert client.run_on_scheduler(_events, topic=topic) == (0, [])
    if must_have("distributed"):
        assert client.run_on_scheduler(_has_broker)


class _SchedulerWithoutBroker:
    """A scheduler as a distributed without ``_broker`` would show it: ``get_events`` only."""

    def __init__(self) -> None:
        self.events = {"t": [(1.0, "a"), (2.0, "b")]}

    def get_events(self, topic):
        return tuple(self.events.get(topic, ()))


def test_scheduler_fallbacks_use_get_events_and_leave_the_events():
    scheduler = _SchedulerWithoutBroker()
    assert _compat.topic_events(scheduler, "t") == (2, ((1.0, "a"), (2.0, "b")))
    assert _compat.topic_events(scheduler, "other") == (0, ())
    _compat.drop_topics(scheduler, ["t"])
    assert scheduler.events["t"]


# -- pandas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_backend", [None, "pyarrow", "numpy_nullable"])
def test_arrow_to_pandas_converts_like_read_parquet(tmp_path, dtype_backend):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, None, 3], "s": ["x", None, "z"]}), path)
    options = {"dtype_backend": dtype_backend} if dtype_backend else {}
    expected = pd.read_parquet(path, **options)
    got = _compat.arrow_to_pandas(pq.read_table(path), dtype_backend)
    pd.testing.assert_frame_equal(got, expected)
    if must_have("pandas"):
        from pandas.io._util import arrow_table_to_pandas  # noqa: F401  still there


@pytest.mark.parametrize("dtype_backend", ["pyarrow", "numpy_nullable"])
def test_arrow_to_pandas_without_the_pandas_helper_keeps_the_dtype_backend(tmp_path, monkeypatch, dtype_backend):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, None, 3], "x": [0.5, 1.5, None], "b": [True, None, False]}), path)
    expected = pd.read_parquet(path, dtype_backend=dtype_backend)
    hide(monkeypatch, "pandas.io._util")
    pd.testing.assert_frame_equal(_compat.arrow_to_pandas(pq.read_table(path), dtype_backend), expected)


def test_arrow_to_pandas_without_the_pandas_helper_is_to_pandas(monkeypatch):
    table = pa.table({"n": [1, 2], "s": ["x", "y"]})
    hide(monkeypatch, "pandas.io._util")
    pd.testing.assert_frame_equal(_compat.arrow_to_pandas(table, None, {"ignore_metadata": True}),
                                  table.to_pandas(ignore_metadata=True))

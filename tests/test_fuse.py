"""Straight per-partition chains run as one task per partition on the process backend."""

from __future__ import annotations

from pathlib import Path

from flowyml import ParallelExecutor, Pipeline, read_csv, step
from flowyml.compile import compile_plan
from flowyml.fuse import (
    INLINE_LOAD_BYTES,
    CachedReads,
    FusedTask,
    LoadsInline,
    fuse_partition_chains,
    inline_cached_loads,
)
from flowyml.tasks import RAISE

from . import pipelines

DATA = Path(__file__).resolve().parent.parent / "data"


def _graph(tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")), tmp_path / "out")
    plan = pipeline.plan()
    return compile_plan(plan, run_id="test", mode=RAISE)


def test_read_clean_write_chain_fuses_per_partition(tmp_path):
    graph = _graph(tmp_path)
    fused = fuse_partition_chains(graph.dsk, graph.output_keys)
    # clean feeds both the sink and fare_by_zone (whole): it must stay a task of its own,
    # while each source partition is absorbed into its clean task.
    chains = {key: task[0] for key, task in fused.items() if isinstance(task[0], FusedTask)}
    assert set(chains) == {("clean", i) for i in range(6)}
    assert all(chain.keys == (("trips", i), ("clean", i)) for (_, i), chain in chains.items())
    assert not any(key[0] == "trips" for key in fused if isinstance(key, tuple))
    assert "fare_by_zone" in fused and "write_parquet" in fused  # whole steps untouched


def test_private_chain_fuses_end_to_end(tmp_path):
    pipeline = (
        pipelines.Pipeline("chain")
        .add_source("trips", read_csv(str(DATA / "trips" / "trips_*.csv")))
        .add_step(pipelines.clean)
        .add_step(pipelines.count_rows)
    )
    graph = compile_plan(pipeline.plan(), run_id="t", mode=RAISE)
    fused = fuse_partition_chains(graph.dsk, graph.output_keys)
    assert set(fused) == {("count_rows", i) for i in range(6)}  # outputs are kept, everything else absorbed
    assert fused[("count_rows", 0)][0].keys == (("trips", 0), ("clean", 0), ("count_rows", 0))


def test_fused_run_reports_every_task(tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")), tmp_path / "out")
    with ParallelExecutor(max_workers=2, backend="process") as executor:
        result = pipeline.run(executor=executor, progress=False)
    reference = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    assert sorted(t.key for t in result.tasks) == sorted(t.key for t in reference.tasks)
    assert {n: (s.status, s.partitions) for n, s in result.steps.items()} == {
        n: (s.status, s.partitions) for n, s in reference.steps.items()
    }
    assert result["fare_by_zone"].equals(reference["fare_by_zone"])


def _cached_rerun_graph(tmp_path, new_parts):
    """The graph a cached rerun of ``monthly_job`` executes after ``new_parts`` arrived."""
    from flowyml.cache import open_cache, plan_cached_run

    data, logs = tmp_path / "months", tmp_path / "logs"
    logs.mkdir()
    pipelines.write_parts(data, range(3))
    job = pipelines.monthly_job(str(data), str(logs), str(tmp_path / "out"), str(tmp_path / "cache"))
    job.run(executor=ParallelExecutor(backend="sync"), progress=False)
    pipelines.write_parts(data, new_parts)
    plan = job.plan()
    graph = compile_plan(plan, run_id="again", mode=RAISE,
                         source_partitions={"months": plan.inputs["months"].partitions()})
    cached = plan_cached_run(graph, plan, open_cache(plan.cache_dir), "again", RAISE)
    return graph, cached.dsk


def test_large_cached_partitions_a_whole_step_reads_are_read_by_its_task(tmp_path, monkeypatch):
    # One new month: summarize needs all four clean partitions, three of them
    # cached. Large ones (here: all) its task reads itself, so they never travel
    # through the parent process; the new partition stays a task of its own.
    # The sink's three unchanged files are relinked by its commit's task.
    monkeypatch.setattr("flowyml.fuse.INLINE_LOAD_BYTES", 1)
    graph, dsk = _cached_rerun_graph(tmp_path, [3])
    inlined = inline_cached_loads(dsk, graph.output_keys)
    cached = [("clean", 0), ("clean", 1), ("clean", 2)]
    relinked = [("write_parquet", 0), ("write_parquet", 1), ("write_parquet", 2)]
    summarize = inlined["summarize"]
    assert isinstance(summarize[0], LoadsInline)
    assert [key for _, _, key in summarize[0].nested] == cached
    assert ("clean", 3) in inlined and ("clean", 3) in summarize[1]
    commit = inlined["write_parquet"]
    assert isinstance(commit[0], LoadsInline) and [key for _, _, key in commit[0].nested] == relinked
    assert set(inlined) == set(dsk) - set(cached) - set(relinked)


def test_small_cached_partitions_are_read_by_one_task_of_their_own(tmp_path):
    # A few kilobytes each: read together by one task, early, in parallel with
    # the new partition's work, and sent through the parent once.
    graph, dsk = _cached_rerun_graph(tmp_path, [3])
    inlined = inline_cached_loads(dsk, graph.output_keys)
    cached = [("clean", 0), ("clean", 1), ("clean", 2)]
    reads = inlined[("clean", 0)]
    assert isinstance(reads[0], CachedReads) and reads[0].keys == tuple(cached)
    assert not any(key in inlined for key in cached[1:])
    summarize = inlined["summarize"]
    assert isinstance(summarize[0], LoadsInline) and summarize[0].nested == ()
    assert summarize[0].batched == ((0, 0), (0, 1), (0, 2)) and summarize[-1] == ("clean", 0)
    assert summarize[1] == [None, None, None, ("clean", 3)]
    assert isinstance(inlined["write_parquet"][0], LoadsInline)  # local relinks nest


def test_a_cached_read_used_twice_or_requested_stays_a_task():
    from flowyml.cache.tasks import LoadTask

    def load(i):
        return (LoadTask("clean", i, None, f"k{i}", "run", RAISE, i, size=INLINE_LOAD_BYTES),)

    dsk = {("clean", 0): load(0), ("clean", 1): load(1), ("clean", 2): load(2),
           "a": (sum, [("clean", 0), ("clean", 1)]), "b": (sum, [("clean", 1), ("clean", 2)])}
    inlined = inline_cached_loads(dsk, keep=[("clean", 2)])
    assert ("clean", 1) in inlined and ("clean", 2) in inlined  # read by two tasks; requested
    assert ("clean", 0) not in inlined and inlined["a"][1][0] == dsk[("clean", 0)]
    assert inlined["b"] == dsk["b"]


# -- results stored behind ----------------------------------------------------------------

class SlowToStore:
    """A step's value whose cache store, in a worker's store thread, waits until its consumer ran.

    Each pickling is logged with its thread. Stored before the task returns,
    the consumer could not start first: the store would wait in vain.
    """

    def __init__(self, n: int, folder: str) -> None:
        self.n, self.folder = n, folder

    def __reduce__(self):
        import threading
        import time

        thread = threading.current_thread().name
        with open(Path(self.folder) / "pickled.log", "a") as log:
            log.write(f"{thread}\n")
        if thread == "flowyml-store":
            deadline = time.monotonic() + 60
            while not (Path(self.folder) / "consumed").exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # the store's own pace: the test waits on the run, not on this
        return (SlowToStore, (self.n, self.folder))


@step(outputs=["value"])
def produce(folder: str = "") -> SlowToStore:
    return SlowToStore(41, folder)


@step(inputs=["value"], outputs=["answer"])
def consume(value: SlowToStore, folder: str = "") -> int:
    (Path(folder) / "consumed").touch()
    return value.n + 1


def test_a_result_is_stored_while_its_consumers_run_and_before_the_run_returns(tmp_path):
    pipeline = (Pipeline("behind", cache_dir=str(tmp_path / "cache"))
                .add_step(produce, params={"folder": str(tmp_path)})
                .add_step(consume, params={"folder": str(tmp_path)}))
    with ParallelExecutor(backend="process", max_workers=2) as executor:
        assert pipeline.run(executor=executor, progress=False)["answer"] == 42
    # Its worker's store thread stored it, once the consumer had started.
    assert "flowyml-store" in (tmp_path / "pickled.log").read_text().splitlines()
    # And it was in the cache when run() returned, though the pool is gone now.
    with ParallelExecutor(backend="process", max_workers=2) as executor:
        again = pipeline.run(executor=executor, progress=False)
    assert again["answer"] == 42 and again.steps["produce"].status == "cached"


def test_a_workers_store_thread_ends_once_its_work_is_done(monkeypatch):
    """A worker forks single-threaded (killable timeouts): settle() waits for the thread's end."""
    import threading

    from flowyml import behind

    monkeypatch.setattr(behind, "_behind", None)
    def store_threads() -> int:  # other threads (pools closed by earlier tests) end on their own schedule
        return sum(thread.name == "flowyml-store" for thread in threading.enumerate())

    assert not behind.put(print, "nothing")  # no thread in a process that did not install one
    behind.install(barrier=None)
    started, release, done = threading.Event(), threading.Event(), []

    def work(value):
        started.set()
        release.wait(30)
        done.append(value)

    assert behind.put(work, 1) and behind.put(work, 2)
    assert started.wait(30) and store_threads() == 1
    release.set()
    behind.settle()
    assert done == [1, 2] and store_threads() == 0


def _installed(monkeypatch, barrier=None):
    """This process as a worker with a store thread (restored after the test)."""
    from flowyml import behind

    monkeypatch.setattr(behind, "_behind", None)
    behind.install(barrier)
    return behind


class _Stores:
    """A cache that records each store, and the thread that made it."""

    def __init__(self) -> None:
        self.stored: dict[str, object] = {}
        self.threads: dict[str, str] = {}

    def store(self, key, value) -> None:
        import threading

        self.stored[key], self.threads[key] = value, threading.current_thread().name

    def load(self, key):
        return self.stored[key]


def _succeeds(value):
    from flowyml.tasks import SUCCEEDED, Outcome

    return lambda *arguments: Outcome(value, "step", 0, SUCCEEDED, 1, 0.0, 0.0, "worker")


def test_a_large_result_is_stored_by_its_task_not_held_by_the_store_thread(monkeypatch):
    import pandas as pd

    from flowyml.cache.tasks import StoreTask

    behind = _installed(monkeypatch)
    monkeypatch.setattr("flowyml.cache.tasks.MAX_BYTES_BEHIND", 10_000)
    cache = _Stores()
    StoreTask(_succeeds(pd.DataFrame({"x": range(10)})), cache, "small", behind=True)()
    StoreTask(_succeeds(pd.DataFrame({"x": range(10_000)})), cache, "large", behind=True)()
    behind.settle()
    assert cache.threads == {"small": "flowyml-store", "large": "MainThread"}


def test_a_sinks_entries_describe_its_files_as_its_commit_left_them(monkeypatch):
    """The versions are read by the commit's task; a file changed while the thread is busy changes nothing."""
    import threading
    from types import SimpleNamespace

    from flowyml.cache.tasks import SINK_COMMIT, SINK_ENTRY, CommitStoreTask

    behind = _installed(monkeypatch)
    versions = {"out/a.parquet": (10, 1.0), "out/b.parquet": (20, 2.0)}
    output = SimpleNamespace(url="out", version=versions.get, name_of=lambda path: path.split("/")[-1])

    class Commit:  # a sink's commit task, as sink_output finds its Output
        finalize = SimpleNamespace(output=output)

        def __call__(self, parts):
            return _succeeds(parts)()

    busy, release = threading.Event(), threading.Event()
    behind.put(lambda: (busy.set(), release.wait(30)))  # the thread is still storing something else
    assert busy.wait(30)
    cache = _Stores()
    CommitStoreTask(Commit(), cache, "commit", ("wa", "wb"), behind=True)(list(versions))
    versions["out/a.parquet"] = (11, 3.0)  # rewritten after the commit, before its entries are stored
    release.set()
    behind.settle()
    assert cache.stored == {"wa": (SINK_ENTRY, "out/a.parquet", 10, 1.0), "wb": (SINK_ENTRY, "out/b.parquet", 20, 2.0),
                            "commit": (SINK_COMMIT, "out", [("a.parquet", 10, 1.0), ("b.parquet", 20, 2.0)])}
    assert set(cache.threads.values()) == {"flowyml-store"}


def test_a_flush_outlasting_any_timeout_keeps_the_barrier_whole(monkeypatch):
    """A slow store (here: every timeout already run out) must not break the barrier the flushes share."""
    import threading

    arrived = threading.Event()

    class Expired(threading.Barrier):
        def wait(self, timeout=None):
            arrived.set()
            return super().wait(None if timeout is None else 0)

    behind = _installed(monkeypatch, Expired(2))
    errors = []

    def first_worker():
        try:
            behind.flush_task()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=first_worker)
    worker.start()
    assert arrived.wait(30)
    behind.flush_task()  # the second worker, long after the first
    worker.join(30)
    assert errors == [] and not behind._behind.barrier.broken


def test_a_fork_waits_for_the_store_thread(monkeypatch):
    """Any fork of a worker (user code, a nested run), not only a killable timeout's, forks single-threaded."""
    import os
    import threading

    behind = _installed(monkeypatch)
    release, done = threading.Event(), []
    # Runs just before the fork (before-hooks run newest first, so before settle):
    # the store below is then still under way unless the fork waits for it.
    os.register_at_fork(before=release.set)
    behind.put(lambda: (release.wait(30), done.append("stored")))
    pid = os.fork()
    if pid == 0:
        os._exit(0 if done == ["stored"] else 1)  # the store was over before the fork
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_settle_waits_for_a_store_thread_still_ending(monkeypatch):
    """Done with its work, a thread may not have ended yet: settle() joins it all the same."""
    import threading
    from types import SimpleNamespace

    behind = _installed(monkeypatch)
    joined = threading.Event()

    class Ending(threading.Thread):
        def run(self):
            super().run()
            joined.wait(30)  # still ending after its work: until someone joins it

        def join(self, timeout=None):
            joined.set()
            super().join(timeout)

    # In flowyml.behind alone: a thread anything else started now must not wait to be joined.
    monkeypatch.setattr(behind, "threading", SimpleNamespace(**{**vars(threading), "Thread": Ending}))
    state = behind._behind
    behind.put(len, "")
    with state._idle:
        assert state._idle.wait_for(lambda: state._thread is None, 30)
    behind.settle()
    assert not any(thread.name == "flowyml-store" for thread in threading.enumerate())


def test_cached_reads_pickle_values_from_main_by_value(monkeypatch):
    import pickle
    import sys

    from flowyml.tasks import CACHED, Outcome

    class Local:  # a class pickle finds in __main__ here, but not in the worker that unpickles
        __module__, __qualname__ = "__main__", "FlowymlTestLocal"

    monkeypatch.setattr(sys.modules["__main__"], "FlowymlTestLocal", Local, raising=False)
    read = CachedReads((lambda: Outcome(Local(), "s", 0, CACHED, 0, 0.0, 0.0, "w"),) * 2, ("a", "b"))
    payload = read().value
    monkeypatch.delattr(sys.modules["__main__"], "FlowymlTestLocal")  # as in that worker
    assert [type(outcome.value).__qualname__ for outcome in pickle.loads(payload)] == ["FlowymlTestLocal"] * 2

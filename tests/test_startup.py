"""No idle start-up: a pool or cluster starts only when a run has tasks to execute.

Inside ``with ParallelExecutor(...)`` the first run that executes tasks
starts the block's pool and later runs reuse it; a run whose results are all
cached starts none. Whatever stops a run while its pool starts, nothing is
left running. And the ``flowyml`` command answers ``--help`` without
importing pandas or Dask.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import dask
import psutil
import pytest

from flowyml import BackendError, ParallelExecutor

from . import pipelines

POOLED = ["thread", "process", "distributed"]


@pytest.fixture(autouse=True)
def _resource_tracker():
    # multiprocessing's resource tracker is the interpreter's own helper: started
    # by the first pool of any library, it stays until Python exits by design.
    # Start it first, so that only what flowyml starts counts.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def workers(backend: str) -> set[int]:
    """What runs tasks for ``backend`` right now: pool threads, or child processes."""
    if backend == "thread":
        return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("flowyml-thread")}
    return {
        p.pid for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    }


def cached_pipeline(cache_dir) -> pipelines.Pipeline:
    pipeline = pipelines.parallel_processing(3)
    pipeline.cache_dir = str(cache_dir)
    return pipeline


@pytest.mark.parametrize("backend", POOLED)
def test_entering_an_executor_starts_nothing(backend):
    before = workers(backend)
    with ParallelExecutor(max_workers=2, backend=backend):
        assert workers(backend) == before


@pytest.mark.parametrize("backend", ["sync", *POOLED])
def test_an_all_cached_run_starts_no_pool(backend, tmp_path):
    cold = cached_pipeline(tmp_path).run(executor=ParallelExecutor(backend="sync"), progress=False)
    before = workers(backend)
    with ParallelExecutor(max_workers=2, backend=backend) as executor:
        result = cached_pipeline(tmp_path).run(executor=executor, progress=False)
        assert workers(backend) == before, "an all-cached run started a pool"
    assert result.outputs == cold.outputs
    assert {s.status for s in result.steps.values()} == {"cached"}


@pytest.mark.parametrize("backend", POOLED)
def test_the_first_run_with_tasks_starts_the_pool_and_later_runs_reuse_it(backend, tmp_path):
    before = workers(backend)
    # One worker: a thread pool adds threads as tasks come, up to max_workers.
    with ParallelExecutor(max_workers=1, backend=backend) as executor:
        cached_pipeline(tmp_path).run(executor=executor, progress=False)  # all cached after this
        pool = workers(backend) - before
        assert pool, "a run with tasks started no pool"
        cached_pipeline(tmp_path).run(executor=executor, progress=False)
        result = pipelines.parallel_processing(4).run(executor=executor, progress=False)
        assert result.success
        assert workers(backend) - before == pool, "a later run started another pool"
    assert workers(backend) - before == set(), "the block left its pool running"


def test_a_run_outside_with_starts_and_stops_its_own_pool(backend, tmp_path):
    before = workers(backend)
    executor = ParallelExecutor(max_workers=2, backend=backend)
    assert cached_pipeline(tmp_path).run(executor=executor, progress=False).success
    assert cached_pipeline(tmp_path).run(executor=executor, progress=False).success  # all cached
    assert workers(backend) - before == set()


@pytest.fixture(params=["process", "distributed"])
def worker_backend(request) -> str:
    return request.param


@pytest.mark.parametrize("inside_with", [False, True], ids=["run", "with"])
def test_ctrl_c_while_the_pool_starts_leaves_nothing_running(worker_backend, inside_with, monkeypatch):
    import flowyml.run

    compile_plan = flowyml.run.compile_plan

    def interrupted(*args, **kwargs):  # Ctrl-C just after a run without a cache began its pool
        raise KeyboardInterrupt

    before = workers(worker_backend)
    executor = ParallelExecutor(max_workers=2, backend=worker_backend)
    monkeypatch.setattr(flowyml.run, "compile_plan", interrupted)
    if inside_with:
        with executor:
            with pytest.raises(KeyboardInterrupt):
                pipelines.parallel_processing(2).run(executor=executor, progress=False)
            monkeypatch.setattr(flowyml.run, "compile_plan", compile_plan)
            assert pipelines.parallel_processing(2).run(executor=executor, progress=False).success
    else:
        with pytest.raises(KeyboardInterrupt):
            pipelines.parallel_processing(2).run(executor=executor, progress=False)
    assert workers(worker_backend) - before == set()


@pytest.mark.parametrize("inside_with", [False, True], ids=["run", "with"])
def test_ctrl_c_while_waiting_for_the_workers_kills_them(inside_with, monkeypatch):
    import flowyml.executors.local

    def interrupted(queue, timeout):
        raise KeyboardInterrupt

    before = workers("process")
    executor = ParallelExecutor(max_workers=2, backend="process")
    monkeypatch.setattr(flowyml.executors.local, "wait_until_readable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if inside_with:
            with executor:
                pipelines.parallel_processing(2).run(executor=executor, progress=False)
        else:
            pipelines.parallel_processing(2).run(executor=executor, progress=False)
    assert workers("process") - before == set()


def test_an_unreachable_scheduler_fails_the_first_run_that_needs_it(tmp_path):
    executor = ParallelExecutor(address="tcp://127.0.0.1:9")  # the discard port: nothing listens
    cached_pipeline(tmp_path).run(executor=ParallelExecutor(backend="sync"), progress=False)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), executor:
        # Nothing to execute: the scheduler is not needed, so not asked.
        assert cached_pipeline(tmp_path).run(executor=executor, progress=False).success
        with pytest.raises(BackendError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:9'"):
            pipelines.parallel_processing(2).run(executor=executor, progress=False)
        with pytest.raises(BackendError, match="cannot reach"):  # tried again, not remembered
            pipelines.parallel_processing(2).run(executor=executor, progress=False)


def test_reading_the_client_inside_with_starts_the_cluster():
    before = workers("distributed")
    with ParallelExecutor(max_workers=1, backend="distributed") as executor:
        assert workers("distributed") == before
        assert executor.dashboard_link.startswith("http://127.0.0.1:")
        client = executor.client
        assert client.submit(sum, [1, 2]).result() == 3
        assert pipelines.parallel_processing(2).run(executor=executor, progress=False).success
        assert executor.client is client  # the run used the cluster the block started
    assert workers("distributed") - before == set()


# -- the command and the package import: no pandas, no Dask ---------------------------------


def imported_modules(*args: str) -> set[str]:
    """Top-level packages that ``python -X importtime <args>`` imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          check=True)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "flowyml" in names, done.stderr[-2000:]
    return names


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_flowyml_help_and_version_import_neither_pandas_nor_dask(option):
    assert imported_modules("-m", "flowyml", option).isdisjoint({"pandas", "dask", "distributed", "numpy"})


def test_import_flowyml_is_lazy_and_every_public_name_resolves():
    code = ("import sys, flowyml; heavy = {'pandas', 'dask'} & set(sys.modules); "
            "assert not heavy, heavy; "
            "assert all(getattr(flowyml, name) is not None for name in flowyml.__all__); "
            "assert set(flowyml.__all__) <= set(dir(flowyml)); "
            "from flowyml import step, Pipeline, ParallelExecutor, read_csv; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- planning a rerun: unchanged CSV headers are not read again ------------------------------


def test_planning_again_reads_only_the_headers_of_changed_files(tmp_path, monkeypatch):
    import os

    import flowyml.io.csv
    from flowyml import DataError, read_csv

    for i in range(3):
        (tmp_path / f"part_{i}.csv").write_text("a,b\n1,2\n")
    read = []
    sample = flowyml.io.csv._csv_sample
    monkeypatch.setattr(flowyml.io.csv, "_csv_sample", lambda fs, path, *args: read.append(
        os.path.basename(path)) or sample(fs, path, *args))
    assert len(read_csv(str(tmp_path / "*.csv")).partitions()) == 3
    assert sorted(read) == ["part_0.csv", "part_1.csv", "part_2.csv"]
    read.clear()
    # The first file's first rows fix the column types (read again: they may have
    # changed); the other unchanged headers are not read again.
    read_csv(str(tmp_path / "*.csv")).partitions()
    assert read == ["part_0.csv"], "an unchanged file's header was read again"
    read.clear()
    changed = tmp_path / "part_1.csv"
    changed.write_text("a,c\n1,2\n")
    os.utime(changed, ns=(1, 1))  # a new modification time even on a coarse clock
    with pytest.raises(DataError, match=r"part_1\.csv"):
        read_csv(str(tmp_path / "*.csv")).partitions()
    assert read == ["part_0.csv", "part_1.csv"]

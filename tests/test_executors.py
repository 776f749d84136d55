"""Choosing a backend, and the life of pools and clusters."""

from __future__ import annotations

import os

import psutil
import pytest

from flowyml import BackendError, ParallelExecutor, Pipeline, step

from . import pipelines


def test_default_is_process_with_cpu_count(monkeypatch):
    monkeypatch.delenv("FLOWYML_BACKEND", raising=False)
    executor = ParallelExecutor()
    assert executor.backend == "process"
    assert executor.max_workers == os.cpu_count()


def test_environment_variable_chooses_backend(monkeypatch):
    monkeypatch.setenv("FLOWYML_BACKEND", "thread")
    assert ParallelExecutor().backend == "thread"
    assert ParallelExecutor(backend="sync").backend == "sync"  # the argument wins


def test_unknown_backend_lists_valid_ones(monkeypatch):
    with pytest.raises(BackendError, match=r"unknown backend='threads'.*'distributed'.*'process'.*'sync'.*'thread'"):
        ParallelExecutor(backend="threads")
    monkeypatch.setenv("FLOWYML_BACKEND", "gpu")
    with pytest.raises(BackendError, match="FLOWYML_BACKEND='gpu'"):
        ParallelExecutor()


def test_distributed_options_need_distributed():
    with pytest.raises(BackendError, match="address only apply to backend='distributed'"):
        ParallelExecutor(backend="thread", address="tcp://127.0.0.1:8786")


def test_max_workers_must_be_positive():
    with pytest.raises(BackendError, match="max_workers"):
        ParallelExecutor(max_workers=0)


def _killable_timeouts() -> bool:
    from flowyml.tasks import worker_settings

    return worker_settings().killable_timeouts


def test_only_the_process_backend_gives_its_workers_killable_timeouts(executor):
    from flowyml.tasks import WorkerSettings, worker_settings

    pipeline = Pipeline("settings").add_step(_killable_timeouts, name="killable")
    result = pipeline.run(executor=executor, progress=False)
    assert result["killable"] is (executor.backend == "process")
    assert worker_settings() == WorkerSettings(), "a backend never changes the driver's own settings"


def _worker_pids(executor) -> set[int]:
    @step
    def pid():
        return os.getpid()

    pipeline = Pipeline("pid")
    for i in range(4):
        pipeline.add_step(pid, name=f"pid_{i}")
    return set(pipeline.run(executor=executor, progress=False).outputs.values())


@pytest.mark.parametrize("backend", ["process", "distributed"])
def test_nothing_left_running_outside_with(backend):
    # multiprocessing's resource tracker is the interpreter's own helper: started
    # by the first pool of any library, it stays until Python exits by design.
    # Start it first, so that only what flowyml starts counts (the test passed in
    # the full suite, where an earlier test had started it, and failed alone).
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    executor = ParallelExecutor(max_workers=2, backend=backend)
    result = pipelines.parallel_processing(3).run(executor=executor, progress=False)
    assert result.success
    left = [
        p for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert left == []


def test_distributed_local_cluster_is_local_and_has_a_dashboard():
    import urllib.request

    with ParallelExecutor(max_workers=2, backend="distributed") as executor:
        link = executor.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link, timeout=60) as page:  # the link is a live dashboard
            assert page.status == 200 and b"Dask" in page.read()
        # max_workers single-threaded worker processes, all on 127.0.0.1, and the tasks ran on them.
        workers = executor.client.scheduler_info()["workers"]
        assert executor.client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert sorted(w["nthreads"] for w in workers.values()) == [1, 1]
        assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
        pids = executor.client.run(os.getpid)
        assert set(pids) == set(workers) and len(set(pids.values()) | {os.getpid()}) == 3  # processes
        result = pipelines.parallel_processing(2).run(executor=executor, progress=False)
        assert len(result.tasks) == 2 and {t.worker for t in result.tasks} <= set(workers)


SCRIPT = """
from flowyml import Pipeline, ParallelExecutor, step

@step
def square(x):
    return x * x

pipeline = Pipeline("script")
for i in range(4):
    pipeline.add_step(square, name=f"square_{i}", params={"x": i})
result = pipeline.run(executor=ParallelExecutor(max_workers=2, backend="process"), progress=False)
print(sorted(result.outputs.values()))
"""


def test_script_without_main_guard_runs_on_process(tmp_path):
    """Workers do not re-run the user's script (which would start the pipeline again)."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 4, 9]"

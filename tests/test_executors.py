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
    # Python's own helper processes were started first (conftest.py).
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


# -- where worker processes come from --------------------------------------------------


@step
def environment(name: str):
    import dask

    return os.environ.get(name), dask.config.get("flowyml-test.marker", None), os.getpid(), os.getppid()


def _worker_view(name: str) -> tuple:
    pipeline = Pipeline("env").add_step(environment, params={"name": name})
    with ParallelExecutor(max_workers=1, backend="process") as executor:
        return pipeline.run(executor=executor, progress=False)["environment"]


def test_process_workers_see_the_environment_the_driver_has_when_their_pool_starts(monkeypatch):
    # A variable set after an earlier pool started (credentials, an endpoint, a
    # Dask setting) reaches the next pool's workers, as it would spawned ones.
    name = f"FLOWYML_TEST_{os.getpid()}_{id(monkeypatch)}"
    first = _worker_view(name)
    assert first[:2] == (None, None)
    monkeypatch.setenv(name, "set later")
    monkeypatch.setenv("DASK_FLOWYML_TEST__MARKER", "from the environment")
    second = _worker_view(name)
    assert second[:2] == ("set later", "from the environment")
    assert second[2] != first[2]  # a new worker
    monkeypatch.delenv(name)
    assert _worker_view(name)[0] is None  # and one the driver dropped is gone


def test_parallel_map_workers_see_the_driver_s_environment(monkeypatch):
    from flowyml.utils.parallel import parallel_map

    name = f"FLOWYML_TEST_MAP_{os.getpid()}"
    parallel_map(_read_variable, [name, name], backend="process", max_workers=2)  # the server is up
    monkeypatch.setenv(name, "seen")
    got = parallel_map(_read_variable, [name, name], backend="process", max_workers=2)
    assert got == ["seen", "seen"]


def _read_variable(name: str):
    return os.environ.get(name)


def test_a_new_pool_s_workers_are_forked_from_one_server_with_pandas_imported():
    # The imports are paid once per driver process: the next pool's workers come
    # from the same server, not from the driver, and have pandas already.
    pipeline = Pipeline("where").add_step(_where)
    seen = []
    for _ in range(2):
        with ParallelExecutor(max_workers=1, backend="process") as executor:
            seen.append(pipeline.run(executor=executor, progress=False)["_where"])
    (pid_a, parent_a, had_a), (pid_b, parent_b, had_b) = seen
    assert pid_a != pid_b and parent_a == parent_b != os.getpid()
    assert had_a and had_b


@step
def _where():
    import sys

    return os.getpid(), os.getppid(), "pandas" in sys.modules and "flowyml.tasks" in sys.modules

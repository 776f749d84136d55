"""Retries, timeouts, failure policies, dead workers, pickling checks and interrupts.

Steps count their attempts in files (``pipelines.record``) because they run in
other processes; waits are on marker files, never on sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flowyml import Pipeline, StepFailed, read_csv, step
from flowyml.exceptions import NotPicklableError, StepTimeoutError, WorkerDiedError

from . import pipelines

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def parts(tmp_path) -> Path:
    folder = tmp_path / "parts"
    pipelines.write_parts(folder, range(3))
    return folder


def rows_pipeline(folder: Path, name: str = "job") -> Pipeline:
    return Pipeline(name).add_source("rows", read_csv(str(folder / "*.csv")))


#: The line of pipelines.flaky_double that raises.
FLAKY_RAISE = 'raise ConnectionError(f"part {_part(rows)}: attempt {attempt} lost its connection")'


def expected_rows(folder: Path) -> pd.DataFrame:
    return pd.concat(pipelines.pandas_read_csv(path) for path in sorted(folder.glob("*.csv")))


# -- retries ------------------------------------------------------------------------------


def test_retries_are_per_partition_and_counted(executor, parts, tmp_path):
    pipeline = rows_pipeline(parts).add_step(
        pipelines.flaky_double, params={"log_dir": str(tmp_path), "fail_parts": (1,), "failures": 2},
        retries=2,
    )
    result = pipeline.run(executor=executor, progress=False)
    want = expected_rows(parts)
    pd.testing.assert_frame_equal(result["doubled"], want.assign(value=want["value"] * 2))
    # Only the failing partition ran again: 3 attempts there, 1 elsewhere.
    assert [pipelines.calls(tmp_path, f"flaky-{p}") for p in range(3)] == [1, 3, 1]
    assert result.steps["flaky_double"].attempts == 3
    assert result.steps["flaky_double"].status == "succeeded"
    assert sorted(t.attempts for t in result.tasks if t.step == "flaky_double") == [1, 1, 3]


def test_retries_exhausted_raise_with_the_last_attempt(executor, parts, tmp_path):
    pipeline = rows_pipeline(parts).add_step(
        pipelines.flaky_double, params={"log_dir": str(tmp_path), "fail_parts": (2,), "failures": 9},
        retries=1, retry_delay=0.2,
    )
    with pytest.raises(StepFailed) as info:
        pipeline.run(executor=executor, progress=False)
    error = info.value
    assert (error.step, error.partition, error.attempt) == ("flaky_double", 2, 2)
    assert isinstance(error.__cause__, ConnectionError)
    raised_at = traceback.extract_tb(error.__cause__.__traceback__)[-1]  # the user's own raise
    assert (raised_at.name, raised_at.filename, raised_at.line) == ("flaky_double", pipelines.__file__, FLAKY_RAISE)
    stamps = [float(line.split()[1]) for line in (tmp_path / "flaky-2").read_text().splitlines()]
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.2  # retry_delay was waited


# -- timeouts -----------------------------------------------------------------------------


def test_timeout_fails_the_attempt_and_retries(executor, parts, tmp_path):
    release = tmp_path / "release"
    pipeline = rows_pipeline(parts).add_step(
        pipelines.overrun_first, params={"log_dir": str(tmp_path), "release": str(release)},
        timeout=1.5, retries=1,  # room for the quick attempt 2 on a loaded machine
    )
    try:
        result = pipeline.run(executor=executor, progress=False)
        # The run did not wait for the overrunning attempts: none had ended.
        ended_during_run = [pipelines.calls(tmp_path, f"overrun-ended-{part}") for part in range(3)]
    finally:
        release.touch()  # threads that cannot be killed (sync/thread/distributed) end now
    assert ended_during_run == [0, 0, 0]
    pd.testing.assert_frame_equal(result["waited"], expected_rows(parts))
    assert result.steps["overrun_first"].attempts == 2
    # An attempt killed before it began writes no pid: at least one did.
    pids = [int(path.read_text()) for path in tmp_path.glob("overrun-pid-*")]
    assert pids
    if executor.backend == "process":  # the overrunning attempts' processes were killed
        assert not any(_alive(pid) for pid in pids)
    else:  # a thread cannot be killed: each attempt runs on to its end (docs/reliability.md)
        deadline = time.monotonic() + 60
        while not all(pipelines.calls(tmp_path, f"overrun-ended-{part}") for part in range(3)):
            assert time.monotonic() < deadline, "an abandoned attempt never ended"
            time.sleep(0.02)


def test_timeout_exhausted_on_process_kills_and_names_the_step(tmp_path):
    from flowyml import ParallelExecutor

    pipeline = Pipeline("slow").add_step(pipelines.overrun_always, params={"log_dir": str(tmp_path)},
                                         timeout=0.5, retries=1)
    start = time.perf_counter()
    with ParallelExecutor(max_workers=1, backend="process") as executor:
        with pytest.raises(StepFailed) as info:
            pipeline.run(executor=executor, progress=False)
        elapsed = time.perf_counter() - start
    assert isinstance(info.value.__cause__, StepTimeoutError)
    assert "overrun_always" in str(info.value) and "timeout of 0.5s" in str(info.value)
    assert info.value.attempt == 2
    pids = [int((tmp_path / f"always-pid-{n}").read_text()) for n in (1, 2)]
    assert not any(_alive(pid) for pid in pids)
    assert elapsed < 60  # shorter than one attempt's sleep: both were cut short


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- on_failure ----------------------------------------------------------------------------


def test_continue_reports_partial_failures_and_keeps_finished_outputs(executor, parts, tmp_path):
    pipeline = (
        rows_pipeline(parts)
        .add_step(pipelines.flaky_double, params={"log_dir": str(tmp_path), "fail_parts": (1,), "failures": 5})
        .add_step(pipelines.side_branch)
        .add_step(pipelines.count_rows, inputs=["doubled"], outputs=["rows_per_part"])
    )
    result = pipeline.run(executor=executor, on_failure="continue", progress=False)
    assert not result.success
    assert result.steps["flaky_double"].status == "failed"
    assert result.steps["count_rows"].status == "skipped"
    assert result.steps["side_branch"].status == "succeeded"
    assert result.outputs == {"side": len(expected_rows(parts))}
    failure = result.failures["flaky_double"]
    assert failure.partition == 1
    shown = result.steps["flaky_double"].traceback
    assert "ConnectionError: part 1: attempt 1" in shown
    assert f'File "{pipelines.__file__}"' in shown and FLAKY_RAISE in shown  # the user's frame, with its line
    statuses = {t.partition: t.status for t in result.tasks if t.step == "flaky_double"}
    assert statuses == {0: "succeeded", 1: "failed", 2: "succeeded"}
    skipped = {t.partition: t.status for t in result.tasks if t.step == "count_rows"}
    assert skipped == {0: "succeeded", 1: "skipped", 2: "succeeded"}


def test_raise_waits_for_running_tasks(pooled_executor, tmp_path):
    # sync runs one task at a time; on distributed, client.get returns at the first
    # error and the running tasks finish on the cluster (docs/reliability.md).
    executor = pooled_executor
    pipeline = (
        Pipeline("settle")
        .add_step(pipelines.slow_sibling, params={"log_dir": str(tmp_path)})
        .add_step(pipelines.fail_when_sibling_runs, params={"log_dir": str(tmp_path)})
    )
    with pytest.raises(StepFailed, match="fail_when_sibling_runs"):
        pipeline.run(executor=executor, progress=False)
    # run() returned only once the sibling, running when the failure came, had finished.
    assert pipelines.calls(tmp_path, "sibling-done") == 1


# -- dead workers ----------------------------------------------------------------------------


def dying_pipeline(folder: Path, log_dir: Path, how: str, deaths: int, retries: int) -> Pipeline:
    return (
        rows_pipeline(folder, "dying")
        .add_step(pipelines.counted, params={"log_dir": str(log_dir)})
        .add_step(pipelines.die_then_sum, params={"log_dir": str(log_dir), "how": how, "deaths": deaths},
                  retries=retries)
        .add_step(pipelines.after_total)
        .add_step(pipelines.side_branch)
    )


def test_dead_worker_is_retried_and_finished_work_is_kept(worker_executor, parts, tmp_path):
    # On sync and thread a step runs in the driver's own process: its death is the driver's.
    executor = worker_executor
    result = dying_pipeline(parts, tmp_path, "exit", deaths=1, retries=1).run(executor=executor, progress=False)
    assert result["after_total"] == int(expected_rows(parts)["value"].sum()) + 1
    died_in, retried_in = pipelines.pids(tmp_path, "die")
    assert died_in != retried_in  # the second attempt ran in another (or a new) process
    assert result.steps["die_then_sum"].attempts == 2
    computed_in = [pipelines.pids(tmp_path, f"counted-{p}") for p in range(3)]
    if executor.backend == "process":
        # The partitions that had finished before the death were not computed again.
        assert [len(pids) for pids in computed_in] == [1, 1, 1]
    else:
        # Dask recomputes, once, the partitions that lived only in the dead worker's
        # memory. Those another worker computed are usually kept, but not always: a
        # replica Dask had already released is recomputed too (seen with distributed
        # 2024), so the test asks for no more than one recomputation of each.
        assert all(len(pids) == 2 for pids in computed_in if pids[0] == died_in)
        assert all(len(pids) in (1, 2) for pids in computed_in)
        assert all(pids[-1] != died_in for pids in computed_in)


def test_dead_worker_without_retries_names_step_and_cause(parts, tmp_path, process_executor):
    # distributed reruns lost tasks itself (tests/test_distributed.py covers it).
    executor = process_executor
    with pytest.raises(StepFailed) as info:
        dying_pipeline(parts, tmp_path, "segfault", deaths=1, retries=0).run(executor=executor, progress=False)
    error = info.value
    assert error.step == "die_then_sum" and error.attempt == 1
    assert isinstance(error.__cause__, WorkerDiedError)
    assert "SIGSEGV" in str(error) and "die_then_sum" in str(error)
    # The pool was rebuilt: the executor runs the next pipeline.
    assert pipelines.parallel_processing(2).run(executor=executor, progress=False)["chunk_1"] == "processed_1"


def test_dead_worker_with_continue_skips_dependents(parts, tmp_path, process_executor):
    executor = process_executor
    result = dying_pipeline(parts, tmp_path, "kill", deaths=5, retries=0).run(
        executor=executor, on_failure="continue", progress=False
    )
    assert result.steps["die_then_sum"].status == "failed"
    assert result.steps["after_total"].status == "skipped"
    assert result.outputs == {"side": len(expected_rows(parts))}
    assert "SIGKILL" in result.steps["die_then_sum"].traceback
    assert isinstance(result.failures["die_then_sum"].__cause__, WorkerDiedError)


# -- pickling ----------------------------------------------------------------------------------


@step(inputs=["numbers"], outputs=["guarded_total"])
def guarded_total(numbers, lock=None):
    """Sums under a lock it is given as a param or an input: something that cannot pickle."""
    with lock:
        return sum(numbers)


def unpicklable_case(what: str, lock, marker: Path) -> tuple[Pipeline, dict, str]:
    """(pipeline, run inputs, asset) where ``what`` (function, param, input) holds ``lock``.

    Each pipeline also has an independent step touching ``marker``: whether it
    ran shows whether any task started.
    """
    pipeline = Pipeline(what).add_step(pipelines.touch, params={"path": str(marker)})
    if what == "function":
        def locked_total(numbers):
            with lock:
                return sum(numbers)

        return pipeline.add_step(step(locked_total), inputs=["numbers"]), {}, "locked_total"
    if what == "param":
        return pipeline.add_step(guarded_total, params={"lock": lock}), {}, "guarded_total"
    return pipeline.add_step(guarded_total, inputs=["numbers", "lock"]), {"lock": lock}, "guarded_total"


@pytest.mark.parametrize("what", ["function", "param", "input"])
def test_unpicklable_step_param_or_input_runs_where_nothing_is_pickled(in_process_executor, tmp_path, what):
    marker = tmp_path / "ran"
    pipeline, inputs, asset = unpicklable_case(what, threading.Lock(), marker)
    result = pipeline.run({"numbers": [1, 2, 3], **inputs}, executor=in_process_executor, progress=False)
    assert result[asset] == 6
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("what", ["function", "param", "input"])
def test_unpicklable_step_param_or_input_is_named_before_anything_runs(worker_executor, tmp_path, what):
    marker = tmp_path / "ran"
    pipeline, inputs, _ = unpicklable_case(what, threading.Lock(), marker)
    with pytest.raises(NotPicklableError) as info:
        pipeline.run({"numbers": [1, 2, 3], **inputs}, executor=worker_executor, progress=False)
    named = {"function": "step 'locked_total'", "param": "step 'guarded_total', param 'lock'",
             "input": "input 'lock'"}[what]
    message = str(info.value)
    assert message.startswith(named), message  # what cannot be pickled
    assert "cannot pickle '_thread.lock' object" in message  # and why
    assert "backend='thread'" in message  # the way out
    assert not marker.exists()  # checked before any task started


# -- interrupts ----------------------------------------------------------------------------------

SLOW_PIPELINE = """
    import os, time
    from flowyml import Pipeline, read_csv, step, write_parquet

    HERE = {here!r}

    @step(inputs=["rows"], outputs=["frames"], per_partition=True)
    def slow(frame):
        if frame["part"].iloc[0] == 1:  # partition 0 is written; this one never ends
            with open(os.path.join(HERE, "started"), "w") as stream:
                stream.write(str(os.getpid()))
            time.sleep(300)
        return frame

    pipeline = (
        Pipeline("slow")
        .add_source("rows", read_csv(os.path.join(HERE, "parts", "*.csv")))
        .add_step(slow)
        .add_step(write_parquet(os.path.join(HERE, "out"), input="frames"))
    )
"""


@pytest.mark.parametrize(
    "backend, signum",
    [("process", signal.SIGINT), ("process", signal.SIGTERM), ("thread", signal.SIGINT), ("sync", signal.SIGTERM)],
)
def test_interrupt_stops_workers_and_leaves_no_partial_output(tmp_path, backend, signum):
    pipelines.write_parts(tmp_path / "parts", range(2))
    script = tmp_path / "slow_job.py"
    script.write_text(textwrap.dedent(SLOW_PIPELINE.format(here=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "flowyml", "run", str(script), "--backend", backend, "--workers", "2",
         "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started = tmp_path / "started"
        deadline = time.time() + 60
        while not started.exists():  # the slow step is running: now interrupt
            assert child.poll() is None, child.communicate()
            assert time.time() < deadline, "the slow step never started"
            time.sleep(0.02)
        descendants = psutil.Process(child.pid).children(recursive=True)
        child.send_signal(signum)
        _out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, err
    assert "interrupted" in err
    _, alive = psutil.wait_procs(descendants, timeout=15)
    assert alive == [], f"left behind: {alive}"
    leftovers = sorted(name for name in os.listdir(tmp_path) if name not in ("parts", "slow_job.py", "started"))
    assert leftovers == [] or leftovers == [".out.flowyml-lock"], leftovers  # no output, no staging


def test_a_driver_killed_outright_leaves_no_worker_process_behind(tmp_path):
    # SIGKILL (the OOM killer, a scheduler's hard limit) gives the driver no chance
    # to stop its pool: the workers, and the server they were forked from, go too.
    pipelines.write_parts(tmp_path / "parts", range(2))
    script = tmp_path / "slow_job.py"
    script.write_text(textwrap.dedent(SLOW_PIPELINE.format(here=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "flowyml", "run", str(script), "--backend", "process", "--workers", "2",
         "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        started = tmp_path / "started"
        deadline = time.time() + 60
        while not started.exists():
            assert child.poll() is None, "the job ended before its slow step started"
            assert time.time() < deadline, "the slow step never started"
            time.sleep(0.02)
        descendants = psutil.Process(child.pid).children(recursive=True)
        assert int(started.read_text()) in {p.pid for p in descendants}
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    _, alive = psutil.wait_procs(descendants, timeout=15)
    assert alive == [], f"left behind: {alive}"


def test_ctrl_c_while_the_workers_flush_their_stores_kills_them():
    """The wait for the store threads' flush (process backend) is part of the run: Ctrl-C stops the pool too."""
    from flowyml import ParallelExecutor

    with ParallelExecutor(max_workers=2, backend="process") as executor:
        backend = executor._impl
        workers = []

        def interrupted_flush():
            workers.extend(backend._processes.values())
            raise KeyboardInterrupt

        backend._flush_stores = interrupted_flush
        with pytest.raises(KeyboardInterrupt):
            pipelines.diamond().run(executor=executor, progress=False)
        assert backend._pool is None and len(workers) == 2
        assert all(worker.exitcode is not None for worker in workers)  # killed and joined, not left running


def test_a_broken_flush_barrier_is_whole_again_for_the_next_flush(tmp_path):
    """A barrier broken once would let each later flush pass it at once: one worker could take two
    flushes and another, still storing, none. The driver resets it first."""
    from flowyml import ParallelExecutor

    pipeline = pipelines.diamond()
    pipeline.cache_dir = str(tmp_path / "cache")
    with ParallelExecutor(max_workers=2, backend="process") as executor:
        backend = executor._impl
        assert pipeline.run(executor=executor, progress=False)["report"] == [20, 25, 10, 35]
        backend._flush_barrier.abort()  # as a flush that outlasted a timeout left it
        pipeline.add_step(pipelines.total)  # something to compute (and flush) again
        assert pipeline.run(executor=executor, progress=False)["total"] == 45
        assert not backend._flush_barrier.broken

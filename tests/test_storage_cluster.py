"""A Dask cluster whose workers share no disk with the driver, and data on an S3 server.

The ``dask scheduler`` and two ``dask worker`` processes run on 127.0.0.1; each
worker runs under ``unshare --mount`` with an empty tmpfs over pytest's
temporary folders (where every test's working folder and files live):
what a worker writes to local disk, the driver never sees, and the reverse.
This is the setup of Kubernetes, a cloud Dask service or dask-jobqueue.
Linux and root only (CI runs as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import fsspec
import pandas as pd
import pytest

from flowyml import BackendError, ParallelExecutor, StepFailed
from flowyml.exceptions import CommitConflictError

from . import storage_jobs
from .services import ROOT, Processes, start_cluster, wait_until

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="workers without the driver's disk need unshare --mount, which needs Linux and root",
)


@pytest.fixture(scope="module")
def isolated_cluster(tmp_path_factory, s3_server):
    """An executor on a cluster whose workers see none of pytest's temporary folders, where every
    test's files are (their logs are opened before the mount)."""
    processes = Processes()
    hidden = str(tmp_path_factory.getbasetemp().parent)  # /tmp/pytest-of-<user>: every session's folders
    try:
        address = start_cluster(tmp_path_factory.mktemp("isolated"), processes,
                                workers=[["--no-nanny"], ["--no-nanny"]], hide=[hidden])
        with ParallelExecutor(address=address) as executor:
            executor.client.wait_for_workers(2, timeout=60)
            yield executor
    finally:
        processes.stop()


@pytest.fixture
def data(bucket):
    """Four monthly CSVs on the S3 server; (input URL, output URL, cache URL, signals URL)."""
    storage_jobs.upload_months(f"{bucket}/trips")
    return f"{bucket}/trips", f"{bucket}/clean", f"{bucket}/cache", f"{bucket}/signals"


def read_output(url: str) -> pd.DataFrame:
    frame = pd.read_parquet(url)
    return frame.sort_values("trip_id", ignore_index=True)


def expected(months=storage_jobs.MONTHS) -> pd.DataFrame:
    return storage_jobs.expected_clean(months).sort_values("trip_id", ignore_index=True)


def statuses(result, step: str) -> list[str]:
    return sorted(t.status for t in result.tasks if t.step == step)


def test_the_workers_really_see_none_of_the_drivers_files(isolated_cluster, tmp_path):
    marker = tmp_path / "driver-only"
    marker.write_text("x")
    seen = isolated_cluster.client.run(os.path.exists, str(marker))
    assert set(seen.values()) == {False} and len(seen) == 2


def test_a_partitioned_etl_with_a_cache_on_s3(isolated_cluster, data):
    source, output, cache, _ = data
    pipeline = storage_jobs.etl(source, output, cache_dir=cache)
    first = pipeline.run(executor=isolated_cluster, progress=False)
    assert first.success
    pd.testing.assert_frame_equal(read_output(output), expected(), check_dtype=False)
    workers = set(isolated_cluster.client.scheduler_info()["workers"])
    assert {t.worker for t in first.tasks if t.step == "clean"} <= workers

    # An unchanged rerun, from another driver object and another working folder: all cached.
    again = storage_jobs.etl(source, output, cache_dir=cache).run(executor=isolated_cluster, progress=False)
    assert {s.status for s in again.steps.values()} == {"cached"}
    pd.testing.assert_frame_equal(read_output(output), expected(), check_dtype=False)

    # One new month: only its partition runs.
    storage_jobs.upload_months(source, ["2024-05"])
    grown = storage_jobs.etl(source, output, cache_dir=cache).run(executor=isolated_cluster, progress=False)
    assert statuses(grown, "clean") == ["cached"] * 4 + ["succeeded"]
    pd.testing.assert_frame_equal(read_output(output), expected([*storage_jobs.MONTHS, "2024-05"]),
                                  check_dtype=False)


def test_a_step_failing_mid_write_leaves_the_old_output(isolated_cluster, data):
    source, output, _, _ = data
    storage_jobs.etl(source, output).run(executor=isolated_cluster, progress=False)
    before = read_output(output)
    failing = storage_jobs.etl(source, output, step_function=storage_jobs.clean_or_fail,
                               params={"bad_month": "2024-03"})
    with pytest.raises(StepFailed, match="bad data in 2024-03"):
        failing.run(executor=isolated_cluster, progress=False)
    pd.testing.assert_frame_equal(read_output(output), before)
    fs, root = fsspec.core.url_to_fs(output)
    assert not fs.exists(f"{root}/_flowyml/staging") or fs.ls(f"{root}/_flowyml/staging") == []


def test_a_sigkilled_driver_leaves_the_old_output_and_a_later_run_removes_its_staging(isolated_cluster, data,
                                                                                      tmp_path):
    source, output, _, signals = data
    storage_jobs.etl(source, output).run(executor=isolated_cluster, progress=False)
    before = read_output(output)
    fs, root = fsspec.core.url_to_fs(output)
    signal_fs, signal_root = fsspec.core.url_to_fs(signals)
    signal_fs.pipe_file(f"{signal_root}/hold-2024-04", b"")
    env = dict(os.environ, FLOWYML_TEST_INPUT=source, FLOWYML_TEST_OUTPUT=output, FLOWYML_TEST_SIGNALS=signals,
               PYTHONPATH=str(ROOT))
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "flowyml", "run", "tests/storage_jobs.py:pipeline",
         "--address", isolated_cluster.client.scheduler.address, "--no-progress"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        def three_staged() -> bool:
            fs.invalidate_cache()
            staged = [p for p in fs.find(f"{root}/_flowyml/staging") if p.endswith(".staged")]
            signal_fs.invalidate_cache()
            return len(staged) == 3 and signal_fs.exists(f"{signal_root}/held-2024-04")

        try:
            wait_until(three_staged, "three partitions staged and the fourth held", timeout=120,
                       failed=lambda: driver.poll() is not None and f"the driver exited with {driver.returncode}")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}; the driver said:\n{log.read_text()}") from None
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
        signal_fs.pipe_file(f"{signal_root}/release", b"")
    pd.testing.assert_frame_equal(read_output(output), before)
    fs.invalidate_cache()
    assert len(fs.ls(f"{root}/_flowyml/staging")) == 1  # the killed run's

    later = storage_jobs.etl(source, output).run(executor=isolated_cluster, progress=False)
    assert later.success
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_flowyml/staging") or fs.ls(f"{root}/_flowyml/staging") == []
    pd.testing.assert_frame_equal(read_output(output), expected(), check_dtype=False)


def test_two_runs_committing_one_output_never_mix(isolated_cluster, data):
    source, output, _, _ = data
    first, second = (storage_jobs.etl(source, output, params={}) for _ in range(2))
    outcomes: dict[str, object] = {}

    def run(name, pipeline):
        try:
            outcomes[name] = pipeline.run(executor=isolated_cluster, progress=False).run_id
        except StepFailed as exc:  # the loser: its commit step failed, naming the winner
            assert exc.step == "write_parquet" and isinstance(exc.__cause__, CommitConflictError), exc
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=args) for args in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(outcomes) == {"a", "b"}
    assert any(isinstance(value, str) for value in outcomes.values())
    fs, root = fsspec.core.url_to_fs(output)
    manifest = fs.cat_file(f"{root}/_flowyml/manifest.json").decode()
    winners = [value for value in outcomes.values() if isinstance(value, str) and value in manifest]
    assert len(winners) == 1
    pd.testing.assert_frame_equal(read_output(output), expected(), check_dtype=False)


@pytest.mark.parametrize("where", ["sink", "cache", "source"])
def test_a_local_path_the_workers_cannot_see_is_an_error_before_any_task(isolated_cluster, data, tmp_path, where):
    source, output, _cache, _ = data
    local = str(tmp_path / "local")
    if where == "source":
        os.makedirs(local)
        storage_jobs.upload_months(local, storage_jobs.MONTHS[:1])
        source = local
    pipeline = storage_jobs.etl(
        source, local if where == "sink" else output, cache_dir=local if where == "cache" else None
    )
    with pytest.raises(BackendError) as info:
        pipeline.run(executor=isolated_cluster, progress=False)
    message = str(info.value)
    assert local in message and "s3://" in message and "workers" in message
    fs, root = fsspec.core.url_to_fs(output)
    assert not fs.exists(f"{root}/_flowyml")  # nothing ran, nothing was staged

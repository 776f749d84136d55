"""The distributed backend on real clusters.

A ``dask scheduler`` and two ``dask worker`` processes (one with the resource
``GPU=1``) on 127.0.0.1 serve most tests; a TLS scheduler and worker with
generated certificates serve the security test; a ``LocalCluster`` that
flowyml starts itself serves the tests of that path. All are started once per
module and stopped at its end.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import distributed
import pytest
from distributed import Client

from flowyml import (
    BackendError,
    OptionError,
    ParallelExecutor,
    Pipeline,
    StepFailed,
    WorkerDiedError,
    current_task,
    step,
)
from flowyml.logs import HEARTBEAT_FAILURE, TaskLogFilter, _ClosingHeartbeatFilter

from .pipelines import Numbers, Part, diamond, hold
from .services import START_TIMEOUT, Processes, start_cluster, wait_until

# -- steps and a source the workers import from this module ---------------------------


@step(inputs=["numbers"], per_partition=True)
def square(n):
    return n * n


@step(inputs=["square"])
def total(values):
    return sum(values)


def squares(count: int) -> Pipeline:
    return Pipeline("squares").add_source("numbers", Numbers(count)).add_step(square).add_step(total)


@step(inputs=["numbers"], per_partition=True)
def talk(n):
    logging.getLogger("tests.talk").info("working on %s", n)
    print(f"printed {n}")
    if n == 1:
        logging.getLogger("tests.talk").warning("partition one is odd")
    return n


@step(inputs=["numbers"], per_partition=True)
def gpu_square(n):
    return n * n


@step(inputs=["numbers"], per_partition=True)
def fragile(n, marker_dir=""):
    """Partition 1 kills its own worker process on its first attempt (across processes)."""
    if n == 1:
        try:
            fd = os.open(Path(marker_dir) / "attempt-1", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return n * 10


@step(retries=1)
def always_fails(attempts_file=""):
    """Counts its attempts in a file (they may run in any worker process), then fails."""
    with open(attempts_file, "a") as out:
        out.write(f"{current_task().attempt}\n")
    raise RuntimeError("always")


@step(inputs=["numbers"], per_partition=True)
def always_dies(n):
    os.kill(os.getpid(), signal.SIGKILL)


@step(inputs=["who"])
def rendezvous(who, marker_dir=""):
    """Finish only once the other run's twin task has started: both runs are in flight at once."""
    Path(marker_dir, who["me"]).touch()
    deadline = time.monotonic() + 30
    while not Path(marker_dir, who["other"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{who['other']} never started: the two runs did not overlap")
        time.sleep(0.01)
    return (current_task().run_id, who["value"])


@step
def first():
    return 1


@step(inputs=["first"])
def second(first, marker=""):
    """Wait until the driver's progress display has seen ``first`` finish."""
    deadline = time.monotonic() + 30
    while not Path(marker).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the driver never saw step 'first' finish while the run was going")
        time.sleep(0.01)
    return first + 1


class WorkerOnly:
    """A value that refuses to be unpickled in the test process: proof it never came back."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self):
        return (_rebuild_worker_only, (self.n, DRIVER_PID))


DRIVER_PID = os.getpid()


def _rebuild_worker_only(n: int, driver_pid: int) -> WorkerOnly:
    if os.getpid() == driver_pid:
        raise AssertionError(f"partition {n} was gathered to the client")
    return WorkerOnly(n)


class WorkerOnlyPart(Part):
    def load(self) -> WorkerOnly:
        return WorkerOnly(self.index)


class WorkerOnlyNumbers(Numbers):
    """Partitions whose values may live on workers only."""

    def partitions(self) -> list[Part]:
        return [WorkerOnlyPart(i) for i in range(self.count)]


@step(inputs=["numbers"])
def count(values):
    return sum(1 for value in values if isinstance(value, WorkerOnly))


# -- clusters -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A plain-tcp scheduler and two workers (``w1`` has ``GPU=1``); yields a client to it."""
    tmp = tmp_path_factory.mktemp("cluster")
    processes = Processes()
    try:
        address = start_cluster(tmp, processes, workers=[[], ["--resources", "GPU=1"]])
        with Client(address, set_as_default=False, timeout="30s") as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
            yield client
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def on_cluster(cluster):
    """An executor connected by address, open for the module (as in a notebook)."""
    with ParallelExecutor(address=cluster.scheduler.address) as executor:
        yield executor


@pytest.fixture(scope="module")
def local():
    """An executor on a LocalCluster that flowyml starts and stops itself."""
    with ParallelExecutor(max_workers=2, backend="distributed") as executor:
        yield executor


def no_default_client() -> None:
    with pytest.raises(ValueError, match="No clients found"):
        distributed.default_client()
    assert dask.config.get("scheduler", None) is None


def sync_outputs(pipeline: Pipeline, **kwargs) -> dict:
    return pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False, **kwargs).outputs


# -- connecting ---------------------------------------------------------------------


def test_address_runs_a_pipeline_and_leaves_no_default_client(cluster):
    executor = ParallelExecutor(address=cluster.scheduler.address)
    assert executor.backend == "distributed"
    result = diamond().run(executor=executor, progress=False)
    assert result.outputs == sync_outputs(diamond())
    no_default_client()
    assert cluster.status == "running"  # the cluster is left running for others


def test_scheduler_address_from_the_environment(cluster, monkeypatch):
    monkeypatch.setenv("FLOWYML_SCHEDULER_ADDRESS", cluster.scheduler.address)
    with ParallelExecutor(backend="distributed") as executor:
        result = squares(5).run(executor=executor, progress=False)
        assert executor.max_workers == 2  # the cluster's threads
    assert result["total"] == sum(i * i for i in range(5))
    assert {t.worker for t in result.tasks} <= set(cluster.scheduler_info()["workers"])


def test_a_given_client_is_used_and_never_closed(cluster):
    with ParallelExecutor(client=cluster) as executor:
        result = squares(4).run(executor=executor, progress=False)
        no_default_client()
    executor.close()
    assert result["total"] == 14
    assert cluster.status == "running"
    assert cluster.submit(sum, [1, 2]).result() == 3


def test_an_unreachable_scheduler_is_a_clear_error():
    from flowyml import BackendError

    executor = ParallelExecutor(address="tcp://127.0.0.1:9")  # the discard port: nothing listens
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(BackendError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:9'"),
        executor,
    ):
        squares(2).run(executor=executor, progress=False)  # it connects when a run needs it


# -- keys, the dashboard, concurrent runs ---------------------------------------------


def test_the_driver_waits_for_the_report_of_every_task_of_a_cached_run(tmp_path):
    """Each computed task of a cached run is wrapped in the one storing its result, and still reports."""
    from flowyml import read_csv
    from flowyml.cache import open_cache
    from flowyml.cache.rewrite import plan_cached_run
    from flowyml.compile import compile_plan
    from flowyml.executors.cluster_graph import reporting_tasks
    from flowyml.run import _resolve_sources
    from flowyml.tasks import RAISE

    from .pipelines import write_parts

    write_parts(tmp_path / "data", range(5))
    pipeline = (Pipeline("counted", cache_dir=str(tmp_path / "cache"))
                .add_source("numbers", read_csv(str(tmp_path / "data" / "*.csv")))
                .add_step(step(len, name="rows", inputs=["numbers"], per_partition=True))
                .add_step(total, inputs=["rows"]))
    plan = pipeline.plan()
    graph = compile_plan(plan, run_id="r1", mode=RAISE, key_suffix="-r1", source_partitions=_resolve_sources(plan))
    cached = plan_cached_run(graph, plan, open_cache(plan.cache_dir, None), "r1", RAISE)
    assert any(type(task[0]).__name__ == "StoreTask" for task in cached.dsk.values())
    assert reporting_tasks(cached.dsk) == reporting_tasks(graph.dsk) == 5 + 5 + 1


def test_task_prefixes_on_the_scheduler_are_step_names(cluster, on_cluster):
    result = squares(6).run(executor=on_cluster, progress=False)
    prefixes = cluster.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert {"numbers", "square", "total"} <= set(prefixes)
    assert not [p for p in prefixes if result.run_id in p], "the run token leaked into a prefix"
    keys = {t.key for t in result.tasks}
    assert f"('square-{result.run_id}', 5)" in keys  # the partition index, and the run token


def run_spans(dask_scheduler, run_id):
    """The step spans of a run: name, parent's (name, id), task groups, seconds computing.

    The run is found by its partitioned steps' task groups, which carry the
    run's token (a whole step's group is named after the step alone).
    """
    spans = dask_scheduler.extensions["spans"].spans.values()
    runs = {span.parent.id for span in spans if any(run_id in group.name for group in span.groups)}
    out = []
    for span in spans:
        if span.parent is not None and span.parent.id in runs:
            execute = sum(seconds for key, seconds in span.cumulative_worker_metrics.items()
                          if key[0] == "execute" and key[-1] == "seconds")
            groups = sorted(group.name.replace(run_id, "RUN") for group in span.groups)
            out.append((span.name, (span.parent.name, span.parent.id), groups, execute))
    return sorted(out)


def test_a_run_is_a_span_of_its_pipeline_and_each_step_a_span_within(cluster, on_cluster):
    first = squares(6).run(executor=on_cluster, progress=False)
    second = squares(6).run(executor=on_cluster, progress=False)
    spans = cluster.run_on_scheduler(run_spans, run_id=first.run_id)
    assert [(name, groups) for name, _, groups, _ in spans] == [
        (("squares", "numbers"), ["numbers-RUN"]), (("squares", "square"), ["square-RUN"]),
        (("squares", "total"), ["total"]),
    ]
    parents = {parent for _, parent, _, _ in spans}
    assert len(parents) == 1 and next(iter(parents))[0] == ("squares",)
    again = cluster.run_on_scheduler(run_spans, run_id=second.run_id)
    assert {parent for _, parent, _, _ in again}.isdisjoint(parents), "each run is a span of its own"
    # Dask's Fine Performance Metrics reach the step's span with the workers' heartbeats.
    wait_until(lambda: all(seconds > 0 for *_, seconds in cluster.run_on_scheduler(run_spans,
                                                                                   run_id=first.run_id)),
               "execute seconds in every step's span")


@step
def maybe_fail(i, bad=-1):
    if i == bad:
        raise ValueError(f"copy {i} is bad")
    return i


def copies(count: int, bad: int = -1) -> Pipeline:
    """``count`` copies of one function (the docs' parallel processing shape) and a fan-in."""
    pipeline = Pipeline("copies")
    for i in range(count):
        pipeline.add_step(maybe_fail, name=f"chunk_{i}", params={"i": i, "bad": bad})
    return pipeline.add_step(step(sum_all, name="combine", inputs=[f"chunk_{i}" for i in range(count)]))


def sum_all(*parts):
    return sum(parts)


def test_copies_of_one_function_are_one_task_prefix_and_keep_their_step_names(cluster, on_cluster):
    result = copies(300).run(executor=on_cluster, progress=False)
    assert result["combine"] == sum(range(300))
    prefixes = cluster.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert {"maybe_fail", "combine"} <= set(prefixes)
    assert not [p for p in prefixes if p.startswith("chunk_")], "one task prefix per copy"
    keys = {t.key for t in result.tasks}
    assert f"('maybe_fail-{result.run_id}', 'chunk_7')" in keys and f"combine-{result.run_id}" in keys
    assert {t.step for t in result.tasks} == {f"chunk_{i}" for i in range(300)} | {"combine"}
    assert result.steps["chunk_7"].status == "succeeded" and result.steps["chunk_7"].partitions is None
    with pytest.raises(StepFailed, match=r"step 'chunk_3' failed") as info:
        copies(5, bad=3).run(executor=on_cluster, progress=False)
    assert isinstance(info.value.__cause__, ValueError)
    failed = copies(5, bad=3).run(executor=on_cluster, progress=False, on_failure="continue")
    assert failed.steps["chunk_3"].status == "failed" and failed.steps["chunk_2"].status == "succeeded"
    assert failed.steps["combine"].status == "skipped"


def test_two_concurrent_runs_of_one_pipeline_keep_their_own_results(on_cluster, tmp_path):
    pipeline = Pipeline("twins").add_step(rendezvous, name="meet", params={"marker_dir": str(tmp_path)})
    results = {}

    def run(me, other, value):
        who = {"me": me, "other": other, "value": value}
        results[me] = pipeline.run({"who": who}, executor=on_cluster, progress=False)

    threads = [threading.Thread(target=run, args=args) for args in (("a", "b", 1), ("b", "a", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {"a", "b"}, "a run failed (see the thread's exception above)"
    (run_a, value_a), (run_b, value_b) = results["a"]["meet"], results["b"]["meet"]
    assert (value_a, value_b) == (1, 2)
    assert run_a == results["a"].run_id and run_b == results["b"].run_id != run_a


def test_local_cluster_binds_127_0_0_1_and_logs_its_dashboard(local, caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    result = squares(3).run(executor=local, progress=False)
    link = local.dashboard_link
    assert link.startswith("http://127.0.0.1:")
    assert result.dashboard_link == link
    assert any(link in r.getMessage() for r in caplog.records if r.name == "flowyml")
    assert all(w.startswith("tcp://127.0.0.1:") for w in local.client.scheduler_info()["workers"])
    no_default_client()



def _heartbeat_failure_passes() -> bool:
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, HEARTBEAT_FAILURE, None, None)
    return logging.getLogger("distributed.worker").filter(record)


def test_own_cluster_workers_keep_a_heartbeat_failure_while_they_run(local):
    # Installed on every worker of the cluster flowyml starts, and a worker that
    # runs still reports a scheduler it cannot reach.
    squares(2).run(executor=local, progress=False)
    kept = local.client.run(_heartbeat_failure_passes)
    assert len(kept) == 2 and all(kept.values()), kept
    installed = local.client.run(lambda: [type(f).__name__ for f in logging.getLogger("distributed.worker").filters])
    assert all("_ClosingHeartbeatFilter" in names for names in installed.values()), installed


@pytest.mark.parametrize("statuses, kept", [
    (["running"], True), (["paused"], True), (["closing", "running"], True),
    (["closing"], False), (["closed"], False), (["closing", "closed"], False),
])
def test_a_heartbeat_failure_is_dropped_only_when_every_worker_is_closing(statuses, kept):
    # Closing a LocalCluster races with heartbeats in flight: the traceback they
    # log must not reach the stderr of a job that succeeded.
    from distributed.core import Status

    workers = [type("W", (), {"status": Status[name]})() for name in statuses]
    quiet = _ClosingHeartbeatFilter(lambda: workers)
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, HEARTBEAT_FAILURE, None, None)
    other = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, "Unexpected exception", None, None)
    assert quiet.filter(record) is kept
    assert quiet.filter(other)


# -- live progress, logs ---------------------------------------------------------------


def test_progress_moves_while_the_run_goes(local, tmp_path, monkeypatch):
    import flowyml.progress

    marker = tmp_path / "first-finished"

    class SeenProgress(flowyml.progress.Progress):
        def finish(self, step, status="succeeded"):
            if step == "first":
                marker.touch()
            super().finish(step, status)

    monkeypatch.setattr(flowyml.progress, "Progress", SeenProgress)
    pipeline = Pipeline("live").add_step(first).add_step(second, params={"marker": str(marker)})
    result = pipeline.run(executor=local, progress=False)
    assert result["second"] == 2


def _replayed(caplog, step_name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == f"flowyml.steps.{step_name}"]


@pytest.mark.parametrize("backend", ["distributed", "process"])
def test_worker_logs_and_prints_reach_the_driver_tagged_with_the_step(backend, on_cluster, caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    pipeline = Pipeline("chatty").add_source("numbers", Numbers(3)).add_step(talk)
    if backend == "distributed":
        result = pipeline.run(executor=on_cluster, progress=False)
    else:
        with ParallelExecutor(max_workers=2, backend="process") as executor:
            result = pipeline.run(executor=executor, progress=False)
    records = _replayed(caplog, "talk")
    messages = sorted(r.getMessage() for r in records)
    assert messages == sorted(
        [f"talk[{n}]: working on {n}" for n in range(3)]
        + [f"talk[{n}]: printed {n}" for n in range(3)]
        + ["talk[1]: partition one is odd"]
    )
    warning = next(r for r in records if r.levelno == logging.WARNING)
    assert (warning.step, warning.partition, warning.origin) == ("talk", 1, "tests.talk")
    assert {r.run_id for r in records} == {result.run_id}
    assert {r.worker for r in records} <= {t.worker for t in result.tasks}
    assert {r.origin for r in records if "printed" in r.getMessage()} == {"print"}


def test_task_log_filter_tags_records_in_the_driver_process(caplog):
    caplog.set_level(logging.INFO, logger="tests.talk")
    caplog.handler.addFilter(TaskLogFilter())
    try:
        Pipeline("chatty").add_source("numbers", Numbers(2)).add_step(talk).run(
            executor=ParallelExecutor(backend="sync"), progress=False
        )
    finally:
        caplog.handler.filters.clear()
    tagged = {(r.step, r.partition) for r in caplog.records if r.name == "tests.talk"}
    assert tagged == {("talk", 0), ("talk", 1)}


# -- large graphs, resources, reports ---------------------------------------------------


def test_thousands_of_partitions_submit_and_stay_on_the_workers(on_cluster):
    # 10,000 and 100,000 tasks are measured by bench/scaling.py and bench/distributed.py.
    pipeline = Pipeline("wide").add_source("numbers", WorkerOnlyNumbers(3_000)).add_step(count)
    start = time.time()
    result = pipeline.run(executor=on_cluster, progress=False)
    assert result["count"] == 3_000  # a partition gathered here would have failed to unpickle
    assert len(result.tasks) == 3_001
    # Preparing and sending the graph is not most of the run: the first task starts in its
    # first half (bench/distributed.py compares the whole run with Dask by hand).
    first_start, last_stop = min(t.start for t in result.tasks), max(t.stop for t in result.tasks)
    assert first_start - start < 0.5 * (last_stop - start), (
        f"the first task started {first_start - start:.1f}s after run(), the last ended at {last_stop - start:.1f}s"
    )


def test_resources_restrict_a_step_to_workers_that_have_them(cluster, on_cluster):
    gpu_workers = {a for a, w in cluster.scheduler_info()["workers"].items() if w["resources"].get("GPU")}
    assert len(gpu_workers) == 1
    pipeline = (
        Pipeline("gpu")
        .add_source("numbers", Numbers(8))
        .add_step(gpu_square, resources={"GPU": 1})
        .add_step(total, inputs=["gpu_square"])
    )
    result = pipeline.run(executor=on_cluster, progress=False)
    assert result["total"] == sum(i * i for i in range(8))
    assert {t.worker for t in result.tasks if t.step == "gpu_square"} == gpu_workers


def test_performance_report_is_written_and_linked_from_the_html_report(cluster, tmp_path):
    target = tmp_path / "dask-{run_id}.html"
    with ParallelExecutor(client=cluster, performance_report=target) as executor:
        result = squares(4).run(executor=executor, progress=False)
    written = tmp_path / f"dask-{result.run_id}.html"
    assert "Dask Performance Report" in written.read_text()
    page = Path(result.save_report(tmp_path / "run.html")).read_text()
    assert written.resolve().as_uri() in page
    assert "Dask performance report" in result.extra_report_html


# -- worker loss --------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_the_report_shows_it(cluster, on_cluster, tmp_path):
    pipeline = Pipeline("fragile").add_source("numbers", Numbers(4)).add_step(
        fragile, params={"marker_dir": str(tmp_path)}
    )
    try:
        result = pipeline.run(executor=on_cluster, progress=False)
    finally:
        cluster.wait_for_workers(2, timeout=START_TIMEOUT)  # the nanny restarts the killed one
    assert result["fragile"] == [0, 10, 20, 30]
    record = next(t for t in result.tasks if t.step == "fragile" and t.partition == 1)
    assert record.attempts == 2  # the attempt that died with its worker counts
    assert result.steps["fragile"].attempts == 2
    assert "Workers lost" in result.extra_report_html and "fragile[1]" in result.extra_report_html
    page = Path(result.save_report(tmp_path / "run.html")).read_text()
    assert "Workers lost" in page


def test_retries_are_flowyml_s_own_and_not_doubled_by_dask(on_cluster, tmp_path):
    attempts = tmp_path / "attempts"
    pipeline = Pipeline("failing").add_step(always_fails, params={"attempts_file": str(attempts)})
    with pytest.raises(StepFailed, match=r"step 'always_fails' failed \(attempt 2\)"):
        pipeline.run(executor=on_cluster, progress=False)
    assert attempts.read_text().split() == ["1", "2"]


def test_a_task_that_keeps_killing_workers_fails_as_its_step(local):
    client = local.client
    allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    pipeline = Pipeline("doomed").add_source("numbers", Numbers(1)).add_step(always_dies)
    try:
        with pytest.raises(StepFailed, match=r"step 'always_dies', partition 0 failed") as info:
            pipeline.run(executor=local, progress=False)
    finally:
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", allowed))
        client.wait_for_workers(2, timeout=START_TIMEOUT)
    assert isinstance(info.value.__cause__, WorkerDiedError)
    assert "allowed-failures" in str(info.value.__cause__)


# -- TLS --------------------------------------------------------------------------------


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl)."""
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    config = folder / "san.cnf"
    config.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # much faster to make than RSA
    openssl("req", "-x509", *key, "-nodes", "-days", "2", "-subj", "/CN=flowyml test CA",
            "-keyout", str(paths["ca-key"]), "-out", str(paths["ca"]))
    openssl("req", *key, "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(paths["key"]), "-out", str(folder / "cert.csr"))
    openssl("x509", "-req", "-in", str(folder / "cert.csr"), "-CA", str(paths["ca"]), "-CAkey",
            str(paths["ca-key"]), "-CAcreateserial", "-days", "2", "-extfile", str(config),
            "-out", str(paths["cert"]))
    return paths


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_cluster_with_generated_certificates(tmp_path):
    from distributed.security import Security

    from flowyml import BackendError

    certs = make_certificates(tmp_path)
    tls = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
    processes = Processes()
    try:
        address = start_cluster(tmp_path, processes, workers=[["--no-nanny"]], tls=tls)
        assert address.startswith("tls://127.0.0.1:")
        security = Security(
            tls_ca_file=str(certs["ca"]), tls_client_cert=str(certs["cert"]),
            tls_client_key=str(certs["key"]), require_encryption=True,
        )
        with ParallelExecutor(address=address, security=security) as executor:
            executor.client.wait_for_workers(1, timeout=START_TIMEOUT)
            result = diamond().run(executor=executor, progress=False)
        assert result.outputs == sync_outputs(diamond())
        with (
            dask.config.set({"distributed.comm.timeouts.connect": "2s"}),
            pytest.raises(BackendError, match="TLS settings"),
            ParallelExecutor(address=address) as executor,
        ):
            executor.client  # noqa: B018  connects (else the first run with tasks does)
    finally:
        processes.stop()


# -- no workers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lonely(tmp_path_factory):
    """The address of a real ``dask scheduler`` that has no worker at all."""
    processes = Processes()
    try:
        yield start_cluster(tmp_path_factory.mktemp("lonely"), processes, workers=[])
    finally:
        processes.stop()


def test_a_run_with_no_worker_fails_with_a_clear_error_after_the_timeout(lonely):
    start = time.monotonic()
    with pytest.raises(BackendError) as info:
        squares(3).run(executor=ParallelExecutor(address=lonely, no_workers_timeout=2), progress=False)
    waited = time.monotonic() - start
    assert 2 <= waited < 30, f"failed after {waited:.1f} s"
    message = str(info.value)
    assert re.search(rf"no Dask worker was connected to the scheduler at {re.escape(lonely)} for \d+ s", message)
    assert "no_workers_timeout=2 s" in message and "FLOWYML_NO_WORKERS_TIMEOUT" in message
    assert f"dask worker {lonely}" in message  # the fix


def test_the_no_workers_timeout_comes_from_the_environment(lonely, monkeypatch):
    monkeypatch.setenv("FLOWYML_NO_WORKERS_TIMEOUT", "1.5")
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"no_workers_timeout=1\.5 s"):
        squares(2).run(executor=ParallelExecutor(address=lonely), progress=False)
    assert time.monotonic() - start < 30
    monkeypatch.setenv("FLOWYML_NO_WORKERS_TIMEOUT", "soon")
    with pytest.raises(OptionError, match=r"FLOWYML_NO_WORKERS_TIMEOUT must be a positive number of seconds"):
        ParallelExecutor(address=lonely)
    with pytest.raises(OptionError, match=r"no_workers_timeout must be"):
        ParallelExecutor(address=lonely, no_workers_timeout=0)


#: In CI a Client nobody had closed was finalized by a collector pass that ran while Dask's
#: LoopRunner, holding its class-wide lock, started another client's loop; the finalizer's
#: close waited for that lock, held by its own thread, forever. Here the garbage is an object
#: whose finalizer takes that lock, as Client.close does, and the pass is forced inside the
#: start, where CI's happened.
ABANDONED_CLIENT_SCRIPT = """
import gc, sys
from distributed.utils import LoopRunner
from flowyml import ParallelExecutor

class Abandoned:
    def __del__(self):
        with LoopRunner._lock:  # what a Client's close does (LoopRunner.stop)
            pass

gc.disable()  # no pass frees it before the one forced below
abandoned = Abandoned()
abandoned.itself = abandoned  # a cycle: only the collector frees it
del abandoned

start = LoopRunner._start_unlocked
def start_with_a_collection(self):
    gc.collect()
    return start(self)
LoopRunner._start_unlocked = start_with_a_collection

with ParallelExecutor(address=sys.argv[1]) as executor:
    print(len(executor.client.nthreads()))
"""


def test_connecting_while_an_abandoned_client_awaits_collection_does_not_deadlock(lonely, tmp_path):
    script = tmp_path / "abandoned.py"
    script.write_text(ABANDONED_CLIENT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), lonely], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "0"  # connected: the lonely scheduler has no worker


def test_a_run_whose_only_worker_dies_without_a_nanny_fails_clearly(tmp_path):
    processes = Processes()
    try:
        address = start_cluster(tmp_path, processes, workers=[["--no-nanny"]])
        with ParallelExecutor(address=address, no_workers_timeout=3) as executor:
            executor.client.wait_for_workers(1, timeout=START_TIMEOUT)
            pipeline = Pipeline("doomed").add_source("numbers", Numbers(1)).add_step(always_dies)
            start = time.monotonic()
            expected = rf"no Dask worker was connected to the scheduler at {re.escape(address)}"
            with pytest.raises(BackendError, match=expected):
                pipeline.run(executor=executor, progress=False)
            assert time.monotonic() - start < 60
    finally:
        processes.stop()


def test_a_worker_of_flowyml_s_local_cluster_killed_mid_run_is_replaced(local, tmp_path):
    local.client.wait_for_workers(2, timeout=START_TIMEOUT)  # an earlier test's restart may still be going
    before = set(local.client.nthreads())
    pipeline = Pipeline("fragile").add_source("numbers", Numbers(4)).add_step(
        fragile, params={"marker_dir": str(tmp_path)}
    )
    # The nanny restarts the killed worker. The cluster closes a nanny whose worker is not
    # back within lost-worker-timeout (15 s), and only a run replaces it then: on a loaded
    # machine, a restart that slow once left this run's cluster short for good.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": f"{START_TIMEOUT}s"}):
        result = pipeline.run(executor=local, progress=False)
        assert result["fragile"] == [0, 10, 20, 30]
        local.client.wait_for_workers(2, timeout=START_TIMEOUT)  # its nanny started another
    after = set(local.client.nthreads())
    assert len(after) == 2 and after - before, "the killed worker was not replaced"


async def _remove_workers(dask_scheduler=None):
    """What the scheduler does to workers it thinks are gone: remove them and tell them to close."""
    for address in list(dask_scheduler.workers):
        await dask_scheduler.remove_worker(address, stimulus_id="test-remove", close=True)


def test_workers_the_scheduler_removes_from_flowyml_s_local_cluster_are_replaced(tmp_path):
    # A removed worker closes its nanny too: without flowyml, the cluster stays empty and the run
    # fails after no_workers_timeout. The cluster forgets it after lost-worker-timeout.
    pipeline = Pipeline("held").add_source("numbers", Numbers(2)).add_step(hold, params={"marker_dir": str(tmp_path)})
    results = []
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "0.5s"}),
        ParallelExecutor(max_workers=1, backend="distributed", no_workers_timeout=45) as executor,
    ):
        before = set(executor.client.nthreads())
        run = threading.Thread(target=lambda: results.append(pipeline.run(executor=executor, progress=False)))
        run.start()
        wait_until(lambda: list(tmp_path.glob("started-*")), "a partition to start")
        executor.client.run_on_scheduler(_remove_workers)
        (tmp_path / "go").touch()
        run.join(90)
        assert not run.is_alive() and results, "the run did not finish (see the thread's exception above)"
        after = set(executor.client.nthreads())
    assert results[0]["hold"] == [0, 1]
    assert len(after) == 1 and not after & before  # a new worker replaced the removed one

"""The flowyml page on the Dask dashboard, on real schedulers and in a real browser.

A ``dask scheduler --preload flowyml.dashboard`` and two ``dask worker``
processes on 127.0.0.1 serve most tests: pipelines run against it by address
in a background thread, held by a step that waits for a file the test writes,
while the test reads ``/flowyml/runs.json`` and renders ``/flowyml`` in
headless Chromium. flowyml's own ``LocalCluster`` has the page by itself; a
scheduler without the preload has none, and is sent nothing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from flowyml import ParallelExecutor, Pipeline, read_csv, step
from flowyml.dashboard.state import Board

from .pipelines import Numbers, hold, write_parts
from .services import START_TIMEOUT, Processes, start_cluster, wait_until

# -- steps the workers import from this module ------------------------------------------


@step(inputs=["hold"])
def total(values):
    return sum(values)


@step(inputs=["numbers"], per_partition=True)
def breaks(n):
    if n == 1:
        raise ValueError("partition 1 is bad")
    return n


def held(name: str, marker_dir: Path, partitions: int = 2) -> Pipeline:
    return (Pipeline(name).add_source("numbers", Numbers(partitions))
            .add_step(hold, params={"marker_dir": str(marker_dir)}).add_step(total))


#: Lets :func:`slow` finish (its workers run in this process).
RELEASE = threading.Event()


def slow(i):
    RELEASE.wait(30)
    if i == 1:
        raise ValueError("bad")
    return i


# -- reading the page -----------------------------------------------------------------


def runs(page: str) -> list[dict]:
    with urllib.request.urlopen(f"{page}/runs.json", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.load(response)["runs"]


def run_of(page: str, pipeline: str, status: str | None = None) -> dict | None:
    """The newest run of ``pipeline`` on the page (with that status), else None."""
    for run in runs(page):
        if run["pipeline"] == pipeline and status in (None, run["status"]):
            return run
    return None


def step_of(run: dict, name: str) -> dict:
    return next(s for s in run["steps"] if s["name"] == name)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(url: str, profile: Path) -> str:
    """The page's DOM after its script ran (Chromium's virtual time lets the polls happen)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=2500", "--dump-dom", url],
        check=True, capture_output=True, timeout=120, text=True,
    )
    return done.stdout


def row(dom: str, step_name: str) -> dict[str, int]:
    """A step's counts in the page's table, as the browser drew them."""
    found = re.search(f'<tr data-step="{re.escape(step_name)}">(.*?)</tr>', dom)
    assert found, f"no row for step {step_name!r} in the page"
    cells = dict(re.findall(r'<td class="(\w+)">(\d*)</td>', found.group(1)))
    return {state: int(value or 0) for state, value in cells.items()}


class Background:
    """A pipeline run in a thread; ``result()`` joins it and re-raises what it raised."""

    def __init__(self, pipeline: Pipeline, executor: ParallelExecutor, **kwargs) -> None:
        self.value = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(pipeline, executor, kwargs), daemon=True)
        self.thread.start()

    def _run(self, pipeline, executor, kwargs) -> None:
        try:
            self.value = pipeline.run(executor=executor, progress=False, **kwargs)
        except BaseException as exc:
            self.error = exc

    def result(self):
        self.thread.join(60)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        return self.value


# -- clusters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory):
    """A ``dask scheduler --preload flowyml.dashboard`` and two workers; yields its address."""
    tmp = tmp_path_factory.mktemp("dashboard")
    processes = Processes()
    try:
        address = start_cluster(tmp, processes, workers=[[], []], scheduler=["--preload", "flowyml.dashboard"])
        with Client(address, set_as_default=False, timeout="30s") as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
        yield address
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def executor(preloaded):
    with ParallelExecutor(address=preloaded) as executor:
        yield executor


@pytest.fixture
def page(executor):
    return executor.flowyml_page_link


# -- tests ------------------------------------------------------------------------------


def test_the_page_follows_a_run_while_it_goes_and_after(executor, page, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    assert page == executor.dashboard_link.removesuffix("/status") + "/flowyml"
    run = Background(held("followed", tmp_path), executor)
    going = wait_until(lambda: (r := run_of(page, "followed")) and step_of(r, "hold")["running"] and r,
                       "a running task of step 'hold' on the page", timeout=30)
    assert going["status"] == "running" and going["elapsed_s"] >= 0
    assert [(s["name"], s["deps"], s["layer"], s["total"]) for s in going["steps"]] == [
        ("numbers", [], 0, 2), ("hold", [0], 1, 2), ("total", [1], 2, 1)]
    assert step_of(going, "total")["waiting"] == 1 and step_of(going, "hold")["done"] == 0
    with urllib.request.urlopen(page, timeout=10) as response:
        html = response.read().decode()
    assert "runs.json" in html and "<script>" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page loads something from elsewhere"
    dom = rendered(page, tmp_path / "profile")
    for name in ("numbers", "hold", "total"):
        assert f'data-step="{name}"' in dom, f"step {name!r} is not drawn"
    assert going["run_id"] in dom and "followed" in dom
    drawn = row(dom, "hold")
    assert drawn["running"] >= 1 and drawn.get("done", 0) == 0, drawn

    (tmp_path / "go").touch()
    result = run.result()
    finished = wait_until(lambda: run_of(page, "followed", "succeeded"), "the run finished on the page")
    assert finished["run_id"] == going["run_id"] == result.run_id
    assert {s["name"]: (s["done"], s["running"], s["waiting"]) for s in finished["steps"]} == {
        "numbers": (2, 0, 0), "hold": (2, 0, 0), "total": (1, 0, 0)}
    assert finished["elapsed_s"] >= going["elapsed_s"]
    dom = rendered(page, tmp_path / "profile")
    assert f'data-run="{result.run_id}" data-status="succeeded"' in dom
    assert row(dom, "hold")["done"] == 2
    assert any(page in r.getMessage() for r in caplog.records if result.run_id in r.getMessage())


def test_two_pipelines_running_at_once_are_shown_apart(executor, page, tmp_path):
    first = Background(held("left", tmp_path, partitions=1), executor)
    second = Background(held("right", tmp_path, partitions=1), executor)
    try:
        def going() -> list[dict]:
            found = [r for r in runs(page) if r["pipeline"] in ("left", "right") and r["status"] == "running"
                     and step_of(r, "hold")["running"]]
            return found if len(found) == 2 else []

        both = wait_until(going, "both runs with a running task", timeout=30)
        assert sorted(r["pipeline"] for r in both) == ["left", "right"]
        assert both[0]["run_id"] != both[1]["run_id"]
        for r in both:  # each run counts its own task, not the other's
            assert (step_of(r, "hold")["running"], r["totals"]["running"]) == (1, 1)
        dom = rendered(page, tmp_path / "profile")
        assert all(f'data-run="{r["run_id"]}" data-status="running"' in dom for r in both)
    finally:
        (tmp_path / "go").touch()
    ids = {first.result().run_id, second.result().run_id}
    assert ids == {r["run_id"] for r in both}


@pytest.mark.parametrize("on_failure", ["raise", "continue"])
def test_a_failed_step_shows_as_failed(executor, page, on_failure):
    name = f"breaking-{on_failure}"
    pipeline = Pipeline(name).add_source("numbers", Numbers(3)).add_step(breaks).add_step(total, inputs=["breaks"])
    try:
        pipeline.run(executor=executor, progress=False, on_failure=on_failure)
    except Exception as exc:
        assert on_failure == "raise", exc
    failed = wait_until(lambda: run_of(page, name, "failed"), "the failed run on the page")
    assert step_of(failed, "breaks")["failed"] == 1
    assert failed["totals"]["failed"] == 1
    if on_failure == "continue":
        assert step_of(failed, "breaks")["done"] == 2 and step_of(failed, "total")["skipped"] == 1


@step(inputs=["numbers"], per_partition=True)
def rows(frame):
    return len(frame)


@step(inputs=["rows"])
def added(values, plus=0):
    return sum(values) + plus


def test_tasks_the_cache_spares_show_as_cached(executor, page, tmp_path):
    write_parts(tmp_path / "data", range(3))

    def pipeline(plus: int) -> Pipeline:
        return (Pipeline("cached", cache_dir=str(tmp_path / "cache"))
                .add_source("numbers", read_csv(str(tmp_path / "data" / "*.csv")))
                .add_step(rows).add_step(added, params={"plus": plus}))

    pipeline(0).run(executor=executor, progress=False)
    result = pipeline(1).run(executor=executor, progress=False)  # only the last step runs again
    assert result["added"] == 10
    run = run_of(page, "cached", "succeeded")
    assert run["run_id"] == result.run_id
    assert {s["name"]: (s["cached"], s["done"], s["waiting"]) for s in run["steps"]} == {
        "numbers": (3, 0, 0), "rows": (3, 0, 0), "added": (0, 1, 0)}


def test_names_reach_the_page_as_text_never_as_markup(executor, page, tmp_path):
    pipeline_name = '<img src=x onerror="document.title=\'pwned\'">'
    step_name = "<script>document.title='pwned'</script>"
    pipeline = Pipeline(pipeline_name).add_step(total, name=step_name, inputs=["values"])
    result = pipeline.run({"values": [1, 2]}, executor=executor, progress=False)
    assert result[step_name] == 3
    assert step_of(run_of(page, pipeline_name, "succeeded"), step_name)["done"] == 1
    dom = rendered(page, tmp_path / "profile")
    assert "pwned" not in dom.split("</title>")[0], "a name ran as script"
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=" in dom
    assert "<img" not in dom and dom.count("<script") == 1  # the page's own


def test_flowyml_local_cluster_has_the_page(tmp_path):
    with ParallelExecutor(backend="distributed", max_workers=1) as executor:
        page = executor.flowyml_page_link
        assert page.startswith("http://127.0.0.1:") and page.endswith("/flowyml")
        result = Pipeline("local").add_step(total, inputs=["values"]).run(
            {"values": [1, 2]}, executor=executor, progress=False)
        finished = run_of(page, "local", "succeeded")
        assert finished["run_id"] == result.run_id
        assert step_of(finished, "total")["done"] == 1
        with urllib.request.urlopen(page, timeout=10) as response:
            assert b"flowyml runs" in response.read()


def test_a_scheduler_without_the_preload_has_no_page_and_is_sent_nothing():
    with LocalCluster(n_workers=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        with ParallelExecutor(address=cluster.scheduler_address) as executor:
            assert executor.flowyml_page_link is None
            result = Pipeline("plain").add_step(total, inputs=["values"]).run(
                {"values": [1, 2]}, executor=executor, progress=False)
        assert result["total"] == 3
        assert "flowyml_dashboard" not in cluster.scheduler.handlers
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(cluster.dashboard_link.removesuffix("/status") + "/flowyml", timeout=10)


@pytest.mark.parametrize("configured", [False, True])
def test_the_page_under_a_dashboard_prefix_and_from_dask_routes_config(configured):
    """``--dashboard-prefix``; and routes Dask's config already lists are kept, not added twice."""
    import dask

    from flowyml.dashboard.routes import PageHandler
    from flowyml.dashboard.web import _rules

    routes = dask.config.get("distributed.scheduler.http.routes")
    extra = {"distributed.scheduler.http.routes": [*routes, "flowyml.dashboard.routes"]} if configured else {}
    with (dask.config.set(extra),
          LocalCluster(n_workers=1, processes=False, protocol="tcp", host="127.0.0.1",
                       dashboard_address="127.0.0.1:0",
                       scheduler_kwargs={"preload": ["flowyml.dashboard"], "http_prefix": "/dask"}) as cluster,
          ParallelExecutor(address=cluster.scheduler_address) as executor):
        port = cluster.scheduler.http_server.port
        assert executor.flowyml_page_link == f"http://127.0.0.1:{port}/dask/flowyml"
        Pipeline("prefixed").add_step(total, inputs=["values"]).run({"values": [1]}, executor=executor,
                                                                      progress=False)
        assert run_of(executor.flowyml_page_link, "prefixed", "succeeded")
        served = [rule for rule in _rules(cluster.scheduler.http_application) if rule.target is PageHandler]
        assert len(served) == 1


def test_the_plugin_counts_transitions_on_a_real_scheduler():
    """Tasks of an announced run, by their keys: running while they run, failed when they err."""
    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                       dashboard_address="127.0.0.1:0", scheduler_kwargs={"preload": ["flowyml.dashboard"]})
          as cluster, Client(cluster, set_as_default=False) as client):
        plugin = cluster.scheduler.plugins["flowyml-dashboard"]
        board = plugin.board
        client.sync(client.scheduler.flowyml_dashboard, action="start", message={
            "run_id": "abcd1234", "pipeline": "by-hand", "client": client.id,
            "steps": [["work", [], 3, 1], ["copy_0", [], 1, 0]]})
        futures = [client.submit(slow, i, key=("work-abcd1234", i), pure=False) for i in range(2)]
        futures.append(client.submit(lambda: 0, key=("grouped-abcd1234", "copy_0")))
        futures.append(client.submit(lambda: 0, key="unrelated-task"))
        wait_until(lambda: board.live["abcd1234"].steps["work"].running == 2, "two running tasks")
        RELEASE.set()
        wait_until(lambda: board.live["abcd1234"].steps["work"].failed == 1, "the failed task")
        client.gather(futures, errors="skip")
        assert board.live["abcd1234"].steps["work"].running == 0
        assert board.live["abcd1234"].steps["copy_0"].running == 0
        del futures
        wait_until(lambda: not board.keys, "keys forgotten with their tasks")
        client.sync(client.scheduler.flowyml_dashboard, action="end", message={"run_id": "abcd1234"})
        (finished,) = board.snapshot()["runs"]
        assert (finished["status"], finished["totals"]["failed"], finished["totals"]["cached"]) == ("failed", 1, 1)


def test_the_board_keeps_a_bounded_number_of_finished_runs_and_counts_outcomes():
    now = [100.0]
    board = Board(kept=2, clock=lambda: now[0])
    for i in range(3):
        board.start({"run_id": f"run{i:05d}", "pipeline": "p", "client": "c1",
                     "steps": [["load", [], 2, 1], ["save", [0], 1, 0]]})
    board.outcomes("run00000", [["load", 0, "succeeded", 1, 0, 0, "w", None],
                                ["save", None, "skipped", 0, 0, 0, "w", None]])
    board.outcomes("run00000", ["load", 1, "cached", 1, 0, 0, "w", None])  # one event, not a batch
    now[0] = 103.5
    (first, *_) = board.snapshot()["runs"]
    assert first["elapsed_s"] == 3.5
    assert {s["name"]: (s["waiting"], s["done"], s["cached"], s["skipped"]) for s in first["steps"]} == {
        "load": (0, 1, 2, 0), "save": (0, 0, 0, 1)}
    board.end("run00000")
    board.client_gone("c1")  # the driver died: its other runs are lost
    statuses = [(r["run_id"], r["status"]) for r in board.snapshot()["runs"]]
    assert len(statuses) == 2 and {s for _, s in statuses} == {"lost"}
    assert not board.live

"""The run history: every run recorded in a real database (SQLite, PostgreSQL), read back, charted, pruned.

Runs are recorded on every backend; the records are compared with what the
run returned and with the files on disk, never with hard-coded values.
PostgreSQL is Debian's, a server of its own started by the fixtures.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import warnings
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import flowyml.history
from flowyml import ParallelExecutor, Pipeline, StepFailed, step
from flowyml.cli import main
from flowyml.history import HistoryConfigError, HistoryWarning
from flowyml.history.database import HEAD, open_engine
from flowyml.history.schema import meta, metadata, runs

from . import pipelines
from .services import ROOT, postgres_bin, wait_until
from .test_report import _chromium, _decode_png, screenshot

TIMEOUT = 120


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'history.db'}"


def expected_kept(folder: Path, threshold: int) -> tuple[int, pd.DataFrame]:
    """Rows read and rows kept by keep_above, with plain pandas."""
    frames = [pd.read_csv(path) for path in sorted(folder.glob("part_*.csv"))]
    whole = pd.concat(frames)
    return len(whole), whole[whole["value"] > threshold]


# ----------------------------------------------------------------------------- what a record holds


def test_a_run_is_recorded_with_where_how_and_what_it_ran(executor, tmp_path):
    folder = tmp_path / "in"
    pipelines.write_parts(folder, range(4))
    url = sqlite_url(tmp_path)
    result = pipelines.history_pipeline(folder, threshold=12).run(executor=executor, history=url)

    run = flowyml.history.show(result.run_id, url=url)
    assert run["status"] == "succeeded" and run["pipeline"] == "history_demo"
    assert (run["backend"], run["workers"]) == (executor.backend, executor.max_workers)
    assert (run["host"], run["pid"], run["user"]) == (socket.gethostname(), os.getpid(), getpass.getuser())
    assert run["command"] == shlex.join(sys.argv)  # this process: pytest's command line, no secret in it
    assert [run["flowyml_version"], run["dask_version"], run["pandas_version"]] == [
        version("flowyml"), version("dask"), version("pandas")]
    assert run["params"] == {"keep_above": {"threshold": 12}}
    assert run["started_at"] <= run["ended_at"] <= datetime.now(UTC)
    assert run["duration_s"] == pytest.approx(result.duration_s)
    files = run["sources"]["rows"]
    assert files["count"] == 4
    for entry, path in zip(files["files"], sorted(folder.glob("part_*.csv"))):
        stat = path.stat()
        assert (entry["path"], entry["size"], entry["mtime_ns"]) == (str(path), stat.st_size, stat.st_mtime_ns)
    assert files["bytes"] == sum(p.stat().st_size for p in folder.glob("part_*.csv"))

    assert [s["name"] for s in run["steps"]] == list(result.steps)
    for recorded in run["steps"]:
        returned = result.steps[recorded["name"]]
        assert recorded["status"] == str(returned.status)
        assert (recorded["tasks"], recorded["cached_tasks"], recorded["attempts"]) == (returned.tasks, 0, 1)
        assert recorded["duration_s"] == pytest.approx(returned.duration_s)
    read, kept = expected_kept(folder, 12)
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["keep_above"]["tasks"] == 4
    assert (steps["rows"]["rows_in"], steps["rows"]["rows_out"]) == (None, read)  # the source's partitions
    assert (steps["keep_above"]["rows_in"], steps["keep_above"]["rows_out"]) == (read, len(kept))
    summary = steps["summarize_kept"]
    assert (summary["rows_in"], summary["rows_out"]) == (len(kept), len(result["summary"]))
    assert run["tasks"] == sum(s["tasks"] for s in run["steps"])


def test_a_rerun_from_the_cache_is_recorded_with_its_cached_tasks(executor, tmp_path):
    folder = tmp_path / "in"
    pipelines.write_parts(folder, range(3))
    url = sqlite_url(tmp_path)
    pipeline = pipelines.history_pipeline(folder, cache_dir=tmp_path / "cache")
    first = pipeline.run(executor=executor, history=url)
    again = pipeline.run(executor=executor, history=url)

    frame = flowyml.history.runs("history_demo", url=url)
    assert list(frame["run_id"]) == [again.run_id, first.run_id]  # newest first
    newest, oldest = frame.iloc[0], frame.iloc[1]
    assert oldest["cached_tasks"] == 0 and oldest["tasks"] > 0
    assert newest["cached_tasks"] == newest["tasks"] == oldest["tasks"]
    steps = flowyml.history.show(again.run_id, url=url)["steps"]
    assert all(s["status"] == "cached" and s["cached_tasks"] == s["tasks"] for s in steps)


def test_a_failed_run_is_recorded_with_the_error_and_its_traceback(executor, tmp_path):
    url = sqlite_url(tmp_path)
    result = pipelines.failing().run(executor=executor, on_failure="continue", history=url)
    run = flowyml.history.show(result.run_id, url=url)
    steps = {s["name"]: s for s in run["steps"]}
    assert run["status"] == "failed"
    assert steps["fail_if_big"]["error"] == "ValueError: total 45 exceeds 10"
    assert run["error"] == "fail_if_big: ValueError: total 45 exceeds 10"  # the step that failed first
    assert "Traceback" in steps["fail_if_big"]["traceback"] and "fail_if_big" in steps["fail_if_big"]["traceback"]
    assert steps["after"]["status"] == "skipped"
    assert {name: s["status"] for name, s in steps.items()} == {n: str(s.status) for n, s in result.steps.items()}

    with pytest.raises(StepFailed) as raised:
        pipelines.failing().run(executor=executor, history=url)
    stopped = flowyml.history.runs(status="failed", url=url)
    assert len(stopped) == 2
    record = flowyml.history.show(raised.value.result.run_id, url=url)
    assert record["error"] == "fail_if_big: ValueError: total 45 exceeds 10"
    assert {s["name"]: s["status"] for s in record["steps"]}["fail_if_big"] == "failed"


# ----------------------------------------------------------------------------- where the history is


def test_the_default_history_is_sqlite_under_flowyml_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWYML_HOME", str(tmp_path / "home"))
    with ParallelExecutor(backend="sync") as executor:
        result = pipelines.diamond().run(executor=executor)
    assert list(flowyml.history.runs()["run_id"]) == [result.run_id]
    assert (tmp_path / "home" / "history.db").is_file()


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_a_history_switched_off_records_nothing(tmp_path, monkeypatch, switch):
    monkeypatch.setenv("FLOWYML_HOME", str(tmp_path / "home"))
    if switch == "env":
        monkeypatch.setenv("FLOWYML_HISTORY", "off")
    with ParallelExecutor(backend="sync") as executor:
        result = pipelines.diamond().run(executor=executor, history=False if switch == "argument" else None)
    assert result.success and not (tmp_path / "home").exists()
    if switch == "env":
        with pytest.raises(HistoryConfigError, match="FLOWYML_HISTORY=off"):
            flowyml.history.runs()


def test_a_history_that_cannot_be_written_warns_once_and_the_runs_go_on(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    url = f"sqlite:///{tmp_path / 'a-file' / 'history.db'}"
    with ParallelExecutor(backend="sync") as executor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [pipelines.diamond().run(executor=executor, history=url) for _ in range(2)]
        assert flowyml.history.flush(TIMEOUT)  # the records are written in the background
    numbers = range(10)
    expected = [sum(n for n in numbers if n % 2 == 0), sum(n for n in numbers if n % 2),
                sum(n for n in numbers if n < 5), sum(n for n in numbers if n >= 5)]
    assert [r["report"] for r in results] == [expected, expected]
    ours = [w for w in caught if issubclass(w.category, HistoryWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "a-file" in str(ours[0].message) and "FLOWYML_HISTORY=off" in str(ours[0].message)


def test_a_history_setting_that_is_no_url_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWYML_HISTORY", "my-history")
    warned = pytest.warns(HistoryWarning, match="my-history.*nor a database URL")
    with ParallelExecutor(backend="sync") as executor, warned:
        assert pipelines.diamond().run(executor=executor).success


def test_a_history_made_by_a_newer_flowyml_is_refused_by_name(tmp_path):
    url = sqlite_url(tmp_path)
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE flowyml_alembic_version SET version_num = '9999'"))
    engine.dispose()
    other = f"sqlite:///{tmp_path}/./history.db"  # the same file, not the engine this process has open
    with pytest.raises(HistoryConfigError, match="'9999', newer than this flowyml knows"):
        open_engine(other)
    with ParallelExecutor(backend="sync") as executor, pytest.warns(HistoryWarning, match="newer than"):
        assert pipelines.diamond().run(executor=executor, history=other).success
        assert flowyml.history.flush(TIMEOUT)


# ----------------------------------------------------------------------------- schema versions


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_migrations_make_exactly_the_tables_flowyml_writes(tmp_path, request, database):
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    import flowyml.history.database as database_module

    url = sqlite_url(tmp_path) if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_engine(url)
    config = Config()
    config.set_main_option("script_location", str(Path(database_module.__file__).with_name("migrations")))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM flowyml_alembic_version")).scalar() == HEAD
        context = MigrationContext.configure(connection, opts={"version_table": "flowyml_alembic_version"})
        assert compare_metadata(context, metadata) == []


def test_histories_opened_at_once_in_one_process_are_all_migrated(tmp_path, request):
    """Alembic's migration context is global to a process: two at once must take turns."""
    import threading

    urls = [f"sqlite:///{tmp_path / f'h{i}.db'}" for i in range(4)]
    urls += [request.getfixturevalue("postgres_server").create_database(f"at_once_{tmp_path.name[-8:]}_{i}")
             for i in range(2)] if postgres_bin() is not None else []
    errors = []

    def open_one(url):
        try:
            open_engine(url)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert errors == []
    for url in urls:
        with open_engine(url).connect() as connection:
            assert connection.execute(sa.text("SELECT version_num FROM flowyml_alembic_version")).scalar() == HEAD


# ----------------------------------------------------------------------------- lost runs


HANGING_JOB = """
import pathlib, sys, time
from flowyml import ParallelExecutor, Pipeline, step

@step(outputs=["waited"])
def wait_forever(marker):
    pathlib.Path(marker).touch()
    while True:
        time.sleep(0.05)

pipeline = Pipeline("hangs").add_step(wait_forever, params={"marker": sys.argv[2]})
pipeline.run(executor=ParallelExecutor(backend="sync"), history=sys.argv[1])
"""


def test_a_run_whose_process_was_killed_is_marked_lost(tmp_path):
    url = sqlite_url(tmp_path)
    script = tmp_path / "hangs.py"
    script.write_text(HANGING_JOB)
    marker = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    job = subprocess.Popen([sys.executable, str(script), url, str(marker)], env=env, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: marker.exists() and len(flowyml.history.runs(status="running", url=url)) == 1,
                   "the job's run recorded as running", failed=lambda: job.poll() is not None and "job exited")
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(TIMEOUT)
    frame = flowyml.history.runs(url=url)
    assert list(frame["status"]) == ["lost"]
    assert "killed, or out of memory" in frame["error"].iloc[0]


def test_a_run_of_another_host_is_lost_once_its_heartbeat_is_old(tmp_path):
    from flowyml.history.config import LOST_AFTER

    url = sqlite_url(tmp_path)
    engine = open_engine(url)
    now = datetime.now(UTC)
    rows = [  # (run id, heartbeat, host name): none of this boot of this machine
        ("fresh", now - LOST_AFTER / 2, "elsewhere.example"),
        ("stale", now - LOST_AFTER * 2, "elsewhere.example"),
        ("same-name", now - LOST_AFTER / 2, socket.gethostname()),  # a container, or a clone of this image
    ]
    with engine.begin() as connection:
        for run_id, beat, host in rows:
            connection.execute(runs.insert().values(
                id=run_id, run_id=run_id, pipeline="p", status="running", started_at=beat, heartbeat_at=beat,
                host=host, host_id="another-boot:pid:[4026531836]", pid=2**22 - 1))  # no such pid here
    frame = flowyml.history.runs(url=url).set_index("run_id")
    assert dict(frame["status"]) == {"fresh": "running", "stale": "lost", "same-name": "running"}


# ----------------------------------------------------------------------------- reading and pruning


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A new history database: a SQLite file, or a database on the PostgreSQL server."""
    return sqlite_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_runs_filters_by_pipeline_status_time_and_count(database_url):
    url = database_url
    with ParallelExecutor(backend="sync") as executor:
        made = [pipelines.diamond().run(executor=executor, history=url) for _ in range(3)]
        failed = pipelines.failing().run(executor=executor, on_failure="continue", history=url)
    every = flowyml.history.runs(url=url)
    assert list(every["run_id"]) == [failed.run_id, *[r.run_id for r in reversed(made)]]
    assert str(every["started_at"].dtype) == "datetime64[ns, UTC]" or "UTC" in str(every["started_at"].dtype)
    assert set(flowyml.history.runs("diamond", url=url)["run_id"]) == {r.run_id for r in made}
    assert list(flowyml.history.runs(status="failed", url=url)["run_id"]) == [failed.run_id]
    assert len(flowyml.history.runs(limit=2, url=url)) == 2
    assert len(flowyml.history.runs(since="1h", url=url)) == 4
    assert flowyml.history.runs(since=datetime.now(UTC) + timedelta(minutes=1), url=url).empty
    tokyo = timezone(timedelta(hours=9))  # a time in another zone is the same instant
    assert len(flowyml.history.runs(since=datetime.now(tokyo) - timedelta(minutes=30), url=url)) == 4
    assert flowyml.history.runs(since=(datetime.now(tokyo) + timedelta(minutes=30)).isoformat(), url=url).empty
    with pytest.raises(HistoryConfigError, match="not an age"):
        flowyml.history.runs(since="yesterday", url=url)
    with pytest.raises(KeyError, match="no run 'nope'"):
        flowyml.history.show("nope", url=url)
    assert flowyml.history.show(failed.run_id[:6], url=url)["run_id"] == failed.run_id  # a unique prefix


def _age_runs(engine, days: float) -> None:
    """Every run recorded so far started ``days`` ago."""
    assert flowyml.history.flush(TIMEOUT)  # the records are written in the background
    with engine.begin() as connection:
        connection.execute(runs.update().values(started_at=datetime.now(UTC) - timedelta(days=days)))


def test_prune_deletes_old_runs_with_their_steps(database_url):
    url = database_url
    with ParallelExecutor(backend="sync") as executor:
        pipelines.diamond().run(executor=executor, history=url)
        _age_runs(open_engine(url), 40)
        kept = pipelines.diamond().run(executor=executor, history=url)
    assert flowyml.history.prune("30d", url=url) == 1
    assert list(flowyml.history.runs(url=url)["run_id"]) == [kept.run_id]
    with open_engine(url).connect() as connection:
        left = connection.execute(sa.text("SELECT DISTINCT r.run_id FROM flowyml_steps s JOIN flowyml_runs r "
                                          "ON s.run = r.id")).scalars().all()
        steps = connection.execute(sa.text("SELECT count(*) FROM flowyml_steps")).scalar()
    assert left == [kept.run_id] and steps == len(kept.steps)


def test_runs_prune_the_history_by_its_retention_once_a_day(tmp_path, monkeypatch):
    url = sqlite_url(tmp_path)
    monkeypatch.setenv("FLOWYML_HISTORY_RETENTION", "1d")
    engine = open_engine(url)
    with ParallelExecutor(backend="sync") as executor:
        old = pipelines.diamond().run(executor=executor, history=url)
        _age_runs(engine, 2)
        pipelines.diamond().run(executor=executor, history=url)  # pruned less than a day ago: keeps it
        assert old.run_id in set(flowyml.history.runs(url=url)["run_id"])
        with engine.begin() as connection:  # the last prune, two days ago
            connection.execute(meta.update().values(value=(datetime.now(UTC) - timedelta(days=2)).isoformat()))
        newest = pipelines.diamond().run(executor=executor, history=url)
    left = set(flowyml.history.runs(url=url)["run_id"])
    assert old.run_id not in left and newest.run_id in left and len(left) == 2


@step(outputs=["fetched"])
def fetch(api_key="", endpoint="", options=None):
    return len(api_key) + len(endpoint)


def test_credentials_in_params_and_the_command_line_are_not_recorded(tmp_path, monkeypatch):
    url = sqlite_url(tmp_path)
    monkeypatch.setattr(sys, "argv", ["flowyml", "run", "job.py", "--input",
                                      "trips=https://bob:hunter2@example.com/t.csv?sig=SECRETSIG",
                                      "--param", "fetch.api_key=sk-live-123456"])
    pipeline = Pipeline("secrets").add_step(fetch, params={
        "api_key": "sk-live-123456", "endpoint": "https://u:hunter2@host/x?token=T0KEN",
        "options": {"password": "hunter2", "rows": 3}})
    with ParallelExecutor(backend="sync") as executor:
        result = pipeline.run(executor=executor, history=url)
    run = flowyml.history.show(result.run_id, url=url)
    assert "hunter2" not in run["command"] and "SECRETSIG" not in run["command"]
    assert "sk-live" not in run["command"] and "fetch.api_key=***" in run["command"]
    assert "https://bob:***@example.com/t.csv?sig=***" in run["command"]
    assert run["params"] == {"fetch": {"api_key": "***", "endpoint": "https://u:***@host/x?token=***",
                                       "options": {"password": "***", "rows": 3}}}


def test_a_run_whose_sources_are_missing_is_recorded_failed(tmp_path):
    from flowyml import DataError

    url = sqlite_url(tmp_path)
    pipeline = pipelines.history_pipeline(tmp_path / "nothing-here")
    with ParallelExecutor(backend="sync") as executor, pytest.raises(DataError):
        pipeline.run(executor=executor, history=url)
    frame = flowyml.history.runs(url=url)
    assert list(frame["status"]) == ["failed"] and "nothing-here" in frame["error"].iloc[0]


def test_an_interrupted_run_is_recorded_interrupted(tmp_path):
    url = sqlite_url(tmp_path)
    with ParallelExecutor(backend="sync") as executor, pytest.raises(KeyboardInterrupt):
        pipelines.diamond().run(executor=executor, history=url, inputs={"numbers": _Interrupting()})
    assert list(flowyml.history.runs(url=url)["status"]) == ["interrupted"]


class _Interrupting(list):
    """A run input whose use by a step stops the run as Ctrl-C would."""

    def __iter__(self):
        raise KeyboardInterrupt


def test_a_retention_that_is_no_age_warns_and_runs_are_still_recorded(tmp_path, monkeypatch):
    url = sqlite_url(tmp_path)
    monkeypatch.setenv("FLOWYML_HISTORY_RETENTION", "90 days")
    with ParallelExecutor(backend="sync") as executor, pytest.warns(HistoryWarning) as caught:
        result = pipelines.diamond().run(executor=executor, history=url)
        frame = flowyml.history.runs(url=url)
    assert list(frame["status"]) == ["succeeded"] and frame["run_id"].iloc[0] == result.run_id
    assert any("FLOWYML_HISTORY_RETENTION '90 days' is not an age" in str(w.message) for w in caught)


def test_a_report_saved_at_any_moment_is_named_by_the_record(tmp_path):
    url = sqlite_url(tmp_path)
    with ParallelExecutor(backend="sync") as executor:
        result = pipelines.diamond().run(executor=executor, history=url)
        first = result.save_report(tmp_path / "first.json")  # the record is still being written
        assert flowyml.history.show(result.run_id, url=url)["report_path"] == str(first)
        second = result.save_report(tmp_path / "second.html")  # the record was complete
        assert flowyml.history.show(result.run_id, url=url)["report_path"] == str(second)


# ----------------------------------------------------------------------------- the command line


JOB = """
from flowyml import Pipeline, step

@step(outputs=["numbers"])
def numbers(count=5):
    return list(range(count))

@step(inputs=["numbers"], outputs=["total"])
def total(numbers):
    return sum(numbers)

pipeline = Pipeline("nightly").add_step(numbers).add_step(total)
"""


def _cli_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_"))}
    env.update(FLOWYML_HISTORY=url, FLOWYML_HOME=os.environ["FLOWYML_HOME"],
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    return env


def _flowyml(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("flowyml")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flowyml"]
    return subprocess.Popen([*command, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def _history_cli(url: str, *args: str):
    return CliRunner().invoke(main, ["history", "--url", url, *args])


def test_the_history_command_lists_shows_charts_and_prunes_runs(tmp_path):
    url = sqlite_url(tmp_path)
    (tmp_path / "job.py").write_text(JOB)
    done = _flowyml("run", "job.py", "--backend", "sync", "--report", "out/run.json", env=_cli_env(url),
                    cwd=tmp_path)
    _, err = done.communicate(timeout=TIMEOUT)
    assert done.returncode == 0, err
    with ParallelExecutor(backend="sync") as executor:
        failed = pipelines.failing().run(executor=executor, on_failure="continue", history=url)

    listing = _history_cli(url)
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert lines[0].split()[:3] == ["RUN", "PIPELINE", "STATUS"]
    assert lines[1].split()[:3] == [failed.run_id, "failing", "failed"] and "ValueError" in lines[1]
    assert lines[2].split()[1:3] == ["nightly", "succeeded"]

    as_json = [json.loads(line) for line in _history_cli(url, "--json", "--pipeline", "nightly").output.splitlines()]
    assert len(as_json) == 1 and as_json[0]["status"] == "succeeded"
    nightly = as_json[0]["run_id"]
    assert as_json[0]["report_path"] == str(tmp_path / "out" / "run.json")
    assert as_json[0]["command"].endswith("run job.py --backend sync --report out/run.json")
    assert _history_cli(url, "--status", "lost").output.strip() == "no runs recorded that match"

    shown = _history_cli(url, "show", failed.run_id)
    assert shown.exit_code == 0
    assert "fail_if_big: failed" in shown.output and "after: skipped" in shown.output
    assert "traceback of fail_if_big:" in shown.output and "ValueError: total 45 exceeds 10" in shown.output
    full = json.loads(_history_cli(url, "show", nightly, "--json").output)
    assert [s["name"] for s in full["steps"]] == ["numbers", "total"]
    missing = _history_cli(url, "show", "nope")
    assert missing.exit_code == 2 and "no run 'nope'" in missing.output
    assert _history_cli(url, "--since", "soon").exit_code == 2
    unreachable = _history_cli("postgresql://flowyml:hunter2@127.0.0.1:1/none")  # nothing listens on port 1
    assert unreachable.exit_code == 2 and "hunter2" not in unreachable.output
    assert "the run history at postgresql://flowyml:***@127.0.0.1:1/none cannot be read" in unreachable.output

    page = tmp_path / "trends.html"
    charted = _history_cli(url, "trends", "failing", "-o", str(page))
    assert charted.exit_code == 0 and page.is_file() and "fail_if_big" in page.read_text()
    assert _history_cli(url, "trends", "unknown").exit_code == 2

    _age_runs(open_engine(url), 10)
    pruned = _history_cli(url, "prune", "--older-than", "7d")
    assert pruned.exit_code == 0 and "removed 2 runs" in pruned.output
    assert _history_cli(url, "prune", "--older-than", "a week").exit_code == 2


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sixteen_flowyml_runs_at_once_are_all_recorded(tmp_path, request, database):
    """Overlapping cron jobs on one history (a new one: the first to open it migrates it)."""
    url = sqlite_url(tmp_path) if database == "sqlite" else request.getfixturevalue("postgres_url")
    (tmp_path / "job.py").write_text(JOB)
    env = _cli_env(url)
    jobs = [_flowyml("run", "job.py", "--backend", "sync", "--quiet", env=env, cwd=tmp_path) for _ in range(16)]
    for job in jobs:
        _, err = job.communicate(timeout=TIMEOUT)
        assert job.returncode == 0, err
        assert "HistoryWarning" not in err and "cannot be written" not in err, err
    frame = flowyml.history.runs(url=url, limit=None)
    assert len(frame) == 16 and frame["run_id"].is_unique
    assert set(frame["status"]) == {"succeeded"} and set(frame["pipeline"]) == {"nightly"}
    with open_engine(url).connect() as connection:
        steps = connection.execute(sa.text("SELECT run, name FROM flowyml_steps")).all()
    assert Counter(name for _, name in steps) == {"numbers": 16, "total": 16}


# ----------------------------------------------------------------------------- the trends page


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_chromium_draws_the_trends_page_with_durations_and_failures(tmp_path):
    url = sqlite_url(tmp_path)
    with ParallelExecutor(backend="sync") as executor:
        for limit in (100, 5, 100, 100, 5, 100):  # fail_if_big fails when limit is 5
            pipeline = pipelines.failing(limit)
            pipeline.run(executor=executor, on_failure="continue", history=url)
    page = flowyml.history.trends("failing", tmp_path / "trends.html", url=url)
    html = page.read_text()
    assert html.count('class="failure"') == 2  # one cross per failed run of fail_if_big
    assert html.count('class="run failed"') == 2 and html.count('class="run succeeded"') == 4
    for name in ("numbers", "total", "fail_if_big", "after", "independent"):
        assert f">{name}<" in html
    png = tmp_path / "trends.png"
    screenshot(page, png, tmp_path / "profile")
    _, _, rows, bpp = _decode_png(png.read_bytes())
    colours = Counter(row[x:x + 3] for row in rows[:700] for x in range(0, len(row), bpp))
    assert colours[b"\xc6\x28\x28"] > 20, "the failures' red is not drawn"
    drawn = [c for c in (b"\x00\x72\xb2", b"\xe6\x9f\x00", b"\x00\x9e\x73") if colours[c] > 20]
    assert len(drawn) == 3, "the step lines are not drawn"

"""The ``flowyml`` logger: what a scheduled job's log shows, and silence when unconfigured."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowyml import Pipeline, read_csv, step

REPO = Path(__file__).resolve().parent.parent
TRIPS = [str(REPO / "data" / "trips" / f"trips_2024-0{month}.csv") for month in (1, 2, 3)]


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips):
    return trips.dropna(subset=["fare"])


@step(inputs=["clean"], outputs=["rows"])
def rows(clean):
    return len(clean)


@step
def boom():
    raise ValueError("broken on purpose")


def _pipeline(failing: bool = False) -> Pipeline:
    pipeline = Pipeline("logged").add_source("trips", read_csv(TRIPS)).add_step(clean).add_step(rows)
    return pipeline.add_step(boom) if failing else pipeline


def _flowyml_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("flowyml")]


def test_run_logs_its_start_each_step_end_and_a_final_line(executor, caplog) -> None:
    caplog.set_level(logging.INFO, logger="flowyml")
    result = _pipeline().run(executor=executor, progress=False)
    messages = _flowyml_messages(caplog)

    start = [m for m in messages if "tasks on backend" in m]
    assert len(start) == 1, messages
    assert f"backend {executor.backend!r} with {executor.max_workers} workers" in start[0]
    assert result.run_id in start[0] and "'logged'" in start[0]
    # Only the distributed backend has a dashboard; its link is in the first line.
    dashboard = re.search(r"dashboard http://127\.0\.0\.1:\d+", start[0])
    assert (dashboard is not None) == (executor.backend == "distributed"), start[0]

    for name, partitions in (("trips", 3), ("clean", 3)):
        lines = [m for m in messages if m.startswith(f"step {name!r} ")]
        assert len(lines) == 1, (name, messages)
        assert re.match(rf"step '{name}' succeeded: {partitions} tasks in \d+\.\d\ds$", lines[0])
    rows_lines = [m for m in messages if m.startswith("step 'rows' ")]
    assert len(rows_lines) == 1 and re.match(r"step 'rows' succeeded: 1 task in \d+\.\d\ds$", rows_lines[0])

    assert re.search(rf"pipeline 'logged' run {result.run_id} succeeded in \d+\.\d\ds$", messages[-1])
    assert messages.index(start[0]) < len(messages) - 1


def test_a_failed_step_and_the_failed_run_are_logged(executor, caplog) -> None:
    caplog.set_level(logging.INFO, logger="flowyml")
    result = _pipeline(failing=True).run(executor=executor, on_failure="continue", progress=False)
    messages = _flowyml_messages(caplog)
    assert not result.success
    assert any(m.startswith("step 'boom' failed: 1 task") for m in messages), messages
    assert re.search(r"pipeline 'logged' run \w+ failed in", messages[-1])


def test_with_a_progress_bar_steps_are_not_logged_but_start_and_end_are(executor, caplog, capsys) -> None:
    caplog.set_level(logging.INFO, logger="flowyml")
    _pipeline().run(executor=executor, progress=True)
    messages = _flowyml_messages(caplog)
    assert not [m for m in messages if m.startswith("step ")], messages
    assert "tasks on backend" in messages[0] and "succeeded in" in messages[-1]
    bar = capsys.readouterr().err
    total = 3 + 3 + 1  # source partitions, clean partitions, rows
    assert f"{total}/{total}" in bar


SILENT_SCRIPT = """
from flowyml import ParallelExecutor, Pipeline, read_csv, step

@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips):
    return trips.dropna(subset=["fare"])

@step
def boom():
    raise ValueError("broken on purpose")

pipeline = Pipeline("silent").add_source("trips", read_csv({trips!r})).add_step(clean).add_step(boom)

if __name__ == "__main__":
    for backend in {backends!r}:
        result = pipeline.run(executor=ParallelExecutor(backend=backend, max_workers=2), on_failure="continue")
        assert not result.success and result.steps["clean"].status == "succeeded", result.summary()
"""


def test_unconfigured_logging_means_a_run_prints_nothing(tmp_path: Path) -> None:
    # A user's script that configures no logging, run as cron would (no terminal):
    # successes, a failure and every backend leave stdout and stderr empty.
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SILENT_SCRIPT.format(
        trips=TRIPS, backends=["sync", "thread", "process", "distributed"])))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_")) or k == "FLOWYML_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)

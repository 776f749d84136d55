"""The ``flowyml`` command as cron, Airflow or a person at a terminal uses it.

The main paths run the real command in a subprocess (the installed console
script when there is one, else ``python -m flowyml``), in a scratch
directory with ``data`` and ``examples`` linked in; usage errors, which fail
before anything runs, also go through click's ``CliRunner`` for speed.
Expected data is computed with plain pandas, never hard-coded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import flowyml
from flowyml.cache import Cache
from flowyml.cli import main

from .terminal import run_with_stderr_on_a_pty

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120

FAILING_JOB = """
from flowyml import Pipeline, step

@step
def extract():
    return [1, 2, 3]

@step(inputs=["extract"])
def boom(rows, x=0):
    raise ValueError(f"bad value {x}")

@step(inputs=["boom"])
def after(value):
    return value

@step(inputs=["extract"])
def independent(rows):
    return sum(rows)

pipeline = Pipeline("failing").add_step(extract).add_step(boom).add_step(after).add_step(independent)
"""

PARAMS_JOB = """
import json
from flowyml import Pipeline, step

@step
def show(a=None, b=None, c=None, d=None, e=None, f=None, g=None):
    values = dict(a=a, b=b, c=c, d=d, e=e, f=f, g=g)
    with open("params.json", "w") as out:
        json.dump({k: [type(v).__name__, v] for k, v in values.items()}, out)
    return values

pipeline = Pipeline("params").add_step(show)
"""

TWO_PIPELINES = """
from flowyml import Pipeline, step

@step
def one():
    return 1

first = Pipeline("first").add_step(one)
second = Pipeline("second").add_step(one, name="uno")

def make():
    return Pipeline("made").add_step(one, name="made_step")

not_a_pipeline = 42
"""

NO_PIPELINE = "from flowyml import Pipeline\nname = 'nothing here'\n"
BROKEN_FILE = "from flowyml import Pipeline\n\nvalue = 1\nresult = undefined_name + value\n"
MISSING_INPUT = """
from flowyml import Pipeline, step

@step(inputs=["raw"])
def clean(raw):
    return raw

pipeline = Pipeline("missing").add_step(clean)
"""


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A user's job directory: data/ and examples/ from the repository, plus a few job files."""
    for name in ("data", "examples"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    for name, text in {
        "failing.py": FAILING_JOB,
        "params_job.py": PARAMS_JOB,
        "two.py": TWO_PIPELINES,
        "none.py": NO_PIPELINE,
        "broken.py": BROKEN_FILE,
        "missing.py": MISSING_INPUT,
    }.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _command() -> list[str]:
    script = Path(sys.executable).parent / "flowyml"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flowyml"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_")) or k == "FLOWYML_HOME"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def flowyml_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``flowyml`` command; stdin closed, stdout and stderr captured (not a terminal)."""
    return subprocess.run([*_command(), *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def invoke(work: Path, *args: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(work)
    for name in [n for n in os.environ if n.startswith("FLOWYML_") and n != "FLOWYML_HOME"]:
        monkeypatch.delenv(name)
    return CliRunner().invoke(main, list(args))


def expected_clean(paths: list[str], min_fare: float) -> pd.DataFrame:
    """What examples/trips.py's clean step keeps, written independently with pandas."""
    trips = pd.concat([pd.read_csv(p, parse_dates=["pickup_at", "dropoff_at"]) for p in paths],
                      ignore_index=True)
    keep = (trips["fare"].notna() & (trips["fare"] >= min_fare) & (trips["passengers"] > 0)
            & (trips["distance_km"] > 0) & (trips["dropoff_at"] > trips["pickup_at"]))
    return trips[keep]


def assert_no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


# ----------------------------------------------------------------------------- run: success


def test_run_succeeds_writes_output_and_a_json_report_with_the_documented_schema(work: Path) -> None:
    done = flowyml_cli("run", "examples/trips.py", "--backend", "process", "--workers", "2",
                       "--param", "clean.min_fare=2.5", "--report", "reports/run.json", cwd=work)
    assert done.returncode == 0, done.stderr
    assert_no_traceback(done)
    steps = ["trips", "zones", "clean", "enrich", "daily_revenue", "tips_by_payment", "write_trips"]
    for name in steps:  # the summary table on stdout
        assert re.search(rf"^{name}\s+succeeded\b", done.stdout, re.M), done.stdout

    # The written output is what plain pandas computes, min_fare=2.5 included.
    files = sorted(str(p) for p in (REPO / "data" / "trips").glob("*.csv"))
    expected = expected_clean(files, min_fare=2.5)
    written = pd.read_parquet(work / "out" / "trips")
    assert len(list((work / "out" / "trips").glob("part-*.parquet"))) == len(files)
    assert sorted(written["trip_id"]) == sorted(expected["trip_id"])

    record = json.loads((work / "reports" / "run.json").read_text())
    top = {"pipeline": str, "run_id": str, "backend": str, "max_workers": int, "success": bool,
           "started_at": str, "duration_s": float, "steps": dict, "tasks": list, "outputs": list}
    for key, kind in top.items():
        assert isinstance(record[key], kind), (key, record[key])
    assert "dashboard_link" in record
    assert (record["pipeline"], record["backend"], record["max_workers"], record["success"]) == (
        "trips_nightly", "process", 2, True)
    assert list(record["steps"]) == steps
    step_types = {"status": str, "duration_s": (int, float), "attempts": int, "cached_partitions": int,
                  "per_partition": bool}
    for name, step in record["steps"].items():
        for key, kind in step_types.items():
            assert isinstance(step[key], kind), (name, key, step[key])
        assert step["partitions"] is None or isinstance(step["partitions"], int)
        assert step["error"] is None and step["traceback"] is None
    assert record["steps"]["clean"]["partitions"] == len(files)
    task_types = {"key": str, "step": str, "status": str, "attempts": int, "start": float, "stop": float,
                  "worker": str}
    for task in record["tasks"]:
        for key, kind in task_types.items():
            assert isinstance(task[key], kind), (key, task)
        assert task["partition"] is None or isinstance(task["partition"], int)
        assert task["stop"] >= task["start"]
    assert {t["step"] for t in record["tasks"]} == set(steps)
    assert sorted(t["partition"] for t in record["tasks"] if t["step"] == "clean") == list(range(len(files)))
    assert sorted(record["outputs"]) == ["daily_revenue", "tips_by_payment", "write_trips"]


def test_input_replaces_a_source_and_html_report_is_self_contained(work: Path) -> None:
    done = flowyml_cli("run", "examples/trips.py", "--backend", "thread", "--workers", "2",
                       "--input", "trips=data/trips_parquet/trips_2024-0[23].parquet",
                       "--report", "run.html", "--param", "clean.min_fare=10", cwd=work)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^clean\s+succeeded\s+2\b", done.stdout, re.M), done.stdout  # 2 files, 2 partitions

    parts = [str(REPO / "data" / "trips" / f"trips_2024-0{m}.csv") for m in (2, 3)]
    written = pd.read_parquet(work / "out" / "trips")
    assert sorted(written["trip_id"]) == sorted(expected_clean(parts, min_fare=10)["trip_id"])

    page = (work / "run.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "<svg" in page and "trips_nightly" in page
    # Self-contained: nothing fetched from elsewhere (SVG's namespace URI is not a fetch).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "<link" not in page.lower() and "@import" not in page


# ----------------------------------------------------------------------------- run: failures


def test_step_failure_exits_1_with_the_step_and_cause_and_no_traceback(work: Path) -> None:
    done = flowyml_cli("run", "failing.py", "--backend", "thread", "--param", "boom.x=7", cwd=work)
    assert done.returncode == 1
    assert "step 'boom' failed" in done.stderr and "ValueError: bad value 7" in done.stderr
    assert_no_traceback(done)


def test_a_run_that_stops_at_a_failure_still_writes_its_report(work: Path) -> None:
    done = flowyml_cli("run", "failing.py", "--backend", "sync", "--param", "boom.x=7",
                       "--report", "stopped.json", cwd=work)
    assert done.returncode == 1
    assert_no_traceback(done)
    assert "report: stopped.json" in done.stderr
    record = json.loads((work / "stopped.json").read_text())
    assert record["success"] is False and record["outputs"] == []
    assert record["steps"]["boom"]["status"] == "failed"
    assert record["steps"]["boom"]["error"] == "ValueError: bad value 7"
    assert "raise ValueError" in record["steps"]["boom"]["traceback"]
    assert record["steps"]["after"]["status"] == "stopped"


def test_on_failure_continue_finishes_the_rest_reports_and_exits_1(work: Path) -> None:
    done = flowyml_cli("run", "failing.py", "--backend", "thread", "--on-failure", "continue",
                       "--report", "failed.json", cwd=work)
    assert done.returncode == 1
    assert_no_traceback(done)
    assert re.search(r"^boom\s+failed\b", done.stdout, re.M) and re.search(r"^after\s+skipped\b", done.stdout, re.M)
    assert "1 step(s) failed, 1 skipped" in done.stderr
    record = json.loads((work / "failed.json").read_text())
    assert record["success"] is False
    assert record["steps"]["independent"]["status"] == "succeeded"
    assert record["steps"]["boom"]["error"] == "ValueError: bad value 0"
    assert "raise ValueError" in record["steps"]["boom"]["traceback"]  # the user's own frame
    assert record["outputs"] == ["independent"]


# ----------------------------------------------------------------------------- run: usage errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "examples/trips.py", "--backend", "gpu"], "'gpu' is not one of"),
        (["run", "examples/trips.py", "--param", "min_fare=2"], "is not STEP.KEY=VALUE"),
        (["run", "examples/trips.py", "--param", "clean.min_fare"], "is not STEP.KEY=VALUE"),
        (["run", "examples/trips.py", "--param", "cleen.min_fare=2"], "has no step 'cleen'"),
        (["run", "examples/trips.py", "--param", "clean.max_fare=2"], "unknown params key 'max_fare'"),
        (["run", "examples/trips.py", "--input", "trips"], "is not NAME=PATH_OR_GLOB"),
        (["run", "examples/trips.py", "--input", "trip=data/trips/*.csv"], "no such source"),
        (["run", "examples/trips.py", "--backend", "sync", "--input", "trips=data/2031/*.csv"], "matched no file"),
        (["run", "examples/trips.py", "--report", "run.txt"], "must end in .json or .html"),
        (["run", "examples/trips.py", "--workers", "0"], "--workers"),
        (["run", "no_such_job.py"], "no such pipeline file"),
        (["run", "none.py"], "defines no Pipeline"),
        (["run", "two.py"], "defines 2 Pipeline objects (first, second)"),
        (["run", "two.py:third"], "has no variable 'third'"),
        (["run", "two.py:not_a_pipeline"], "is a int, not a Pipeline"),
        (["run", "broken.py"], "NameError: name 'undefined_name' is not defined (broken.py, line 4)"),
        (["run", "missing.py", "--backend", "sync"], "needs input 'raw'"),
        (["visualize", "examples/trips.py", "-o", "graph.png"], "must end in .svg, .dot or .mmd"),
        (["cache", "info"], "no cache directory"),
    ],
)
def test_usage_and_pipeline_errors_exit_2_with_a_message(work, monkeypatch, args, message) -> None:
    result = invoke(work, *args, monkeypatch=monkeypatch)
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert message in result.output


def test_usage_errors_exit_2_in_a_real_process_without_traceback(work: Path) -> None:
    for args in (["run", "two.py"], ["run", "examples/trips.py", "--backend", "gpu"]):
        done = flowyml_cli(*args, cwd=work)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip() and "Error" in done.stderr
        assert_no_traceback(done)


def test_unknown_backend_from_the_environment_exits_2(work: Path, monkeypatch) -> None:
    monkeypatch.chdir(work)
    monkeypatch.setenv("FLOWYML_BACKEND", "gpu")
    result = CliRunner().invoke(main, ["run", "examples/trips.py"])
    assert result.exit_code == 2 and "FLOWYML_BACKEND='gpu'" in result.output


def test_a_variable_or_a_factory_picks_the_pipeline(work: Path, monkeypatch) -> None:
    result = invoke(work, "run", "two.py:second", "--backend", "sync", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert re.search(r"^uno\s+succeeded", result.output, re.M)
    result = invoke(work, "run", "two.py:make", "--backend", "sync", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert re.search(r"^made_step\s+succeeded", result.output, re.M)


def test_param_values_are_json_where_they_parse_else_strings(work: Path, monkeypatch) -> None:
    values = {"a": "2.5", "b": "3", "c": "true", "d": '["fare", "tip"]', "e": "fast", "f": '"2.5"',
              "g": "null"}
    args = [arg for key, text in values.items() for arg in ("--param", f"show.{key}={text}")]
    result = invoke(work, "run", "params_job.py", "--backend", "sync", *args, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    seen = json.loads((work / "params.json").read_text())
    assert seen == {
        "a": ["float", 2.5], "b": ["int", 3], "c": ["bool", True], "d": ["list", ["fare", "tip"]],
        "e": ["str", "fast"], "f": ["str", "2.5"], "g": ["NoneType", None],
    }


def test_quiet_prints_no_summary(work: Path, monkeypatch) -> None:
    result = invoke(work, "run", "params_job.py", "--backend", "sync", "-q", monkeypatch=monkeypatch)
    assert result.exit_code == 0 and "succeeded" not in result.output


def test_cli_logging_is_not_duplicated_across_invocations(work: Path, monkeypatch) -> None:
    for _ in range(2):
        result = invoke(work, "run", "params_job.py", "--backend", "sync", monkeypatch=monkeypatch)
        assert result.exit_code == 0
    cli_handlers = [h for h in flowyml.cli.log.handlers if getattr(h, "_flowyml_cli", False)]
    assert len(cli_handlers) == 1


# ----------------------------------------------------------------------------- visualize


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")
def test_visualize_writes_svg_through_graphviz(work: Path) -> None:
    done = flowyml_cli("visualize", "examples/trips.py", "-o", "graph.svg", cwd=work)
    assert done.returncode == 0, done.stderr
    svg = (work / "graph.svg").read_text()
    assert "<svg" in svg and "</svg>" in svg
    for name in ("trips", "zones", "clean", "enrich", "daily_revenue", "write_trips"):
        assert f">{name}" in svg, name  # Graphviz writes labels as <text>name...</text>


def test_visualize_without_graphviz_exits_2_and_says_how_to_install(work: Path, tmp_path: Path) -> None:
    empty_bin = tmp_path / "no-dot-here"
    empty_bin.mkdir()
    done = subprocess.run([sys.executable, "-m", "flowyml", "visualize", "examples/trips.py", "-o", "g.svg"],
                          cwd=work, env=_env(PATH=str(empty_bin)), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 2
    assert "Graphviz" in done.stderr and "to_mermaid" in done.stderr
    assert_no_traceback(done)


def test_visualize_prints_mermaid_and_writes_dot(work: Path, monkeypatch) -> None:
    result = invoke(work, "visualize", "examples/trips.py", monkeypatch=monkeypatch)
    assert result.exit_code == 0 and result.output.startswith("flowchart LR")
    result = invoke(work, "visualize", "examples/trips.py", "-o", "graph.dot", monkeypatch=monkeypatch)
    assert result.exit_code == 0
    assert (work / "graph.dot").read_text().startswith('digraph "trips_nightly"')


# ----------------------------------------------------------------------------- demo, version, cache


def test_demo_writes_parquet_output_and_exits_0(work: Path) -> None:
    done = flowyml_cli("demo", "--backend", "thread", "--workers", "2", "--output", "out/demo", cwd=work)
    assert done.returncode == 0, done.stderr
    written = pd.read_parquet(work / "out" / "demo" / "enriched")
    trips = pd.concat(pd.read_csv(p) for p in sorted((REPO / "data" / "trips").glob("*.csv")))
    trips = trips.dropna(subset=["fare"])
    kept = trips[(trips["distance_km"] > 0) & (trips["fare"] > 0) & (trips["passengers"] > 0)]
    assert len(written) == len(kept)
    assert "pickup_borough" in written.columns
    assert "wrote 6 Parquet files to out/demo" in done.stdout


def test_version(work: Path) -> None:
    done = flowyml_cli("--version", cwd=work)
    assert done.returncode == 0 and flowyml.__version__ in done.stdout


def test_cache_info_and_clear(work: Path, monkeypatch) -> None:
    cache_dir = work / "cache"
    cache = Cache(cache_dir)
    cache.store("a" * 64, {"rows": 1})
    cache.store("b" * 64, [1, 2, 3])
    result = invoke(work, "cache", "info", "--cache-dir", str(cache_dir), monkeypatch=monkeypatch)
    assert result.exit_code == 0
    assert re.search(r"^entries: 2$", result.output, re.M) and str(cache_dir) in result.output
    done = flowyml_cli("cache", "clear", "--cache-dir", "cache", cwd=work)
    assert done.returncode == 0 and "removed 2 entries" in done.stdout
    assert not cache.contains("a" * 64)
    monkeypatch.setenv("FLOWYML_CACHE_DIR", str(cache_dir))
    result = CliRunner().invoke(main, ["cache", "info"])
    assert re.search(r"^entries: 0$", result.output, re.M)


# ----------------------------------------------------------------------------- progress


def _run_with_stderr_on_a_pty(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal (stdout piped): (status, stdout, tty text)."""
    return run_with_stderr_on_a_pty([*_command(), *args], cwd=cwd, env=_env(COLUMNS="120", TERM="xterm"),
                                    timeout=TIMEOUT)


def test_progress_bar_in_a_terminal_counts_every_task(work: Path) -> None:
    status, stdout, terminal = _run_with_stderr_on_a_pty(
        ["run", "examples/trips.py", "--backend", "thread", "--workers", "2", "--report", "run.json"], work)
    assert status == 0, terminal
    total = len(json.loads((work / "run.json").read_text())["tasks"])
    assert re.search(rf"\b{total}/{total}\b", terminal), terminal       # the finished bar: N/N
    assert "trips_nightly" in terminal                                     # its description
    assert "step 'clean' succeeded" not in terminal                       # the bar replaces step lines
    assert re.search(r"^clean\s+succeeded", stdout, re.M)                # the summary still on stdout


def test_no_bar_without_a_terminal_one_log_line_per_step_instead(work: Path) -> None:
    done = flowyml_cli("run", "examples/trips.py", "--backend", "thread", "--workers", "2",
                       "--report", "run.json", cwd=work)
    assert done.returncode == 0, done.stderr
    total = len(json.loads((work / "run.json").read_text())["tasks"])
    assert f"{total}/{total}" not in done.stderr and "task/s" not in done.stderr and "\r" not in done.stderr
    for name in ("trips", "clean", "enrich", "daily_revenue", "write_trips"):
        assert len(re.findall(rf"step '{name}' succeeded", done.stderr)) == 1, done.stderr

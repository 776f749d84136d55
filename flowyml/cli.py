"""The ``flowyml`` command: run, visualize, demo, cache.

Exit status: 0 success, 1 a step failed, 2 a usage or pipeline error (with
the message, never a bare traceback). Made for cron, Airflow's
BashOperator and Kubernetes CronJobs as much as for a terminal.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .exceptions import FlowymlError, StepFailed
from .interrupts import exit_code, exit_now, interruptible
from .status import OnFailure

__all__ = ["load_pipeline", "main"]

log = logging.getLogger("flowyml")

EXIT_OK, EXIT_STEP_FAILED, EXIT_USAGE = 0, 1, 2


class _Failed(click.ClickException):
    """A step failed: exit 1 with the message."""

    exit_code = EXIT_STEP_FAILED


class _Usage(click.ClickException):
    """A usage or pipeline error: exit 2 with the message."""

    exit_code = EXIT_USAGE


def load_pipeline(target: str) -> Any:
    """Load ``FILE.py[:VAR]``; VAR defaults to the only ``Pipeline`` in the file.

    The file is imported as a module of its own (its ``if __name__ ==
    "__main__":`` block does not run) and registered with cloudpickle to pickle
    by value, so its steps run on process and distributed workers that cannot
    import it.
    """
    from .pipeline import Pipeline

    path_text, _, variable = target.partition(":")
    if len(path_text) == 1 and variable and "\\" in variable:  # a Windows drive letter
        path_text, _, variable = target.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise _Usage(f"no such pipeline file: {path_text!r}")
    module_name = f"flowyml_user_{path.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise _Usage(f"cannot import {path_text!r}: is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so the file's own imports resolve
    try:
        spec.loader.exec_module(module)
    except FlowymlError as exc:
        raise _Usage(f"{path_text}: {exc}") from exc
    except Exception as exc:  # the user's file itself is broken: say where, not a bare traceback
        raise _Usage(f"cannot load {path_text}: {_where(exc, path)}") from exc
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    if variable:
        if not hasattr(module, variable):
            raise _Usage(f"{path_text} has no variable {variable!r}")
        value = getattr(module, variable)
        if callable(value) and not isinstance(value, Pipeline):
            try:
                value = value()  # a factory function
            except FlowymlError as exc:
                raise _Usage(f"{path_text}:{variable}(): {exc}") from exc
            except Exception as exc:
                raise _Usage(f"{path_text}:{variable}() failed: {_where(exc, path)}") from exc
        if not isinstance(value, Pipeline):
            raise _Usage(f"{path_text}:{variable} is a {type(value).__name__}, not a Pipeline")
        return value
    found = {name: v for name, v in vars(module).items() if isinstance(v, Pipeline)}
    if not found:
        raise _Usage(
            f"{path_text} defines no Pipeline at module level; assign one "
            f"(pipeline = Pipeline(...)) or name a variable or factory function as {path_text}:VARIABLE"
        )
    if len(found) > 1:
        raise _Usage(
            f"{path_text} defines {len(found)} Pipeline objects ({', '.join(sorted(found))}); "
            f"name one as {path_text}:VARIABLE"
        )
    return next(iter(found.values()))


def signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _where(exc: BaseException, path: Path) -> str:
    """``Type: message (file.py, line N)``: the last line of the user's file in the traceback."""
    import traceback

    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc}"  # its text already says (file, line N)
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    location = f" ({path}, line {line})" if line else ""
    return f"{type(exc).__name__}: {exc}{location}"


def _check_inputs(pipeline: Any, names: list[str]) -> None:
    """``--input`` must name a source or an asset a step reads: a typo must not run on old data."""
    known = set(pipeline.sources) | {asset for s in pipeline.steps.values() for asset in s.inputs}
    unknown = sorted(set(names) - known)
    if unknown:
        raise _Usage(
            f"--input {', '.join(unknown)}: pipeline {pipeline.name!r} has no such source or step "
            f"input; its sources are {', '.join(sorted(pipeline.sources)) or '(none)'}"
        )


def _parse_value(text: str) -> Any:
    """JSON where it parses (numbers, true/false, lists...), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _source_for(path: str) -> Any:
    from .io import read_csv, read_parquet

    lowered = path.lower()
    if lowered.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return read_csv(path, sep="\t") if lowered.endswith(".tsv") else read_csv(path)
    return read_parquet(path)


def _configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    # One CLI handler at a time: a command invoked twice in one process (tests,
    # a wrapper script) must not print every line twice.
    for old in [h for h in log.handlers if getattr(h, "_flowyml_cli", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._flowyml_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowyml")
def main() -> None:
    """flowyml: batch pipelines of pandas work on Dask."""


def _executor_options(func):
    options = [
        click.option("--backend", type=click.Choice(["process", "thread", "sync", "distributed"]),
                     default=None, help="Dask scheduler (default: FLOWYML_BACKEND, else process)."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Worker threads or processes (default: CPU count)."),
        click.option("--address", default=None,
                     help="Dask scheduler address (implies --backend distributed)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _executor(backend, workers, address):
    from .executors import ParallelExecutor

    try:
        return ParallelExecutor(max_workers=workers, backend=backend, address=address)
    except FlowymlError as exc:
        raise _Usage(str(exc)) from exc


@main.command()
@click.argument("target", metavar="FILE.py[:VAR]")
@_executor_options
@click.option("--input", "inputs", multiple=True, metavar="NAME=PATH_OR_GLOB",
              help="Replace a source for this run: a path, glob or URL (CSV by suffix, else Parquet).")
@click.option("--param", "params", multiple=True, metavar="STEP.KEY=VALUE",
              help="Set a step parameter (JSON where it parses, else a string).")
@click.option("--cache-dir", default=None, metavar="PATH_OR_URL",
              help="Cache task results here: a folder or a URL (default: FLOWYML_CACHE_DIR).")
@click.option("--on-failure", type=click.Choice([mode.value for mode in OnFailure]), default="raise",
              help="continue: finish independent branches, skip dependents.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the run report: out.json or out.html.")
@click.option("--progress/--no-progress", default=None, help="Force the progress bar on or off.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(target, backend, workers, address, inputs, params, cache_dir, on_failure, report,
        progress, quiet, verbose) -> None:
    """Run the pipeline in FILE.py (VAR: its variable, default the only Pipeline)."""
    _configure_logging(quiet, verbose)
    if report and not report.lower().endswith((".json", ".html")):
        raise click.BadParameter("must end in .json or .html", param_hint="--report")
    pipeline = load_pipeline(target)
    run_inputs = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} is not NAME=PATH_OR_GLOB", param_hint="--input")
        run_inputs[name] = _source_for(path)
    _check_inputs(pipeline, list(run_inputs))
    try:
        for item in params:
            key, sep, text = item.partition("=")
            step_name, dot, param = key.partition(".")
            if not sep or not dot or not step_name or not param:
                raise click.BadParameter(f"{item!r} is not STEP.KEY=VALUE", param_hint="--param")
            pipeline.set_params(step_name, **{param: _parse_value(text)})
        if cache_dir:
            pipeline.cache_dir = cache_dir
        executor = _executor(backend, workers, address)
        with interruptible():
            result = pipeline.run(run_inputs or None, executor=executor, on_failure=on_failure,
                                  progress=progress)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: workers are stopped, staging removed
        code = exit_code(exc)
        click.echo(f"flowyml: pipeline {pipeline.name!r} interrupted ({signal_name(code - 128)}); "
                   f"workers stopped, partial output removed", err=True)
        from .history.recorder import flush

        flush(5.0)  # the run's record says interrupted, even when exit_now cannot wait for threads
        exit_now(code)
    except StepFailed as exc:
        cause = exc.__cause__
        detail = f"\n{type(cause).__name__}: {cause}" if cause is not None and str(cause) not in str(exc) else ""
        stopped = getattr(exc, "result", None)
        if report and stopped is not None:  # monitoring wants the failed run's report most of all
            stopped.save_report(report)
            detail += f"\nreport: {report}"
        raise _Failed(f"{exc}{detail}") from exc
    except FlowymlError as exc:
        raise _Usage(str(exc)) from exc
    if report:
        result.save_report(report)
    if not quiet:
        click.echo(result.summary())
    if not result.success:
        raise _Failed(f"pipeline {pipeline.name!r}: {len(result.failures)} step(s) failed, "
                      f"{len(result.skipped)} skipped")


@main.command()
@click.argument("target", metavar="FILE.py[:VAR]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="graph.svg (needs Graphviz), graph.dot or graph.mmd; default: Mermaid to stdout.")
def visualize(target, output) -> None:
    """Draw the pipeline's step graph."""
    pipeline = load_pipeline(target)
    try:
        if output is None:
            click.echo(pipeline.to_mermaid())
            return
        suffix = Path(output).suffix.lower()
        if suffix == ".svg":
            pipeline.visualize(output)
        elif suffix in (".mmd", ".mermaid"):
            Path(output).write_text(pipeline.to_mermaid() + "\n")
        elif suffix in (".dot", ".gv"):
            Path(output).write_text(pipeline.to_dot() + "\n")
        else:
            raise click.BadParameter("must end in .svg, .dot or .mmd", param_hint="--output")
    except FlowymlError as exc:
        raise _Usage(str(exc)) from exc
    click.echo(f"wrote {output}")


@main.command()
@_executor_options
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="The bundled data folder (default: ./data, else the one beside the package).")
@click.option("--output", type=click.Path(file_okay=False), default="out/demo",
              help="Where the Parquet output goes.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="out.json or out.html.")
@click.option("--progress/--no-progress", default=None)
def demo(backend, workers, address, data_dir, output, report, progress) -> None:
    """Run the bundled taxi-trips ETL on data/ and write Parquet output."""
    from .demo import build_demo, find_data_dir

    _configure_logging(False, False)
    try:
        pipeline = build_demo(find_data_dir(data_dir), output)
        result = pipeline.run(executor=_executor(backend, workers, address), progress=progress)
    except StepFailed as exc:
        if report and getattr(exc, "result", None) is not None:
            exc.result.save_report(report)
        raise _Failed(str(exc)) from exc
    except FlowymlError as exc:
        raise _Usage(str(exc)) from exc
    if report:
        result.save_report(report)
    click.echo(result.summary())
    click.echo("")
    click.echo(result["borough_summary"].to_string())
    click.echo(f"\nwrote {len(result['written'])} Parquet files to {output}")


@main.group()
def cache() -> None:
    """Inspect or empty a task cache."""


def _cache_for(cache_dir):
    from .cache import Cache, default_cache_dir

    directory = default_cache_dir(cache_dir)
    if directory is None:
        raise _Usage("no cache directory: pass --cache-dir or set FLOWYML_CACHE_DIR")
    try:
        return Cache(directory)
    except FlowymlError as exc:  # a missing bucket, denied access...
        raise _Usage(str(exc)) from exc


@cache.command("info")
@click.option("--cache-dir", default=None, metavar="PATH_OR_URL",
              help="a folder or a URL (s3://bucket/cache); default FLOWYML_CACHE_DIR")
def cache_info(cache_dir) -> None:
    """Entries and size of the cache."""
    info = _cache_for(cache_dir).info()
    for key, value in info.items():
        click.echo(f"{key}: {value}")


@cache.command("clear")
@click.option("--cache-dir", default=None, metavar="PATH_OR_URL",
              help="a folder or a URL (s3://bucket/cache); default FLOWYML_CACHE_DIR")
def cache_clear(cache_dir) -> None:
    """Remove every entry of the cache."""
    removed = _cache_for(cache_dir).clear()
    click.echo(f"removed {removed} entries")


def _add_history() -> None:
    from .history.cli import history

    main.add_command(history)


_add_history()


if __name__ == "__main__":  # python -m flowyml.cli
    main()

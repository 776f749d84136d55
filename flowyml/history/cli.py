"""``flowyml history``: recent runs, one run in full, trends, pruning.

Registered on the ``flowyml`` command by :mod:`flowyml.cli`; SQLAlchemy is
imported only when a command reads the database.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import click

from .config import DEFAULT_RETENTION, HistoryConfigError, history_url, parse_age, shown_url

__all__ = ["history"]

STATUSES = ("running", "succeeded", "failed", "interrupted", "lost")


class _Usage(click.ClickException):
    exit_code = 2


def _engine(url: str | None) -> Any:
    from .queries import open_history

    try:
        return open_history(history_url(url, "--url") if url is not None else history_url())
    except HistoryConfigError as exc:
        raise _Usage(str(exc)) from exc


def _database_errors(command: Any) -> Any:
    """A database that cannot be reached or read exits 2 with its (redacted) URL, not a traceback."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import sqlalchemy as sa

        try:
            return command(*args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            url = click.get_current_context().obj or ""  # the group's --url
            where = shown_url((history_url(url, "--url") if url else history_url()) or "")
            raise _Usage(f"the run history at {where} cannot be read ({type(exc).__name__}: "
                         f"{str(exc.orig if hasattr(exc, 'orig') and exc.orig else exc).splitlines()[0]}); "
                         "check --url or FLOWYML_HISTORY") from exc
    return wrapper


def _age(text: str | None, what: str) -> Any:
    if text is None:
        return None
    from .queries import since_time

    try:
        return since_time(text)
    except HistoryConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from exc


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@click.group(invoke_without_command=True)
@click.option("--url", default=None, metavar="URL",
              help="The history's database (default: FLOWYML_HISTORY, else $FLOWYML_HOME/history.db).")
@click.option("--pipeline", default=None, help="Only this pipeline's runs.")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only runs that ended so.")
@click.option("--since", default=None, metavar="AGE_OR_TIME",
              help="Only runs started since: an age (7d, 12h) or a UTC time (2026-12-01).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run, one per line.")
@click.pass_context
@_database_errors
def history(ctx, url, pipeline, status, since, limit, as_json) -> None:
    """Recent runs, newest first; or a subcommand.

    Every run is recorded (API, CLI, notebook): by default in
    $FLOWYML_HOME/history.db; FLOWYML_HISTORY=off records nothing.
    """
    ctx.obj = url
    if ctx.invoked_subcommand is not None:
        return
    from .queries import read_runs

    rows = read_runs(_engine(url), pipeline, status, _age(since, "--since"), limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps({key: _plain(value) for key, value in row.items()}))
        return
    if not rows:
        click.echo("no runs recorded" + (" that match" if pipeline or status or since else ""))
        return
    header = ("RUN", "PIPELINE", "STATUS", "STARTED (UTC)", "DURATION", "TASKS", "CACHED", "BACKEND", "ERROR")
    table = [header] + [(
        r["run_id"], r["pipeline"], r["status"], r["started_at"].strftime("%Y-%m-%d %H:%M:%S"),
        "" if r["duration_s"] is None else f"{r['duration_s']:.2f}s", _count(r["tasks"]),
        _count(r["cached_tasks"]), r["backend"] or "", (r["error"] or "")[:60],
    ) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


@history.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The run as one JSON object.")
@click.pass_obj
@_database_errors
def show(url, run_id, as_json) -> None:
    """One run in full: where and how it ran, its sources, and every step."""
    from .queries import read_run

    run = read_run(_engine(url), run_id)
    if run is None:
        raise _Usage(f"no run {run_id!r} in the history (flowyml history lists the recent ones)")
    if as_json:
        click.echo(json.dumps({key: _plain(value) for key, value in run.items()}, indent=2))
        return
    steps = run.pop("steps")
    tracebacks = []
    for key in ("run_id", "pipeline", "status", "started_at", "ended_at", "duration_s", "tasks", "cached_tasks",
                "backend", "workers", "host", "pid", "user", "command", "flowyml_version", "dask_version",
                "pandas_version", "report_path", "error"):
        value = run.get(key)
        if value is not None:
            click.echo(f"{key + ':':17}{f'{value:.3f}s' if key == 'duration_s' else _plain(value)}")
    if run.get("params"):
        click.echo(f"{'params:':17}{json.dumps(run['params'])}")
    for name, source in (run.get("sources") or {}).items():
        click.echo(f"{'source:':17}{name}: {source['count']} files, {source['bytes']:,} bytes")
    click.echo("steps:")
    for s in steps:
        rows = "" if s["rows_out"] is None else f", rows {_count(s['rows_in']) or '-'} -> {s['rows_out']}"
        click.echo(f"  {s['name']}: {s['status']}, {s['duration_s'] or 0:.3f}s, {s['tasks']} tasks "
                   f"({s['cached_tasks']} cached), {s['attempts']} attempts{rows}")
        if s["error"]:
            click.echo(f"    {s['error']}")
            tracebacks.append((s["name"], s["traceback"]))
    for name, text in tracebacks:
        if text:
            click.echo(f"\ntraceback of {name}:\n{text.rstrip()}")


@history.command("trends")
@click.argument("pipeline")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="trends.html", show_default=True,
              help="The HTML page to write.")
@click.option("--last", type=click.IntRange(min=1), default=30, show_default=True, help="How many recent runs.")
@click.pass_obj
@_database_errors
def trends(url, pipeline, output, last) -> None:
    """One self-contained HTML page: each step's duration over the last runs, failures, cache hit rates."""
    from pathlib import Path

    from .queries import recent
    from .trends_page import write_trends

    runs, steps = recent(_engine(url), pipeline, last)
    if not runs:
        raise _Usage(f"no run of pipeline {pipeline!r} in the history")
    path = write_trends(pipeline, runs, steps, Path(output))
    click.echo(f"wrote {path} ({len(runs)} runs)")


@history.command("prune")
@click.option("--older-than", default=DEFAULT_RETENTION, show_default=True, metavar="AGE",
              help="Delete the runs started longer ago than this (30d, 12h, 2w).")
@click.pass_obj
@_database_errors
def prune(url, older_than) -> None:
    """Delete old runs (runs still running are kept).

    Runs also prune themselves once a day, by FLOWYML_HISTORY_RETENTION
    (default 90d; 'never' keeps every run).
    """
    from .maintenance import prune as prune_runs

    try:
        age = parse_age(older_than, "--older-than")
    except HistoryConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from exc
    removed = prune_runs(_engine(url), age)
    click.echo(f"removed {removed} runs started more than {older_than} ago")

"""The HTML views of a run: the self-contained report page, and the notebook's compact table.

The page loads nothing from the network: its style sheet and the few lines of
JavaScript that turn the bars' titles into tooltips (``static/report.css``
and ``static/report.js``, package data) are inlined, with the timeline's SVG,
so it can be mailed, attached to a CI job or opened on an air-gapped cluster.
Without JavaScript the bars' ``<title>`` elements still give the browser's own
tooltips.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from flowyml.exceptions import OptionError
from flowyml.report.formatting import Run, esc, fmt_count, fmt_seconds, fmt_started_at, one_line
from flowyml.report.summary import StepRow, step_rows
from flowyml.report.timeline import MIXED_COLOUR, Timeline, draw_timeline, step_colours, task_state

__all__ = ["render_html", "save_report", "to_html_repr"]

_STATUS_CLASSES = {
    "succeeded": "ok", "cached": "cached", "failed": "failed", "skipped": "skipped", "stopped": "skipped",
}


@functools.cache
def _static(name: str) -> str:
    """A file of ``static/`` (the page's style sheet or script), read once."""
    return resources.files("flowyml.report").joinpath("static", name).read_text(encoding="utf-8")


def _status_badge(status: str) -> str:
    css = _STATUS_CLASSES.get(status, "")
    return f'<span class="badge {css}">{esc(status)}</span>'


def _facts(run: Run) -> str:
    facts = [
        ("run", run.get("run_id", "-")),
        ("backend", run.get("backend", "-")),
        ("workers", run.get("max_workers", "-")),
        ("started", fmt_started_at(run.get("started_at"))),
        ("duration", fmt_seconds(run.get("duration_s"))),
    ]
    outputs = run.get("outputs") or []
    if outputs:
        facts.append(("outputs", ", ".join(str(o) for o in outputs)))
    items = [f"<span>{esc(k)} <b>{esc(v)}</b></span>" for k, v in facts]
    link = run.get("dashboard_link")
    if link:
        items.append(f'<span>dashboard <a href="{esc(link)}">{esc(link)}</a></span>')
    return '<div class="facts">' + "".join(items) + "</div>"


def _cards(run: Run, rows: list[StepRow], timeline: Timeline) -> str:
    statuses = Counter(row.status for row in rows)
    tasks = list(run.get("tasks") or ())
    failed_tasks = sum(1 for t in tasks if task_state(t) == "failed")
    cached_tasks = sum(1 for t in tasks if t.get("status") == "cached")
    step_text = " · ".join(f"{n} {s}" for s, n in statuses.most_common()) or "none"
    cards = [
        (fmt_seconds(run.get("duration_s")), "wall time", False),
        (f"{len(rows)}", f"steps: {step_text}", statuses.get("failed", 0) > 0),
        (f"{len(tasks):,}", f"tasks: {failed_tasks:,} failed, {cached_tasks:,} from cache", failed_tasks > 0),
        (f"{timeline.lanes}", "worker lanes", False),
    ]
    if timeline.slots and timeline.span_s > 0:
        # Busy time over the task slots the chart shows (a multi-threaded worker has several).
        use = min(1.0, timeline.busy_s / (timeline.slots * timeline.span_s))
        slots = f"{timeline.slots} task slots, " if timeline.slots != timeline.lanes else ""
        cards.append((f"{use:.0%}", f"utilisation ({slots}{fmt_seconds(timeline.busy_s)} busy)", False))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v{" bad" if bad else ""}">{esc(v)}</div>'
            f'<div class="k">{esc(k)}</div></div>'
            for v, k, bad in cards
        )
        + "</div>"
    )


#: Steps the timeline's legend names; the step table names every step.
MAX_LEGEND_STEPS = 40
#: Steps the step table draws in full (colour, bar, task times); the rest of a
#: larger run are listed as text below it, so a run of 100,000 steps gives a
#: page a browser still opens, and it still names every step.
MAX_TABLE_STEPS = 1000


def _legend(colours: Mapping[str, str], run: Run) -> str:
    tasks = run.get("tasks") or ()
    shown = list(colours.items())[:MAX_LEGEND_STEPS]
    items = [f'<span><i style="background:{c}"></i>{esc(name)}</span>' for name, c in shown]
    if len(colours) > len(shown):
        items.append(f"<span>… and {len(colours) - len(shown):,} more steps (the table below names them)</span>")
    if any(task_state(t) == "failed" for t in tasks):
        items.append('<span><i class="failed"></i>failed task</span>')
    if any(t.get("status") == "cached" for t in tasks):
        items.append('<span><i class="cachedkey"></i>loaded from cache</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def _table(rows: list[StepRow], colours: Mapping[str, str]) -> str:
    longest = max((row.duration_s or 0.0 for row in rows), default=0.0) or 1.0
    rows, rest = rows[:MAX_TABLE_STEPS], rows[MAX_TABLE_STEPS:]
    head = (
        "<tr><th>step</th><th>status</th><th class=n>partitions</th><th class=n>cached</th>"
        "<th class=n>attempts</th><th class=n>duration</th><th class=n>task median</th>"
        "<th class=n>task max</th><th>share of longest</th></tr>"
    )
    body = []
    for row in rows:
        share = 100.0 * (row.duration_s or 0.0) / longest
        body.append(
            "<tr>"
            f'<td class="step"><i style="background:{colours.get(row.name, MIXED_COLOUR)}"></i>'
            f"{esc(row.name)}</td>"
            f"<td>{_status_badge(row.status)}</td>"
            f"<td class=n>{esc(fmt_count(row.partitions))}</td>"
            f"<td class=n>{esc(fmt_count(row.cached))}</td>"
            f"<td class=n>{esc(fmt_count(row.attempts))}</td>"
            f"<td class=n>{esc(fmt_seconds(row.duration_s))}</td>"
            f"<td class=n>{esc(fmt_seconds(row.task_median_s))}</td>"
            f"<td class=n>{esc(fmt_seconds(row.task_max_s))}</td>"
            f'<td><div class="share"><b style="width:{share:.0f}%"></b></div></td>'
            "</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>{_more_steps(rest)}"


def _more_steps(rows: list[StepRow]) -> str:
    """The steps past :data:`MAX_TABLE_STEPS`, as one line of text each, in a collapsed block."""
    if not rows:
        return ""
    width = max(len(row.name) for row in rows)
    lines = [
        f"{row.name:<{width}}  {row.status:<9}  {fmt_count(row.partitions):>10}  {fmt_count(row.cached):>6}"
        f"  {fmt_count(row.attempts):>8}  {fmt_seconds(row.duration_s):>8}"
        for row in rows
    ]
    header = f"{'step':<{width}}  {'status':<9}  {'partitions':>10}  {'cached':>6}  {'attempts':>8}  {'duration':>8}"
    return (
        f"<details><summary>… and {len(rows):,} more steps (the table shows the first "
        f"{MAX_TABLE_STEPS:,}; all are in the JSON report)</summary>"
        f"<pre>{esc(header)}\n{esc(chr(10).join(lines))}</pre></details>"
    )


_MAX_FAILED_TASKS_LISTED = 50


def _errors(run: Run, rows: list[StepRow]) -> str:
    failed_rows = [row for row in rows if row.error or row.traceback]
    failed_tasks = [t for t in run.get("tasks") or () if task_state(t) == "failed"]
    if not failed_rows and not failed_tasks:
        return ""
    parts = ["<section><h2>Errors</h2>"]
    for index, row in enumerate(failed_rows[:_MAX_FAILED_TASKS_LISTED]):
        opened = " open" if index == 0 else ""
        parts.append(
            f"<details{opened}><summary>step <code>{esc(row.name)}</code>: "
            f"{esc(one_line(row.error, 300) or 'failed')}</summary>"
        )
        parts.append(f"<pre>{esc(row.traceback or row.error or '')}</pre></details>")
    if len(failed_rows) > _MAX_FAILED_TASKS_LISTED:
        parts.append(f"<div class=note>… and {len(failed_rows) - _MAX_FAILED_TASKS_LISTED:,} more failed "
                     "steps (the step table names them; tracebacks are in the JSON report)</div>")
    if failed_tasks:
        shown = failed_tasks[:_MAX_FAILED_TASKS_LISTED]
        parts.append(f"<div class=note>{len(failed_tasks):,} failed task(s):</div><ul class=failed-tasks>")
        parts += [
            f"<li><code>{esc(t.get('key'))}</code> on {esc(t.get('worker', '?'))}, "
            f"attempt {esc(t.get('attempts', '?'))}: {esc(one_line(t.get('error'), 240) or 'failed')}</li>"
            for t in shown
        ]
        if len(failed_tasks) > len(shown):
            parts.append(f"<li>… and {len(failed_tasks) - len(shown):,} more (all are in the JSON report)</li>")
        parts.append("</ul>")
    parts.append("</section>")
    return "".join(parts)

def render_html(run: Run, *, extra_html: str | None = None) -> str:
    """One self-contained HTML page describing the run.

    The page has the run's facts, a timeline of every task (one lane per
    worker, one bar per task coloured by step, failed tasks hatched in red,
    tooltips with key, attempts and duration), the step table, and the
    errors with their tracebacks. It references nothing outside itself.

    Parameters
    ----------
    run : dict
        The record ``PipelineResult.to_dict()`` returns.
    extra_html : str, optional
        Trusted HTML appended as a last section (the distributed backend adds
        a link to Dask's performance report); it is not escaped.
    """
    rows = step_rows(run)
    colours = step_colours(run)
    timeline = draw_timeline(run, colours)
    success = bool(run.get("success"))
    title = f"{run.get('pipeline', 'pipeline')} · {'succeeded' if success else 'failed'}"
    if timeline.svg:
        notes = [timeline.note] if timeline.note else []
        if timeline.undrawn_tasks:
            notes.append(f"{timeline.undrawn_tasks:,} task(s) without start/stop times are not drawn.")
        note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
        chart = (
            "<section><h2>Timeline <span class=note>(seconds since the run started; one lane per "
            f"worker)</span></h2>{_legend(colours, run)}{note_html}"
            f'<div class="scroll">{timeline.svg}</div></section>'
        )
    else:
        chart = '<section><h2>Timeline</h2><p class="note">No task ran (nothing to draw).</p></section>'
    badge = _status_badge("succeeded" if success else "failed")
    extra = f"<section>{extra_html}</section>" if extra_html else ""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>\n{_static('report.css')}</style></head><body>"
        f"<header><h1>{esc(run.get('pipeline', 'pipeline'))} {badge}</h1>{_facts(run)}</header>"
        f"<main>{_cards(run, rows, timeline)}{chart}"
        f"<section><h2>Steps</h2>{_table(rows, colours)}</section>"
        f"{_errors(run, rows)}{extra}</main>"
        f"<footer>flowyml run report · {esc(run.get('pipeline', ''))} · run {esc(run.get('run_id', ''))}"
        "</footer>"
        f'<div id="tip"></div><script>\n{_static("report.js")}</script></body></html>\n'
    )


def save_report(run: Run, path: str | os.PathLike[str], *, extra_html: str | None = None) -> Path:
    """Write the run's report to ``path``: ``.html`` (the page) or ``.json`` (the record).

    The file is written to a temporary file beside it and moved into place,
    so a reader never sees half a report. Missing parent folders are created.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    OptionError
        ``path`` ends in anything but ``.html`` or ``.json`` (also a ``ValueError``).
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".html":
        text = render_html(run, extra_html=extra_html)
    elif suffix == ".json":
        # default=str: a stray numpy number or Path in a record must not lose the whole report.
        text = json.dumps(run, indent=2, default=str) + "\n"
    else:
        raise OptionError(
            f"cannot write a run report to {str(target)!r}: the file name must end in "
            "'.html' (a self-contained page) or '.json' (the run record)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


_BADGE_STYLE = {
    "succeeded": "#2e8b57",
    "failed": "#c0392b",
    "cached": "#3a78b5",
    "skipped": "#8c8c8c",
    "stopped": "#8c8c8c",
}


def _inline_badge(status: str) -> str:
    colour = _BADGE_STYLE.get(status, "#5a6478")
    return (
        f'<span style="background:{colour};color:#fff;border-radius:9px;padding:1px 8px;'
        f'font-size:11px;font-weight:600">{esc(status)}</span>'
    )


#: Steps the notebook view lists.
_MAX_REPR_STEPS = 200


def to_html_repr(run: Run) -> str:
    """Compact HTML for ``PipelineResult._repr_html_``: a status badge and the step table.

    Styles are inline (no ``<style>`` block) because notebook viewers such as
    GitHub's strip style sheets from outputs.
    """
    success = bool(run.get("success"))
    cell = 'style="padding:3px 10px;text-align:{};border-bottom:1px solid #e2e8f0;font-size:12px"'
    left, right = cell.format("left"), cell.format("right")
    header = "".join(
        f"<th {right if n in {'partitions', 'cached', 'attempts', 'duration'} else left}>{n}</th>"
        for n in ("step", "status", "partitions", "cached", "attempts", "duration")
    )
    all_rows = step_rows(run)
    rows = "".join(
        f"<tr><td {left}><code>{esc(r.name)}</code></td><td {left}>{_inline_badge(r.status)}</td>"
        f"<td {right}>{esc(fmt_count(r.partitions))}</td><td {right}>{esc(fmt_count(r.cached))}</td>"
        f"<td {right}>{esc(fmt_count(r.attempts))}</td><td {right}>{esc(fmt_seconds(r.duration_s))}</td></tr>"
        for r in all_rows[:_MAX_REPR_STEPS]
    )
    if len(all_rows) > _MAX_REPR_STEPS:  # a notebook cell of 100,000 rows freezes the browser
        rows += (f'<tr><td {left} colspan=6>… and {len(all_rows) - _MAX_REPR_STEPS:,} more steps '
                 "(<code>result.summary()</code> lists them all)</td></tr>")
    failed = [r for r in all_rows if r.error]
    errors = "".join(
        f'<div style="color:#c0392b;font-size:12px;margin-top:4px">{esc(r.name)}: {esc(one_line(r.error))}</div>'
        for r in failed[:_MAX_FAILED_TASKS_LISTED]
    )
    if len(failed) > _MAX_FAILED_TASKS_LISTED:
        errors += (f'<div style="color:#c0392b;font-size:12px;margin-top:4px">… and '
                   f"{len(failed) - _MAX_FAILED_TASKS_LISTED:,} more failed steps</div>")
    workers = run.get("max_workers")
    return (
        '<div class="flowyml-run" style="font-family:sans-serif;font-size:13px">'
        f'<div style="margin-bottom:6px"><b>{esc(run.get("pipeline", "pipeline"))}</b> '
        f"{_inline_badge('succeeded' if success else 'failed')} "
        f'<span style="color:#5a6478">{esc(fmt_seconds(run.get("duration_s")))} · backend '
        f"{esc(run.get('backend', '-'))}{f' · {workers} workers' if workers is not None else ''} · run "
        f"{esc(run.get('run_id', '-'))}</span></div>"
        f'<table style="border-collapse:collapse"><tr>{header}</tr>{rows}</table>{errors}</div>'
    )

"""Run reports: the text summary, a self-contained HTML page, and the notebook view.

Every function here takes the run record that ``PipelineResult.to_dict()``
returns (plain JSON-ready data) and nothing else, so a report can be redrawn
later from a saved ``.json`` file::

    run = json.loads(Path("run.json").read_text())
    save_report(run, "run.html")

The HTML page loads nothing from the network (inline CSS, inline SVG, a few
lines of inline JavaScript for tooltips), so it can be mailed, attached to a
CI job or opened on an air-gapped cluster. Its timeline draws one bar per
task; past ``MAX_BARS`` bars, neighbouring tasks of one step on one worker are
merged (the page says so), which keeps a 10,000-task run around half a
megabyte.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from .exceptions import OptionError

__all__ = ["format_summary", "render_html", "save_report", "to_html_repr"]

Run = Mapping[str, Any]

#: Most bars the timeline draws before it merges neighbouring tasks.
MAX_BARS = 2500
#: Most stacked rows one worker lane gets for tasks that overlap on it
#: (a multi-threaded Dask worker); beyond that, bars overlap.
MAX_ROWS_PER_LANE = 8

# Tableau-10 order without its red: red means "failed" everywhere in the report.
_PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
    "#ff9da7", "#86bcb6", "#bab0ac", "#a0cbe8", "#ffbe7d", "#8cd17d", "#d4a6c8",
    "#b6992d", "#499894", "#d37295", "#79706e",
)  # fmt: skip
_MIXED_COLOUR = "#a0aec0"
_STATUS_CLASSES = {"succeeded": "ok", "cached": "cached", "failed": "failed", "skipped": "skipped", "stopped": "skipped"}


# ---------------------------------------------------------------------------
# Small formatting helpers
# ---------------------------------------------------------------------------


def _fmt_seconds(seconds: float | None) -> str:
    """Human duration: ``0.042s``, ``3.21s``, ``2m 05s``, ``1h 02m``; ``-`` when unknown."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    seconds = float(seconds)
    if seconds < 0.1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _fmt_count(value: Any) -> str:
    return "-" if value is None else str(value)


def _one_line(text: str | None, limit: int = 160) -> str:
    """The first non-empty line of an error message, cut to ``limit`` characters."""
    if not text:
        return ""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _parse_started_at(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _fmt_started_at(value: Any) -> str:
    parsed = _parse_started_at(value)
    if parsed is None:
        return str(value) if value else "-"
    if parsed.utcoffset() == timezone.utc.utcoffset(None):
        return parsed.strftime("%Y-%m-%d %H:%M:%S UTC")
    return parsed.isoformat(sep=" ", timespec="seconds")


def _natural_key(text: str) -> list[Any]:
    """Sort key that puts ``thread-2`` before ``thread-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _task_seconds(task: Mapping[str, Any]) -> float | None:
    start, stop = task.get("start"), task.get("stop")
    if isinstance(start, (int, float)) and isinstance(stop, (int, float)):
        return max(0.0, float(stop) - float(start))
    return None


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------
# The step table, shared by the text summary and the HTML views
# ---------------------------------------------------------------------------


@dataclass
class _StepRow:
    name: str
    status: str
    partitions: Any
    cached: Any
    attempts: Any
    duration_s: float | None
    error: str | None
    traceback: str | None
    task_median_s: float | None = None
    task_max_s: float | None = None


def _step_rows(run: Run) -> list[_StepRow]:
    task_times: dict[str, list[float]] = {}
    for task in run.get("tasks") or ():
        seconds = _task_seconds(task)
        if seconds is not None and task.get("status") != "cached":
            task_times.setdefault(str(task.get("step")), []).append(seconds)
    rows = []
    for name, info in (run.get("steps") or {}).items():
        times = task_times.get(str(name), [])
        rows.append(
            _StepRow(
                name=str(name),
                status=str(info.get("status") or "-"),
                partitions=info.get("partitions"),
                cached=info.get("cached_partitions"),
                attempts=info.get("attempts"),
                duration_s=info.get("duration_s"),
                error=info.get("error"),
                traceback=info.get("traceback"),
                task_median_s=statistics.median(times) if times else None,
                task_max_s=max(times) if times else None,
            )
        )
    return rows


def _headline(run: Run) -> str:
    verdict = "succeeded" if run.get("success") else "FAILED"
    workers = run.get("max_workers")
    workers_text = f", {workers} worker{'s' if workers != 1 else ''}" if workers is not None else ""
    return (
        f"pipeline {str(run.get('pipeline', '?'))!r} {verdict} in {_fmt_seconds(run.get('duration_s'))}"
        f" (backend {run.get('backend', '?')}{workers_text}, run {run.get('run_id', '?')})"
    )


def format_summary(run: Run) -> str:
    """The text table ``PipelineResult.summary()`` prints.

    One row per step (in the run's order) with its status, partitions,
    cached partitions, attempts and duration, under a header line naming the
    pipeline, the verdict, total time, backend and workers; below it, one
    line per failed step with its error.

    >>> print(format_summary({"pipeline": "demo", "run_id": "ab12", "backend": "sync",
    ...     "max_workers": 1, "success": True, "duration_s": 0.5,
    ...     "steps": {"load": {"status": "succeeded", "duration_s": 0.5, "attempts": 1,
    ...                        "partitions": 1, "cached_partitions": 0}}}))
    pipeline 'demo' succeeded in 0.50s (backend sync, 1 worker, run ab12)
    step  status     partitions  cached  attempts  duration
    ----  ---------  ----------  ------  --------  --------
    load  succeeded           1       0         1     0.50s
    """
    header = ("step", "status", "partitions", "cached", "attempts", "duration")
    right_aligned = (False, False, True, True, True, True)
    rows = [
        (
            row.name,
            row.status,
            _fmt_count(row.partitions),
            _fmt_count(row.cached),
            _fmt_count(row.attempts),
            _fmt_seconds(row.duration_s),
        )
        for row in _step_rows(run)
    ]
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, right_aligned)
        )
        return "  ".join(padded).rstrip()

    lines = [_headline(run), line(header), line(["-" * width for width in widths])]
    lines += [line(cells) for cells in rows]
    errors = [(row.name, _one_line(row.error)) for row in _step_rows(run) if row.error]
    if errors:
        lines.append("errors:")
        lines += [f"  {name}: {message}" for name, message in errors]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The timeline (SVG Gantt chart)
# ---------------------------------------------------------------------------


@dataclass
class _Bar:
    """One drawn bar: a task, or a run of neighbouring tasks merged together."""

    start: float
    stop: float
    state: str  # "ok" | "cached" | "failed"
    steps: Counter = field(default_factory=Counter)
    tasks: list[Mapping[str, Any]] = field(default_factory=list)

    def absorb(self, other: _Bar) -> None:
        self.stop = max(self.stop, other.stop)
        self.steps.update(other.steps)
        self.tasks.extend(other.tasks)


_STATE_WORDS = {"ok": "succeeded", "cached": "loaded from cache", "failed": "failed"}


def _task_state(task: Mapping[str, Any]) -> str:
    status = task.get("status")
    if status == "failed" or task.get("error"):
        return "failed"
    return "cached" if status == "cached" else "ok"


def _assign_rows(tasks: list[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Pack one worker's tasks into rows so that tasks running at once do not hide each other."""
    rows: list[list[Mapping[str, Any]]] = []
    row_ends: list[float] = []
    for task in sorted(tasks, key=lambda t: (t["start"], t["stop"])):
        free = next((i for i, end in enumerate(row_ends) if end <= task["start"] + 1e-9), None)
        if free is None and len(rows) < MAX_ROWS_PER_LANE:
            rows.append([])
            row_ends.append(task["stop"])
            free = len(rows) - 1
        elif free is None:
            free = min(range(len(row_ends)), key=row_ends.__getitem__)
        rows[free].append(task)
        row_ends[free] = max(row_ends[free], task["stop"])
    return rows


def _merge_row(row: list[Mapping[str, Any]], bucket_s: float, mix_steps: bool) -> list[_Bar]:
    """Merge consecutive tasks of one row into bars at most ``bucket_s`` wide.

    A bar absorbs the next task only if the result stays within ``bucket_s``
    (so long tasks stay single and the chart keeps its shape), the task has
    the same state (a failed task never hides inside a succeeded bar) and,
    unless ``mix_steps``, the same step. ``bucket_s <= 0`` merges nothing.
    """
    bars: list[_Bar] = []
    for task in row:
        bar = _Bar(task["start"], task["stop"], _task_state(task), Counter([str(task.get("step"))]), [task])
        last = bars[-1] if bars else None
        if (
            last is not None
            and bucket_s > 0
            and last.state == bar.state
            and max(last.stop, bar.stop) - last.start <= bucket_s
            and (mix_steps or set(last.steps) == set(bar.steps))
        ):
            last.absorb(bar)
        else:
            bars.append(bar)
    return bars


def _thin(rows: list[list[Mapping[str, Any]]], seconds_per_px: float) -> tuple[list[list[_Bar]], str]:
    """Bars per row, merged only as much as needed to stay under ``MAX_BARS``; and a note saying how."""
    total = sum(len(row) for row in rows)
    if total <= MAX_BARS:
        return [_merge_row(row, 0.0, False) for row in rows], ""
    bucket_px = 2.0
    while True:
        mix = bucket_px > 32  # a last resort for rows where many steps interleave
        merged = [_merge_row(row, bucket_px * seconds_per_px, mix) for row in rows]
        count = sum(len(bars) for bars in merged)
        if count <= MAX_BARS or bucket_px >= 256:
            break
        bucket_px *= 2
    how = "of any step" if mix else "of one step"
    note = (
        f"{total:,} tasks drawn as {count:,} bars: consecutive tasks {how} on one worker that fit in "
        f"{bucket_px:g} px are merged into one bar (hover it for the count). Failed tasks are never "
        "merged with successful ones."
    )
    return merged, note


def _nice_tick(span: float) -> float:
    """A round tick spacing giving about eight ticks over ``span`` seconds."""
    target = span / 8
    for unit in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400):
        if unit >= target:
            return float(unit)
    if target < 1:
        magnitude = 10 ** math.floor(math.log10(target))
        for factor in (1, 2, 5, 10):
            if factor * magnitude >= target:
                return factor * magnitude
    return 86400.0 * math.ceil(target / 86400)


def _fmt_tick(seconds: float, tick: float) -> str:
    if seconds == 0:
        return "0"
    if tick < 1:
        decimals = max(0, -math.floor(math.log10(tick) + 1e-9))
        return f"{seconds:.{decimals}f}s"
    if tick < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if tick < 3600:
        return f"{minutes}m" if secs == 0 else f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h" if minutes == 0 else f"{hours}h{minutes:02d}m"


def _step_colours(run: Run) -> dict[str, str]:
    names = [str(name) for name in (run.get("steps") or {})]
    names += sorted({str(t.get("step")) for t in run.get("tasks") or ()} - set(names))
    colours = {}
    for index, name in enumerate(names):
        if index < len(_PALETTE):
            colours[name] = _PALETTE[index]
        else:  # golden-angle hues: distinct enough for any number of steps
            colours[name] = f"hsl({(index * 137.508) % 360:.0f},50%,60%)"
    return colours


def _bar_title(bar: _Bar, t0: float, worker: str) -> str:
    if len(bar.tasks) == 1:
        task = bar.tasks[0]
        seconds = _task_seconds(task) or 0.0
        lines = [
            str(task.get("key", task.get("step"))),
            f"{task.get('status', '?')} · attempts {task.get('attempts', '?')} · {_fmt_seconds(seconds)}",
            f"{worker} · {_fmt_seconds(bar.start - t0)} → {_fmt_seconds(bar.stop - t0)}",
        ]
        if task.get("error"):
            lines.append(_one_line(task["error"], 200))
        return "\n".join(lines)
    steps = ", ".join(f"{name} ×{count}" for name, count in bar.steps.most_common(4))
    partitions = [t.get("partition") for t in bar.tasks if isinstance(t.get("partition"), int)]
    span = f" (partitions {min(partitions)}–{max(partitions)})" if partitions else ""
    busy = sum(_task_seconds(t) or 0.0 for t in bar.tasks)
    attempts = max((t.get("attempts") or 1) for t in bar.tasks)
    return "\n".join(
        [
            f"{len(bar.tasks)} merged tasks: {steps}{span}",
            f"{_STATE_WORDS[bar.state]} · most attempts {attempts} · {_fmt_seconds(busy)} busy",
            f"{worker} · {_fmt_seconds(bar.start - t0)} → {_fmt_seconds(bar.stop - t0)}",
        ]
    )


@dataclass
class _Timeline:
    svg: str
    note: str
    lanes: int
    slots: int  # rows over all lanes: the most tasks seen running at once per worker, summed
    drawn_tasks: int
    undrawn_tasks: int
    busy_s: float
    span_s: float


def _run_origin(run: Run, first_start: float) -> float:
    """Time zero of the chart: the run's ``started_at`` when it precedes every task."""
    started = _parse_started_at(run.get("started_at"))
    if started is not None and started.timestamp() <= first_start:
        return started.timestamp()
    return first_start


def _timeline(run: Run, colours: Mapping[str, str]) -> _Timeline:
    all_tasks = list(run.get("tasks") or ())
    tasks = [
        {**t, "start": float(t["start"]), "stop": max(float(t["start"]), float(t["stop"]))}
        for t in all_tasks
        if _task_seconds(t) is not None
    ]
    undrawn = len(all_tasks) - len(tasks)
    if not tasks:
        return _Timeline("", "", 0, 0, 0, undrawn, 0.0, 0.0)
    t0 = _run_origin(run, min(t["start"] for t in tasks))
    t_end = max(t["stop"] for t in tasks)
    if isinstance(run.get("duration_s"), (int, float)):
        t_end = max(t_end, t0 + float(run["duration_s"]))
    span = max(t_end - t0, 1e-6)

    by_worker: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        by_worker.setdefault(str(task.get("worker") or "unknown"), []).append(task)
    lanes = sorted(by_worker, key=_natural_key)

    width, row_h, row_gap, lane_gap, axis_h = 1120, 18, 2, 10, 26
    label_chars = min(30, max(len(name) for name in lanes))
    plot_x = 14 + label_chars * 7
    plot_w = width - plot_x - 16
    px = plot_w / span

    lane_rows = {name: _assign_rows(by_worker[name]) for name in lanes}
    flat_rows = [row for name in lanes for row in lane_rows[name]]
    merged, note = _thin(flat_rows, 1.0 / px)

    height = axis_h + sum(len(lane_rows[n]) * (row_h + row_gap) + lane_gap for n in lanes) + 6
    lanes_svg: list[str] = []  # drawn first, so grid lines show through
    grid: list[str] = []
    parts: list[str] = []
    tick = _nice_tick(span)
    ticks = [i * tick for i in range(int(span / tick) + 1)]
    for value in ticks:
        x = plot_x + value * px
        grid.append(f'<line class="grid" x1="{x:.1f}" y1="{axis_h - 4}" x2="{x:.1f}" y2="{height}"/>')
        grid.append(f'<text class="tick" x="{x:.1f}" y="{axis_h - 9}">{_fmt_tick(value, tick)}</text>')

    y = axis_h
    row_iter = iter(merged)
    step_class = {name: f"s{i}" for i, name in enumerate(colours)}
    for lane_index, name in enumerate(lanes):
        n_rows = len(lane_rows[name])
        lane_h = n_rows * (row_h + row_gap)
        shade = ' class="lane alt"' if lane_index % 2 else ' class="lane"'
        lanes_svg.append(f'<rect{shade} x="0" y="{y - 3}" width="{width}" height="{lane_h + lane_gap - 2}"/>')
        shown = name if len(name) <= label_chars else name[: label_chars - 1] + "…"
        lanes_svg.append(
            f'<text class="lane-label" x="{plot_x - 8}" y="{y + lane_h / 2 + 4:.1f}">'
            f"<title>{_esc(name)}</title>{_esc(shown)}</text>"
        )
        for row_index in range(n_rows):
            bar_y = y + row_index * (row_h + row_gap)
            for bar in next(row_iter):
                x = plot_x + (bar.start - t0) * px
                # A failed task stays at least 3 px wide: it must be findable among 10,000.
                w = max(3.0 if bar.state == "failed" else 1.0, (bar.stop - bar.start) * px)
                classes = ["bar", step_class.get(next(iter(bar.steps)), "mixed") if len(bar.steps) == 1 else "mixed"]
                if bar.state != "ok":
                    classes.append(bar.state)
                if len(bar.tasks) > 1:
                    classes.append("merged")
                parts.append(
                    f'<rect class="{" ".join(classes)}" x="{x:.1f}" y="{bar_y}" width="{w:.1f}" '
                    f'height="{row_h}"><title>{_esc(_bar_title(bar, t0, name))}</title></rect>'
                )
                if bar.state == "failed":  # hatching shows failure even on a 1 px bar's neighbours
                    parts.append(
                        f'<rect class="hatch" x="{x:.1f}" y="{bar_y}" width="{w:.1f}" height="{row_h}"/>'
                    )
        y += lane_h + lane_gap

    style_rules = "".join(f".{cls}{{fill:{colours[name]}}}" for name, cls in step_class.items())
    svg = (
        f'<svg class="timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="task timeline, one lane per worker">'
        f"<style>{style_rules}.mixed{{fill:{_MIXED_COLOUR}}}</style>"
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#c0392b" fill-opacity="0.55"/>'
        "</pattern></defs>" + "".join(lanes_svg + grid + parts) + "</svg>"
    )
    busy = sum(t["stop"] - t["start"] for t in tasks if t.get("status") != "cached")
    return _Timeline(svg, note, len(lanes), len(flat_rows), len(tasks), undrawn, busy, span)


# ---------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------

_CSS = """
:root{--ink:#1a202c;--muted:#5a6478;--line:#e2e8f0;--bg:#f7f8fb;--ok:#2e8b57;--bad:#c0392b;
--cached:#3a78b5;--skipped:#8c8c8c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#1f2937;color:#f9fafb;padding:22px 32px 18px}
header h1{margin:0 0 6px;font-size:22px;font-weight:600;display:flex;gap:12px;align-items:center}
header .facts{color:#cbd5e0;font-size:13px;display:flex;flex-wrap:wrap;gap:6px 22px}
header .facts b{color:#f9fafb;font-weight:600}
header a{color:#90cdf4}
main{padding:20px 32px 40px;max-width:1220px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:0 0 18px}
h2{font-size:15px;margin:0 0 12px;font-weight:600}
.badge{display:inline-block;border-radius:999px;padding:1px 10px;font-size:12px;font-weight:600;
letter-spacing:.02em;color:#fff;background:var(--muted);vertical-align:middle}
.badge.ok{background:var(--ok)}.badge.failed{background:var(--bad)}
.badge.cached{background:var(--cached)}.badge.skipped{background:var(--skipped)}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 18px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .k{color:var(--muted);font-size:12px}
.card .v.bad{color:var(--bad)}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:0 0 10px;font-size:12px;color:var(--muted)}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:14px;height:10px;border-radius:2px}
.legend i.failed{background:repeating-linear-gradient(45deg,#fff 0 2px,#c0392b 2px 4px);
outline:2px solid var(--bad)}
.legend i.cachedkey{background:#4e79a7;opacity:.35;outline:1px dashed #4e79a7}
.note{font-size:12px;color:var(--muted);margin:0 0 8px}
.scroll{overflow-x:auto}
svg.timeline{display:block;max-width:100%;height:auto;font-family:inherit}
svg .grid{stroke:#e2e8f0;stroke-width:1}
svg .tick{fill:#718096;font-size:11px;text-anchor:middle}
svg .lane{fill:#ffffff}svg .lane.alt{fill:#f5f7fa}
svg .lane-label{fill:#2d3748;font-size:12px;text-anchor:end;
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
svg rect.bar.failed{stroke:#c0392b;stroke-width:2}
svg rect.bar.cached{fill-opacity:.35;stroke:#4a5568;stroke-dasharray:3 2;stroke-width:.8}
svg rect.bar{stroke:#ffffff;stroke-width:.6}svg rect.merged{stroke:none}
svg rect.hatch{fill:url(#hatch);pointer-events:none}
svg rect.bar:hover{stroke:#1a202c;stroke-width:1.5}
table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:var(--muted);font-weight:600;border-bottom:2px solid var(--line);padding:6px 10px}
td{border-bottom:1px solid var(--line);padding:6px 10px;vertical-align:middle}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.step{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:nowrap}
td.step i{width:10px;height:10px;border-radius:2px;display:inline-block;margin-right:8px}
.share{background:#edf2f7;border-radius:3px;height:8px;width:120px;position:relative}
.share b{position:absolute;left:0;top:0;bottom:0;background:#4a5568;border-radius:3px}
details{border:1px solid #f5c6c0;background:#fff8f7;border-radius:6px;margin:0 0 10px}
summary{cursor:pointer;padding:8px 12px;font-weight:600;color:#7b1f16}
summary code{font-weight:400;color:var(--ink)}
pre{margin:0;padding:10px 14px;overflow:auto;max-height:420px;font-size:12px;line-height:1.4;
background:#fdfdfd;border-top:1px solid #f5c6c0;white-space:pre}
ul.failed-tasks{margin:6px 0 0;padding-left:20px;font-size:12.5px}
ul.failed-tasks code{font-size:12px}
footer{color:var(--muted);font-size:12px;padding:0 32px 30px}
#tip{position:fixed;pointer-events:none;background:#1a202c;color:#f7fafc;font-size:12px;
padding:6px 9px;border-radius:5px;white-space:pre;display:none;z-index:9;max-width:520px;
box-shadow:0 4px 14px rgba(0,0,0,.25)}
"""

# Moves each bar's <title> into a styled tooltip that appears at once; without
# JavaScript the <title> elements still give the browser's own tooltips.
_JS = """
(function(){var tip=document.getElementById('tip');
document.querySelectorAll('svg.timeline rect,svg.timeline text').forEach(function(r){
var t=r.querySelector('title');if(!t)return;r.dataset.tip=t.textContent;t.remove();});
document.addEventListener('mousemove',function(e){var r=e.target.closest?e.target.closest('[data-tip]'):null;
if(!r){tip.style.display='none';return;}tip.textContent=r.dataset.tip;tip.style.display='block';
var x=e.clientX+14,y=e.clientY+14;if(x+tip.offsetWidth>innerWidth)x=e.clientX-tip.offsetWidth-10;
if(y+tip.offsetHeight>innerHeight)y=e.clientY-tip.offsetHeight-10;tip.style.left=x+'px';tip.style.top=y+'px';});
})();
"""


def _status_badge(status: str) -> str:
    css = _STATUS_CLASSES.get(status, "")
    return f'<span class="badge {css}">{_esc(status)}</span>'


def _facts(run: Run) -> str:
    facts = [
        ("run", run.get("run_id", "-")),
        ("backend", run.get("backend", "-")),
        ("workers", run.get("max_workers", "-")),
        ("started", _fmt_started_at(run.get("started_at"))),
        ("duration", _fmt_seconds(run.get("duration_s"))),
    ]
    outputs = run.get("outputs") or []
    if outputs:
        facts.append(("outputs", ", ".join(str(o) for o in outputs)))
    items = [f"<span>{_esc(k)} <b>{_esc(v)}</b></span>" for k, v in facts]
    link = run.get("dashboard_link")
    if link:
        items.append(f'<span>dashboard <a href="{_esc(link)}">{_esc(link)}</a></span>')
    return '<div class="facts">' + "".join(items) + "</div>"


def _cards(run: Run, rows: list[_StepRow], timeline: _Timeline) -> str:
    statuses = Counter(row.status for row in rows)
    tasks = list(run.get("tasks") or ())
    failed_tasks = sum(1 for t in tasks if _task_state(t) == "failed")
    cached_tasks = sum(1 for t in tasks if t.get("status") == "cached")
    step_text = " · ".join(f"{n} {s}" for s, n in statuses.most_common()) or "none"
    cards = [
        (_fmt_seconds(run.get("duration_s")), "wall time", False),
        (f"{len(rows)}", f"steps: {step_text}", statuses.get("failed", 0) > 0),
        (f"{len(tasks):,}", f"tasks: {failed_tasks:,} failed, {cached_tasks:,} from cache", failed_tasks > 0),
        (f"{timeline.lanes}", "worker lanes", False),
    ]
    if timeline.slots and timeline.span_s > 0:
        # Busy time over the task slots the chart shows (a multi-threaded worker has several).
        use = min(1.0, timeline.busy_s / (timeline.slots * timeline.span_s))
        slots = f"{timeline.slots} task slots, " if timeline.slots != timeline.lanes else ""
        cards.append((f"{use:.0%}", f"utilisation ({slots}{_fmt_seconds(timeline.busy_s)} busy)", False))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v{" bad" if bad else ""}">{_esc(v)}</div>'
            f'<div class="k">{_esc(k)}</div></div>'
            for v, k, bad in cards
        )
        + "</div>"
    )


def _legend(colours: Mapping[str, str], run: Run) -> str:
    tasks = run.get("tasks") or ()
    items = [f'<span><i style="background:{c}"></i>{_esc(name)}</span>' for name, c in colours.items()]
    if any(_task_state(t) == "failed" for t in tasks):
        items.append('<span><i class="failed"></i>failed task</span>')
    if any(t.get("status") == "cached" for t in tasks):
        items.append('<span><i class="cachedkey"></i>loaded from cache</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def _table(rows: list[_StepRow], colours: Mapping[str, str]) -> str:
    longest = max((row.duration_s or 0.0 for row in rows), default=0.0) or 1.0
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
            f'<td class="step"><i style="background:{colours.get(row.name, _MIXED_COLOUR)}"></i>'
            f"{_esc(row.name)}</td>"
            f"<td>{_status_badge(row.status)}</td>"
            f"<td class=n>{_esc(_fmt_count(row.partitions))}</td>"
            f"<td class=n>{_esc(_fmt_count(row.cached))}</td>"
            f"<td class=n>{_esc(_fmt_count(row.attempts))}</td>"
            f"<td class=n>{_esc(_fmt_seconds(row.duration_s))}</td>"
            f"<td class=n>{_esc(_fmt_seconds(row.task_median_s))}</td>"
            f"<td class=n>{_esc(_fmt_seconds(row.task_max_s))}</td>"
            f'<td><div class="share"><b style="width:{share:.0f}%"></b></div></td>'
            "</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


_MAX_FAILED_TASKS_LISTED = 50


def _errors(run: Run, rows: list[_StepRow]) -> str:
    failed_rows = [row for row in rows if row.error or row.traceback]
    failed_tasks = [t for t in run.get("tasks") or () if _task_state(t) == "failed"]
    if not failed_rows and not failed_tasks:
        return ""
    parts = ["<section><h2>Errors</h2>"]
    for index, row in enumerate(failed_rows):
        opened = " open" if index == 0 else ""
        parts.append(
            f"<details{opened}><summary>step <code>{_esc(row.name)}</code>: "
            f"{_esc(_one_line(row.error, 300) or 'failed')}</summary>"
        )
        parts.append(f"<pre>{_esc(row.traceback or row.error or '')}</pre></details>")
    if failed_tasks:
        shown = failed_tasks[:_MAX_FAILED_TASKS_LISTED]
        parts.append(f"<div class=note>{len(failed_tasks):,} failed task(s):</div><ul class=failed-tasks>")
        parts += [
            f"<li><code>{_esc(t.get('key'))}</code> on {_esc(t.get('worker', '?'))}, "
            f"attempt {_esc(t.get('attempts', '?'))}: {_esc(_one_line(t.get('error'), 240) or 'failed')}</li>"
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
    rows = _step_rows(run)
    colours = _step_colours(run)
    timeline = _timeline(run, colours)
    success = bool(run.get("success"))
    title = f"{run.get('pipeline', 'pipeline')} · {'succeeded' if success else 'failed'}"
    if timeline.svg:
        notes = [timeline.note] if timeline.note else []
        if timeline.undrawn_tasks:
            notes.append(f"{timeline.undrawn_tasks:,} task(s) without start/stop times are not drawn.")
        note_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
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
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_esc(run.get('pipeline', 'pipeline'))} {badge}</h1>{_facts(run)}</header>"
        f"<main>{_cards(run, rows, timeline)}{chart}"
        f"<section><h2>Steps</h2>{_table(rows, colours)}</section>"
        f"{_errors(run, rows)}{extra}</main>"
        f"<footer>flowyml run report · {_esc(run.get('pipeline', ''))} · run {_esc(run.get('run_id', ''))}"
        "</footer>"
        f'<div id="tip"></div><script>{_JS}</script></body></html>\n'
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


# ---------------------------------------------------------------------------
# Jupyter
# ---------------------------------------------------------------------------

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
        f'font-size:11px;font-weight:600">{_esc(status)}</span>'
    )


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
    rows = "".join(
        f"<tr><td {left}><code>{_esc(r.name)}</code></td><td {left}>{_inline_badge(r.status)}</td>"
        f"<td {right}>{_esc(_fmt_count(r.partitions))}</td><td {right}>{_esc(_fmt_count(r.cached))}</td>"
        f"<td {right}>{_esc(_fmt_count(r.attempts))}</td><td {right}>{_esc(_fmt_seconds(r.duration_s))}</td></tr>"
        for r in _step_rows(run)
    )
    errors = "".join(
        f'<div style="color:#c0392b;font-size:12px;margin-top:4px">{_esc(r.name)}: {_esc(_one_line(r.error))}</div>'
        for r in _step_rows(run)
        if r.error
    )
    workers = run.get("max_workers")
    return (
        '<div class="flowyml-run" style="font-family:sans-serif;font-size:13px">'
        f'<div style="margin-bottom:6px"><b>{_esc(run.get("pipeline", "pipeline"))}</b> '
        f"{_inline_badge('succeeded' if success else 'failed')} "
        f'<span style="color:#5a6478">{_esc(_fmt_seconds(run.get("duration_s")))} · backend '
        f"{_esc(run.get('backend', '-'))}{f' · {workers} workers' if workers is not None else ''} · run "
        f"{_esc(run.get('run_id', '-'))}</span></div>"
        f'<table style="border-collapse:collapse"><tr>{header}</tr>{rows}</table>{errors}</div>'
    )

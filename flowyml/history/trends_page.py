"""``flowyml history trends``: one self-contained HTML page on a pipeline's recent runs.

- each step's duration over the last runs, one line per step, its failures
  marked with a red cross;
- each run's status and cache hit rate (cached tasks / tasks);
- a table per step: last and median duration, failures, cache hit rate.

Plain SVG drawn here: the page needs no script, no network, and prints.
"""

from __future__ import annotations

import html
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["write_trends"]

#: Colours of the step lines, in turn (Okabe-Ito: told apart by colour-blind readers too).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STATUS_COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "interrupted": "#ef6c00", "lost": "#6d4c41",
                  "running": "#1565c0"}

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 880, 320, 72, 20, 16, 40

#: Step statuses without a duration of their own: no point on the chart, a gap in the line.
_NOT_RUN = ("skipped", "stopped")

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.meta { color: #666; } table { border-collapse: collapse; } td, th { padding: 3px 10px; text-align: right; }
th { border-bottom: 1px solid #ccc; } td:first-child, th:first-child { text-align: left; }
.legend span { display: inline-block; margin-right: 14px; } .swatch { width: 12px; height: 12px;
  display: inline-block; margin-right: 4px; vertical-align: -1px; }
.failed { color: #c62828; } svg text { font: 11px system-ui, sans-serif; fill: #555; }
"""


def write_trends(pipeline: str, runs: list[dict[str, Any]], steps: list[dict[str, Any]], path: Path) -> Path:
    """Write the page for ``runs`` (oldest first) and their ``steps`` to ``path``; its path."""
    page = render_trends(pipeline, runs, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)  # a reader never sees half a page
    return path


def render_trends(pipeline: str, runs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> str:
    name = html.escape(pipeline)
    if not runs:
        body = f"<p>No run of {name} in the history yet.</p>"
    else:
        order = [r["run_id"] for r in runs]
        by_step: dict[str, dict[str, dict[str, Any]]] = {}
        for s in steps:
            by_step.setdefault(s["name"], {})[s["run_id"]] = s
        first, last = runs[0]["started_at"], runs[-1]["started_at"]
        failed = sum(r["status"] == "failed" for r in runs)
        body = (
            f'<p class="meta">{len(runs)} runs from {_time(first)} to {_time(last)}: '
            f"{failed} failed. Times are UTC.</p>"
            "<h2>Step durations</h2>" + _duration_chart(order, by_step)
            + "<h2>Runs and cache hit rate</h2>" + _runs_chart(runs)
            + "<h2>Steps</h2>" + _step_table(order, by_step)
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>flowyml trends: {name}</title><style>{_STYLE}</style></head>"
        f"<body><h1>Pipeline {name}: trends</h1>{body}</body></html>"
    )


def _time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else html.escape(str(value))


def _x(i: int, n: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + (span / 2 if n == 1 else span * i / (n - 1))


def _duration_chart(order: list[str], by_step: dict[str, dict[str, dict[str, Any]]]) -> str:
    durations = [s["duration_s"] or 0.0 for runs in by_step.values() for s in runs.values()]
    top = max(durations, default=0.0) or 1.0
    plot_h = HEIGHT - TOP - BOTTOM

    def y(seconds: float) -> float:
        return TOP + plot_h * (1 - seconds / top)

    parts = [f'<svg role="img" aria-label="step durations" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}">']
    for k in range(5):  # the y axis: seconds
        value = top * k / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#eee"/><text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f"{_seconds(value)}</text>")
    parts.append(f'<text x="{(WIDTH + LEFT) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f"runs, oldest to newest ({len(order)})</text>")
    legend = []
    for n, (step, runs) in enumerate(by_step.items()):
        colour = PALETTE[n % len(PALETTE)]
        label = html.escape(step)
        legend.append(f'<span><i class="swatch" style="background:{colour}"></i>{label}</span>')
        points = [(i, runs[run_id]) for i, run_id in enumerate(order)
                  if run_id in runs and runs[run_id]["status"] not in _NOT_RUN]
        for segment in _consecutive(points):  # a run the step did not run in breaks its line
            line = " ".join(f"{_x(i, len(order)):.1f},{y(s['duration_s'] or 0.0):.1f}" for i, s in segment)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}">'
                         f"<title>{label}</title></polyline>")
        for i, s in points:
            cx, cy = _x(i, len(order)), y(s["duration_s"] or 0.0)
            tip = html.escape(f"{step}, run {s['run_id']}: {_seconds(s['duration_s'] or 0.0)}, {s['status']}")
            if s["status"] == "failed":
                parts.append(f'<path class="failure" d="M{cx - 5:.1f},{cy - 5:.1f} l10,10 m0,-10 l-10,10" '
                             f'stroke="#c62828" stroke-width="2.5"><title>{tip}</title></path>')
            else:
                parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"><title>{tip}</title>'
                             "</circle>")
    parts.append("</svg>")
    return f'<div class="legend">{"".join(legend)}</div>' + "".join(parts)


def _runs_chart(runs: list[dict[str, Any]]) -> str:
    height, plot_h = 150, 100
    parts = [f'<svg role="img" aria-label="runs and cache hit rate" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}">',
             f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">100%</text>'
             f'<text x="{LEFT - 6}" y="{TOP + plot_h + 4}" text-anchor="end">0%</text>']
    bar = max(2.0, min(24.0, (WIDTH - LEFT - RIGHT) / max(len(runs), 1) * 0.6))
    for i, r in enumerate(runs):
        rate = _hit_rate(r.get("cached_tasks"), r.get("tasks"))
        cx = _x(i, len(runs))
        colour = STATUS_COLOURS.get(r["status"], "#999")
        tip = html.escape(f"run {r['run_id']} {_time(r['started_at'])}: {r['status']}, "
                          f"cache hit rate {_percent(rate)}, {_seconds(r.get('duration_s') or 0.0)}")
        h = plot_h * (rate or 0.0)
        parts.append(f'<rect class="run {html.escape(r["status"])}" x="{cx - bar / 2:.1f}" '
                     f'y="{TOP + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="#90a4ae">'
                     f"<title>{tip}</title></rect>"
                     f'<circle cx="{cx:.1f}" cy="{TOP + plot_h + 14}" r="5" fill="{colour}"><title>{tip}</title>'
                     "</circle>")
    parts.append("</svg>")
    key = "".join(f'<span><i class="swatch" style="background:{c}"></i>{s}</span>'
                  for s, c in STATUS_COLOURS.items())
    return "".join(parts) + f'<div class="legend">bars: cache hit rate; dots: status. {key}</div>'


def _step_table(order: list[str], by_step: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = ["<table><tr><th>step</th><th>last</th><th>median</th><th>runs</th><th>failed</th>"
            "<th>cache hit rate</th><th>rows out (last)</th></tr>"]
    for step, runs in by_step.items():
        ordered = [runs[run_id] for run_id in order if run_id in runs]
        durations = [s["duration_s"] or 0.0 for s in ordered if s["status"] not in ("cached", "skipped")]
        failures = sum(s["status"] == "failed" for s in ordered)
        last = ordered[-1]
        rate = _hit_rate(sum(s["cached_tasks"] or 0 for s in ordered), sum(s["tasks"] or 0 for s in ordered))
        rows_out = "" if last["rows_out"] is None else f"{last['rows_out']:,}"
        rows.append(
            f"<tr><td>{html.escape(step)}</td><td>{_seconds(last['duration_s'] or 0.0)}</td>"
            f"<td>{_seconds(statistics.median(durations)) if durations else ''}</td><td>{len(ordered)}</td>"
            f'<td class="{"failed" if failures else ""}">{failures}</td><td>{_percent(rate)}</td>'
            f"<td>{rows_out}</td></tr>"
        )
    return "".join(rows) + "</table>"


def _consecutive(points: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """``points`` split where a run index is missing."""
    segments: list[list[tuple[int, Any]]] = []
    for point in points:
        if segments and segments[-1][-1][0] == point[0] - 1:
            segments[-1].append(point)
        else:
            segments.append([point])
    return segments


def _seconds(value: float) -> str:
    """A duration as people read it: 850 µs, 12.5 ms, 3.42 s, 2 min 05 s."""
    if value == 0:
        return "0"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    if value < 60:
        return f"{value:.3g} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s"


def _hit_rate(cached: int | None, tasks: int | None) -> float | None:
    return (cached or 0) / tasks if tasks else None


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"

"""The timeline: an SVG chart of every task, one lane per worker, one bar per task.

Past :data:`MAX_BARS` bars, neighbouring tasks of one step on one worker are
merged (the page says so), which keeps the page of a run with many thousands
of tasks small.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowyml.report.formatting import Run, esc, fmt_seconds, natural_key, one_line, parse_started_at, task_seconds

__all__ = ["MAX_BARS", "MAX_ROWS_PER_LANE", "MIXED_COLOUR", "Timeline", "draw_timeline", "step_colours", "task_state"]

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
MIXED_COLOUR = "#a0aec0"


@dataclass
class Bar:
    """One drawn bar: a task, or a run of neighbouring tasks merged together."""

    start: float
    stop: float
    state: str  # "ok" | "cached" | "failed"
    steps: Counter = field(default_factory=Counter)
    tasks: list[Mapping[str, Any]] = field(default_factory=list)

    def absorb(self, other: Bar) -> None:
        self.stop = max(self.stop, other.stop)
        self.steps.update(other.steps)
        self.tasks.extend(other.tasks)


_STATE_WORDS = {"ok": "succeeded", "cached": "loaded from cache", "failed": "failed"}


def task_state(task: Mapping[str, Any]) -> str:
    status = task.get("status")
    if status == "failed" or task.get("error"):
        return "failed"
    return "cached" if status == "cached" else "ok"


def _assign_rows(tasks: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
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


#: A task as the merging passes read it: (start, stop, state, step).
_Prepared = tuple[float, float, str, str]


def _prepare(row: list[Mapping[str, Any]]) -> list[_Prepared]:
    """What merging compares, read once per task rather than once per pass."""
    return [(task["start"], task["stop"], task_state(task), str(task.get("step"))) for task in row]


def _count_bars(row: list[_Prepared], bucket_s: float, mix_steps: bool, limit: int) -> int:
    """How many bars :func:`_merge_row` would draw for ``row``; stops counting past ``limit``.

    It allocates nothing, and a bucket that leaves too many bars is given up
    as soon as that is certain: trying several buckets on a run of 100,000
    tasks then costs little more than drawing one.
    """
    count = 0
    start = stop = 0.0
    state = step = ""
    for t_start, t_stop, t_state, t_step in row:
        if (
            count
            and t_state == state
            and (t_stop if t_stop > stop else stop) - start <= bucket_s
            and (mix_steps or t_step == step)
        ):
            if t_stop > stop:
                stop = t_stop
            continue
        count += 1
        if count > limit:
            return count
        start, stop, state, step = t_start, t_stop, t_state, t_step
    return count


def _merge_row(row: list[Mapping[str, Any]], bucket_s: float, mix_steps: bool,
               prepared: list[_Prepared] | None = None) -> list[Bar]:
    """Merge consecutive tasks of one row into bars at most ``bucket_s`` wide.

    A bar absorbs the next task only if the result stays within ``bucket_s``
    (so long tasks stay single and the chart keeps its shape), the task has
    the same state (a failed task never hides inside a succeeded bar) and,
    unless ``mix_steps``, the same step. ``bucket_s <= 0`` merges nothing.
    """
    bars: list[Bar] = []
    last: Bar | None = None
    last_step = ""
    for task, (start, stop, state, step) in zip(row, prepared or _prepare(row)):
        if (
            last is not None
            and bucket_s > 0
            and last.state == state
            and max(last.stop, stop) - last.start <= bucket_s
            and (mix_steps or step == last_step)
        ):
            last.stop = max(last.stop, stop)
            last.tasks.append(task)
            last.steps[step] += 1
            continue
        last = Bar(start, stop, state, Counter({step: 1}), [task])
        last_step = step
        bars.append(last)
    return bars


def _thin(rows: list[list[Mapping[str, Any]]], seconds_per_px: float) -> tuple[list[list[Bar]], str]:
    """Bars per row, merged only as much as needed to stay under ``MAX_BARS``; and a note saying how."""
    total = sum(len(row) for row in rows)
    prepared = [_prepare(row) for row in rows]
    if total <= MAX_BARS:
        return [_merge_row(row, 0.0, False, ready) for row, ready in zip(rows, prepared)], ""
    bucket_px = 2.0
    while True:  # the narrowest bucket that fits; only counted, bars are built once below
        mix = bucket_px > 32  # a last resort for rows where many steps interleave
        count = 0
        for ready in prepared:
            count += _count_bars(ready, bucket_px * seconds_per_px, mix, MAX_BARS - count)
            if count > MAX_BARS:
                break
        if count <= MAX_BARS or bucket_px >= 256:
            break
        bucket_px *= 2
    merged = [_merge_row(row, bucket_px * seconds_per_px, mix, ready) for row, ready in zip(rows, prepared)]
    count = sum(len(bars) for bars in merged)
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
    minutes, secs = divmod(round(seconds), 60)
    if tick < 3600:
        return f"{minutes}m" if secs == 0 else f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h" if minutes == 0 else f"{hours}h{minutes:02d}m"


def step_colours(run: Run) -> dict[str, str]:
    names = [str(name) for name in (run.get("steps") or {})]
    names += sorted({str(t.get("step")) for t in run.get("tasks") or ()} - set(names))
    colours = {}
    for index, name in enumerate(names):
        if index < len(_PALETTE):
            colours[name] = _PALETTE[index]
        else:  # golden-angle hues: distinct enough for any number of steps
            colours[name] = f"hsl({(index * 137.508) % 360:.0f},50%,60%)"
    return colours


def _bar_title(bar: Bar, t0: float, worker: str) -> str:
    if len(bar.tasks) == 1:
        task = bar.tasks[0]
        seconds = task_seconds(task) or 0.0
        lines = [
            str(task.get("key", task.get("step"))),
            f"{task.get('status', '?')} · attempts {task.get('attempts', '?')} · {fmt_seconds(seconds)}",
            f"{worker} · {fmt_seconds(bar.start - t0)} → {fmt_seconds(bar.stop - t0)}",
        ]
        if task.get("error"):
            lines.append(one_line(task["error"], 200))
        return "\n".join(lines)
    steps = ", ".join(f"{name} ×{count}" for name, count in bar.steps.most_common(4))
    partitions = [p for t in bar.tasks if isinstance(p := t.get("partition"), int)]
    span = f" (partitions {min(partitions)}–{max(partitions)})" if partitions else ""
    busy = sum(task_seconds(t) or 0.0 for t in bar.tasks)
    attempts = max((t.get("attempts") or 1) for t in bar.tasks)
    return "\n".join(
        [
            f"{len(bar.tasks)} merged tasks: {steps}{span}",
            f"{_STATE_WORDS[bar.state]} · most attempts {attempts} · {fmt_seconds(busy)} busy",
            f"{worker} · {fmt_seconds(bar.start - t0)} → {fmt_seconds(bar.stop - t0)}",
        ]
    )


@dataclass
class Timeline:
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
    started = parse_started_at(run.get("started_at"))
    if started is not None and started.timestamp() <= first_start:
        return started.timestamp()
    return first_start


def draw_timeline(run: Run, colours: Mapping[str, str]) -> Timeline:
    all_tasks = list(run.get("tasks") or ())
    tasks = [
        {**t, "start": float(t["start"]), "stop": max(float(t["start"]), float(t["stop"]))}
        for t in all_tasks
        if task_seconds(t) is not None
    ]
    undrawn = len(all_tasks) - len(tasks)
    if not tasks:
        return Timeline("", "", 0, 0, 0, undrawn, 0.0, 0.0)
    t0 = _run_origin(run, min(t["start"] for t in tasks))
    t_end = max(t["stop"] for t in tasks)
    if isinstance(run.get("duration_s"), (int, float)):
        t_end = max(t_end, t0 + float(run["duration_s"]))
    span = max(t_end - t0, 1e-6)

    by_worker: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        by_worker.setdefault(str(task.get("worker") or "unknown"), []).append(task)
    lanes = sorted(by_worker, key=natural_key)

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
    used: dict[str, None] = {}  # the classes drawn: a rule per step of a 100,000-step run would outweigh its bars
    for lane_index, name in enumerate(lanes):
        n_rows = len(lane_rows[name])
        lane_h = n_rows * (row_h + row_gap)
        shade = ' class="lane alt"' if lane_index % 2 else ' class="lane"'
        lanes_svg.append(f'<rect{shade} x="0" y="{y - 3}" width="{width}" height="{lane_h + lane_gap - 2}"/>')
        shown = name if len(name) <= label_chars else name[: label_chars - 1] + "…"
        lanes_svg.append(
            f'<text class="lane-label" x="{plot_x - 8}" y="{y + lane_h / 2 + 4:.1f}">'
            f"<title>{esc(name)}</title>{esc(shown)}</text>"
        )
        for row_index in range(n_rows):
            bar_y = y + row_index * (row_h + row_gap)
            for bar in next(row_iter):
                x = plot_x + (bar.start - t0) * px
                # A failed task stays at least 3 px wide: it must be findable among thousands of bars.
                w = max(3.0 if bar.state == "failed" else 1.0, (bar.stop - bar.start) * px)
                step_css = step_class.get(next(iter(bar.steps)), "mixed") if len(bar.steps) == 1 else "mixed"
                used[step_css] = None
                classes = ["bar", step_css]
                if bar.state != "ok":
                    classes.append(bar.state)
                if len(bar.tasks) > 1:
                    classes.append("merged")
                parts.append(
                    f'<rect class="{" ".join(classes)}" x="{x:.1f}" y="{bar_y}" width="{w:.1f}" '
                    f'height="{row_h}"><title>{esc(_bar_title(bar, t0, name))}</title></rect>'
                )
                if bar.state == "failed":  # hatching shows failure even on a 1 px bar's neighbours
                    parts.append(
                        f'<rect class="hatch" x="{x:.1f}" y="{bar_y}" width="{w:.1f}" height="{row_h}"/>'
                    )
        y += lane_h + lane_gap

    style_rules = "".join(f".{cls}{{fill:{colours[name]}}}" for name, cls in step_class.items() if cls in used)
    svg = (
        f'<svg class="timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="task timeline, one lane per worker">'
        f"<style>{style_rules}.mixed{{fill:{MIXED_COLOUR}}}</style>"
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#c0392b" fill-opacity="0.55"/>'
        "</pattern></defs>" + "".join(lanes_svg + grid + parts) + "</svg>"
    )
    busy = sum(t["stop"] - t["start"] for t in tasks if t.get("status") != "cached")
    return Timeline(svg, note, len(lanes), len(flat_rows), len(tasks), undrawn, busy, span)

"""The step table: one row per step, as text (``PipelineResult.summary()``) and for the HTML views."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowyml.report.formatting import Run, fmt_count, fmt_seconds, one_line, task_seconds

__all__ = ["StepRow", "format_summary", "step_rows"]


@dataclass
class StepRow:
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


def step_rows(run: Run) -> list[StepRow]:
    task_times: dict[str, list[float]] = {}
    for task in run.get("tasks") or ():
        seconds = task_seconds(task)
        if seconds is not None and task.get("status") != "cached":
            task_times.setdefault(str(task.get("step")), []).append(seconds)
    rows = []
    for name, info in (run.get("steps") or {}).items():
        times = task_times.get(str(name), [])
        rows.append(
            StepRow(
                name=str(name),
                status=str(info.get("status") or "-"),
                partitions=_partitions_cell(info),
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


def _partitions_cell(info: dict[str, Any]) -> Any:
    """A step's partitions; for a ``split_every`` tree (a whole step of many tasks), its task count."""
    partitions = info.get("partitions")
    tasks = info.get("tasks") or 0
    if partitions is None and not info.get("per_partition") and tasks > 1:
        return f"tree: {tasks} tasks"
    return partitions


def _headline(run: Run) -> str:
    verdict = "succeeded" if run.get("success") else "FAILED"
    workers = run.get("max_workers")
    workers_text = f", {workers} worker{'s' if workers != 1 else ''}" if workers is not None else ""
    return (
        f"pipeline {str(run.get('pipeline', '?'))!r} {verdict} in {fmt_seconds(run.get('duration_s'))}"
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
            fmt_count(row.partitions),
            fmt_count(row.cached),
            fmt_count(row.attempts),
            fmt_seconds(row.duration_s),
        )
        for row in step_rows(run)
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
    errors = [(row.name, one_line(row.error)) for row in step_rows(run) if row.error]
    if errors:
        lines.append("errors:")
        lines += [f"  {name}: {message}" for name, message in errors]
    return "\n".join(lines)

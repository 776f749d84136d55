"""How the report shows numbers, times and text: shared by the summary, the timeline and the page."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "Run",
    "esc",
    "fmt_count",
    "fmt_seconds",
    "fmt_started_at",
    "natural_key",
    "one_line",
    "parse_started_at",
    "task_seconds",
]

#: A run record, as ``PipelineResult.to_dict()`` returns it.
Run = Mapping[str, Any]


def fmt_seconds(seconds: float | None) -> str:
    """Human duration: ``0.042s``, ``3.21s``, ``2m 05s``, ``1h 02m``; ``-`` when unknown."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    seconds = float(seconds)
    if seconds < 0.1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_count(value: Any) -> str:
    return "-" if value is None else str(value)


def one_line(text: str | None, limit: int = 160) -> str:
    """The first non-empty line of an error message, cut to ``limit`` characters."""
    if not text:
        return ""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_started_at(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def fmt_started_at(value: Any) -> str:
    parsed = parse_started_at(value)
    if parsed is None:
        return str(value) if value else "-"
    if parsed.utcoffset() == UTC.utcoffset(None):
        return parsed.strftime("%Y-%m-%d %H:%M:%S UTC")
    return parsed.isoformat(sep=" ", timespec="seconds")


def natural_key(text: str) -> list[Any]:
    """Sort key that puts ``thread-2`` before ``thread-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def task_seconds(task: Mapping[str, Any]) -> float | None:
    start, stop = task.get("start"), task.get("stop")
    if isinstance(start, (int, float)) and isinstance(stop, (int, float)):
        return max(0.0, float(stop) - float(start))
    return None


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)

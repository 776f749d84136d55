"""The run report: text summary, JSON and HTML files, the notebook view.

Run records are built by ``make_run``, a small list scheduler that places
tasks on workers the way a Dask run would, so the report sees realistic
timings: overlapping steps, a failed partition with retries, cached tasks.
"""

from __future__ import annotations

import html
import itertools
import json
import random
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from flowyml.exceptions import OptionError
from flowyml.report import format_summary, render_html, save_report, to_html_repr

RUN_START = 1764460741.0  # 2025-11-29T23:59:01Z

EVIL_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "pipeline.py", line 12, in enrich\n'
    "    raise ValueError(\"bad fare <script>alert('x')</script> & more\")\n"
    "ValueError: bad fare <script>alert('x')</script> & more"
)


def make_run(
    partitions: int = 12,
    workers: int = 3,
    *,
    fail_partition: int | None = 7,
    cached: int = 3,
    seed: int = 0,
    worker_names: str = "process-{}",
) -> dict:
    """A run record of pipeline 'trips': load_zones, clean (per partition, some cached),
    enrich (per partition, one partition may fail), zone_stats, fare_by_zone (skipped on failure)."""
    rng = random.Random(seed)
    names = [worker_names.format(12340 + i) for i in range(workers)]
    free_at = {name: RUN_START + 0.05 for name in names}
    tasks: list[dict] = []

    def place(step, partition, duration, status="succeeded", attempts=1, error=None, after=0.0):
        worker = min(names, key=lambda n: free_at[n])
        start = max(free_at[worker], after)
        stop = start + duration
        free_at[worker] = stop + 0.002
        key = repr((step, partition)) if partition is not None else step
        tasks.append(
            {"key": key, "step": step, "partition": partition, "status": status, "attempts": attempts,
             "start": start, "stop": stop, "worker": worker, "error": error}
        )
        return stop

    zones_done = place("load_zones", None, 0.3)
    clean_done = {}
    for p in range(partitions):
        if p < cached:
            clean_done[p] = place("clean", p, 0.004, status="cached")
        else:
            clean_done[p] = place("clean", p, rng.uniform(0.4, 1.1))
    failed = fail_partition is not None and fail_partition < partitions
    for p in range(partitions):
        if failed and p == fail_partition:
            place("enrich", p, 0.5, status="failed", attempts=3, error="ValueError: bad fare <script>",
                  after=max(clean_done[p], zones_done))
        else:
            place("enrich", p, rng.uniform(0.2, 0.6), after=max(clean_done[p], zones_done))
    place("zone_stats", None, 0.8, after=zones_done)
    end = max(t["stop"] for t in tasks)
    if not failed:
        end = place("fare_by_zone", None, 0.6, after=end)

    def step_info(name, status, n, per_partition, **extra):
        own = [t for t in tasks if t["step"] == name]
        duration = (max(t["stop"] for t in own) - min(t["start"] for t in own)) if own else 0.0
        info = {"status": status, "duration_s": round(duration, 3),
                "attempts": max((t["attempts"] for t in own), default=0), "partitions": n,
                "cached_partitions": sum(t["status"] == "cached" for t in own),
                "per_partition": per_partition, "error": None, "traceback": None}
        info.update(extra)
        return info

    steps = {
        "load_zones": step_info("load_zones", "succeeded", 1, False),
        "clean": step_info("clean", "succeeded", partitions, True),
        "enrich": step_info("enrich", "failed" if failed else "succeeded", partitions, True,
                            **({"error": "ValueError: bad fare <script>alert('x')</script> & more",
                                "traceback": EVIL_TRACEBACK} if failed else {})),
        "zone_stats": step_info("zone_stats", "succeeded", 1, False),
        "fare_by_zone": step_info("fare_by_zone", "skipped" if failed else "succeeded", 1, False),
    }
    if failed:
        steps["fare_by_zone"].update(duration_s=None, attempts=0)
    return {
        "pipeline": "trips", "run_id": "3f2a9c1b", "backend": "process", "max_workers": workers,
        "success": not failed, "started_at": "2025-11-29T23:59:01.000000+00:00",
        "duration_s": round(end - RUN_START + 0.05, 3), "dashboard_link": None,
        "steps": steps, "tasks": tasks, "outputs": ["fare_by_zone", "zone_stats"],
    }


# ---------------------------------------------------------------------------
# Text summary
# ---------------------------------------------------------------------------


def test_summary_lists_every_step_with_its_status_and_the_failure():
    run = make_run()
    text = format_summary(run)
    lines = text.splitlines()
    assert lines[0].startswith("pipeline 'trips' FAILED in ")
    assert "backend process" in lines[0] and "3 workers" in lines[0] and "3f2a9c1b" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:3 + len(run["steps"])]}
    assert list(rows) == list(run["steps"])  # topological order kept
    for name, info in run["steps"].items():
        assert rows[name][1] == info["status"]
    assert rows["clean"][2:4] == ["12", "3"]  # partitions, cached
    assert rows["enrich"][4] == "3"  # attempts
    assert rows["fare_by_zone"][-1] == "-"  # skipped: no duration
    assert lines[-2] == "errors:"
    assert lines[-1].startswith("  enrich: ValueError: bad fare")
    # Columns line up: every row has the header's width for the fixed columns.
    header = lines[1]
    assert all(len(line) == len(header) for line in lines[3:3 + len(run["steps"])])


def test_summary_of_a_successful_run_has_no_error_section():
    text = format_summary(make_run(fail_partition=None))
    assert "succeeded in" in text.splitlines()[0]
    assert "errors:" not in text
    assert "FAILED" not in text


# ---------------------------------------------------------------------------
# save_report
# ---------------------------------------------------------------------------


def test_json_report_round_trips(tmp_path):
    run = make_run()
    written = save_report(run, tmp_path / "nested" / "run.json")
    assert written == tmp_path / "nested" / "run.json"
    assert json.loads(written.read_text()) == run
    assert [p.name for p in written.parent.iterdir()] == ["run.json"]  # no temp file left


def test_html_report_is_written_and_replaces_an_old_one(tmp_path):
    target = tmp_path / "run.html"
    target.write_text("old report")
    save_report(make_run(), target)
    text = target.read_text()
    assert text.startswith("<!DOCTYPE html>") and "old report" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html"]


@pytest.mark.parametrize("name", ["run.txt", "run", "run.htm", "run.json.gz"])
def test_unknown_report_suffix_is_an_error_naming_path_and_choices(tmp_path, name):
    with pytest.raises(OptionError) as info:
        save_report(make_run(), tmp_path / name)
    message = str(info.value)
    assert name in message and ".html" in message and ".json" in message
    assert list(tmp_path.iterdir()) == []


def test_uppercase_suffix_is_accepted(tmp_path):
    path = save_report(make_run(), tmp_path / "RUN.JSON")
    assert json.loads(path.read_text())["run_id"] == "3f2a9c1b"


# ---------------------------------------------------------------------------
# HTML content
# ---------------------------------------------------------------------------


def _timeline_svg(page: str) -> str:
    match = re.search(r'<svg class="timeline".*?</svg>', page, re.S)
    assert match, "no timeline svg in the page"
    return match.group(0)


def _task_bars(svg: str) -> list[str]:
    """The bars of the timeline (rects with a tooltip), not lane backgrounds or hatching."""
    return re.findall(r"<rect class=\"[^\"]*\"[^>]*><title>(.*?)</title></rect>", svg, re.S)


def test_html_is_self_contained():
    run = make_run()
    run["dashboard_link"] = "http://127.0.0.1:8787/status"
    page = render_html(run, extra_html='<a href="file:///tmp/dask-report.html">Dask performance report</a>')
    assert "<script src" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page
    assert not re.search(r"(src|srcset|xlink:href)\s*=", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    # The only web address is the dashboard link the run record carries: a link, not a load.
    assert re.findall(r"https?://[^\"'<\s]+", page) == ["http://127.0.0.1:8787/status"] * 2
    assert 'href="http://127.0.0.1:8787/status"' in page
    assert page.rstrip().endswith("</html>")
    assert "Dask performance report" in page  # extra_html appended


def test_html_has_one_bar_per_task_with_key_attempts_and_duration():
    run = make_run()
    svg = _timeline_svg(render_html(run))
    bars = _task_bars(svg)
    assert len(bars) == len(run["tasks"])
    keys = Counter(title.splitlines()[0] for title in bars)
    assert keys == Counter(html.escape(t["key"], quote=True) for t in run["tasks"])
    enrich_failed = next(t for t in bars if "failed" in t and "enrich" in t)
    assert "attempts 3" in enrich_failed and "0.50s" in enrich_failed
    # Failed tasks are marked (red outline class and hatching) and only they are.
    assert len(re.findall(r'<rect class="[^"]*\bfailed\b', svg)) == 1
    assert len(re.findall(r'<rect class="hatch"', svg)) == 1


def test_html_has_one_lane_per_worker_in_natural_order():
    run = make_run(partitions=20, workers=12, worker_names="thread-{}")
    for task in run["tasks"]:  # names thread-0 .. thread-11
        task["worker"] = f"thread-{int(task['worker'].split('-')[1]) - 12340}"
    svg = _timeline_svg(render_html(run))
    labels = re.findall(r'<text class="lane-label"[^>]*><title>[^<]*</title>([^<]*)</text>', svg)
    used = {t["worker"] for t in run["tasks"]}
    assert labels == sorted(used, key=lambda s: int(s.split("-")[1]))


def test_html_escapes_tracebacks_and_names():
    run = make_run()
    run["pipeline"] = "trips<b>"
    page = render_html(run)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "trips&lt;b&gt;" in page and "trips<b>" not in page
    assert 'File &quot;pipeline.py&quot;, line 12, in enrich' in page  # the traceback itself is shown
    # The only <script> block is the report's own tooltip code.
    assert page.count("<script") == 1


def test_html_shows_summary_table_and_facts():
    run = make_run()
    page = render_html(run)
    table = re.search(r"<table>.*?</table>", page, re.S).group(0)
    assert table.count("<tr>") == len(run["steps"]) + 1
    for name, info in run["steps"].items():
        assert re.search(rf"{name}</td><td><span class=\"badge [a-z]*\">{info['status']}</span>", table)
    assert "2025-11-29 23:59:01 UTC" in page
    assert "fare_by_zone, zone_stats" in page


def test_run_without_tasks_renders():
    run = make_run()
    run["tasks"] = []
    page = render_html(run)
    assert "No task ran" in page and "<svg" not in page


def _render_seconds(run: dict) -> float:
    # CPU time of this process: what other processes on a shared machine do
    # stretches wall time by any factor, not the work this process does.
    begin = time.process_time()
    render_html(run)
    return time.process_time() - begin


def test_large_run_is_fast_small_and_says_bars_were_merged():
    run = make_run(partitions=5000, workers=8, fail_partition=4321, cached=200)
    assert len(run["tasks"]) > 10_000
    # Time grows with the tasks, not faster: ten times the tasks of a run of the same
    # shape, rendered alternately (best of three), take about ten times as long
    # (a pass over all tasks per task would take a hundred).
    tenth = make_run(partitions=500, workers=8, fail_partition=432, cached=20)
    small, large = [], []
    for _ in range(5):
        small.append(_render_seconds(tenth))
        large.append(_render_seconds(run))
    assert min(large) < 30 * min(small), f"{len(run['tasks'])} tasks: {large}s, a tenth of them: {small}s"
    page = render_html(run)
    assert len(page.encode()) < 1_500_000, f"page is {len(page.encode()):,} bytes"
    svg = _timeline_svg(page)
    bars = _task_bars(svg)
    assert 100 < len(bars) <= 2500
    assert "merged into one bar" in page
    # Every task is accounted for: single bars plus the counts in merged bars' tooltips.
    counted = sum(int(m.group(1)) if (m := re.match(r"(\d+) merged tasks", b)) else 1 for b in bars)
    assert counted == len(run["tasks"])
    # The failed task is still visible on its own.
    assert len(re.findall(r'<rect class="[^"]*\bfailed\b', svg)) == 1


def many_steps_run(steps: int, workers: int = 2, failed: int = 0) -> dict:
    """A run of ``steps`` one-task steps (``s0`` ... and a fan-in), as a 100,000-step pipeline reports one."""
    tasks, info = [], {}
    for i in range(steps):
        name = f"s{i}" if i < steps - 1 else "combine"
        start = RUN_START + 0.05 + i * 1e-4 / workers
        status = "failed" if i < failed else "succeeded"
        tasks.append({"key": name, "step": name, "partition": None, "status": status, "attempts": 1,
                      "start": start, "stop": start + 5e-5, "worker": f"process-{i % workers}",
                      "error": "ValueError: no" if i < failed else None})
        info[name] = {"status": status, "duration_s": 5e-5, "attempts": 1, "partitions": None,
                      "cached_partitions": 0, "per_partition": False,
                      "error": "ValueError: no" if i < failed else None,
                      "traceback": "Traceback ...\nValueError: no" if i < failed else None}
    return {"pipeline": "wide", "run_id": "5c0a1e00", "backend": "sync", "max_workers": workers,
            "success": not failed, "started_at": "2025-11-29T23:59:01.000000+00:00",
            "duration_s": steps * 1e-4, "dashboard_link": None, "steps": info, "tasks": tasks,
            "outputs": ["combine"]}


def test_html_of_20000_steps_stays_small_and_names_every_step():
    # Before: every step had a full table row, a legend entry and a style rule,
    # 8 MB for 20,000 steps (about 40 MB at 100,000, a page no browser opens).
    run = many_steps_run(20_000, failed=80)
    page = render_html(run)
    assert len(page.encode()) < 2_500_000, f"page is {len(page.encode()):,} bytes"
    named = set(re.findall(r"\b(s\d+|combine)\b", page))
    assert named >= set(run["steps"]), f"{len(set(run['steps']) - named)} steps not named"
    assert "more steps (the table shows the first" in page
    assert 0 < len(_task_bars(_timeline_svg(page))) <= 2500
    legend = re.search(r'<div class="legend">.*?</div>', page, re.S).group(0)
    assert legend.count("<i ") <= 42 and "more steps" in legend
    # Tracebacks of the first failures only; the rest are counted and in the JSON report.
    assert page.count("<details") <= 50 + 1 and "more failed steps" in page
    assert page.count("{fill:") < 100  # style rules for the classes drawn, not one per step
    assert to_html_repr(run).count("<tr>") <= 202


def test_thinning_the_timeline_builds_bars_once_not_once_per_task_per_try(monkeypatch):
    # Before: each tried bucket width built a Bar (with a Counter) per task, up to
    # eight tries: the page of a 100,000-task run cost three times more per task
    # than that of a 1,000-task run. Now tries only count; bars are built once.
    from flowyml.report import timeline

    built = Counter()
    original = timeline.Bar.__init__

    def counting(self, *args, **kwargs):
        built["bars"] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(timeline.Bar, "__init__", counting)
    run = many_steps_run(20_000)
    page = render_html(run)
    drawn = len(_task_bars(_timeline_svg(page)))
    assert "merged into one bar" in page
    assert built["bars"] == drawn, (built["bars"], drawn)


def test_html_repr_is_compact_and_has_badge_and_table():
    run = make_run()
    snippet = to_html_repr(run)
    assert "<html" not in snippet and "<script" not in snippet and "<style" not in snippet
    assert ">failed</span>" in snippet
    assert snippet.count("<tr>") == len(run["steps"]) + 1
    assert "&lt;script&gt;" in snippet and "<script>" not in snippet


# ---------------------------------------------------------------------------
# A real browser draws the page
# ---------------------------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of raw pixel bytes, bytes per pixel) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    rows, previous = [], bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        kind, row = line[0], bytearray(line[1:])
        for i in range(stride):
            left = row[i - bpp] if i >= bpp else 0
            up = previous[i]
            upper_left = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                row[i] = (row[i] + pred) & 0xFF
        rows.append(bytes(row))
        previous = row
    return width, height, rows, bpp


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html_path: Path, png_path: Path, profile: Path, size: str = "1200,900") -> None:
    browser = _chromium()
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
         f"--window-size={size}", html_path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
@pytest.mark.timeout(180)
def test_chromium_draws_the_timeline(tmp_path):
    run = make_run(partitions=16, workers=4)
    page = save_report(run, tmp_path / "run.html")
    png = tmp_path / "shot.png"
    screenshot(page, png, tmp_path / "profile")
    width, height, rows, bpp = _decode_png(png.read_bytes())
    assert (width, height) == (1200, 900)
    # The timeline sits below the header and cards: count colours in that band.
    band = rows[300:600]
    colours = Counter(row[x:x + 3] for row in band for x in range(0, len(row), bpp * 2))
    palette_hits = {
        name: colour for name, colour in {
            "load_zones": b"\x4e\x79\xa7", "clean": b"\xf2\x8e\x2b", "enrich": b"\x59\xa1\x4f",
        }.items() if colours[colour] > 50
    }
    assert len(colours) > 20, f"only {len(colours)} colours: the page looks blank"
    assert set(palette_hits) >= {"clean", "enrich"}, f"step colours not drawn: {palette_hits}"
    background = colours.most_common(1)[0][1]
    assert background < 0.9 * sum(colours.values()), "timeline area is almost one colour"


def test_tasks_running_at_once_on_one_worker_get_their_own_rows():
    run = make_run(partitions=12, workers=4)
    for task in run["tasks"]:  # one distributed worker with four threads
        task["worker"] = "tcp://127.0.0.1:40123"
    svg = _timeline_svg(render_html(run))
    bars = re.findall(r'<rect class="bar [^"]*" x="([\d.]+)" y="(\d+)" width="([\d.]+)"', svg)
    assert len(bars) == len(run["tasks"])
    by_row: dict[str, list[tuple[float, float]]] = {}
    for x, y, width in bars:
        by_row.setdefault(y, []).append((float(x), float(x) + float(width)))
    assert len(by_row) == 4  # four tasks ran at once
    for spans in by_row.values():  # within a row no two bars overlap (beyond rounding)
        spans.sort()
        assert all(a[1] <= b[0] + 1.1 for a, b in itertools.pairwise(spans))

"""Named pipelines and steps the tests share (importable by worker processes)."""

from __future__ import annotations

import time
from pathlib import Path

from flowyml import Pipeline, step


class Part:
    """One partition of :class:`Numbers`: loading it gives its index."""

    def __init__(self, index: int) -> None:
        self.index = index

    def load(self) -> int:
        return self.index


class Numbers:
    """A source of ``count`` partitions 0, 1, ..., ``count - 1`` (no files needed)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def partitions(self) -> list[Part]:
        return [Part(i) for i in range(self.count)]


@step(inputs=["numbers"], per_partition=True)
def hold(n, marker_dir=""):
    """Say that this partition started, then wait (at most 60 s) until the test lets it finish."""
    Path(marker_dir, f"started-{n}").touch()
    deadline = time.monotonic() + 60
    while not Path(marker_dir, "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never said go")
        time.sleep(0.01)
    return n


@step
def process_chunk(chunk_id):
    return f"processed_{chunk_id}"


def parallel_processing(n: int = 5) -> Pipeline:
    """The "Parallel Execution" page's example."""
    pipeline = Pipeline("parallel_processing")
    for i in range(n):
        pipeline.add_step(process_chunk, name=f"chunk_{i}", params={"chunk_id": i})
    return pipeline


@step(outputs=["numbers"])
def numbers(count=10):
    return list(range(count))


@step(inputs=["numbers"], outputs=["evens", "odds"])
def split(numbers):
    return [n for n in numbers if n % 2 == 0], [n for n in numbers if n % 2]


@step(inputs=["numbers"], outputs=["low", "high"])
def halves(numbers, cut=5):
    return {"high": [n for n in numbers if n >= cut], "low": [n for n in numbers if n < cut]}


@step(inputs=["evens", "odds", "low", "high"], outputs=["report"])
def report(*parts, scale=1):
    return [scale * sum(part) for part in parts]


def diamond() -> Pipeline:
    """numbers -> (split, halves) -> report: tuple and dict outputs, *args fan-in."""
    return Pipeline("diamond").add_step(numbers).add_step(split).add_step(halves).add_step(report)


@step(inputs=["numbers"], outputs=["total"])
def total(numbers):
    return sum(numbers)


@step(inputs=["total"], outputs=["checked"])
def fail_if_big(total, limit=10):
    if total > limit:
        raise ValueError(f"total {total} exceeds {limit}")
    return total


@step(inputs=["checked"], outputs=["after_failure"])
def after(checked):
    return checked + 1


@step(inputs=["numbers"], outputs=["independent"])
def independent(numbers):
    return len(numbers)


def failing(limit: int | None = None) -> Pipeline:
    """numbers -> total -> fail_if_big (fails, unless ``limit`` lets it pass) -> after; numbers -> independent."""
    return (
        Pipeline("failing")
        .add_step(numbers)
        .add_step(total)
        .add_step(fail_if_big, params=None if limit is None else {"limit": limit})
        .add_step(after)
        .add_step(independent)
    )


def meet_then_burn(n: int, marker_dir: str, tag: int, others: int = 1) -> int:
    """Wait until ``others`` more of these calls are running at the same time, then burn(n).

    Each call leaves a marker file; a call returns only once it has seen
    ``others`` markers besides its own, so the first one proves that calls ran
    at once (in other processes, when each process runs one call at a time).
    """
    mine = os.path.join(marker_dir, f"running-{tag}")
    open(mine, "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marker_dir)) < 1 + others:
        if time.monotonic() > deadline:
            raise TimeoutError(f"call {tag} never ran at the same time as {others} other(s)")
        time.sleep(0.005)
    return burn(n)


def burn(n: int) -> int:
    """Pure-Python CPU work (holds the GIL)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def add(a, b):
    return a + b


@step
def touch(path):
    """A step with a visible side effect: proves whether anything ran."""
    with open(path, "w") as stream:
        stream.write("ran")
    return path


# -- partitioned data ------------------------------------------------------------

import pandas as pd  # noqa: E402


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips):
    return trips.dropna(subset=["fare"])


@step(inputs=["clean"], outputs=["fare_by_zone"])
def fare_by_zone(clean):
    return clean.groupby("pickup_zone")["fare"].mean()


@step(inputs=["clean"], outputs=["rows_per_partition"], per_partition=True)
def count_rows(clean):
    return len(clean)


@step(inputs=["clean"], outputs=["tagged"], per_partition=True)
def tag_partition(clean):
    from flowyml import current_task

    return clean.assign(partition=current_task().partition)


@step(inputs=["clean"], outputs=["checked"], per_partition=True)
def fail_on_partition(clean, bad=1):
    from flowyml import current_task

    if current_task().partition == bad:
        raise RuntimeError(f"partition {bad} is bad")
    return clean


def trips_pipeline(source, output=None) -> Pipeline:
    from flowyml import write_parquet

    pipeline = Pipeline("trips").add_source("trips", source).add_step(clean).add_step(fare_by_zone)
    if output is not None:
        pipeline.add_step(write_parquet(output, input="clean"))
    return pipeline


def pandas_fare_by_zone(frames: list[pd.DataFrame]) -> pd.Series:
    whole = pd.concat(frames)
    return whole.dropna(subset=["fare"]).groupby("pickup_zone")["fare"].mean()


# -- reliability and caching ---------------------------------------------------------
# Steps count their calls in files (one line per call): they may run in worker
# processes, so a counter in memory would not survive.

import os  # noqa: E402


def record(log_dir, name: str) -> int:
    """Append one line to ``log_dir/name``; return how many lines it now has."""
    path = os.path.join(log_dir, name)
    with open(path, "a") as stream:
        stream.write(f"{os.getpid()} {time.time()}\n")
    with open(path) as stream:
        return len(stream.read().splitlines())


def calls(log_dir, name: str) -> int:
    """How many times ``record(log_dir, name)`` ran."""
    path = os.path.join(log_dir, name)
    if not os.path.exists(path):
        return 0
    with open(path) as stream:
        return len(stream.read().splitlines())


def pids(log_dir, name: str) -> list[int]:
    """The process id of each ``record(log_dir, name)`` call, in order."""
    path = os.path.join(log_dir, name)
    with open(path) as stream:
        return [int(line.split()[0]) for line in stream.read().splitlines()]


def write_parts(folder, parts, rows: int = 3) -> None:
    """CSV files ``part_<i>.csv`` with columns part, value (one file per part)."""
    os.makedirs(folder, exist_ok=True)
    for part in parts:
        frame = pd.DataFrame({"part": [part] * rows, "value": [part * 10 + i for i in range(rows)]})
        frame.to_csv(os.path.join(folder, f"part_{part:03d}.csv"), index=False)


def _part(rows) -> int:
    return int(rows["part"].iloc[0])


@step(inputs=["rows"], outputs=["doubled"], per_partition=True)
def flaky_double(rows, log_dir="", fail_parts=(), failures=1):
    """Fails its first ``failures`` attempts on the parts in ``fail_parts``."""
    attempt = record(log_dir, f"flaky-{_part(rows)}")
    if _part(rows) in fail_parts and attempt <= failures:
        raise ConnectionError(f"part {_part(rows)}: attempt {attempt} lost its connection")
    return rows.assign(value=rows["value"] * 2)


@step(inputs=["rows"], outputs=["waited"], per_partition=True)
def overrun_first(rows, log_dir="", release=""):
    """Attempt 1 overruns any timeout (until ``release`` exists); attempt 2 returns at once.

    Attempt 1 writes its pid when it starts and ``overrun-ended-<part>`` when it ends.
    """
    from flowyml import current_task

    record(log_dir, f"overrun-{_part(rows)}")
    # flowyml's own count: on a loaded machine an attempt's process can be killed before this
    # line ever runs, so counting the records here would be one behind.
    if current_task().attempt == 1:
        with open(os.path.join(log_dir, f"overrun-pid-{_part(rows)}"), "w") as stream:
            stream.write(str(os.getpid()))
        deadline = time.time() + 60
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.02)
        record(log_dir, f"overrun-ended-{_part(rows)}")
    return rows


@step
def overrun_always(log_dir=""):
    """Writes its pid, then runs far past any timeout."""
    with open(os.path.join(log_dir, f"always-pid-{record(log_dir, 'always')}"), "w") as stream:
        stream.write(str(os.getpid()))
    time.sleep(60)


@step(inputs=["rows"], outputs=["counted"], per_partition=True)
def counted(rows, log_dir=""):
    record(log_dir, f"counted-{_part(rows)}")
    return rows


def _die(how: str) -> None:
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        import ctypes

        ctypes.string_at(0)
    if how == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@step(inputs=["counted"], outputs=["total"])
def die_then_sum(counted, log_dir="", how="exit", deaths=1):
    """Kills its own process on its first ``deaths`` attempts, then sums the values."""
    if record(log_dir, "die") <= deaths:
        _die(how)
    return int(counted["value"].sum())


@step(inputs=["rows"], outputs=["side"])
def side_branch(rows):
    return len(rows)


@step(inputs=["total"], outputs=["after_total"])
def after_total(total):
    return total + 1


def _wait_for(log_dir, name: str, what: str) -> None:
    """Poll (60 s at most) until ``record(log_dir, name)`` has run."""
    deadline = time.monotonic() + 60
    while not calls(log_dir, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never happened")
        time.sleep(0.01)


@step(outputs=["slow_done"])
def slow_sibling(log_dir=""):
    """Marks that it started; once its sibling is failing, works half a second more, marks that it finished."""
    record(log_dir, "sibling-started")
    _wait_for(log_dir, "failing", "the sibling's failure")
    time.sleep(0.5)  # the work still running when the failure comes
    record(log_dir, "sibling-done")
    return "done"


@step(outputs=["doomed"])
def fail_when_sibling_runs(log_dir=""):
    _wait_for(log_dir, "sibling-started", "the sibling's start")
    record(log_dir, "failing")
    raise RuntimeError("failed while the sibling was running")


# Caching: a small monthly job. ``parse`` and ``clean_v1`` log one line per
# partition they compute, named after the month, so a test sees what ran.

@step(inputs=["months"], outputs=["parsed"], per_partition=True)
def parse(months, log_dir=""):
    record(log_dir, f"parse-{_part(months)}")
    return months.assign(amount=months["value"] / 10)


@step(inputs=["parsed"], outputs=["clean"], per_partition=True)
def clean_v1(parsed, log_dir="", broken_flag=""):
    record(log_dir, f"clean-{_part(parsed)}")
    if broken_flag and os.path.exists(broken_flag):
        raise ValueError(f"part {_part(parsed)}: the bug is still there")
    return parsed[parsed["value"] % 2 == 0]


@step(inputs=["parsed"], outputs=["clean"], per_partition=True)
def clean_v2(parsed, log_dir="", broken_flag=""):
    record(log_dir, f"clean-{_part(parsed)}")
    return parsed[parsed["value"] % 2 == 1]


@step(inputs=["clean"], outputs=["summary"])
def summarize(clean, log_dir="", scale=1):
    record(log_dir, "summary")
    return clean.groupby("part")["amount"].sum() * scale


def monthly_job(folder, log_dir, out, cache_dir, clean_step=clean_v1, broken_flag="") -> Pipeline:
    """read_csv(folder/*.csv) -> parse -> clean -> (summarize, write_parquet(out))."""
    from flowyml import read_csv, write_parquet

    return (
        Pipeline("monthly", cache_dir=cache_dir)
        .add_source("months", read_csv(os.path.join(folder, "*.csv")))
        .add_step(parse, params={"log_dir": log_dir})
        .add_step(clean_step, name="clean", params={"log_dir": log_dir, "broken_flag": broken_flag})
        .add_step(summarize, params={"log_dir": log_dir})
        .add_step(write_parquet(out, input="clean"))
    )


def pandas_monthly(folder, keep=0) -> pd.Series:
    """What ``monthly_job`` computes, in plain pandas (keep=0: clean_v1, 1: clean_v2)."""
    import glob

    frames = [pandas_read_csv(path) for path in sorted(glob.glob(os.path.join(folder, "*.csv")))]
    whole = pd.concat(frames)
    whole = whole.assign(amount=whole["value"] / 10)
    return whole[whole["value"] % 2 == keep].groupby("part")["amount"].sum()


# -- schemas ---------------------------------------------------------------------------


def as_flowyml_reads(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (read by pandas) with the dtypes a flowyml CSV source gives it: integers
    ``Int64`` and booleans ``boolean`` in every partition (docs/data-contracts.md)."""
    casts = {name: "Int64" if pd.api.types.is_integer_dtype(dtype) else "boolean"
             for name, dtype in frame.dtypes.items()
             if pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)}
    frame = frame.astype(casts) if casts else frame
    if pd.api.types.is_integer_dtype(frame.index.dtype) and not isinstance(frame.index, pd.RangeIndex):
        frame.index = frame.index.astype("Int64")
    return frame


def pandas_read_csv(path, **options) -> pd.DataFrame:
    """``pandas.read_csv`` with flowyml's CSV dtypes (see ``as_flowyml_reads``)."""
    return as_flowyml_reads(pd.read_csv(path, **options))


# -- the run history ----------------------------------------------------------------


@step(inputs=["rows"], outputs=["kept"], per_partition=True)
def keep_above(rows, threshold=0):
    return rows[rows["value"] > threshold]


@step(inputs=["kept"], outputs=["summary"])
def summarize_kept(kept):
    return kept.groupby("part", as_index=False)["value"].sum()


def history_pipeline(folder, cache_dir=None, threshold: int = 12) -> Pipeline:
    """CSV parts -> keep_above (per partition, drops rows) -> summarize_kept: rows in and out differ."""
    from flowyml import read_csv

    return (Pipeline("history_demo", cache_dir=cache_dir)
            .add_source("rows", read_csv(os.path.join(str(folder), "part_*.csv")))
            .add_step(keep_above, params={"threshold": threshold})
            .add_step(summarize_kept))

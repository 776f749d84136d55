"""Named pipelines and steps the tests share (importable by worker processes)."""

from __future__ import annotations

import time

from flowyml import Pipeline, step


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


def failing() -> Pipeline:
    """numbers -> total -> fail_if_big (fails) -> after; numbers -> independent."""
    return (
        Pipeline("failing")
        .add_step(numbers)
        .add_step(total)
        .add_step(fail_if_big)
        .add_step(after)
        .add_step(independent)
    )


def sleeper(seconds: float, tag: int) -> float:
    time.sleep(seconds)
    return tag


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

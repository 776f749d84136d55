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

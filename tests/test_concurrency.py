"""Independent steps really run at the same time (generous bounds, 2 cores)."""

from __future__ import annotations

import time

from flowyml import ParallelExecutor, Pipeline, step

from .pipelines import burn, sleeper


def _pipeline(func, copies, **params) -> Pipeline:
    pipeline = Pipeline("concurrent")
    for i in range(copies):
        pipeline.add_step(step(func), name=f"{func.__name__}_{i}", params=params)
    return pipeline


def test_sleeping_steps_overlap_on_threads():
    pipeline = Pipeline("sleepers")
    for i in range(4):
        pipeline.add_step(step(sleeper), name=f"sleep_{i}", params={"seconds": 0.5, "tag": i})
    with ParallelExecutor(max_workers=4, backend="thread") as executor:
        start = time.perf_counter()
        result = pipeline.run(executor=executor, progress=False)
        elapsed = time.perf_counter() - start
    assert result.outputs == {f"sleep_{i}": i for i in range(4)}
    assert elapsed < 1.5, f"4 x 0.5 s sleeps took {elapsed:.2f}s: they did not overlap"
    spans = sorted((t.start, t.stop) for t in result.tasks)
    assert spans[-1][0] < spans[0][1], "the last step started only after the first ended"


def test_cpu_bound_steps_beat_sync_on_process():
    pipeline = _pipeline(burn, 4, n=3_000_000)
    start = time.perf_counter()
    expected = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    sync_time = time.perf_counter() - start
    with ParallelExecutor(max_workers=2, backend="process") as executor:
        start = time.perf_counter()
        result = pipeline.run(executor=executor, progress=False)
        process_time = time.perf_counter() - start
    assert result.outputs == expected.outputs
    assert len({t.worker for t in result.tasks}) == 2, "both worker processes took steps"
    assert process_time < 0.8 * sync_time, f"process {process_time:.2f}s vs sync {sync_time:.2f}s"

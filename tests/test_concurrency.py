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


def test_cpu_bound_steps_run_in_parallel_on_process():
    """Steps overlap in two worker processes and run as fast as a bare process pool.

    The speed bound is relative to a plain ``ProcessPoolExecutor`` doing the same
    work in the same test, not to the core count: a loaded or throttled VM lowers
    both alike.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n, copies = 3_000_000, 4
    pipeline = _pipeline(burn, copies, n=n)
    start = time.perf_counter()
    expected = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    sync_time = time.perf_counter() - start
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(burn, [1, 1]))  # start both processes before timing
        start = time.perf_counter()
        bare = list(pool.map(burn, [n] * copies, chunksize=1))
        bare_time = time.perf_counter() - start
    with ParallelExecutor(max_workers=2, backend="process") as executor:
        start = time.perf_counter()
        result = pipeline.run(executor=executor, progress=False)
        process_time = time.perf_counter() - start
    assert list(result.outputs.values()) == list(expected.outputs.values()) == bare
    assert len({t.worker for t in result.tasks}) == 2, "both worker processes took steps"
    spans = sorted((t.start, t.stop) for t in result.tasks)
    overlapping = sum(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    assert overlapping >= 2, f"steps did not overlap in time: {spans}"
    assert process_time < 1.25 * bare_time + 0.1, (
        f"flowyml process {process_time:.2f}s vs a bare pool {bare_time:.2f}s (sync {sync_time:.2f}s)"
    )

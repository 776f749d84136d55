"""flowyml's overhead against the same task graph run by Dask directly.

Run from the repository root (``python bench/overhead.py``, ``--quick`` for a
smaller run); it prints three tables:

1. per-task time of ``Pipeline.run`` against the hand-built dict graph of the
   same shape on Dask's own scheduler, per backend (sync, thread, process,
   distributed), for N independent no-op steps plus one fan-in step and for a
   layered DAG of 10 layers x 100 steps. Both sides run on the same pool or
   cluster, opened before timing; repeats are interleaved and the best of k
   is kept. flowyml's time is the whole ``run`` (plan, compile, execute,
   collect the outputs) of one pipeline object run k times, as a notebook or
   a scheduler would: from its second run on it reuses its plan and graph
   layout. The raw time is ``get`` alone, its dict built before the clock
   starts. The breakdown below the table shows the first run's full planning
   and compiling, and the report's cost when ``result.steps``/``tasks`` are
   first read (``run`` itself does not fold them).
2. building + compiling a 10,000-step pipeline, against ``dask.delayed``;
3. 8 CPU-bound pure-Python steps on 2 workers: ``process`` against ``sync``,
   with Dask's default ``scheduler="processes"`` for reference.

The run history is on, as by default, its records in a temporary
``FLOWYML_HOME``. Each timing starts once the records of earlier runs are
complete (``flowyml.history.flush``, untimed): ``run`` returns before its
record is completed by a thread of its own, and that work lands in no
timing, neither flowyml's nor Dask's. ``bench/history.py`` measures it.

See ``bench/README.md`` for what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Worker processes (spawned) inherit sys.path: they import ``workload`` and ``flowyml`` from here.
# The script's own folder (sys.path[0]) would let bench/distributed.py shadow the
# distributed package: the repo root takes its place, bench/ goes last.
sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "bench"))

import dask  # noqa: E402
import dask.local  # noqa: E402
import dask.multiprocessing  # noqa: E402
import dask.threaded  # noqa: E402

# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))

import flowyml.history  # noqa: E402
from flowyml import ParallelExecutor, Pipeline  # noqa: E402
from flowyml.compile import compile_plan  # noqa: E402
from flowyml.tasks import RAISE  # noqa: E402

from workload import burn, combine, link, noop  # noqa: E402

WORKERS = 2
LAYERS, WIDTH = 10, 100
TARGET_RATIO = 1.15
TARGET_BUILD_S = 0.5
TARGET_SPEEDUP = 1.8

Graph = dict[Hashable, Any]


# -- the two shapes, each as a flowyml pipeline and as a raw Dask graph ---------------------


def fan_in_pipeline(n: int) -> Pipeline:
    """``n`` independent no-op steps and one ``combine(*parts)`` step over all of them."""
    pipeline = Pipeline(f"fan_in_{n}")
    names = [f"s{i}" for i in range(n)]
    for name in names:
        pipeline.add_step(noop, name=name)
    pipeline.add_step(combine, name="combine", inputs=names)
    return pipeline


def fan_in_graph(n: int, suffix: str) -> tuple[Graph, list[Hashable]]:
    names = [f"s{i}{suffix}" for i in range(n)]
    dsk: Graph = {name: (noop,) for name in names}
    dsk["combine" + suffix] = (combine, *names)
    return dsk, ["combine" + suffix]


def layer_inputs(j: int) -> list[int]:
    """Which steps of the previous layer step ``j`` reads: 2 for odd ``j``, 3 for even."""
    chosen = [j, (j + 1) % WIDTH]
    if j % 2 == 0:
        chosen.append((j + 37) % WIDTH)
    return chosen


def layered_pipeline() -> Pipeline:
    """``LAYERS`` layers of ``WIDTH`` steps, each step reading 2-3 of the layer before."""
    pipeline = Pipeline("layered")
    for j in range(WIDTH):
        pipeline.add_step(noop, name=f"l0_{j}")
    for layer in range(1, LAYERS):
        for j in range(WIDTH):
            inputs = [f"l{layer - 1}_{k}" for k in layer_inputs(j)]
            pipeline.add_step(link, name=f"l{layer}_{j}", inputs=inputs)
    return pipeline


def layered_graph(suffix: str) -> tuple[Graph, list[Hashable]]:
    dsk: Graph = {f"l0_{j}{suffix}": (noop,) for j in range(WIDTH)}
    for layer in range(1, LAYERS):
        for j in range(WIDTH):
            deps = [f"l{layer - 1}_{k}{suffix}" for k in layer_inputs(j)]
            dsk[f"l{layer}_{j}{suffix}"] = (link, *deps)
    return dsk, [f"l{LAYERS - 1}_{j}{suffix}" for j in range(WIDTH)]


@dataclass
class Shape:
    label: str
    tasks: int
    pipeline: Callable[[], Pipeline]
    graph: Callable[[str], tuple[Graph, list[Hashable]]]


def shapes(sizes: list[int]) -> list[Shape]:
    out = [
        Shape(f"fan-in N={n:,}", n + 1, lambda n=n: fan_in_pipeline(n), lambda s, n=n: fan_in_graph(n, s))
        for n in sizes
    ]
    out.append(Shape(f"layered {LAYERS}x{WIDTH}", LAYERS * WIDTH, layered_pipeline, layered_graph))
    return out


# -- the backends: flowyml's executor and raw Dask on the same pool or cluster -------------


class Side:
    """One backend's pair of runners, opened before timing and closed after."""

    name: str
    reference: str | None = None  # an extra raw-Dask row (its defaults), if any

    def __enter__(self) -> Side:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def raw(self, dsk: Graph, keys: list[Hashable]) -> Any:
        raise NotImplementedError

    def reference_run(self, dsk: Graph, keys: list[Hashable]) -> Any:
        raise NotImplementedError

    def flowyml(self, pipeline: Pipeline) -> Any:
        return pipeline.run(executor=self.executor, progress=False)


class SyncSide(Side):
    name = "sync"

    def __enter__(self) -> SyncSide:
        self.executor = ParallelExecutor(backend="sync").__enter__()
        return self

    def raw(self, dsk, keys):
        return dask.local.get_sync(dsk, keys)


class ThreadSide(Side):
    name = "thread"

    def __enter__(self) -> ThreadSide:
        self.pool = ThreadPoolExecutor(WORKERS)
        self.executor = ParallelExecutor(max_workers=WORKERS, backend="thread").__enter__()
        return self

    def __exit__(self, *exc):
        self.executor.close()
        self.pool.shutdown()

    def raw(self, dsk, keys):
        return dask.threaded.get(dsk, keys, pool=self.pool)


class ProcessSide(Side):
    name = "process"
    reference = "dask default processes (new pool per compute, chunksize 6)"

    def __enter__(self) -> ProcessSide:
        import multiprocessing

        self.pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
        wait([self.pool.submit(noop) for _ in range(WORKERS)])  # start both processes now
        self.executor = ParallelExecutor(max_workers=WORKERS, backend="process").__enter__()
        return self

    def __exit__(self, *exc):
        self.executor.close()
        self.pool.shutdown()

    def raw(self, dsk, keys):
        return dask.multiprocessing.get(dsk, keys, pool=self.pool, chunksize=1, optimize_graph=False)

    def reference_run(self, dsk, keys):
        return dask.multiprocessing.get(dsk, keys, num_workers=WORKERS)


class DistributedSide(Side):
    name = "distributed"

    def __enter__(self) -> DistributedSide:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster, set_as_default=False)
        self.executor = ParallelExecutor(client=self.client).__enter__()
        return self

    def __exit__(self, *exc):
        self.executor.close()
        self.client.close()
        self.cluster.close()

    def raw(self, dsk, keys):
        return self.client.get(dsk, keys, sync=True)


SIDES = {"sync": SyncSide, "thread": ThreadSide, "process": ProcessSide, "distributed": DistributedSide}


# -- timing ---------------------------------------------------------------------------------


def timed(func: Callable[[], Any]) -> float:
    flowyml.history.flush()  # earlier runs' records: written before the clock starts
    gc.collect()
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def repeats_for(backend: str, tasks: int, quick: bool) -> int:
    if tasks >= 10_000:  # a second or less a side on sync and thread: enough repeats to beat the noise
        return 1 if backend in ("process", "distributed") or quick else 5
    if tasks >= 1_000:
        return 3 if quick else 5
    return 5 if quick else 9


@dataclass
class Row:
    backend: str
    shape: str
    tasks: int
    raw_us: float
    flowyml_us: float | None
    repeats: int

    @property
    def ratio(self) -> float | None:
        return None if self.flowyml_us is None else self.flowyml_us / self.raw_us


def measure(side: Side, shape: Shape, repeats: int) -> Row:
    """Best of ``repeats`` for both sides, alternating which goes first."""
    pipeline = shape.pipeline()
    expected = None
    raw_times, flow_times = [], []
    for rep in range(repeats):
        dsk, keys = shape.graph(f"-r{rep}")  # fresh keys: a cluster never sees a key twice

        def run_raw() -> None:
            nonlocal expected
            expected = side.raw(dsk, keys)

        def run_flowyml() -> None:
            result = side.flowyml(pipeline)
            assert result.success and len(result.outputs) == len(keys), "flowyml run failed"

        order = (run_raw, run_flowyml) if rep % 2 == 0 else (run_flowyml, run_raw)
        for run in order:
            (raw_times if run is run_raw else flow_times).append(timed(run))
    return Row(
        side.name,
        shape.label,
        shape.tasks,
        1e6 * min(raw_times) / shape.tasks,
        1e6 * min(flow_times) / shape.tasks,
        repeats,
    )


def measure_reference(side: Side, shape: Shape, repeats: int) -> Row:
    times = []
    for rep in range(repeats):
        dsk, keys = shape.graph(f"-r{rep}")
        times.append(timed(lambda: side.reference_run(dsk, keys)))
    return Row(side.name + "*", shape.label, shape.tasks, 1e6 * min(times) / shape.tasks, None, repeats)


#: Dask's distributed scheduler is super-linear on one very wide fan-in task (here
#: 2 ms a task at N = 1,000, 6.5 ms at 3,000): N = 10,000 takes many minutes a side.
DISTRIBUTED_MAX_N = 1_000


def overhead_table(backends: list[str], sizes: list[int], quick: bool, full: bool) -> list[Row]:
    rows = []
    for backend in backends:
        backend_sizes = sizes
        if backend == "distributed" and not full:
            backend_sizes = [n for n in sizes if n <= DISTRIBUTED_MAX_N]
            if backend_sizes != sizes:
                print(f"{backend:<13}fan-in N > {DISTRIBUTED_MAX_N:,} skipped: minutes per side "
                      f"on Dask's distributed scheduler (--full runs it)")
        with SIDES[backend]() as side:
            for shape in shapes(backend_sizes):
                rows.append(measure(side, shape, repeats_for(backend, shape.tasks, quick)))
                print_row(rows[-1])
            if side.reference is not None:
                for shape in shapes(backend_sizes):
                    rows.append(measure_reference(side, shape, 1 if quick or shape.tasks >= 10_000 else 3))
                    print_row(rows[-1])
    return rows


def print_header() -> None:
    print(f"{'backend':<13}{'graph':<19}{'tasks':>7}{'raw us/task':>13}{'flowyml us/task':>17}"
          f"{'extra us':>10}{'ratio':>8}{'k':>4}  target")


def print_row(row: Row) -> None:
    if row.flowyml_us is None:
        print(f"{row.backend:<13}{row.shape:<19}{row.tasks:>7,}{row.raw_us:>13.1f}{'-':>17}{'-':>10}"
              f"{'-':>8}{row.repeats:>4}  (reference)")
        return
    verdict = ""
    if row.tasks >= 1_000:
        verdict = "ok" if row.ratio <= TARGET_RATIO else f"MISSED (> {TARGET_RATIO}x)"
    print(f"{row.backend:<13}{row.shape:<19}{row.tasks:>7,}{row.raw_us:>13.1f}{row.flowyml_us:>17.1f}"
          f"{row.flowyml_us - row.raw_us:>10.1f}{row.ratio:>7.2f}x{row.repeats:>4}  {verdict}", flush=True)


# -- where flowyml's extra time goes (sync: no pool, no pickling) -----------------------------


def breakdown(n: int, repeats: int) -> None:
    """Per-task microseconds of each phase of ``Pipeline.run`` on the sync backend (CPU time).

    A pipeline remembers its plan and its graph's layout, so its first run
    plans and compiles in full and later runs only create their task objects;
    the per-step and per-task report is folded when a result's ``steps`` or
    ``tasks`` is first read, not by ``run`` itself.
    """
    from flowyml.executors.local import dask_callbacks
    from flowyml.run import RunRecorder, task_records

    clock = time.process_time
    cold = float("inf")
    for _ in range(repeats):
        fresh = fan_in_pipeline(n)
        gc.collect()
        start = clock()
        compile_plan(fresh.plan(), run_id="bench", mode=RAISE)
        cold = min(cold, 1e6 * (clock() - start) / (n + 1))
    pipeline = fan_in_pipeline(n)
    compile_plan(pipeline.plan(), run_id="first", mode=RAISE)
    dsk, keys = fan_in_graph(n, "")
    best: dict[str, float] = {"plan + compile, a pipeline's first run": cold}
    for _ in range(repeats):
        gc.collect()
        marks = [("start", clock())]
        plan = pipeline.plan()
        marks.append(("plan, later runs", clock()))
        graph = compile_plan(plan, run_id="bench", mode=RAISE)
        marks.append(("compile, later runs", clock()))
        recorder = RunRecorder(graph, False, pipeline.name)
        dask.local.get_sync(graph.dsk, graph.output_keys, callbacks=dask_callbacks(recorder))
        marks.append(("execute (Dask + tasks + hooks)", clock()))
        recorder.step_results(), task_records(recorder.records())
        marks.append(("report, when first read (steps, tasks)", clock()))
        gc.collect()
        start = clock()
        dask.local.get_sync(dsk, keys)
        marks.append(("raw Dask get_sync, same graph", clock() - start + marks[-1][1]))
        for (_, before), (name, after) in itertools.pairwise(marks):
            best[name] = min(best.get(name, float("inf")), 1e6 * (after - before) / (n + 1))
    for name, value in best.items():
        print(f"  {name:<42}{value:7.2f} us/task")


# -- building and compiling -------------------------------------------------------------------


def build_and_compile(n: int) -> tuple[float, float, float]:
    """Seconds to add ``n`` + 1 steps, and to plan + compile them."""
    gc.collect()
    start = time.perf_counter()
    pipeline = fan_in_pipeline(n)
    built = time.perf_counter()
    plan = pipeline.plan()
    graph = compile_plan(plan, run_id="bench", mode=RAISE)
    done = time.perf_counter()
    assert len(graph.dsk) == n + 1
    return built - start, done - built, done - start


def build_delayed(n: int) -> float:
    """Seconds to build the same fan-in with one ``dask.delayed`` call per step."""
    gc.collect()
    start = time.perf_counter()
    parts = [dask.delayed(noop, pure=False)() for _ in range(n)]
    total = dask.delayed(combine)(*parts)
    total.__dask_graph__()  # materialize, as compute would
    return time.perf_counter() - start


def build_table(n: int, repeats: int) -> None:
    runs = [build_and_compile(n) for _ in range(repeats)]
    add, compile_, total = min(runs, key=lambda r: r[2])
    delayed_s = min(build_delayed(n) for _ in range(max(1, repeats // 2)))
    verdict = "ok" if total < TARGET_BUILD_S else f"MISSED (>= {TARGET_BUILD_S} s)"
    print(f"flowyml add_step x {n + 1:,}:           {add:7.3f} s")
    print(f"flowyml plan + compile_plan:           {compile_:7.3f} s")
    print(f"flowyml total:                         {total:7.3f} s  ({1e6 * total / (n + 1):.1f} us/step)"
          f"  target < {TARGET_BUILD_S} s: {verdict}")
    print(f"dask.delayed, same graph:              {delayed_s:7.3f} s  ({1e6 * delayed_s / (n + 1):.1f} us/step)")


# -- CPU-bound speed-up -------------------------------------------------------------------------


def cpu_pipeline(steps: int, n: int) -> Pipeline:
    pipeline = Pipeline("cpu_bound")
    for i in range(steps):
        pipeline.add_step(burn, name=f"burn_{i}", params={"n": n})
    return pipeline


def speedup_table(steps: int, n: int) -> None:
    pipeline = cpu_pipeline(steps, n)
    # The machine's own ceiling, measured in the same minute: the same calls on a
    # bare pool of 2 processes. On a shared or throttled VM this falls well below 2.
    import multiprocessing

    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        wait([pool.submit(noop) for _ in range(WORKERS)])
        bare_sync_s = timed(lambda: [burn(n) for _ in range(steps)])
        bare_pool_s = timed(lambda: list(pool.map(burn, [n] * steps)))
    sync_s = timed(lambda: pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False))
    with ParallelExecutor(max_workers=WORKERS, backend="process") as executor:
        process_s = timed(lambda: pipeline.run(executor=executor, progress=False))
    dsk = {f"burn_{i}": (burn, n) for i in range(steps)}
    dask_s = timed(lambda: dask.multiprocessing.get(dsk, list(dsk), num_workers=WORKERS))
    speedup = sync_s / process_s
    verdict = "ok" if speedup >= TARGET_SPEEDUP else f"MISSED (< {TARGET_SPEEDUP}x)"
    print(f"{steps} steps of burn(n={n:,}), {WORKERS} workers")
    print(f"machine ceiling: plain loop {bare_sync_s:.2f} s, bare pool.map {bare_pool_s:.2f} s"
          f"  speed-up {bare_sync_s / bare_pool_s:.2f}x")
    print(f"flowyml sync:                          {sync_s:7.2f} s  ({sync_s / steps:.2f} s/step)")
    print(f"flowyml process (pool open):           {process_s:7.2f} s  speed-up {speedup:.2f}x"
          f"  target >= {TARGET_SPEEDUP}x: {verdict}")
    print(f"dask scheduler='processes' (defaults): {dask_s:7.2f} s  speed-up {sync_s / dask_s:.2f}x"
          f"  (new pool per compute, chunksize 6)")


# -- main -----------------------------------------------------------------------------------------


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import distributed

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} CPUs; Python {platform.python_version()}, dask {dask.__version__}, "
            f"distributed {distributed.__version__}; load average {load:.2f} at start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repeats (under a minute)")
    parser.add_argument("--full", action="store_true",
                        help="also the N = 10,000 fan-in on distributed (slow: see DISTRIBUTED_MAX_N)")
    parser.add_argument("--backends", default=",".join(SIDES), help="comma-separated subset of %(default)s")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: overhead,breakdown,build,cpu")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    skip = set(args.skip.split(","))
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]

    print(machine())
    if "overhead" not in skip:
        print(f"\n== per-task time, flowyml Pipeline.run vs the same dict graph on Dask "
              f"({WORKERS} workers; best of k; target <= {TARGET_RATIO}x at >= 1,000 tasks)")
        print_header()
        overhead_table(backends, sizes, args.quick, args.full)
        print("* reference row: raw Dask with its own defaults, pool start-up included")
    if "breakdown" not in skip:
        print("\n== where the time goes: sync, fan-in N=1,000, CPU us per task, best of 5")
        breakdown(1_000, 5)
    if "build" not in skip:
        print("\n== building + compiling a fan-in pipeline of 10,000 no-op steps")
        build_table(10_000, 1 if args.quick else 3)
    if "cpu" not in skip:
        print("\n== CPU-bound pure-Python steps: process vs sync")
        speedup_table(8, 3_000_000 if args.quick else 10_000_000)


if __name__ == "__main__":
    main()

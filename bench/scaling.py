"""How flowyml's cost per task grows from 1,000 to 100,000 tasks, beside raw Dask's.

Run from the repository root (``python bench/scaling.py``; ``--quick`` for
N = 1,000 and 10,000 only). Two shapes of about N tasks each:

``steps``
    N - 1 independent no-op steps and one fan-in step ``combine(*parts)``.
``partitions``
    one in-memory source of N / 3 partitions, two per-partition steps
    (``double``, ``inc``) and a reduction ``total`` over the partitioned
    asset with ``split_every=k`` (``--split-every``, default 16): a tree of
    at most k inputs a task. Where ``flowyml.Step`` has no ``split_every``
    yet, the reduction is a plain fan-in (one task over every partition) and
    the script says so.

Columns (microseconds per task of the compiled graph, best of k; the driver's
CPU time for what runs in it alone, wall time for runs on a pool or cluster):

- ``build``: ``Pipeline()`` and every ``add_step`` / ``add_source``;
- ``plan+compile``: a pipeline's first ``plan()`` and ``compile_plan()``;
- ``run <backend>``: ``Pipeline.run`` (its plan and layout remembered, as a
  notebook's second run) on an executor opened before the clock starts, and
  ``dask <backend>``: the hand-built dict graph of the same shape on Dask's
  own ``get`` with the same pool (or cluster); ``flowyml/dask`` is the ratio;
- ``fold``: reading ``result.steps`` and ``result.tasks`` the first time;
- ``html``: ``result.save_report("run.html")`` (``to_dict`` and the page);
- ``peak memory``: the driver's peak Python heap (``tracemalloc``), in bytes
  per task, over build, plan, compile, a sync run, fold and the HTML report;
  the growth of its resident memory (``ru_maxrss``) is printed below the table.

Every (shape, N) runs in a fresh child process, so sizes do not pollute each
other's heap, garbage collector or peak memory. The last columns divide the
cost per task at each N by the cost per task at the smallest N: the target
is at most 1.5x at N = 100,000 for flowyml's columns. Raw Dask's columns show
whose cost a growth is (Dask's scheduler is not flowyml's to fix).

Usage::

    python bench/scaling.py                                   # 1,000 / 10,000 / 100,000; sync, thread, process
    python bench/scaling.py --quick                           # 1,000 and 10,000, fewer repeats
    python bench/scaling.py --backends sync --shapes steps --sizes 1000,100000
    python bench/scaling.py --backends sync,distributed       # distributed up to --distributed-max (10,000)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# As in bench/overhead.py: the repository root replaces the script's folder on
# sys.path (bench/distributed.py would shadow the distributed package), and
# bench/ goes last, so spawned workers import ``workload`` by reference.
sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "bench"))
# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))

WORKERS = 2
TARGET_GROWTH = 1.5
SHAPES = ("steps", "partitions")
BACKENDS = ("sync", "thread", "process", "distributed")

Graph = dict[Hashable, Any]


def has_split_every() -> bool:
    import flowyml

    return "split_every" in {f.name for f in dataclasses.fields(flowyml.Step)}


# -- the two shapes, as a flowyml pipeline and as a hand-built Dask graph -----------------------


def steps_pipeline(n: int):
    from flowyml import Pipeline

    from workload import combine, noop

    pipeline = Pipeline(f"steps_{n}")
    names = [f"s{i}" for i in range(n - 1)]
    for name in names:
        pipeline.add_step(noop, name=name)
    return pipeline.add_step(combine, name="combine", inputs=names)


def steps_graph(n: int, suffix: str) -> tuple[Graph, list[Hashable]]:
    from workload import combine, noop

    # One key name with an index, as a Dask user writes N copies of a task (and as flowyml keys
    # copies of one function on distributed): a key name each would be a task prefix each,
    # which Dask's scheduler walks at every transition (quadratic; docs/distributed.md).
    names = [("noop" + suffix, i) for i in range(n - 1)]
    dsk: Graph = {name: (noop,) for name in names}
    dsk["combine" + suffix] = (combine, *names)
    return dsk, ["combine" + suffix]


def partition_count(n: int) -> int:
    """Partitions of the ``partitions`` shape for about ``n`` tasks (three per partition)."""
    return max(1, n // 3)


def partitions_pipeline(n: int, split_every: int | None):
    from flowyml import Pipeline

    from workload import NoopSource, double, inc, total

    pipeline = Pipeline(f"partitions_{n}")
    pipeline.add_source("numbers", NoopSource(partition_count(n)))
    pipeline.add_step(double, name="double", inputs=["numbers"], per_partition=True)
    pipeline.add_step(inc, name="inc", inputs=["double"], per_partition=True)
    options = {} if split_every is None else {"split_every": split_every}
    return pipeline.add_step(total, name="total", inputs=["inc"], **options)


def partitions_graph(n: int, suffix: str, split_every: int | None) -> tuple[Graph, list[Hashable]]:
    """The same shape by hand; the reduction as ``dask.dataframe`` builds its trees."""
    from workload import double, inc, load_part, total

    count = partition_count(n)
    dsk: Graph = {}
    for i in range(count):
        dsk[("numbers" + suffix, i)] = (load_part, i)
        dsk[("double" + suffix, i)] = (double, ("numbers" + suffix, i))
        dsk[("inc" + suffix, i)] = (inc, ("double" + suffix, i))
    level: list[Hashable] = [("inc" + suffix, i) for i in range(count)]
    width = split_every or len(level)
    depth = 0
    while len(level) > width:
        groups = [level[i:i + width] for i in range(0, len(level), width)]
        level = [(f"total-{depth}{suffix}", j) for j in range(len(groups))]
        dsk.update({key: (total, group) for key, group in zip(level, groups)})
        depth += 1
    dsk["total" + suffix] = (total, level)
    return dsk, ["total" + suffix]


def expected_value(shape: str, n: int) -> int:
    if shape == "steps":
        return n - 1
    count = partition_count(n)
    return count * (count - 1) + count  # sum of 2i + 1


# -- the backends: flowyml's executor and raw Dask's get on one pool or cluster ------------------


class Side:
    """One backend: a flowyml executor and a raw Dask ``get`` sharing a pool, opened before timing."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.closers: list[Callable[[], Any]] = []

    def __enter__(self) -> Side:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait

        import dask.local
        import dask.multiprocessing
        import dask.threaded

        from flowyml import ParallelExecutor

        from workload import noop

        if self.backend == "sync":
            self.executor = ParallelExecutor(backend="sync").__enter__()
            self.raw = lambda dsk, keys: dask.local.get_sync(dsk, keys)
        elif self.backend == "thread":
            pool = ThreadPoolExecutor(WORKERS)
            self.closers.append(pool.shutdown)
            self.executor = ParallelExecutor(max_workers=WORKERS, backend="thread").__enter__()
            self.raw = lambda dsk, keys: dask.threaded.get(dsk, keys, pool=pool)
        elif self.backend == "process":
            pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
            wait([pool.submit(noop) for _ in range(WORKERS)])  # both processes up before timing
            self.closers.append(pool.shutdown)
            self.executor = ParallelExecutor(max_workers=WORKERS, backend="process").__enter__()
            # Dask's own graph optimisation stays on: it fuses the partition chains
            # as flowyml's process backend does.
            self.raw = lambda dsk, keys: dask.multiprocessing.get(dsk, keys, pool=pool, chunksize=1)
        else:
            import logging

            from distributed import Client, LocalCluster

            cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
            client = Client(cluster, set_as_default=False)
            self.closers += [cluster.close, client.close]
            self.executor = ParallelExecutor(client=client).__enter__()
            self.raw = lambda dsk, keys: client.get(dsk, keys, sync=True)
        self.closers.append(self.executor.close)
        return self

    def __exit__(self, *exc: Any) -> None:
        while self.closers:
            self.closers.pop()()


# -- one (shape, N) in a child process ----------------------------------------------------------


def timed(func: Callable[[], Any], clock: Callable[[], float] = time.process_time) -> tuple[float, Any]:
    """Seconds ``func`` took, and its value. The default clock is this process's CPU time:
    on a shared machine it counts the driver's own work, not its wait for a core."""
    gc.collect()
    start = clock()
    value = func()
    return clock() - start, value


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_pipeline(shape: str, n: int, split_every: int | None):
    return steps_pipeline(n) if shape == "steps" else partitions_pipeline(n, split_every)


def make_graph(shape: str, n: int, suffix: str, split_every: int | None) -> tuple[Graph, list[Hashable]]:
    return steps_graph(n, suffix) if shape == "steps" else partitions_graph(n, suffix, split_every)


def measure_memory(shape: str, n: int, split_every: int | None) -> dict[str, Any]:
    """One pass of build, plan, compile, sync run, fold and HTML: the driver's peak Python heap.

    ``tracemalloc``'s peak (exact, and blind to the allocator's reuse of memory
    freed by imports, which hides a small run's growth in ``ru_maxrss``), and the
    growth of ``ru_maxrss`` over its level after imports, as a cross-check.
    """
    from flowyml import ParallelExecutor
    from flowyml.compile import compile_plan
    from flowyml.tasks import RAISE

    make_pipeline(shape, 10, split_every).run(executor=ParallelExecutor(backend="sync"), progress=False)  # warm
    gc.collect()
    baseline = peak_rss_bytes()
    tracemalloc.start()
    pipeline = make_pipeline(shape, n, split_every)
    graph = compile_plan(pipeline.plan(), run_id="memory", mode=RAISE)
    tasks = len(graph.dsk)
    del graph
    result = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    _ = result.steps, result.tasks
    with tempfile.TemporaryDirectory() as folder:
        result.save_report(Path(folder) / "run.html")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"tasks": tasks, "peak_bytes": peak, "rss_growth_bytes": peak_rss_bytes() - baseline}


def measure_times(shape: str, n: int, backends: list[str], repeats: int, split_every: int | None) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of every column for one (shape, N)."""
    from flowyml.compile import compile_plan
    from flowyml.tasks import RAISE

    best: dict[str, float] = {}
    extra: dict[str, Any] = {}

    def keep(column: str, seconds: float) -> None:
        best[column] = min(best.get(column, math.inf), seconds)

    pipeline = None
    for _ in range(repeats):
        seconds, pipeline = timed(lambda: make_pipeline(shape, n, split_every))
        keep("build", seconds)
        seconds, graph = timed(lambda: compile_plan(pipeline.plan(), run_id="first", mode=RAISE))
        keep("plan+compile", seconds)
    extra["tasks"] = len(graph.dsk)
    raw_tasks = len(make_graph(shape, n, "", split_every)[0])
    extra["raw_tasks"] = raw_tasks
    del graph
    expected = expected_value(shape, n)
    output = "combine" if shape == "steps" else "total"
    for backend in backends:
        with Side(backend) as side:
            for rep in range(repeats):
                dsk, keys = make_graph(shape, n, f"-r{rep}", split_every)  # fresh keys: a cluster never sees one twice
                runs = [("dask", lambda: side.raw(dsk, keys)),
                        ("run", lambda: pipeline.run(executor=side.executor, progress=False))]
                for label, run in runs if rep % 2 == 0 else runs[::-1]:
                    # sync runs in this process alone: its CPU time. Pools and clusters: the wall clock.
                    seconds, value = timed(run, time.process_time if backend == "sync" else time.perf_counter)
                    got = value[0] if label == "dask" else value[output]
                    assert got == expected, (label, backend, got, expected)
                    keep(f"{label} {backend}", seconds)
                    if label == "run" and backend == backends[0]:
                        measure_report(value, keep, extra)
                    del value
    return {"seconds": best, **extra}


def measure_report(result: Any, keep: Callable[[str, float], None], extra: dict[str, Any]) -> None:
    """The ``fold`` and ``html`` columns, on a fresh result."""
    seconds, _ = timed(lambda: (result.steps, result.tasks))
    keep("fold", seconds)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.html"
        seconds, _ = timed(lambda: result.save_report(path))
        keep("html", seconds)
        extra["html_bytes"] = path.stat().st_size
    assert len(result.tasks) == extra["tasks"], (len(result.tasks), extra["tasks"])


def child(argv: list[str]) -> None:
    what, shape, n, backends, repeats, split_every = argv
    split = int(split_every) or None
    if what == "memory":
        out = measure_memory(shape, int(n), split)
    else:
        out = measure_times(shape, int(n), [b for b in backends.split(",") if b], int(repeats), split)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(what: str, shape: str, n: int, backends: list[str], repeats: int, split_every: int | None) -> dict:
    command = [sys.executable, __file__, "--child", what, shape, str(n), ",".join(backends) or "-", str(repeats),
               str(split_every or 0)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"child {what} {shape} N={n} failed (exit {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


# -- the table ------------------------------------------------------------------------------------


def repeats_for(n: int, quick: bool) -> int:
    if n >= 100_000:
        return 1
    if n >= 10_000:
        return 1 if quick else 2
    return 3 if quick else 5


def growth(values: dict[int, float | None], sizes: list[int]) -> list[str]:
    base = values.get(sizes[0])
    out = []
    for n in sizes[1:]:
        value = values.get(n)
        out.append("-" if value is None or not base else f"{value / base:.2f}x")
    return out


def print_table(shape: str, sizes: list[int], results: dict[int, dict], backends: list[str]) -> list[str]:
    """One row per column, one column per N (us per task) and the growth over the smallest N."""
    columns = ["build", "plan+compile"]
    for backend in backends:
        columns += [f"run {backend}", f"dask {backend}", f"flowyml/dask {backend}"]
    columns += ["fold", "html", "peak memory"]
    width = 12
    head = f"{'':<22}" + "".join(f"{f'N={n:,}':>{width}}" for n in sizes)
    head += "".join(f"{f'x{n // 1000}k':>{width - 3}}" for n in sizes[1:]) + "  target"
    print(head)
    missed = []
    for column in columns:
        values: dict[int, float | None] = {}
        cells = []
        for n in sizes:
            result = results.get(n)
            value = None
            if result is not None:
                seconds = result["times"]["seconds"]
                if column == "peak memory":
                    value = result["memory"]["peak_bytes"] / result["memory"]["tasks"]
                elif column.startswith("flowyml/dask "):
                    backend = column.split()[1]
                    run, raw = seconds.get(f"run {backend}"), seconds.get(f"dask {backend}")
                    if run is not None and raw:
                        value = (run / result["times"]["tasks"]) / (raw / result["times"]["raw_tasks"])
                elif column in seconds:
                    tasks = result["times"]["raw_tasks" if column.startswith("dask ") else "tasks"]
                    value = 1e6 * seconds[column] / tasks
            values[n] = value
            if value is None:
                cells.append("-")
            elif column == "peak memory":
                cells.append(f"{value:,.0f} B")
            elif column.startswith("flowyml/dask"):
                cells.append(f"{value:.2f}x")
            else:
                cells.append(f"{value:.1f}")
        grown = growth(values, sizes) if not column.startswith("flowyml/dask") else ["" for _ in sizes[1:]]
        verdict = ""
        if not column.startswith(("dask ", "flowyml/dask")) and values.get(sizes[-1]) and values.get(sizes[0]):
            ratio = values[sizes[-1]] / values[sizes[0]]
            verdict = "ok" if ratio <= TARGET_GROWTH else f"MISSED (> {TARGET_GROWTH}x)"
            if ratio > TARGET_GROWTH:
                missed.append(f"{shape}: {column} {ratio:.2f}x")
        elif column.startswith("dask "):
            verdict = "(raw Dask)"
        print(f"{column:<22}" + "".join(f"{c:>{width}}" for c in cells)
              + "".join(f"{g:>{width - 3}}" for g in grown) + f"  {verdict}")
    facts = []
    for n in sizes:
        result = results.get(n)
        if result is not None:
            html = result["times"].get("html_bytes")
            facts.append(f"N={n:,}: {result['times']['tasks']:,} tasks (raw {result['times']['raw_tasks']:,})"
                         + (f", HTML {html / 1e6:.2f} MB" if html else "")
                         + f", RSS +{result['memory']['rss_growth_bytes'] / 1e6:.0f} MB")
    print("  " + "; ".join(facts))
    return missed


def machine() -> str:
    import dask
    import distributed

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} CPUs; Python {platform.python_version()}, dask {dask.__version__}, "
            f"distributed {distributed.__version__}; load average {load:.2f} at start")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 and 10,000, fewer repeats")
    parser.add_argument("--sizes", default=None, help="comma-separated task counts (default 1000,10000,100000)")
    parser.add_argument("--backends", default="sync,thread,process", help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of %(default)s")
    parser.add_argument("--split-every", type=int, default=16, help="the reduction's split_every (default 16)")
    parser.add_argument("--distributed-max", type=int, default=10_000,
                        help="largest N run on distributed (default %(default)s)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000])
    backends = [b for b in args.backends.split(",") if b]
    shapes = [s for s in args.shapes.split(",") if s]
    for name in backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    split_every = args.split_every if has_split_every() else None

    print(machine())
    print(f"us per task (best of k; CPU time of the driver, wall time for thread, process and distributed runs), "
          f"{WORKERS} workers; growth = per-task cost at N over that at "
          f"N={sizes[0]:,}; target <= {TARGET_GROWTH}x for flowyml's columns")
    if "partitions" in shapes and split_every is None:
        print(f"note: flowyml.Step has no split_every here: the partitions shape ends in a plain fan-in "
              f"(one task over all partitions), not a tree of {args.split_every}")
    missed: list[str] = []
    for shape in shapes:
        results: dict[int, dict] = {}
        for n in sizes:
            chosen = [b for b in backends if b != "distributed" or n <= args.distributed_max]
            started = time.perf_counter()
            times = run_child("times", shape, n, chosen, repeats_for(n, args.quick), split_every)
            memory = run_child("memory", shape, n, [], 1, split_every)
            results[n] = {"times": times, "memory": memory}
            print(f"  {shape} N={n:,} measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        tree = f", split_every={split_every}" if shape == "partitions" and split_every else ""
        print(f"\n== {shape}{tree}")
        missed += print_table(shape, sizes, results, backends)
    if "distributed" in backends and any(n > args.distributed_max for n in sizes):
        print(f"\ndistributed ran up to N={args.distributed_max:,} (--distributed-max): its growth column "
              f"compares the largest N it ran")
    print("\n" + ("every flowyml column within target" if not missed else "over target: " + "; ".join(missed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

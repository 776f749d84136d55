"""What recording a run in the run history costs, against the same graph on plain Dask.

Run from the repository root: ``python bench/history.py`` (``--quick`` for
fewer repeats, ``--postgres`` to add a PostgreSQL server of its own, started
as the tests start one: Debian's ``postgresql`` package must be installed).

For each shape, on the ``sync`` backend (the worst case: the run's own
thread is never idle, so the record's thread competes with it) and on
``thread``, best of k, repeats interleaved:

- ``dask``: the same graph as a dict on Dask's own scheduler (``get_sync``,
  ``dask.threaded.get``);
- ``off``: ``pipeline.run(history=False)``;
- ``run``: ``pipeline.run()`` with the history on: what a caller waits for;
- ``complete``: ``run()`` then ``flowyml.history.flush()``: until the run's
  record is complete in the database.

It prints the time per run, the history's added milliseconds per run
(``run - off`` and ``complete - off``), and ``run / dask``, the overhead
ratio with the history on (target: within 1.15x, as ``bench/overhead.py``;
under 5 ms a run). The shapes vary steps (a row each in the database) and
tasks per step (nothing in the database): a cost per task would show as a
difference between ``1 step x 1,000 partitions`` and ``1 step x 10``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)
sys.path.append(str(ROOT / "bench"))
HOME = tempfile.mkdtemp(prefix="flowyml-bench-history-")
os.environ["FLOWYML_HOME"] = HOME

import dask.local  # noqa: E402
import dask.threaded  # noqa: E402

import flowyml.history  # noqa: E402
from flowyml import ParallelExecutor, Pipeline, step  # noqa: E402

from overhead import fan_in_graph, fan_in_pipeline  # noqa: E402

TARGET_RATIO = 1.15
TARGET_MS = 5.0


def _write(folder: Path, partitions: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(partitions):
        (folder / f"part_{i:05d}.csv").write_text(f"x\n{i}\n")


def _read(path: str) -> Any:
    import pandas as pd

    return pd.read_csv(path)


def _keep(frame: Any) -> Any:
    return frame[frame["x"] >= 0]


def partitions_pipeline(folder: Path) -> Pipeline:
    """One source of tiny CSV files and one per-partition step: tasks, not steps, grow."""
    from flowyml import read_csv

    keep = step(inputs=["rows"], outputs=["kept"], per_partition=True)(_keep)
    return Pipeline(f"partitions_{folder.name}").add_source("rows", read_csv(str(folder / "*.csv"))).add_step(keep)


def partitions_graph(folder: Path, suffix: str) -> tuple[dict, list[Hashable]]:
    files = sorted(folder.glob("*.csv"))
    dsk: dict[Hashable, Any] = {}
    for i, path in enumerate(files):
        dsk[(f"rows{suffix}", i)] = (_read, str(path))
        dsk[(f"kept{suffix}", i)] = (_keep, (f"rows{suffix}", i))
    return dsk, [(f"kept{suffix}", i) for i in range(len(files))]


def timed(func: Callable[[], Any]) -> float:
    flowyml.history.flush()
    gc.collect()
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def measure(label: str, backend: str, pipeline: Pipeline, graph: Callable[[str], tuple[dict, list]],
            urls: dict[str, str], repeats: int) -> None:
    pool = ThreadPoolExecutor(2) if backend == "thread" else None

    def raw(dsk: dict, keys: list) -> Any:
        if pool is None:
            return dask.local.get_sync(dsk, keys)
        return dask.threaded.get(dsk, keys, pool=pool)

    times: dict[str, list[float]] = {"dask": [], "off": []}
    with ParallelExecutor(backend=backend, max_workers=2) as executor:
        pipeline.run(executor=executor, progress=False, history=False)  # plans and pools warm
        for url in urls.values():
            pipeline.run(executor=executor, progress=False, history=url)  # databases made
        flowyml.history.flush()
        for rep in range(repeats):
            dsk, keys = graph(f"-r{rep}")
            sides: list[tuple[str, Callable[[], Any]]] = [
                ("dask", lambda: raw(dsk, keys)),
                ("off", lambda: pipeline.run(executor=executor, progress=False, history=False)),
            ]
            for name, url in urls.items():
                sides.append((f"run {name}", lambda url=url: pipeline.run(executor=executor, progress=False,
                                                                           history=url)))
                sides.append((f"complete {name}", lambda url=url: (
                    pipeline.run(executor=executor, progress=False, history=url), flowyml.history.flush())))
            if rep % 2:
                sides.reverse()
            for name, func in sides:
                times.setdefault(name, []).append(timed(func))
    if pool is not None:
        pool.shutdown()
    best = {name: 1e3 * min(values) for name, values in times.items()}
    for name in urls:
        run_ms, complete_ms = best[f"run {name}"], best[f"complete {name}"]
        print(f"{backend:<7}{label:<26}{name:<11}{best['dask']:>9.2f}{best['off']:>9.2f}{run_ms:>9.2f}"
              f"{complete_ms:>10.2f}{run_ms - best['off']:>+9.2f}{complete_ms - best['off']:>+10.2f}"
              f"{run_ms / best['dask']:>8.2f}x{best['off'] / best['dask']:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--postgres", action="store_true", help="also PostgreSQL (a server of its own)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 11
    urls = {"sqlite": f"sqlite:///{HOME}/history.db"}
    server = None
    if args.postgres:
        from tests.services import PostgresServer, free_port

        server = PostgresServer(free_port()).start()
        urls["postgresql"] = server.create_database("bench")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print("ms per run, best of", repeats, "; +ms: what the history adds to a run; ratios against plain Dask")
    print(f"{'backend':<7}{'shape':<26}{'history':<11}{'dask':>9}{'off':>9}{'run':>9}{'complete':>10}"
          f"{'run+':>9}{'complete+':>10}{'run/dask':>9}{'off/dask':>9}")
    data = Path(HOME) / "data"
    try:
        for backend in ("sync", "thread"):
            for n in (10, 100, 1_000):
                measure(f"{n:,} steps", backend, fan_in_pipeline(n), lambda s, n=n: fan_in_graph(n, s), urls,
                        repeats)
            for partitions in (10, 1_000):
                folder = data / f"p{partitions}"
                _write(folder, partitions)
                measure(f"1 step x {partitions:,} partitions", backend, partitions_pipeline(folder),
                        lambda s, folder=folder: partitions_graph(folder, s), urls, repeats)
    finally:
        if server is not None:
            server.stop()
    print(f"targets: run/dask within {TARGET_RATIO}x where off/dask is; history under {TARGET_MS:g} ms a run")


if __name__ == "__main__":
    main()

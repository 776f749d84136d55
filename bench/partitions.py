"""Partitioned data: throughput against dask.dataframe, and streaming memory.

::

    python bench/partitions.py            # both parts (generates data in bench/_data once)
    python bench/partitions.py --quick    # smaller data sets, fewer repeats
    python bench/partitions.py --part throughput
    python bench/partitions.py --part memory
    python bench/partitions.py --part schema     # the cost of schema checks on the CSV job

Throughput: the README job (clean per partition, aggregate per partition,
combine) on 8 generated monthly files, for CSV and Parquet, on every
backend, against the same job written by hand with ``dask.dataframe`` on the
same scheduler in the same run (same reused process pool, same
LocalCluster). Prints seconds and the ratio flowyml / dask.dataframe.

Schema: first the checks alone (each partition read, then checked, best of k,
in this process: the check's share of the read, robust to other work on the
machine); then the CSV throughput job three ways on the same data, in the same run,
repeats interleaved: without schema checks (each partition as pandas infers
it, what flowyml did before sources had schemas), with the default checks
(no declared schema: kinds sampled at planning, integers cast to ``Int64``),
and with a declared ``schema=``. Prints the medians and the ratios to the
unchecked run (target: under 1.03).

Memory: a per-partition chain ending in ``write_parquet`` (or, job
``delta``, in ``write_delta``: the same files, committed to a Delta table), and in a
whole-dataset aggregation by zone run as a ``split_every=4`` tree, over
generated CSV data sets of 0.5 GB and 2 GB with ``blocksize="64MB"`` on 2
process workers
(``--memory-backend distributed`` for a LocalCluster; ``--jobs chain``,
``--jobs tree`` or ``--jobs delta`` for some of them); prints the peak resident memory of the
driver plus its workers, sampled every 20 ms. Streaming means the two peaks
are about equal. On ``process`` a tree's inputs pass through the driver
(Dask's multiprocessing scheduler returns every result to the parent), so
the tree job's peak is higher than the chain's, and as flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
# Run as a script, this folder comes first on sys.path, where bench/distributed.py
# would shadow the distributed package: the repo root goes there instead, and
# this folder (for datagen) after site-packages.
sys.path[0] = str(HERE.parent)
sys.path.append(str(HERE))
# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))

from flowyml import (  # noqa: E402
    ParallelExecutor,
    Pipeline,
    read_csv,
    read_parquet,
    step,
    write_delta,
    write_parquet,
)
from flowyml.io.csv import CsvSource  # noqa: E402
from flowyml.io.schema import conform  # noqa: E402

from datagen import make_csv_dataset, make_parquet_dataset  # noqa: E402

DATA = HERE / "_data"
BACKENDS = ["sync", "thread", "process", "distributed"]


# -- the job, as flowyml steps -----------------------------------------------------


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips):
    trips = trips.dropna(subset=["fare"])
    return trips[trips["fare"] > 0]


@step(inputs=["clean"], outputs=["partial"], per_partition=True)
def partial(clean):
    return clean.groupby("pickup_zone")["fare"].agg(["sum", "count"])


@step(inputs=["partial"], outputs=["fare_by_zone"])
def combine(partial):
    totals = partial.groupby(level=0).sum()
    return totals["sum"] / totals["count"]


def flowyml_job(source) -> Pipeline:
    return Pipeline("throughput").add_source("trips", source).add_step(clean).add_step(partial).add_step(combine)


#: Both sides read only the columns the job uses, as a user would ask for:
#: dask.dataframe's optimizer would prune the others anyway.
COLUMNS = ["pickup_zone", "fare"]


def flowyml_source(files: list[str], fmt: str):
    return read_csv(files, usecols=COLUMNS) if fmt == "csv" else read_parquet(files, columns=COLUMNS)


def dask_job(files: list[str], fmt: str):
    import dask.dataframe as dd

    if fmt == "csv":
        frame = dd.read_csv(files, blocksize=None, usecols=COLUMNS)
    else:
        frame = dd.read_parquet(files, columns=COLUMNS)
    frame = frame.dropna(subset=["fare"])
    frame = frame[frame["fare"] > 0]
    totals = frame.groupby("pickup_zone")["fare"].agg(["sum", "count"])
    return totals["sum"] / totals["count"]


# -- throughput --------------------------------------------------------------------


def dataset(kind: str, size: str, files: int) -> list[str]:
    folder = DATA / f"{kind}_{size}_{files}"
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {kind} data set of {size} in {files} files ...", flush=True)
        make = make_csv_dataset if kind == "csv" else make_parquet_dataset
        make(folder, size, files=files)
        marker.write_text("ok")
    suffix = ".csv" if kind == "csv" else ".parquet"
    return sorted(str(p) for p in folder.iterdir() if p.suffix == suffix)


class DaskScheduler:
    """The raw-Dask side's scheduler, sharing pools and cluster with flowyml's."""

    def __init__(self, backend: str, executor: ParallelExecutor, workers: int) -> None:
        self.backend = backend
        self.pool = None
        if backend == "thread":
            self.pool = ThreadPoolExecutor(workers)
        elif backend == "process":
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.client = executor._impl.client if backend == "distributed" else None

    def compute(self, collection):
        import dask

        if self.backend == "sync":
            return dask.compute(collection, scheduler="sync")[0]
        if self.backend == "thread":
            return dask.compute(collection, scheduler="threads", pool=self.pool)[0]
        if self.backend == "process":
            return dask.compute(collection, scheduler="processes", pool=self.pool, chunksize=1)[0]
        return self.client.compute(collection, sync=True)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def timed(func, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def throughput(quick: bool, workers: int) -> list[tuple]:
    rows = []
    size, repeats = ("120MB", 2) if quick else ("240MB", 3)
    inputs = {"csv": dataset("csv", size, 8), "parquet": dataset("parquet", size, 8)}
    print(f"\n== throughput: 8 files, {size} of CSV ({sum(os.path.getsize(f) for f in inputs['csv']) / 1e6:.0f} MB), "
          f"median of {repeats}, {workers} workers")
    for backend in BACKENDS:
        with ParallelExecutor(max_workers=workers, backend=backend) as executor:
            raw = DaskScheduler(backend, executor, workers)
            try:
                for fmt, files in inputs.items():
                    pipeline = flowyml_job(flowyml_source(files, fmt))
                    collection = dask_job(files, fmt)
                    raw.compute(collection)  # warm both sides once (imports in workers)
                    pipeline.run(executor=executor, progress=False)
                    ours, result = timed(lambda: pipeline.run(executor=executor, progress=False), repeats)
                    theirs, expected = timed(lambda: raw.compute(collection), repeats)
                    pd.testing.assert_series_equal(
                        result["fare_by_zone"].sort_index(), expected.sort_index(),
                        check_names=False, check_exact=False,
                    )
                    rows.append((backend, fmt, ours, theirs, ours / theirs))
                    print(f"{backend:12s} {fmt:8s} flowyml {ours:7.2f}s  dask.dataframe {theirs:7.2f}s  "
                          f"ratio {ours / theirs:5.2f}", flush=True)
            finally:
                raw.close()
    return rows


# -- schema checks -----------------------------------------------------------------


class UncheckedCsvSource(CsvSource):
    """The CSV source with its schema checks removed: each partition as pandas infers it."""

    def partitions(self):
        return [dataclasses.replace(part, types=(), read_kwargs=self.pandas_kwargs) for part in super().partitions()]


def schema(quick: bool, workers: int, backends: list[str] = BACKENDS) -> list[tuple]:
    size, repeats = ("120MB", 3) if quick else ("240MB", 5)
    files = dataset("csv", size, 8)
    declared = {"pickup_zone": "int64", "fare": "float64"}
    sources = {
        "unchecked": UncheckedCsvSource(files, None, {"usecols": COLUMNS}),
        "inferred": read_csv(files, usecols=COLUMNS),
        "declared": read_csv(files, usecols=COLUMNS, schema=declared),
    }
    # The checks alone, without any scheduler and least disturbed by other work on the
    # machine: per partition, the best of k reads without checks and the best of k
    # checks (flowyml.io.schema.conform) of the frame read.
    print(f"\n== schema checks: each of the 8 partitions of {size} of CSV read, then checked, in this process, "
          f"best of {repeats}")
    for name in ("inferred", "declared"):
        read = checked = 0.0
        for part in sources[name].partitions():
            bare = dataclasses.replace(part, types=())
            best_read = best_check = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                frame = bare.load()
                best_read = min(best_read, time.perf_counter() - start)
                start = time.perf_counter()
                conform(frame, part.types, part.where())
                best_check = min(best_check, time.perf_counter() - start)
            read, checked = read + best_read, checked + best_check
        print(f"{name:10s} read {read:6.3f}s  checks {checked * 1000:7.2f} ms  ({checked / read:6.2%} of the read; "
              f"target < 3%)", flush=True)

    print(f"\n== schema checks: the CSV job, 8 files, {size}, median of {repeats} interleaved, {workers} workers")
    rows = []
    for backend in backends:
        with ParallelExecutor(max_workers=workers, backend=backend) as executor:
            pipelines = {name: flowyml_job(source) for name, source in sources.items()}
            results = {name: pipeline.run(executor=executor, progress=False) for name, pipeline in pipelines.items()}
            for result in results.values():  # warmed; and the same answer every way
                pd.testing.assert_series_equal(result["fare_by_zone"], results["unchecked"]["fare_by_zone"],
                                               check_index_type=False, check_exact=False)
            times: dict[str, list[float]] = {name: [] for name in pipelines}
            for _ in range(repeats):
                for name, pipeline in pipelines.items():
                    start = time.perf_counter()
                    pipeline.run(executor=executor, progress=False)
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        base = medians["unchecked"]
        rows.append((backend, medians))
        print(f"{backend:12s} unchecked {base:6.2f}s  inferred {medians['inferred']:6.2f}s "
              f"(ratio {medians['inferred'] / base:5.3f})  declared {medians['declared']:6.2f}s "
              f"(ratio {medians['declared'] / base:5.3f})", flush=True)
    return rows


# -- memory ------------------------------------------------------------------------


@step(inputs=["clean"], outputs=["enriched"], per_partition=True)
def enrich(clean):
    return clean.assign(
        fare_per_km=clean["fare"] / clean["distance_km"].where(clean["distance_km"] > 0),
        tip_share=clean["tip"] / clean["fare"],
    )


@step(inputs=["enriched"], outputs=["zone_totals"], split_every=4)
def zone_totals(enriched):
    """Fare, tip and trips by pickup zone: a tree over the partitions, each task at most 4 inputs.

    Its first level reads trips, later levels its own partial totals (same columns).
    """
    if "trips" not in enriched:
        enriched = enriched.assign(trips=1)
    return enriched.groupby("pickup_zone", as_index=False)[["fare", "tip", "trips"]].sum()


class PeakMemory:
    """Samples the resident memory of this process and all its children."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


#: The streaming jobs: a straight per-partition chain to write_parquet, the
#: same chain also ending in a whole-dataset aggregation run as a split_every tree,
#: and the chain ending in write_delta (workers write the files, one commit adds them).
MEMORY_JOBS = ("chain", "tree", "delta")


def memory_job(job: str, files: list[str], out: Path) -> Pipeline:
    pipeline = (
        Pipeline(f"streaming-{job}")
        .add_source("trips", read_csv(files, blocksize="64MB"))
        .add_step(clean)
        .add_step(enrich)
        .add_step(write_delta(out, input="enriched", mode="overwrite") if job == "delta"
                  else write_parquet(out, input="enriched"))
    )
    return pipeline.add_step(zone_totals) if job == "tree" else pipeline


def memory(quick: bool, workers: int, jobs: list[str], backend: str = "process") -> list[tuple]:
    sizes = ["250MB", "1GB"] if quick else ["500MB", "2GB"]
    rows = []
    for job in jobs:
        what = ("chain to write_delta" if job == "delta" else "chain to write_parquet"
                + (", and a split_every=4 aggregation" if job == "tree" else ""))
        print(f"\n== memory ({job}): per-partition {what}, blocksize=64MB, {workers} {backend} workers")
        peaks = []
        for size in sizes:
            files = dataset("csv", size, 8)
            out = DATA / "out_memory"
            pipeline = memory_job(job, files, out)
            with ParallelExecutor(max_workers=workers, backend=backend) as executor:
                with PeakMemory() as baseline:
                    time.sleep(0.2)  # the idle pool: what the run adds is measured on top of it
                with PeakMemory() as peak:
                    start = time.perf_counter()
                    result = pipeline.run(executor=executor, progress=False)
                    elapsed = time.perf_counter() - start
            data_bytes = sum(os.path.getsize(f) for f in files)
            partitions = result.steps["clean"].partitions
            rows.append((job, size, data_bytes, partitions, baseline.peak, peak.peak, elapsed))
            peaks.append(peak.peak)
            print(f"{size:>6s}: {data_bytes / 1e9:5.2f} GB in {partitions:3d} partitions, "
                  f"idle {baseline.peak / 1e6:6.0f} MB, peak {peak.peak / 1e6:6.0f} MB, {elapsed:6.1f}s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        print(f"peak ratio {sizes[-1]} / {sizes[0]}: {peaks[-1] / peaks[0]:.2f} (target <= 1.25); "
              f"largest peak {peaks[-1] / 1e9:.2f} GB")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data sets, fewer repeats")
    parser.add_argument("--part", choices=["throughput", "memory", "schema", "all"], default="all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", nargs="+", choices=MEMORY_JOBS, default=list(MEMORY_JOBS),
                        help="memory part: which streaming jobs (default: all)")
    parser.add_argument("--memory-backend", choices=["process", "distributed"], default="process")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="for --part schema: comma-separated")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.part in ("throughput", "all"):
        throughput(args.quick, args.workers)
    if args.part in ("schema", "all"):
        schema(args.quick, args.workers, args.backends.split(","))
    if args.part in ("memory", "all"):
        memory(args.quick, args.workers, args.jobs, args.memory_backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Incremental reruns with the task cache: a monthly ETL over 48 CSV files.

::

    python bench/incremental.py                  # 48 files of ~3 MB, process backend, 2 workers
    python bench/incremental.py --file-size 8MB --workers 4
    python bench/incremental.py --mode api       # in this process, a fresh executor per run
    python bench/incremental.py --mode api-shared  # in this process, one executor for all runs

The job: ``read_csv`` (one partition per monthly file) -> ``clean`` (per
partition) -> ``monthly`` (a per-partition summary by zone) -> ``combine``
(one table over all months), and ``write_parquet`` of the cleaned trips.
Three runs share one cache directory and one output directory:

1. cold: empty cache, no output;
2. unchanged: the same 48 files again;
3. one new file: a 49th month arrives.

``--mode cli`` (default) runs each as a scheduled job would:
``python -m flowyml run bench/incremental.py:build --cache-dir ...`` in a
fresh process, so every time includes the interpreter, the imports and, when
something must compute, the worker pool's start. ``--mode api`` runs the
three in this process, each in a fresh ``with ParallelExecutor(...)`` as a
scheduled job written as the docs show does: the pool starts only when a run
has tasks to execute. ``--mode api-shared`` runs the three inside one ``with``
block, as a notebook would. Targets (``api``): the unchanged rerun under 1%
of the cold run, the one-new-file rerun under 5%.

The data (49 files, generated once by ``bench/datagen.py``) lives in
``bench/_data/incremental``; each benchmark run copies 48 of them into a
fresh work directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowyml import Pipeline, read_csv, step, write_parquet  # noqa: E402

MONTHS = 48


# -- the job ----------------------------------------------------------------------------


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips: pd.DataFrame) -> pd.DataFrame:
    trips = trips.dropna(subset=["fare", "distance_km"])
    trips = trips[(trips["distance_km"] > 0) & (trips["fare"] > 0)]
    pickup = pd.to_datetime(trips["pickup_at"])
    dropoff = pd.to_datetime(trips["dropoff_at"])
    return trips.assign(
        month=pickup.dt.strftime("%Y-%m"),
        minutes=(dropoff - pickup).dt.total_seconds() / 60,
        fare_per_km=trips["fare"] / trips["distance_km"],
        tip_share=trips["tip"].fillna(0) / trips["fare"],
    )


@step(inputs=["clean"], outputs=["monthly"], per_partition=True)
def monthly(clean: pd.DataFrame) -> pd.DataFrame:
    grouped = clean.groupby(["month", "pickup_zone"])
    return grouped.agg(trips=("trip_id", "size"), revenue=("fare", "sum"), km=("distance_km", "sum"),
                       minutes=("minutes", "median"), tip_share=("tip_share", "mean")).reset_index()


@step(inputs=["monthly"], outputs=["by_zone"])
def combine(monthly: pd.DataFrame) -> pd.DataFrame:
    totals = monthly.groupby("pickup_zone")[["trips", "revenue", "km"]].sum()
    return totals.assign(revenue_per_km=totals["revenue"] / totals["km"]).sort_index()


def build(data_dir: str | None = None, out_dir: str | None = None) -> Pipeline:
    """The job; directories from ``INCREMENTAL_DATA`` / ``INCREMENTAL_OUT`` when not given."""
    data_dir = data_dir or os.environ["INCREMENTAL_DATA"]
    out_dir = out_dir or os.environ["INCREMENTAL_OUT"]
    return (
        Pipeline("monthly_trips")
        .add_source("trips", read_csv(os.path.join(data_dir, "trips_*.csv")))
        .add_step(clean)
        .add_step(monthly)
        .add_step(combine)
        .add_step(write_parquet(out_dir, input="clean"))
    )


# -- the benchmark ----------------------------------------------------------------------


def dataset(file_size: str) -> list[Path]:
    """49 monthly files of about ``file_size`` each, generated once."""
    from bench.datagen import _parse_size, make_csv_dataset

    folder = HERE / "_data" / f"incremental_{file_size}"
    files = sorted(folder.glob("trips_*.csv"))
    if len(files) != MONTHS + 1:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {MONTHS + 1} files of ~{file_size} in {folder} ...", flush=True)
        make_csv_dataset(folder, _parse_size(file_size) * (MONTHS + 1), files=MONTHS + 1)
        files = sorted(folder.glob("trips_*.csv"))
    return files


def run_cli(work: Path, cache: Path, backend: str, workers: int) -> tuple[float, dict]:
    import json

    report = work / "report.json"
    env = dict(os.environ, INCREMENTAL_DATA=str(work / "data"), INCREMENTAL_OUT=str(work / "out"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "flowyml", "run", f"{__file__}:build", "--cache-dir", str(cache),
               "--backend", backend, "--workers", str(workers), "--no-progress", "-q",
               "--report", str(report)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flowyml run failed ({done.returncode}):\n{done.stderr}")
    return elapsed, json.loads(report.read_text())["steps"]


def _seconds(command: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-size", default="3MB", help="size of each monthly CSV file (default 3MB)")
    parser.add_argument("--backend", default="process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=["cli", "api", "api-shared"], default="cli",
                        help="cli: a fresh process per run; api: a fresh executor per run in this process; "
                             "api-shared: one executor kept open for all runs")
    args = parser.parse_args()

    files = dataset(args.file_size)
    work = Path(tempfile.mkdtemp(prefix="flowyml-incremental-"))
    (work / "data").mkdir()
    for path in files[:MONTHS]:
        shutil.copy2(path, work / "data" / path.name)
    cache = work / "cache"
    size = sum(p.stat().st_size for p in files[:MONTHS]) / 1e6
    print(f"{MONTHS} files, {size:.0f} MB, backend {args.backend}, {args.workers} workers, mode {args.mode}")

    rows = []
    shared = None
    if args.mode in ("api", "api-shared"):
        from flowyml import ParallelExecutor

        if args.mode == "api-shared":
            shared = ParallelExecutor(max_workers=args.workers, backend=args.backend)
            shared.__enter__()

        def one_run():
            p = build(str(work / "data"), str(work / "out"))
            p.cache_dir = str(cache)
            start = time.perf_counter()
            if shared is not None:
                result = p.run(executor=shared, progress=False)
            else:  # entering and leaving count: a job pays both
                with ParallelExecutor(max_workers=args.workers, backend=args.backend) as executor:
                    result = p.run(executor=executor, progress=False)
            return time.perf_counter() - start, {n: s.to_dict() for n, s in result.steps.items()}
    else:
        def one_run():
            return run_cli(work, cache, args.backend, args.workers)

    try:
        for label in ("cold", "unchanged", "one new file"):
            if label == "one new file":
                shutil.copy2(files[MONTHS], work / "data" / files[MONTHS].name)
            elapsed, steps = one_run()
            computed = {name: (s.get("partitions") or 1) - s["cached_partitions"] for name, s in steps.items()
                        if s["status"] != "cached"}
            rows.append((label, elapsed, computed))
    finally:
        if shared is not None:
            shared.close()
        shutil.rmtree(work, ignore_errors=True)

    if args.mode == "cli":  # what any run pays before its first task
        rows.append(("(python + imports)", _seconds([sys.executable, "-c", "import flowyml.cli, pandas"]), {}))
        if args.backend == "process":
            code = f"from flowyml.executors.local import ProcessBackend; ProcessBackend({args.workers}).open()"
            rows.append(("(+ process pool)", _seconds([sys.executable, "-c", code]), {}))
    cold = rows[0][1]
    # A fresh process (cli) pays the interpreter and the imports every time.
    targets = {"cold": None, "unchanged": 0.05, "one new file": 0.10} if args.mode == "cli" else \
        {"cold": None, "unchanged": 0.01, "one new file": 0.05}
    print(f"\n{'run':<20}{'seconds':>9}{'of cold':>9}{'target':>8}  computed (tasks per step)")
    for label, elapsed, computed in rows:
        target = targets.get(label)
        ratio = elapsed / cold
        mark = "" if target is None else (" ok" if ratio < target else " MISSED")
        shown = ", ".join(f"{name} {count}" for name, count in computed.items()) or (
            "nothing" if label in targets else "fixed cost of a fresh process")
        print(f"{label:<20}{elapsed:>9.2f}{ratio:>8.1%}{'' if target is None else f'<{target:.0%}':>8}{mark}  {shown}")


if __name__ == "__main__":
    main()

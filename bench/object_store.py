"""Object storage: a partitioned ETL from S3 to S3, flowyml against dask.dataframe.

::

    python bench/object_store.py              # 100 partitions, every backend, median of 3
    python bench/object_store.py --quick      # 40 partitions, median of 2
    python bench/object_store.py --partitions 200 --backends thread,distributed

The job: CSV files on S3 (one partition per file), clean each partition
(drop trips without a fare, add the tip share), write Parquet to S3. The
same job by hand with ``dask.dataframe``::

    dd.read_csv("s3://bench/trips/*.csv", blocksize=None).map_partitions(clean).to_parquet(
        "s3://bench/out-dask", overwrite=True)

Both run on the same scheduler in the same run (the same reused pool, the
same LocalCluster) against one S3 API server (moto's, in its own process on
127.0.0.1, as the tests use). Prints seconds for each, the ratio
flowyml / dask.dataframe (target: at most 1.15), and how long flowyml's
commit took (its share of the run; target: under 5% at 100 partitions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[0] = str(HERE.parent)  # the repo root (bench/distributed.py would shadow distributed)
sys.path.append(str(HERE))
# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))

from flowyml import ParallelExecutor, Pipeline, read_csv, step, write_parquet  # noqa: E402
from tests.services import S3Server, free_port  # noqa: E402

from datagen import make_csv_dataset  # noqa: E402
from partitions import DaskScheduler, timed  # noqa: E402

BACKENDS = ["sync", "thread", "process", "distributed"]


def clean_frame(trips):
    kept = trips.dropna(subset=["fare"])
    kept = kept[kept["fare"] > 0]
    return kept.assign(tip_share=kept["tip"] / kept["fare"])


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips):
    return clean_frame(trips)


def flowyml_job(source: str, output: str) -> Pipeline:
    return (Pipeline("object_store")
            .add_source("trips", read_csv(f"{source}/*.csv"))
            .add_step(clean)
            .add_step(write_parquet(output, input="clean")))


def dask_job(source: str, output: str):
    import dask.dataframe as dd

    frame = dd.read_csv(f"{source}/*.csv", blocksize=None).map_partitions(clean_frame)
    return frame.to_parquet(output, overwrite=True, compute=False)


def upload(partitions: int, size: str, bucket: str) -> int:
    import fsspec

    folder = Path(tempfile.mkdtemp(prefix="flowyml-bench-"))
    try:
        paths = make_csv_dataset(folder, size, files=partitions)
        fs = fsspec.filesystem("s3")
        fs.mkdir(bucket)
        fs.put([str(p) for p in paths], [f"{bucket}/trips/{os.path.basename(p)}" for p in paths])
        return sum(os.path.getsize(p) for p in paths)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def commit_seconds(result) -> float:
    record = next(t for t in result.tasks if t.step == "write_parquet" and t.partition is None)
    return record.stop - record.start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 partitions, median of 2")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--size", default=None, help="total CSV size (default: 1 MB a partition)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    partitions = args.partitions or (40 if args.quick else 100)
    size = args.size or f"{partitions}MB"
    repeats = 2 if args.quick else 3
    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    log = Path(tempfile.mkdtemp(prefix="flowyml-moto-")) / "moto.log"
    server = S3Server(port, log).start()
    try:
        total = upload(partitions, size, "bench")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {partitions} CSV files on S3 "
              f"(moto on 127.0.0.1), {total / 1e6:.0f} MB; median of {repeats}, {args.workers} workers")
        print(f"{'backend':12s} {'flowyml':>9s} {'dask.df':>9s} {'ratio':>6s} {'commit':>8s} {'share':>6s}")
        for backend in args.backends.split(","):
            with ParallelExecutor(max_workers=args.workers, backend=backend) as executor:
                raw = DaskScheduler(backend, executor, args.workers)
                try:
                    pipeline = flowyml_job("s3://bench/trips", "s3://bench/out-flowyml")
                    collection = dask_job("s3://bench/trips", "s3://bench/out-dask")
                    raw.compute(collection)  # warm both sides (imports, s3fs clients in the workers)
                    pipeline.run(executor=executor, progress=False)
                    # Alternating repeats: the server's state (its objects, its memory) drifts
                    # over a run, and must weigh on both sides alike.
                    ours_times, theirs_times, commits = [], [], []
                    for _ in range(repeats):
                        seconds, result = timed(lambda: pipeline.run(executor=executor, progress=False), 1)
                        ours_times.append(seconds)
                        commits.append(commit_seconds(result) / result.duration_s)
                        theirs_times.append(timed(lambda: raw.compute(dask_job("s3://bench/trips",
                                                                              "s3://bench/out-dask")), 1)[0])
                    ours, theirs = statistics.median(ours_times), statistics.median(theirs_times)
                finally:
                    raw.close()
            share = statistics.median(commits)
            print(f"{backend:12s} {ours:8.2f}s {theirs:8.2f}s {ours / theirs:6.2f} {share * ours:7.3f}s "
                  f"{100 * share:5.1f}%", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

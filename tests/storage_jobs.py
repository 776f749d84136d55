"""The partitioned ETL the object-storage tests run: monthly trip CSVs in, clean Parquet out.

Importable by worker processes (steps pickle by reference); also a job file
for ``flowyml run tests/storage_jobs.py:etl`` (the sink's URL from
``FLOWYML_TEST_OUTPUT``, the source's from ``FLOWYML_TEST_INPUT``).
"""

from __future__ import annotations

import os
import time

import fsspec
import numpy as np
import pandas as pd

from flowyml import Pipeline, read_csv, step, write_parquet

MONTHS = ["2024-01", "2024-02", "2024-03", "2024-04"]


def month_frame(month: str, rows: int = 40) -> pd.DataFrame:
    """A month of trips, some without a fare (deterministic per month)."""
    rng = np.random.default_rng(int(month.replace("-", "")))
    fare = rng.uniform(2, 60, rows).round(2)
    fare[rng.integers(0, rows, rows // 8)] = np.nan
    return pd.DataFrame({
        "trip_id": [f"{month}-{i:04d}" for i in range(rows)],
        "fare": fare,
        "tip": rng.uniform(0, 10, rows).round(2),
        "zone": rng.choice(["a", "b", "c"], rows),
    })


def upload_months(url: str, months: list[str] = MONTHS) -> None:
    """One CSV per month under ``url`` (``trips_<month>.csv``)."""
    fs, root = fsspec.core.url_to_fs(url)
    for month in months:
        fs.pipe_file(f"{root}/trips_{month}.csv", month_frame(month).to_csv(index=False).encode())


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips: pd.DataFrame, signals: str = "") -> pd.DataFrame:
    """Drop trips without a fare; add the tip share.

    ``signals``: a folder URL (on the S3 server, which driver and workers both
    see). A partition whose month has a ``hold-<month>`` object there writes
    ``held-<month>`` and waits for ``release``: tests stop a run mid-write so.
    """
    if signals:
        fs, root = fsspec.core.url_to_fs(signals)
        month = str(trips["trip_id"].iloc[0])[:7]
        if fs.exists(f"{root}/hold-{month}"):
            from distributed import secede

            # Give this worker's thread back while waiting: the partitions queued
            # behind this one on the same worker then run (and are staged) meanwhile.
            secede()
            fs.pipe_file(f"{root}/held-{month}", b"")
            deadline = time.monotonic() + 120
            while not fs.exists(f"{root}/release") and time.monotonic() < deadline:
                fs.invalidate_cache()
                time.sleep(0.05)
    kept = trips.dropna(subset=["fare"])
    return kept.assign(tip_share=kept["tip"] / kept["fare"])


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean_or_fail(trips: pd.DataFrame, bad_month: str = "") -> pd.DataFrame:
    """``clean``, failing on ``bad_month``'s partition (after the others were written)."""
    if bad_month and str(trips["trip_id"].iloc[0]).startswith(bad_month):
        raise ValueError(f"bad data in {bad_month}")
    return clean.func(trips)


def expected_clean(months: list[str] = MONTHS) -> pd.DataFrame:
    """What ``clean`` of those months gives, by plain pandas."""
    frames = [clean.func(month_frame(month)) for month in months]
    return pd.concat(frames, ignore_index=True)


def etl(
    source_url: str,
    output_url: str,
    *,
    cache_dir: str | None = None,
    storage_options: dict | None = None,
    step_function=clean,
    params: dict | None = None,
) -> Pipeline:
    options = {"storage_options": storage_options} if storage_options is not None else {}
    return (
        Pipeline("storage_etl", cache_dir=cache_dir, **({"cache_storage_options": storage_options}
                                                          if storage_options is not None else {}))
        .add_source("trips", read_csv(f"{source_url}/trips_*.csv", **options))
        .add_step(step_function, name="clean", params=params or {})
        .add_step(write_parquet(output_url, input="clean", **options))
    )


def pipeline() -> Pipeline:
    """For ``flowyml run tests/storage_jobs.py:pipeline`` (URLs from the environment)."""
    return etl(
        os.environ["FLOWYML_TEST_INPUT"],
        os.environ["FLOWYML_TEST_OUTPUT"],
        params={"signals": os.environ.get("FLOWYML_TEST_SIGNALS", "")},
    )

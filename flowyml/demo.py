"""The bundled example: a taxi-trips ETL over ``data/`` (``flowyml demo``).

Six months of trips as monthly CSV files become six partitions. Cleaning and
enrichment run once per partition, in parallel; the summaries combine the
partitions; the enriched trips are written as Parquet, one file per
partition, committed only when all are written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .exceptions import DataError
from .io import read_csv, write_parquet
from .pipeline import Pipeline
from .step import step

__all__ = ["build_demo", "find_data_dir"]


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips: pd.DataFrame) -> pd.DataFrame:
    """Drop trips without a fare or with impossible values; add the duration."""
    trips = trips.dropna(subset=["fare"])
    trips = trips[(trips["distance_km"] > 0) & (trips["fare"] > 0) & (trips["passengers"] > 0)]
    pickup = pd.to_datetime(trips["pickup_at"])
    dropoff = pd.to_datetime(trips["dropoff_at"])
    return trips.assign(
        pickup_at=pickup,
        dropoff_at=dropoff,
        duration_min=(dropoff - pickup).dt.total_seconds() / 60,
    )


@step(inputs=["clean", "zones"], outputs=["enriched"], per_partition=True)
def enrich(clean: pd.DataFrame, zones: pd.DataFrame) -> pd.DataFrame:
    """Add the pickup borough (``zones`` arrives whole in every partition)."""
    lookup = zones.rename(columns={"zone": "pickup_zone", "borough": "pickup_borough"})
    return clean.merge(lookup[["pickup_zone", "pickup_borough"]], on="pickup_zone", how="left")


@step(inputs=["enriched"], outputs=["borough_summary"])
def borough_summary(enriched: pd.DataFrame) -> pd.DataFrame:
    """Trips, revenue and average fare per borough (gets all partitions, concatenated)."""
    summary = enriched.groupby("pickup_borough").agg(
        trips=("fare", "size"), revenue=("fare", "sum"), average_fare=("fare", "mean")
    )
    return summary.round(2).sort_values("revenue", ascending=False)


@step(inputs=["enriched"], outputs=["monthly_counts"], per_partition=True)
def monthly_counts(enriched: pd.DataFrame) -> pd.Series:
    """Trips per month and payment type, per partition: a small result from a big one."""
    month = enriched["pickup_at"].dt.to_period("M").astype(str)
    return enriched.groupby([month, "payment_type"]).size()


@step(inputs=["monthly_counts"], outputs=["payments_by_month"])
def payments_by_month(monthly_counts: pd.Series) -> pd.DataFrame:
    """Combine the per-partition counts into one table."""
    return monthly_counts.groupby(level=[0, 1]).sum().unstack(fill_value=0)


def find_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``./data``, else the ``data/`` beside the installed package."""
    candidates = [Path(explicit)] if explicit else [Path("data"), Path(__file__).resolve().parent.parent / "data"]
    for candidate in candidates:
        if (candidate / "trips").is_dir() and (candidate / "zones.csv").is_file():
            return candidate
    raise DataError(
        f"cannot find the demo data (trips/ and zones.csv) in {', '.join(map(str, candidates))}; "
        f"run from the flowyml checkout or pass --data DIR"
    )


def build_demo(data_dir: str | os.PathLike[str], output: str | os.PathLike[str]) -> Pipeline:
    """The demo pipeline reading ``data_dir`` and writing Parquet to ``output``.

    Examples
    --------
    >>> from flowyml import ParallelExecutor
    >>> pipeline = build_demo(find_data_dir(), "out/doctest-demo")
    >>> result = pipeline.run(executor=ParallelExecutor(backend="thread"), progress=False)
    >>> sorted(result.outputs)
    ['borough_summary', 'payments_by_month', 'written']
    """
    data_dir = Path(data_dir)
    return (
        Pipeline("taxi_trips")
        .add_source("trips", read_csv(str(data_dir / "trips" / "trips_*.csv")))
        .add_source("zones", read_csv(str(data_dir / "zones.csv")))
        .add_step(clean)
        .add_step(enrich)
        .add_step(borough_summary)
        .add_step(monthly_counts)
        .add_step(payments_by_month)
        .add_step(write_parquet(Path(output) / "enriched", input="enriched", name="written"))
    )

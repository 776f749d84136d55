"""A nightly ETL job over the taxi trips in ``data/``, made for ``flowyml run``.

Run it from the repository root (paths are relative to the current directory)::

    flowyml run examples/trips.py --param clean.min_fare=2.5 --report run.html
    flowyml run examples/trips.py --input trips='data/trips_parquet/*.parquet'

What it does, one partition per monthly file:

1. ``clean`` (per partition): drops trips without a fare, below ``min_fare``,
   with no passengers or no distance, or ending before they start.
2. ``enrich`` (per partition): adds the pickup borough from ``zones.csv``.
3. ``daily_revenue`` (whole): revenue and trips per day and borough.
4. ``tips_by_payment`` (whole): average tip share per payment type.
5. ``write_parquet``: the enriched trips to ``$TRIPS_OUTPUT`` (default
   ``out/trips``), one file per partition, replacing the previous output only
   once every file is written.

The steps work on CSV input (strings for timestamps) and on Parquet input
(typed timestamps) alike, so ``--input`` can switch formats.
"""

from __future__ import annotations

import os

import pandas as pd

from flowyml import Pipeline, read_csv, step, write_parquet

OUTPUT = os.environ.get("TRIPS_OUTPUT", "out/trips")


@step(inputs=["trips"], outputs=["clean"], per_partition=True)
def clean(trips: pd.DataFrame, min_fare: float = 0.0) -> pd.DataFrame:
    """Keep the trips a finance team would bill; parse the timestamps."""
    trips = trips.assign(
        pickup_at=pd.to_datetime(trips["pickup_at"]),
        dropoff_at=pd.to_datetime(trips["dropoff_at"]),
    )
    keep = (
        trips["fare"].notna()
        & (trips["fare"] >= min_fare)
        & (trips["passengers"] > 0)
        & (trips["distance_km"] > 0)
        & (trips["dropoff_at"] > trips["pickup_at"])
    )
    return trips[keep]


@step(inputs=["clean", "zones"], outputs=["enriched"], per_partition=True)
def enrich(clean: pd.DataFrame, zones: pd.DataFrame) -> pd.DataFrame:
    """Add the pickup borough; ``zones`` is small and arrives whole in every partition."""
    boroughs = zones.rename(columns={"zone": "pickup_zone", "borough": "pickup_borough"})
    return clean.merge(boroughs[["pickup_zone", "pickup_borough"]], on="pickup_zone", how="left")


@step(inputs=["enriched"], outputs=["daily_revenue"])
def daily_revenue(enriched: pd.DataFrame) -> pd.DataFrame:
    """Trips and revenue per day and borough (the partitions arrive concatenated)."""
    day = enriched["pickup_at"].dt.date.rename("day")
    return (
        enriched.groupby([day, "pickup_borough"])
        .agg(trips=("fare", "size"), revenue=("fare", "sum"))
        .round(2)
        .reset_index()
    )


@step(inputs=["enriched"], outputs=["tips_by_payment"])
def tips_by_payment(enriched: pd.DataFrame) -> pd.Series:
    """Average tip as a share of the fare, per payment type."""
    share = enriched["tip"] / enriched["fare"]
    return share.groupby(enriched["payment_type"]).mean().round(3).rename("tip_share")


pipeline = (
    Pipeline("trips_nightly")
    .add_source("trips", read_csv("data/trips/*.csv"))
    .add_source("zones", read_csv("data/zones.csv"))
    .add_step(clean)
    .add_step(enrich)
    .add_step(daily_revenue)
    .add_step(tips_by_payment)
    .add_step(write_parquet(OUTPUT, input="enriched", name="write_trips"))
)

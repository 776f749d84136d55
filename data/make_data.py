"""Generate flowyml's bundled example data: taxi trips, deterministic and small.

Writes, next to this file::

    zones.csv                       zone -> name, borough (the lookup table)
    trips/trips_2024-01.csv ...     one CSV per month, January to June 2024
    trips_parquet/trips_2024-01.parquet ...   the same rows, typed, several row groups each

Run ``python data/make_data.py``; the output is identical on every run
(numpy's seeded generator, one stream per month), so it is committed.

The rows look like a city's taxi records, flaws included, so that cleaning
matters in the examples: about 1.5% of fares are missing, a few are negative
(voided trips), some trips carry 0 passengers or 0 km, a few end before they
start, and some payment types are missing. ``bench/datagen.py`` reuses
:func:`make_trips` to build the same shape of data at any size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
MONTHS = pd.period_range("2024-01", "2024-06", freq="M")
ROWS_PER_MONTH = 4_000
SEED = 20240101

# (name, borough, weight as a pickup zone)
ZONES = [
    ("Midtown Center", "Manhattan", 9.0),
    ("Upper East Side South", "Manhattan", 7.0),
    ("Upper East Side North", "Manhattan", 6.0),
    ("Midtown East", "Manhattan", 6.0),
    ("Times Sq/Theatre District", "Manhattan", 6.0),
    ("Murray Hill", "Manhattan", 5.0),
    ("Union Sq", "Manhattan", 5.0),
    ("Lincoln Square East", "Manhattan", 4.5),
    ("Upper West Side South", "Manhattan", 4.5),
    ("East Village", "Manhattan", 4.0),
    ("Clinton East", "Manhattan", 4.0),
    ("Penn Station/Madison Sq West", "Manhattan", 4.0),
    ("Gramercy", "Manhattan", 3.5),
    ("West Village", "Manhattan", 3.5),
    ("Greenwich Village North", "Manhattan", 3.0),
    ("Lenox Hill West", "Manhattan", 3.0),
    ("Financial District North", "Manhattan", 2.5),
    ("Battery Park City", "Manhattan", 1.5),
    ("Central Harlem", "Manhattan", 1.5),
    ("East Harlem South", "Manhattan", 1.5),
    ("Washington Heights South", "Manhattan", 0.8),
    ("JFK Airport", "Queens", 4.0),
    ("LaGuardia Airport", "Queens", 3.5),
    ("Astoria", "Queens", 1.0),
    ("Long Island City/Hunters Point", "Queens", 1.0),
    ("Jackson Heights", "Queens", 0.6),
    ("Flushing", "Queens", 0.4),
    ("Forest Hills", "Queens", 0.4),
    ("Williamsburg (North Side)", "Brooklyn", 1.0),
    ("Park Slope", "Brooklyn", 0.8),
    ("Downtown Brooklyn/MetroTech", "Brooklyn", 0.8),
    ("Brooklyn Heights", "Brooklyn", 0.6),
    ("Greenpoint", "Brooklyn", 0.5),
    ("Bushwick South", "Brooklyn", 0.4),
    ("Crown Heights North", "Brooklyn", 0.4),
    ("Mott Haven/Port Morris", "Bronx", 0.3),
    ("Fordham South", "Bronx", 0.2),
    ("Riverdale/North Riverdale", "Bronx", 0.15),
    ("St. George/New Brighton", "Staten Island", 0.05),
    ("Newark Airport", "EWR", 0.3),
]

COLUMNS = [
    "trip_id", "pickup_at", "dropoff_at", "pickup_zone", "dropoff_zone",
    "passengers", "distance_km", "fare", "tip", "payment_type",
]

# Relative demand per hour of day: quiet nights, two rush hours, a busy evening.
HOURLY = np.array([
    2.0, 1.4, 1.0, 0.7, 0.6, 0.8, 1.8, 3.5, 4.6, 4.4, 4.0, 4.1,
    4.4, 4.4, 4.6, 4.8, 5.0, 5.6, 6.2, 5.8, 5.0, 4.6, 4.0, 3.0,
])


def zones_table() -> pd.DataFrame:
    """The lookup table: ``zone`` (int id, 1-based), ``name``, ``borough``."""
    return pd.DataFrame({
        "zone": np.arange(1, len(ZONES) + 1),
        "name": [name for name, _, _ in ZONES],
        "borough": [borough for _, borough, _ in ZONES],
    })


def make_trips(
    rng: np.random.Generator,
    rows: int,
    start: pd.Timestamp,
    end: pd.Timestamp,
    first_id: int = 1,
) -> pd.DataFrame:
    """``rows`` taxi trips picked up in ``[start, end)``, sorted by pickup time.

    Fully vectorized: a million rows take well under a second.
    """
    zone_ids = np.arange(1, len(ZONES) + 1)
    weights = np.array([weight for _, _, weight in ZONES])
    boroughs = np.array([borough for _, borough, _ in ZONES])
    airports = np.isin(zone_ids, [zone for zone, (name, _, _) in zip(zone_ids, ZONES) if "Airport" in name])

    # Pickup times: day uniform over the span, hour by demand, then minute and second.
    # A span that is not whole days (a benchmark chunk) wraps around, which
    # blurs the hourly pattern there a little.
    span_s = int((end - start).total_seconds())
    days = -(-span_s // 86_400)
    seconds = rng.integers(0, days, rows) * 86_400
    seconds += rng.choice(24, rows, p=HOURLY / HOURLY.sum()) * 3_600
    seconds += rng.integers(0, 3_600, rows)
    seconds = np.sort(seconds % span_s)
    pickup = start.as_unit("s") + pd.to_timedelta(seconds, unit="s")

    pickup_zone = rng.choice(zone_ids, rows, p=weights / weights.sum())
    # Most trips stay in their borough; the rest go anywhere, weighted the same way.
    dropoff_zone = rng.choice(zone_ids, rows, p=weights / weights.sum())
    same_borough = rng.random(rows) < 0.6
    for borough in np.unique(boroughs):
        in_borough = zone_ids[boroughs == borough]
        chosen = same_borough & (boroughs[pickup_zone - 1] == borough)
        local = weights[boroughs == borough]
        dropoff_zone[chosen] = rng.choice(in_borough, chosen.sum(), p=local / local.sum())

    distance = rng.lognormal(mean=1.0, sigma=0.65, size=rows)
    to_or_from_airport = airports[pickup_zone - 1] | airports[dropoff_zone - 1]
    distance[to_or_from_airport] = rng.normal(24.0, 5.0, to_or_from_airport.sum()).clip(8.0, 45.0)
    distance = distance.clip(0.2, 60.0).round(2)
    speed_kmh = rng.normal(17.0, 4.0, rows).clip(6.0, 45.0)
    minutes = distance / speed_kmh * 60 + rng.exponential(2.0, rows)
    dropoff = pickup + pd.to_timedelta(np.round(minutes * 60).astype(np.int64), unit="s")

    passengers = rng.choice(np.arange(1, 7), rows, p=[0.70, 0.15, 0.06, 0.04, 0.03, 0.02])
    fare = (3.0 + 1.75 * distance + 0.5 * minutes).round(2)
    payment = rng.choice(np.array(["card", "cash", "dispute", "no_charge"], dtype=object), rows,
                         p=[0.72, 0.25, 0.02, 0.01])
    tip = np.where(payment == "card", fare * rng.uniform(0.0, 0.3, rows), 0.0).round(2)

    frame = pd.DataFrame({
        "trip_id": np.arange(first_id, first_id + rows),
        "pickup_at": pickup,
        "dropoff_at": dropoff,
        "pickup_zone": pickup_zone,
        "dropoff_zone": dropoff_zone,
        "passengers": passengers,
        "distance_km": distance,
        "fare": fare,
        "tip": tip,
        "payment_type": payment,
    })
    return _add_flaws(rng, frame)


def _add_flaws(rng: np.random.Generator, frame: pd.DataFrame) -> pd.DataFrame:
    """The dirt real trip records have, at realistic rates."""
    rows = len(frame)

    def pick(rate: float) -> np.ndarray:
        return rng.random(rows) < rate

    frame.loc[pick(0.015), "fare"] = np.nan                       # meter data lost
    voided = pick(0.002)
    frame.loc[voided, "fare"] = -frame.loc[voided, "fare"]        # voided trips, negative
    frame.loc[pick(0.006), "passengers"] = 0                      # driver did not enter it
    frame.loc[pick(0.005), "distance_km"] = 0.0                   # GPS dropout
    frame.loc[pick(0.004), "payment_type"] = None                 # unknown payment
    backwards = pick(0.001)                                       # clock error: ends before it starts
    frame.loc[backwards, "dropoff_at"] = frame.loc[backwards, "pickup_at"] - pd.Timedelta(minutes=5)
    return frame


def write_csv(frame: pd.DataFrame, path: os.PathLike[str] | str) -> None:
    """The CSV layout of the bundled files: ISO timestamps, 2 decimals, empty for missing."""
    frame.to_csv(path, index=False, date_format="%Y-%m-%d %H:%M:%S", float_format="%.2f")


def main() -> None:
    (HERE / "trips").mkdir(exist_ok=True)
    (HERE / "trips_parquet").mkdir(exist_ok=True)
    zones_table().to_csv(HERE / "zones.csv", index=False)
    first_id = 1
    for number, month in enumerate(MONTHS):
        rng = np.random.default_rng([SEED, number])
        # Demand varies by month, as it does (January quiet, spring busier).
        rows = int(ROWS_PER_MONTH * (0.85 + 0.06 * number) * rng.uniform(0.97, 1.03))
        trips = make_trips(rng, rows, month.start_time, (month + 1).start_time, first_id)
        first_id += rows
        write_csv(trips, HERE / "trips" / f"trips_{month}.csv")
        trips.to_parquet(HERE / "trips_parquet" / f"trips_{month}.parquet", index=False, row_group_size=1_000)
        print(f"{month}: {rows} trips")


if __name__ == "__main__":
    main()

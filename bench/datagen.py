"""Benchmark data: the bundled taxi-trip shape (``data/make_data.py``) at any size.

::

    python bench/datagen.py csv bench/_data/trips_csv --size 2GB --files 8
    python bench/datagen.py parquet bench/_data/trips_parquet --size 500MB

Rows are generated vectorized in chunks of ``CHUNK_ROWS`` and appended to each
file, so memory stays around one chunk (tens of MB) whatever the size. Each
file covers one month (file *k* is month *k* from January 2024) and its size
is ``total_bytes / files`` within about one chunk. The output is deterministic
for a given seed, size and file count.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

CHUNK_ROWS = 250_000

__all__ = ["make_csv_dataset", "make_parquet_dataset"]


def _trip_module() -> ModuleType:
    """``data/make_data.py``, the one definition of what a trip looks like."""
    path = Path(__file__).resolve().parents[1] / "data" / "make_data.py"
    spec = importlib.util.spec_from_file_location("flowyml_make_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_size(size: int | str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(size)) if isinstance(size, str) else int(size)


def _month(number: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    month = pd.Period("2024-01", freq="M") + number
    return month.start_time, (month + 1).start_time


def _chunks(trips: ModuleType, rng: np.random.Generator, rows: int, number: int, first_id: int):
    """Trips of month ``number`` in time order, ``CHUNK_ROWS`` at a time."""
    start, end = _month(number)
    pieces = max(1, -(-rows // CHUNK_ROWS))
    step = (end - start) / pieces
    for piece in range(pieces):
        count = rows // pieces + (piece < rows % pieces)
        begin = start + step * piece
        frame = trips.make_trips(rng, count, begin, begin + step, first_id)
        first_id += count
        yield frame


def _bytes_per_row(sample: pd.DataFrame, write) -> float:
    buffer = io.BytesIO()
    write(sample, buffer)
    return len(buffer.getvalue()) / len(sample)


def _make_dataset(directory, total_bytes, files, seed, suffix, write_sample, write_file) -> list[str]:
    trips = _trip_module()
    target = _parse_size(total_bytes)
    Path(directory).mkdir(parents=True, exist_ok=True)
    start, end = _month(0)
    # A sample as large as a chunk: Parquet compresses a row group of that size.
    sample = trips.make_trips(np.random.default_rng([seed, 10**6]), CHUNK_ROWS, start, end)
    rows_per_file = max(1, round(target / files / _bytes_per_row(sample, write_sample)))
    paths = []
    for number in range(files):
        month = pd.Period("2024-01", freq="M") + number
        path = os.path.join(directory, f"trips_{month}{suffix}")
        rng = np.random.default_rng([seed, number])
        write_file(path, _chunks(trips, rng, rows_per_file, number, 1 + number * rows_per_file))
        paths.append(path)
    return paths


def make_csv_dataset(directory: str | os.PathLike[str], total_bytes: int | str, files: int = 8,
                     seed: int = 0) -> list[str]:
    """Write ``files`` CSV files of trips totalling about ``total_bytes``; return their paths.

    Same columns as ``data/trips/*.csv`` (header, ``2024-01-01 00:32:38``
    timestamps, empty fields for missing values; floats in shortest form).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # pyarrow's CSV writer is about 4x faster than DataFrame.to_csv; timestamps
    # cast to seconds print as "2024-01-01 00:32:38" like the bundled files.
    # The header line is written here, unquoted: pyarrow 14 (the oldest
    # supported) has no WriteOptions(quoting_header=...) and quotes it.
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")

    def header(table):
        return (",".join(table.schema.names) + "\n").encode()

    def to_table(frame):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        for name in ("pickup_at", "dropoff_at"):
            table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.timestamp("s")))
        return table

    def write_file(path, chunks):
        writer = None
        with pa.OSFile(str(path), "wb") as sink:
            for frame in chunks:
                table = to_table(frame)
                if writer is None:
                    sink.write(header(table))
                    writer = pacsv.CSVWriter(sink, table.schema, write_options=options)
                writer.write_table(table)
            if writer is not None:
                writer.close()

    def write_sample(frame, buffer):
        table = to_table(frame)
        buffer.write(header(table))
        pacsv.write_csv(table, buffer, write_options=options)

    return _make_dataset(directory, total_bytes, files, seed, ".csv", write_sample, write_file)


def make_parquet_dataset(directory: str | os.PathLike[str], total_bytes: int | str, files: int = 8,
                         seed: int = 0) -> list[str]:
    """Write ``files`` Parquet files of trips totalling about ``total_bytes`` on disk.

    Each chunk of ``CHUNK_ROWS`` rows is one row group, so
    ``read_parquet(..., split_row_groups=True)`` has partitions of that size.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write_file(path, chunks):
        writer = None
        try:
            for frame in chunks:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(path, table.schema)
                writer.write_table(table, row_group_size=len(frame))
        finally:
            if writer is not None:
                writer.close()

    def write_sample(frame, buffer):
        frame.to_parquet(buffer, index=False)

    return _make_dataset(directory, total_bytes, files, seed, ".parquet", write_sample, write_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["csv", "parquet"])
    parser.add_argument("directory")
    parser.add_argument("--size", default="500MB", help="total size, e.g. 500MB, 2GB (default 500MB)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make = make_csv_dataset if args.format == "csv" else make_parquet_dataset
    began = time.perf_counter()
    paths = make(args.directory, args.size, files=args.files, seed=args.seed)
    total = sum(os.path.getsize(path) for path in paths)
    print(f"wrote {len(paths)} files, {total / 1e6:.1f} MB, in {time.perf_counter() - began:.1f} s "
          f"to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

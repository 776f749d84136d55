"""Partitioned data: sources that plan partitions, and sinks that write them.

A source is a plan, not data: ``read_csv(...)`` and ``read_parquet(...)``
record what to read, and a run resolves them into partitions on the driver
before any task starts; each partition is read on the worker that runs it.
A sink (``write_parquet``, ``write_csv``) is a step that writes each
partition where it was computed and commits them all at once.

- :mod:`~flowyml.io.sources`: ``Source`` and ``Partition``, resolving paths
  and globs;
- :mod:`~flowyml.io.csv`: CSV sources and their blocks of whole lines;
- :mod:`~flowyml.io.parquet`: Parquet sources, per file or row group;
- :mod:`~flowyml.io.hive`: Hive ``key=value`` folders as columns, pruned by ``filters=``;
- :mod:`~flowyml.io.sinks`: writing partitions, the commit and its abort;
- :mod:`~flowyml.io.writers`: the ``write_parquet`` and ``write_csv`` steps;
- :mod:`~flowyml.io.hive_sink`: ``write_parquet(partition_on=, mode=)``, the Hive layout
  and its commit one partition at a time;
- :mod:`~flowyml.io.delta`: Delta Lake tables (``write_delta``, ``read_delta``) through deltalake;
- :mod:`~flowyml.io.filesystem`: fsspec filesystems, how paths are shown, and
  keeping credentials out of messages.
"""

from __future__ import annotations

from flowyml.io.csv import CsvPartition, CsvSource, read_csv
from flowyml.io.delta import DeltaCommit, write_delta
from flowyml.io.delta_read import DeltaSource, read_delta
from flowyml.io.parquet import ParquetPartition, ParquetSource, read_parquet
from flowyml.io.sinks import abort_output, commit_output, restage_partition, write_partition
from flowyml.io.sources import Partition, Source
from flowyml.io.writers import write_csv, write_parquet

__all__ = [
    "CsvPartition",
    "CsvSource",
    "DeltaCommit",
    "DeltaSource",
    "ParquetPartition",
    "ParquetSource",
    "Partition",
    "Source",
    "abort_output",
    "commit_output",
    "read_csv",
    "read_delta",
    "read_parquet",
    "restage_partition",
    "write_csv",
    "write_delta",
    "write_parquet",
    "write_partition",
]

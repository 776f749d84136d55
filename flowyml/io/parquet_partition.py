"""A Parquet partition: a whole file or one of its row groups, read on the worker.

Apart from :mod:`flowyml.io.parquet` (which plans them) so that
:mod:`flowyml.io.hive`, whose partitions extend these, and the planner can
import each other's pieces without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from flowyml._compat import arrow_to_pandas
from flowyml.io.filesystem import display_path, is_url
from flowyml.io.sources import Partition

__all__ = ["ParquetPartition", "filter_columns"]


@dataclass(frozen=True, kw_only=True)
class ParquetPartition(Partition):
    """A whole Parquet file (``row_group`` None) or one of its row groups."""

    row_group: int | None = None

    def _read(self) -> pd.DataFrame:
        if not is_url(self.path):
            if self.row_group is None:
                return pd.read_parquet(self.path, **self.read_kwargs)
            with open(self.path, "rb") as file:
                return _read_row_group(file, self.row_group, self.read_kwargs)
        with self.open() as file:
            if self.row_group is None:
                return pd.read_parquet(file, **self.read_kwargs)
            return _read_row_group(file, self.row_group, self.read_kwargs)

    def _range(self) -> tuple:
        if self.row_group is None:
            return (0, self.size)
        return ("row_group", self.row_group)

    def describe(self) -> str:
        where = display_path(self.path)
        return where if self.row_group is None else f"{where} (row group {self.row_group})"


def _read_row_group(file: Any, row_group: int, kwargs: dict[str, Any]) -> pd.DataFrame:
    """One row group of an open file, converted to pandas the way ``pandas.read_parquet`` converts a file."""
    import pyarrow.parquet as pq

    columns = kwargs.get("columns")
    filters = kwargs.get("filters")
    read_columns = columns
    if columns is not None and filters is not None:
        # Filter columns need not be among the selected ones, as in pandas.read_parquet.
        needed = filter_columns(filters)
        read_columns = None if needed is None else list(dict.fromkeys([*columns, *needed]))
    table = pq.ParquetFile(file).read_row_group(row_group, columns=read_columns, use_pandas_metadata=True)
    if filters is not None:
        table = table.filter(pq.filters_to_expression(filters) if isinstance(filters, list) else filters)
    if columns is not None and read_columns != columns:
        index_columns = [
            name for name in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(name, str)
        ]
        table = table.select([*columns, *[name for name in index_columns if name not in columns]])
    return arrow_to_pandas(table, kwargs.get("dtype_backend"), kwargs.get("to_pandas_kwargs"))


def filter_columns(filters: Any) -> list[str] | None:
    """Column names used by a DNF filter list; None for an expression (read every column)."""
    if not isinstance(filters, list):
        return None
    groups = filters if filters and isinstance(filters[0], list) else [filters]
    return [condition[0] for group in groups for condition in group]

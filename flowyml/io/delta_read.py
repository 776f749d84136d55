"""Reading Delta Lake tables: :func:`read_delta`, one partition per data file of a version.

Time travel with ``version=``; partition values become columns. A
partition's identity (its cache key) is the table, its version and the file.
Where the table is, and how its storage options reach delta-rs, is
:class:`~flowyml.io.delta.DeltaTableLocation`, shared with the writing side
in :mod:`flowyml.io.delta`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flowyml.exceptions import DataError, OptionError
from flowyml.io.delta import DeltaTableLocation
from flowyml.io.filesystem import display_path, is_url, redact_url
from flowyml.io.sources import Partition, Source

__all__ = ["DeltaPartition", "DeltaSource", "read_delta"]


@dataclass(frozen=True, kw_only=True)
class DeltaPartition(Partition):
    """One data file of a Delta table version; its partition values become columns."""

    table: str = ""
    version: int = 0
    partition_values: tuple = ()  # ((column, value), ...) typed, as the log says
    schema: Any = field(default=None, compare=False, repr=False)  # pyarrow.Schema of the table's columns read

    def identity(self) -> tuple:
        # The table, its version and the file: a new version is new data for the cache.
        return ("delta", redact_url(self.table), self.version, redact_url(self.path), self.size,
                self.options_token)

    def _check_version(self, now: tuple[int, int | str]) -> None:
        # Delta data files never change once written; only their size is checked.
        if now[0] != self.size:
            raise DataError(f"source {self.source!r}: {display_path(self.path)} is not the file the Delta "
                            f"log lists (size {now[0]}, expected {self.size}); run the pipeline again")

    def _read(self) -> pd.DataFrame:
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = dict(self.partition_values)
        wanted = [item.name for item in self.schema if item.name not in values]
        if is_url(self.path):
            with self.open() as handle:
                data = pq.read_table(handle, columns=wanted)
        else:
            data = pq.read_table(self.path, columns=wanted)
        for item in self.schema:
            if item.name in values:
                data = data.append_column(item, pa.array([values[item.name]] * data.num_rows, item.type))
        return data.select([item.name for item in self.schema]).to_pandas()

    def _range(self) -> tuple:
        return (0, self.size)

    def describe(self) -> str:
        return f"{display_path(self.path)} (Delta table version {self.version})"


class DeltaSource(Source):
    """A Delta table at a version: one partition per data file."""

    reader = "read_delta"

    def __init__(self, uri: str | os.PathLike[str], version: int | None, columns: Sequence[str] | None,
                 storage_options: dict[str, Any] | None) -> None:
        super().__init__(uri, {"storage_options": storage_options})
        if version is not None and (not isinstance(version, int) or version < 0):
            raise OptionError(f"{self._declared()}: version must be a table version (an int >= 0), got {version!r}")
        self.version = version
        self.columns = tuple(columns) if columns is not None else None
        if self.columns is not None:
            self.pandas_kwargs["columns"] = list(self.columns)
        if version is not None:
            self.pandas_kwargs["version"] = version

    def partitions(self) -> list[Partition]:
        import pyarrow as pa

        location = DeltaTableLocation(self.paths[0], self.storage_options, who=f"source {self.label!r}")
        table = location.load(self.version)
        if table is None:
            raise DataError(f"source {self.label!r}: {location.shown} is not a Delta table (no _delta_log); "
                            f"check the path")
        features = set(table.protocol().reader_features or ())
        unsupported = sorted(features & {"deletionVectors", "columnMapping"})
        if unsupported:
            raise DataError(f"source {self.label!r}: the Delta table {location.shown} uses {unsupported}, "
                            f"which read_delta cannot read file by file; read it with deltalake")
        version = int(table.version())
        schema = pa.schema(table.schema())
        if self.columns is not None:
            unknown = [name for name in self.columns if name not in schema.names]
            if unknown:
                raise DataError(f"source {self.label!r}: columns {unknown} are not in the Delta table "
                                f"{location.shown} (it has {schema.names})")
            schema = pa.schema([schema.field(name) for name in self.columns])
        partition_columns = list(table.metadata().partition_columns)
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        actions.sort(key=lambda action: action["path"])
        token = f"delta:{self.columns}"
        parts: list[Partition] = []
        for action in actions:
            values = tuple((column, action.get(f"partition.{column}")) for column in partition_columns
                           if column in schema.names)
            relative = action["path"]
            parts.append(DeltaPartition(
                index=len(parts), path=location.file_url(relative), size=int(action["size_bytes"]),
                mtime_ns=f"delta-v{version}", source=self.label, options_token=token,
                storage_options=location.fsspec_options() or None, table=location.url, version=version,
                partition_values=values, schema=schema,
            ))
        return parts


def read_delta(uri: str | os.PathLike[str], *, version: int | None = None, columns: Sequence[str] | None = None,
               storage_options: dict[str, Any] | None = None) -> DeltaSource:
    """A source reading the Delta Lake table at ``uri``: one partition per data file.

    ``version`` reads the table as it was at that version (time travel); by
    default the newest version, as it is when the run is planned. Partition
    values of a partitioned table become columns. The cache knows a Delta
    partition by the table, its version and the file.

    Examples
    --------
    >>> read_delta("out/trips", version=3)
    read_delta('out/trips', version=3)
    """
    return DeltaSource(uri, version, columns, storage_options)

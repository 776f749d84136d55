"""Parquet sources: one partition per file, or per row group.

Planning reads the footer of each file (schema and row groups) and nothing
else; a row group is read and converted to pandas the way
``pandas.read_parquet`` converts a whole file.
"""

from __future__ import annotations

from typing import Any

from dask.base import tokenize

from flowyml.exceptions import DataError, OptionError
from flowyml.io.filesystem import display_path, file_version, full_path
from flowyml.io.hive import plan_hive
from flowyml.io.parquet_partition import ParquetPartition
from flowyml.io.schema import FooterSchema, parquet_nulls, parquet_types, type_token
from flowyml.io.sources import Partition, Source, check_same_columns, resolve_files, with_order

__all__ = ["ParquetPartition", "ParquetSource", "read_parquet"]

# What a row-group read can honour; other pandas.read_parquet options need the whole file.
_ROW_GROUP_OPTIONS = frozenset({"columns", "filters", "dtype_backend", "to_pandas_kwargs", "partitioning"})


class ParquetSource(Source):
    """Parquet files: one partition per file, or per row group with ``split_row_groups``.

    Planning reads each file's footer (schema, row groups) and nothing else.
    A directory means every ``*.parquet`` file below it, sorted; its
    ``key=value`` folders become columns, and ``filters=`` on them prune
    folders at planning (:mod:`flowyml.io.hive`). A file without row groups
    stays one (empty, typed) partition when splitting.
    """

    reader = "read_parquet"

    def __init__(self, paths: Any, split_row_groups: bool, pandas_kwargs: dict[str, Any],
                 schema: Any = None) -> None:
        dtype = pandas_kwargs.pop("dtype", None)
        if dtype is not None and schema is not None:
            raise OptionError(f"read_parquet({paths!r}): give schema= or dtype=, not both "
                              "(they declare the same thing)")
        super().__init__(paths, pandas_kwargs, schema if dtype is None else dtype)
        self.split_row_groups = bool(split_row_groups)
        unsupported = sorted(set(self.pandas_kwargs) - _ROW_GROUP_OPTIONS)
        if self.split_row_groups and unsupported:
            raise OptionError(
                f"{self._declared()}: split_row_groups=True cannot pass {unsupported} to each row group; "
                f"it supports {sorted(_ROW_GROUP_OPTIONS)}. Drop split_row_groups to read whole files."
            )

    def _options_repr(self) -> str:
        split = ", split_row_groups=True" if self.split_row_groups else ""
        return split + super()._options_repr()

    def partitions(self) -> list[Partition]:
        import pyarrow.parquet as pq

        files = resolve_files(self.paths, (".parquet", ".parq", ".pq"), self.label, self.storage_options)
        wanted = self.pandas_kwargs.get("columns")
        hive = _plan_hive(self, files)
        if hive is not None:  # key=value folders: pruned by filters= before any footer is read
            files, wanted = hive.files, hive.file_columns(wanted)
            if not files:
                return []
        footers, columns = [], []
        for fs, path, _ in files:
            try:
                with fs.open(path, "rb") as file:
                    metadata = pq.ParquetFile(file).metadata
            except Exception as exc:
                raise DataError(
                    f"source {self.label!r}: {display_path(full_path(fs, path))} is not a readable Parquet file: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            footers.append(metadata)
            columns.append(_parquet_columns(metadata, wanted, full_path(fs, path), self.label))
        paths = [full_path(fs, path) for fs, path, _ in files]
        orders = check_same_columns(paths, columns, self.label)
        plans: list[tuple[Any, str, Any, int | None]] = []
        numbers: list[int] = []  # each partition's file, among the files kept
        for number, ((fs, path, _), metadata) in enumerate(zip(files, footers)):
            groups: list[int | None] = [None]
            if self.split_row_groups and metadata.num_row_groups > 0:
                groups = list(range(metadata.num_row_groups))
            plans.extend((fs, path, metadata, group) for group in groups)
            numbers.extend([number] * len(groups))
        types = self._types(plans, columns[0])
        token = tokenize("parquet", self.pandas_kwargs)
        if hive is not None:  # every partition's key columns carry every folder's values
            token = tokenize(token, hive.token())
        order_of = dict(zip(paths, orders))
        info_of = {full_path(fs, path): info for fs, path, info in files}
        parts: list[Partition] = []
        for (fs, path, _, group), part_types, number in zip(plans, types, numbers):
            where = full_path(fs, path)
            size, version = file_version(fs, path, info_of[where])
            order = order_of[where]
            fields: dict[str, Any] = dict(
                index=len(parts), path=where, size=size, mtime_ns=version, source=self.label,
                options_token=tokenize(with_order(token, order), type_token(part_types)), row_group=group,
                read_kwargs=self.pandas_kwargs, columns=order, storage_options=self.storage_options,
                types=part_types,
            )
            parts.append(ParquetPartition(**fields) if hive is None else hive.partition(number, **fields))
        return parts

    def _types(self, plans: list[tuple[Any, str, Any, int | None]], columns: tuple) -> list[tuple]:
        """Each partition's column types, from the footers (raises on a mismatch, before any task)."""
        units = []
        for index, (fs, path, metadata, group) in enumerate(plans):
            groups = list(range(metadata.num_row_groups)) if group is None else [group]
            units.append(FooterSchema(full_path(fs, path), index, metadata.schema.to_arrow_schema(),
                               parquet_nulls(metadata, list(columns), groups)))
        wanted = self.pandas_kwargs.get("columns")
        declared = {name: dtype for name, dtype in (self.schema or {}).items() if wanted is None or name in wanted}
        return parquet_types(units, columns, declared, self.label,
                             self.pandas_kwargs.get("dtype_backend"), self.pandas_kwargs.get("to_pandas_kwargs"))


def read_parquet(path: Any, *, split_row_groups: bool = False, schema: Any = None,
                 **pandas_kwargs: Any) -> ParquetSource:
    """Declare Parquet input: one partition per file, or per row group.

    Parameters
    ----------
    path : str, path, or list of them
        A file, a directory (every ``*.parquet`` below it, sorted) or a glob.
    split_row_groups : bool
        One partition per row group instead of per file (planned from the
        files' footers).
    schema : mapping or pyarrow.Schema, optional
        The type of some or all columns. Every file's footer is checked at
        planning, before any task runs: a column missing, of another type,
        or holding missing values the declared dtype cannot hold raises
        ``DataError`` naming the file, the partition and the column.
        ``dtype=`` is taken as a synonym. Undeclared columns that differ
        between files are unified (see ``docs/data-contracts.md``).
    **pandas_kwargs
        Passed to :func:`pandas.read_parquet` (``columns=``, ``filters=``...).
        With ``split_row_groups`` only ``columns``, ``filters``,
        ``dtype_backend`` and ``to_pandas_kwargs`` apply.

    Examples
    --------
    >>> read_parquet("data/trips_parquet", columns=["fare", "tip"])
    read_parquet('data/trips_parquet', columns=['fare', 'tip'])
    """
    return ParquetSource(path, split_row_groups, pandas_kwargs, schema)


def _plan_hive(source: ParquetSource, files: list) -> Any:
    return plan_hive(source.paths, files, source.pandas_kwargs, source.label, source.storage_options)


def _parquet_columns(metadata: Any, wanted: Any, path: str, label: str) -> tuple:
    schema = metadata.schema.to_arrow_schema()
    index_columns = {
        name for name in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(name, str)
    }
    names = tuple(name for name in schema.names if name not in index_columns)
    if wanted is None:
        return names
    missing = [name for name in wanted if name not in names and name not in index_columns]
    if missing:
        raise DataError(
            f"source {label!r}: {display_path(path)} has no column {missing} asked for in columns=; "
            f"it has {list(names)}"
        )
    return tuple(wanted)

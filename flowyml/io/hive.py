"""Reading Hive-partitioned Parquet: ``key=value/`` folders as typed columns, pruned by ``filters=``.

A directory source whose files sit in ``key=value`` folders
(``trips/year=2024/month=01/part-0.parquet``) gets one column per key, as
``pandas.read_parquet(folder)`` (pyarrow's ``partitioning="hive"``) gives
them:

- types are inferred as pyarrow infers them: a key whose every value is an
  int32 is an integer, any other a string; ``__HIVE_DEFAULT_PARTITION__`` is
  a missing value; values are URL-decoded. The columns are categoricals whose
  categories are every value found under the folder, in path order, so every
  partition has the same dtype (the categories of one partition are those of
  all). ``partitioning=`` a ``pyarrow.Schema`` or a mapping of key to type
  gives plain columns of those types instead; ``partitioning=None`` reads no
  key at all.
- ``filters=`` in pyarrow's DNF form (``[("year", "=", 2024), ("month", ">=", 6)]``,
  or a list of such lists for OR) is decided per folder at planning for the
  conditions on keys: a file none of whose OR groups can match is not
  planned, and so never opened; the conditions left, on ordinary columns, are
  applied to the rows of the files kept, as ``pandas.read_parquet(filters=...)``
  does. A ``pyarrow.compute.Expression`` prunes nothing and applies to rows.

Only the folders below a directory given to ``read_parquet`` count (a glob
or a file list has no base to count from, as in pyarrow).
"""

from __future__ import annotations

import glob as _glob
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pandas as pd
from dask.base import tokenize

from flowyml._compat import arrow_to_pandas
from flowyml.exceptions import OptionError
from flowyml.io.filesystem import filesystem_for, is_url
from flowyml.io.parquet_partition import ParquetPartition, filter_columns

__all__ = ["HIVE_NULL", "HiveColumns", "HivePartition", "HivePlan", "folder_keys", "plan_hive"]

#: The folder value pyarrow, Hive and Spark write for a missing key.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_INT32 = (-(2**31), 2**31 - 1)
# The read_parquet options a Hive partition honours.
_OPTIONS = frozenset({"columns", "filters", "partitioning", "dtype_backend", "to_pandas_kwargs"})

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
    "<=": operator.le, ">=": operator.ge,
    "in": lambda value, options: value in options,
    "not in": lambda value, options: value not in options,
}


def folder_keys(relative: str) -> list[tuple[str, str | None]]:
    """The ``(key, value)`` pairs of a file's folders below the source's directory, in order.

    >>> folder_keys("year=2024/month=01/part-0.parquet")
    [('year', '2024'), ('month', '01')]
    """
    pairs: list[tuple[str, str | None]] = []
    for segment in relative.strip("/").split("/")[:-1]:
        key, equals, value = segment.partition("=")
        if equals and key:
            decoded = unquote(value)
            pairs.append((unquote(key), None if decoded == HIVE_NULL else decoded))
    return pairs


@dataclass(frozen=True)
class HiveColumns:
    """The key columns of a source: names, pyarrow value types, and the dictionary of each (inferred keys)."""

    names: tuple[str, ...]
    types: tuple[Any, ...]
    dictionaries: tuple[Any, ...] | None  # pyarrow arrays; None: explicit types, plain columns

    def __dask_tokenize__(self) -> tuple:
        dictionaries = None if self.dictionaries is None else [d.to_pylist() for d in self.dictionaries]
        return ("hive-columns", self.names, [str(t) for t in self.types], dictionaries)

    def arrays(self, values: tuple, rows: int) -> list[Any]:
        """The key columns of a file of ``rows`` rows, as pyarrow arrays."""
        import pyarrow as pa

        arrays = []
        for position, value in enumerate(values):
            if self.dictionaries is None:
                arrays.append(pa.array([value] * rows, type=self.types[position]))
                continue
            dictionary = self.dictionaries[position]
            index = None if value is None else dictionary.to_pylist().index(value)
            indices = pa.array([index] * rows, type=pa.int32())
            arrays.append(pa.DictionaryArray.from_arrays(indices, dictionary))
        return arrays


@dataclass(frozen=True, kw_only=True)
class HivePartition(ParquetPartition):
    """A Parquet file (or row group) in Hive folders: its rows, plus its folders' keys as columns."""

    hive_values: tuple = ()
    hive_columns: HiveColumns | None = field(default=None, compare=False, repr=False)
    row_filter: Any = field(default=None, compare=False, repr=False)

    def _read(self) -> pd.DataFrame:
        if not is_url(self.path):
            with open(self.path, "rb") as file:
                return self._read_file(file)
        with self.open() as file:
            return self._read_file(file)

    def _read_file(self, file: Any) -> pd.DataFrame:
        import pyarrow.parquet as pq

        keys = self.hive_columns
        assert keys is not None
        columns = self.read_kwargs.get("columns")
        read_columns = None
        # Filter columns need not be among the selected ones; an Expression's are unknown: read all.
        if columns is not None and (self.row_filter is None or isinstance(self.row_filter, list)):
            needed = list(columns) + (filter_columns(self.row_filter) or [])
            read_columns = [name for name in dict.fromkeys(needed) if name not in keys.names]
        parquet = pq.ParquetFile(file)
        if self.row_group is None:
            table = parquet.read(columns=read_columns, use_pandas_metadata=True)
        else:
            table = parquet.read_row_group(self.row_group, columns=read_columns, use_pandas_metadata=True)
        metadata = table.schema.metadata
        for name, array in zip(keys.names, keys.arrays(self.hive_values, table.num_rows)):
            if name not in table.column_names:  # a file that stores its key column keeps its own
                table = table.append_column(name, array)
        table = table.replace_schema_metadata(metadata)
        if self.row_filter is not None:
            table = table.filter(pq.filters_to_expression(self.row_filter)
                                 if isinstance(self.row_filter, list) else self.row_filter)
        if columns is not None:
            index_columns = [name for name in (table.schema.pandas_metadata or {}).get("index_columns", [])
                             if isinstance(name, str) and name not in columns]
            table = table.select([*columns, *index_columns])
        return arrow_to_pandas(table, self.read_kwargs.get("dtype_backend"), self.read_kwargs.get("to_pandas_kwargs"))


@dataclass
class HivePlan:
    """What planning decided for a Hive source: the files kept, their keys and row filters."""

    files: list[tuple[Any, str, Any]]
    values: list[tuple]
    row_filters: list[Any]
    columns: HiveColumns
    pruned: int = 0

    def file_columns(self, wanted: Sequence[str] | None) -> list[str] | None:
        """``columns=`` without the keys: what each file must hold."""
        return None if wanted is None else [name for name in wanted if name not in self.columns.names]

    def token(self) -> str:
        return tokenize(self.columns)

    def partition(self, number: int, **fields: Any) -> HivePartition:
        """The partition of kept file ``number``; ``fields`` as for a ``ParquetPartition``."""
        read_kwargs = {key: value for key, value in fields.pop("read_kwargs").items()
                       if key not in ("filters", "partitioning")}
        order = fields.pop("columns")
        if order is not None and read_kwargs.get("columns") is None:
            order = (*order, *self.columns.names)
        row_filter = self.row_filters[number]
        token = tokenize(fields.pop("options_token"), row_filter)
        return HivePartition(**fields, columns=order, read_kwargs=read_kwargs, hive_values=self.values[number],
                             hive_columns=self.columns, row_filter=row_filter, options_token=token)


def plan_hive(patterns: Sequence[str], files: list[tuple[Any, str, Any]], options: dict[str, Any], label: str,
              storage_options: dict[str, Any] | None) -> HivePlan | None:
    """Keys of every file below a directory source, and the files ``filters=`` leaves; None: no key folder.

    Opens no file: keys come from the paths, pruning from the keys.
    """
    partitioning = options.get("partitioning", "hive")
    if partitioning is None:
        return None
    roots = _roots(patterns, storage_options, label)
    found = [folder_keys(_relative(path, roots)) for _, path, _ in files]
    if not any(found):
        return None
    unsupported = sorted(set(options) - _OPTIONS)
    if unsupported:
        raise OptionError(f"source {label!r}: with key=value folders read_parquet reads each file through "
                          f"pyarrow and cannot pass {unsupported}; it supports {sorted(_OPTIONS)}")
    explicit = _explicit_types(partitioning, label)
    if explicit is not None:
        names = tuple(explicit)
    else:
        names = tuple(dict.fromkeys(key for pairs in found for key, _ in pairs))
    if not names:
        return None
    raw = [[dict(pairs).get(name) for name in names] for pairs in found]
    columns = _columns(names, raw, explicit)
    values = [tuple(_typed(value, columns.types[i]) for i, value in enumerate(row)) for row in raw]
    filters = options.get("filters")
    kept, kept_values, row_filters = [], [], []
    for entry, typed in zip(files, values):
        decision = _decide(filters, dict(zip(names, typed)), label)
        if decision is _PRUNED:
            continue
        kept.append(entry)
        kept_values.append(typed)
        row_filters.append(decision)
    return HivePlan(kept, kept_values, row_filters, columns, pruned=len(files) - len(kept))


# -- keys and their types ---------------------------------------------------------------


def _roots(patterns: Sequence[str], storage_options: dict[str, Any] | None, label: str) -> list[str]:
    roots = []
    for pattern in patterns:
        if _glob.has_magic(pattern):
            continue
        _, root = filesystem_for(pattern, storage_options, who=f"source {label!r}")
        roots.append(root.rstrip("/") + "/")
    return roots


def _relative(path: str, roots: list[str]) -> str:
    for root in roots:
        if path.startswith(root):
            return path[len(root):]
    return path.rsplit("/", 1)[-1]  # a file named directly, or matched by a glob: no folder counts


def _explicit_types(partitioning: Any, label: str) -> dict[str, Any] | None:
    import pyarrow as pa

    if isinstance(partitioning, str) and partitioning == "hive":
        return None
    if isinstance(partitioning, pa.Schema):
        return {name: partitioning.field(name).type for name in partitioning.names}
    if isinstance(partitioning, dict):
        try:
            return {name: _arrow_type(kind) for name, kind in partitioning.items()}
        except (TypeError, ValueError) as exc:
            raise OptionError(f"source {label!r}: partitioning= has a type pyarrow does not know: {exc}") from exc
    raise OptionError(
        f"source {label!r}: partitioning= takes \"hive\" (the default: keys and their types inferred), "
        f"a pyarrow.Schema or a mapping of key to type, or None (no key columns); got {partitioning!r}"
    )


def _arrow_type(kind: Any) -> Any:
    import pyarrow as pa

    if isinstance(kind, pa.DataType):
        return kind
    return pa.from_numpy_dtype(pd.api.types.pandas_dtype(kind)) if kind not in ("str", "string") else pa.string()


def _columns(names: tuple[str, ...], raw: list[list[str | None]], explicit: dict[str, Any] | None) -> HiveColumns:
    import pyarrow as pa

    if explicit is not None:
        return HiveColumns(names, tuple(explicit[name] for name in names), None)
    types, dictionaries = [], []
    for position in range(len(names)):
        seen = [value for value in dict.fromkeys(row[position] for row in raw) if value is not None]
        kind = pa.int32() if seen and all(_is_int32(value) for value in seen) else pa.string()
        types.append(kind)
        dictionaries.append(pa.array([_typed(value, kind) for value in seen], type=kind))
    return HiveColumns(names, tuple(types), tuple(dictionaries))


def _is_int32(text: str) -> bool:
    try:
        number = int(text)
    except ValueError:
        return False
    return _INT32[0] <= number <= _INT32[1]


def _typed(value: str | None, kind: Any) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return value
    return pa.array([value]).cast(kind)[0].as_py()


# -- filters ----------------------------------------------------------------------------

_PRUNED = object()


def _decide(filters: Any, keys: dict[str, Any], label: str) -> Any:
    """For one file: ``_PRUNED``, or the row filter left once its keys are known (None: every row)."""
    if filters is None:
        return None
    if not isinstance(filters, list):
        return filters  # an Expression: applied to the rows, keys included
    groups = filters if filters and isinstance(filters[0], list) else [filters]
    left: list[list[tuple]] = []
    for group in groups:
        rest = []
        matches = True
        for condition in group:
            name, op, value = condition
            if name not in keys:
                rest.append(tuple(condition))
            elif not _holds(keys[name], op, value, label):
                matches = False
                break
        if not matches:
            continue
        if not rest:
            return None  # this OR group holds for every row of the file
        left.append(rest)
    return left if left else _PRUNED


def _holds(key: Any, op: str, value: Any, label: str) -> bool:
    compare = _COMPARE.get(op)
    if compare is None:
        raise OptionError(f"source {label!r}: filters= operator {op!r} is not one of {sorted(_COMPARE)}")
    if key is None:  # a missing key compares as null: no condition holds
        return False
    if op in ("in", "not in"):
        return compare(key, {_like(key, item) for item in value})
    try:
        return bool(compare(key, _like(key, value)))
    except TypeError:
        return False


def _like(key: Any, value: Any) -> Any:
    """``value`` as the key's type, as pyarrow casts a filter's scalar to the column's."""
    if isinstance(key, str) and not isinstance(value, str):
        return str(value)
    if isinstance(key, int) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value

"""Schemas of sources: declared types, and one set of dtypes across partitions.

A source may declare its schema (``schema=`` as a mapping of column to dtype
or a ``pyarrow.Schema``; ``dtype=`` as pandas takes it). Declared or not,
planning fixes one pandas dtype per column, recorded on every partition as a
tuple of :class:`ColumnType`, and :func:`conform` holds each partition to it
as it loads (casting what is compatible, raising
:class:`~flowyml.exceptions.DataError` for what is not), so partitions never
reach the steps with different dtypes.

How the types are fixed differs by format (the rules are in
``docs/data-contracts.md``):

- Parquet (:func:`parquet_types`): from the footers, at planning. Columns
  whose type or null-ness varies between partitions are unified as
  ``pyarrow.unify_schemas(..., promote_options="permissive")`` does;
  incompatible types, and files that do not match a declared type, raise
  before any task runs.
- CSV (:func:`csv_types`): from a sample of the first file read at planning;
  each partition infers its own types as pandas does and is then cast to the
  sampled kind's type: integers to ``Int64``, booleans to ``boolean`` (both
  nullable, so a missing value in one file cannot change them), floats to
  ``float64``. A partition whose column is of another kind (number against
  text, date against text) raises as it loads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flowyml.exceptions import DataError, OptionError

__all__ = [
    "ColumnType",
    "FooterSchema",
    "conform",
    "csv_read_dtypes",
    "csv_types",
    "declared_schema",
    "first_bad_row",
    "kind_of",
    "parquet_types",
    "type_token",
]

#: Where a column's type came from, in messages: the declaration.
DECLARED = "declared"


@dataclass(frozen=True)
class ColumnType:
    """The dtype one column must have in every partition.

    Attributes
    ----------
    name : str
        The column.
    dtype : str
        The pandas dtype, as ``str(dtype)`` (``"Int64"``, ``"float64"``, ``"str"``...):
        plain data, so that it hashes into cache keys and pickles small.
    origin : str
        ``"declared"``, or the file (and how) the type was found, for messages.
    """

    name: str
    dtype: str
    origin: str


def type_token(types: tuple[ColumnType, ...]) -> tuple:
    """What of ``types`` changes the data read, for cache keys: names and dtypes, not where they came from.

    A file read alone or among others keeps its cache key as long as its
    columns get the same types.
    """
    return tuple((column.name, column.dtype) for column in types)


def declared_schema(schema: Any, who: str) -> dict[str, str] | None:
    """``schema=`` (a mapping or a ``pyarrow.Schema``) as column -> pandas dtype name.

    >>> declared_schema({"fare": float, "trip_id": "Int64"}, "read_csv('x.csv')")
    {'fare': 'float64', 'trip_id': 'Int64'}
    """
    if schema is None:
        return None
    import pyarrow as pa

    if isinstance(schema, pa.Schema):
        return {field.name: _dtype_name(field, who, field.name) for field in schema}
    if not isinstance(schema, Mapping):
        raise OptionError(f"{who}: schema= takes a mapping of column to dtype or a pyarrow.Schema, "
                          f"not {type(schema).__name__}")
    return {str(name): _dtype_name(value, who, str(name)) for name, value in schema.items()}


def _dtype_name(value: Any, who: str, column: str) -> str:
    import pyarrow as pa

    try:
        if isinstance(value, pa.Field):
            return str(_from_arrow(value.type, value.nullable))
        if isinstance(value, pa.DataType):
            return str(_from_arrow(value, True))
        if value is str or value == "str":
            # Text as this pandas reads it ("object" before pandas 3), not numpy's
            # fixed-width "<U0", which pandas 2 makes of ``str``.
            return str(_text_dtype())
        return str(pd.api.types.pandas_dtype(value))
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise OptionError(f"{who}: the type {value!r} of column {column!r} is not a dtype pandas knows "
                          f"({exc})") from None


def _from_arrow(arrow_type: Any, nullable: bool) -> Any:
    """The pandas dtype for an Arrow type: nullable integers and booleans stay nullable (``Int64``)."""
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        dtype = np.dtype(arrow_type.to_pandas_dtype())
        return pd.api.types.pandas_dtype(dtype.name.capitalize()) if nullable else dtype
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype() if nullable else np.dtype(bool)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return _text_dtype()
    if pa.types.is_timestamp(arrow_type):
        unit = arrow_type.unit
        if arrow_type.tz is not None:
            return pd.DatetimeTZDtype(unit, arrow_type.tz)
        return np.dtype(f"datetime64[{unit}]")
    if pa.types.is_floating(arrow_type):
        return np.dtype(arrow_type.to_pandas_dtype())
    return pd.ArrowDtype(arrow_type)


@functools.cache
def _text_dtype() -> Any:
    """What pandas reads text as: ``object`` before pandas 3, ``str`` since."""
    return pd.Series(["a"]).dtype


@functools.cache
def to_dtype(name: str) -> Any:
    """The pandas dtype named ``name`` (a :attr:`ColumnType.dtype`)."""
    return pd.api.types.pandas_dtype(name)


def kind_of(dtype: Any) -> str:
    """``integer``, ``float``, ``bool``, ``datetime``, ``text`` or ``other``: what unifies with what.

    >>> kind_of("Int64"), kind_of("float64"), kind_of("object")
    ('integer', 'float', 'text')
    """
    dtype = to_dtype(dtype) if isinstance(dtype, str) else dtype
    types = pd.api.types
    if isinstance(dtype, pd.CategoricalDtype):
        return "other"
    if types.is_bool_dtype(dtype):
        return "bool"
    if types.is_integer_dtype(dtype):
        return "integer"
    if types.is_float_dtype(dtype):
        return "float"
    if types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if types.is_string_dtype(dtype) or dtype == np.dtype(object):
        return "text"
    return "other"


# -- CSV ---------------------------------------------------------------------------------

#: Rows of the first file read at planning to learn the kind of each column.
CSV_SAMPLE_ROWS = 1000

#: The type every partition gets for a column of this kind in the sample (None: the sample's own).
_CSV_UNIFIED = {"integer": "Int64", "bool": "boolean", "float": "float64"}


def csv_types(sample: pd.DataFrame, declared: Mapping[str, str], sampled_from: str) -> tuple[ColumnType, ...]:
    """Each column's type for every partition: declared, else from the first file's sample.

    Integer columns become ``Int64`` and boolean ones ``boolean``, so that a
    missing value in some partition does not make its dtype differ; a column
    with no value in the sample is read as text (see :func:`csv_read_dtypes`).
    """
    origin = f"as sampled from {sampled_from}"
    types = []
    for name in sample.columns:
        if name in declared:
            types.append(ColumnType(name, declared[name], DECLARED))
            continue
        column = sample[name]
        kind = kind_of(column.dtype)
        if column.isna().all():
            dtype = str(_text_dtype())
        elif kind == "text" and pd.api.types.infer_dtype(column, skipna=True) == "boolean":
            dtype = "boolean"  # True/False with gaps: pandas leaves them object
        else:
            dtype = _CSV_UNIFIED.get(kind, str(column.dtype))
        types.append(ColumnType(name, dtype, origin))
    return tuple(types)


def csv_read_dtypes(types: tuple[ColumnType, ...], user_dtype: Any, sample: pd.DataFrame,
                    parse_dates: Any) -> dict[str, Any]:
    """``dtype=`` for ``pandas.read_csv``: what pandas can parse directly.

    Declared types go to pandas (datetimes excepted: pandas parses those only
    through ``parse_dates``, and :func:`conform` converts them). A column
    empty in the sample is read as text, so that no partition parses it as
    numbers.
    """
    dates = set(parse_dates) if isinstance(parse_dates, (list, tuple)) else set()
    wanted: dict[str, Any] = dict(user_dtype) if isinstance(user_dtype, Mapping) else {}
    for column in types:
        if column.name in wanted or column.name in dates:
            continue
        if column.origin == DECLARED:
            if kind_of(column.dtype) != "datetime":
                wanted[column.name] = column.dtype
        elif sample[column.name].isna().all():
            wanted[column.name] = str
    return wanted


# -- Parquet -----------------------------------------------------------------------------


@dataclass
class FooterSchema:
    """What planning knows of one Parquet partition: its file, index and footer."""

    path: str
    index: int
    schema: Any  # pyarrow.Schema of the file
    nulls: dict[str, bool]  # column -> may hold a missing value (from the row groups' statistics)


def parquet_nulls(metadata: Any, columns: list[str], row_groups: list[int]) -> dict[str, bool]:
    """Column -> whether the row groups may hold a missing value (no statistics: they may)."""
    positions = {}
    for position in range(metadata.num_columns):
        path = metadata.schema.column(position).path
        if path in columns:
            positions[path] = position
    nulls = {}
    for name, position in positions.items():
        found = False
        for group in row_groups:
            statistics = metadata.row_group(group).column(position).statistics
            if statistics is None or not statistics.has_null_count or statistics.null_count > 0:
                found = True
                break
        nulls[name] = found
    return nulls


def parquet_types(units: list[FooterSchema], columns: tuple, declared: Mapping[str, str], label: str,
                  dtype_backend: Any, to_pandas_kwargs: Any) -> list[tuple[ColumnType, ...]]:
    """Per partition, the columns to cast as it loads; raise on a mismatch, before any task.

    A declared column must be in every file with a type that promotes to
    the declared one (``int32`` data in an ``int64`` column; missing values
    only where the declared dtype holds them), and is cast to it. An
    undeclared column whose Arrow type or null-ness varies between
    partitions is cast to the pandas dtype of the unified type; columns that
    agree everywhere are left as pandas reads them.
    """
    shared: list[ColumnType] = []
    for name in dict.fromkeys([*columns, *declared]):
        if name in declared:
            for unit in units:
                _check_declared(unit, name, declared[name], label)
            shared.append(ColumnType(name, declared[name], DECLARED))
            continue
        keys = {(unit.schema.field(name).type, unit.nulls.get(name, False), _numpy_type(unit.schema, name))
                for unit in units}
        if len(keys) == 1:
            continue
        unified, first = _unify_column(units, name, label)
        nulls = any(unit.nulls.get(name, False) for unit in units)
        dtype = _pandas_dtype(unified, nulls, dtype_backend, to_pandas_kwargs)
        shared.append(ColumnType(name, str(dtype), f"unified with {first}"))
    return [tuple(shared)] * len(units)


def _numpy_type(schema: Any, name: str) -> Any:
    """The dtype pandas wrote in the file's metadata (``Int64``, ``category``...), if any."""
    for column in (schema.pandas_metadata or {}).get("columns", []):
        if column.get("name") == name:
            return column.get("numpy_type")
    return None


def _unify_column(units: list[FooterSchema], name: str, label: str) -> tuple[Any, str]:
    import pyarrow as pa

    first = units[0]
    unified = first.schema.field(name).type
    for unit in units[1:]:
        found = unit.schema.field(name).type
        try:
            unified = pa.unify_schemas([pa.schema([(name, unified)]), pa.schema([(name, found)])],
                                       promote_options="permissive").field(name).type
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(
                f"source {label!r}: partition {unit.index}, {_shown(unit.path)}: column {name!r} is {_plain(found)}, "
                f"expected {_plain(unified)} as in {_shown(first.path)}; declare the column's type with schema= "
                f"if the files really differ"
            ) from None
    return unified, _shown(first.path)


def _pandas_dtype(arrow_type: Any, nulls: bool, dtype_backend: Any, to_pandas_kwargs: Any) -> Any:
    """The dtype pandas gives an Arrow column of this type, with a missing value or without."""
    import pyarrow as pa

    from flowyml._compat import arrow_to_pandas

    values = pa.array([None] if nulls else [], type=arrow_type)
    return arrow_to_pandas(pa.table({"column": values}), dtype_backend, to_pandas_kwargs).dtypes["column"]


def _check_declared(unit: FooterSchema, name: str, dtype: str, label: str) -> None:
    import pyarrow as pa

    where = f"source {label!r}: partition {unit.index}, {_shown(unit.path)}: column {name!r}"
    if name not in unit.schema.names:
        raise DataError(f"{where} is missing; the schema declares it {dtype}")
    found = _plain(unit.schema.field(name).type)
    wanted = _arrow_for(to_dtype(dtype))
    if wanted is not None:
        try:
            merged = pa.unify_schemas([pa.schema([(name, found)]), pa.schema([(name, wanted)])],
                                      promote_options="permissive").field(name).type
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            merged = None
        if merged != wanted:
            raise DataError(f"{where} is {found}, expected {dtype} (declared)")
    if unit.nulls.get(name) and isinstance(to_dtype(dtype), np.dtype) and kind_of(dtype) in ("integer", "bool"):
        raise DataError(f"{where} is {found} with missing values, expected {dtype} (declared), which cannot "
                        f"hold them; declare {dtype.capitalize() if kind_of(dtype) == 'integer' else 'boolean'} "
                        f"or float64")


def _plain(arrow_type: Any) -> Any:
    """Arrow type with the storage details that do not change the values removed."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_large_string(arrow_type) or getattr(pa.types, "is_string_view", lambda t: False)(arrow_type):
        return pa.string()
    return arrow_type


def _arrow_for(dtype: Any) -> Any:
    """The Arrow type a pandas dtype holds (None: any type may be cast to it, e.g. ``category``)."""
    import pyarrow as pa

    if isinstance(dtype, pd.ArrowDtype):
        return _plain(dtype.pyarrow_dtype)
    if isinstance(dtype, pd.DatetimeTZDtype):
        return pa.timestamp(dtype.unit, dtype.tz)
    kind = kind_of(dtype)
    if kind == "text":
        return pa.string()
    if kind == "bool":
        return pa.bool_()
    if kind in ("integer", "float"):
        numpy = dtype.numpy_dtype if hasattr(dtype, "numpy_dtype") else dtype
        return pa.from_numpy_dtype(numpy)
    if kind == "datetime":
        return pa.from_numpy_dtype(dtype)
    return None


# -- loading -----------------------------------------------------------------------------


def conform(frame: pd.DataFrame, types: tuple[ColumnType, ...], where: str,
            locate: Callable[[str, Any], str] | None = None) -> pd.DataFrame:
    """Cast ``frame``'s columns to ``types`` where compatible; raise ``DataError`` naming the column where not.

    ``where`` starts the message: ``source 'trips': partition 3, trips_03.csv``.
    A column entirely missing in this partition takes any type. ``locate(name,
    dtype)`` may say where in the file the first value that does not convert
    is (CSV: its line).
    """
    casts: dict[str, Any] = {}
    for column in types:
        if column.name not in frame.columns:
            continue
        series = frame[column.name]
        wanted = to_dtype(column.dtype)
        if series.dtype == wanted:
            continue
        found, expected = kind_of(series.dtype), kind_of(wanted)
        if found != expected and not _compatible(found, expected) and not series.isna().all():
            raise _mismatch(where, column, str(series.dtype), locate)
        casts[column.name] = wanted
    if not casts:
        return frame
    frame = frame.copy(deep=False)
    for name, wanted in casts.items():
        try:
            frame[name] = _cast(frame[name], wanted)
        except (TypeError, ValueError) as exc:
            column = next(column for column in types if column.name == name)
            raise _mismatch(where, column, str(frame[name].dtype), locate, exc) from exc
    return frame


def _compatible(found: str, expected: str) -> bool:
    # What permissive promotion allows, towards the type every partition gets.
    return (found, expected) in {("integer", "float"), ("float", "integer"), ("text", "bool"),
                                 ("text", "datetime")}


def _cast(series: pd.Series, wanted: Any) -> pd.Series:
    if kind_of(wanted) == "datetime" and not pd.api.types.is_datetime64_any_dtype(series.dtype):
        series = pd.to_datetime(series)
    return series.astype(wanted)


def _mismatch(where: str, column: ColumnType, found: str,
              locate: Callable[[str, Any], str] | None, exc: Exception | None = None) -> DataError:
    how = "declared" if column.origin == DECLARED else column.origin
    hint = "" if column.origin == DECLARED else f"; declare it with dtype={{{column.name!r}: ...}} or schema="
    line = locate(column.name, to_dtype(column.dtype)) if locate is not None else ""
    if not line and exc is not None:
        line = f" ({str(exc).splitlines()[0]})"
    return DataError(f"{where}: column {column.name!r} is {found}, expected {column.dtype} ({how}){line}{hint}")


def first_bad_row(values: pd.Series, wanted: Any) -> int | None:
    """Position of the first value of a text column that does not convert to ``wanted`` (None: all do)."""
    kind = kind_of(wanted)
    present = values.notna().to_numpy()
    if kind in ("integer", "float"):
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna().to_numpy() & present
        if kind == "integer":
            bad |= present & ~bad & (numbers.fillna(0) % 1 != 0).to_numpy()
            if isinstance(wanted, np.dtype):
                bad |= ~present  # int64 holds no missing value
    elif kind == "datetime":
        bad = pd.to_datetime(values, errors="coerce").isna().to_numpy() & present
    elif kind == "bool":
        known = values.astype(str).str.lower().isin(["true", "false", "1", "0"]).to_numpy()
        bad = present & ~known
    else:
        return None
    positions = np.flatnonzero(bad)
    return int(positions[0]) if len(positions) else None


def _shown(path: str) -> str:
    from flowyml.io.filesystem import display_path

    return display_path(path)

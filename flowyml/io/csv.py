"""CSV sources: one partition per file, or per block of whole lines.

Planning reads the first lines of each file (pandas parses the header with
``nrows=0``), and, when ``blocksize`` splits a file, the few bytes up to the
next line end at each block boundary, so every block holds whole lines and
none is empty (an empty block would parse with ``object`` columns and, since
pandas 3, turn ``int64`` into ``object`` when the partitions are
concatenated).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd
from dask.base import tokenize
from dask.utils import parse_bytes
from fsspec.utils import infer_compression, read_block, seek_delimiter

from flowyml.exceptions import DataError, OptionError
from flowyml.io.filesystem import display_path, file_version, full_path, is_local, is_url
from flowyml.io.schema import (
    CSV_SAMPLE_ROWS,
    csv_read_dtypes,
    csv_types,
    declared_schema,
    first_bad_row,
    type_token,
)
from flowyml.io.sources import Partition, Source, check_same_columns, resolve_files, with_order

__all__ = ["CsvPartition", "CsvSource", "read_csv"]

# pandas options that would make a partition something other than one DataFrame.
_CSV_REJECTED = ("iterator", "chunksize")
# How far seek_delimiter reads at once when aligning a block boundary on a line end.
_SEEK_CHUNK = 2**14


@dataclass(frozen=True, kw_only=True)
class CsvPartition(Partition):
    """A whole CSV file (``offset`` None) or the lines in bytes ``[offset, offset+length)``.

    ``prefix`` is the file's header line, prepended to every block but the
    first; ``read_kwargs`` are the pandas options for this block (``skiprows``,
    ``header`` and ``skipfooter`` adjusted the way dask's ``read_csv`` does).
    """

    offset: int | None = None
    length: int | None = None
    prefix: bytes = b""

    def _read(self) -> pd.DataFrame:
        try:
            return self._parse(self.read_kwargs)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, pd.errors.ParserError) or not self.read_kwargs.get("dtype"):
                raise
            # A value pandas could not parse as its column's declared type: find it, and its line.
            error = self._bad_value()
            if error is None:
                raise
            raise error from exc

    def _parse(self, kwargs: dict[str, Any]) -> pd.DataFrame:
        if not is_url(self.path):
            if self.offset is None:
                return pd.read_csv(self.path, **kwargs)
            with open(self.path, "rb") as file:
                block = read_block(file, self.offset, self.length)
            return pd.read_csv(io.BytesIO(self.prefix + block), **kwargs)
        with self.open() as file:
            if self.offset is None:
                # A handle, not a path: pandas cannot infer the compression from it.
                options = {**kwargs, "compression": _compression(self.path, kwargs)}
                return pd.read_csv(file, **options)
            block = read_block(file, self.offset, self.length)
        return pd.read_csv(io.BytesIO(self.prefix + block), **kwargs)

    def _bad_value(self) -> DataError | None:
        """The first value (in file order) that does not parse as its column's declared type."""
        dtypes = self.read_kwargs.get("dtype")
        if not isinstance(dtypes, dict):
            columns = [column.name for column in self.types]
            dtypes = dict.fromkeys(columns, dtypes)
        as_text = {**self.read_kwargs, "dtype": {name: str for name in dtypes}}
        try:
            frame = self._parse(as_text)
        except Exception:
            return None
        found = []
        for name, dtype in dtypes.items():
            if name in frame.columns:
                row = first_bad_row(frame[name], pd.api.types.pandas_dtype(dtype))
                if row is not None:
                    found.append((row, name, dtype))
        if not found:
            return None
        row, name, dtype = min(found)
        value = frame[name].iloc[row]
        shown = "a missing value" if pd.isna(value) else f"{value!r}"
        return DataError(f"{self.where()}: column {name!r} has {shown} at line {self._line_of(row)}, "
                         f"expected {pd.api.types.pandas_dtype(dtype)} (declared)")

    def _locate(self, column: str, dtype: Any) -> str:
        try:
            frame = self._parse({**self.read_kwargs, "dtype": {column: str}})
            row = first_bad_row(frame[column], dtype)
        except Exception:
            return ""
        if row is None:
            return ""
        return f" (first at line {self._line_of(row)}: {frame[column].iloc[row]!r})"

    def _line_of(self, row: int) -> int | str:
        """The line of the file where data row ``row`` of this partition starts (1-based)."""
        try:
            return _line_of_row(self, row)
        except Exception:  # a dialect the csv module reads otherwise: say which row instead
            return f"? (data row {row + 1} of this partition)"

    def _range(self) -> tuple:
        if self.offset is None:
            return (0, self.size)
        return (self.offset, self.length)

    def describe(self) -> str:
        where = display_path(self.path)
        if self.offset is None:
            return where
        return f"{where} (bytes {self.offset}-{self.offset + self.length})"  # type: ignore[operator]  # a block has both

    def _hint(self) -> str:
        if self.offset:
            return " (line numbers count from the start of this block)"
        return ""


class CsvSource(Source):
    """CSV files: one partition per file, or per block of about ``blocksize`` bytes.

    With ``blocksize``, a file larger than it splits into blocks that start and
    end on line ends (found at planning with fsspec's ``seek_delimiter``; read
    at load time with ``fsspec.utils.read_block``). Every block but the first
    gets the file's header line prepended and ``skiprows`` dropped, as dask's
    ``read_csv`` does, so it parses with the same columns and options as the
    whole file. Limits, as in dask: a quoted field must not contain a line
    break; compressed files are never split; ``skiprows`` must be an int.
    Every partition has the same dtypes: declared ones (``schema=`` or
    ``dtype=``), else the kind of each column in a sample of the first file,
    integers as ``Int64`` and booleans as ``boolean`` so that a missing value
    in one block cannot change them (:mod:`flowyml.io.schema`).
    """

    reader = "read_csv"

    def __init__(self, paths: Any, blocksize: int | str | None, pandas_kwargs: dict[str, Any],
                 schema: Any = None) -> None:
        super().__init__(paths, pandas_kwargs, schema)
        self.blocksize = _parse_blocksize(blocksize, self._declared())
        _check_csv_options(self.pandas_kwargs, self.blocksize, self._declared())
        if self.schema is not None and self.pandas_kwargs.get("dtype") is not None:
            raise OptionError(f"{self._declared()}: give schema= or dtype=, not both (they declare the same thing)")

    def _options_repr(self) -> str:
        size = f", blocksize={self.blocksize}" if self.blocksize else ""
        return size + super()._options_repr()

    def partitions(self) -> list[Partition]:
        files = resolve_files(self.paths, (".csv", ".tsv", ".txt"), self.label, self.storage_options)
        paths = [full_path(fs, path) for fs, path, _ in files]
        versions = [file_version(fs, path, info) for fs, path, info in files]
        # The first file's first rows fix every column's type (docs/data-contracts.md);
        # reading them costs what reading its header did. A file with no rows says
        # nothing of the types: the next one is sampled.
        sampled = 0
        while True:
            fs, path, _ = files[sampled]
            sample = _csv_sample(fs, path, self.pandas_kwargs, self.storage_options, self.label, CSV_SAMPLE_ROWS)
            if len(sample) or sampled == len(files) - 1:
                break
            sampled += 1
        missing = [name for name in self.schema or {} if name not in sample.columns]
        if missing and "usecols" not in self.pandas_kwargs:
            raise DataError(f"source {self.label!r}: partition 0, {display_path(paths[0])}: column {missing[0]!r} "
                            f"is missing; the schema declares it {self.schema[missing[0]]}")  # type: ignore[index]
        types = csv_types(sample, self._declared_types(tuple(sample.columns)), display_path(paths[sampled]))
        read_dtypes = csv_read_dtypes(types, self.pandas_kwargs.get("dtype"), sample,
                                      self.pandas_kwargs.get("parse_dates"))
        kwargs = {**self.pandas_kwargs, "dtype": read_dtypes} if read_dtypes else self.pandas_kwargs
        token = tokenize("csv", kwargs, type_token(types))
        if any(is_local(fs) for fs, _, _ in files):
            # Local headers cost microseconds: every file is checked now, before any task.
            header_token = tokenize("csv", self.pandas_kwargs)
            columns = [tuple(sample.columns) if number == sampled
                       else _local_columns(fs, path, version, header_token, self.pandas_kwargs,
                                           self.storage_options, self.label)
                       for number, ((fs, path, _), version) in enumerate(zip(files, versions))]
            orders = check_same_columns(paths, columns, self.label)
            checks: list[dict[str, Any]] = [{"options_token": with_order(token, order), "columns": order}
                                            for order in orders]
        else:
            # On an object store each header is a round trip: planning reads the
            # first file's, as dask.dataframe does, and every other file is held
            # to it as it loads (the same DataError, naming both files).
            expected = tuple(sample.columns)
            held = {"options_token": tokenize(token, expected), "expected": expected,
                    "expected_from": paths[sampled]}
            checks = [held] * len(files)
        parts: list[Partition] = []
        for (fs, path, _), (size, version), check in zip(files, versions, checks):
            common = dict(path=full_path(fs, path), size=size, mtime_ns=version, source=self.label,
                          storage_options=self.storage_options, types=types, **check)
            for spec in self._plan_file(fs, path, size, kwargs):
                parts.append(CsvPartition(index=len(parts), **common, **spec))
        return parts

    def _declared_types(self, columns: tuple) -> dict[str, str]:
        """The declared column -> dtype: ``schema=``, else ``dtype=`` (one dtype for every column, or a mapping)."""
        if self.schema is not None:
            return self.schema
        dtype = self.pandas_kwargs.get("dtype")
        if dtype is None:
            return {}
        if not isinstance(dtype, dict):
            dtype = dict.fromkeys(columns, dtype)
        return declared_schema(dtype, self._declared()) or {}

    def _plan_file(self, fs: Any, path: str, size: int, options: dict[str, Any]) -> list[dict[str, Any]]:
        """Byte ranges and per-block pandas options for one file."""
        whole = [{"read_kwargs": options}]
        if not self.blocksize or size <= self.blocksize or _compression(path, self.pandas_kwargs):
            return whole
        header_line, data_start = _csv_header_line(fs, path, self.pandas_kwargs, self.label)
        starts = _block_starts(fs, path, size, self.blocksize, data_start)
        if len(starts) == 1:
            return whole
        ends = [*starts[1:], size]
        specs = []
        for number, (start, end) in enumerate(zip(starts, ends)):
            kwargs = _block_kwargs(options, first=number == 0, last=end == size)
            prefix = b"" if number == 0 else header_line
            specs.append({"offset": start, "length": end - start, "prefix": prefix, "read_kwargs": kwargs})
        return specs


def read_csv(paths: Any, *, blocksize: int | str | None = None, schema: Any = None,
             **pandas_kwargs: Any) -> CsvSource:
    """Declare CSV input: one partition per file, or per ``blocksize`` bytes of a file.

    Parameters
    ----------
    paths : str, path, or list of them
        Files, globs (``"data/trips_*.csv"``) or directories (every ``*.csv``,
        ``*.tsv``, ``*.txt`` inside, possibly compressed). Each glob or directory
        expands in sorted order; a list keeps its own order; duplicates are
        read once. Local paths or fsspec URLs.
    blocksize : int or str, optional
        Split files larger than this (``64_000_000`` or ``"64MB"``) into blocks
        of whole lines, each a partition. None: one partition per file.
    schema : mapping or pyarrow.Schema, optional
        The type of some or all columns (``{"trip_id": "int64", "fare":
        "float64"}``); pandas parses those columns as these types in every
        partition, and a value that does not parse raises ``DataError`` with
        its column, file and line. ``dtype=`` (pandas' own) declares the
        same way; give one or the other. Undeclared columns take the type
        sampled from the first file (see ``docs/data-contracts.md``).
    **pandas_kwargs
        Passed to :func:`pandas.read_csv` for every partition.

    Returns
    -------
    CsvSource
        Nothing is read until the pipeline runs. Concatenating the partitions
        in order equals ``pandas.concat(pandas.read_csv(f) for f in files)``
        apart from the index.

    Examples
    --------
    >>> source = read_csv("data/trips/trips_*.csv", blocksize="64MB", parse_dates=["pickup_at"])
    >>> source
    read_csv('data/trips/trips_*.csv', blocksize=64000000, parse_dates=['pickup_at'])
    """
    return CsvSource(paths, blocksize, pandas_kwargs, schema)


def _parse_blocksize(blocksize: object, source: str) -> int | None:  # checks whatever the user gave
    if blocksize is None:
        return None
    problem = (f"{source}: blocksize={blocksize!r} is not a size; give a positive number of bytes "
               f"or a string like '64MB'")
    try:
        size = parse_bytes(blocksize) if isinstance(blocksize, str) else blocksize
    except ValueError as exc:
        raise OptionError(f"{problem} ({exc})") from None
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise OptionError(problem)
    return size


def _check_csv_options(kwargs: dict[str, Any], blocksize: int | None, source: str) -> None:
    for key in _CSV_REJECTED:
        if key in kwargs:
            raise OptionError(f"{source}: {key}= is not supported: each partition is one DataFrame; use blocksize=")
    if not blocksize:
        return
    if "nrows" in kwargs:
        raise OptionError(f"{source}: nrows= cannot be combined with blocksize: the rows are split across blocks")
    skiprows = kwargs.get("skiprows")
    if skiprows is not None and not isinstance(skiprows, int):
        raise OptionError(f"{source}: blocksize= needs skiprows to be an int (or blocksize=None)")
    if isinstance(kwargs.get("header"), (list, tuple)):
        raise OptionError(f"{source}: blocksize= does not support a multi-line header (or use blocksize=None)")
    encoding = kwargs.get("encoding") or "utf-8"
    if "\n".encode(encoding)[len("".encode(encoding)):] != b"\n":  # skip a BOM, as dask does
        raise OptionError(f"{source}: blocksize= cannot split {encoding} text on line ends; use blocksize=None")
    if kwargs.get("lineterminator") not in (None, "\n"):
        raise OptionError(
            f"{source}: blocksize= splits on '\\n' line ends; use blocksize=None with another lineterminator"
        )


def _compression(path: str, kwargs: dict[str, Any]) -> str | None:
    compression = kwargs.get("compression", "infer")
    if compression == "infer":
        return infer_compression(path)
    return compression


def _probe_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Options to parse just the header with ``nrows=0``."""
    probe = {key: value for key, value in kwargs.items() if key not in ("skipfooter", "nrows", "engine")}
    probe["nrows"] = 0
    return probe


#: Columns of local files read in this process, by path, size, modification time
#: and options: a rerun in one process (a notebook, a scheduler that runs jobs
#: in-process) reads no unchanged file's header again. Emptied when full.
_COLUMNS: dict[tuple, tuple] = {}
_COLUMNS_KEPT = 100_000


def _local_columns(fs: Any, path: str, version: tuple[int, int | str], token: str, kwargs: dict[str, Any],
                   storage_options: dict[str, Any] | None, label: str) -> tuple:
    if not is_local(fs):
        return _csv_columns(fs, path, kwargs, storage_options, label)
    key = (path, *version, token)
    columns = _COLUMNS.get(key)
    if columns is None:
        columns = _csv_columns(fs, path, kwargs, storage_options, label)
        if len(_COLUMNS) >= _COLUMNS_KEPT:
            _COLUMNS.clear()
        _COLUMNS[key] = columns
    return columns


def _csv_columns(fs: Any, path: str, kwargs: dict[str, Any], storage_options: dict[str, Any] | None,
                 label: str) -> tuple:
    return tuple(_csv_sample(fs, path, kwargs, storage_options, label, 0).columns)


def _csv_sample(fs: Any, path: str, kwargs: dict[str, Any], storage_options: dict[str, Any] | None,
                label: str, rows: int) -> pd.DataFrame:
    """The header and first ``rows`` rows of a file, typed as pandas infers them."""
    where = full_path(fs, path)
    storage = {"storage_options": storage_options} if storage_options and is_url(where) else {}
    probe = _probe_kwargs(kwargs)
    footer = kwargs.get("skipfooter") or 0
    probe["nrows"] = rows + footer
    probe.pop("dtype", None)  # the declared types are known; a value that breaks one fails as its partition loads
    try:
        # pandas reads only the first buffer of the file for few rows, and
        # handles compression, encodings and URLs as it will for the data.
        sample = pd.read_csv(where, **storage, **probe)
        if footer and rows and len(sample) < rows + footer:  # the whole file, footer included: read it as pandas will
            del probe["nrows"]
            sample = pd.read_csv(where, **storage, **probe, skipfooter=footer, engine="python")
        return sample
    except Exception as exc:
        raise DataError(
            f"source {label!r}: cannot read the header of {display_path(where)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _header_row(kwargs: dict[str, Any]) -> int | None:
    header = kwargs.get("header", "infer")
    if header == "infer":
        return 0 if kwargs.get("names") is None else None
    return header


def _csv_header_line(fs: Any, path: str, kwargs: dict[str, Any], label: str) -> tuple[bytes, int]:
    """The header line (to prepend to later blocks) and the byte where data starts.

    Counts lines the way pandas does: ``skiprows`` raw lines, then ``header``
    more lines skipping blank (``skip_blank_lines``) and comment lines.
    """
    header_row = _header_row(kwargs)
    comment = kwargs.get("comment")
    comment_bytes = comment.encode(kwargs.get("encoding") or "utf-8") if comment else None
    skip_blank = kwargs.get("skip_blank_lines", True)
    with fs.open(path, "rb") as file:
        for _ in range(kwargs.get("skiprows") or 0):
            file.readline()
        if header_row is None:
            return b"", file.tell()
        seen, line = -1, b""
        while seen < header_row:
            line = file.readline()
            if not line:
                raise DataError(f"source {label!r}: {display_path(full_path(fs, path))} ends before its header line")
            stripped = line.strip()
            if (skip_blank and not stripped) or (comment_bytes and stripped.startswith(comment_bytes)):
                continue
            seen += 1
        if not line.endswith(b"\n"):
            line += b"\n"
        return line, file.tell()


def _block_starts(fs: Any, path: str, size: int, blocksize: int, data_start: int) -> list[int]:
    """Start offsets of blocks of about ``blocksize`` bytes, each at the start of a line.

    A nominal offset moves to just after the next line end (what
    ``read_block(..., delimiter=b"\\n")`` would do); offsets that land in the
    header or on its line end (the first block keeps at least one data line),
    at the end of the file or on an already-taken line are dropped, so no
    block is empty when ``blocksize`` is smaller than a line.
    """
    count = -(-size // blocksize)
    starts = [0]
    with fs.open(path, "rb") as file:
        for number in range(1, count):
            file.seek(size * number // count)
            seek_delimiter(file, b"\n", _SEEK_CHUNK)
            start = file.tell()
            if data_start < start < size and start > starts[-1]:
                starts.append(start)
    return starts


def _line_of_row(part: CsvPartition, row: int) -> int:
    """The line of ``part``'s file where its data row ``row`` starts, counted as pandas reads it.

    Reads the partition's text again (only when reporting an error): skips
    ``skiprows`` lines and the header, then counts records with the ``csv``
    module, so a quoted field spanning lines, blank lines and comment lines
    are counted the way pandas skips them.
    """
    kwargs = part.read_kwargs
    delimiter = kwargs.get("sep", kwargs.get("delimiter", ",")) or ","
    skiprows = kwargs.get("skiprows") or 0
    if len(delimiter) != 1 or not isinstance(skiprows, int):
        raise NotImplementedError("a regular-expression separator or a list of skipped rows")
    with fsspec.open(part.path, "rb", compression=_compression(part.path, kwargs),
                     **(part.storage_options or {})) as file:
        if part.offset:
            before = file.read(part.offset).count(b"\n")
            data, shift = part.prefix + file.read(part.length), before - (1 if part.prefix else 0)
        else:
            data, shift = file.read(), 0
    lines = data.decode(kwargs.get("encoding") or "utf-8", errors="replace").splitlines(keepends=True)
    header_row = _header_row(kwargs)
    headers = 0 if header_row is None else header_row + 1
    comment = kwargs.get("comment")
    skip_blank = kwargs.get("skip_blank_lines", True)
    reader = csv.reader(io.StringIO("".join(lines[skiprows:])), delimiter=delimiter,
                        quotechar=kwargs.get("quotechar", '"'))
    seen, start = 0, 0
    for record in reader:
        first_line, start = start + 1, reader.line_num
        if (skip_blank and not record) or (comment and record and record[0].startswith(comment)):
            continue
        if headers:
            headers -= 1
            continue
        if seen == row:
            return shift + skiprows + first_line
        seen += 1
    raise LookupError(f"no data row {row}")


def _block_kwargs(kwargs: dict[str, Any], *, first: bool, last: bool) -> dict[str, Any]:
    """pandas options for one block, adjusted as dask's ``read_csv`` adjusts them."""
    block = dict(kwargs)
    if not first:
        block.pop("skiprows", None)
        if _header_row(kwargs) is not None:
            block["header"] = 0  # the prepended header line
    if not last:
        block.pop("skipfooter", None)
    return block

"""Partitioned data: CSV and Parquet sources, and the sinks that write partitions.

A source is a plan, not data. ``read_csv(...)`` and ``read_parquet(...)`` only
record what to read: declaring one touches no file. The core calls
:meth:`Source.partitions` once per run, on the driver, before any task starts.
Planning resolves globs and directories, stats every file and reads metadata
only:

- CSV: the first lines of each file (pandas parses the header with
  ``nrows=0``), and, when ``blocksize`` splits a file, the few bytes up to the
  next line end at each block boundary, so every block holds whole lines and
  none is empty (an empty block would parse with ``object`` columns and, since
  pandas 3, turn ``int64`` into ``object`` when the partitions are
  concatenated).
- Parquet: the footer of each file (schema and row groups).

Planning therefore raises :class:`~flowyml.exceptions.DataError` before any
task runs when a path or glob matches nothing, a file has no header, or the
columns differ between files (the error names both files and the columns).
Files holding the same columns in another order are read in the first file's
order, as ``pandas.concat`` would align them.

Each :class:`Partition` is a small picklable record sent to a worker inside
its task; :meth:`Partition.load` turns it into a DataFrame there, and raises
``DataError`` naming the source, the file and the partition (chained ``from``
the pandas or pyarrow error) when the file is unreadable, malformed or has
changed since planning.

The sinks (:func:`write_partition`, :func:`commit_output`,
:func:`abort_output`) write each partition from the worker that computed it
into a staging directory next to the output, then swap the staging directory
into place once every partition is written: readers see the previous output
or the new one, never a mix or a partial file.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import pandas as pd
from dask.base import tokenize
from dask.utils import parse_bytes
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression, read_block, seek_delimiter

from flowyml.context import current_task
from flowyml.exceptions import DataError, OptionError

__all__ = [
    "CsvPartition",
    "CsvSource",
    "ParquetPartition",
    "ParquetSource",
    "Partition",
    "Source",
    "abort_output",
    "commit_output",
    "read_csv",
    "read_parquet",
    "restage_partition",
    "write_csv",
    "write_parquet",
    "write_partition",
]

# pandas options that would make a partition something other than one DataFrame.
_CSV_REJECTED = ("iterator", "chunksize")
# What a row-group read can honour; other pandas.read_parquet options need the whole file.
_ROW_GROUP_OPTIONS = frozenset({"columns", "filters", "dtype_backend", "to_pandas_kwargs"})
# How far seek_delimiter reads at once when aligning a block boundary on a line end.
_SEEK_CHUNK = 2**14


# --------------------------------------------------------------------------- partitions


@dataclass(frozen=True, kw_only=True)
class Partition:
    """One unit of work of a source: a file, a byte range of a CSV file, or a row group.

    Attributes
    ----------
    index : int
        Position among the source's partitions (0-based). Not part of the
        cache key: adding a file shifts indexes but not identities.
    path : str
        Absolute path (or fsspec URL) of the file.
    size : int
        File size in bytes when planned.
    mtime_ns : int or str
        Modification time in nanoseconds when planned (local files); on other
        fsspec filesystems, the filesystem's version key (``fs.ukey``).
    source : str
        The source's name, for error messages.
    options_token : str
        A hash of the reader options (``usecols=``, ``columns=``...), so that
        changing them changes :meth:`identity`.
    """

    index: int
    path: str
    size: int
    mtime_ns: int | str
    source: str = field(default="source", compare=False)
    options_token: str = ""

    def load(self) -> pd.DataFrame:
        """Read exactly this partition's rows.

        Raises
        ------
        DataError
            The file is missing, changed since planning, or cannot be parsed;
            the message names the source, the file and the partition index.
        """
        self._check_unchanged()
        try:
            return self._read()
        except Exception as exc:
            raise DataError(
                f"source {self.source!r}: cannot read partition {self.index}, "
                f"{self.describe()}: {type(exc).__name__}: {exc}{self._hint()}"
            ) from exc

    def identity(self) -> tuple:
        """What the data of this partition depends on: the cache key (never the index)."""
        return (self.path, self.size, self.mtime_ns, *self._range(), self.options_token)

    def describe(self) -> str:
        """A short human description, e.g. ``data/trips_03.csv (bytes 0-1048576)``."""
        return _display_path(self.path)

    # -- for subclasses
    def _read(self) -> pd.DataFrame:
        raise NotImplementedError

    def _range(self) -> tuple:
        raise NotImplementedError

    def _hint(self) -> str:
        return ""

    def _check_unchanged(self) -> None:
        # The byte ranges and the cache key were computed from this size and
        # mtime; reading a rewritten file under them would return (and cache)
        # rows that do not match the key.
        if _is_url(self.path):
            return
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise DataError(
                f"source {self.source!r}: cannot read partition {self.index}, "
                f"{self.describe()}: the file is gone ({exc.strerror})"
            ) from exc
        if (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns):
            raise DataError(
                f"source {self.source!r}: {_display_path(self.path)} changed while the run "
                f"was planned or running (partition {self.index}); run the pipeline again"
            )


@dataclass(frozen=True, kw_only=True)
class CsvPartition(Partition):
    """A whole CSV file (``offset`` None) or the lines in bytes ``[offset, offset+length)``.

    ``prefix`` is the file's header line, prepended to every block but the
    first; ``read_kwargs`` are the pandas options for this block (``skiprows``,
    ``header`` and ``skipfooter`` adjusted the way dask's ``read_csv`` does);
    ``columns`` reorders the result when this file lists the source's columns
    in another order.
    """

    offset: int | None = None
    length: int | None = None
    prefix: bytes = b""
    read_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)  # may hold credentials
    columns: tuple | None = None

    def _read(self) -> pd.DataFrame:
        if self.offset is None:
            frame = pd.read_csv(self.path, **self.read_kwargs)
        else:
            fs, path = url_to_fs(self.path)
            with fs.open(path, "rb") as file:
                block = read_block(file, self.offset, self.length)
            frame = pd.read_csv(io.BytesIO(self.prefix + block), **self.read_kwargs)
        return frame if self.columns is None else frame[list(self.columns)]

    def _range(self) -> tuple:
        if self.offset is None:
            return (0, self.size)
        return (self.offset, self.length)

    def describe(self) -> str:
        where = _display_path(self.path)
        if self.offset is None:
            return where
        return f"{where} (bytes {self.offset}-{self.offset + self.length})"

    def _hint(self) -> str:
        if self.offset:
            return " (line numbers count from the start of this block)"
        return ""


@dataclass(frozen=True, kw_only=True)
class ParquetPartition(Partition):
    """A whole Parquet file (``row_group`` None) or one of its row groups."""

    row_group: int | None = None
    read_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)  # may hold credentials
    columns: tuple | None = None

    def _read(self) -> pd.DataFrame:
        if self.row_group is None:
            frame = pd.read_parquet(self.path, **self.read_kwargs)
        else:
            frame = _read_row_group(self.path, self.row_group, self.read_kwargs)
        return frame if self.columns is None else frame[list(self.columns)]

    def _range(self) -> tuple:
        if self.row_group is None:
            return (0, self.size)
        return ("row_group", self.row_group)

    def describe(self) -> str:
        where = _display_path(self.path)
        return where if self.row_group is None else f"{where} (row group {self.row_group})"


# --------------------------------------------------------------------------- sources


class Source:
    """A partitioned input: what to read, resolved into partitions at run time.

    Attributes
    ----------
    name : str or None
        Set by ``Pipeline.add_source``; used in error messages.
    paths : tuple of str
        The paths, globs or directories as given.
    """

    reader: ClassVar[str] = "source"

    def __init__(self, paths: Any, pandas_kwargs: dict[str, Any]) -> None:
        self.paths = _as_path_list(paths, self.reader)
        self.pandas_kwargs = dict(pandas_kwargs)
        self.name: str | None = None

    def partitions(self) -> list[Partition]:
        """Resolve the files and plan one partition per file, block or row group.

        Raises
        ------
        DataError
            A path or glob matches no file, a file has no readable header or
            footer, or the files do not all have the same columns.
        """
        raise NotImplementedError

    def _declared(self) -> str:
        """``read_csv('data/*.csv')``: how errors about its options name the source."""
        shown = self.paths[0] if len(self.paths) == 1 else list(self.paths)
        return f"{self.reader}({shown!r})"

    @property
    def label(self) -> str:
        """The name used in messages: the source's name, else its ``repr``."""
        return self.name or repr(self)

    def _options_repr(self) -> str:
        return "".join(f", {key}={redact_option(key, value)!r}" for key, value in self.pandas_kwargs.items())

    def __repr__(self) -> str:
        shown = self.paths[0] if len(self.paths) == 1 else list(self.paths)
        return f"{self.reader}({shown!r}{self._options_repr()})"


class CsvSource(Source):
    """CSV files: one partition per file, or per block of about ``blocksize`` bytes.

    With ``blocksize``, a file larger than it splits into blocks that start and
    end on line ends (found at planning with fsspec's ``seek_delimiter``; read
    at load time with ``fsspec.utils.read_block``). Every block but the first
    gets the file's header line prepended and ``skiprows`` dropped, as dask's
    ``read_csv`` does, so it parses with the same columns and options as the
    whole file. Limits, as in dask: a quoted field must not contain a line
    break; compressed files are never split; ``skiprows`` must be an int.
    Dtypes are inferred per partition, as pandas infers them per file: an
    integer column with missing values in only some blocks is ``float64`` in
    those; pass ``dtype=`` to pin a type in every partition.
    """

    reader = "read_csv"

    def __init__(self, paths: Any, blocksize: int | str | None, pandas_kwargs: dict[str, Any]) -> None:
        super().__init__(paths, pandas_kwargs)
        self.blocksize = _parse_blocksize(blocksize, self._declared())
        _check_csv_options(self.pandas_kwargs, self.blocksize, self._declared())

    def _options_repr(self) -> str:
        size = f", blocksize={self.blocksize}" if self.blocksize else ""
        return size + super()._options_repr()

    def partitions(self) -> list[Partition]:
        files = _resolve(self.paths, (".csv", ".tsv", ".txt"), self.label)
        columns = [_csv_columns(fs, path, self.pandas_kwargs, self.label) for fs, path in files]
        orders = _check_same_columns([path for _, path in files], columns, self.label)
        token = tokenize("csv", self.pandas_kwargs)
        parts: list[Partition] = []
        for (fs, path), order in zip(files, orders):
            size, version = _stat(fs, path)
            common = dict(path=_full_path(fs, path), size=size, mtime_ns=version, source=self.label,
                          options_token=_with_order(token, order), columns=order)
            for spec in self._plan_file(fs, path, size):
                parts.append(CsvPartition(index=len(parts), **common, **spec))
        return parts

    def _plan_file(self, fs: Any, path: str, size: int) -> list[dict[str, Any]]:
        """Byte ranges and per-block pandas options for one file."""
        whole = [{"read_kwargs": self.pandas_kwargs}]
        if not self.blocksize or size <= self.blocksize or _compression(path, self.pandas_kwargs):
            return whole
        header_line, data_start = _csv_header_line(fs, path, self.pandas_kwargs, self.label)
        starts = _block_starts(fs, path, size, self.blocksize, data_start)
        if len(starts) == 1:
            return whole
        ends = starts[1:] + [size]
        specs = []
        for number, (start, end) in enumerate(zip(starts, ends)):
            kwargs = _block_kwargs(self.pandas_kwargs, first=number == 0, last=end == size)
            prefix = b"" if number == 0 else header_line
            specs.append({"offset": start, "length": end - start, "prefix": prefix, "read_kwargs": kwargs})
        return specs


class ParquetSource(Source):
    """Parquet files: one partition per file, or per row group with ``split_row_groups``.

    Planning reads each file's footer (schema, row groups) and nothing else.
    A directory means every ``*.parquet`` file below it, sorted (hive
    ``key=value`` folder names are not turned into columns). A file without
    row groups stays one (empty, typed) partition when splitting.
    """

    reader = "read_parquet"

    def __init__(self, paths: Any, split_row_groups: bool, pandas_kwargs: dict[str, Any]) -> None:
        super().__init__(paths, pandas_kwargs)
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

        files = _resolve(self.paths, (".parquet", ".parq", ".pq"), self.label)
        wanted = self.pandas_kwargs.get("columns")
        footers, columns = [], []
        for fs, path in files:
            try:
                with fs.open(path, "rb") as file:
                    metadata = pq.ParquetFile(file).metadata
            except Exception as exc:
                raise DataError(
                    f"source {self.label!r}: {_display_path(path)} is not a readable Parquet file: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            footers.append(metadata)
            columns.append(_parquet_columns(metadata, wanted, path, self.label))
        orders = _check_same_columns([path for _, path in files], columns, self.label)
        token = tokenize("parquet", self.pandas_kwargs)
        parts: list[Partition] = []
        for (fs, path), metadata, order in zip(files, footers, orders):
            size, version = _stat(fs, path)
            groups: list[int | None] = [None]
            if self.split_row_groups and metadata.num_row_groups > 0:
                groups = list(range(metadata.num_row_groups))
            for group in groups:
                parts.append(ParquetPartition(
                    index=len(parts), path=_full_path(fs, path), size=size, mtime_ns=version,
                    source=self.label, options_token=_with_order(token, order), row_group=group,
                    read_kwargs=self.pandas_kwargs, columns=order,
                ))
        return parts


def read_csv(paths: Any, *, blocksize: int | str | None = None, **pandas_kwargs: Any) -> CsvSource:
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
    return CsvSource(paths, blocksize, pandas_kwargs)


def read_parquet(path: Any, *, split_row_groups: bool = False, **pandas_kwargs: Any) -> ParquetSource:
    """Declare Parquet input: one partition per file, or per row group.

    Parameters
    ----------
    path : str, path, or list of them
        A file, a directory (every ``*.parquet`` below it, sorted) or a glob.
    split_row_groups : bool
        One partition per row group instead of per file (planned from the
        files' footers).
    **pandas_kwargs
        Passed to :func:`pandas.read_parquet` (``columns=``, ``filters=``...).
        With ``split_row_groups`` only ``columns``, ``filters``,
        ``dtype_backend`` and ``to_pandas_kwargs`` apply.

    Examples
    --------
    >>> read_parquet("data/trips_parquet", columns=["fare", "tip"])
    read_parquet('data/trips_parquet', columns=['fare', 'tip'])
    """
    return ParquetSource(path, split_row_groups, pandas_kwargs)


# --------------------------------------------------------------------------- planning helpers


def _as_path_list(paths: Any, reader: str) -> tuple[str, ...]:
    try:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    except TypeError:
        items = []
    if not items or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise OptionError(f"{reader}() takes a path, a glob or a list of them, not {paths!r}")
    return tuple(os.fspath(item) for item in items)


def _parse_blocksize(blocksize: int | str | None, source: str) -> int | None:
    if blocksize is None:
        return None
    problem = f"{source}: blocksize={blocksize!r} is not a size; give a positive number of bytes or a string like '64MB'"
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


#: Options whose values are credentials: shown as names only.
_SECRET_OPTIONS = frozenset({"storage_options"})


def redact_option(name: str, value: Any) -> Any:
    """``value`` as it may be shown: the keys of ``storage_options``, never their values.

    >>> redact_option("storage_options", {"key": "AKIA...", "secret": "s3cr3t"})
    {'key': '***', 'secret': '***'}
    >>> redact_option("sep", ";")
    ';'
    """
    if name in _SECRET_OPTIONS and isinstance(value, dict):
        return {key: "***" for key in value}
    if name in _SECRET_OPTIONS and value is not None:
        return "***"
    return value


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _resolve(patterns: Sequence[str], suffixes: tuple[str, ...], label: str) -> list[tuple[Any, str]]:
    """Expand paths, globs and directories into (filesystem, path) pairs, in order."""
    found: dict[str, Any] = {}
    for pattern in patterns:
        fs, root = url_to_fs(pattern)
        if _glob.has_magic(root):
            matches = sorted(path for path, info in fs.glob(root, detail=True).items() if info["type"] == "file")
            if not matches:
                raise DataError(
                    f"source {label!r}: the glob {pattern!r} matched no file "
                    f"(searched {_glob_base(root)}); check the path and the working directory"
                )
        elif fs.isdir(root):
            matches = sorted(
                path for path, info in fs.find(root, detail=True).items()
                if info["type"] == "file" and _is_data_file(path, suffixes)
            )
            if not matches:
                raise DataError(
                    f"source {label!r}: the directory {pattern!r} holds no {'/'.join(suffixes)} file"
                )
        elif fs.isfile(root):
            matches = [root]
        else:
            raise DataError(f"source {label!r}: {pattern!r} does not exist; check the path and the working directory")
        for path in matches:
            found.setdefault(path, fs)
    return [(fs, path) for path, fs in found.items()]


def _glob_base(pattern: str) -> str:
    head = pattern
    while _glob.has_magic(head):
        head = os.path.dirname(head)
    return head or "."


def _is_data_file(path: str, suffixes: tuple[str, ...]) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith((".", "_")):  # _SUCCESS, _metadata, editors' and our own temporary files
        return False
    stem = name
    if infer_compression(name):
        stem = name.rsplit(".", 1)[0]
    return stem.lower().endswith(suffixes)


def _stat(fs: Any, path: str) -> tuple[int, int | str]:
    if _is_local(fs):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    return int(fs.size(path)), str(fs.ukey(path))


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _full_path(fs: Any, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _display_path(path: str) -> str:
    if _is_url(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


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


def _csv_columns(fs: Any, path: str, kwargs: dict[str, Any], label: str) -> tuple:
    try:
        # pandas reads only the first buffer of the file for nrows=0, and
        # handles compression, encodings and URLs as it will for the data.
        frame = pd.read_csv(_full_path(fs, path), **_probe_kwargs(kwargs))
    except Exception as exc:
        raise DataError(
            f"source {label!r}: cannot read the header of {_display_path(path)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return tuple(frame.columns)


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
                raise DataError(f"source {label!r}: {_display_path(path)} ends before its header line")
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
            f"source {label!r}: {_display_path(path)} has no column {missing} asked for in columns=; "
            f"it has {list(names)}"
        )
    return tuple(wanted)


def _check_same_columns(paths: list[str], columns: list[tuple], label: str) -> list[tuple | None]:
    """Raise if any file's columns differ from the first's; return a reorder per file."""
    first_path, first = paths[0], columns[0]
    orders: list[tuple | None] = []
    for path, names in zip(paths, columns):
        if set(names) != set(first) or len(names) != len(first):
            only_first = [name for name in first if name not in names]
            only_here = [name for name in names if name not in first]
            raise DataError(
                f"source {label!r}: the files do not have the same columns: "
                f"{_display_path(first_path)} has {list(first)}, {_display_path(path)} has {list(names)} "
                f"(only in the first: {only_first}; only in the second: {only_here}). "
                "Read them as separate sources, or select common columns (usecols= / columns=)."
            )
        orders.append(None if names == first else first)
    return orders


def _with_order(token: str, order: tuple | None) -> str:
    # A file reordered to match the others returns other data than alone.
    return token if order is None else tokenize(token, order)


def _read_row_group(path: str, row_group: int, kwargs: dict[str, Any]) -> pd.DataFrame:
    """One row group, converted to pandas the way ``pandas.read_parquet`` converts a file."""
    import pyarrow.parquet as pq

    columns = kwargs.get("columns")
    filters = kwargs.get("filters")
    read_columns = columns
    if columns is not None and filters is not None:
        # Filter columns need not be among the selected ones, as in pandas.read_parquet.
        needed = _filter_columns(filters)
        read_columns = None if needed is None else list(dict.fromkeys([*columns, *needed]))
    fs, inner = url_to_fs(path)
    with fs.open(inner, "rb") as file:
        table = pq.ParquetFile(file).read_row_group(row_group, columns=read_columns, use_pandas_metadata=True)
    if filters is not None:
        table = table.filter(pq.filters_to_expression(filters) if isinstance(filters, list) else filters)
    if columns is not None and read_columns != columns:
        index_columns = [
            name for name in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(name, str)
        ]
        table = table.select([*columns, *[name for name in index_columns if name not in columns]])
    return _arrow_to_pandas(table, kwargs.get("dtype_backend"), kwargs.get("to_pandas_kwargs"))


def _filter_columns(filters: Any) -> list[str] | None:
    """Column names used by a DNF filter list; None for an expression (read every column)."""
    if not isinstance(filters, list):
        return None
    groups = filters if filters and isinstance(filters[0], list) else [filters]
    return [condition[0] for group in groups for condition in group]


def _arrow_to_pandas(table: Any, dtype_backend: Any, to_pandas_kwargs: Any) -> pd.DataFrame:
    try:  # the helper pandas.read_parquet itself uses (pandas >= 2.2): same dtypes
        from pandas.io._util import arrow_table_to_pandas
    except ImportError:  # pragma: no cover - older pandas
        return table.to_pandas(**(to_pandas_kwargs or {}))
    options: dict[str, Any] = {"to_pandas_kwargs": to_pandas_kwargs}
    if dtype_backend is not None:
        options["dtype_backend"] = dtype_backend
    return arrow_table_to_pandas(table, **options)


# --------------------------------------------------------------------------- sinks

_FORMATS = {"parquet": ".parquet", "csv": ".csv"}
# Staging and set-aside directories of other runs older than this are from
# killed runs: a live run adds a file to its staging directory per partition.
STALE_AFTER_S = 24 * 3600


def write_partition(df: Any, directory: str | os.PathLike[str], run_id: str, index: int, fmt: str) -> str:
    """Write partition ``index`` into this run's staging directory, atomically.

    The file is written under a temporary name in the staging directory
    (``<parent>/.<name>.flowyml-staging-<run_id>/``, beside the output so the
    final rename stays on one filesystem) and moved to ``part-<index>.<fmt>``
    with :func:`os.replace`: it appears whole or not at all, and a retried or
    recomputed task simply replaces it.

    Parameters
    ----------
    df : pandas.DataFrame or pandas.Series
        A Series becomes a one-column frame (named ``value`` when unnamed).
    directory : str or path
        The output directory the files will have after :func:`commit_output`.
    run_id : str
        The run's id (one staging directory per run).
    index : int
        The partition index; names the file ``part-00003.parquet``.
    fmt : {"parquet", "csv"}
        Parquet with pandas' default index handling; CSV with a header, no index.

    Returns
    -------
    str
        The path the file will have once the output is committed.
    """
    suffix = _output_suffix(fmt)
    frame = _as_frame(df, fmt, index)
    target = _output_path(directory)
    name = f"part-{index:05d}{suffix}"
    with _staged_file(target, run_id, name) as temporary:
        if fmt == "parquet":
            frame.to_parquet(temporary)
        else:
            frame.to_csv(temporary, index=False)
    return os.path.join(target, name)


def commit_output(directory: str | os.PathLike[str], run_id: str, written: Sequence[str]) -> list[str]:
    """Make this run's staged files the output at ``directory``, replacing the old one.

    Checks that every file in ``written`` is staged and drops anything else
    there (temporary files of killed attempts). Then, holding a lock file
    beside the output (``.<name>.flowyml-lock``, so two runs committing the
    same directory take turns and the last one wins whole), renames the old
    output aside, renames the staging directory into place and removes the
    old output; if the second rename fails, the old output is renamed back.
    Between the two renames (microseconds) ``directory`` does not exist; a
    process killed exactly there leaves the old output in
    ``.<name>.flowyml-old-<run_id>``. Staging and set-aside directories of
    other runs older than a day (killed runs) are removed too.

    Returns
    -------
    list of str
        The committed file paths, sorted.
    """
    target = _output_path(directory)
    staging = _staging_dir(target, run_id)
    names = set()
    for path in written:
        if os.path.dirname(os.path.abspath(path)) != target:
            raise OptionError(f"commit_output: {path!r} was not written for {_display_path(target)!r}")
        names.add(os.path.basename(path))
    os.makedirs(staging, exist_ok=True)  # no partition at all: the output is an empty directory
    present = set(os.listdir(staging))
    missing = sorted(names - present)
    if missing:
        raise DataError(
            f"cannot commit {_display_path(target)}: {len(missing)} partition file(s) were not written "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); the previous output is untouched"
        )
    for extra in present - names:
        _remove(os.path.join(staging, extra))
    with _commit_lock(target):
        _swap_into_place(staging, target, _aside_dir(target, run_id))
        _remove_stale(target)
    return sorted(os.path.join(target, name) for name in names)


def restage_partition(path: str | os.PathLike[str], run_id: str) -> str:
    """Stage a file an earlier run committed, so that this run's commit keeps it.

    Used by the task cache: a sink partition whose input did not change is not
    written again; its committed file is hard-linked (copied where links are
    not possible) into this run's staging directory, under a temporary name
    then renamed, like :func:`write_partition`.

    Returns
    -------
    str
        ``path``, as :func:`write_partition` returns it.

    Raises
    ------
    FileNotFoundError
        The committed file is gone (the caller recomputes the partition).
    """
    final = os.path.abspath(os.fspath(path))
    target, name = os.path.split(final)
    with _staged_file(target, run_id, name) as temporary:
        try:
            os.link(final, temporary)
        except FileNotFoundError:
            raise
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(final, temporary)
    return final


@contextlib.contextmanager
def _staged_file(target: str, run_id: str, name: str) -> Iterator[str]:
    """A temporary path in this run's staging directory, moved to ``name`` if the block succeeds.

    The file appears whole or not at all: a failed block removes the temporary
    file. Registered with the run's staging guard for the whole write.
    """
    staging = _staging_dir(target, run_id)
    with _STAGING.writing(staging):
        os.makedirs(staging, exist_ok=True)
        temporary = os.path.join(staging, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            yield temporary
            os.replace(temporary, os.path.join(staging, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise


def abort_output(directory: str | os.PathLike[str], run_id: str) -> None:
    """Remove this run's staging directory; the previous output is untouched.

    Writes of this run still in flight in this process (the ``sync`` and
    ``thread`` backends, whose threads cannot be stopped) are waited for, up
    to :data:`ABORT_WAIT_S` seconds, and none starts afterwards: a write that
    outlasts the wait removes the directory itself when it ends. A straggling
    attempt in another process (a ``distributed`` worker) may still recreate
    it; such leftovers are removed by the next commit to ``directory`` once
    they are a day old.
    """
    _STAGING.abort(_staging_dir(_output_path(directory), run_id))


# How long aborting a run waits for its partition writes already in flight.
ABORT_WAIT_S = 30.0


class _StagingGuard:
    """Partition writes in flight per staging directory, and the runs aborted.

    Aborting a run must not race its own writers: a thread still writing a
    partition would recreate the staging directory after it was removed. A
    writer registers for the length of its write and refuses to start once
    the run is aborted; :meth:`abort` waits for the registered ones.
    """

    MAX_ABORTED = 1024  # remembered aborted runs (stragglers come soon after)

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._writing: dict[str, int] = {}
        self._aborted: OrderedDict[str, None] = OrderedDict()

    @contextlib.contextmanager
    def writing(self, staging: str) -> Iterator[None]:
        with self._changed:
            if staging in self._aborted:
                raise DataError(f"not writing into {_display_path(staging)}: its run was stopped")
            self._writing[staging] = self._writing.get(staging, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                left = self._writing.pop(staging) - 1
                if left:
                    self._writing[staging] = left
                elif staging in self._aborted:  # the abort stopped waiting: the last writer cleans up
                    shutil.rmtree(staging, ignore_errors=True)
                self._changed.notify_all()

    def abort(self, staging: str) -> None:
        with self._changed:
            self._aborted[staging] = None
            while len(self._aborted) > self.MAX_ABORTED:
                self._aborted.popitem(last=False)
            self._changed.wait_for(lambda: staging not in self._writing, timeout=ABORT_WAIT_S)
            if staging not in self._writing:
                shutil.rmtree(staging, ignore_errors=True)


_STAGING = _StagingGuard()


def _output_suffix(fmt: str) -> str:
    try:
        return _FORMATS[fmt]
    except KeyError:
        raise OptionError(f"unknown output format {fmt!r}; use one of {sorted(_FORMATS)}") from None


def _as_frame(value: Any, fmt: str, index: int) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, pd.Series):
        return value.to_frame(name=value.name if value.name is not None else "value")
    task = current_task()
    step = repr(task.step) if task is not None else f"write_{fmt}"
    raise OptionError(
        f"step {step}, partition {index}: write_{fmt} writes pandas DataFrames or Series, "
        f"got {type(value).__name__}; make the step feeding it return a DataFrame"
    )


def _output_path(directory: str | os.PathLike[str]) -> str:
    text = os.fspath(directory)
    if _is_url(text):
        raise OptionError(f"write_parquet/write_csv write to a local (or mounted) filesystem, not {text!r}")
    return os.path.abspath(text.removeprefix("file://"))


def _safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(run_id))


def _staging_dir(target: str, run_id: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.flowyml-staging-{_safe_run_id(run_id)}")


def _aside_dir(target: str, run_id: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.flowyml-old-{_safe_run_id(run_id)}")


def _swap_into_place(staging: str, target: str, aside: str) -> None:
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if not os.path.isdir(target):
        raise DataError(f"cannot write {_display_path(target)}: it exists and is not a directory")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _remove_stale(target: str) -> None:
    parent, name = os.path.split(target)
    cutoff = time.time() - STALE_AFTER_S
    for kind in ("staging", "old"):
        for path in _glob.glob(os.path.join(_glob.escape(parent), f".{_glob.escape(name)}.flowyml-{kind}-*")):
            with contextlib.suppress(OSError):
                if os.path.getmtime(path) < cutoff:
                    _remove(path)


@contextlib.contextmanager
def _commit_lock(target: str) -> Iterator[None]:
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: commits are not serialized
        yield
        return
    # The lock file stays: deleting it would let a waiting run lock a stale inode.
    with open(os.path.join(parent, f".{name}.flowyml-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# Sink steps
# ---------------------------------------------------------------------------


class _PartitionWriter:
    """The per-partition function of a sink step: stage one file, return its final path."""

    def __init__(self, directory: str, fmt: str) -> None:
        self.directory = directory
        self.fmt = fmt

    def __call__(self, data: Any) -> str:
        task = current_task()
        if task is None:  # called by hand, outside a run
            return write_partition(data, self.directory, "direct", 0, self.fmt)
        return write_partition(data, self.directory, task.run_id, task.partition or 0, self.fmt)

    def __repr__(self) -> str:
        return f"write_{self.fmt}({self.directory!r})"


class _Committer:
    """The sink's finalize: once every partition is staged, make them the output."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, written: list[str]) -> list[str]:
        task = current_task()
        return commit_output(self.directory, task.run_id if task else "direct", written)


class _Aborter:
    """Called on the driver when a run fails: drop this run's staged files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, run_id: str) -> None:
        abort_output(self.directory, run_id)


def _sink(fmt: str, path: str | os.PathLike[str], input: str, name: str | None) -> Any:
    from flowyml.step import Step

    if not isinstance(input, str) or not input:
        raise OptionError(f"write_{fmt}({os.fspath(path)!r}) needs input='<asset name>' to say what to write, got {input!r}")
    directory = _output_path(path)  # resolved here, on the driver: workers may run elsewhere
    return Step(
        func=_PartitionWriter(directory, fmt),
        name=name or f"write_{fmt}",
        inputs=(input,),
        per_partition=True,
        finalize=_Committer(directory),
        abort=_Aborter(directory),
    )


def write_parquet(path: str | os.PathLike[str], *, input: str, name: str | None = None) -> Any:
    """A step that writes ``input`` as Parquet files ``path/part-00000.parquet``, ...

    Each partition is written by the worker that computed it, to a staging
    folder beside ``path``, under a temporary name then renamed, so every file
    appears whole or not at all. Once all are written, the staging folder
    replaces the previous output in one rename; a failed run leaves the
    previous output untouched. The step's asset (named after the step,
    ``write_parquet`` unless ``name=`` says otherwise) is the list of written paths.

    Examples
    --------
    >>> sink = write_parquet("out/clean", input="clean")
    >>> sink.name, sink.inputs, sink.per_partition
    ('write_parquet', ('clean',), True)
    """
    return _sink("parquet", path, input, name)


def write_csv(path: str | os.PathLike[str], *, input: str, name: str | None = None) -> Any:
    """Like :func:`write_parquet`, as CSV files with a header and no index."""
    return _sink("csv", path, input, name)

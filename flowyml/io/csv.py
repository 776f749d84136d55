"""CSV sources: one partition per file, or per block of whole lines.

Planning reads the first lines of each file (pandas parses the header with
``nrows=0``), and, when ``blocksize`` splits a file, the few bytes up to the
next line end at each block boundary, so every block holds whole lines and
none is empty (an empty block would parse with ``object`` columns and, since
pandas 3, turn ``int64`` into ``object`` when the partitions are
concatenated).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pandas as pd
from dask.base import tokenize
from dask.utils import parse_bytes
from fsspec.utils import infer_compression, read_block, seek_delimiter

from flowyml.exceptions import DataError, OptionError
from flowyml.io.filesystem import display_path, file_version, full_path, is_local, is_url
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
        if not is_url(self.path):
            if self.offset is None:
                return pd.read_csv(self.path, **self.read_kwargs)
            with open(self.path, "rb") as file:
                block = read_block(file, self.offset, self.length)
            return pd.read_csv(io.BytesIO(self.prefix + block), **self.read_kwargs)
        with self.open() as file:
            if self.offset is None:
                # A handle, not a path: pandas cannot infer the compression from it.
                options = {**self.read_kwargs, "compression": _compression(self.path, self.read_kwargs)}
                return pd.read_csv(file, **options)
            block = read_block(file, self.offset, self.length)
        return pd.read_csv(io.BytesIO(self.prefix + block), **self.read_kwargs)

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
        files = resolve_files(self.paths, (".csv", ".tsv", ".txt"), self.label, self.storage_options)
        paths = [full_path(fs, path) for fs, path, _ in files]
        token = tokenize("csv", self.pandas_kwargs)
        versions = [file_version(fs, path, info) for fs, path, info in files]
        if any(is_local(fs) for fs, _, _ in files):
            # Local headers cost milliseconds: every file is checked now, before any task.
            columns = [_local_columns(fs, path, version, token, self.pandas_kwargs, self.storage_options,
                                      self.label)
                       for (fs, path, _), version in zip(files, versions)]
            orders = check_same_columns(paths, columns, self.label)
            checks: list[dict[str, Any]] = [{"options_token": with_order(token, order), "columns": order}
                                            for order in orders]
        else:
            # On an object store each header is a round trip: planning reads the
            # first file's, as dask.dataframe does, and every other file is held
            # to it as it loads (the same DataError, naming both files).
            fs, path, _ = files[0]
            expected = _csv_columns(fs, path, self.pandas_kwargs, self.storage_options, self.label)
            held = {"options_token": tokenize(token, expected), "expected": expected, "expected_from": paths[0]}
            checks = [held] * len(files)
        parts: list[Partition] = []
        for (fs, path, _), (size, version), check in zip(files, versions, checks):
            common = dict(path=full_path(fs, path), size=size, mtime_ns=version, source=self.label,
                          storage_options=self.storage_options, **check)
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
        ends = [*starts[1:], size]
        specs = []
        for number, (start, end) in enumerate(zip(starts, ends)):
            kwargs = _block_kwargs(self.pandas_kwargs, first=number == 0, last=end == size)
            prefix = b"" if number == 0 else header_line
            specs.append({"offset": start, "length": end - start, "prefix": prefix, "read_kwargs": kwargs})
        return specs


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
    where = full_path(fs, path)
    storage = {"storage_options": storage_options} if storage_options and is_url(where) else {}
    try:
        # pandas reads only the first buffer of the file for nrows=0, and
        # handles compression, encodings and URLs as it will for the data.
        frame = pd.read_csv(where, **storage, **_probe_kwargs(kwargs))
    except Exception as exc:
        raise DataError(
            f"source {label!r}: cannot read the header of {display_path(where)}: "
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

"""Sources and their partitions: what to read, resolved into units of work at run time.

A source is a plan, not data. ``read_csv(...)`` and ``read_parquet(...)`` only
record what to read: declaring one touches no file. The core calls
:meth:`Source.partitions` once per run, on the driver, before any task starts.
Planning resolves globs and directories (:func:`resolve_files`), stats every
file and reads metadata only (what each format reads is in
:mod:`flowyml.io.csv` and :mod:`flowyml.io.parquet`).

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
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import pandas as pd
from dask.base import tokenize
from fsspec.utils import infer_compression

from flowyml.exceptions import DataError, OptionError
from flowyml.io.filesystem import display_path, filesystem_for, is_url, redact_option

__all__ = ["Partition", "Source", "check_same_columns", "resolve_files", "with_order"]


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
    read_kwargs : dict
        The reader's options for this partition (never shown: they may hold
        credentials).
    columns : tuple or None
        The source's column order, when this file lists its columns in
        another: the frame read is reordered to it.
    """

    index: int
    path: str
    size: int
    mtime_ns: int | str
    source: str = field(default="source", compare=False)
    options_token: str = ""
    read_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    columns: tuple | None = None

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
            frame = self._read()
            return frame if self.columns is None else frame[list(self.columns)]
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
        return display_path(self.path)

    # -- for subclasses
    def _read(self) -> pd.DataFrame:
        """The partition's rows as the file has them (``load`` reorders the columns)."""
        raise NotImplementedError

    def _range(self) -> tuple:
        raise NotImplementedError

    def _hint(self) -> str:
        return ""

    def _check_unchanged(self) -> None:
        # The byte ranges and the cache key were computed from this size and
        # mtime; reading a rewritten file under them would return (and cache)
        # rows that do not match the key.
        if is_url(self.path):
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
                f"source {self.source!r}: {display_path(self.path)} changed while the run "
                f"was planned or running (partition {self.index}); run the pipeline again"
            )


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


def _as_path_list(paths: Any, reader: str) -> tuple[str, ...]:
    try:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    except TypeError:
        items = []
    if not items or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise OptionError(f"{reader}() takes a path, a glob or a list of them, not {paths!r}")
    return tuple(os.fspath(item) for item in items)


def resolve_files(patterns: Sequence[str], suffixes: tuple[str, ...], label: str) -> list[tuple[Any, str]]:
    """Expand paths, globs and directories into (filesystem, path) pairs, in order."""
    found: dict[str, Any] = {}
    for pattern in patterns:
        fs, root = filesystem_for(pattern)
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


def check_same_columns(paths: list[str], columns: list[tuple], label: str) -> list[tuple | None]:
    """Raise if any file's columns differ from the first's; return a reorder per file."""
    first_path, first = paths[0], columns[0]
    orders: list[tuple | None] = []
    for path, names in zip(paths, columns):
        if set(names) != set(first) or len(names) != len(first):
            only_first = [name for name in first if name not in names]
            only_here = [name for name in names if name not in first]
            raise DataError(
                f"source {label!r}: the files do not have the same columns: "
                f"{display_path(first_path)} has {list(first)}, {display_path(path)} has {list(names)} "
                f"(only in the first: {only_first}; only in the second: {only_here}). "
                "Read them as separate sources, or select common columns (usecols= / columns=)."
            )
        orders.append(None if names == first else first)
    return orders


def with_order(token: str, order: tuple | None) -> str:
    # A file reordered to match the others returns other data than alone.
    return token if order is None else tokenize(token, order)

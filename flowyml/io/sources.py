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

import contextlib
import glob as _glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
from dask.base import tokenize
from fsspec.utils import infer_compression

from flowyml.exceptions import DataError, OptionError, StorageError
from flowyml.io.filesystem import (
    display_path,
    file_version,
    filesystem_for,
    full_path,
    is_local,
    is_url,
    redact_option,
    redact_url,
    storage_error,
)
from flowyml.io.schema import ColumnType, conform, declared_schema

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
        Modification time in nanoseconds when planned (local files); on object
        stores, the object's version (``ETag=...``, ``generation=...``; see
        :func:`~flowyml.io.filesystem.file_version`).
    source : str
        The source's name, for error messages.
    options_token : str
        A hash of the reader options (``usecols=``, ``columns=``...), so that
        changing them changes :meth:`identity`. Never of ``storage_options``:
        new credentials read the same data.
    read_kwargs : dict
        The reader's options for this partition (never shown: they may hold
        credentials).
    columns : tuple or None
        The source's column order, when this file lists its columns in
        another: the frame read is reordered to it.
    storage_options : dict or None
        How to reach ``path`` (credentials, endpoint); travels to the worker
        with the partition, never shown.
    expected, expected_from : tuple and str, or None
        The columns this file must have (in any order), and the file that had
        them, when they are checked as the partition loads rather than at
        planning (CSV on an object store); the frame is reordered to them.
    types : tuple of ColumnType
        The dtype each listed column must have as the partition reaches the
        steps, the same for every partition of the source (see
        :mod:`flowyml.io.schema`); part of ``options_token``.
    """

    index: int
    path: str
    size: int
    mtime_ns: int | str
    source: str = field(default="source", compare=False)
    options_token: str = ""
    read_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    columns: tuple | None = None
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    expected: tuple | None = field(default=None, repr=False)
    expected_from: str | None = field(default=None, repr=False)
    types: tuple[ColumnType, ...] = field(default=(), repr=False)

    def load(self) -> pd.DataFrame:
        """Read exactly this partition's rows.

        Raises
        ------
        DataError
            The file is missing, changed since planning, or cannot be parsed;
            the message names the source, the file and the partition index.
        """
        if not is_url(self.path):  # an object store's version is checked as the file opens (open())
            self._check_unchanged()
        try:
            frame = self._read()
            if self.expected is not None:
                found = tuple(frame.columns)
                order = check_same_columns([self.expected_from or "", self.path], [self.expected, found],
                                           self.source)[1]
            else:
                order = self.columns
            frame = frame if order is None else frame[list(order)]
            return conform(frame, self.types, self.where(), self._locate) if self.types else frame
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"source {self.source!r}: cannot read partition {self.index}, "
                f"{self.describe()}: {type(exc).__name__}: {exc}{self._hint()}"
            ) from exc

    def identity(self) -> tuple:
        """What the data of this partition depends on: the cache key (never the index, never a secret)."""
        return (redact_url(self.path), self.size, self.mtime_ns, *self._range(), self.options_token)

    def filesystem(self) -> tuple[Any, str]:
        """The partition's filesystem and its path there (fsspec reuses one instance per process)."""
        return filesystem_for(self.path, self.storage_options, who=f"source {self.source!r}")

    @contextlib.contextmanager
    def open(self) -> Iterator[Any]:
        """The partition's file on its filesystem, open for reading (binary).

        On an object store the object's size and version are checked as it
        opens, from the answer of the request that opens it: a file rewritten
        since planning raises :class:`~flowyml.exceptions.DataError` instead of
        being read (and cached) under the old identity.
        """
        fs, path = self.filesystem()
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError as exc:
            raise self._gone(exc) from exc
        with handle:
            self._check_version(file_version(fs, path, getattr(handle, "details", None)))
            yield handle

    def describe(self) -> str:
        """A short human description, e.g. ``data/trips_03.csv (bytes 0-1048576)``."""
        return display_path(self.path)

    def where(self) -> str:
        """How errors about this partition start: ``source 'trips': partition 3, data/trips_03.csv``."""
        return f"source {self.source!r}: partition {self.index}, {self.describe()}"

    # -- for subclasses
    def _read(self) -> pd.DataFrame:
        """The partition's rows as the file has them (``load`` reorders the columns)."""
        raise NotImplementedError

    def _range(self) -> tuple:
        raise NotImplementedError

    def _hint(self) -> str:
        return ""

    def _locate(self, column: str, dtype: Any) -> str:
        """Where in the file the first value of ``column`` that is not a ``dtype`` is ("": unknown)."""
        return ""

    def _check_unchanged(self) -> None:
        # The byte ranges and the cache key were computed from this size and
        # mtime; reading a rewritten file under them would return (and cache)
        # rows that do not match the key.
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise self._gone(exc) from exc
        self._check_version((stat.st_size, stat.st_mtime_ns))

    def _gone(self, exc: OSError) -> DataError:
        return DataError(
            f"source {self.source!r}: cannot read partition {self.index}, "
            f"{self.describe()}: the file is gone ({exc.strerror or exc})"
        )

    def _check_version(self, now: tuple[int, int | str]) -> None:
        if now != (self.size, self.mtime_ns):
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

    def __init__(self, paths: Any, pandas_kwargs: dict[str, Any], schema: Any = None) -> None:
        self.paths = _as_path_list(paths, self.reader)
        self.pandas_kwargs = dict(pandas_kwargs)
        # Kept apart from the reader options: used for every touch of the files
        # (planning and loading), never part of the options' hash or a message.
        self.storage_options = _storage_options(self.pandas_kwargs.pop("storage_options", None), self._declared())
        #: The declared schema, column -> pandas dtype name (None: none declared).
        self.schema = declared_schema(schema, self._declared())
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
        shown = [redact_url(path) for path in self.paths]
        return f"{self.reader}({shown[0] if len(shown) == 1 else shown!r})"

    @property
    def label(self) -> str:
        """The name used in messages: the source's name, else its ``repr``."""
        return self.name or repr(self)

    def _options_repr(self) -> str:
        options = dict(self.pandas_kwargs)
        if self.schema is not None:
            options["schema"] = self.schema
        if self.storage_options is not None:
            options["storage_options"] = self.storage_options
        return "".join(f", {key}={redact_option(key, value)!r}" for key, value in options.items())

    def __repr__(self) -> str:
        shown = [redact_url(path) for path in self.paths]
        return f"{self.reader}({shown[0] if len(shown) == 1 else shown!r}{self._options_repr()})"


def _as_path_list(paths: Any, reader: str) -> tuple[str, ...]:
    try:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    except TypeError:
        items = []
    if not items or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise OptionError(f"{reader}() takes a path, a glob or a list of them, not {paths!r}")
    return tuple(os.fspath(item) for item in items)



def resolve_files(
    patterns: Sequence[str],
    suffixes: tuple[str, ...],
    label: str,
    storage_options: dict[str, Any] | None = None,
) -> list[tuple[Any, str, dict[str, Any] | None]]:
    """Expand paths, globs and directories into ``(filesystem, path, info)``, in order.

    ``info`` is what the listing said of the file (size, ETag...; None when
    the path was named directly), so planning need not ask again. In a
    directory, files and folders whose names start with ``.`` or ``_``
    (``_SUCCESS``, ``_metadata``, flowyml's own ``_flowyml/``) are skipped, as
    pyarrow skips them.
    """
    found: dict[str, tuple[Any, dict[str, Any] | None]] = {}
    who = f"source {label!r}"
    for pattern in patterns:
        fs, root = filesystem_for(pattern, storage_options, who=who)
        shown = redact_url(pattern)
        try:
            matches = _matches(fs, root, suffixes)
        except (PermissionError, FileNotFoundError) as exc:
            raise storage_error(exc, who, pattern) from exc
        if matches is None or not matches:
            missing = _missing_container(fs, root)
            if missing is not None:
                raise StorageError(f"{who}: cannot read {shown}: the bucket or container "
                                   f"{fs.unstrip_protocol(missing)} does not exist")
        if matches is None:
            raise DataError(f"{who}: {shown!r} does not exist; check the path and the working directory")
        if not matches:
            if _glob.has_magic(root):
                searched = display_path(full_path(fs, _glob_base(root)))
                raise DataError(f"{who}: the glob {shown!r} matched no file (searched {searched}); "
                                f"check the path and the working directory")
            raise DataError(f"{who}: the directory {shown!r} holds no {'/'.join(suffixes)} file")
        for path, info in matches:
            found.setdefault(path, (fs, info))
    return [(fs, path, info) for path, (fs, info) in found.items()]


def _matches(fs: Any, root: str, suffixes: tuple[str, ...]) -> list[tuple[str, dict | None]] | None:
    """The files ``root`` names (a glob, a directory or a file), sorted; None when nothing is there."""
    if _glob.has_magic(root):
        return sorted((path, info) for path, info in fs.glob(root, detail=True).items() if info["type"] == "file")
    if fs.isdir(root):
        base = root.rstrip("/") + "/"
        return sorted(
            (path, info) for path, info in fs.find(root, detail=True).items()
            if info["type"] == "file" and _is_data_file(path[len(base):] if path.startswith(base) else path,
                                                        suffixes)
        )
    if fs.isfile(root):
        return [(root, None)]
    return None


def _missing_container(fs: Any, root: str) -> str | None:
    """The bucket (container) of ``root`` when the filesystem has buckets and that one does not exist."""
    if is_local(fs) or "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None
    bucket = root.strip("/").split("/", 1)[0]
    try:
        return None if fs.exists(bucket) else bucket
    except OSError:
        return None


def _storage_options(value: Any, source: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise OptionError(f"{source}: storage_options must be a dict (as for pandas), got {type(value).__name__}")


def _glob_base(pattern: str) -> str:
    head = pattern
    while _glob.has_magic(head):
        head = os.path.dirname(head)
    return head or "."


def _is_data_file(relative: str, suffixes: tuple[str, ...]) -> bool:
    """A data file of a directory source: ``relative`` is its path below the directory."""
    parts = relative.strip("/").split("/")
    if any(part.startswith((".", "_")) for part in parts):  # _SUCCESS, _metadata, _flowyml/, temporary files
        return False
    name = parts[-1]
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

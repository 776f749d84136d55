"""Delta Lake tables: a sink whose workers write data files and whose driver commits them once.

:func:`write_delta` is a per-partition step like :func:`~flowyml.io.writers.write_parquet`:

- each worker writes its partition as Parquet files straight into the table's
  folder, under names no other run or attempt uses
  (``part-<run>-<partition>-<uuid>.parquet``, below ``key=value/`` folders
  with ``partition_by``), and returns what it wrote (path, size, partition
  values, statistics, schema): a few hundred bytes, never the data;
- the sink's commit adds every file of the run in ONE Delta transaction
  through the ``deltalake`` package (delta-rs), creating the table when it
  does not exist. A file is invisible to every reader (deltalake, DuckDB,
  Spark) until the log lists it, so readers see all of a run's data or none;
- a failed run commits nothing, and its ``abort`` removes the files it wrote
  (best effort: files not in the log are invisible anyway).

Concurrency is Delta's optimistic concurrency. An append commits against the
newest version, and delta-rs retries a commit that lost the race (appends
never conflict); flowyml retries a few more times on top. An overwrite
remembers the version the table had when its run began (``begin``) and fails
with :class:`~flowyml.exceptions.CommitConflictError` when another commit
landed since: two overwrites at once, one wins and the other says so.

:func:`~flowyml.io.delta_read.read_delta` (in its own module) plans one
partition per data file of a table version (time travel with ``version=``).

``storage_options`` are fsspec's (as for every flowyml path); keys written in
capitals (``AWS_S3_ALLOW_UNSAFE_RENAME``, ``AWS_S3_LOCKING_PROVIDER``...) go to
delta-rs only, and s3fs' ``key``/``secret``/``token``/``endpoint_url`` are
translated for it. delta-rs also reads the ``AWS_*`` environment variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pandas as pd

from flowyml.context import current_task
from flowyml.exceptions import CommitConflictError, DataError, OptionError, StorageError
from flowyml.io.filesystem import display_path, filesystem_for, is_url, redact_url
from flowyml.secrets import remember, scrub

__all__ = ["DeltaCommit", "DeltaTableLocation", "write_delta"]

log = logging.getLogger("flowyml")

MODES = ("append", "overwrite")
# Appends never conflict with each other, only lose races to be the next
# version: delta-rs retries those itself; these are flowyml's rounds on top.
APPEND_ATTEMPTS = 5
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_RUN_KEY = "flowyml.run"
_REMEMBERED_RUNS = 16  # read versions kept per sink (only the running ones are needed)


def _requires_deltalake(who: str) -> Any:
    try:
        import deltalake
    except ImportError as exc:
        raise OptionError(f'{who} needs the deltalake package: pip install "flowyml[delta]"') from exc
    return deltalake


# ---------------------------------------------------------------------------
# Where the table is
# ---------------------------------------------------------------------------


class DeltaTableLocation:
    """A Delta table's folder: a local path or an fsspec URL, and how each side reaches it.

    The workers write data files through fsspec (``storage_options`` as for
    pandas); the driver commits through delta-rs, whose options are derived
    from them (:meth:`delta_options`). Pickled as its URL and options; shown
    without secrets.
    """

    def __init__(self, uri: str | os.PathLike[str], storage_options: dict[str, Any] | None, *, who: str = "") -> None:
        text = os.fspath(uri)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise OptionError(f"{who}: storage_options must be a dict, got {type(storage_options).__name__}")
        remember(storage_options)
        self.storage_options = storage_options
        self.who = who
        self.local = not is_url(text)
        if self.local:
            local = text[len("file://"):] if text.startswith("file://") else text
            self.url = os.path.abspath(os.path.expanduser(local)).rstrip(os.sep)
        else:
            self.url = text.rstrip("/")

    def __reduce__(self) -> tuple:
        return (DeltaTableLocation, (self.url, self.storage_options), {"who": self.who})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.who = state["who"]

    def __repr__(self) -> str:
        return f"DeltaTableLocation({redact_url(self.url)!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-delta", redact_url(self.url))

    @property
    def shown(self) -> str:
        return display_path(self.url)

    def fsspec_options(self) -> dict[str, Any]:
        """The options for the workers' fsspec filesystem (the capitalised delta-rs keys left out)."""
        return {key: value for key, value in (self.storage_options or {}).items() if not key.isupper()}

    def delta_options(self) -> dict[str, str] | None:
        """The options for delta-rs: its own (capitalised) keys, and s3fs' translated."""
        given = self.storage_options or {}
        options = {key: str(value) for key, value in given.items() if key.isupper()}
        if not self.local and self.url.startswith(("s3://", "s3a://")):
            client = given.get("client_kwargs") or {}
            for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                                 ("token", "AWS_SESSION_TOKEN")):
                if given.get(ours):
                    options.setdefault(theirs, str(given[ours]))
            endpoint = given.get("endpoint_url") or client.get("endpoint_url")
            if endpoint:
                options.setdefault("AWS_ENDPOINT_URL", str(endpoint))
            if client.get("region_name"):
                options.setdefault("AWS_REGION", str(client["region_name"]))
            endpoint = options.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL", "")
            if endpoint.startswith("http://"):  # a local S3 server (MinIO, moto): delta-rs refuses http otherwise
                options.setdefault("AWS_ALLOW_HTTP", "true")
        return options or None

    def filesystem(self) -> tuple[Any, str]:
        return filesystem_for(self.url, self.fsspec_options() or None, who=self.who)

    def file_url(self, relative: str) -> str:
        return os.path.join(self.url, *relative.split("/")) if self.local else f"{self.url}/{relative}"

    def load(self, version: int | None = None) -> Any:
        """The table (at ``version``), or None when there is no Delta table there."""
        deltalake = _requires_deltalake(self.who)
        from deltalake.exceptions import TableNotFoundError

        try:
            return deltalake.DeltaTable(self.url, version=version, storage_options=self.delta_options())
        except TableNotFoundError:
            return None
        except Exception as exc:
            if version is not None and "version" in str(exc).lower():
                raise DataError(f"{self.who}: the Delta table {self.shown} has no version {version}: "
                                f"{scrub(str(exc))}") from exc
            raise StorageError(f"{self.who}: cannot open the Delta table {self.shown}: "
                               f"{type(exc).__name__}: {scrub(str(exc))}") from exc


# ---------------------------------------------------------------------------
# Writing: files on the workers, one commit
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaFile:
    """One data file a worker wrote, as the commit adds it (relative path, as in the log)."""

    path: str
    size: int
    partition_values: dict[str, str | None]
    modification_time: int
    stats: str
    schema: Any  # pyarrow.Schema of the whole frame (partition columns included)


@dataclass(frozen=True)
class DeltaCommit:
    """What :func:`write_delta` returns: the table, the version its commit made, the files it added."""

    uri: str
    version: int
    files: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return f"DeltaCommit({redact_url(self.uri)!r}, version={self.version}, files={len(self.files)})"


def _stats(table: Any) -> str:
    """The Delta statistics of a file: row count, and min/max/null count of plain columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)):
            continue
        nulls[name] = column.null_count
        if column.null_count == len(column) or len(column) == 0:
            continue
        found = pc.min_max(column)
        low, high = found["min"].as_py(), found["max"].as_py()
        if isinstance(low, float) and (low != low or high != high):  # NaN: no usable bounds
            continue
        minimum[name], maximum[name] = low, high
    return json.dumps({"numRecords": table.num_rows, "minValues": minimum, "maxValues": maximum,
                       "nullCount": nulls})


def _partition_text(value: Any) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat(sep=" ")
    return str(value)


def _to_arrow(frame: pd.DataFrame) -> Any:
    """The frame as Arrow, in types Delta has: timestamps in microseconds (Delta's unit)."""
    import pyarrow as pa

    # A default index: Delta stores no index, and pyarrow 14 looks values up by
    # label in a frame whose index has gaps (a group, rows dropped), failing.
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    fields = []
    for item in table.schema:
        kind = item.type
        if pa.types.is_timestamp(kind) and kind.unit == "ns":
            kind = pa.timestamp("us", tz=kind.tz)
        fields.append(item.with_type(kind))
    schema = pa.schema(fields)
    return table.cast(schema) if schema != table.schema else table


class _DeltaWriter:
    """The per-partition function of :func:`write_delta`: write the files, return what they are."""

    def __init__(self, table: DeltaTableLocation, partition_by: tuple[str, ...]) -> None:
        self.table = table
        self.partition_by = partition_by

    def __repr__(self) -> str:
        return f"write_delta({redact_url(self.table.url)!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-write-delta", self.partition_by, self.table.__dask_tokenize__())

    def __call__(self, data: Any) -> list[DeltaFile]:
        task = current_task()
        run_id, index = (task.run_id, task.partition or 0) if task is not None else ("direct", 0)
        frame = _as_frame(data, index, self.table.who)
        missing = [name for name in self.partition_by if name not in frame.columns]
        if missing:
            raise DataError(f"{self.table.who}, partition {index}: partition_by column(s) {missing} are not "
                            f"in the data (columns: {list(frame.columns)})")
        prefix = f"part-{_safe(run_id)}-{index:05d}-"
        # Converted once, whole: every file of the partition gets the same Arrow
        # types (a group whose text column is all missing would otherwise be null-typed).
        frame = frame.reset_index(drop=True)
        whole = _to_arrow(frame)
        if not self.partition_by:
            return [self._write(whole, "", {}, prefix)]
        written = []
        groups = frame.groupby(list(self.partition_by), dropna=False, sort=True).indices
        for key, positions in groups.items():
            group = whole.take(positions)
            values = key if isinstance(key, tuple) else (key,)
            texts = {name: _partition_text(value) for name, value in zip(self.partition_by, values)}
            folder = "/".join(f"{name}={quote(text if text is not None else _HIVE_NULL, safe='')}"
                              for name, text in texts.items())
            written.append(self._write(group, folder + "/", texts, prefix))
        return written

    def _write(self, whole: Any, folder: str, values: dict[str, str | None], prefix: str) -> DeltaFile:
        import pyarrow.parquet as pq

        data = whole.drop(list(self.partition_by)) if self.partition_by else whole
        relative = f"{folder}{prefix}{uuid.uuid4().hex}.parquet"
        target = self.table.file_url(relative)
        if self.table.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pq.write_table(data, target)
            size = os.path.getsize(target)
        else:
            fs, path = self.table.filesystem()
            with fs.open(path + "/" + relative, "wb") as handle:
                pq.write_table(data, handle)
            size = fs.size(path + "/" + relative)
        return DeltaFile(relative, int(size), values, int(time.time() * 1000), _stats(data), whole.schema)


class _DeltaCommitter:
    """The sink's finalize: add every file the run wrote to the table in one transaction."""

    def __init__(self, table: DeltaTableLocation, mode: str, partition_by: tuple[str, ...],
                 read_versions: dict[str, int] | None = None) -> None:
        self.table = table
        self.mode = mode
        self.partition_by = partition_by
        # run id -> the version the table had when that run began (-1: no table);
        # filled on the driver by begin() and pickled with the graph's tasks.
        self.read_versions: dict[str, int] = read_versions if read_versions is not None else {}

    def __reduce__(self) -> tuple:
        return (_DeltaCommitter, (self.table, self.mode, self.partition_by, self.read_versions))

    def __repr__(self) -> str:
        return f"commit_delta({redact_url(self.table.url)!r}, mode={self.mode!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-commit-delta", self.mode, self.partition_by, self.table.__dask_tokenize__())

    # -- the run's hooks

    def begin(self, run_id: str) -> None:
        """On the driver before the run: note the table's version (an overwrite commits against it)."""
        table = self.table.load()
        self.read_versions[run_id] = -1 if table is None else table.version()
        while len(self.read_versions) > _REMEMBERED_RUNS:  # a notebook runs one sink many times
            del self.read_versions[next(iter(self.read_versions))]
        if table is not None and self.partition_by:
            existing = tuple(table.metadata().partition_columns)
            if existing != self.partition_by:
                raise OptionError(f"{self.table.who}: the Delta table {self.table.shown} is partitioned by "
                                  f"{list(existing)}, not {list(self.partition_by)}; pass "
                                  f"partition_by={list(existing) or None}")

    def abort(self, run_id: str) -> None:
        """Remove the files this failed run wrote, unless a commit of this run made them part of the table."""
        table = self.table.load()
        if table is not None and any(entry.get(_RUN_KEY) == run_id for entry in table.history(20)):
            return
        prefix = f"part-{_safe(run_id)}-"
        if self.table.local:
            for folder, _, names in os.walk(self.table.url):
                if "_delta_log" in folder:
                    continue
                for name in names:
                    if name.startswith(prefix):
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(folder, name))
            return
        fs, root = self.table.filesystem()
        with contextlib.suppress(OSError):
            fs.invalidate_cache(root)
            doomed = [path for path in fs.find(root) if path.rsplit("/", 1)[-1].startswith(prefix)]
            if doomed:
                fs.rm(doomed)

    # -- the commit

    def __call__(self, written: list[list[DeltaFile]]) -> DeltaCommit:
        task = current_task()
        run_id = task.run_id if task is not None else "direct"
        files = [item for part in written for item in part]
        return self.commit(run_id, files)

    def commit(self, run_id: str, files: Sequence[DeltaFile]) -> DeltaCommit:
        deltalake = _requires_deltalake(self.table.who)
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

        actions = [AddAction(f.path, f.size, f.partition_values, f.modification_time, True, f.stats)
                   for f in files]
        properties = CommitProperties(custom_metadata={_RUN_KEY: run_id})
        schema = _one_schema(files, self.table.who)
        read_version = self.read_versions.get(run_id)
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            table = self.table.load()
            if self.mode == "overwrite" and read_version is not None:
                now = -1 if table is None else table.version()
                if now != read_version:
                    raise self._conflict(f"it changed while this run was writing (version {read_version} "
                                         f"when the run began, {now} now)")
            try:
                if table is None:
                    if schema is None:
                        raise DataError(f"{self.table.who}: nothing to write and no Delta table at "
                                        f"{self.table.shown} to take a schema from")
                    create_table_with_add_actions(
                        self.table.url, deltalake.Schema.from_arrow(schema), actions, mode="error",
                        partition_by=list(self.partition_by) or None,
                        storage_options=self.table.delta_options(), commit_properties=properties,
                    )
                else:
                    if schema is None and self.mode == "append":  # nothing to add: no empty commit
                        return DeltaCommit(self.table.url, table.version(), ())
                    if schema is not None:
                        self._check_schema(table, deltalake.Schema.from_arrow(schema))
                    table.create_write_transaction(
                        actions, self.mode, schema if schema is not None else table.schema(),
                        partition_by=list(self.partition_by) or None, commit_properties=properties,
                    )
            except CommitFailedError as exc:
                if self.mode == "overwrite" or attempt == APPEND_ATTEMPTS:
                    raise self._conflict(f"another commit won: {scrub(str(exc))}") from exc
                log.info("%s: append commit lost a race (%s); retrying", self.table.who, exc)
                continue
            except DataError:
                raise
            except Exception as exc:
                if _is_table_exists(exc):  # another run created the table first: commit into it
                    if self.mode == "overwrite" or attempt == APPEND_ATTEMPTS:
                        raise self._conflict("another run created it first") from exc
                    continue
                raise DataError(f"{self.table.who}: cannot commit to the Delta table {self.table.shown}: "
                                f"{type(exc).__name__}: {scrub(str(exc))}") from exc
            version = self._committed_version(run_id)
            return DeltaCommit(self.table.url, version, tuple(self.table.file_url(f.path) for f in files))
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_schema(self, table: Any, written: Any) -> None:
        """delta-rs adds files whatever their columns: ones the table's schema does not
        describe would break every reader of the table, so they are refused here."""
        def columns(schema: Any) -> dict[str, Any]:
            return {item["name"]: item["type"] for item in json.loads(schema.to_json())["fields"]}

        have, new = columns(table.schema()), columns(written)
        if have != new:
            differ = sorted(name for name in set(have) | set(new) if have.get(name) != new.get(name))
            shown = {name: (have.get(name, "absent"), new.get(name, "absent")) for name in differ}
            raise DataError(
                f"{self.table.who}: the data does not match the Delta table {self.table.shown}: "
                f"(table, data) types of the columns that differ: {shown}. Nothing was committed; "
                f"make the step return the table's columns and types, or write to a new table"
            )

    def _committed_version(self, run_id: str) -> int:
        table = self.table.load()
        for entry in table.history(20):
            if entry.get(_RUN_KEY) == run_id:
                return int(entry.get("version", table.version()))
        return int(table.version())

    def _conflict(self, why: str) -> CommitConflictError:
        return CommitConflictError(
            f"{self.table.who}: this run's {self.mode} of the Delta table {self.table.shown} was not "
            f"committed: {why}. Its data files were not added (readers see the table unchanged); "
            f"run the pipeline again once the other writer has finished"
            + (", or use mode='append' if both runs' rows should stay" if self.mode == "overwrite" else "")
        )


def _is_table_exists(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "already exists" in text


def _one_schema(files: Sequence[DeltaFile], who: str) -> Any:
    if not files:
        return None
    first = files[0].schema
    for item in files[1:]:
        if not item.schema.equals(first):
            raise DataError(f"{who}: partitions have different columns or types: {files[0].path} has "
                            f"{first}, {item.path} has {item.schema}; make every partition the same dtypes")
    return first


def _as_frame(value: Any, index: int, who: str) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, pd.Series):
        return value.to_frame(name=value.name if value.name is not None else "value")
    raise OptionError(f"{who}, partition {index}: write_delta writes pandas DataFrames or Series, got "
                      f"{type(value).__name__}; make the step feeding it return a DataFrame")


def _safe(run_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(run_id))


def write_delta(uri: str | os.PathLike[str], *, input: str, mode: str = "append",
                partition_by: Sequence[str] | str | None = None, name: str | None = None,
                storage_options: dict[str, Any] | None = None) -> Any:
    """A step that writes ``input`` into the Delta Lake table at ``uri``, in one commit.

    Each partition is written by the worker that computed it as Parquet data
    files in the table's folder (below ``key=value/`` folders with
    ``partition_by``); once every partition is written, one Delta
    transaction (through the ``deltalake`` package) adds them all, creating
    the table if there is none. Readers see all of the run's rows or none; a
    failed run commits nothing and removes its files.

    ``mode="append"`` adds rows (two runs appending at once both land);
    ``mode="overwrite"`` replaces the table's rows, and fails with
    :class:`~flowyml.exceptions.CommitConflictError` when another commit
    landed since the run began. The step's asset is a :class:`DeltaCommit`
    (the version made, the files added).

    Examples
    --------
    >>> sink = write_delta("out/trips", input="clean", mode="overwrite")
    >>> sink.name, sink.inputs, sink.per_partition
    ('write_delta', ('clean',), True)
    """
    from flowyml.step import Step

    step_name = name or "write_delta"
    declared = f"write_delta({redact_url(os.fspath(uri))!r})"
    if not isinstance(input, str) or not input:
        raise OptionError(f"{declared} needs input='<asset name>' to say what to write, got {input!r}")
    if mode not in MODES:
        raise OptionError(f"{declared}: unknown mode {mode!r}; use mode='append' (add rows) or "
                          f"mode='overwrite' (replace the table's rows)")
    columns = (partition_by,) if isinstance(partition_by, str) else tuple(partition_by or ())
    if not all(isinstance(column, str) and column for column in columns):
        raise OptionError(f"{declared}: partition_by takes column names, got {partition_by!r}")
    table = DeltaTableLocation(uri, storage_options, who=f"sink {step_name!r}")
    committer = _DeltaCommitter(table, mode, columns)
    return Step(
        func=_DeltaWriter(table, columns),
        name=step_name,
        inputs=(input,),
        per_partition=True,
        finalize=committer,
        abort=committer.abort,
        begin=committer.begin,
    )

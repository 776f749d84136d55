"""Sinks: steps that write each partition from the worker that computed it, committed at once.

An :class:`Output` is the folder a sink writes, on the local disk or on an
object store (any fsspec URL, with ``storage_options``), and how partitions
reach it:

- on a local (or mounted) filesystem each partition is written into a
  staging folder beside the output, under a temporary name then renamed;
  once every partition is written, the staging folder is swapped into place
  with two renames (:func:`commit_output`): readers see the previous output or
  the new one, never a mix or a partial file;
- on an object store each partition is one object under the output's
  ``_flowyml/staging/<run>/`` prefix, and the commit publishes them with
  server-side copies under a create-only commit record
  (:mod:`flowyml.io.objectstore` says what a reader sees at every moment).

:mod:`flowyml.io.writers` builds the pipeline steps that do so (``write_parquet``, ``write_csv``).
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from flowyml.context import current_task
from flowyml.exceptions import DataError, OptionError
from flowyml.io import objectstore
from flowyml.io.filesystem import (
    display_path,
    file_version,
    filesystem_for,
    is_url,
    redact_url,
    storage_error,
)

__all__ = [
    "Output",
    "abort_output",
    "commit_output",
    "restage_partition",
    "write_partition",
]

_FORMATS = {"parquet": ".parquet", "csv": ".csv"}
# Staging and set-aside directories of other runs older than this are from
# killed runs: a live run adds a file to its staging directory per partition.
STALE_AFTER_S = 24 * 3600


class Output:
    """The folder a sink writes: a local path or an fsspec URL, and how to reach it.

    Resolved on the driver when the sink is declared (a relative path becomes
    absolute there, since workers may run elsewhere). Pickled to workers as
    its URL and ``storage_options``; shown without secrets.

    Parameters
    ----------
    path : str or path
        A local folder, ``file://...``, or a URL such as ``s3://bucket/clean``.
    storage_options : dict, optional
        For the URL's filesystem (credentials, endpoint), as in pandas.
    who : str
        How errors name the sink (``"sink 'write_parquet'"``).
    """

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
                 who: str = "") -> None:
        text = os.fspath(path)
        self.storage_options = storage_options
        self.who = who
        if is_url(text):
            self.fs, root = filesystem_for(text, storage_options, who=who)
            objectstore.check_exclusive_writes(self.fs, who)
            self.root = root.rstrip("/")
            self.url = self.fs.unstrip_protocol(self.root)
            self.local = False
        else:
            local = text[len("file://"):] if text.startswith("file://") else text
            self.fs = None
            self.root = self.url = os.path.abspath(os.path.expanduser(local))
            self.local = True

    def __reduce__(self) -> tuple:
        return (_rebuild_output, (self.url, self.storage_options, self.who))

    def __repr__(self) -> str:
        return f"Output({redact_url(self.url)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Output) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __dask_tokenize__(self) -> tuple:
        # What the output is, for cache keys: its place, never its credentials.
        return ("flowyml-output", redact_url(self.url))

    @property
    def shown(self) -> str:
        """The output as messages show it (relative locally; URLs without secrets)."""
        return display_path(self.url)

    def final_path(self, name: str) -> str:
        """Where file ``name`` of the output is once committed."""
        return os.path.join(self.root, name) if self.local else f"{self.url}/{name}"

    def name_of(self, path: str) -> str:
        """The file name of a committed (or to be committed) ``path`` of this output."""
        if self.local:
            if os.path.dirname(os.path.abspath(path)) != self.root:
                raise OptionError(f"commit_output: {path!r} was not written for {self.shown!r}")
            return os.path.basename(path)
        prefix = self.url + "/"
        if not path.startswith(prefix) or "/" in path[len(prefix):]:
            raise OptionError(f"commit_output: {redact_url(path)!r} was not written for {self.shown!r}")
        return path[len(prefix):]

    # -- the run's steps

    def begin(self, run_id: str) -> None:
        """Called on the driver before a run that writes here: check the output can be written.

        On an object store this records the run's owner (see
        :func:`flowyml.io.objectstore.write_owner`), which fails at once, naming
        the sink and the URL, when the bucket is missing or access is denied.
        """
        if self.local:
            parent = os.path.dirname(self.root)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise storage_error(exc, self.who, parent) from exc
            if not os.access(parent, os.W_OK):
                raise storage_error(PermissionError(f"{parent} is not writable"), self.who, self.root)
            return
        try:
            objectstore.write_owner(self.fs, self.root, run_id)
        except OSError as exc:
            raise storage_error(exc, self.who, self.url) from exc

    def write(self, value: Any, run_id: str, index: int, fmt: str) -> str:
        """Stage partition ``index`` (whole or not at all); the path it will have once committed."""
        suffix = _output_suffix(fmt)
        frame = _as_frame(value, fmt, index)
        name = f"part-{index:05d}{suffix}"
        if self.local:
            with _staged_file(self.root, run_id, name) as temporary:
                if fmt == "parquet":
                    frame.to_parquet(temporary)
                else:
                    frame.to_csv(temporary, index=False)
            return self.final_path(name)
        staging = objectstore.staging_prefix(self.root, run_id)
        with (
            _STAGING.writing(staging, self._remover(staging)),
            # One object, visible only once its upload completes.
            self.fs.open(objectstore.stage_path(self.root, run_id, name), "wb") as handle,
        ):
            if fmt == "parquet":
                frame.to_parquet(handle)
            else:
                with io.TextIOWrapper(handle, encoding="utf-8", newline="") as text:
                    frame.to_csv(text, index=False)
        return self.final_path(name)

    def restage(self, path: str, run_id: str) -> str:
        """Stage a file an earlier run committed, so this run's commit keeps it (the task cache).

        Raises ``FileNotFoundError`` when it is gone (the caller recomputes it).
        """
        name = self.name_of(path)
        if self.local:
            final = os.path.join(self.root, name)
            with _staged_file(self.root, run_id, name) as temporary:
                try:
                    os.link(final, temporary)
                except FileNotFoundError:
                    raise
                except OSError:  # another filesystem, or one without hard links
                    shutil.copy2(final, temporary)
            return final
        staging = objectstore.staging_prefix(self.root, run_id)
        with _STAGING.writing(staging, self._remover(staging)):
            self.fs.copy(f"{self.root}/{name}", objectstore.stage_path(self.root, run_id, name))
        return self.final_path(name)

    def commit(self, run_id: str, written: Sequence[str]) -> list[str]:
        """Make this run's staged files the output, replacing the old one whole; the committed paths."""
        names = {self.name_of(path) for path in written}
        if self.local:
            return _commit_local(self.root, run_id, names)
        committed = objectstore.commit(self.fs, self.root, run_id, sorted(names))
        return [self.fs.unstrip_protocol(path) for path in committed]

    def abort(self, run_id: str) -> None:
        """Remove this run's staged files; the output is untouched."""
        if self.local:
            staging = _staging_dir(self.root, run_id)
        else:
            staging = objectstore.staging_prefix(self.root, run_id)
        _STAGING.abort(staging, self._remover(staging))

    # -- what the task cache checks

    def version(self, path: str) -> tuple[int, int | str] | None:
        """``(size, version)`` of a committed file, or None when it is gone."""
        name = self.name_of(path)
        try:
            if self.local:
                stat = os.stat(os.path.join(self.root, name))
                return stat.st_size, stat.st_mtime_ns
            return file_version(self.fs, f"{self.root}/{name}")
        except OSError:
            return None

    def files(self) -> set[str] | None:
        """The names of the output's files now (None: no output); flowyml's own control files aside."""
        if self.local:
            try:
                return set(os.listdir(self.root))
            except OSError:
                return None
        try:
            self.fs.invalidate_cache(self.root)
            found = self.fs.find(self.root)
        except (FileNotFoundError, OSError):
            return None
        prefix = self.root + "/"
        names = {path[len(prefix):] for path in found if path.startswith(prefix)}
        return {name for name in names if name.split("/", 1)[0] != objectstore.CONTROL} or None

    def _remover(self, staging: str) -> Callable[[], None]:
        if self.local:
            return lambda: shutil.rmtree(staging, ignore_errors=True)
        fs, root, run = self.fs, self.root, staging.rsplit("/", 1)[-1]
        return lambda: objectstore.abort(fs, root, run)


def _rebuild_output(url: str, storage_options: dict[str, Any] | None, who: str) -> Output:
    return Output(url, storage_options, who=who)


def write_partition(df: Any, directory: str | os.PathLike[str], run_id: str, index: int, fmt: str,
                    storage_options: dict[str, Any] | None = None) -> str:
    """Write partition ``index`` into this run's staging area, atomically.

    Locally, the file is written under a temporary name in the staging
    directory (``<parent>/.<name>.flowyml-staging-<run_id>/``, beside the
    output so the final rename stays on one filesystem) and moved to
    ``part-<index>.<fmt>`` with :func:`os.replace`. On an object store it is one
    object under ``<output>/_flowyml/staging/<run_id>/``. Either way it appears
    whole or not at all, and a retried or recomputed task simply replaces it.

    Parameters
    ----------
    df : pandas.DataFrame or pandas.Series
        A Series becomes a one-column frame (named ``value`` when unnamed).
    directory : str or path
        The output directory (or URL) the files will have after :func:`commit_output`.
    run_id : str
        The run's id (one staging area per run).
    index : int
        The partition index; names the file ``part-00003.parquet``.
    fmt : {"parquet", "csv"}
        Parquet with pandas' default index handling; CSV with a header, no index.
    storage_options : dict, optional
        For a URL's filesystem.

    Returns
    -------
    str
        The path (or URL) the file will have once the output is committed.
    """
    return Output(directory, storage_options).write(df, run_id, index, fmt)


def commit_output(directory: str | os.PathLike[str], run_id: str, written: Sequence[str],
                  storage_options: dict[str, Any] | None = None) -> list[str]:
    """Make this run's staged files the output at ``directory``, replacing the old one.

    Locally: checks that every file in ``written`` is staged and drops anything
    else there (temporary files of killed attempts). Then, holding a lock file
    beside the output (``.<name>.flowyml-lock``, so two runs committing the
    same directory take turns and the last one wins whole), renames the old
    output aside, renames the staging directory into place and removes the
    old output; if the second rename fails, the old output is renamed back.
    Between the two renames, for an instant, ``directory`` does not exist; a
    process killed exactly there leaves the old output in
    ``.<name>.flowyml-old-<run_id>``. Staging and set-aside directories of
    other runs older than a day (killed runs) are removed too.

    On an object store: see :func:`flowyml.io.objectstore.commit`; a second
    run committing at the same time fails with
    :class:`~flowyml.exceptions.CommitConflictError`.

    Returns
    -------
    list of str
        The committed file paths (or URLs), sorted.
    """
    return Output(directory, storage_options).commit(run_id, written)


def _commit_local(target: str, run_id: str, names: set[str]) -> list[str]:
    staging = _staging_dir(target, run_id)
    os.makedirs(staging, exist_ok=True)  # no partition at all: the output is an empty directory
    present = set(os.listdir(staging))
    missing = sorted(names - present)
    if missing:
        raise DataError(
            f"cannot commit {display_path(target)}: {len(missing)} partition file(s) were not written "
            f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); the previous output is untouched"
        )
    for extra in present - names:
        _remove(os.path.join(staging, extra))
    with _commit_lock(target):
        _swap_into_place(staging, target, _aside_dir(target, run_id))
        _remove_stale(target)
    return sorted(os.path.join(target, name) for name in names)


def restage_partition(path: str | os.PathLike[str], run_id: str, storage_options: dict[str, Any] | None = None) -> str:
    """Stage a file an earlier run committed, so that this run's commit keeps it.

    Used by the task cache: a sink partition whose input did not change is not
    written again; its committed file is hard-linked (copied where links are
    not possible; copied server-side on an object store) into this run's
    staging area, like :func:`write_partition`.

    Returns
    -------
    str
        ``path``, as :func:`write_partition` returns it.

    Raises
    ------
    FileNotFoundError
        The committed file is gone (the caller recomputes the partition).
    """
    text = os.fspath(path)
    folder = text.rsplit("/", 1)[0] if is_url(text) else os.path.dirname(os.path.abspath(text))
    return Output(folder, storage_options).restage(text, run_id)


@contextlib.contextmanager
def _staged_file(target: str, run_id: str, name: str) -> Iterator[str]:
    """A temporary path in this run's staging directory, moved to ``name`` if the block succeeds.

    The file appears whole or not at all: a failed block removes the temporary
    file. Registered with the run's staging guard for the whole write.
    """
    staging = _staging_dir(target, run_id)
    with _STAGING.writing(staging, lambda: shutil.rmtree(staging, ignore_errors=True)):
        os.makedirs(staging, exist_ok=True)
        temporary = os.path.join(staging, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            yield temporary
            os.replace(temporary, os.path.join(staging, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise


def abort_output(directory: str | os.PathLike[str], run_id: str,
                 storage_options: dict[str, Any] | None = None) -> None:
    """Remove this run's staging area; the previous output is untouched.

    Writes of this run still in flight in this process (the ``sync`` and
    ``thread`` backends, whose threads cannot be stopped) are waited for, up
    to :data:`ABORT_WAIT_S` seconds, and none starts afterwards: a write that
    outlasts the wait removes the staging itself when it ends. A straggling
    attempt in another process (a ``distributed`` worker) may still recreate
    it; such leftovers are removed by a later commit to ``directory``: on an
    object store as soon as the run's driver is known dead, locally once a
    day old.
    """
    Output(directory, storage_options).abort(run_id)


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
    def writing(self, staging: str, remove: Callable[[], None]) -> Iterator[None]:
        with self._changed:
            if staging in self._aborted:
                raise DataError(f"not writing into {display_path(staging)}: its run was stopped")
            self._writing[staging] = self._writing.get(staging, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                left = self._writing.pop(staging) - 1
                if left:
                    self._writing[staging] = left
                elif staging in self._aborted:  # the abort stopped waiting: the last writer cleans up
                    remove()
                self._changed.notify_all()

    def abort(self, staging: str, remove: Callable[[], None]) -> None:
        with self._changed:
            self._aborted[staging] = None
            while len(self._aborted) > self.MAX_ABORTED:
                self._aborted.popitem(last=False)
            self._changed.wait_for(lambda: staging not in self._writing, timeout=ABORT_WAIT_S)
            if staging not in self._writing:
                remove()


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
        raise DataError(f"cannot write {display_path(target)}: it exists and is not a directory")
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

    def __init__(self, output: Output, fmt: str) -> None:
        self.output = output
        self.fmt = fmt

    def __call__(self, data: Any) -> str:
        task = current_task()
        if task is None:  # called by hand, outside a run
            return self.output.write(data, "direct", 0, self.fmt)
        return self.output.write(data, task.run_id, task.partition or 0, self.fmt)

    def __repr__(self) -> str:
        return f"write_{self.fmt}({redact_url(self.output.url)!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-write", self.fmt, self.output.__dask_tokenize__())


class _Committer:
    """The sink's finalize: once every partition is staged, make them the output."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def __call__(self, written: list[str]) -> list[str]:
        task = current_task()
        return self.output.commit(task.run_id if task else "direct", written)

    def __repr__(self) -> str:
        return f"commit({redact_url(self.output.url)!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-commit", self.output.__dask_tokenize__())

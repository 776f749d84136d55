"""Sinks: steps that write each partition from the worker that computed it, committed at once.

The sinks (:func:`write_partition`, :func:`commit_output`,
:func:`abort_output`) write each partition from the worker that computed it
into a staging directory next to the output, then swap the staging directory
into place once every partition is written: readers see the previous output
or the new one, never a mix or a partial file. :func:`write_parquet` and
:func:`write_csv` build the pipeline steps that do so.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import pandas as pd

from flowyml.context import current_task
from flowyml.exceptions import DataError, OptionError
from flowyml.io.filesystem import display_path, is_url

__all__ = [
    "abort_output",
    "commit_output",
    "restage_partition",
    "write_csv",
    "write_parquet",
    "write_partition",
]

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
    Between the two renames, for an instant, ``directory`` does not exist; a
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
            raise OptionError(f"commit_output: {path!r} was not written for {display_path(target)!r}")
        names.add(os.path.basename(path))
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
    if is_url(text):
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

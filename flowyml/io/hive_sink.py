"""Writing Hive-partitioned Parquet: ``write_parquet(..., partition_on=[...], mode=...)``.

Each worker splits its partition by the ``partition_on`` keys and stages one
file per key combination present, ``year=2024/month=01/part-00003.parquet``
(partition 3), without the key columns (they are in the folder names, as
pyarrow and Dask write them; a missing key is ``__HIVE_DEFAULT_PARTITION__``).
The files are staged like any sink's and committed at once, in one of two modes:

``mode="overwrite"`` (the default)
    The run's files are the whole output, committed as
    :mod:`flowyml.io.sinks` commits any output.
``mode="overwrite_partitions"``
    Only the partition folders (one per key combination) this run wrote are
    replaced; every other folder stays as it was, byte for byte.

    - Local disk: under the output's commit lock, every file of the current
      output outside the replaced folders is hard-linked (copied, keeping its
      modification time, where links are impossible) into the run's staging
      folder, which is then swapped into place with the same two renames as
      ``overwrite``. A reader sees the old output or the new one whole, never
      some folders replaced and others not; the files kept are the same files
      (same inode, size and modification time).
    - Object store: the commit of :mod:`flowyml.io.objectstore`, removing only
      the old files below the replaced folders; its manifest
      (``_flowyml/manifest.json``) lists the whole output afterwards. Folders
      not replaced are never touched; during the publish step a reader listing
      a replaced folder may see some of its files new and some old, as for any
      commit there.

A Hive sink is not cached: its files, and with ``overwrite_partitions`` the
output around them, are written on every run (the steps before it still are
cached).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import pandas as pd

from flowyml.context import current_task
from flowyml.exceptions import DataError, OptionError
from flowyml.io import objectstore
from flowyml.io.filesystem import display_path, redact_url
from flowyml.io.hive import HIVE_NULL
from flowyml.io.sinks import (
    _STAGING,
    Output,
    _as_frame,
    _aside_dir,
    _commit_lock,
    _output_suffix,
    _remove,
    _remove_stale,
    _staging_dir,
    _swap_into_place,
)

__all__ = ["MODES", "HiveOutput", "check_sink_options", "folder_name"]

#: What ``write_parquet(mode=...)`` takes.
MODES = ("overwrite", "overwrite_partitions")


def check_sink_options(declared: str, partition_on: Any, mode: Any) -> tuple[str, ...] | None:
    """``partition_on`` as a tuple (None: a flat output); raise OptionError on options that cannot work."""
    if mode not in MODES:
        raise OptionError(f"{declared}: unknown mode={mode!r}; use one of {list(MODES)}")
    if partition_on is None:
        if mode == "overwrite_partitions":
            raise OptionError(
                f"{declared}: mode='overwrite_partitions' replaces Hive partition folders, so it needs "
                f"partition_on=[...] (the key columns, e.g. partition_on=['day']); without partition_on "
                f"use mode='overwrite'"
            )
        return None
    keys = (partition_on,) if isinstance(partition_on, str) else partition_on
    try:
        keys = tuple(keys)
    except TypeError:
        keys = ()
    if not keys or not all(isinstance(key, str) and key for key in keys) or len(set(keys)) != len(keys):
        raise OptionError(f"{declared}: partition_on takes a list of distinct column names, got {partition_on!r}")
    return keys


def folder_name(keys: Sequence[str], values: Sequence[Any]) -> str:
    """The Hive folder of one key combination.

    >>> folder_name(["year", "month"], [2024, "01"])
    'year=2024/month=01'
    """
    return "/".join(f"{quote(key, safe=' ')}={_folder_value(value)}" for key, value in zip(keys, values))


def _folder_value(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return HIVE_NULL
    return quote(str(value), safe=" ")


class HiveOutput(Output):
    """An output written as Hive folders by ``partition_on`` keys, committed in ``mode``."""

    #: The task cache leaves this sink alone (see the module docstring).
    uncached = True

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
                 who: str = "", partition_on: Sequence[str], mode: str = "overwrite") -> None:
        super().__init__(path, storage_options, who=who)
        self.partition_on = tuple(partition_on)
        self.mode = mode

    def __reduce__(self) -> tuple:
        return (_rebuild_hive_output, (self.url, self.storage_options, self.who, self.partition_on, self.mode))

    def __repr__(self) -> str:
        return f"HiveOutput({redact_url(self.url)!r}, partition_on={list(self.partition_on)!r}, mode={self.mode!r})"

    def __dask_tokenize__(self) -> tuple:
        return ("flowyml-hive-output", redact_url(self.url), self.partition_on, self.mode)

    def name_of(self, path: str) -> str:
        root = self.root if self.local else self.url
        text = os.path.abspath(path) if self.local else path
        if not text.startswith(root + "/"):
            raise OptionError(f"commit_output: {redact_url(path)!r} was not written for {self.shown!r}")
        return text[len(root) + 1:]

    def final_path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/")) if self.local else f"{self.url}/{name}"

    def write(self, value: Any, run_id: str, index: int, fmt: str) -> list[str]:  # type: ignore[override]
        """Stage partition ``index`` as one file per key combination in it; their final paths."""
        suffix = _output_suffix(fmt)
        frame = _as_frame(value, fmt, index)
        keys = list(self.partition_on)
        missing = [key for key in keys if key not in frame.columns]
        if missing:
            task = current_task()
            step = repr(task.step) if task is not None else self.who
            raise OptionError(f"step {step}, partition {index}: partition_on names {missing}, which the data "
                              f"does not have; its columns are {list(frame.columns)}")
        plain_index = isinstance(frame.index, pd.RangeIndex)
        written = []
        for values, group in frame.groupby(keys, sort=True, dropna=False, observed=True):
            name = f"{folder_name(keys, values)}/part-{index:05d}{suffix}"
            data = group.drop(columns=keys)
            if plain_index:  # a default index is row numbers, not data: not stored (as pandas does)
                data = data.reset_index(drop=True)
            self._stage(data, run_id, name, fmt)
            written.append(self.final_path(name))
        return written

    def _stage(self, frame: pd.DataFrame, run_id: str, name: str, fmt: str) -> None:
        if self.local:
            with _staged_nested(self.root, run_id, name) as temporary:
                _write(frame, temporary, fmt)
            return
        staging = objectstore.staging_prefix(self.root, run_id)
        with (
            _STAGING.writing(staging, self._remover(staging)),
            self.fs.open(objectstore.stage_path(self.root, run_id, name), "wb") as handle,
        ):
            _write(frame, handle, fmt)

    def restage(self, path: str, run_id: str) -> str:
        raise FileNotFoundError(f"{self!r} is not cached: {path} is written again")

    def commit(self, run_id: str, written: Sequence[Any]) -> list[str]:
        """Commit the run's files (``written``: a list of paths per partition) in this output's mode."""
        names = sorted({self.name_of(path) for paths in written for path in _as_list(paths)})
        replace = None
        if self.mode == "overwrite_partitions":
            replace = sorted({name.rsplit("/", 1)[0] for name in names})
        if not self.local:
            committed = objectstore.commit(self.fs, self.root, run_id, names, replace=replace)
            return [self.fs.unstrip_protocol(path) for path in committed]
        staging = _staging_dir(self.root, run_id)
        os.makedirs(staging, exist_ok=True)
        present = set(_files_below(staging))
        lost = sorted(set(names) - present)
        if lost:
            raise DataError(
                f"cannot commit {display_path(self.root)}: {len(lost)} partition file(s) were not written "
                f"({', '.join(lost[:5])}{'...' if len(lost) > 5 else ''}); the previous output is untouched"
            )
        for extra in present - set(names):  # temporary files of killed attempts
            _remove(os.path.join(staging, extra))
        with _commit_lock(self.root):
            if replace is not None:
                _keep_other_partitions(self.root, staging, replace)
            _swap_into_place(staging, self.root, _aside_dir(self.root, run_id))
            _remove_stale(self.root)
        return [self.final_path(name) for name in names]


def _rebuild_hive_output(url: str, storage_options: dict[str, Any] | None, who: str, partition_on: tuple,
                         mode: str) -> HiveOutput:
    return HiveOutput(url, storage_options, who=who, partition_on=partition_on, mode=mode)


def _as_list(paths: Any) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


def _write(frame: pd.DataFrame, where: Any, fmt: str) -> None:
    if fmt == "parquet":
        frame.to_parquet(where)
    else:
        frame.to_csv(where, index=False)


@contextlib.contextmanager
def _staged_nested(target: str, run_id: str, name: str) -> Iterator[str]:
    """Like :func:`flowyml.io.sinks._staged_file`, for ``name`` in folders (``year=2024/part-00000.parquet``)."""
    staging = _staging_dir(target, run_id)
    with _STAGING.writing(staging, lambda: shutil.rmtree(staging, ignore_errors=True)):
        final = os.path.join(staging, *name.split("/"))
        folder = os.path.dirname(final)
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{os.path.basename(final)}.{uuid.uuid4().hex}.tmp")
        try:
            yield temporary
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise


def _files_below(folder: str) -> Iterator[str]:
    """Every file below ``folder``, as ``/``-separated paths relative to it."""
    for parent, _, files in os.walk(folder):
        relative = os.path.relpath(parent, folder)
        for file in files:
            yield file if relative == "." else f"{relative.replace(os.sep, '/')}/{file}"


def _keep_other_partitions(target: str, staging: str, replaced: Sequence[str]) -> None:
    """Link every file of the current output outside the ``replaced`` folders into ``staging``."""
    if not os.path.isdir(target):
        return
    folders = tuple(folder + "/" for folder in replaced)
    for name in _files_below(target):
        if name.startswith(folders):
            continue
        source = os.path.join(target, *name.split("/"))
        copy = os.path.join(staging, *name.split("/"))
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        try:
            os.link(source, copy)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(source, copy)

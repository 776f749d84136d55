"""The tasks of a cached run's graph: load an entry, restage a committed file, store a result.

:mod:`flowyml.cache.rewrite` puts them in the graph on the driver; they run
on the workers, where a computed result is stored by the worker that computed
it. Sink entries record committed files: one per partition
(``SINK_ENTRY``: its path, size and version, the modification time locally
or the object's ETag) and one per sink (``SINK_COMMIT``: the output and its
files), written once the commit succeeded. The sink's
:class:`~flowyml.io.sinks.Output` reads and restages them, locally or on an
object store alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flowyml.behind import MAX_BYTES as MAX_BYTES_BEHIND
from flowyml.behind import put as put_behind
from flowyml.cache.store import Cache
from flowyml.exceptions import CacheError, StaleCacheEntry
from flowyml.memory import shallow_bytes
from flowyml.tasks import CACHED, SUCCEEDED, Outcome, _TaskBase

__all__ = [
    "SINK_COMMIT",
    "SINK_ENTRY",
    "CommitStoreTask",
    "LoadTask",
    "RestageTask",
    "StoreTask",
    "partition_text",
    "sink_output",
]

log = logging.getLogger("flowyml")

SINK_ENTRY = "flowyml-sink-partition"
SINK_COMMIT = "flowyml-sink-commit"


class LoadTask(_TaskBase):
    """Read a task's result from the cache (or hand over one read on the driver).

    ``size`` is the entry's payload in bytes, where the driver read its header.
    """

    __slots__ = ("step", "partition", "cache", "key", "run_id", "mode", "value", "size")

    def __init__(self, step, partition, cache, key, run_id, mode, value=None, size=None) -> None:
        self.step, self.partition, self.cache, self.key = step, partition, cache, key
        self.run_id, self.mode, self.value, self.size = run_id, mode, value, size

    def __reduce__(self):
        return (LoadTask, (self.step, self.partition, self.cache, self.key, self.run_id, self.mode, self.value,
                           self.size))

    def __repr__(self) -> str:
        return f"LoadTask({self.step!r}, partition={self.partition})"

    def __call__(self) -> Any:
        start = time.time()
        if self.cache is None:
            return self._report(self.value, self.step, self.partition, CACHED, 0, start)
        try:
            value = self.cache.load(self.key)
        except CacheError as exc:
            raise _stale(self, "cache entry", "failed its check when loaded", exc) from None
        return self._report(value, self.step, self.partition, CACHED, 0, start)


class RestageTask(_TaskBase):
    """A sink partition already committed unchanged: link its file into this run's commit."""

    __slots__ = ("step", "partition", "path", "key", "run_id", "mode", "output")

    def __init__(self, step, partition, path, key, run_id, mode, output) -> None:
        self.step, self.partition, self.path, self.key = step, partition, path, key
        self.run_id, self.mode, self.output = run_id, mode, output

    def __reduce__(self):
        return (RestageTask, (self.step, self.partition, self.path, self.key, self.run_id, self.mode, self.output))

    def __call__(self) -> Any:
        start = time.time()
        try:
            path = self.output.restage(self.path, self.run_id)
        except OSError as exc:
            raise _stale(self, f"the committed file {self.path}", "vanished", exc) from None
        return self._report(path, self.step, self.partition, CACHED, 0, start)


def _stale(task: LoadTask | RestageTask, what: str, happened: str, exc: Exception) -> StaleCacheEntry:
    """What a load or restage task raises when its entry no longer holds: the run discards it and plans again."""
    return StaleCacheEntry(
        f"{what} of step {task.step!r}{partition_text(task.partition)} {happened} ({exc})", task.key, task.step
    )


class StoreTask:
    """Run a task, then store its value under its key (on the worker that computed it).

    ``behind=True`` (process backend, for a task whose value leaves the
    process): the worker's store thread stores it while the value travels to
    the next tasks, if the worker has one (:mod:`flowyml.behind`), and the
    value is at most :data:`~flowyml.behind.MAX_BYTES` in memory.
    """

    __slots__ = ("task", "cache", "key", "behind")

    def __init__(self, task: Any, cache: Cache, key: str, behind: bool = False) -> None:
        self.task, self.cache, self.key, self.behind = task, cache, key, behind

    def __reduce__(self):
        return (StoreTask, (self.task, self.cache, self.key, self.behind))

    def __repr__(self) -> str:
        return f"Store({self.task!r})"

    def with_task(self, task: Any) -> StoreTask:
        return StoreTask(task, self.cache, self.key, self.behind)

    def stored_behind(self) -> StoreTask:
        """This task, storing in the worker's store thread."""
        return StoreTask(self.task, self.cache, self.key, True)

    @property
    def spec(self) -> Any:
        """The wrapped step's spec (backends read options such as resources from it)."""
        return getattr(self.task, "spec", None)

    def __call__(self, *arguments: Any) -> Any:
        outcome = self.task(*arguments)
        if type(outcome) is not Outcome or outcome.status != SUCCEEDED:
            return outcome
        value = outcome.value
        if not (self.behind and shallow_bytes(value) <= MAX_BYTES_BEHIND
                and put_behind(_store, self.cache, self.key, value, outcome.step)):
            _store(self.cache, self.key, value, outcome.step)
        return outcome


class CommitStoreTask(StoreTask):
    """A sink's commit; once it succeeded, the entries of its partitions and of itself."""

    __slots__ = ("writers",)

    def __init__(self, task: Any, cache: Cache, key: str, writers: tuple[str, ...], behind: bool = False) -> None:
        super().__init__(task, cache, key, behind)
        self.writers = writers

    def __reduce__(self):
        return (CommitStoreTask, (self.task, self.cache, self.key, self.writers, self.behind))

    def with_task(self, task: Any) -> CommitStoreTask:
        return CommitStoreTask(task, self.cache, self.key, self.writers, self.behind)

    def stored_behind(self) -> CommitStoreTask:
        return CommitStoreTask(self.task, self.cache, self.key, self.writers, True)

    def __call__(self, parts: list[Any]) -> Any:
        outcome = self.task(parts)
        if type(outcome) is not Outcome or outcome.status != SUCCEEDED:
            return outcome
        # Read now: a task that restaged some parts itself drops their values once this returns.
        paths = [part.value if type(part) is Outcome else part for part in parts]
        kept = [type(part) is Outcome and part.status == CACHED for part in parts]
        output = sink_output(self.task)
        # The versions too (size and mtime, or ETag): the entries must describe
        # the files as this commit left them, not as they are whenever the
        # store thread gets to them.
        versions = [output.version(path) for path in paths]
        if any(version is None for version in versions):
            return outcome  # changed under us: leave it uncached
        files = [(output.name_of(path), *version) for path, version in zip(paths, versions)]
        entries = [(SINK_ENTRY, path, *version) for path, version in zip(paths, versions)]
        commit = (SINK_COMMIT, output.url, files) if paths else None
        if not (self.behind and put_behind(self._store_entries, entries, kept, commit, outcome.step)):
            self._store_entries(entries, kept, commit, outcome.step)
        return outcome

    def _store_entries(self, entries: list[tuple], kept: list[bool], commit: tuple | None, step: str) -> None:
        """The committed files' entries, then the commit's; ``kept`` files were restaged, whose entries may stand."""
        for writer, entry, restaged in zip(self.writers, entries, kept):
            # A file kept by a hard link has the entry it had: writing it again costs two fsyncs.
            if not (restaged and _holds(self.cache, writer, entry)):
                _store(self.cache, writer, entry, step)
        if commit is not None:
            _store(self.cache, self.key, commit, step)


def sink_output(task: Any) -> Any:
    """The :class:`~flowyml.io.sinks.Output` a sink's partition or commit task writes (None: not a sink)."""
    function = getattr(task, "finalize", None) or getattr(getattr(task, "spec", None), "func", None)
    return getattr(function, "output", None)


def _holds(cache: Cache, key: str, value: Any) -> bool:
    """Whether ``cache`` has ``value`` under ``key`` already."""
    try:
        return bool(cache.load(key) == value)
    except Exception:  # missing or unreadable: write it
        return False


def _store(cache: Cache, key: str, value: Any, step: str) -> None:
    try:
        cache.store(key, value)
    except CacheError as exc:  # the run goes on; the next one recomputes this task
        log.warning("step %r: result not cached: %s", step, exc)


def partition_text(partition: int | None) -> str:
    """`` partition 3`` for messages; empty for a whole step."""
    return f" partition {partition}" if partition is not None else ""

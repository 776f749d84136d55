"""The graph rewrite of a cached run: tasks with a cache entry are loaded, not run.

On the driver, before anything runs (:func:`plan_cached_run`):

1. Every task gets a cache key, bottom-up in graph order: the step's code
   (:func:`~flowyml.cache.fingerprint.code_fingerprint`, once per step), its params and
   how its inputs are wired, and its inputs: the keys of the upstream tasks,
   or for a source partition its identity (path, size, modification time,
   byte range; :meth:`~flowyml.io.sources.Partition.identity`), never its index.
   An in-memory run input counts by value. A task whose key cannot be computed
   (a param or input that cannot be hashed) and everything downstream of it
   runs uncached.
2. From the requested outputs down, a task whose entry exists (and passes a
   cheap check of its header and size) becomes a *load* task with no inputs,
   so nothing upstream of it needs to run: those tasks are *culled* and
   reported as ``cached`` without running. Tasks without an entry compute and
   store their result, on the worker that computed it.
3. A corrupt entry found by the cheap check is discarded with a
   :class:`CacheWarning` and its task recomputes. One that only fails its full
   check when loaded (a payload whose checksum does not match) raises
   :class:`StaleCacheEntry`; the run discards it, warns, and runs the graph
   again from step 1. Everything finished meanwhile was stored, so that rerun
   only loads it.

Sinks (``write_parquet``/``write_csv``): a sink's partition files are only
the output once its commit ran, so its entries are written after the commit:
one per partition (the committed file's path, size and modification time)
and one for the whole sink (the list of paths). On a rerun a partition whose
entry matches the file still in place is *restaged* (hard-linked into the new
commit) instead of written again; one whose file is gone or changed is
written again. When every partition and the commit match and the output
directory holds exactly those files, the sink does nothing at all. A sink
partition's key includes its index, which names its file.

The tasks the rewritten graph runs (load, restage, store) are in
:mod:`flowyml.cache.tasks`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowyml.cache.fingerprint import code_fingerprint
from flowyml.cache.keys import task_key
from flowyml.cache.store import Cache
from flowyml.cache.tasks import (
    SINK_COMMIT,
    SINK_ENTRY,
    CommitStoreTask,
    LoadTask,
    RestageTask,
    StoreTask,
    partition_text,
    sink_output,
)
from flowyml.compile import partition_of
from flowyml.exceptions import CacheError, CacheWarning, OptionError, StaleCacheEntry
from flowyml.tasks import CACHED, FinalizeTask, Outcome, SourceTask, StepTask, ValueTask

if TYPE_CHECKING:
    from flowyml.compile import CompiledGraph
    from flowyml.plan import Plan

__all__ = ["CachedGraph", "plan_cached_run", "warn_stale"]

log = logging.getLogger("flowyml")

Key = Hashable

_LIST = "flowyml-list-of-inputs"
_VALUE = "flowyml-run-input"


@dataclass
class CachedGraph:
    """A compiled graph rewritten for a cached run.

    ``dsk`` is the graph to run; ``culled`` holds a report line (status
    ``cached``) for every task that need not run at all; ``loads_only`` is
    True when every task left only reads the cache.
    """

    dsk: dict[Key, Any]
    culled: dict[Key, Outcome] = field(default_factory=dict)
    loads_only: bool = False
    computed: int = 0
    loaded: int = 0


def plan_cached_run(
    graph: CompiledGraph, plan: Plan, cache: Cache, run_id: str, mode: int, *, verify: bool = False,
    on_compute: Callable[[], None] | None = None,
) -> CachedGraph:
    """Rewrite ``graph.dsk`` for ``cache`` (see the module docstring).

    ``verify`` checks every entry to be loaded in full (checksum) on the
    driver instead of its header only: used after a load found a corrupt entry,
    so one more round finds them all. ``on_compute`` is called once, as soon as
    a task is found that must run (the run starts its pool then).
    """
    sinks = {s.name for s in plan.steps if s.finalize is not None}
    keys = _task_keys(graph.dsk, sinks)
    planner = _Planner(graph, cache, keys, sinks, run_id, mode, verify, on_compute)
    for key in graph.output_keys:
        planner.visit(key)
    return planner.result()


def warn_stale(cache: Cache, error: StaleCacheEntry) -> None:
    """Discard the entry a load task found corrupt, and say so."""
    cache.discard(error.key)
    _warn(f"{error}; discarded, step {error.step!r} is recomputed")


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, CacheWarning, stacklevel=3)


# -- keys ------------------------------------------------------------------------------


def _task_keys(dsk: Mapping[Key, Any], sinks: set[str]) -> dict[Key, Any]:
    """Graph key -> cache key (str), identity tuple (source partitions) or None (uncacheable).

    ``dsk`` is in dependency order (compile adds producers first).
    """
    fingerprints: dict[int, str] = {}
    keys: dict[Key, Any] = {}
    unencodable: set[str] = set()
    for key, task in dsk.items():
        func, arguments = task[0], task[1:]
        if isinstance(func, SourceTask):
            identity = getattr(func.partition, "identity", None)
            keys[key] = tuple(identity()) if identity is not None else None
            continue
        if isinstance(func, ValueTask):
            keys[key] = _value_key(func)
            continue
        inputs = [_input_key(argument, keys) for argument in arguments]
        if any(item is None for item in inputs) or getattr(sink_output(func), "uncached", False):
            keys[key] = None
            continue
        if isinstance(func, StepTask):
            spec = func.spec
            name, target = spec.name, spec.func
            params = dict(spec.params)
            params["__flowyml_wiring__"] = (spec.positional, spec.keyword, spec.varargs, spec.args, spec.outputs)
            if name in sinks:  # the partition index names the written file
                params["__flowyml_partition__"] = func.partition
        elif isinstance(func, FinalizeTask):
            name, target, params = func.name, func.finalize, {"__flowyml_commit__": True}
        else:
            keys[key] = None
            continue
        # By function: one function added as many steps is fingerprinted once
        # (ids are stable here: the plan holds every function until the run ends).
        fingerprint = fingerprints.get(id(target))
        if fingerprint is None:
            fingerprint = fingerprints[id(target)] = code_fingerprint(target)
        try:
            keys[key] = task_key(fingerprint, params, inputs)
        except CacheError as exc:
            keys[key] = None
            if name not in unencodable:
                unencodable.add(name)
                log.warning("step %r runs uncached: %s", name, exc)
    return keys


def _value_key(func: ValueTask) -> str | None:
    try:
        return task_key(_VALUE, {"name": func.name, "value": func.value}, [])
    except CacheError as exc:
        log.warning("run input %r cannot be hashed, so the steps using it run uncached: %s", func.name, exc)
        return None


def _input_key(argument: Any, keys: Mapping[Key, Any]) -> Any:
    if isinstance(argument, list):
        parts = [keys.get(item) for item in argument]
        if any(part is None for part in parts):
            return None
        return task_key(_LIST, {}, parts)
    return keys.get(argument)


# -- deciding what runs ----------------------------------------------------------------


class _Planner:
    """Walks the graph from the outputs down, choosing load, restage or compute per task."""

    def __init__(self, graph, cache: Cache, keys, sinks: set[str], run_id: str, mode: int,
                 verify: bool, on_compute: Callable[[], None] | None = None) -> None:
        self.verify = verify
        self.on_compute = on_compute
        self.graph = graph
        self.dsk = graph.dsk
        self.cache = cache
        self.keys = keys
        self.sinks = sinks
        self.run_id = run_id
        self.mode = mode
        self.step_of = graph.task_step()
        self.out: dict[Key, Any] = {}
        self.computed = 0
        self.loaded = 0
        self._present: set[str] | None = None  # an object store's entries, listed once per run

    def _has(self, cache_key: str) -> bool:
        """Whether ``cache_key`` has an entry: a ``stat`` locally; on an object store, one
        listing per shard for the whole run instead of a request per task."""
        if self.cache.local:
            return self.cache.contains(cache_key)
        if self._present is None:
            self._present = self.cache.present(key for key in self.keys.values() if isinstance(key, str))
        return cache_key in self._present

    def visit(self, root: Key) -> None:
        stack = [root]
        while stack:
            key = stack.pop()
            if key in self.out:
                continue
            replacement = self._cached_task(key)
            if replacement is not None:
                self.out[key] = replacement
                self.loaded += 1
                continue
            task = self.dsk[key]
            self.out[key] = self._computing_task(key, task)
            self.computed += 1
            if self.computed == 1 and self.on_compute is not None:
                self.on_compute()
            for argument in task[1:]:
                if isinstance(argument, list):
                    stack.extend(argument)
                elif _is_key(argument, self.dsk):
                    stack.append(argument)

    # A task with a usable entry: how to get its value without running it.
    def _cached_task(self, key: Key) -> tuple | None:
        cache_key = self.keys.get(key)
        func = self.dsk[key][0]
        if not isinstance(cache_key, str) or not isinstance(func, (StepTask, FinalizeTask)):
            return None
        step, partition = self._where(key)
        if isinstance(func, FinalizeTask):
            paths = self._committed_output(cache_key, sink_output(func))
            if paths is None:
                return None
            return (LoadTask(step, partition, None, cache_key, self.run_id, self.mode, paths),)
        if step in self.sinks:
            output = sink_output(func)
            path = self._committed_partition(cache_key, output)
            if path is None:
                return None
            return (RestageTask(step, partition, path, cache_key, self.run_id, self.mode, output),)
        if not self._has(cache_key):
            return None
        header = None
        try:
            if self.verify:
                header = self.cache.verify(cache_key)
            elif self.cache.local:  # on an object store the load checks it in full
                header = self.cache.check_header(cache_key)
        except CacheError as exc:
            self.cache.discard(cache_key)
            _warn(f"{exc}; discarded, step {step!r}" + partition_text(partition) + " is recomputed")
            return None
        size = header.get("size") if header is not None else None
        return (LoadTask(step, partition, self.cache, cache_key, self.run_id, self.mode, size=size),)

    def _computing_task(self, key: Key, task: tuple) -> tuple:
        cache_key = self.keys.get(key)
        func = task[0]
        if not isinstance(cache_key, str):
            return task
        if isinstance(func, FinalizeTask):
            if sink_output(func) is None:  # a table sink (write_delta): each run commits anew
                return task
            writers = [self.keys.get(item) for item in task[1]]
            if any(not isinstance(item, str) for item in writers):
                return task
            return (CommitStoreTask(func, self.cache, cache_key, tuple(writers)), *task[1:])
        if isinstance(func, StepTask) and func.spec.name not in self.sinks:
            return (StoreTask(func, self.cache, cache_key), *task[1:])
        return task  # a sink partition: its entry is written after the commit

    def _load_small(self, cache_key: str) -> Any:
        if not self._has(cache_key):
            return None
        try:
            return self.cache.load(cache_key)
        except CacheError as exc:
            self.cache.discard(cache_key)
            _warn(f"{exc}; discarded, the sink is written again")
            return None

    def _committed_partition(self, cache_key: str, output: Any) -> str | None:
        entry = self._load_small(cache_key)
        if output is None or not _is_entry(entry, SINK_ENTRY):
            return None
        _, path, size, version = entry
        try:
            return path if output.version(path) == (size, version) else None
        except OptionError:  # written for another output (the sink's path changed)
            return None

    def _committed_output(self, cache_key: str, output: Any) -> list[str] | None:
        entry = self._load_small(cache_key)
        if output is None or not _is_entry(entry, SINK_COMMIT):
            return None
        _, location, files = entry
        if location != output.url or output.files() != {name for name, _, _ in files}:
            return None  # files were removed or added since: write the output again
        for name, size, version in files:
            if output.version(output.final_path(name)) != (size, version):
                return None
        return sorted(output.final_path(name) for name, _, _ in files)

    def _where(self, key: Key) -> tuple[str, int | None]:
        return self.step_of[key], partition_of(key)

    def result(self) -> CachedGraph:
        now = time.time()
        culled = {}
        for key in self.dsk:
            if key not in self.out:
                step, partition = self._where(key)
                culled[key] = Outcome(None, step, partition, CACHED, 0, now, now, "cache")
        # Graph order (dependencies first) is kept: fusion and the report rely on it.
        dsk = {key: self.out[key] for key in self.dsk if key in self.out}
        return CachedGraph(dsk, culled, loads_only=self.computed == 0, computed=self.computed,
                           loaded=self.loaded)


def _is_entry(entry: Any, kind: str) -> bool:
    return isinstance(entry, tuple) and len(entry) >= 1 and entry[0] == kind


def _is_key(value: Any, dsk: Mapping[Key, Any]) -> bool:
    try:
        return value in dsk
    except TypeError:
        return False

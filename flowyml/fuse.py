"""Fuse straight per-partition chains into one task per partition (process backend).

Dask's multiprocessing scheduler returns every task's result to the parent
process and sends it back out to the next task. For a chain such as
``read -> clean -> enrich -> write`` that would move every partition through
the parent twice per step. Fused, partition *i* of the whole chain is one
task that runs in one worker and sends back only what leaves the chain (the
written path, a small aggregate).

A task is fused into its consumer when both are partition tasks (``(name,
i)`` keys), it is not a requested output, and the consumer is its only user,
by direct argument. The fused task keeps the consumer's key, and its result
carries the report lines of the tasks it absorbed (``Outcome.inner``), so
the run report and step statuses stay per step and per partition.

Some tasks of a cached run are read by one task only, as items of a list
(the partitions a whole step or a tree reduction's group receives, the
files a sink's commit takes): :func:`inline_cached_loads` nests them in that
task, which runs them in its worker first.

- A large cached result (at least :data:`INLINE_LOAD_BYTES`): on its own it
  would be read by one worker, sent to the parent and sent out again, twice
  through a pipe, for the consumer to concatenate anyway. Smaller ones stay
  tasks of their own: read in parallel, early, they cost less than the wait.
- A committed file relinked into the run's commit (local output): a few
  system calls, which as tasks of their own would queue ahead of the new
  partitions' work. On an object store each is a server-side copy with a
  round trip: they stay tasks, in parallel.
"""

from __future__ import annotations

import pickle
from collections.abc import Hashable, Iterable
from typing import Any

from .pickling import dumps
from .tasks import Outcome

__all__ = [
    "INLINE_LOAD_BYTES", "CachedReads", "FusedTask", "LoadsInline", "fuse_partition_chains", "inline_cached_loads",
    "store_behind",
]

Key = Hashable

#: A cached result at least this large (its payload, in bytes) is read by the
#: one task that uses it rather than shipped to it through the parent.
INLINE_LOAD_BYTES = 1 << 20


class FusedTask:
    """Run several tasks of one partition in a row, inside one worker.

    ``calls`` holds ``(callable, refs)`` in order; a ref ``r >= 0`` is the
    fused task's ``r``-th argument, ``r < 0`` the result of call ``-r - 1``.
    """

    __slots__ = ("keys", "calls")

    def __init__(self, keys: tuple[Key, ...], calls: tuple[tuple[Any, tuple[int, ...]], ...]) -> None:
        self.keys = keys
        self.calls = calls

    def __reduce__(self):
        return (FusedTask, (self.keys, self.calls))

    def __repr__(self) -> str:
        return f"FusedTask({' -> '.join(map(str, self.keys))})"

    def __call__(self, *arguments: Any) -> Any:
        results: list[Any] = []
        for func, refs in self.calls:
            results.append(func(*[arguments[r] if r >= 0 else results[-r - 1] for r in refs]))
        last = results[-1]
        if type(last) is Outcome:
            inner: list[Any] = []
            for key, outcome in zip(self.keys, results[:-1]):
                if type(outcome) is Outcome:
                    inner.extend(outcome.inner or ())
                    outcome.value = None  # only the report line goes back to the parent
                    outcome.inner = None
                    inner.append((key, outcome))
            last.inner = (*(last.inner or ()), *inner)
        return last


def fuse_partition_chains(dsk: dict[Key, Any], keep: Iterable[Key]) -> dict[Key, Any]:
    """A copy of ``dsk`` with straight per-partition chains fused; ``keep`` are never absorbed."""
    keep = set(keep)
    users: dict[Key, int] = {}
    direct_user: dict[Key, Key] = {}
    for key, task in dsk.items():
        for argument in task[1:]:
            if isinstance(argument, list):
                for item in argument:
                    if item in dsk:
                        users[item] = users.get(item, 0) + 2  # used whole: never fused
            elif _is_key(argument, dsk):
                users[argument] = users.get(argument, 0) + 1
                direct_user[argument] = key

    def absorbable(key: Key) -> bool:
        return (
            isinstance(key, tuple)
            and key not in keep
            and users.get(key) == 1
            and isinstance(direct_user.get(key), tuple)
        )

    fused: dict[Key, Any] = {}
    absorbed: set[Key] = set()

    def build(key: Key) -> tuple[list[Key], list[tuple[Any, tuple[int, ...]]], list[Any]]:
        """The chain ending at ``key``: its keys, calls and external arguments."""
        task = dsk[key]
        keys: list[Key] = []
        calls: list[tuple[Any, tuple[int, ...]]] = []
        external: list[Any] = []
        refs: list[int] = []
        for argument in task[1:]:
            if not isinstance(argument, list) and _is_key(argument, dsk) and absorbable(argument):
                absorbed.add(argument)
                sub_keys, sub_calls, sub_external = build(argument)
                offset, base = len(calls), len(external)
                for func, sub_refs in sub_calls:
                    calls.append((func, tuple(r + base if r >= 0 else r - offset for r in sub_refs)))
                keys.extend(sub_keys)
                external.extend(sub_external)
                refs.append(-len(calls))  # the result of the sub-chain's last call
            else:
                refs.append(len(external))
                external.append(argument)
        calls.append((task[0], tuple(refs)))
        keys.append(key)
        return keys, calls, external

    for key in dsk:
        if key in absorbed:
            continue
        task = dsk[key]
        if not any(not isinstance(a, list) and _is_key(a, dsk) and absorbable(a) for a in task[1:]):
            fused[key] = task
            continue
        keys, calls, external = build(key)
        fused[key] = (FusedTask(tuple(keys), tuple(calls)), *external)
    for key in absorbed:
        fused.pop(key, None)
    return fused


class LoadsInline:
    """A task that reads some of its cached inputs (or relinks committed files) itself.

    ``nested``: reads nested in its list arguments, which Dask runs in the
    worker before calling; each slot says where it sits (argument, item) and
    its key, and its report line travels back with the task's own
    (``Outcome.inner``), without its value. ``batched``: the places of reads
    one :class:`CachedReads` task made, whose result comes as the last
    argument.
    """

    __slots__ = ("task", "nested", "batched")

    def __init__(self, task: Any, nested: tuple[tuple[int, int, Key], ...],
                 batched: tuple[tuple[int, int], ...] = ()) -> None:
        self.task = task
        self.nested = nested
        self.batched = batched

    def __reduce__(self):
        return (LoadsInline, (self.task, self.nested, self.batched))

    def __repr__(self) -> str:
        return f"LoadsInline({self.task!r}, {len(self.nested)} nested, {len(self.batched)} batched)"

    @property
    def spec(self) -> Any:
        """The wrapped step's spec (backends read options such as resources from it)."""
        return getattr(self.task, "spec", None)

    def with_task(self, task: Any) -> LoadsInline:
        return LoadsInline(task, self.nested, self.batched)

    def __call__(self, *arguments: Any) -> Any:
        if self.batched:
            *arguments, batch = arguments  # type: ignore[assignment]
            for (position, index), loaded in zip(self.batched, pickle.loads(batch.value)):
                arguments[position][index] = loaded
        result = self.task(*arguments)
        if type(result) is Outcome:
            inner = []
            for position, index, key in self.nested:
                loaded = arguments[position][index]
                if type(loaded) is Outcome:
                    loaded.value = None  # only the report line goes back to the parent
                    inner.append((key, loaded))
            if inner:
                result.inner = (*(result.inner or ()), *inner)
        return result


def _how_to_read(task: tuple) -> str | None:
    """``"nest"``, ``"batch"`` or None (stays a task): how a task used by one list is run."""
    from .cache.tasks import LoadTask, RestageTask

    if len(task) != 1:
        return None
    func = task[0]
    if isinstance(func, LoadTask):
        if func.size is None:  # not read on the driver (an object store): reads in parallel
            return None
        return "nest" if func.size >= INLINE_LOAD_BYTES else "batch"
    if isinstance(func, RestageTask) and getattr(func.output, "local", False):
        return "nest"
    return None


def inline_cached_loads(dsk: dict[Key, Any], keep: Iterable[Key]) -> dict[Key, Any]:
    """A copy of ``dsk`` where the cached reads and local relinks a task alone uses, as
    items of a list, are nested in it, or batched into one task; ``keep`` stay tasks."""
    keep = set(keep)
    uses: dict[Key, int] = {}
    in_list: set[Key] = set()
    for task in dsk.values():
        for argument in task[1:]:
            is_list = isinstance(argument, list)
            for item in argument if is_list else (argument,):
                if _is_key(item, dsk):
                    uses[item] = uses.get(item, 0) + 1
                    if is_list:
                        in_list.add(item)
    how = {}
    for key, task in dsk.items():
        if uses.get(key) == 1 and key in in_list and key not in keep:
            kind = _how_to_read(task)
            if kind is not None:
                how[key] = kind
    if not how:
        return dsk
    out: dict[Key, Any] = {}
    for key, task in dsk.items():
        if key in how:
            continue
        arguments = list(task[1:])
        listed = [(position, index, item) for position, argument in enumerate(arguments)
                  if isinstance(argument, list)
                  for index, item in enumerate(argument) if _is_key(item, dsk) and item in how]
        if not listed:
            out[key] = task
            continue
        batched = [slot for slot in listed if how[slot[2]] == "batch"]
        if len(batched) < 2:  # one small read is not worth a task of its own
            batched = []
        nested = [slot for slot in listed if slot not in batched]
        for position in {position for position, _, _ in listed}:
            arguments[position] = list(arguments[position])
        for position, index, item in nested:
            arguments[position][index] = dsk[item]
        for position, index, _ in batched:
            arguments[position][index] = None  # filled from the batch, in the worker
        if batched:
            first = batched[0][2]
            out[first] = (CachedReads(tuple(dsk[item][0] for _, _, item in batched),
                                      tuple(item for _, _, item in batched)),)
            arguments.append(first)
        wrapper = LoadsInline(task[0], tuple(nested), tuple((position, index) for position, index, _ in batched))
        out[key] = (wrapper, *arguments)
    return out


class CachedReads:
    """Read several small cached results in one task: one trip through the parent for all.

    Its key is its first read's; the result reports that one and carries the
    others' report lines (``Outcome.inner``), and, as its value, every read's
    Outcome for the one task that uses them (:class:`LoadsInline` puts them in
    place), pickled here: the parent passes the bytes on as they are, where
    unpickling and pickling again dozens of small frames cost it several
    milliseconds just before the task that uses them can start.
    """

    __slots__ = ("loads", "keys")

    def __init__(self, loads: tuple[Any, ...], keys: tuple[Key, ...]) -> None:
        self.loads = loads
        self.keys = keys

    def __reduce__(self):
        return (CachedReads, (self.loads, self.keys))

    def __repr__(self) -> str:
        return f"CachedReads({len(self.loads)} entries)"

    def __call__(self) -> Outcome:
        outcomes = [load() for load in self.loads]
        first = outcomes[0]
        lines = tuple((key, outcome.report_line()) for key, outcome in zip(self.keys[1:], outcomes[1:]))
        # As the pool pickles tasks and results: a value whose class pickle
        # would name in ``__main__`` or in a module pickled by value (not
        # importable where it is read) goes by value, through cloudpickle.
        return Outcome(dumps(outcomes), first.step, first.partition, first.status, first.attempts, first.start,
                       first.stop, first.worker, first.error, lines)


def store_behind(dsk: dict[Key, Any]) -> dict[Key, Any]:
    """``dsk`` with the stores of values that leave their worker done by its store thread.

    A task's own result leaves the worker (to the driver, then the next
    tasks): its worker stores it while it travels. Results a fused task passes
    on inside the worker are stored before the next call, which may change
    them.
    """
    from .cache.tasks import CommitStoreTask, StoreTask

    def behind(func: Any) -> Any:
        if type(func) in (StoreTask, CommitStoreTask):  # a sink's entries, once it committed
            return func.stored_behind()
        if type(func) is LoadsInline:
            inner = behind(func.task)
            return func if inner is func.task else func.with_task(inner)
        if type(func) is FusedTask and func.calls:
            last, refs = func.calls[-1]
            inner = behind(last)
            return func if inner is last else FusedTask(func.keys, (*func.calls[:-1], (inner, refs)))
        return func

    out = {}
    for key, task in dsk.items():
        func = task[0] if type(task) is tuple and task else None
        changed = behind(func) if func is not None else func
        out[key] = task if changed is func else (changed, *task[1:])
    return out


def _is_key(value: Any, dsk: dict[Key, Any]) -> bool:
    try:
        return value in dsk
    except TypeError:  # unhashable: not a key
        return False

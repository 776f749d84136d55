"""Surviving a dead worker process on the ``process`` backend.

When a worker of a ``ProcessPoolExecutor`` dies (killed, ``os._exit``, a
segfault, the out-of-memory killer), the pool breaks: every task in flight
fails with ``BrokenProcessPool`` and the pool accepts no more work. Dask's
scheduler then raises that, and the run would stop with a message that names
neither the step nor the cause. Here:

1. Each worker records, in a slot of shared memory (:class:`WorkerSlots`),
   the step, partition and attempt it is running; the driver tracks which
   task keys are in flight and holds Dask's table of finished results.
2. On ``BrokenProcessPool`` the backend rebuilds the pool and reports which
   processes died and how (exit code or signal). A dead process whose slot
   names a task in flight identifies the culprit.
3. A culprit with ``retries`` left runs again (the death counts as one
   attempt); one without fails the run with :class:`StepFailed` caused by
   :class:`WorkerDiedError`, or, under ``on_failure="continue"``, becomes a
   failed task whose dependents are skipped.
4. The rest of the graph runs again on the new pool, seeded with every result
   that had finished (Dask's ``cache=``), so nothing done is lost. Tasks that
   were in flight on healthy workers (the pool kills them all) simply rerun.

Deaths no slot explains (a worker killed while idle) are retried a few times
and then fail the run: the run never hangs and never loops.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import StepFailed, WorkerDiedError
from .tasks import CONTINUE, FAILED, FinalizeTask, SourceTask, StepTask, _TaskBase

__all__ = ["DeadWorker", "WorkerSlots", "execute_with_recovery"]

Key = Hashable

_SLOT_BYTES = 1024
#: Pool rebuilds allowed for deaths that no running task explains.
MAX_UNEXPLAINED_DEATHS = 3


class WorkerSlots:
    """Shared memory where each worker of one pool writes what it is running.

    Created on the driver with the pool and passed to the pool's initializer;
    each worker claims a slot, and the recorder :meth:`claim` returns becomes
    its :attr:`~flowyml.tasks.WorkerSettings.on_attempt` hook, which writes
    ``pid, step, partition, attempt`` as each attempt starts (a copy of a few
    bytes, no system call).
    """

    def __init__(self, context: Any, count: int) -> None:
        self.count = count
        self.array = context.RawArray(ctypes.c_char, count * _SLOT_BYTES)
        self.next_slot = context.Value("i", 0)

    def claim(self) -> Callable[[str, int | None, int], None] | None:
        """In a worker: claim a slot; the hook that records each attempt there (None: no slot left)."""
        with self.next_slot.get_lock():
            index = self.next_slot.value
            self.next_slot.value += 1
        if index >= self.count:  # a replacement worker: nothing to claim
            return None
        array, base, pid = self.array, index * _SLOT_BYTES, os.getpid()

        def record(step: str, partition: int | None, attempt: int) -> None:
            data = f"{pid}\t{attempt}\t{'' if partition is None else partition}\t{step}".encode()
            if len(data) > _SLOT_BYTES - 2:
                data = f"{pid}\t0\t\t".encode()  # too long to identify: an unexplained death
            array[base: base + 2] = len(data).to_bytes(2, "big")
            array[base + 2: base + 2 + len(data)] = data

        return record

    def records(self) -> dict[int, tuple[str, int | None, int]]:
        """pid -> (step, partition, attempt) of the last attempt each worker started."""
        out = {}
        raw = self.array.raw
        for index in range(self.count):
            base = index * _SLOT_BYTES
            length = int.from_bytes(raw[base: base + 2], "big")
            if not length:
                continue
            pid, attempt, partition, step = raw[base + 2: base + 2 + length].decode().split("\t", 3)
            if step:
                out[int(pid)] = (step, int(partition) if partition else None, int(attempt))
        return out


@dataclass(frozen=True)
class DeadWorker:
    """A pool process that died: its pid, exit code (-N for signal N) and last attempt."""

    pid: int
    exitcode: int | None
    running: tuple[str, int | None, int] | None  # (step, partition, attempt), if known

    @property
    def cause(self) -> str:
        from .timeouts import exit_cause

        return exit_cause(self.exitcode)


class _Tracker:
    """Dask callbacks: forwards to the run's hooks, remembers what is in flight and the results."""

    def __init__(self, hooks: Any) -> None:
        self.hooks = hooks
        self.running: set[Key] = set()
        self.state: dict[str, Any] = {}

    def callbacks(self) -> list[tuple]:
        started, finished, running = self.hooks.task_started, self.hooks.task_finished, self.running

        def start_state(dsk, state):
            self.state = state

        def pretask(key, dsk, state):
            running.add(key)
            started(key)

        def posttask(key, result, dsk, state, worker_id):
            running.discard(key)
            finished(key, result)

        return [(None, start_state, pretask, posttask, None)]


def execute_with_recovery(
    run_graph: Callable[[Mapping, list, list, dict | None], Sequence[Any]],
    restart: Callable[[], list[DeadWorker]],
    dsk: Mapping[Key, Any],
    keys: list[Key],
    hooks: Any,
    broken: type[BaseException],
) -> list[Any]:
    """Run ``dsk`` with ``run_graph``; after each broken pool, ``restart`` and go on.

    Parameters
    ----------
    run_graph : callable
        ``run_graph(dsk, keys, callbacks, cache)``: Dask's ``get_async`` on the pool.
    restart : callable
        Rebuilds the pool; returns the processes that died.
    broken : exception type
        What a broken pool raises (``BrokenProcessPool``).
    """
    dsk = dict(dsk)
    cache: dict[Key, Any] | None = None
    unexplained = 0
    while True:
        tracker = _Tracker(hooks)
        try:
            return list(run_graph(dsk, keys, tracker.callbacks(), cache))
        except broken:
            pass
        in_flight = set(tracker.running)
        dead = restart()
        culprits = _culprits(dsk, in_flight, dead)
        if not culprits:
            unexplained += 1
            if unexplained > MAX_UNEXPLAINED_DEATHS:
                raise WorkerDiedError(_unexplained_message(dsk, in_flight, dead)) from None
        for key, worker in culprits:
            dsk[key] = _after_death(dsk[key], worker)
        finished = tracker.state.get("cache", {})
        dsk, cache = _remaining(dsk, keys, {**(cache or {}), **finished})


def _culprits(dsk: Mapping[Key, Any], in_flight: set[Key], dead: list[DeadWorker]) -> list[tuple[Key, DeadWorker]]:
    """(task key, dead worker) for each death whose recorded attempt was in flight."""
    found = []
    for worker in dead:
        if worker.running is None:
            continue
        step, partition, _ = worker.running
        for key in in_flight:
            if any(_identity(task) == (step, partition) for task in _tasks_in(dsk[key][0])):
                found.append((key, worker))
                break
    return found


def _identity(task: Any) -> tuple[str, int | None] | None:
    if isinstance(task, StepTask):
        return task.spec.name, task.partition
    if isinstance(task, SourceTask):
        return task.name, task.index
    if isinstance(task, FinalizeTask):
        return task.name, None
    return None


def _tasks_in(func: Any) -> list[Any]:
    """The flowyml tasks a graph callable runs (inside fused chains and cache wrappers)."""
    from .fuse import FusedTask

    if isinstance(func, FusedTask):
        return [task for call, _ in func.calls for task in _tasks_in(call)]
    inner = getattr(func, "task", None)
    if inner is not None and not isinstance(func, _TaskBase):
        return _tasks_in(inner)
    return [func]


def _replace(func: Any, target: tuple[str, int | None], new: Callable[[Any], Any]) -> Any:
    """``func`` with the task identified by ``target`` replaced by ``new(task)``."""
    from .fuse import FusedTask

    if isinstance(func, FusedTask):
        return FusedTask(func.keys, tuple((_replace(call, target, new), refs) for call, refs in func.calls))
    inner = getattr(func, "task", None)
    if inner is not None and not isinstance(func, _TaskBase):
        return func.with_task(_replace(inner, target, new))
    return new(func) if _identity(func) == target else func


def _after_death(task: tuple, worker: DeadWorker) -> tuple:
    """The graph entry to run next for a task whose attempt died with ``worker``."""
    assert worker.running is not None, "_culprits keeps only deaths with a known attempt"
    step, partition, attempt = worker.running
    where = f"step {step!r}" + (f", partition {partition}" if partition is not None else "")
    message = (f"the worker process (pid {worker.pid}) running {where} attempt {attempt} died: "
               f"{worker.cause}")

    def replacement(found: Any) -> Any:
        if isinstance(found, StepTask) and found.spec.retries >= attempt:
            return StepTask(found.spec, found.partition, found.run_id, found.mode, attempt + 1)
        error = _died(step, partition, attempt, message)
        if found.mode != CONTINUE:
            raise error
        return DiedTask(step, partition, attempt, found.run_id, found.mode, error)

    return (_replace(task[0], (step, partition), replacement), *task[1:])


def _died(step: str, partition: int | None, attempt: int, message: str) -> StepFailed:
    error = StepFailed(step, partition, attempt, f"WorkerDiedError: {message}")
    error.__cause__ = WorkerDiedError(
        f"{message}. Give the step retries=... to run it again on a new worker, or look for "
        f"what kills it: memory (the out-of-memory killer sends SIGKILL), a crash in native code"
    )
    return error


class DiedTask(_TaskBase):
    """Stands in for a task whose last attempt died with its worker: reports it failed."""

    __slots__ = ("step", "partition", "attempt", "run_id", "mode", "error")

    def __init__(self, step, partition, attempt, run_id, mode, error) -> None:
        self.step, self.partition, self.attempt = step, partition, attempt
        self.run_id, self.mode, self.error = run_id, mode, error

    def __reduce__(self):
        return (DiedTask, (self.step, self.partition, self.attempt, self.run_id, self.mode, self.error))

    def __call__(self, *inputs: Any) -> Any:
        import time

        now = time.time()
        return self._report(None, self.step, self.partition, FAILED, self.attempt, now, self.error)


def _remaining(dsk: Mapping[Key, Any], keys: list[Key], finished: Mapping[Key, Any]) -> tuple[dict, dict]:
    """The tasks still needed for ``keys`` given ``finished`` results, and the results they use."""
    needed: dict[Key, Any] = {}
    cache: dict[Key, Any] = {}
    stack = list(keys)
    while stack:
        key = stack.pop()
        if key in needed or key in cache:
            continue
        if key in finished:
            cache[key] = finished[key]
            continue
        task = dsk[key]
        needed[key] = task
        for argument in task[1:]:
            if isinstance(argument, list):
                stack.extend(item for item in argument if _is_key(item, dsk))
            elif _is_key(argument, dsk):
                stack.append(argument)
    return needed, cache


def _is_key(value: Any, dsk: Mapping[Key, Any]) -> bool:
    try:
        return value in dsk
    except TypeError:
        return False


def _unexplained_message(dsk: Mapping[Key, Any], in_flight: set[Key], dead: list[DeadWorker]) -> str:
    causes = "; ".join(f"pid {w.pid} {w.cause}" for w in dead) or "no dead process found"
    running = sorted({f"{name}" + (f"[{part}]" if part is not None else "")
                      for key in in_flight for task in _tasks_in(dsk[key][0])
                      if (ident := _identity(task)) for name, part in [ident]})
    return (
        f"worker processes of the process pool kept dying ({causes}) while running "
        f"{', '.join(running) or 'no task'}; gave up after {MAX_UNEXPLAINED_DEATHS} restarts. "
        f"Look for what kills them (memory limits, the out-of-memory killer, native crashes)"
    )

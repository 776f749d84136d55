"""What runs inside a Dask task: calling a step, retrying it, reporting how it went.

Every task in a compiled graph is ``(callable, *dependency_keys)``; the
callables here hold the step and its params as attributes, so Dask never
mistakes a param for a key. Under ``Pipeline.run`` a task returns an
:class:`Outcome`, the value plus what the driver needs for the report
(attempts, timing, worker); under ``to_delayed`` it returns the bare value.
These objects are pickled to worker processes: keep them small and free of
driver state.

What differs between backends on the worker side is one
:class:`WorkerSettings` object per process, installed with
:func:`install_worker_settings` (the process backend's pool initializer does
so in each worker); without it a process has the ``sync``/``thread``
defaults. Backends never assign this module's globals.

Why this module is longer than most: :meth:`StepTask.__call__` is the hot
path of every run, and what it reads for every task (the ``Outcome`` class,
the statuses, the attempt hook, the lane it runs in) are globals of this
module, one dictionary lookup away. Moving any of them out would add a
module attribute lookup to every task.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .context import TaskContext, _current, _dask_worker, running
from .exceptions import FlowymlError, StepFailed, _with_source_files
from .secrets import scrub
from .status import Status

__all__ = [
    "FinalizeTask",
    "Outcome",
    "SourceTask",
    "StepSpec",
    "StepTask",
    "ValueTask",
    "WorkerSettings",
    "install_worker_settings",
    "worker_settings",
]

#: A task's status as it reports it: the plain string of a :class:`~flowyml.status.Status`.
#: An Outcome crosses a process boundary with every task, where a member
#: would pickle as a class lookup and a call, dearer than the rest of it; the
#: run's result turns them into members (``Status.of``).
SUCCEEDED, FAILED, SKIPPED, CACHED = (
    Status.SUCCEEDED.value, Status.FAILED.value, Status.SKIPPED.value, Status.CACHED.value
)

#: Task modes. PLAIN (``to_delayed``): bare values, a failure raises StepFailed.
#: RAISE (``run``): Outcome objects, a failure raises. CONTINUE
#: (``on_failure="continue"``): a failure is a failed Outcome and everything
#: downstream of it is skipped, so independent branches still finish.
PLAIN, RAISE, CONTINUE = 0, 1, 2


class Outcome:
    """A task's value and its report line; ``status`` is ``SUCCEEDED``, ``FAILED``, ``SKIPPED`` or ``CACHED``."""

    __slots__ = ("value", "step", "partition", "status", "attempts", "start", "stop", "worker", "error", "inner",
                 "rows")

    def __init__(self, value, step, partition, status, attempts, start, stop, worker, error=None, inner=None,
                 rows=None):
        self.value = value
        self.step = step
        self.partition = partition
        self.status = status
        self.attempts = attempts
        self.start = start
        self.stop = stop
        self.worker = worker
        self.error = error  # a StepFailed (with __cause__) when status is failed
        # ((key, Outcome), ...) of the tasks a fused task ran before this one (see fuse.py)
        self.inner = inner
        # (rows in, rows out): the rows of the DataFrames the task took and returned, None where none was one
        self.rows = rows

    def __reduce__(self):
        # Spelled out: a generator over __slots__ costs several times more, once per task each way.
        return (Outcome, (self.value, self.step, self.partition, self.status, self.attempts,
                          self.start, self.stop, self.worker, self.error, self.inner, self.rows))

    def __repr__(self) -> str:
        return f"<Outcome {self.step}[{self.partition}] {self.status}>"

    def report_line(self) -> Outcome:
        """This outcome without its value (nor the lines of tasks it ran first)."""
        return Outcome(None, self.step, self.partition, self.status, self.attempts, self.start, self.stop,
                       self.worker, self.error, None, self.rows)


# -- where am I running -----------------------------------------------------------

class _Lane(threading.local):
    """Per thread: the lane's label and the Dask worker it belongs to (if any), found once."""

    label: str | None = None
    dask_worker: Any = None


_local = _Lane()
_now = time.time


# -- how this process runs tasks ----------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """How tasks behave in one process: what a backend tells its workers.

    The defaults are those of the ``sync``, ``thread`` and ``distributed``
    backends; the ``process`` backend's pool initializer installs its own in
    each worker process (see :func:`install_worker_settings`).

    Attributes
    ----------
    killable_timeouts : bool
        An attempt with a ``timeout`` runs in a child process that is killed
        when it overruns (:mod:`flowyml.timeouts`), instead of in a thread
        that is abandoned.
    on_attempt : callable, optional
        Called with ``(step, partition, attempt)`` as each attempt starts, so
        that if the process dies the driver knows which attempt killed it
        (:class:`flowyml.recovery.WorkerSlots`).
    """

    killable_timeouts: bool = False
    on_attempt: Callable[[str, int | None, int], None] | None = None


_settings = WorkerSettings()
# The hook on its own: every attempt reads it, and a module global is the
# cheapest lookup there is. Written by install_worker_settings only.
_on_attempt: Callable[[str, int | None, int], None] | None = None


def install_worker_settings(settings: WorkerSettings) -> WorkerSettings:
    """Make ``settings`` this process's, for every task it runs from now on; return the previous ones.

    The one way to configure the worker side: the ``process`` backend's pool
    initializer calls it once in each worker process. Other backends leave
    the defaults, ``WorkerSettings()``.

    Examples
    --------
    >>> previous = install_worker_settings(WorkerSettings(killable_timeouts=True))
    >>> worker_settings().killable_timeouts
    True
    >>> _ = install_worker_settings(previous)
    """
    global _settings, _on_attempt
    previous = _settings
    _settings, _on_attempt = settings, settings.on_attempt
    return previous


def worker_settings() -> WorkerSettings:
    """The settings tasks in this process run under."""
    return _settings


def worker_label() -> str:
    """A stable name for the lane this task runs in (thread, process or Dask worker)."""
    label = _local.label
    if label is None:
        _local.dask_worker = _dask_worker()
        if _local.dask_worker is not None:
            label = _local.dask_worker.address
        elif threading.current_thread() is threading.main_thread():
            label = f"process-{os.getpid()}"
        else:
            label = threading.current_thread().name
        _local.label = label
    return label


def _publish(outcome: Outcome, run_id: str) -> None:
    """On a distributed worker, tell the driver how the task went (no value)."""
    worker = getattr(_local, "dask_worker", None)
    if worker is not None:
        import pickle

        error = pickle.dumps(outcome.error) if outcome.error is not None else None
        fields = [getattr(outcome, name) for name in Outcome.__slots__[1:8]]
        event = [*fields, error, outcome.rows]  # msgpack-able
        # The distributed backend's worker plugin sends events in batches
        # (``flowyml.executors.distributed.FlowymlPlugin``); without it, one by one.
        publish = getattr(worker.plugins.get("flowyml"), "publish", None)
        if publish is not None:
            publish(f"flowyml-{run_id}", event)
        else:
            worker.log_event(f"flowyml-{run_id}", event)


def outcome_from_event(message: list[Any]) -> Outcome:
    """The inverse of ``_publish``, on the driver."""
    import pickle

    *fields, error, rows = message
    # fields are Outcome's seven report slots (step ... worker): mypy cannot count a list.
    return Outcome(None, *fields, pickle.loads(error) if error is not None else None,  # type: ignore[call-arg]
                   None, tuple(rows) if rows is not None else None)


# -- specs --------------------------------------------------------------------------

#: How one input reaches a step: ``(selector, concat)``. ``selector`` picks the
#: i-th output of a multi-output producer (None: the whole value); ``concat``
#: says the argument is a list of partition keys to combine into one object.
ArgSpec = tuple[int | None, bool]


class StepSpec:
    """Everything a task needs to call one step, shared by all its partitions.

    Read-only by convention. A slotted class with a positional ``__reduce__``
    rather than a frozen dataclass: one is built per step per run and pickled
    with every task on the process backend, where a dataclass cost many times
    more to build and to pickle.
    """

    __slots__ = ("name", "func", "params", "positional", "keyword", "varargs", "args", "outputs",
                 "retries", "retry_delay", "timeout", "resources", "order", "in_order", "whole", "plain",
                 "output_schema")

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        params: dict[str, Any],
        positional: tuple[int, ...],  # indexes into the inputs
        keyword: tuple[tuple[str, int], ...],
        varargs: tuple[int, ...],
        args: tuple[ArgSpec, ...],  # one per input, in the step's inputs order
        outputs: tuple[str, ...] | None,  # None or one name: the whole value
        retries: int = 0,
        retry_delay: float = 0.0,
        timeout: float | None = None,
        resources: dict[str, float] | None = None,  # Dask worker resources (distributed only)
        output_schema: Any = None,  # a pandera schema, or a dict of them by output (contracts.py)
    ) -> None:
        self.name = name
        self.func = func
        self.params = params
        self.positional = positional
        self.keyword = keyword
        self.varargs = varargs
        self.args = args
        self.outputs = outputs
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.resources = resources
        self.output_schema = output_schema
        # Derived once here rather than per call: the inputs passed positionally
        # (leading parameters, then *args), and whether the value is the asset as is.
        self.order = positional + varargs
        self.in_order = self.order == tuple(range(len(args)))  # then the inputs are the args as is
        self.whole = outputs is None or len(outputs) == 1
        self.plain = all(arg == (None, False) for arg in args)  # no selector, no partitions to combine

    def __reduce__(self):
        return (StepSpec, (self.name, self.func, self.params, self.positional, self.keyword,
                           self.varargs, self.args, self.outputs, self.retries, self.retry_delay,
                           self.timeout, self.resources, self.output_schema))

    def __repr__(self) -> str:
        return f"StepSpec({self.name!r}, {getattr(self.func, '__qualname__', self.func)!r})"


def combine(parts: Sequence[Any], step: str | None = None) -> Any:
    """Partitions as one object: ``pandas.concat`` for frames and series, else a list.

    ``step``: the step about to receive them, warned about when they are a
    large share of the worker's memory (:mod:`flowyml.memory`).
    """
    if parts and all(_is_pandas(part) for part in parts):
        import pandas

        if step is not None and len(parts) > 1:
            from .memory import check_concat

            check_concat(step, parts)
        return pandas.concat(parts)
    return list(parts)


def _is_pandas(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("pandas") and type(value).__name__ in ("DataFrame", "Series")


class _Upstream(Exception):
    """An input failed or was skipped: this task is skipped, not failed."""


def _unwrap(value: Any) -> Any:
    if type(value) is Outcome:
        if value.status == FAILED or value.status == SKIPPED:
            raise _Upstream(value.step)
        return value.value
    return value


def _argument(raw: Any, spec: ArgSpec, step: str | None = None) -> Any:
    selector, concat = spec
    if concat:
        parts = [_unwrap(part) for part in raw]
        if selector is not None:
            parts = [part[selector] for part in parts]
        return combine(parts, step)
    value = _unwrap(raw)
    return value if selector is None else value[selector]


class _TaskBase:
    """Common machinery: the run id, the mode, and how a result is reported."""

    __slots__ = ()

    mode: int  # PLAIN, RAISE or CONTINUE

    def _report(self, value, step, partition, status, attempts, start, error=None, rows=None):
        if error is not None and self.mode != CONTINUE:
            raise error
        if self.mode == PLAIN:
            return value
        outcome = Outcome(value, step, partition, status, attempts, start, _now(),
                          _local.label or worker_label(), error, None, rows)
        if _local.dask_worker is not None:
            _publish(outcome, self.run_id)
        return outcome


class StepTask(_TaskBase):
    """Call one step on one partition (or once for a whole step)."""

    __slots__ = ("spec", "partition", "run_id", "mode", "first_attempt")

    def __init__(
        self, spec: StepSpec, partition: int | None, run_id: str, mode: int, first_attempt: int = 1
    ) -> None:
        self.spec = spec
        self.partition = partition
        self.run_id = run_id
        self.mode = mode
        # Above 1 when earlier attempts died with their worker process (recovery.py).
        self.first_attempt = first_attempt

    def __reduce__(self):
        if self.first_attempt == 1:
            return (StepTask, (self.spec, self.partition, self.run_id, self.mode))
        return (StepTask, (self.spec, self.partition, self.run_id, self.mode, self.first_attempt))

    def __repr__(self) -> str:
        return f"StepTask({self.spec.name!r}, partition={self.partition})"

    def __call__(self, *raw: Any) -> Any:
        # The hot path of every run: one call per task. Kept flat (no helper
        # calls on success, the context a plain tuple) because on the sync
        # backend Dask's own work per task is small, and this adds to it.
        spec = self.spec
        start = _now()
        if raw:
            if spec.plain:  # every input a whole value: unwrapped inline, no call per input
                inputs = []
                for value in raw:
                    if type(value) is Outcome:
                        if value.status == FAILED or value.status == SKIPPED:
                            return self._report(None, spec.name, self.partition, SKIPPED, 0, start)
                        value = value.value
                    inputs.append(value)
            else:
                # Inside the task's context, so that a memory warning from
                # combining partitions is forwarded like the step's own logs.
                token = _current.set((spec.name, self.partition, self.first_attempt, self.run_id))
                try:
                    inputs = [_argument(value, arg, spec.name) for value, arg in zip(raw, spec.args)]
                except _Upstream:
                    return self._report(None, spec.name, self.partition, SKIPPED, 0, start)
                finally:
                    _current.reset(token)
            args: Sequence[Any] = inputs if spec.in_order else [inputs[i] for i in spec.order]
            if spec.keyword:
                kwargs = {name: inputs[i] for name, i in spec.keyword}
                kwargs.update(spec.params)
            else:
                kwargs = spec.params
        else:
            args = raw
            kwargs = spec.params  # ``**kwargs`` copies it: the function cannot change the spec
        attempt = self.first_attempt
        while True:
            try:
                if _on_attempt is not None:
                    _on_attempt(spec.name, self.partition, attempt)
                if spec.timeout is None:
                    # ``running(...)`` inlined: its generator cost more than the rest of this loop.
                    token = _current.set((spec.name, self.partition, attempt, self.run_id))
                    try:
                        value = spec.func(*args, **kwargs) if kwargs else spec.func(*args)
                    finally:
                        _current.reset(token)
                else:
                    from .timeouts import call_with_timeout

                    context = TaskContext(spec.name, self.partition, attempt, self.run_id)
                    value = call_with_timeout(spec.func, list(args), dict(kwargs), spec.timeout, context,
                                              killable=_settings.killable_timeouts)
                if not spec.whole:
                    value = _split_outputs(spec, value)
            except Exception as exc:  # the user's code failed: retry or report
                if attempt <= spec.retries:
                    attempt += 1
                    if spec.retry_delay:
                        time.sleep(spec.retry_delay)
                    continue
                error = _step_failed(spec.name, self.partition, attempt, exc)
                return self._report(None, spec.name, self.partition, FAILED, attempt, start, error)
            if spec.output_schema is not None:  # checked once: a contract's verdict does not change on retry
                broken = _contract_failure(spec, self.partition, attempt, value)
                if broken is not None:
                    return self._report(None, spec.name, self.partition, FAILED, attempt, start, broken)
            if self.mode == PLAIN:
                return value
            outcome = Outcome(value, spec.name, self.partition, SUCCEEDED, attempt, start, _now(),
                              _local.label or worker_label(), None, None, _rows(args, kwargs, value))
            if _local.dask_worker is not None:
                _publish(outcome, self.run_id)
            return outcome


def _rows(args: Sequence[Any], kwargs: Mapping[str, Any], value: Any) -> tuple[int | None, int | None] | None:
    """(rows in, rows out) of a task, counting pandas DataFrames only: the run history's rows per step.

    ``len`` of a pandas DataFrame is its index's length, read without touching
    the data (a Dask or Spark DataFrame's would compute: they are not counted).
    """
    rows_in = None
    for arg in args:
        if _is_frame(arg):
            rows_in = len(arg) + (rows_in or 0)
    if kwargs:
        for arg in kwargs.values():
            if _is_frame(arg):
                rows_in = len(arg) + (rows_in or 0)
    if _is_frame(value):
        return rows_in, len(value)
    if type(value) is tuple:  # several outputs
        rows_out = None
        for part in value:
            if _is_frame(part):
                rows_out = len(part) + (rows_out or 0)
        return (rows_in, rows_out) if rows_in is not None or rows_out is not None else None
    return (rows_in, None) if rows_in is not None else None


def _is_frame(value: Any) -> bool:
    kind = type(value)
    return kind.__name__ == "DataFrame" and kind.__module__.startswith("pandas")


def _split_outputs(spec: StepSpec, value: Any) -> Any:
    """Several outputs become a tuple in ``outputs`` order, so consumers select by index."""
    outputs = spec.outputs
    if outputs is None or len(outputs) == 1:
        return value
    if isinstance(value, dict):
        missing = [name for name in outputs if name not in value]
        if missing:
            raise FlowymlError(
                f"step {spec.name!r} declares outputs {list(outputs)} but its result dict "
                f"lacks {missing} (it has {sorted(map(str, value))})"
            )
        return tuple(value[name] for name in outputs)
    if isinstance(value, (tuple, list)) and len(value) == len(outputs):
        return tuple(value)
    got = f"{len(value)} values" if isinstance(value, (tuple, list)) else type(value).__name__
    raise FlowymlError(
        f"step {spec.name!r} declares {len(outputs)} outputs {list(outputs)} but returned "
        f"{got}; return a tuple of {len(outputs)} values or a dict with those keys"
    )


def _contract_failure(spec: StepSpec, partition: int | None, attempt: int, value: Any) -> StepFailed | None:
    from .contracts import check_contract
    from .exceptions import ContractError

    try:
        check_contract(spec.name, partition, spec.output_schema, spec.outputs, value)
    except ContractError as exc:
        return _step_failed(spec.name, partition, attempt, exc)
    return None


def _step_failed(step: str, partition: int | None, attempt: int, exc: BaseException) -> StepFailed:
    message = scrub(f"{type(exc).__name__}: {exc}")
    error = StepFailed(step, partition, attempt, message)
    error.__cause__ = _with_source_files(exc)
    return error


class SourceTask(_TaskBase):
    """Read one partition of a source; fails like a step named after the source."""

    __slots__ = ("name", "partition", "index", "run_id", "mode")

    def __init__(self, name: str, partition: Any, index: int, run_id: str, mode: int) -> None:
        self.name = name
        self.partition = partition
        self.index = index
        self.run_id = run_id
        self.mode = mode

    def __reduce__(self):
        return (SourceTask, (self.name, self.partition, self.index, self.run_id, self.mode))

    def __repr__(self) -> str:
        return f"SourceTask({self.name!r}, partition={self.index})"

    def __call__(self) -> Any:
        start = time.time()
        if _on_attempt is not None:
            _on_attempt(self.name, self.index, 1)
        try:
            with running(TaskContext(self.name, self.index, 1, self.run_id)):
                value = self.partition.load()
        except Exception as exc:
            error = _step_failed(self.name, self.index, 1, exc)
            return self._report(None, self.name, self.index, FAILED, 1, start, error)
        rows = (None, len(value)) if _is_frame(value) else None  # the rows it read
        return self._report(value, self.name, self.index, SUCCEEDED, 1, start, None, rows)


class ValueTask(_TaskBase):
    """An in-memory run input, as a task (so params and values are never read as keys)."""

    __slots__ = ("name", "value", "run_id", "mode")

    def __init__(self, name: str, value: Any, run_id: str, mode: int) -> None:
        self.name = name
        self.value = value
        self.run_id = run_id
        self.mode = mode

    def __reduce__(self):
        return (ValueTask, (self.name, self.value, self.run_id, self.mode))

    def __call__(self) -> Any:
        return self._report(self.value, self.name, None, SUCCEEDED, 1, time.time())


class FinalizeTask(_TaskBase):
    """Run a sink's ``finalize`` once every partition is done (commit written files)."""

    __slots__ = ("name", "finalize", "run_id", "mode")

    def __init__(self, name: str, finalize: Callable[[list[Any]], Any], run_id: str, mode: int):
        self.name = name
        self.finalize = finalize
        self.run_id = run_id
        self.mode = mode

    def __reduce__(self):
        return (FinalizeTask, (self.name, self.finalize, self.run_id, self.mode))

    def __call__(self, parts: list[Any]) -> Any:
        start = time.time()
        try:
            values = [_unwrap(part) for part in parts]
        except _Upstream:
            return self._report(None, self.name, None, SKIPPED, 0, start)
        if _on_attempt is not None:
            _on_attempt(self.name, None, 1)
        try:
            with running(TaskContext(self.name, None, 1, self.run_id)):
                value = self.finalize(values)
        except Exception as exc:
            error = _step_failed(self.name, None, 1, exc)
            return self._report(None, self.name, None, FAILED, 1, start, error)
        return self._report(value, self.name, None, SUCCEEDED, 1, start)

"""Every error flowyml raises, and its warnings, in one place.

::

    FlowymlError                    base of everything below
    ├── PipelineError               the pipeline cannot be built (raised by ``add_step``/``run``)
    │   ├── DuplicateNameError      two steps or two outputs share a name
    │   ├── MissingInputError       an input that no step or source produces
    │   ├── CycleError              steps depend on each other in a loop
    │   └── ParameterError          unknown ``params`` key, or a parameter nothing fills
    ├── BackendError                unknown backend, unreachable cluster, unpicklable step
    │   └── NotPicklableError       a step, param or input cannot be sent to a worker
    ├── OptionError                 an argument flowyml cannot use (also a ValueError and a TypeError)
    ├── OutputNotFoundError         ``result[name]`` of an asset the run did not return (also a KeyError)
    ├── DataError                   no file matches, a file cannot be read or written, a partition breaks its schema
    │   ├── StorageError            a URL flowyml cannot use: unknown scheme, package missing, no bucket, access denied
    │   ├── CommitConflictError     another run is committing to the same output right now
    │   └── ContractError           a step's output breaks its declared ``output_schema``
    ├── CacheError                  a cache entry is corrupt or unreadable (recomputed, not raised to users)
    │   └── StaleCacheEntry         an entry failed its full check as it was loaded: the run discards it and plans again
    ├── StepTimeoutError            one attempt of a step ran past its ``timeout``
    ├── WorkerDiedError             the process running a step died (killed, out of memory, segfault)
    └── StepFailed                  a step failed at run time; ``__cause__`` is the user's exception

    CacheWarning (a UserWarning)    a cache entry was corrupt or unreadable and is being recomputed
    MemoryWarning (a UserWarning)   a whole-dataset step is about to concatenate a large share of a worker's memory

Every message names the step (and partition) involved and, where there is one,
the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import PipelineResult

__all__ = [
    "BackendError",
    "CacheError",
    "CacheWarning",
    "CommitConflictError",
    "ContractError",
    "CycleError",
    "DataError",
    "DuplicateNameError",
    "FlowymlError",
    "MemoryWarning",
    "MissingInputError",
    "NotPicklableError",
    "OptionError",
    "OutputNotFoundError",
    "ParameterError",
    "PipelineError",
    "StaleCacheEntry",
    "StepFailed",
    "StepTimeoutError",
    "StorageError",
    "WorkerDiedError",
]


class FlowymlError(Exception):
    """Base class of every error flowyml raises."""


class PipelineError(FlowymlError):
    """The pipeline as declared cannot run; raised before any task starts."""


class DuplicateNameError(PipelineError):
    """Two steps, or two assets, share one name."""


class MissingInputError(PipelineError):
    """A step lists an input that no step, source or run input provides."""


class CycleError(PipelineError):
    """Steps depend on each other in a loop; ``path`` lists the loop."""

    def __init__(self, message: str, path: list[str] | None = None) -> None:
        super().__init__(message)
        self.path = list(path or [])


class ParameterError(PipelineError):
    """A ``params`` key matches no parameter, or a required parameter is unfilled."""


class BackendError(FlowymlError):
    """The executor cannot run here: unknown backend, unreachable cluster, ..."""


class NotPicklableError(BackendError):
    """A step, param or input cannot be pickled for a worker process."""


class OptionError(FlowymlError, ValueError, TypeError):
    """An argument or option flowyml cannot use; the message names the source, sink or step.

    An unsupported reader option, a bad ``blocksize``, a sink without
    ``input=``... It is also a ``ValueError`` and a ``TypeError``, so code that
    catches what Python itself raises for a bad argument keeps working.
    """


class OutputNotFoundError(FlowymlError, KeyError):
    """``result[name]`` of an asset the run did not return (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a key
        return str(self.args[0]) if self.args else ""


class DataError(FlowymlError):
    """A data source matches no file, one of its files cannot be read, or a partition does not fit the
    source's schema (the message names the source, file, partition, column and both types)."""


class StorageError(DataError):
    """A path or URL flowyml cannot use: an unknown scheme, a filesystem package not
    installed, a missing bucket, denied access. Names the source, sink or cache and
    the URL (without its secrets)."""


class CommitConflictError(DataError):
    """Another run is committing to the same output; this run's output was not committed."""


class ContractError(DataError):
    """A step's output breaks the contract it declares with ``@step(output_schema=...)``.

    Raised on the worker, per partition; the run reports it as the step's
    failure (``StepFailed``, chained to this). The message names the step,
    the partition, what failed and the first failing rows.
    """


class CacheError(FlowymlError):
    """A cache entry is missing, truncated or corrupt."""


class StaleCacheEntry(CacheError):
    """Raised by a load task whose entry fails its full check: the run discards it and reruns.

    Attributes
    ----------
    key : str
        The cache key of the entry.
    step : str
        The step whose result it held.
    """

    def __init__(self, message: str, key: str, step: str) -> None:
        super().__init__(message)
        self.key = key
        self.step = step

    def __reduce__(self):
        return (StaleCacheEntry, (str(self), self.key, self.step))


class CacheWarning(UserWarning):
    """A cache entry was corrupt or unreadable and is being recomputed."""


class MemoryWarning(UserWarning):
    """A whole-dataset step is about to concatenate more than a share of a worker's memory."""


class StepTimeoutError(FlowymlError):
    """One attempt of a step ran longer than its ``timeout``."""


class WorkerDiedError(FlowymlError):
    """The worker process running a step died before returning."""


class StepFailed(FlowymlError):
    """A step raised; the user's exception is ``__cause__`` (type and traceback kept).

    Attributes
    ----------
    step : str
        The step's name.
    partition : int or None
        The partition that failed, for per-partition steps.
    attempt : int
        Which attempt failed last (1 for the first).
    result : PipelineResult
        Set on the error a run raises: what the run got done before it
        stopped (see ``docs/results.md``). Absent on one raised elsewhere.
    """

    # Declared for type checkers only: the run sets it (run.py), so an error
    # raised elsewhere has none, as before.
    result: PipelineResult

    def __init__(
        self,
        step: str,
        partition: int | None = None,
        attempt: int = 1,
        message: str | None = None,
    ) -> None:
        self.step = step
        self.partition = partition
        self.attempt = attempt
        where = f"step {step!r}" + (f", partition {partition}" if partition is not None else "")
        tries = f" (attempt {attempt})" if attempt > 1 else ""
        detail = f": {message}" if message else ""
        super().__init__(f"{where} failed{tries}{detail}")

    def __reduce__(self):
        # Exceptions pickle only their args; a StepFailed crosses process
        # boundaries (process pools, distributed workers) with its attributes,
        # its cause and the cause's traceback, so the user sees where their code
        # failed wherever it ran.
        return (
            _rebuild_step_failed,
            (self.step, self.partition, self.attempt, str(self), *_pack_cause(self.__cause__)),
        )


def _pack_cause(cause: BaseException | None) -> tuple[object, object]:
    if cause is None:
        return None, None
    import pickle

    import cloudpickle
    from tblib import Traceback

    try:
        payload = cloudpickle.dumps(cause)
        pickle.loads(payload)
    except Exception:  # an exception that cannot cross processes: keep its text
        payload = cloudpickle.dumps(RuntimeError(f"{type(cause).__qualname__}: {cause}"))
    # to_dict, not as_dict: as_dict is tblib>=1.7 only (distributed allows 1.6);
    # to_dict is the same method in every release since.
    tb = Traceback(cause.__traceback__).to_dict() if cause.__traceback__ else None
    return payload, tb


def _rebuild_step_failed(step, partition, attempt, text, cause=None, tb=None):
    import pickle

    error = StepFailed.__new__(StepFailed)
    Exception.__init__(error, text)
    error.step, error.partition, error.attempt = step, partition, attempt
    if cause is not None:
        original = pickle.loads(cause)
        if tb is not None:
            from tblib import Traceback

            original = original.with_traceback(Traceback.from_dict(tb).as_traceback())
        error.__cause__ = original
    return error


def _with_source_files(exc: BaseException) -> BaseException:
    """``exc``, its traceback naming the user's files even where their code came by value.

    On ``process`` and ``distributed`` workers a step's function is often rebuilt
    by cloudpickle, whose code objects are all named ``<dynamic-code>``: left so,
    the user's traceback would show neither their file nor the line that raised.
    The function keeps its module's ``__file__``, so the frames are rebuilt under
    that name. A traceback without such frames is returned untouched.
    """
    tb = exc.__traceback__
    while tb is not None and not _came_by_value(tb.tb_frame):
        tb = tb.tb_next
    if tb is None:
        return exc
    from tblib import Traceback

    record = Traceback(exc.__traceback__).to_dict()  # to_dict: tblib 1.6 has no as_dict
    frame = record
    while frame is not None:
        code, names = frame["tb_frame"]["f_code"], frame["tb_frame"]["f_globals"]
        if code["co_filename"].startswith("<dynamic") and isinstance(names.get("__file__"), str):
            code["co_filename"] = names["__file__"]
        frame = frame["tb_next"]
    return exc.with_traceback(Traceback.from_dict(record).as_traceback())


def _came_by_value(frame) -> bool:
    return frame.f_code.co_filename.startswith("<dynamic") and isinstance(frame.f_globals.get("__file__"), str)

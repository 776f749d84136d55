"""What a run returns: outputs, per-step results, and the task records behind them."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .bulk import no_gc_passes
from .contracts import ContractFailure
from .exceptions import OutputNotFoundError, StepFailed
from .secrets import scrub
from .status import Status

__all__ = ["PipelineResult", "StepResult", "TaskRecord"]

# Read once: a member looked up on its enum class costs more than the
# comparisons below, which run once per task when a report is folded.
_FAILED, _SKIPPED, _CACHED = Status.FAILED, Status.SKIPPED, Status.CACHED


@dataclass(frozen=True)
class TaskRecord:
    """One task of a run: which step and partition, how it ended, where and when."""

    key: str
    step: str
    partition: int | None
    status: Status
    attempts: int
    start: float
    stop: float
    worker: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        record["status"] = str(self.status)  # the plain string: a record is plain data
        return record


@dataclass(slots=True)
class StepResult:
    """How one step went.

    ``status`` is a :class:`~flowyml.status.Status` (it equals its plain
    string): ``succeeded``, ``failed``, ``skipped`` (an input failed),
    ``cached`` (none of its tasks had to run) or, in the result of a run that
    raised (``StepFailed.result``), ``stopped`` (the run ended before it did).
    ``attempts`` is the most any of its partitions took; ``error`` is the
    :class:`StepFailed` of a failed step. ``tasks`` counts the step's tasks
    that ran or were cached: one per partition, one for a whole step, or the
    whole tree of a ``split_every`` step; ``cached_tasks`` those of them that
    were cached. ``rows_in`` and ``rows_out`` sum the rows of the DataFrames
    its tasks that ran took and returned (None when none was a DataFrame;
    cached tasks are not counted).
    """

    name: str
    status: Status
    duration_s: float = 0.0
    attempts: int = 0
    partitions: int | None = None
    cached_partitions: int = 0
    per_partition: bool = False
    error: StepFailed | None = None
    tasks: int = 0
    cached_tasks: int = 0
    rows_in: int | None = None
    rows_out: int | None = None

    @property
    def traceback(self) -> str | None:
        """The failure's full text, the user's traceback included."""
        if self.error is None:
            return None
        return scrub("".join(traceback.format_exception(self.error)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "duration_s": round(self.duration_s, 6),
            "attempts": self.attempts,
            "partitions": self.partitions,
            "cached_partitions": self.cached_partitions,
            "per_partition": self.per_partition,
            "tasks": self.tasks,
            "cached_tasks": self.cached_tasks,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "error": error_line(self.error),
            "traceback": self.traceback,
        }


def error_line(error: BaseException | None) -> str | None:
    """``"ValueError: bad fare"``: the user's exception of a failure, in one line, without secrets."""
    if error is None:
        return None
    cause = error.__cause__ or error
    return scrub(f"{type(cause).__name__}: {cause}")


class PipelineResult:
    """The outcome of ``Pipeline.run``.

    ``result[name]`` is ``result.outputs[name]``. ``steps`` maps step name to
    :class:`StepResult` in the order they ran; ``success`` is False when any step
    failed (only possible with ``on_failure="continue"``). ``tasks`` lists one
    :class:`TaskRecord` per task in start order. ``steps`` and ``tasks`` are
    folded from the run's task records when first read (a cost per task that
    a run nobody inspects does not pay).
    """

    def __init__(
        self,
        pipeline: str,
        run_id: str,
        backend: str,
        max_workers: int,
        started_at: datetime,
        duration_s: float,
        outputs: dict[str, Any],
        steps: dict[str, StepResult] | Callable[[], dict[str, StepResult]],
        tasks: Sequence[TaskRecord] | Callable[[], list[TaskRecord]] = (),
        contract_failures: Sequence[ContractFailure] | Callable[[], list[ContractFailure]] = (),
        dashboard_link: str | None = None,
        extra_report_html: str | None = None,
        success: bool | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.run_id = run_id
        self.backend = backend
        self.max_workers = max_workers
        self.started_at = started_at
        self.duration_s = duration_s
        self.outputs = outputs
        self._steps = steps
        self._tasks = tasks if callable(tasks) else list(tasks)
        self._contract_failures = contract_failures if callable(contract_failures) else list(contract_failures)
        self.dashboard_link = dashboard_link
        self.extra_report_html = extra_report_html
        self._success = success
        #: The run's record in the history (set by the run; None when the history is off).
        self.history: Any = None

    @property
    def steps(self) -> dict[str, StepResult]:
        """Step name -> :class:`StepResult`, in the order the steps ran."""
        if callable(self._steps):
            with no_gc_passes():
                self._steps = self._steps()
        return self._steps

    def fold_steps(self) -> dict[str, StepResult]:
        """The steps as ``steps`` has them, folded again rather than kept: safe from another thread."""
        steps = self._steps
        return steps() if callable(steps) else steps

    @property
    def tasks(self) -> list[TaskRecord]:
        """Every task of the run, in start order."""
        if callable(self._tasks):
            with no_gc_passes():
                self._tasks = self._tasks()
        return self._tasks

    @property
    def contract_failures(self) -> list[ContractFailure]:
        """The tasks whose output broke their step's ``output_schema``, with their partitions' files.

        Only a run with ``on_failure="continue"`` returns with any: under
        ``"raise"`` the first one raises ``StepFailed``.
        """
        if callable(self._contract_failures):
            self._contract_failures = self._contract_failures()
        return self._contract_failures

    @property
    def success(self) -> bool:
        """True when no step failed or was skipped."""
        if self._success is not None:
            return self._success
        return all(s.status != _FAILED and s.status != _SKIPPED for s in self.steps.values())

    @property
    def failures(self) -> dict[str, StepFailed]:
        """Step name -> error, for every step that failed."""
        return {name: s.error for name, s in self.steps.items() if s.error is not None}

    @property
    def skipped(self) -> list[str]:
        """Steps that did not run because an input failed."""
        return [name for name, s in self.steps.items() if s.status == _SKIPPED]

    def __getitem__(self, name: str) -> Any:
        try:
            return self.outputs[name]
        except KeyError:
            raise OutputNotFoundError(
                f"{name!r} is not among this run's outputs {sorted(self.outputs)}; "
                f"ask for it with run(outputs=[{name!r}, ...])"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.outputs

    def __repr__(self) -> str:
        state = "succeeded" if self.success else "failed"
        return (
            f"<PipelineResult {self.pipeline!r} {state} in {self.duration_s:.2f}s: "
            f"{len(self.steps)} steps, outputs {sorted(self.outputs)}>"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the run (no output values), for monitoring."""
        return {
            "pipeline": self.pipeline,
            "run_id": self.run_id,
            "backend": self.backend,
            "max_workers": self.max_workers,
            "success": self.success,
            "started_at": self.started_at.isoformat(),
            "duration_s": round(self.duration_s, 6),
            "dashboard_link": self.dashboard_link,
            "steps": {name: s.to_dict() for name, s in self.steps.items()},
            "tasks": [t.to_dict() for t in self.tasks],
            "contract_failures": [
                {"step": f.step, "partition": f.partition, "files": list(f.files), "error": f.error}
                for f in self.contract_failures
            ],
            "outputs": sorted(self.outputs),
        }

    def summary(self) -> str:
        """A text table: step, status, partitions, attempts, cached, duration."""
        from .report import format_summary

        return format_summary(self.to_dict())

    def save_report(self, path: str | os.PathLike[str]) -> os.PathLike[str]:
        """Write the run as ``.json`` or as a self-contained ``.html`` page with a timeline."""
        from .report import save_report

        saved = save_report(self.to_dict(), path, extra_html=self.extra_report_html)
        if self.history is not None:  # the history names where the run's report is
            self.history.report_saved(os.path.abspath(saved))
        return saved

    def _repr_html_(self) -> str:
        from .report import to_html_repr

        return to_html_repr(self.to_dict())


def step_results(
    order: Iterable[str],
    records: Iterable[Any],
    partitions: Mapping[str, int | None],
    per_partition: Mapping[str, bool],
    expected: Mapping[str, int] | None = None,
) -> dict[str, StepResult]:
    """Fold task records into one :class:`StepResult` per step, in ``order``.

    ``records`` are :class:`TaskRecord` or anything with the same attributes
    (the run's ``Outcome`` objects, whose ``error`` is the :class:`StepFailed`).
    A step's error is that of its earliest failed task. ``expected`` (step ->
    task count) is given for a run that stopped at a failure: a step with
    fewer records than tasks, and none failed, is ``stopped``.
    """
    # Plain loops, no generators: this runs over every task of every run that is
    # inspected, and must stay small next to what Dask itself spends on a task.
    by_step: dict[str, list[Any]] = {}
    for record in records:
        group = by_step.get(record.step)
        if group is None:
            by_step[record.step] = [record]
        else:
            group.append(record)
    out = {}
    for name in order:
        tasks = by_step.get(name, ())
        failed = skipped = False
        cached = cached_partitions = attempts = 0
        partitioned = per_partition.get(name, False)
        start = stop = None
        first_failure = None
        rows_in = rows_out = None
        for t in tasks:
            status = t.status
            if status == _FAILED:
                failed = True
                if first_failure is None or t.start < first_failure.start:
                    first_failure = t
            elif status == _SKIPPED:
                skipped = True
            elif status == _CACHED:
                cached += 1
                if t.partition is not None or not partitioned:  # not a sink's commit task
                    cached_partitions += 1
            if t.attempts > attempts:
                attempts = t.attempts
            if start is None or t.start < start:
                start = t.start
            if stop is None or t.stop > stop:
                stop = t.stop
            rows = getattr(t, "rows", None)
            if rows is not None:
                if rows[0] is not None:
                    rows_in = rows[0] + (rows_in or 0)
                if rows[1] is not None:
                    rows_out = rows[1] + (rows_out or 0)
        error = first_failure.error if first_failure is not None else None
        if failed:
            status = Status.FAILED
        elif expected is not None and len(tasks) < expected.get(name, 0):
            status = Status.STOPPED
        elif skipped:
            status = Status.SKIPPED
        elif tasks and cached == len(tasks):
            status = Status.CACHED
        else:
            status = Status.SUCCEEDED
        out[name] = StepResult(
            name=name,
            status=status,
            duration_s=stop - start if start is not None and stop is not None else 0.0,
            attempts=attempts,
            partitions=partitions.get(name),
            cached_partitions=cached_partitions,
            per_partition=partitioned,
            error=error if isinstance(error, StepFailed) else None,
            tasks=len(tasks),
            cached_tasks=cached,
            rows_in=rows_in,
            rows_out=rows_out,
        )
    return out

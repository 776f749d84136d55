"""The one path every run takes (API, CLI, notebook): plan -> compile -> execute -> collect.

:func:`run_plan` takes a :class:`~flowyml.plan.Plan` (``Pipeline.run`` plans,
then calls it). Validation, the progress display, the report and clean-up
live here and only here, so every way of running a pipeline behaves the same.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Hashable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from .cache import open_cache, plan_cached_run, warn_stale
from .compile import CompiledGraph, compile_plan, is_source, partition_of
from .contracts import contract_failures
from .exceptions import PipelineError, StaleCacheEntry, StepFailed
from .result import PipelineResult, StepResult, TaskRecord, error_line, step_results
from .status import OnFailure, Status
from .tasks import CACHED, CONTINUE, FAILED, RAISE, SKIPPED, Outcome

if TYPE_CHECKING:
    from .executors import ParallelExecutor
    from .plan import Plan

__all__ = ["run_plan", "run_settings"]

log = logging.getLogger("flowyml")

#: How many times a run starts over after a cache entry failed its check as it was loaded.
MAX_CACHE_ROUNDS = 3


def run_settings(
    on_failure: OnFailure | str, executor: ParallelExecutor | None
) -> tuple[OnFailure, ParallelExecutor]:
    """What a run checks before it is planned: ``on_failure``, and the executor to use.

    Returns ``on_failure`` as an :class:`~flowyml.status.OnFailure`, and
    ``executor``, else a ``ParallelExecutor()``
    (whose backend comes from ``FLOWYML_BACKEND``); both checks raise before
    any planning, so a typo costs nothing.
    """
    from .executors import ParallelExecutor

    try:
        mode = OnFailure(on_failure)
    except ValueError:
        raise PipelineError(
            f"on_failure={on_failure!r} is not one of {', '.join(repr(m.value) for m in OnFailure)}"
        ) from None
    return mode, executor if executor is not None else ParallelExecutor()


def run_plan(
    plan: Plan,
    *,
    executor: ParallelExecutor | None = None,
    on_failure: OnFailure | str = OnFailure.RAISE,
    progress: bool | None = None,
    history: bool | str | None = None,
) -> PipelineResult:
    """Run ``plan``; see :meth:`Pipeline.run` for the parameters."""
    on_failure, executor = run_settings(on_failure, executor)
    run_id = uuid.uuid4().hex[:8]
    started_at = datetime.now(UTC)
    start = time.perf_counter()
    # The run is in the history from here, a run whose sources are missing included.
    record = _history_record(history, plan, executor, run_id, started_at)
    try:
        # Checked before a pool or cluster starts: a typo'd glob or an unpicklable
        # param should cost nothing to find.
        source_partitions = _resolve_sources(plan)
        if record is not None:
            record.sources_resolved(source_partitions)
        if executor._impl.pickles:
            from .pickling import check_picklable

            check_picklable(plan)
        result = _run(plan, executor, on_failure, progress, run_id, started_at, start, source_partitions)
    except BaseException as exc:
        if record is not None:
            record.finish(error=exc)
            stopped = getattr(exc, "result", None)
            if isinstance(stopped, PipelineResult):
                stopped.history = record
        raise
    if record is not None:
        record.finish(result)
        result.history = record
    return result


def _history_record(history, plan, executor, run_id, started_at):
    """The run's record in the history, being written; None when the history is off.

    Recording never fails a run: a setting that is no URL, or a record that
    cannot even start, warns once and the run goes on unrecorded.
    """
    from .history.config import HistoryConfigError, history_url, warn_once

    setting = history if isinstance(history, str) else os.environ.get("FLOWYML_HISTORY", "")
    try:
        url = history_url(history)
    except HistoryConfigError as exc:
        warn_once(setting, exc, str(exc))
        return None
    if url is None:
        return None
    try:
        from .history.recorder import RunRecord

        record = RunRecord(url, plan.pipeline, run_id, started_at, executor.backend, executor.max_workers,
                           plan.steps)
        record.start()
    except Exception as exc:
        warn_once(url, exc)
        return None
    return record


def _run(plan, executor, on_failure, progress, run_id, started_at, start, source_partitions) -> PipelineResult:
    impl = executor._impl
    mode = CONTINUE if on_failure == OnFailure.CONTINUE else RAISE
    cache = open_cache(plan.cache_dir, plan.cache_storage_options)
    # The pool starts in the background once the run knows it has tasks to
    # execute: at once without a cache, else at the cache check's first miss.
    # A run whose results are all cached starts none.
    with executor.session() as session:
        if cache is None:
            session.start()
        graph = compile_plan(
            plan,
            run_id=run_id,
            mode=mode,
            key_suffix=impl.key_suffix(run_id),
            source_partitions=source_partitions,
            group_copies=impl.groups_copies,
        )
        local_paths = _local_paths(plan, source_partitions, cache)
        recorder: RunRecorder | None = None
        dashboard_link = None
        for round_number in range(MAX_CACHE_ROUNDS + 1):
            cached = None
            if cache is not None:  # after a corrupt entry, check the others in full (verify=)
                cached = plan_cached_run(graph, plan, cache, run_id, mode, verify=round_number > 0,
                                         on_compute=session.start)
            earlier, recorder = recorder, RunRecorder(graph, progress, plan.pipeline)
            dsk = graph.dsk
            if cached is not None:
                dsk = cached.dsk
                for key, outcome in cached.culled.items():  # not run at all: cached
                    recorder.task_finished(key, outcome)
            try:
                with recorder:
                    if cached is not None and cached.loads_only and cache is not None:
                        log.info("pipeline %r run %s: everything cached in %s", plan.pipeline, run_id,
                                 cache.shown)
                        values = _load_here(dsk, graph.output_keys, recorder)
                    else:
                        _begin_sinks(plan, graph, dsk, run_id)
                        values, dashboard_link = _execute(session, executor, plan.pipeline, run_id, dsk, graph,
                                                          recorder, cached, local_paths)
            except StaleCacheEntry as exc:
                if round_number == MAX_CACHE_ROUNDS:
                    _abort_sinks(plan, run_id)
                    raise
                assert cache is not None, "only a run with a cache loads entries"
                warn_stale(cache, exc)  # and plan again: what finished meanwhile is cached now
                continue
            except BaseException as exc:
                _abort_sinks(plan, run_id)
                if isinstance(exc, StepFailed) and getattr(exc, "result", None) is None:
                    if earlier is not None:
                        recorder.keep_earlier(earlier)
                    exc.result = _stopped_result(exc, plan, executor, graph, recorder, run_id,
                                                 started_at, start, dashboard_link)
                raise
            finally:
                if earlier is not None:  # tasks an earlier round ran are reported as run, not cached
                    recorder.keep_earlier(earlier)
            break
    assert recorder is not None, "every round makes one"
    results = dict(zip(graph.output_keys, values))
    outcomes = {key: value for key, value in results.items() if type(value) is Outcome}
    recorder.add_missing(outcomes)
    bad = recorder.unsuccessful_keys()
    collected = {asset: graph.assets[asset].collect(results) for asset in _ok_outputs(graph, bad)}
    result = _result(plan, executor, graph, recorder, run_id, started_at, start, dashboard_link,
                     outputs=collected, success=not bad)
    if not result.success:
        _abort_sinks(plan, run_id)
    log.info(
        "pipeline %r run %s %s in %.2fs",
        plan.pipeline,
        run_id,
        "succeeded" if result.success else "failed",
        result.duration_s,
    )
    return result


def _stopped_result(error: StepFailed, plan, executor, graph, recorder, run_id, started_at, start,
                    dashboard_link) -> PipelineResult:
    """What a run that raised ``error`` got done: attached to it as ``error.result``.

    Tasks that finished keep their records; the failed task gets one, timed
    when the driver learned of it; steps that did not finish are ``stopped``.
    """
    key = recorder.key_of(error.step, error.partition)
    if key is not None and key not in recorder.records():
        now = time.time()
        recorder.add_missing({key: Outcome(None, error.step, error.partition, FAILED, error.attempt, now, now,
                                           "unknown", error)})
    return _result(plan, executor, graph, recorder, run_id, started_at, start, dashboard_link,
                   outputs={}, success=False, stopped=True)


def _result(plan, executor, graph, recorder, run_id, started_at, start, dashboard_link, *, outputs, success,
            stopped=False) -> PipelineResult:
    """The run's result. Its steps and tasks are folded when first read; the partials
    hold the records, not the graph and its data. ``stopped``: the run raised, so
    steps short of their tasks are ``stopped``."""
    records = recorder.records()
    return PipelineResult(
        pipeline=plan.pipeline,
        run_id=run_id,
        backend=executor.backend,
        max_workers=executor.max_workers,
        started_at=started_at,
        duration_s=time.perf_counter() - start,
        outputs=outputs,
        steps=partial(step_results, graph.step_keys, records.values(), graph.partitions, graph.per_partition,
                      graph.tasks_per_step() if stopped else None),
        tasks=partial(task_records, records),
        contract_failures=partial(contract_failures, records.values(), graph.origins, graph.sources),
        dashboard_link=dashboard_link,
        extra_report_html=recorder.report_html(),
        success=success,
    )


def _execute(session, executor, name, run_id, dsk, graph, recorder, cached,
             local_paths) -> tuple[list[Any], str | None]:
    """Run ``dsk`` on the executor's backend; the values of the output keys and the dashboard."""
    backend = session.open()
    backend.check_local_paths(local_paths)
    log.info(
        "pipeline %r run %s: %d tasks on backend %r with %d workers%s%s%s",
        name,
        run_id,
        len(graph.dsk),
        executor.backend,
        executor.max_workers,
        f" ({cached.computed} to compute, the rest cached)" if cached is not None else "",
        f", dashboard {backend.dashboard_link}" if backend.dashboard_link else "",
        f", flowyml page {backend.flowyml_page_link}" if backend.flowyml_page_link else "",
    )
    if backend.fuses_partitions:
        from .fuse import fuse_partition_chains, inline_cached_loads, store_behind

        dsk = inline_cached_loads(fuse_partition_chains(dsk, graph.output_keys), graph.output_keys)
        if cached is not None:
            dsk = store_behind(dsk)
    from .bulk import settled_heap

    # Dask's local schedulers call back once their state is built; distributed's
    # prepares the graph on the scheduler.
    with settled_heap(until_prepared=not backend.has_client):
        values = backend.execute(dsk, graph.output_keys, recorder)
    return values, backend.dashboard_link


def _load_here(dsk, keys, recorder) -> list[Any]:
    """Every task only reads the cache: do it here, without starting any worker."""
    import dask.local

    from .executors.local import dask_callbacks

    return list(dask.local.get_sync(dsk, list(keys), callbacks=dask_callbacks(recorder)))


def _resolve_sources(plan: Plan) -> dict[str, list[Any]]:
    """List every source's partitions before any task starts (a glob matching nothing fails here)."""
    resolved = {}
    for name, value in plan.inputs.items():
        if is_source(value):
            if getattr(value, "name", None) is None:
                value.name = name  # a source passed to run(inputs=...): errors name the asset
            resolved[name] = value.partitions()
    return resolved


def _begin_sinks(plan: Plan, graph: CompiledGraph, dsk: Mapping[Hashable, Any], run_id: str) -> None:
    """Sinks that will commit in this run check their output first: a missing bucket or a
    folder nobody may write fails here, before any task starts."""
    from .cache.tasks import LoadTask

    for s in plan.steps:
        if s.begin is not None:
            task = dsk.get(graph.step_keys[s.name][-1])  # the sink's commit
            if task is not None and not isinstance(task[0], LoadTask):
                s.begin(run_id)


def _local_paths(plan: Plan, source_partitions: Mapping[str, list[Any]], cache: Any) -> list[Any]:
    """The local paths this run reads or writes: a cluster's workers must see them too."""
    from .io.filesystem import is_url
    from .io.shared import LocalPath

    paths = []
    for s in plan.steps:
        output = getattr(s.finalize, "output", None)
        if output is not None and output.local:
            paths.append(LocalPath("folder", f"sink {s.name!r}", output.root, probe_in=os.path.dirname(output.root)))
        table = getattr(s.finalize, "table", None)  # write_delta's table
        if table is not None and table.local:
            paths.append(LocalPath("folder", f"sink {s.name!r}", table.url, probe_in=os.path.dirname(table.url)))
    if cache is not None and cache.local:
        paths.append(LocalPath("folder", "the cache", str(cache.directory)))
    for name, parts in source_partitions.items():
        first = parts[0] if parts else None
        path, size = getattr(first, "path", None), getattr(first, "size", None)
        if isinstance(path, str) and not is_url(path) and size is not None:
            paths.append(LocalPath("file", f"source {name!r}", path.removeprefix("file://"), size))
    return paths


def _abort_sinks(plan: Plan, run_id: str) -> None:
    for s in plan.steps:
        if s.abort is not None:
            try:
                s.abort(run_id)
            except Exception:  # clean-up must not hide the run's own error
                log.exception("step %r: could not remove the staged output of run %s", s.name, run_id)


def _ok_outputs(graph: CompiledGraph, bad: set[Hashable]) -> list[str]:
    """Requested outputs whose tasks all succeeded (with on_failure="continue")."""
    return [asset for asset in graph.outputs if not bad.intersection(graph.assets[asset].keys)]


class RunRecorder:
    """Collects one record per task as the backend reports it; drives the progress display.

    Its hooks run on the driver once per task, in the scheduler's own loop, so
    each is O(1) and allocates at most one small object: on the sync backend
    Dask's own work per task is small, and the hooks add to it.
    """

    def __init__(self, graph: CompiledGraph, progress: bool | None, name: str) -> None:
        from .progress import Progress

        self.run_id = graph.run_id
        self.pipeline = name
        self._graph = graph
        self._step_of = graph.task_step()
        self._key_for: dict[tuple[str, int | None], Hashable] | None = None  # built on first report
        # Written from the scheduler's thread only, except task_reported (after a
        # distributed run): a dict assignment is atomic, so no lock is needed.
        self._records: dict[Hashable, Outcome] = {}
        self._report_html: list[str] = []
        self._progress = Progress(
            len(graph.dsk), enabled=progress, description=name, tasks_per_step=graph.tasks_per_step()
        )
        self.watches_starts = not self._progress.silent

    @property
    def graph(self) -> CompiledGraph:
        """The run's compiled graph (the distributed backend describes its steps to the flowyml page)."""
        return self._graph

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._progress.close()

    # -- RunHooks ---------------------------------------------------------------

    def task_started(self, key: Hashable) -> None:
        self._progress.start(self._step_of.get(key) or str(key))

    def task_finished(self, key: Hashable, outcome: Any) -> None:
        if type(outcome) is not Outcome:
            return
        if outcome.inner:  # a fused task: record the tasks it ran first, by their own keys
            for inner_key, inner in outcome.inner:
                self.task_finished(inner_key, inner)
        if outcome.value is not None or outcome.inner:  # keep the report, not the data: values can be big
            outcome = outcome.report_line()
        self._records[key] = outcome
        if self.watches_starts:  # else nothing shows: the records are all there is to keep
            self._progress.finish(outcome.step, outcome.status)

    def task_reported(self, outcome: Outcome) -> None:
        # Distributed: from the client's event thread while the run goes, and from
        # the driver after it. A repeated report replaces the record (the backend
        # corrects a task's attempts after its worker died) but counts once in the
        # progress display; setdefault keeps "first" exact across the two threads.
        key = self.key_of(outcome.step, outcome.partition)
        if key is None:
            return
        first = self._records.setdefault(key, outcome) is outcome
        if not first:
            self._records[key] = outcome
        if first:
            self._progress.finish(outcome.step, outcome.status)

    def add_report_html(self, html: str) -> None:
        self._report_html.append(html)

    def report_html(self) -> str | None:
        """Sections the backend added to the HTML report (distributed), or None."""
        return "".join(self._report_html) or None

    def key_of(self, step: str, partition: int | None) -> Hashable | None:
        """The graph key of ``step``'s task for ``partition`` (None: no such task)."""
        if self._key_for is None:
            self._key_for = {
                (name, partition_of(key)): key
                for name, keys in self._graph.step_keys.items()
                for key in keys
            }
        return self._key_for.get((step, partition))

    # -- after the run ------------------------------------------------------------

    def keep_earlier(self, earlier: RunRecorder) -> None:
        """Start from what an earlier round of this run recorded (it ran; now it is cached)."""
        for key, outcome in earlier._records.items():
            if outcome.status != CACHED:
                self._records[key] = outcome
        self._report_html[:0] = earlier._report_html

    def add_missing(self, outcomes: Mapping[Hashable, Outcome]) -> None:
        for key, outcome in outcomes.items():
            self.add_missing(dict(outcome.inner or ()))
            if key not in self._records:
                self._records[key] = outcome

    def records(self) -> dict[Hashable, Outcome]:
        """Key -> the task's Outcome (without its value)."""
        return self._records

    def unsuccessful_keys(self) -> set[Hashable]:
        return {key for key, o in self._records.items() if o.status == FAILED or o.status == SKIPPED}

    def task_records(self) -> list[TaskRecord]:
        """One record per task, in start order."""
        return task_records(self._records)

    def step_results(self) -> dict[str, StepResult]:
        return step_results(
            self._graph.step_keys, self._records.values(), self._graph.partitions, self._graph.per_partition
        )


def task_records(outcomes: Mapping[Hashable, Outcome]) -> list[TaskRecord]:
    """The report's task list: one :class:`TaskRecord` per key, in start order."""
    ordered = sorted(outcomes.items(), key=lambda item: item[1].start)
    return [_task_record(key, outcome) for key, outcome in ordered]


_status_of = Status.of  # read once: called once per task of the report


def _task_record(key: Hashable, o: Outcome) -> TaskRecord:
    return TaskRecord(
        str(key), o.step, o.partition, _status_of(o.status), o.attempts, o.start, o.stop, o.worker,
        error_line(o.error),
    )

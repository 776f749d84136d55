"""The graphs the overhead benchmark times, and the fast paths it relies on, behave.

``bench/overhead.py`` compares flowyml with hand-built Dask graphs of the same
shape; these tests pin that shape (one task per step, keyed by the step name,
depending on exactly its inputs' keys, in order) and check that the shortcuts
taken for speed (positional binding, pickle-first serialization, the
per-report key lookup) give the same results as the plain path.
"""

from __future__ import annotations

import pickle
import sys

import cloudpickle
import pytest

from flowyml import ParallelExecutor, Pipeline, step
from flowyml.compile import compile_plan, partition_of
from flowyml.executors.local import dumps
from flowyml.run import RunRecorder
from flowyml.tasks import RAISE, Outcome, StepTask

from . import pipelines


def _noop():
    return None


def _count(*parts):
    return len(parts)


def _plus_one(*parts):
    return 1 + sum(parts)


def fan_in(n: int) -> Pipeline:
    pipeline = Pipeline("fan_in")
    names = [f"s{i}" for i in range(n)]
    for name in names:
        pipeline.add_step(_noop, name=name)
    return pipeline.add_step(_count, name="combine", inputs=names)


def layer_inputs(j: int, width: int) -> list[int]:
    chosen = [j, (j + 1) % width]
    if j % 2 == 0:
        chosen.append((j + 3) % width)
    return chosen


def layered(layers: int, width: int) -> Pipeline:
    pipeline = Pipeline("layered")
    for j in range(width):
        pipeline.add_step(_plus_one, name=f"l0_{j}")
    for layer in range(1, layers):
        for j in range(width):
            inputs = [f"l{layer - 1}_{k}" for k in layer_inputs(j, width)]
            pipeline.add_step(_plus_one, name=f"l{layer}_{j}", inputs=inputs)
    return pipeline


def test_fan_in_is_one_task_per_step_keyed_by_name():
    n = 40
    graph = compile_plan(fan_in(n).plan(), run_id="r1", mode=RAISE)
    names = [f"s{i}" for i in range(n)]
    assert list(graph.dsk) == [*names, "combine"]
    assert all(len(graph.dsk[name]) == 1 for name in names), "independent steps depend on nothing"
    combine = graph.dsk["combine"]
    assert isinstance(combine[0], StepTask)
    assert combine[1:] == tuple(names), "the fan-in depends on every step, in inputs order"
    assert graph.output_keys == ["combine"]


def test_key_suffix_goes_on_every_key():
    graph = compile_plan(fan_in(3).plan(), run_id="r1", mode=RAISE, key_suffix="-r1")
    assert list(graph.dsk) == ["s0-r1", "s1-r1", "s2-r1", "combine-r1"]
    assert graph.dsk["combine-r1"][1:] == ("s0-r1", "s1-r1", "s2-r1")
    assert graph.step_keys["combine"] == ["combine-r1"]


def test_group_copies_keys_copies_of_one_function_by_the_function_then_the_step():
    graph = compile_plan(fan_in(3).plan(), run_id="r1", mode=RAISE, key_suffix="-r1", group_copies=True)
    copies = [("_noop-r1", "s0"), ("_noop-r1", "s1"), ("_noop-r1", "s2")]
    assert list(graph.dsk) == [*copies, "combine-r1"]  # one Dask task prefix, "_noop"
    assert graph.dsk["combine-r1"][1:] == tuple(copies)
    assert graph.step_keys["s1"] == [("_noop-r1", "s1")] and graph.task_step()[("_noop-r1", "s1")] == "s1"
    assert partition_of(("_noop-r1", "s1")) is None and partition_of(("clean-r1", 3)) == 3

    # A group never shares its first part with partition keys (a source named like the function).
    pipeline = Pipeline("clash").add_source("_noop", _TwoParts())
    pipeline.add_step(_plus_one, name="each", inputs=["_noop"], per_partition=True)
    for i in range(2):
        pipeline.add_step(_noop, name=f"s{i}")
    graph = compile_plan(pipeline.plan(), run_id="r1", mode=RAISE, key_suffix="-r1", group_copies=True)
    assert {("_noop-r1", 0), ("_noop-r1", 1), ("_noop_copies-r1", "s0"), ("_noop_copies-r1", "s1")} <= set(graph.dsk)


class _TwoParts:
    def partitions(self) -> list[int]:
        return [0, 1]


def test_layered_dag_wires_each_step_to_its_inputs():
    layers, width = 4, 6
    graph = compile_plan(layered(layers, width).plan(), run_id="r1", mode=RAISE)
    assert len(graph.dsk) == layers * width
    for layer in range(1, layers):
        for j in range(width):
            expected = tuple(f"l{layer - 1}_{k}" for k in layer_inputs(j, width))
            assert graph.dsk[f"l{layer}_{j}"][1:] == expected
    assert graph.output_keys == [f"l{layers - 1}_{j}" for j in range(width)]


def test_fan_in_and_layered_results_match_plain_python(executor):
    result = fan_in(30).run(executor=executor, progress=False)
    assert result.outputs == {"combine": 30}
    assert len(result.tasks) == 31 and {t.status for t in result.tasks} == {"succeeded"}
    assert sorted(t.step for t in result.tasks) == sorted([f"s{i}" for i in range(30)] + ["combine"])
    # Keys start with the step name; on distributed, copies of one function are keyed
    # (function, step): one Dask task prefix (see docs/distributed.md, "Large graphs").
    assert all(t.key.startswith(t.step) or t.key.endswith(f", '{t.step}')") for t in result.tasks)
    assert list(result.steps) == [*(f"s{i}" for i in range(30)), "combine"]

    layers, width = 4, 5
    values = [1] * width  # layer 0: _plus_one() == 1
    for _ in range(1, layers):
        values = [1 + sum(values[k] for k in layer_inputs(j, width)) for j in range(width)]
    result = layered(layers, width).run(executor=executor, progress=False)
    assert result.outputs == {f"l{layers - 1}_{j}": values[j] for j in range(width)}


def test_inputs_bound_by_name_out_of_order(executor):
    @step(inputs=["b", "a"], outputs=["out"])
    def ordered(a, b):
        return f"{a}-{b}"

    pipeline = (
        Pipeline("binding")
        .add_step(lambda: "A", name="make_a", outputs=["a"])
        .add_step(lambda: "B", name="make_b", outputs=["b"])
        .add_step(ordered)
    )
    assert pipeline.run(executor=executor, progress=False).outputs == {"out": "A-B"}


def test_process_dumps_uses_pickle_for_importable_code_and_cloudpickle_otherwise():
    importable = (pipelines.add, 1, "x")
    assert dumps(importable) == pickle.dumps(importable, protocol=pickle.HIGHEST_PROTOCOL)

    def local(value):  # not importable by a worker: must travel by value
        return value * 3

    assert pickle.loads(dumps(local))(2) == 6
    assert pickle.loads(dumps(lambda: "lam"))() == "lam"


def test_process_dumps_honours_modules_registered_by_value():
    cloudpickle.register_pickle_by_value(pipelines)
    try:
        data = dumps(pipelines.add)
        assert data != pickle.dumps(pipelines.add, protocol=pickle.HIGHEST_PROTOCOL)
        module = sys.modules.pop(pipelines.__name__)
        try:  # loads without importing the module: it came by value
            assert pickle.loads(data)(2, 3) == 5
        finally:
            sys.modules[pipelines.__name__] = module
    finally:
        cloudpickle.unregister_pickle_by_value(pipelines)


def test_reported_outcomes_find_their_keys():
    pipeline = fan_in(3)
    plan = pipeline.plan()
    graph = compile_plan(plan, run_id="r1", mode=RAISE, key_suffix="-r1")
    recorder = RunRecorder(graph, False, "fan_in")
    recorder.task_reported(Outcome(None, "s1", None, "succeeded", 1, 1.0, 2.0, "w1"))
    recorder.task_reported(Outcome(None, "combine", None, "failed", 2, 3.0, 4.0, "w2"))
    recorder.task_reported(Outcome(None, "unknown", None, "succeeded", 1, 5.0, 6.0, "w1"))
    assert [(t.key, t.status, t.attempts) for t in recorder.task_records()] == [
        ("s1-r1", "succeeded", 1),
        ("combine-r1", "failed", 2),
    ]
    assert recorder.unsuccessful_keys() == {"combine-r1"}
    steps = recorder.step_results()
    assert steps["combine"].status == "failed" and steps["combine"].attempts == 2
    assert steps["s1"].duration_s == 1.0


def test_bulk_building_pauses_the_collector_and_always_restores_it():
    import gc

    from flowyml.bulk import no_gc_passes

    assert gc.isenabled()
    with no_gc_passes():
        assert not gc.isenabled()
        with no_gc_passes():  # nested: the outer block still owns the state
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), no_gc_passes():
        raise KeyError("a failing compile")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_gc_passes():
            pass
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()


def test_a_rerun_reuses_the_layout_but_never_a_task(tmp_path):
    from flowyml import read_csv

    pipelines.write_parts(tmp_path, range(2))
    pipeline = (
        Pipeline("rerun")
        .add_source("rows", read_csv(str(tmp_path / "*.csv")))
        .add_step(pipelines.flaky_double)
        .add_step(_count, name="combine", inputs=["doubled"])
    )
    first = compile_plan(pipeline.plan(), run_id="r1", mode=RAISE)
    second = compile_plan(pipeline.plan(), run_id="r2", mode=RAISE)
    assert list(first.dsk) == list(second.dsk)
    for key, task in first.dsk.items():
        again = second.dsk[key]
        assert task[0] is not again[0] and task[1:] == again[1:]
        assert (task[0].run_id, again[0].run_id) == ("r1", "r2")
        if isinstance(task[0], StepTask):
            assert task[0].spec is again[0].spec  # laid out once
    pipelines.write_parts(tmp_path, [2])  # a new file: one more partition, a new layout
    third = compile_plan(pipeline.plan(), run_id="r3", mode=RAISE)
    assert third.partitions["flaky_double"] == 3 and ("flaky_double", 2) in third.dsk


def _collections_during(action, generation: int | None = None) -> int:
    """How many garbage-collector passes ``action()`` triggers (counted, not timed):
    all, or those of one ``generation`` (2: the full passes)."""
    import gc

    passes = 0

    def count(phase, info):
        nonlocal passes
        passes += phase == "start" and generation in (None, info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        action()
    finally:
        gc.callbacks.remove(count)
    return passes


def test_compiling_many_steps_runs_no_collector_pass():
    # Compiling creates one task object per step and no cycles; the collector's
    # passes over them made compiling a 100,000-step pipeline's later runs
    # cost four times more per step than a 1,000-step one's. Both the first
    # run's layout and a later run's graph are built with the passes paused.
    # (A pass or two may follow a pause, over what it created: not one per 700 objects.)
    pipeline = fan_in(20_000)
    plan = pipeline.plan()
    assert _collections_during(lambda: compile_plan(plan, run_id="first", mode=RAISE)) <= 3
    assert _collections_during(lambda: compile_plan(plan, run_id="later", mode=RAISE)) <= 3


def test_running_many_steps_rescans_the_graph_in_no_full_collector_pass():
    # At 100,000 tasks, full passes over the graph Dask converts, orders and
    # indexes were 16 us of a run's 68 us a task (2 us at 1,000). Dask prepares
    # it with the collector paused, then it is settled with the rest of what the
    # run found (bulk.settled_heap): the tasks' own garbage is collected as usual.
    pipeline = fan_in(40_000)  # 3 or 4 full passes without; none with
    executor = ParallelExecutor(backend="sync")
    pipeline.run(executor=executor, progress=False)  # the layout, remembered
    assert _collections_during(lambda: pipeline.run(executor=executor, progress=False), generation=2) <= 1


@step
def _collector_state():
    import gc

    return gc.isenabled(), gc.get_freeze_count() > 0


class _Cycle:
    def __init__(self, collected: list) -> None:
        self.me = self
        self.collected = collected

    def __del__(self) -> None:
        self.collected.append(True)


def test_steps_run_with_the_collector_on_and_a_run_leaves_it_as_it_was(executor):
    import gc

    collected: list = []
    _Cycle(collected)  # garbage (a cycle) from before the run
    result = Pipeline("gc").add_step(_collector_state).run(executor=executor, progress=False)
    enabled, _ = result["_collector_state"]
    assert enabled  # user code never runs with the collector paused
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # The run's history record is completed by a thread of its own: while that
    # thread's allocations run a collection, gc.collect() here returns at once.
    import flowyml.history

    assert flowyml.history.flush(60)
    gc.collect()
    assert collected == [True]  # settled during the run, collected after it: not leaked


def test_concurrent_runs_thaw_the_heap_only_when_the_last_ends():
    import gc
    import threading

    from flowyml.bulk import graph_prepared, settled_heap

    inside, release = threading.Event(), threading.Event()

    def other_run():
        with settled_heap():
            graph_prepared()
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=other_run)
    thread.start()
    assert inside.wait(30)
    with settled_heap():
        assert not gc.isenabled()  # this run's graph is being prepared
        graph_prepared()
        assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # the other run still goes
    release.set()
    thread.join()
    assert gc.isenabled() and gc.get_freeze_count() == 0

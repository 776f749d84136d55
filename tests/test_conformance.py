"""The executor conformance suite: every backend gives the same results."""

from __future__ import annotations

import gc
import traceback
import weakref
from pathlib import Path

import dask
import pytest

from flowyml import OutputNotFoundError, Pipeline, StepFailed, step
from flowyml.utils.parallel import parallel_map

from . import pipelines
from .pipelines import add


def test_parallel_processing_example(executor):
    result = pipelines.parallel_processing().run(executor=executor, progress=False)
    assert result.success
    assert result["chunk_3"] == "processed_3"
    assert result.outputs == {f"chunk_{i}": f"processed_{i}" for i in range(5)}
    assert {s.status for s in result.steps.values()} == {"succeeded"}
    assert all(s.attempts == 1 for s in result.steps.values())


def test_tuple_and_dict_outputs_and_args_fan_in(executor):
    result = pipelines.diamond().run(executor=executor, progress=False)
    expected = [sum([0, 2, 4, 6, 8]), sum([1, 3, 5, 7, 9]), sum(range(5)), sum(range(5, 10))]
    assert result.outputs == {"report": expected}
    assert list(result.steps) == ["numbers", "split", "halves", "report"]


def test_params_and_overrides(executor):
    pipeline = (
        Pipeline("params")
        .add_step(pipelines.numbers, params={"count": 4})
        .add_step(pipelines.split)
        .add_step(pipelines.halves, params={"cut": 2})
        .add_step(pipelines.report, params={"scale": 10})
    )
    result = pipeline.run(executor=executor, progress=False)
    assert result["report"] == [10 * 2, 10 * 4, 10 * 1, 10 * 5]


def test_requested_outputs_run_only_what_they_need(executor):
    result = pipelines.diamond().run(executor=executor, outputs=["evens"], progress=False)
    assert result.outputs == {"evens": [0, 2, 4, 6, 8]}
    assert list(result.steps) == ["numbers", "split"]
    with pytest.raises(OutputNotFoundError, match=r"'odds' is not among this run's outputs \['evens'\]"):
        result["odds"]
    with pytest.raises(KeyError):  # what a mapping raises, for code that expects it
        result["odds"]


def test_run_inputs_feed_steps(executor):
    pipeline = Pipeline("inputs").add_step(add, inputs=["x", "y"], outputs=["sum"])
    result = pipeline.run({"x": 2, "y": 40}, executor=executor, progress=False)
    assert result["sum"] == 42
    # An input that looks like a task key or a task is passed through untouched.
    tricky = pipeline.run({"x": ("sum", 0), "y": ("add",)}, executor=executor, progress=False)
    assert tricky["sum"] == ("sum", 0, "add")


def test_params_are_never_read_as_keys(executor):
    @step
    def echo(value):
        return value

    pipeline = Pipeline("keys").add_step(echo, name="a", params={"value": "b"})
    pipeline.add_step(echo, name="b", params={"value": ("a", 0)})
    pipeline.add_step(echo, name="c", params={"value": [("b",), "a"]})
    result = pipeline.run(executor=executor, progress=False)
    assert result.outputs == {"a": "b", "b": ("a", 0), "c": [("b",), "a"]}


def test_failure_raises_step_failed_with_the_user_traceback(executor):
    with pytest.raises(StepFailed) as info:
        pipelines.failing().run(executor=executor, progress=False)
    error = info.value
    assert error.step == "fail_if_big" and error.partition is None and error.attempt == 1
    assert "fail_if_big" in str(error) and "exceeds" in str(error)
    assert isinstance(error.__cause__, ValueError)
    # The traceback ends where the user's code raised: their function, file and line,
    # even where the function reached the worker by value (process, distributed).
    raised_at = traceback.extract_tb(error.__cause__.__traceback__)[-1]
    assert (raised_at.name, raised_at.filename) == ("fail_if_big", pipelines.__file__)
    assert raised_at.line == 'raise ValueError(f"total {total} exceeds {limit}")'


def test_continue_finishes_independent_branches(executor):
    result = pipelines.failing().run(executor=executor, on_failure="continue", progress=False)
    assert not result.success
    assert result.steps["fail_if_big"].status == "failed"
    assert result.steps["after"].status == "skipped"
    assert result.steps["independent"].status == "succeeded"
    assert result.outputs == {"independent": 10}
    assert list(result.failures) == ["fail_if_big"]
    assert isinstance(result.failures["fail_if_big"].__cause__, ValueError)
    assert result.skipped == ["after"]


def test_to_delayed_runs_with_plain_dask(executor):
    delayed = pipelines.diamond().to_delayed()
    assert list(delayed) == ["report"]
    (value,) = dask.compute(*delayed.values(), scheduler="sync")
    assert value == pipelines.diamond().run(executor=executor, progress=False)["report"]


def test_parallel_map_inside_a_step(executor):
    @step
    def squares(n=6):
        return parallel_map(lambda x: x * x, range(n), max_workers=2)

    result = Pipeline("map").add_step(squares).run(executor=executor, progress=False)
    assert result["squares"] == [0, 1, 4, 9, 16, 25]


def test_same_results_on_every_backend(executor):
    """The full record (outputs and statuses) matches the sync backend's."""
    from flowyml import ParallelExecutor

    reference = pipelines.diamond().run(executor=ParallelExecutor(backend="sync"), progress=False)
    result = pipelines.diamond().run(executor=executor, progress=False)
    assert result.outputs == reference.outputs
    assert {n: s.status for n, s in result.steps.items()} == {
        n: s.status for n, s in reference.steps.items()
    }
    assert len(result.tasks) == len(reference.tasks) == 4


class _Payload:
    """Stands for a big DataFrame: only a weak reference may outlive the run."""

    def __init__(self, size: int) -> None:
        self.size = size


_made: list[weakref.ref] = []


@step(inputs=["payload"], outputs=["bigger"])
def _grow(payload):
    bigger = _Payload(payload.size * 2)
    _made.append(weakref.ref(bigger))
    return bigger


@step(inputs=["bigger"], outputs=["size"])
def _measure(bigger):
    return bigger.size


@pytest.mark.parametrize("backend_name", ["sync", "thread"])  # where values live in this process
def test_a_result_keeps_no_input_or_intermediate_value(backend_name, _executors):
    from .conftest import _open

    executor = _open(backend_name, _executors)
    pipeline = Pipeline("retention").add_step(_grow).add_step(_measure)
    payload = _Payload(21)
    given = weakref.ref(payload)
    _made.clear()
    result = pipeline.run({"payload": payload}, executor=executor, progress=False)
    again = pipeline.run({"payload": _Payload(1)}, executor=executor, progress=False)  # reuses the plan
    assert result["size"] == 42 and again["size"] == 2
    del payload
    gc.collect()
    assert given() is None, "the result (or the pipeline) still holds the run input"
    assert [made() for made in _made] == [None, None], "an intermediate value outlived its run"
    # The report, folded only now, is still complete.
    assert result.steps["_measure"].status == "succeeded" and len(result.tasks) == 3


@step
def _extract():
    return [1, 2, 3]


@step(inputs=["_extract"])
def _transform(rows):
    return [row / 0 for row in rows]


@step(inputs=["_transform"])
def _load(rows):
    return len(rows)


def test_a_run_that_raises_carries_its_report(executor, tmp_path):
    pipeline = Pipeline("raises").add_step(_extract).add_step(_transform).add_step(_load)
    with pytest.raises(StepFailed) as info:
        pipeline.run(executor=executor, progress=False)
    stopped = info.value.result
    assert stopped.success is False and stopped.outputs == {}
    assert {name: s.status for name, s in stopped.steps.items()} == {
        "_extract": "succeeded", "_transform": "failed", "_load": "stopped",
    }
    shown = stopped.steps["_transform"].traceback
    assert "ZeroDivisionError" in shown and "return [row / 0 for row in rows]" in shown  # the user's line
    assert list(stopped.failures) == ["_transform"]
    assert [(t.step, t.status) for t in stopped.tasks] == [("_extract", "succeeded"), ("_transform", "failed")]
    record = stopped.to_dict()
    assert record["success"] is False and record["steps"]["_load"]["status"] == "stopped"
    page = stopped.save_report(tmp_path / "failed.html")
    assert "_transform" in Path(page).read_text(encoding="utf-8")

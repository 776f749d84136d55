"""Mistakes in a pipeline are found while building it, with the fix in the message."""

from __future__ import annotations

import pytest

from flowyml import (
    CycleError,
    DuplicateNameError,
    MissingInputError,
    ParallelExecutor,
    ParameterError,
    Pipeline,
    PipelineError,
    step,
)

from . import pipelines


def test_duplicate_step_name():
    pipeline = Pipeline("p").add_step(pipelines.process_chunk, params={"chunk_id": 1})
    with pytest.raises(DuplicateNameError, match=r"already has a step named 'process_chunk'.*name="):
        pipeline.add_step(pipelines.process_chunk, params={"chunk_id": 2})


def test_duplicate_output_name():
    pipeline = Pipeline("p").add_step(pipelines.numbers)
    with pytest.raises(DuplicateNameError, match=r"output 'numbers' of step 'again'.*step 'numbers'"):
        pipeline.add_step(pipelines.numbers, name="again")


def test_source_and_step_clash():
    pipeline = Pipeline("p").add_source("numbers", [1, 2])
    with pytest.raises(DuplicateNameError, match="numbers"):
        pipeline.add_step(pipelines.numbers)


def test_missing_input_names_step_and_fix():
    pipeline = Pipeline("p").add_step(pipelines.split)
    with pytest.raises(MissingInputError, match=r"step 'split' needs input 'numbers'.*add_source"):
        pipeline.run(progress=False)


def test_cycle_shows_its_path():
    @step(inputs=["c"], outputs=["a"])
    def one(c):
        return c

    @step(inputs=["a"], outputs=["b"])
    def two(a):
        return a

    @step(inputs=["b"], outputs=["c"])
    def three(b):
        return b

    @step(inputs=["c"], outputs=["d"])
    def leaf(c):
        return c

    pipeline = Pipeline("loop").add_step(one).add_step(two).add_step(three).add_step(leaf)
    with pytest.raises(CycleError) as info:
        pipeline.run(progress=False)
    assert info.value.path in (
        ["three", "two", "one", "three"],
        ["one", "three", "two", "one"],
        ["two", "one", "three", "two"],
    )
    assert " -> " in str(info.value)


@step(inputs=["b"], outputs=["a"])
def make_a(b):
    return b


@step(inputs=["a"], outputs=["b"])
def make_b(a):
    return a


@step(outputs=["other"])
def unrelated():
    return 1


@pytest.mark.parametrize("outputs", [None, ["other"]], ids=["leaves", "an-unrelated-output"])
def test_a_cycle_anywhere_is_an_error_whatever_the_outputs(outputs):
    # Every asset of a two-step loop is consumed, so the loop has no leaf output
    # for the default outputs to reach; and an unrelated output does not need it.
    pipeline = Pipeline("cyc").add_step(make_a).add_step(make_b).add_step(unrelated)
    with pytest.raises(CycleError) as info:
        pipeline.run(outputs=outputs, executor=ParallelExecutor(backend="sync"), progress=False)
    assert sorted(set(info.value.path)) == ["make_a", "make_b"]
    assert "make_a" in str(info.value) and "make_b" in str(info.value)


def test_a_run_input_that_replaces_a_looping_asset_breaks_the_loop():
    pipeline = Pipeline("cyc").add_step(make_a).add_step(make_b)
    result = pipeline.run({"a": 5}, outputs=["b"], executor=ParallelExecutor(backend="sync"), progress=False)
    assert result.outputs == {"b": 5}


def test_unknown_params_key():
    with pytest.raises(ParameterError, match=r"step 'numbers': unknown params key 'cnt'.*count"):
        Pipeline("p").add_step(pipelines.numbers, params={"cnt": 3})


def test_required_parameter_unfilled_is_a_build_error():
    with pytest.raises(ParameterError, match=r"required parameter 'chunk_id'.*params="):
        Pipeline("p").add_step(pipelines.process_chunk)


def test_too_many_inputs():
    with pytest.raises(ParameterError, match="step 'add' has 3 inputs"):
        Pipeline("p").add_step(pipelines.add, inputs=["a", "b", "c"])


def test_param_also_given_as_input():
    with pytest.raises(ParameterError, match="already filled by input"):
        Pipeline("p").add_step(pipelines.add, inputs=["a", "b"], params={"b": 1})


def test_unknown_step_option():
    with pytest.raises(ParameterError, match=r"unknown option.*retires"):
        Pipeline("p").add_step(pipelines.numbers, retires=2)


def test_bad_option_values():
    with pytest.raises(PipelineError, match="retries must be an int >= 0"):
        step(retries=-1)(len)
    with pytest.raises(PipelineError, match="timeout must be > 0"):
        step(timeout=0)(len)


def test_unknown_output_requested():
    with pytest.raises(MissingInputError, match="no asset 'nope'"):
        pipelines.diamond().run(outputs=["nope"], progress=False)


def test_bad_on_failure():
    with pytest.raises(PipelineError, match="on_failure='ignore'"):
        pipelines.diamond().run(on_failure="ignore", progress=False)


def test_step_still_calls_like_the_function():
    assert pipelines.split([1, 2, 3]) == ([2], [1, 3])
    assert pipelines.process_chunk(7) == "processed_7"


def test_decorator_options_are_overridden_per_add():
    pipeline = Pipeline("p").add_step(pipelines.numbers, retries=3, name="n", outputs=["nums"])
    added = pipeline.steps["n"]
    assert (added.retries, added.asset_names) == (3, ("nums",))
    assert pipelines.numbers.retries == 0  # the decorated step is unchanged


def test_a_changed_pipeline_is_planned_again():
    # Plans are remembered per pipeline version: every change must show in the next run.
    @step
    def scaled(x=1, factor=1):
        return x * factor

    @step(inputs=["scaled"])
    def plus_one(scaled):
        return scaled + 1

    executor = ParallelExecutor(backend="sync")
    pipeline = Pipeline("changing").add_step(scaled, params={"x": 2})
    assert pipeline.run(executor=executor, progress=False).outputs == {"scaled": 2}
    pipeline.set_params("scaled", factor=10)
    assert pipeline.run(executor=executor, progress=False).outputs == {"scaled": 20}
    pipeline.add_step(plus_one)
    assert pipeline.run(executor=executor, progress=False).outputs == {"plus_one": 21}
    assert pipeline.run({"scaled": 5}, executor=executor, progress=False).outputs == {"plus_one": 6}
    assert pipeline.run(executor=executor, outputs=["scaled"], progress=False).outputs == {"scaled": 20}
    with pytest.raises(MissingInputError, match="'nothing'"):
        pipeline.run(executor=executor, outputs=["nothing"], progress=False)


def test_steps_and_sources_change_only_through_the_pipeline():
    pipeline = Pipeline("read_only").add_step(pipelines.numbers).add_source("extra", 3)
    assert list(pipeline.steps) == ["numbers"] and pipeline.sources["extra"] == 3
    with pytest.raises(TypeError):
        pipeline.steps["other"] = pipeline.steps["numbers"]
    with pytest.raises(TypeError):
        pipeline.sources["extra"] = 4

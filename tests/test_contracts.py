"""Data contracts: ``@step(output_schema=<pandera schema>)``, checked per partition on the worker."""

from __future__ import annotations

import os
import re

import pandas as pd
import pandera.pandas as pa
import pytest

from flowyml import Pipeline, read_csv, step
from flowyml.exceptions import ContractError, OptionError, StepFailed

from .pipelines import calls, record

#: value is never negative, part is an int.
NON_NEGATIVE = pa.DataFrameSchema({"part": pa.Column(int), "value": pa.Column(int, pa.Check.ge(0))})


class NonNegative(pa.DataFrameModel):
    part: int
    value: int = pa.Field(ge=0)


def _write_months(folder, bad_part: int | None = 2, parts: int = 4) -> list[str]:
    """One CSV per part; in ``bad_part`` rows 1 and 3 have a negative value."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for part in range(parts):
        values = [part * 10 + i for i in range(5)]
        if part == bad_part:
            values[1], values[3] = -7, -9
        path = os.path.join(folder, f"month_{part:02d}.csv")
        pd.DataFrame({"part": [part] * 5, "value": values}).to_csv(path, index=False)
        paths.append(path)
    return paths


@step(inputs=["rows"], outputs=["checked"], per_partition=True, output_schema=NON_NEGATIVE)
def passthrough(rows, log_dir=""):
    if log_dir:
        record(log_dir, f"passthrough-{int(rows['part'].iloc[0])}")
    return rows


@step(inputs=["checked"], outputs=["doubled"], per_partition=True)
def double(checked):
    return checked.assign(value=checked["value"] * 2)


def _pipeline(folder, contract_step=passthrough, **options) -> Pipeline:
    return (
        Pipeline("contracts")
        .add_source("rows", read_csv(os.path.join(folder, "*.csv")))
        .add_step(contract_step, **options)
        .add_step(double)
    )


def test_a_partition_breaking_the_contract_fails_the_run_naming_step_partition_and_rows(executor, tmp_path) -> None:
    _write_months(tmp_path)
    with pytest.raises(StepFailed) as caught:
        _pipeline(tmp_path).run(executor=executor)
    error = caught.value
    assert (error.step, error.partition) == ("passthrough", 2)
    assert isinstance(error.__cause__, ContractError)
    message = str(error.__cause__)
    assert message.startswith("step 'passthrough' partition 2: its output breaks its output_schema")
    assert "column 'value' failed greater_than_or_equal_to(0) (2 values: -7, -9)" in message
    rows = message.split("first failing rows:\n", 1)[1].splitlines()
    assert [line.split() for line in rows] == [["part", "value"], ["1", "2", "-7"], ["3", "2", "-9"]]


def test_with_continue_the_failing_partitions_are_listed_with_their_files_and_the_rest_go_on(
    executor, tmp_path
) -> None:
    paths = _write_months(tmp_path)
    result = _pipeline(tmp_path).run(executor=executor, on_failure="continue")

    assert not result.success
    [failure] = result.contract_failures
    assert (failure.step, failure.partition, failure.files) == ("passthrough", 2, (paths[2],))
    assert failure.error == "step 'passthrough' partition 2: its output breaks its output_schema:"
    doubled = {t.partition: t.status for t in result.tasks if t.step == "double"}
    assert doubled == {0: "succeeded", 1: "succeeded", 2: "skipped", 3: "succeeded"}
    assert result.to_dict()["contract_failures"] == [
        {"step": "passthrough", "partition": 2, "files": [paths[2]], "error": failure.error}
    ]


def test_data_that_keeps_the_contract_runs_as_without_one(executor, tmp_path) -> None:
    _write_months(tmp_path, bad_part=None)
    result = _pipeline(tmp_path).run(executor=executor)
    plain = _pipeline(tmp_path, contract_step=passthrough.with_options(output_schema=None)).run(executor=executor)
    pd.testing.assert_frame_equal(result["doubled"], plain["doubled"])
    assert result.contract_failures == []


def test_a_dataframe_model_is_a_contract_too(executor, tmp_path) -> None:
    _write_months(tmp_path)
    with pytest.raises(StepFailed, match="partition 2") as caught:
        _pipeline(tmp_path, output_schema=NonNegative).run(executor=executor)
    assert "failed greater_than_or_equal_to(0)" in str(caught.value.__cause__)


def test_a_contract_is_checked_once_not_retried(executor, tmp_path) -> None:
    _write_months(tmp_path)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    result = _pipeline(tmp_path / ".", retries=2, params={"log_dir": str(log_dir)}).run(
        executor=executor, on_failure="continue"
    )
    assert [f.partition for f in result.contract_failures] == [2]
    assert calls(log_dir, "passthrough-2") == 1
    assert result.steps["passthrough"].attempts == 1


@step(inputs=["rows"], outputs=["low", "high"])
def split_by_value(rows):
    return rows[rows["value"] < 20], rows[rows["value"] >= 20]


def test_a_step_with_several_outputs_takes_a_contract_per_output(executor, tmp_path) -> None:
    _write_months(tmp_path, bad_part=None)
    small = pa.DataFrameSchema({"value": pa.Column(int, pa.Check.lt(20))})
    pipeline = Pipeline("split").add_source("rows", read_csv(os.path.join(tmp_path, "*.csv")))
    pipeline.add_step(split_by_value, output_schema={"low": small, "high": small})
    with pytest.raises(StepFailed) as caught:
        pipeline.run(executor=executor)
    message = str(caught.value.__cause__)
    assert message.startswith("step 'split_by_value': output 'high' breaks its output_schema")
    assert caught.value.partition is None

    pipeline = Pipeline("split").add_source("rows", read_csv(os.path.join(tmp_path, "*.csv")))
    result = pipeline.add_step(split_by_value, output_schema={"low": small}).run(executor=executor)
    assert result["low"]["value"].max() < 20


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ("value >= 0", "output_schema must be a pandera schema"),
        ({"nope": NON_NEGATIVE}, re.escape("output_schema names ['nope'], which it does not produce")),
    ],
)
def test_a_bad_output_schema_is_refused_naming_the_step(schema, words) -> None:
    with pytest.raises(OptionError, match=words) as caught:
        step(lambda rows: rows, name="clean", inputs=["rows"], output_schema=schema)
    assert "'clean'" in str(caught.value)

"""Statuses and failure modes are string enums: members in results, plain strings in records."""

from __future__ import annotations

import json

import pytest

from flowyml import ParallelExecutor, Pipeline, PipelineError, step
from flowyml.status import OnFailure, Status


@step
def fine():
    return 1


@step
def broken():
    raise ValueError("no")


@step(inputs=["broken"])
def after(value):
    return value


def _run(on_failure):
    pipeline = Pipeline("statuses").add_step(fine).add_step(broken).add_step(after)
    return pipeline.run(executor=ParallelExecutor(backend="sync"), on_failure=on_failure, progress=False)


def test_step_and_task_statuses_are_members_equal_to_their_strings():
    result = _run("continue")
    statuses = {name: s.status for name, s in result.steps.items()}
    assert statuses == {"fine": Status.SUCCEEDED, "broken": Status.FAILED, "after": Status.SKIPPED}
    assert all(type(status) is Status for status in statuses.values())
    assert statuses == {"fine": "succeeded", "broken": "failed", "after": "skipped"}
    assert {t.step: t.status for t in result.tasks} == statuses
    assert all(type(t.status) is Status for t in result.tasks)


def test_records_hold_plain_strings():
    record = _run(OnFailure.CONTINUE).to_dict()
    assert {name: s["status"] for name, s in record["steps"].items()} == {
        "fine": "succeeded", "broken": "failed", "after": "skipped"}
    assert all(type(s["status"]) is str for s in record["steps"].values())
    assert all(type(t["status"]) is str for t in record["tasks"])
    assert json.loads(json.dumps(record))["steps"]["broken"]["status"] == "failed"


def test_on_failure_takes_strings_or_members_and_names_the_valid_ones():
    assert not _run(OnFailure.CONTINUE).success
    with pytest.raises(PipelineError, match=r"on_failure='carry on' is not one of 'raise', 'continue'"):
        _run("carry on")

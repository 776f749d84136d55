"""Tree reductions: ``split_every=k`` on a whole-dataset step, on every backend."""

from __future__ import annotations

import logging
import math
import os
import warnings

import pandas as pd
import pytest

from flowyml import ParallelExecutor, Pipeline, read_csv, step
from flowyml.exceptions import MemoryWarning, OptionError

from .pipelines import as_flowyml_reads, write_parts


@step(inputs=["rows"], outputs=["sums"])
def partial_sums(rows):
    """Sum and count per part: its output has the shape of its input's partial results."""
    if "count" not in rows:
        rows = rows.assign(count=1)
    return rows.groupby("part", as_index=False)[["value", "count"]].sum()


@step(inputs=["rows"], outputs=["sizes"], per_partition=True)
def size(rows):
    return len(rows)


@step(inputs=["sizes"], outputs=["total_rows"])
def add_up(sizes):
    return sum(sizes) if isinstance(sizes, list) else sizes


@step(inputs=["rows"], outputs=["top"])
def top_three(rows):
    return rows.nlargest(3, "value")


def _pipeline(folder, *steps, **options) -> Pipeline:
    pipeline = Pipeline("tree").add_source("rows", read_csv(os.path.join(folder, "*.csv")))
    for s in steps:
        pipeline.add_step(s, **options)
    return pipeline


def _expected_sums(parts) -> pd.DataFrame:
    frame = pd.concat(pd.DataFrame({"part": [p] * 3, "value": [p * 10 + i for i in range(3)]}) for p in parts)
    frame = as_flowyml_reads(frame)  # as the CSV source reads the parts: integers are Int64
    return frame.assign(count=1).groupby("part", as_index=False)[["value", "count"]].sum()


def test_a_tree_gives_the_answer_of_one_task_and_counts_its_tasks_under_the_step(executor, tmp_path) -> None:
    write_parts(tmp_path, range(10))
    tree = _pipeline(tmp_path, partial_sums, split_every=3).run(executor=executor)
    whole = _pipeline(tmp_path, partial_sums).run(executor=executor)

    expected = _expected_sums(range(10))
    pd.testing.assert_frame_equal(tree["sums"].reset_index(drop=True), expected)
    pd.testing.assert_frame_equal(whole["sums"].reset_index(drop=True), expected)
    # 10 partitions in groups of 3: 4 tasks, then 2, then the last one.
    assert tree.steps["partial_sums"].tasks == 7
    assert whole.steps["partial_sums"].tasks == 1
    assert [t.step for t in tree.tasks].count("partial_sums") == 7
    assert "tree: 7 tasks" in tree.summary()


def test_values_that_are_not_frames_arrive_as_lists_at_every_level(executor, tmp_path) -> None:
    write_parts(tmp_path, range(9))
    pipeline = _pipeline(tmp_path, size).add_step(add_up, split_every=2)
    result = pipeline.run(executor=executor)
    assert result["total_rows"] == 27
    assert result.steps["add_up"].tasks == 5 + 3 + 2 + 1  # 9 -> 5 -> 3 -> 2 -> 1


def test_a_step_shaped_like_its_input_needs_no_change(executor, tmp_path) -> None:
    write_parts(tmp_path, range(12))
    result = _pipeline(tmp_path, top_three, split_every=4).run(executor=executor)
    everything = pd.concat(pd.read_csv(tmp_path / f"part_{p:03d}.csv") for p in range(12))
    assert sorted(result["top"]["value"]) == sorted(everything.nlargest(3, "value")["value"])
    assert result.steps["top_three"].tasks == 3 + 1


def test_no_task_of_the_tree_has_more_than_k_dependencies(tmp_path) -> None:
    write_parts(tmp_path, range(50))
    pipeline = _pipeline(tmp_path, partial_sums, split_every=4)
    delayed = pipeline.to_delayed()["sums"]
    graph = dict(delayed.__dask_graph__())

    def dependencies(task) -> list:
        found = []
        for argument in task[1:]:
            found.extend(a for a in (argument if isinstance(argument, list) else [argument]) if a in graph)
        return found

    tree = {key: task for key, task in graph.items() if key == "partial_sums" or key[0] == "partial_sums"}
    assert len(tree) == 13 + 4 + 1  # 50 -> 13 -> 4 -> 1
    assert max(len(dependencies(task)) for task in tree.values()) == 4
    assert len(dependencies(graph["partial_sums"])) == 4


def test_at_most_k_partitions_run_as_one_task(executor, tmp_path) -> None:
    write_parts(tmp_path, range(4))
    result = _pipeline(tmp_path, partial_sums, split_every=4).run(executor=executor)
    assert result.steps["partial_sums"].tasks == 1
    pd.testing.assert_frame_equal(result["sums"].reset_index(drop=True), _expected_sums(range(4)))


def test_the_graph_picture_names_the_tree(tmp_path) -> None:
    write_parts(tmp_path, range(3))
    assert "partial_sums (split_every=3)" in _pipeline(tmp_path, partial_sums, split_every=3).to_mermaid()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"split_every": 1}, "split_every must be an int >= 2"),
        ({"split_every": True}, "split_every must be an int >= 2"),
        ({"split_every": 2.5}, "split_every must be an int >= 2"),
        ({"split_every": 4, "per_partition": True}, "a per_partition step already runs once per partition"),
        ({"split_every": 4, "outputs": ["a", "b"]}, "needs one output"),
    ],
)
def test_a_bad_split_every_is_refused_naming_the_step(options, words) -> None:
    with pytest.raises(OptionError, match=words) as caught:
        step(partial_sums.func, name="reduce", inputs=["rows"], **options)
    assert "'reduce'" in str(caught.value)


def test_one_new_partition_reruns_only_its_path_up_the_tree(executor, tmp_path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_parts(data, range(16))
    pipeline = Pipeline("tree", cache_dir=str(cache))
    pipeline.add_source("rows", read_csv(os.path.join(data, "*.csv"))).add_step(partial_sums, split_every=2)
    first = pipeline.run(executor=executor)
    assert first.steps["partial_sums"].tasks == 8 + 4 + 2 + 1

    write_parts(data, [16])
    rerun = pipeline.run(executor=executor)

    ran = [t for t in rerun.tasks if t.step == "partial_sums" and t.status != "cached"]
    # 17 partitions: 9 -> 5 -> 3 -> 2 -> 1 tasks; only the new partition's path runs.
    assert rerun.steps["partial_sums"].tasks == 9 + 5 + 3 + 2 + 1
    assert len(ran) <= math.ceil(math.log2(17)) + 1
    pd.testing.assert_frame_equal(rerun["sums"].reset_index(drop=True), _expected_sums(range(17)))


@pytest.mark.parametrize("backend", ["sync", "thread", "process", "distributed"])
def test_a_concat_over_the_memory_share_warns_naming_the_step_and_the_fix(
    backend, tmp_path, monkeypatch, caplog
) -> None:
    write_parts(tmp_path, range(8), rows=2000)  # about 32 kB a partition as pandas counts it
    # Set before the pool starts, so that worker processes see it as well.
    monkeypatch.setenv("FLOWYML_WORKER_MEMORY", "200kB")
    caplog.set_level(logging.WARNING, logger="flowyml")
    with ParallelExecutor(backend=backend, max_workers=2) as executor, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _pipeline(tmp_path, partial_sums).run(executor=executor)
        warned = [r.getMessage() for r in caplog.records if "concatenates" in r.getMessage()]
        assert len(warned) == 1, warned
        assert "step 'partial_sums' concatenates 8 partitions" in warned[0]
        assert "50% of a worker's 195.31 kiB" in warned[0]
        assert "per_partition=True" in warned[0] and "split_every=k" in warned[0]

        caplog.clear()
        _pipeline(tmp_path, partial_sums, split_every=2).run(executor=executor)
        assert not [r for r in caplog.records if "concatenates" in r.getMessage()]


def test_the_warning_is_a_python_warning_in_the_driver_process(tmp_path, monkeypatch) -> None:
    write_parts(tmp_path, range(4), rows=2000)
    monkeypatch.setenv("FLOWYML_WORKER_MEMORY", "50kB")
    with pytest.warns(MemoryWarning, match="step 'partial_sums' concatenates 4 partitions"):
        _pipeline(tmp_path, partial_sums).run(executor=ParallelExecutor(backend="sync"))


@step(inputs=["rows"], outputs=["low", "high"], per_partition=True)
def split_values(rows):
    return rows[rows["value"] % 10 == 0], rows[rows["value"] % 10 != 0]


def test_a_tree_over_one_output_of_a_multi_output_step(executor, tmp_path) -> None:
    write_parts(tmp_path, range(9))
    pipeline = _pipeline(tmp_path, split_values)
    pipeline.add_step(partial_sums, inputs=["high"], outputs=["high_sums"], split_every=3)
    result = pipeline.run(executor=executor)
    expected = _expected_sums(range(9))
    expected = expected.assign(value=expected["value"] - expected["part"] * 10, count=2)
    pd.testing.assert_frame_equal(result["high_sums"].reset_index(drop=True), expected)


def test_progress_counts_the_tree_under_the_step(executor, tmp_path, caplog) -> None:
    write_parts(tmp_path, range(10))
    caplog.set_level(logging.INFO, logger="flowyml")
    _pipeline(tmp_path, partial_sums, split_every=3).run(executor=executor)
    lines = [m for m in caplog.messages if m.startswith("step 'partial_sums' succeeded")]
    assert len(lines) == 1 and lines[0].startswith("step 'partial_sums' succeeded: 7 tasks in "), lines


def test_the_bytes_named_in_the_warning_are_what_pandas_counts() -> None:
    """The warning's total is ``memory_usage(index=True, deep=False)``'s, computed without its Series."""
    import pandas as pd

    from flowyml.memory import _shallow_bytes

    frame = pd.DataFrame({
        "n": range(5), "x": [0.5] * 5, "s": list("abcde"), "c": pd.Categorical(list("aabbc")),
        "t": pd.date_range("2024-01-01", periods=5, tz="UTC"), "o": [object(), 1, "x", None, 2.0],
    })
    shapes = [frame, frame.set_index(["s", "n"]), frame.rename(columns={"x": "n"}), frame["s"],
              frame.iloc[:0], frame.astype({"s": "string"})]
    for part in shapes:
        usage = part.memory_usage(index=True, deep=False)
        assert _shallow_bytes(part) == int(usage.sum() if hasattr(usage, "sum") else usage), part

"""Partitioned CSV/Parquet inputs through per-partition steps and sinks, on every backend."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from flowyml import DataError, Pipeline, StepFailed, read_csv, read_parquet, write_parquet

from . import pipelines

DATA = Path(__file__).resolve().parent.parent / "data"
CSV_FILES = sorted((DATA / "trips").glob("trips_*.csv"))
PARQUET_FILES = sorted((DATA / "trips_parquet").glob("*.parquet"))


@pytest.fixture(scope="module")
def expected() -> pd.Series:
    return pipelines.pandas_fare_by_zone([pipelines.pandas_read_csv(f) for f in CSV_FILES])


def test_csv_job_equals_pandas(executor, expected, tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")), tmp_path / "out")
    result = pipeline.run(executor=executor, progress=False)
    pd.testing.assert_series_equal(result["fare_by_zone"], expected)
    assert result.steps["clean"].partitions == len(CSV_FILES) == 6
    assert result.steps["clean"].per_partition
    written = result["write_parquet"]
    assert written == sorted(str(tmp_path / "out" / f"part-{i:05d}.parquet") for i in range(6))
    back = pd.concat(pd.read_parquet(p) for p in written)
    whole = pd.concat(pipelines.pandas_read_csv(f) for f in CSV_FILES).dropna(subset=["fare"])
    pd.testing.assert_frame_equal(back.reset_index(drop=True), whole.reset_index(drop=True))


def test_parquet_source_per_row_group(executor, expected):
    source = read_parquet(str(DATA / "trips_parquet"), split_row_groups=True)
    result = pipelines.trips_pipeline(source).run(executor=executor, progress=False)
    parquet_expected = pipelines.pandas_fare_by_zone([pd.read_parquet(f) for f in PARQUET_FILES])
    pd.testing.assert_series_equal(result["fare_by_zone"], parquet_expected)
    import pyarrow.parquet as pq

    groups = sum(pq.ParquetFile(f).num_row_groups for f in PARQUET_FILES)
    assert result.steps["clean"].partitions == groups > len(PARQUET_FILES)


def test_blocksize_splits_files_and_keeps_results(executor, expected):
    source = read_csv(str(DATA / "trips" / "trips_*.csv"), blocksize="64kB")
    pipeline = pipelines.trips_pipeline(source).add_step(pipelines.count_rows)
    result = pipeline.run(executor=executor, progress=False)
    pd.testing.assert_series_equal(result["fare_by_zone"], expected)
    sizes = [f.stat().st_size for f in CSV_FILES]
    # One partition per 64 kB (64,000 bytes) of each file: lines are far shorter than a block.
    assert result.steps["clean"].partitions == sum(math.ceil(s / 64_000) for s in sizes) > len(CSV_FILES)
    clean_rows = sum(len(pd.read_csv(f).dropna(subset=["fare"])) for f in CSV_FILES)
    assert sum(result["rows_per_partition"]) == clean_rows
    assert len(result["rows_per_partition"]) == result.steps["clean"].partitions


def test_partitions_keep_their_order_and_index(executor):
    pipeline = (
        Pipeline("tag")
        .add_source("trips", read_csv(str(DATA / "trips" / "trips_*.csv")))
        .add_step(pipelines.clean)
        .add_step(pipelines.tag_partition)
    )
    tagged = pipeline.run(executor=executor, progress=False)["tagged"]
    counts = tagged.groupby("partition").size()
    assert list(counts.index) == list(range(6))
    assert list(counts) == [len(pd.read_csv(f).dropna(subset=["fare"])) for f in CSV_FILES]
    assert tagged["partition"].is_monotonic_increasing


def test_run_inputs_replace_a_source(executor, tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")))
    one_month = read_csv(str(CSV_FILES[0]))
    result = pipeline.run({"trips": one_month}, executor=executor, progress=False)
    pd.testing.assert_series_equal(
        result["fare_by_zone"], pipelines.pandas_fare_by_zone([pipelines.pandas_read_csv(CSV_FILES[0])])
    )
    assert result.steps["clean"].partitions == 1


def test_glob_matching_nothing_fails_before_any_task(executor, tmp_path):
    marker = tmp_path / "ran"
    pipeline = pipelines.trips_pipeline(read_csv(str(tmp_path / "missing_*.csv")))
    pipeline.add_step(pipelines.touch, params={"path": str(marker)})  # independent of the source
    with pytest.raises(DataError, match=r"missing_\*\.csv"):
        pipeline.run(executor=executor, progress=False)
    assert not marker.exists()


def test_malformed_file_names_source_file_and_partition(executor, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in CSV_FILES[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    broken = folder / CSV_FILES[1].name
    broken.write_text(broken.read_text() + '7,"unterminated\n')
    pipeline = pipelines.trips_pipeline(read_csv(str(folder / "*.csv")))
    with pytest.raises(StepFailed) as info:
        pipeline.run(executor=executor, progress=False)
    assert info.value.step == "trips" and info.value.partition == 1
    assert broken.name in str(info.value)


def test_differing_columns_are_named(executor, tmp_path):
    pd.DataFrame({"a": [1], "fare": [2.0]}).to_csv(tmp_path / "x1.csv", index=False)
    pd.DataFrame({"b": [1], "fare": [2.0]}).to_csv(tmp_path / "x2.csv", index=False)
    pipeline = pipelines.trips_pipeline(read_csv(str(tmp_path / "x*.csv")))
    with pytest.raises(DataError, match=r"x1\.csv.*x2\.csv|x2\.csv.*x1\.csv"):
        pipeline.run(executor=executor, progress=False)


def failing_write(source, out: Path, bad: int) -> Pipeline:
    """Clean, fail on partition ``bad``, write the rest to ``out``."""
    return (
        Pipeline("failing_write")
        .add_source("trips", source)
        .add_step(pipelines.clean)
        .add_step(pipelines.fail_on_partition, params={"bad": bad})
        .add_step(write_parquet(out, input="checked"))
    )


def test_failed_write_leaves_previous_output_intact(executor, tmp_path):
    out = tmp_path / "out"
    source = read_csv(str(DATA / "trips" / "trips_*.csv"))
    good = pipelines.trips_pipeline(source, out).run(executor=executor, progress=False)
    before = {p: Path(p).read_bytes() for p in good["write_parquet"]}

    failing = failing_write(source, out, bad=4)
    with pytest.raises(StepFailed, match="partition 4"):
        failing.run(executor=executor, progress=False)
    after = sorted(str(p) for p in out.iterdir())
    assert after == sorted(before) and all(Path(p).read_bytes() == b for p, b in before.items())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert [name for name in leftovers if "staging" in name] == []


def test_failed_write_with_continue_skips_the_commit(executor, tmp_path):
    out = tmp_path / "out"
    source = read_csv(str(DATA / "trips" / "trips_*.csv"))
    failing = failing_write(source, out, bad=2)
    result = failing.run(executor=executor, on_failure="continue", progress=False)
    assert result.steps["fail_on_partition"].status == "failed"
    assert result.steps["write_parquet"].status == "skipped"
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if "staging" in p] == []

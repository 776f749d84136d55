"""Schemas: declared types checked per partition, and one set of dtypes per source without one.

The drifting month: six monthly files, ``passengers`` an integer in five and
text in one. Whatever the backend, the run fails naming the source, that
file, its partition, the column and both types; Parquet's before any task
runs, CSV's as that partition loads.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowyml import DataError, OptionError, ParallelExecutor, Pipeline, StepFailed, read_csv, read_parquet, step

from . import pipelines

MONTHS = [f"2024-{month:02d}" for month in range(1, 7)]
DRIFTING = "2024-04"  # the month whose passengers column is text
TEXT = str(pd.Series(["a"]).dtype)  # what pandas reads text as: "str" on pandas 3, "object" before


def month(name: str, rows: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(int(name.replace("-", "")))
    return pd.DataFrame({
        "trip_id": [f"{name}-{i:03d}" for i in range(rows)],
        "passengers": rng.integers(1, 5, rows),
        "fare": rng.uniform(3, 60, rows).round(2),
    })


def write_months(folder, fmt: str, change=None) -> None:
    """One file per month in ``folder`` (a path or URL); ``change(name, frame)`` alters a month."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    fs.makedirs(root, exist_ok=True)
    for name in MONTHS:
        frame = month(name)
        if change is not None:
            frame = change(name, frame)
        with fs.open(f"{root}/trips_{name}.{fmt}", "wb") as file:
            if fmt == "csv":
                file.write(frame.to_csv(index=False).encode())
            else:
                frame.to_parquet(file, index=False)


def drift(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    if name == DRIFTING:
        frame["passengers"] = frame["passengers"].map({1: "one", 2: "two", 3: "three", 4: "four"})
    return frame


def with_gap(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    if name == "2024-03":
        frame["passengers"] = frame["passengers"].astype("float64")
        frame.loc[5, "passengers"] = np.nan
    return frame


@step(inputs=["trips"], outputs=["dtypes"], per_partition=True)
def dtypes(trips: pd.DataFrame) -> pd.Series:
    """What each partition looked like as it reached the steps: one row a partition."""
    return trips.dtypes.astype(str).to_frame().T


@step(inputs=["trips"], outputs=["passengers"])
def passengers(trips: pd.DataFrame) -> pd.DataFrame:
    return trips[["trip_id", "passengers"]].reset_index(drop=True)


def job(source) -> Pipeline:
    return Pipeline("schemas").add_source("trips", source).add_step(dtypes).add_step(passengers)


def source_for(folder, fmt: str, **options):
    pattern = f"{folder}/trips_*.{fmt}"
    return read_csv(pattern, **options) if fmt == "csv" else read_parquet(pattern, **options)


# -- without a declared schema -----------------------------------------------------------


def test_a_drifting_csv_month_fails_naming_its_file_and_column(executor, tmp_path):
    write_months(tmp_path, "csv", drift)
    with pytest.raises(StepFailed) as info:
        job(source_for(tmp_path, "csv")).run(executor=executor, progress=False)
    assert info.value.step == "trips" and info.value.partition == MONTHS.index(DRIFTING)
    message = str(info.value)
    assert f"trips_{DRIFTING}.csv" in message and "partition 3" in message
    assert f"column 'passengers' is {TEXT}" in message and "expected Int64" in message
    assert "trips_2024-01.csv" in message  # where the expected type came from
    assert isinstance(info.value.__cause__, DataError)


def test_a_drifting_parquet_month_fails_at_planning_before_any_task(executor, tmp_path):
    write_months(tmp_path, "parquet", drift)
    marker = tmp_path / "ran"
    pipeline = job(source_for(tmp_path, "parquet")).add_step(pipelines.touch, params={"path": str(marker)})
    with pytest.raises(DataError, match=rf"source 'trips': partition 3, \S*trips_{DRIFTING}\.parquet: "
                                        r"column 'passengers' is string, expected int64 as in \S*trips_2024-01"):
        pipeline.run(executor=executor, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_integer_column_missing_a_value_in_one_file_has_one_dtype_everywhere(executor, tmp_path, fmt):
    write_months(tmp_path, fmt, with_gap)
    result = job(source_for(tmp_path, fmt)).run(executor=executor, progress=False)
    seen = set(result["dtypes"]["passengers"])
    # CSV cannot know at planning that a later file has a gap: integers are Int64 in every
    # partition. Parquet's footers say so: pyarrow's unification, float64 as pandas reads it.
    assert seen == {"Int64" if fmt == "csv" else "float64"}
    expected = pd.concat([with_gap(name, month(name)) for name in MONTHS], ignore_index=True)[["trip_id", "passengers"]]
    pd.testing.assert_frame_equal(result["passengers"], expected.astype({"passengers": seen.pop()}))


def test_parquet_int32_and_int64_files_unify_to_int64(tmp_path):
    for number, arrow_type in enumerate([pa.int32(), pa.int64(), pa.int32()]):
        table = pa.table({"n": pa.array([1, 2, 3], type=arrow_type), "x": pa.array([1.0, 2.0, 3.0])})
        pq.write_table(table, tmp_path / f"f{number}.parquet")
    parts = read_parquet(str(tmp_path)).partitions()
    assert [str(part.load()["n"].dtype) for part in parts] == ["int64"] * 3
    # int against float is compatible too: float64, as pyarrow's permissive promotion says.
    pq.write_table(pa.table({"n": pa.array([1.5]), "x": pa.array([1.0])}), tmp_path / "f3.parquet")
    assert {str(part.load()["n"].dtype) for part in read_parquet(str(tmp_path)).partitions()} == {"float64"}


def test_parquet_row_groups_with_and_without_gaps_agree(tmp_path):
    frame = pd.DataFrame({"n": pd.array([1, 2, None, 4], dtype="Int64")})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None),
                   tmp_path / "f.parquet", row_group_size=2)
    parts = read_parquet(str(tmp_path), split_row_groups=True).partitions()
    assert [str(part.load()["n"].dtype) for part in parts] == ["float64", "float64"]


def test_a_csv_date_column_turning_to_text_is_named(tmp_path):
    for number, value in enumerate(["2024-01-02", "2024-01-03", "soon"]):
        (tmp_path / f"d{number}.csv").write_text(f"id,when\n{number},{value}\n")
    source = read_csv(str(tmp_path / "d*.csv"), parse_dates=["when"])
    source.name = "days"
    parts = source.partitions()
    assert str(parts[0].load()["when"].dtype).startswith("datetime64")
    with pytest.raises(DataError,
                       match=rf"'days': partition 2, \S*d2\.csv: column 'when' is {TEXT}.*expected datetime64"):
        parts[2].load()


def test_a_number_in_a_column_sampled_as_text_is_named(tmp_path):
    (tmp_path / "a.csv").write_text("id,code\n1,A7\n")
    (tmp_path / "b.csv").write_text("id,code\n2,17\n")
    parts = read_csv(str(tmp_path / "*.csv")).partitions()
    with pytest.raises(DataError, match=rf"b\.csv: column 'code' is int64, expected {TEXT}"):
        parts[1].load()


def test_a_file_without_rows_does_not_make_every_column_text(tmp_path):
    (tmp_path / "a.csv").write_text("id,fare\n")
    (tmp_path / "b.csv").write_text("id,fare\n2,3.5\n")
    frames = [part.load() for part in read_csv(str(tmp_path / "*.csv")).partitions()]
    assert [str(frame["id"].dtype) for frame in frames] == ["Int64", "Int64"]
    assert [str(frame["fare"].dtype) for frame in frames] == ["float64", "float64"]


def test_a_column_empty_in_the_sample_is_text_in_every_partition(tmp_path):
    (tmp_path / "a.csv").write_text("id,note\n1,\n")
    (tmp_path / "b.csv").write_text("id,note\n2,007\n")
    frames = [part.load() for part in read_csv(str(tmp_path / "*.csv")).partitions()]
    assert frames[0]["note"].dtype == frames[1]["note"].dtype
    assert frames[1]["note"].tolist() == ["007"]  # read as text: nothing parsed away


# -- declared ----------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [{"passengers": "int64"}, pa.schema([pa.field("passengers", pa.int64(), False)])])
def test_a_declared_parquet_type_is_checked_from_the_footers(executor, tmp_path, schema):
    write_months(tmp_path, "parquet", drift)
    marker = tmp_path / "ran"
    pipeline = job(source_for(tmp_path, "parquet", schema=schema))
    pipeline.add_step(pipelines.touch, params={"path": str(marker)})
    with pytest.raises(DataError, match=rf"'trips': partition 3, \S*trips_{DRIFTING}\.parquet: column 'passengers' "
                                        r"is string, expected int64 \(declared\)"):
        pipeline.run(executor=executor, progress=False)
    assert not marker.exists()


def test_a_declared_parquet_type_that_cannot_hold_a_gap_is_named(tmp_path):
    def int_gap(name: str, frame: pd.DataFrame) -> pd.DataFrame:
        frame["passengers"] = frame["passengers"].astype("Int64").mask(frame.index == 5) if name == "2024-03" else \
            frame["passengers"]
        return frame

    write_months(tmp_path, "parquet", int_gap)
    with pytest.raises(DataError, match=r"trips_2024-03\.parquet: column 'passengers' is int64 with missing values, "
                                        r"expected int64"):
        read_parquet(str(tmp_path), schema={"passengers": "int64"}).partitions()
    with pytest.raises(DataError, match=r"trips_2024-01\.parquet: column 'driver' is missing; "
                                        rf"the schema declares it {TEXT}"):
        read_parquet(str(tmp_path), schema={"passengers": "float64", "driver": "str"}).partitions()


def test_declared_types_reach_the_steps_on_every_backend(executor, tmp_path):
    write_months(tmp_path, "parquet")
    write_months(tmp_path / "csv", "csv")
    declared = {"passengers": "float64", "trip_id": "string"}
    parquet = job(source_for(tmp_path, "parquet", schema=declared)).run(executor=executor, progress=False)
    csv = job(source_for(tmp_path / "csv", "csv", dtype=declared)).run(executor=executor, progress=False)
    for result in (parquet, csv):
        assert set(zip(result["dtypes"]["trip_id"], result["dtypes"]["passengers"])) == {("string", "float64")}
    pd.testing.assert_frame_equal(parquet["passengers"], csv["passengers"])


def test_a_csv_value_that_does_not_parse_as_declared_gives_its_line(executor, tmp_path):
    write_months(tmp_path, "csv", drift)
    with pytest.raises(StepFailed) as info:
        job(source_for(tmp_path, "csv", schema={"passengers": "int64"})).run(executor=executor, progress=False)
    message = str(info.value)
    first = month(DRIFTING)["passengers"].map({1: "one", 2: "two", 3: "three", 4: "four"})[0]
    assert (f"partition 3, {tmp_path / f'trips_{DRIFTING}.csv'}: column 'passengers' has {first!r} at line 2, "
            "expected int64 (declared)") in message


@pytest.mark.parametrize("blocksize", [None, 60])
def test_the_line_counts_blank_lines_quoted_breaks_and_earlier_blocks(tmp_path, blocksize):
    path = tmp_path / "t.csv"
    lines = ["id,name,n", "1,a,1", "", "2,b,2"] + [f"{i},x,{i}" for i in range(3, 12)] + ["12,y,twelve", "13,z,13"]
    path.write_text("\n".join(lines) + "\n")
    parts = read_csv(str(path), blocksize=blocksize, schema={"n": "int64"}).partitions()
    assert (len(parts) > 1) == bool(blocksize)
    with pytest.raises(DataError, match=r"column 'n' has 'twelve' at line 14, expected int64 \(declared\)"):
        for part in parts:
            part.load()
    # A quoted field spanning two lines moves the line on, as it moves the file on.
    path.write_text('id,name,n\n1,"two\nlines",1\n2,"c\nd",two\n')
    with pytest.raises(DataError, match=r"'two' at line 4"):
        read_csv(str(path), dtype={"n": "int64"}).partitions()[0].load()


def test_a_declared_csv_date_that_does_not_parse_gives_its_line(tmp_path):
    (tmp_path / "d.csv").write_text("id,when\n1,2024-01-02\n2,2024-01-03\n3,someday\n")
    part = read_csv(str(tmp_path / "d.csv"), schema={"when": "datetime64[ns]"}).partitions()[0]
    with pytest.raises(DataError, match=rf"column 'when' is {TEXT}, expected datetime64\[ns\] \(declared\) "
                                        r"\(first at line 4: 'someday'\)"):
        part.load()
    (tmp_path / "d.csv").write_text("id,when\n1,2024-01-02\n")
    assert str(read_csv(str(tmp_path / "d.csv"), schema={"when": "datetime64[ns]"}).partitions()[0].load()["when"]
               .dtype) == "datetime64[ns]"


def test_declaring_twice_or_nonsense_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="schema= or dtype=, not both"):
        read_csv("x.csv", schema={"a": int}, dtype={"a": int})
    with pytest.raises(OptionError, match="schema= or dtype=, not both"):
        read_parquet("x.parquet", schema={"a": int}, dtype={"a": int})
    with pytest.raises(OptionError, match=r"takes a mapping of column to dtype or a pyarrow\.Schema"):
        read_csv("x.csv", schema=["a"])
    with pytest.raises(OptionError, match=r"type 'integer-ish' of column 'a'"):
        read_parquet("x.parquet", schema={"a": "integer-ish"})


# -- the cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_declared_schema_is_part_of_a_partitions_identity(tmp_path, fmt):
    write_months(tmp_path, fmt)
    plain = source_for(tmp_path, fmt).partitions()
    declared = source_for(tmp_path, fmt, schema={"passengers": "float64"}).partitions()
    again = source_for(tmp_path, fmt, schema={"passengers": "float64"}).partitions()
    assert [p.identity() for p in declared] == [p.identity() for p in again]
    assert not {p.identity() for p in plain} & {p.identity() for p in declared}


def test_a_new_file_that_changes_the_unified_type_changes_every_identity(tmp_path):
    write_months(tmp_path, "parquet")
    before = read_parquet(str(tmp_path)).partitions()
    with_gap("2024-03", month("2024-07")).to_parquet(tmp_path / "trips_2024-07.parquet", index=False)
    after = read_parquet(str(tmp_path)).partitions()
    # Every month now reads passengers as float64: a cached int64 partition must not be reused.
    assert not {p.identity() for p in before} & {p.identity() for p in after}


def test_a_cached_rerun_reads_the_unified_type(tmp_path):
    data = tmp_path / "data"
    write_months(data, "parquet")
    pipeline = Pipeline("cached", cache_dir=tmp_path / "cache").add_source("trips", read_parquet(str(data)))
    pipeline.add_step(dtypes)
    first = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    assert set(first["dtypes"]["passengers"]) == {"int64"}
    with_gap("2024-03", month("2024-07")).to_parquet(data / "trips_2024-07.parquet", index=False)
    rerun = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    assert set(rerun["dtypes"]["passengers"]) == {"float64"}
    assert rerun.steps["dtypes"].status == "succeeded"  # recomputed, not served from the cache


# -- on an object store ------------------------------------------------------------------


def test_drift_is_named_on_s3_for_parquet_and_csv(executor, bucket):
    write_months(f"{bucket}/parquet", "parquet", drift)
    write_months(f"{bucket}/csv", "csv", drift)
    with pytest.raises(DataError, match=rf"partition 3, {bucket}/parquet/trips_{DRIFTING}\.parquet: "
                                        r"column 'passengers' is string"):
        job(source_for(f"{bucket}/parquet", "parquet")).run(executor=executor, progress=False)
    with pytest.raises(StepFailed, match=rf"partition 3, {bucket}/csv/trips_{DRIFTING}\.csv: "
                                         rf"column 'passengers' is {TEXT}, expected Int64"):
        job(source_for(f"{bucket}/csv", "csv")).run(executor=executor, progress=False)
    with pytest.raises(StepFailed, match=rf"trips_{DRIFTING}\.csv: column 'passengers' has '\w+' at line 2"):
        job(source_for(f"{bucket}/csv", "csv", schema={"passengers": "int64"})).run(executor=executor, progress=False)


def test_unified_types_on_s3_equal_local_ones(executor, bucket, tmp_path):
    results = []
    for root in (f"{bucket}/gap", str(tmp_path)):
        write_months(root, "csv", with_gap)
        results.append(job(source_for(root, "csv")).run(executor=executor, progress=False)["passengers"])
    pd.testing.assert_frame_equal(*results)
    assert str(results[0]["passengers"].dtype) == "Int64"

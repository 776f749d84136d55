"""Delta Lake tables: write_delta commits a run's files in one transaction, read_delta reads a version.

Every behaviour runs on every backend and must give the same table. What
flowyml wrote is read back by the ``deltalake`` package itself and by
DuckDB; two runs writing one table at once are made to overlap
deterministically (one run's step waits for the other's commit), never by
sleeping. The S3 tests use the moto server of ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import threading

import pandas as pd
import pytest

from flowyml import (
    CommitConflictError,
    OptionError,
    ParallelExecutor,
    Pipeline,
    StepFailed,
    read_delta,
    read_parquet,
    step,
    write_delta,
)

deltalake = pytest.importorskip("deltalake")


def monthly_files(folder, months: range, rows: int = 4) -> str:
    """One Parquet file per month in ``folder``: the run's partitions."""
    os.makedirs(folder, exist_ok=True)
    for month in months:
        pd.DataFrame({
            "month": [month] * rows,
            "city": [["paris", "oslo"][i % 2] for i in range(rows)],
            "fare": [float(month * 100 + i) for i in range(rows)],
        }).to_parquet(os.path.join(folder, f"month={month:02d}.parquet"))
    return str(folder)


@step(inputs=["trips"], per_partition=True)
def enrich(trips: pd.DataFrame) -> pd.DataFrame:
    return trips.assign(tip=trips["fare"] / 10)


def delta_pipeline(table: str, *, mode: str = "append", partition_by=None, **options) -> Pipeline:
    pipeline = Pipeline("to_delta")
    pipeline.add_step(enrich)
    pipeline.add_step(write_delta(table, input="enrich", mode=mode, partition_by=partition_by, **options))
    return pipeline


def table_rows(table: str, version: int | None = None, storage_options=None) -> pd.DataFrame:
    frame = deltalake.DeltaTable(table, version=version, storage_options=storage_options).to_pandas()
    return frame.sort_values(["month", "fare"]).reset_index(drop=True)


def expected(months: range, times: int = 1) -> pd.DataFrame:
    frames = [pd.read_parquet(_made[month]) for month in months]
    one = pd.concat(frames).assign(tip=lambda f: f["fare"] / 10)
    return pd.concat([one] * times).sort_values(["month", "fare"]).reset_index(drop=True)


_made: dict[int, str] = {}  # month -> its file, for expected()


@pytest.fixture
def months(tmp_path):
    """Two folders of monthly files: January-March and April-May."""
    first = monthly_files(tmp_path / "q1", range(1, 4))
    second = monthly_files(tmp_path / "q2", range(4, 6))
    for month in range(1, 6):
        _made[month] = str(tmp_path / ("q1" if month < 4 else "q2") / f"month={month:02d}.parquet")
    return first, second


def test_append_twice_then_overwrite_on_every_backend(executor, months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    result = delta_pipeline(table).run(inputs={"trips": read_parquet(first)}, executor=executor, progress=False)
    assert result["write_delta"].version == 0 and len(result["write_delta"].files) == 3
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=executor, progress=False)
    pd.testing.assert_frame_equal(table_rows(table), expected(range(1, 6)))

    result = delta_pipeline(table, mode="overwrite").run(inputs={"trips": read_parquet(second)},
                                                         executor=executor, progress=False)
    assert result["write_delta"].version == 2
    pd.testing.assert_frame_equal(table_rows(table), expected(range(4, 6)))
    # Time travel: the version after the first run still holds January-March.
    pd.testing.assert_frame_equal(table_rows(table, version=0), expected(range(1, 4)))


def test_read_delta_reads_a_version_file_by_file_on_every_backend(executor, months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(first)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)

    @step(inputs=["table"], per_partition=True)
    def fares(table: pd.DataFrame) -> pd.DataFrame:
        return table[["month", "fare"]]

    pipeline = Pipeline("from_delta").add_step(fares)
    newest = pipeline.run(inputs={"table": read_delta(table)}, executor=executor, progress=False)
    assert newest.steps["fares"].partitions == 5  # one per data file
    older = pipeline.run(inputs={"table": read_delta(table, version=0)}, executor=executor, progress=False)
    assert older.steps["fares"].partitions == 3
    got = older["fares"].sort_values(["month", "fare"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected(range(1, 4))[["month", "fare"]])


def test_partition_by_writes_hive_folders_read_back_as_columns(executor, months, tmp_path):
    first, _ = months
    table = str(tmp_path / "trips")
    delta_pipeline(table, partition_by="city").run(inputs={"trips": read_parquet(first)}, executor=executor,
                                                   progress=False)
    assert sorted(name for name in os.listdir(table) if not name.startswith("_")) == ["city=oslo", "city=paris"]
    assert deltalake.DeltaTable(table).metadata().partition_columns == ["city"]
    want = expected(range(1, 4))
    pd.testing.assert_frame_equal(table_rows(table)[list(want.columns)], want)

    pipeline = Pipeline("from_delta").add_step(step(lambda table: table, name="same", inputs=["table"],
                                                    per_partition=True))
    got = pipeline.run(inputs={"table": read_delta(table)}, executor=executor, progress=False)["same"]
    got = got.sort_values(["month", "fare"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[list(want.columns)], want)


@step(inputs=["trips"], per_partition=True)
def unwritable_march(trips: pd.DataFrame) -> pd.DataFrame:
    if (trips["month"] == 3).any():  # numbers and text in one column: Parquet cannot write it
        return trips.assign(fare=[1.5, "n/a"] * (len(trips) // 2))
    return trips


@step(inputs=["trips"], per_partition=True)
def march_as_text(trips: pd.DataFrame) -> pd.DataFrame:
    if (trips["month"] == 3).any():  # written, but the partitions disagree: the commit refuses them
        return trips.assign(fare=trips["fare"].astype(str))
    return trips


def failing_run(table: str, step_name, executor, first: str) -> StepFailed:
    pipeline = Pipeline("fails").add_step(step_name)
    pipeline.add_step(write_delta(table, input=step_name.name))
    with pytest.raises(StepFailed) as caught:
        pipeline.run(inputs={"trips": read_parquet(first)}, executor=executor, progress=False)
    return caught.value


def test_a_run_failing_mid_write_commits_nothing(executor, months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=executor, progress=False)
    error = failing_run(table, unwritable_march, executor, first)
    assert "write_delta" in str(error)
    assert deltalake.DeltaTable(table).version() == 0
    pd.testing.assert_frame_equal(table_rows(table), expected(range(4, 6)))


def test_a_failed_commit_commits_nothing_and_removes_the_runs_files(executor, months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=executor, progress=False)
    before = sorted(os.listdir(table))
    error = failing_run(table, march_as_text, executor, first)
    assert "partitions have different columns or types" in str(error)
    assert deltalake.DeltaTable(table).version() == 0
    pd.testing.assert_frame_equal(table_rows(table), expected(range(4, 6)))
    assert sorted(os.listdir(table)) == before  # the three files the run wrote are gone


def test_data_that_does_not_match_the_table_is_refused_whole(months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    sync = ParallelExecutor(backend="sync")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=sync, progress=False)
    text_fares = Pipeline("text").add_step(step(lambda trips: trips.assign(fare=trips["fare"].astype(str)),
                                                name="text_fares", inputs=["trips"], per_partition=True))
    text_fares.add_step(write_delta(table, input="text_fares"))
    with pytest.raises(StepFailed, match=r"does not match the Delta table .*'fare': \('double', 'string'\)"):
        text_fares.run(inputs={"trips": read_parquet(first)}, executor=sync, progress=False)
    assert deltalake.DeltaTable(table).version() == 0
    pd.testing.assert_frame_equal(table_rows(table), expected(range(4, 6)))


def test_the_cache_counts_a_delta_source_by_its_version(months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    sync = ParallelExecutor(backend="sync")
    delta_pipeline(table).run(inputs={"trips": read_parquet(first)}, executor=sync, progress=False)

    @step(inputs=["table"], per_partition=True)
    def count(table: pd.DataFrame) -> int:
        return len(table)

    pipeline = Pipeline("cached", cache_dir=str(tmp_path / "cache")).add_step(count)

    def computed() -> int:
        result = pipeline.run(inputs={"table": read_delta(table)}, executor=sync, progress=False)
        return sum(1 for task in result.tasks if task.step == "count" and task.status == "succeeded")

    assert computed() == 3
    assert computed() == 0  # the same version: every partition from the cache
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=sync, progress=False)
    assert computed() == 5  # a new version is new data, its old files included


def test_write_delta_is_never_served_from_the_cache(months, tmp_path):
    first, _ = months
    table = str(tmp_path / "trips")
    pipeline = Pipeline("cached_sink", cache_dir=str(tmp_path / "cache"))
    pipeline.add_step(enrich).add_step(write_delta(table, input="enrich"))
    for _ in range(2):
        pipeline.run(inputs={"trips": read_parquet(first)}, executor=ParallelExecutor(backend="sync"),
                     progress=False)
    assert len(table_rows(table)) == 2 * 12  # the second append happened


def run_in_thread(pipeline: Pipeline, inputs: dict) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = pipeline.run(inputs=inputs, executor=ParallelExecutor(backend="sync"),
                                             progress=False)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def overlapping_runs(table: str, mode: str, first: str, second: str) -> dict:
    """Run A begins, writes its files and waits; run B runs whole; then A commits. A's outcome."""
    started, other_done = threading.Event(), threading.Event()

    @step(inputs=["trips"], per_partition=True)
    def wait_for_the_other(trips: pd.DataFrame) -> pd.DataFrame:
        started.set()
        assert other_done.wait(60)
        return trips.assign(tip=trips["fare"] / 10)

    slow = Pipeline("slow").add_step(wait_for_the_other)
    slow.add_step(write_delta(table, input="wait_for_the_other", mode=mode))
    thread, outcome = run_in_thread(slow, {"trips": read_parquet(first)})
    assert started.wait(60)
    try:
        delta_pipeline(table, mode=mode).run(inputs={"trips": read_parquet(second)},
                                             executor=ParallelExecutor(backend="sync"), progress=False)
    finally:
        other_done.set()
        thread.join(60)
    return outcome


def test_two_appends_at_once_both_land(months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)  # the table exists: both runs append to version 0
    outcome = overlapping_runs(table, "append", first, second)
    assert "error" not in outcome, outcome.get("error")
    want = pd.concat([expected(range(1, 4)), expected(range(4, 6), times=2)])
    pd.testing.assert_frame_equal(table_rows(table), want.sort_values(["month", "fare"]).reset_index(drop=True))


def test_appends_racing_to_create_the_table_all_land(months, tmp_path):
    first, _ = months
    table = str(tmp_path / "trips")
    runs = [run_in_thread(delta_pipeline(table), {"trips": read_parquet(first)}) for _ in range(3)]
    for thread, _ in runs:
        thread.join(120)
    assert [outcome.get("error") for _, outcome in runs] == [None] * 3
    pd.testing.assert_frame_equal(table_rows(table), expected(range(1, 4), times=3))


def test_two_overwrites_at_once_one_fails_clearly(months, tmp_path):
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)
    outcome = overlapping_runs(table, "overwrite", first, second)
    error = outcome.get("error")
    assert isinstance(error, StepFailed) and isinstance(error.__cause__, CommitConflictError), error
    message = str(error)
    assert "trips" in message and "overwrite" in message and "run the pipeline again" in message
    # The winner's rows, whole; the loser added nothing.
    assert deltalake.DeltaTable(table).version() == 1
    pd.testing.assert_frame_equal(table_rows(table), expected(range(4, 6)))


def test_bad_options_name_the_sink_and_the_fix(tmp_path):
    with pytest.raises(OptionError, match=r"write_delta\('.*t'\): unknown mode 'upsert'; use mode='append'"):
        write_delta(str(tmp_path / "t"), input="clean", mode="upsert")
    with pytest.raises(OptionError, match=r"needs input='<asset name>'"):
        write_delta(str(tmp_path / "t"), input="")
    with pytest.raises(OptionError, match="version must be a table version"):
        read_delta(str(tmp_path / "t"), version=-1)

    pipeline = Pipeline("not_frames").add_step(step(lambda: [1, 2], name="numbers"))
    pipeline.add_step(write_delta(str(tmp_path / "t"), input="numbers", name="save"))
    with pytest.raises(StepFailed, match=r"sink 'save'.*writes pandas DataFrames or Series, got list"):
        pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)


def test_partition_by_must_match_the_table(months, tmp_path):
    first, _ = months
    table = str(tmp_path / "trips")
    sync = ParallelExecutor(backend="sync")
    delta_pipeline(table, partition_by=["city"]).run(inputs={"trips": read_parquet(first)}, executor=sync,
                                                     progress=False)
    with pytest.raises(OptionError, match=r"partitioned by \['city'\], not \['month'\]; pass partition_by=\['city'\]"):
        delta_pipeline(table, partition_by=["month"]).run(inputs={"trips": read_parquet(first)}, executor=sync,
                                                          progress=False)


def test_read_delta_of_a_folder_without_a_table_says_so(tmp_path):
    from flowyml import DataError

    pipeline = Pipeline("nothing").add_step(step(lambda table: table, name="same", inputs=["table"]))
    with pytest.raises(DataError, match="is not a Delta table"):
        pipeline.run(inputs={"table": read_delta(str(tmp_path))}, executor=ParallelExecutor(backend="sync"))


def test_duckdb_reads_what_flowyml_wrote(months, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table, partition_by="city").run(inputs={"trips": read_parquet(first)},
                                                   executor=ParallelExecutor(backend="sync"), progress=False)
    delta_pipeline(table, mode="overwrite", partition_by="city").run(
        inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"), progress=False)
    connection = duckdb.connect()
    try:
        connection.execute("INSTALL delta; LOAD delta;")
        query = f"SELECT month, city, fare, tip FROM delta_scan('{table}')"
    except duckdb.Error:
        # The delta extension is downloaded on first use; offline, DuckDB reads the
        # files the Delta log lists (the ones of the newest version), Hive columns included.
        files = deltalake.DeltaTable(table).file_uris()
        query = f"SELECT month, city, fare, tip FROM read_parquet({files!r}, hive_partitioning = true)"
    got = connection.execute(query).df().sort_values(["month", "fare"]).reset_index(drop=True)
    want = expected(range(4, 6))[["month", "city", "fare", "tip"]]
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_append_and_read_on_s3(executor, months, bucket):
    first, second = months
    table = f"{bucket}/lake/trips"
    delta_pipeline(table).run(inputs={"trips": read_parquet(first)}, executor=executor, progress=False)
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=executor, progress=False)
    options = {"AWS_ALLOW_HTTP": "true"}
    pd.testing.assert_frame_equal(table_rows(table, storage_options=options), expected(range(1, 6)))

    pipeline = Pipeline("from_s3").add_step(step(lambda table: table, name="same", inputs=["table"],
                                                 per_partition=True))
    got = pipeline.run(inputs={"table": read_delta(table, version=0)}, executor=executor, progress=False)["same"]
    pd.testing.assert_frame_equal(got.sort_values(["month", "fare"]).reset_index(drop=True),
                                  expected(range(1, 4)))


def test_overwrites_at_once_on_s3_one_fails(months, bucket):
    first, second = months
    table = f"{bucket}/lake/trips"
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)
    outcome = overlapping_runs(table, "overwrite", first, second)
    assert isinstance(outcome.get("error"), StepFailed)
    assert isinstance(outcome["error"].__cause__, CommitConflictError)
    outcome = overlapping_runs(table, "append", first, second)
    assert "error" not in outcome, outcome.get("error")
    assert deltalake.DeltaTable(table, storage_options={"AWS_ALLOW_HTTP": "true"}).version() == 3


def test_an_append_that_finds_the_table_created_under_it_commits_into_it(months, tmp_path, monkeypatch):
    from flowyml.io.delta import DeltaTableLocation

    first, second = months
    table = str(tmp_path / "trips")
    delta_pipeline(table).run(inputs={"trips": read_parquet(second)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)
    real_load, calls = DeltaTableLocation.load, []

    def load_missing_once(self, version=None):
        calls.append(version)
        # The commit's first look finds no table (another run creates it just after): it
        # tries to create it, is told it exists, and appends on the next round.
        return None if len(calls) == 2 else real_load(self, version)

    monkeypatch.setattr(DeltaTableLocation, "load", load_missing_once)
    delta_pipeline(table).run(inputs={"trips": read_parquet(first)}, executor=ParallelExecutor(backend="sync"),
                              progress=False)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(table_rows(table), expected(range(1, 6)))


def test_s3fs_options_are_translated_for_delta_rs_and_never_shown():
    from flowyml.io.delta import DeltaTableLocation

    secret = "flowyml/delta+leak/check0123456789"
    options = {"key": "AKIAFLOWYMLDELTA", "secret": secret, "endpoint_url": "http://127.0.0.1:9000",
               "AWS_S3_LOCKING_PROVIDER": "dynamodb"}
    location = DeltaTableLocation("s3://lake/trips", options, who="sink 'write_delta'")
    assert location.delta_options() == {
        "AWS_ACCESS_KEY_ID": "AKIAFLOWYMLDELTA", "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true", "AWS_S3_LOCKING_PROVIDER": "dynamodb",
    }
    assert location.fsspec_options() == {key: options[key] for key in ("key", "secret", "endpoint_url")}
    sink = write_delta("s3://lake/trips", input="clean", storage_options=options)
    source = read_delta("s3://lake/trips", storage_options=options)
    for shown in (repr(sink.func), repr(sink.finalize), repr(source), repr(location)):
        assert secret not in shown and "AKIAFLOWYMLDELTA" not in shown

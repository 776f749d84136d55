"""The partitioned-data layer: sources plan partitions, partitions load, sinks commit whole."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import sys
import threading
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowyml.context import TaskContext, running
from flowyml.exceptions import DataError, OptionError
from flowyml.io import (
    CsvSource,
    ParquetSource,
    abort_output,
    commit_output,
    read_csv,
    read_parquet,
    sinks,
    write_parquet,
    write_partition,
)

from .pipelines import pandas_read_csv

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


def trips_frame(rows: int, seed: int) -> pd.DataFrame:
    """Realistic mixed types: ints, floats with gaps, dates, strings with commas and quotes."""
    rng = np.random.default_rng(seed)
    fare = rng.uniform(3, 80, rows).round(2)
    fare[rng.random(rows) < 0.1] = np.nan
    return pd.DataFrame({
        "trip_id": np.arange(rows) + seed * 1000,
        "pickup_at": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 86400 * 30, rows), unit="s"),
        "zone": rng.choice(["Midtown, East", 'The "Village"', "JFK Airport", "Astoria"], rows),
        "passengers": rng.integers(0, 6, rows),
        "fare": fare,
        "payment_type": rng.choice(["card", "cash", None], rows, p=[0.6, 0.3, 0.1]),
    })


@pytest.fixture
def csv_files(tmp_path: Path) -> list[Path]:
    """Three monthly CSV files, written by pandas (so quoted fields are quoted)."""
    directory = tmp_path / "trips"
    directory.mkdir()
    paths = []
    for month, rows in zip((3, 1, 2), (40, 25, 60)):  # written out of order on purpose
        path = directory / f"trips_2024-0{month}.csv"
        trips_frame(rows, seed=month).to_csv(path, index=False)
        paths.append(path)
    return sorted(paths)


@pytest.fixture
def parquet_files(tmp_path: Path) -> list[Path]:
    directory = tmp_path / "trips_parquet"
    directory.mkdir()
    paths = []
    for month, rows in ((1, 50), (2, 35)):
        path = directory / f"trips_2024-0{month}.parquet"
        trips_frame(rows, seed=month).to_parquet(path, row_group_size=20)
        paths.append(path)
    path = directory / "trips_2024-03.parquet"  # a month without trips: a schema, no row group
    pq.ParquetWriter(path, pa.Schema.from_pandas(trips_frame(5, seed=3))).close()
    return [*paths, path]


def concat(frames) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def load_all(source) -> pd.DataFrame:
    return concat(part.load() for part in source.partitions())


# --------------------------------------------------------------------------- declaring


def test_declaring_a_source_touches_no_file(tmp_path):
    source = read_csv(tmp_path / "nothing_here_*.csv", blocksize="64MB", sep=";")
    assert isinstance(source, CsvSource)
    assert source.blocksize == 64_000_000
    assert repr(source) == f"read_csv({str(tmp_path / 'nothing_here_*.csv')!r}, blocksize=64000000, sep=';')"
    assert isinstance(read_parquet(tmp_path / "nope"), ParquetSource)


@pytest.mark.parametrize("blocksize", [0, -5, "lots", 1.5])
def test_bad_blocksize_is_an_error_naming_it_and_the_source(blocksize):
    with pytest.raises(OptionError, match=r"read_csv\('x.csv'\): blocksize=") as info:
        read_csv("x.csv", blocksize=blocksize)
    assert isinstance(info.value, ValueError)  # what Python users catch for a bad argument


def test_options_that_cannot_work_per_block_are_refused_up_front():
    with pytest.raises(OptionError, match=r"read_csv\('x.csv'\): nrows="):
        read_csv("x.csv", blocksize=100, nrows=5)
    with pytest.raises(OptionError, match=r"read_csv\('x.csv'\): chunksize="):
        read_csv("x.csv", chunksize=5)
    with pytest.raises(OptionError, match=r"read_csv\('x.csv'\): .*utf-16"):
        read_csv("x.csv", blocksize=100, encoding="utf-16")
    read_csv("x.csv", blocksize=100, encoding="utf-8-sig")  # a BOM is fine
    with pytest.raises(OptionError, match=r"read_parquet\('x'\): .*engine"):
        read_parquet("x", split_row_groups=True, engine="fastparquet")
    with pytest.raises(OptionError, match="takes a path"):
        read_csv(42)
    with pytest.raises(OptionError, match=r"write_parquet\('out'\) needs input="):
        write_parquet("out", input=None)


def test_credentials_never_show_in_a_source_repr():
    secret = {"key": "AKIAEXAMPLEKEY", "secret": "wJalrXUtnFEMI-secret", "token": "session-token"}
    for source in (read_csv("s3://bucket/trips/*.csv", storage_options=secret, sep=";"),
                   read_parquet("s3://bucket/trips", storage_options=secret)):
        shown = repr(source)
        assert not any(value in shown for value in secret.values()), shown
        assert "storage_options={'key': '***', 'secret': '***', 'token': '***'}" in shown
    assert "sep=';'" in repr(read_csv("s3://bucket/trips/*.csv", storage_options=secret, sep=";"))


# --------------------------------------------------------------------------- CSV


def test_csv_one_partition_per_file_in_sorted_order(csv_files):
    source = read_csv(str(csv_files[0].parent / "trips_*.csv"))
    parts = source.partitions()
    assert [part.index for part in parts] == [0, 1, 2]
    assert [Path(part.path) for part in parts] == csv_files
    expected = concat(pandas_read_csv(path) for path in csv_files)
    pd.testing.assert_frame_equal(load_all(source), expected)


def test_csv_list_keeps_its_order_and_reads_a_file_once(csv_files):
    source = read_csv([csv_files[2], str(csv_files[0].parent / "*.csv")])
    assert [Path(part.path) for part in source.partitions()] == [csv_files[2], csv_files[0], csv_files[1]]


def test_csv_directory_means_its_csv_files(csv_files):
    (csv_files[0].parent / "notes.md").write_text("not data")
    assert [Path(part.path) for part in read_csv(csv_files[0].parent).partitions()] == csv_files


@pytest.mark.parametrize("blocksize", [1, 13, 90, 700, 4096, "2kB"])
def test_csv_blocks_concatenate_to_the_whole_file_read(csv_files, blocksize):
    # Blocks of 1 and 13 bytes are smaller than a line: some nominal blocks
    # collapse, none may be empty or lose or repeat a line. payment_type is
    # pinned because a one-line block whose value is missing would otherwise
    # infer float64 for it, as pandas would for such a one-line file.
    options = {"parse_dates": ["pickup_at"], "dtype": {"payment_type": "str"}}
    source = read_csv(csv_files, blocksize=blocksize, **options)
    parts = source.partitions()
    for path in csv_files:  # a file larger than a block really is split, a smaller one is not
        blocks = sum(Path(part.path) == path for part in parts)
        assert (blocks > 1) == (path.stat().st_size > source.blocksize), (path.name, blocks)
    expected = concat(pandas_read_csv(path, **options) for path in csv_files)
    frames = [part.load() for part in parts]
    assert all(len(frame) > 0 for frame in frames)
    pd.testing.assert_frame_equal(concat(frames), expected)


@pytest.mark.parametrize("blocksize", [300, 1000, 5000])
def test_csv_blocks_infer_the_same_types_as_the_whole_file(blocksize):
    path = REPO / "data" / "trips" / "trips_2024-01.csv"
    source = read_csv(path, blocksize=blocksize, parse_dates=["pickup_at", "dropoff_at"])
    expected = pandas_read_csv(path, parse_dates=["pickup_at", "dropoff_at"])
    parts = source.partitions()
    # The file really is split, one block per blocksize bytes (lines are far shorter)...
    assert len(parts) == math.ceil(path.stat().st_size / blocksize)
    assert all(part.offset is not None for part in parts)
    frames = [part.load() for part in parts]
    # ...and each block on its own has the whole file's types (a concat would hide an
    # int64 block among float64 ones).
    for part, frame in zip(parts, frames):
        pd.testing.assert_series_equal(frame.dtypes, expected.dtypes, obj=part.describe())
    pd.testing.assert_frame_equal(concat(frames), expected)


def test_csv_block_count_and_byte_ranges(csv_files, monkeypatch):
    monkeypatch.chdir(csv_files[0].parent.parent)
    size = csv_files[2].stat().st_size
    parts = read_csv(csv_files[2], blocksize=1000).partitions()
    assert len(parts) == math.ceil(size / 1000)  # lines are far shorter than a block
    content = csv_files[2].read_bytes()
    assert parts[0].offset == 0
    assert [p.offset + p.length for p in parts[:-1]] == [p.offset for p in parts[1:]]  # contiguous
    assert parts[-1].offset + parts[-1].length == size
    assert all(content[p.offset - 1:p.offset] == b"\n" for p in parts[1:])  # each starts a line
    assert parts[1].describe() == f"trips/trips_2024-03.csv (bytes {parts[1].offset}-{parts[2].offset})"


def test_csv_small_files_stay_whole_with_blocksize(csv_files):
    parts = read_csv(csv_files, blocksize="1MB").partitions()
    assert len(parts) == 3 and all(part.offset is None for part in parts)


@pytest.mark.parametrize(
    "options, preamble",
    [
        ({"skiprows": 2}, "exported by meter v2\nfleet 7\n"),
        ({"skiprows": 1, "header": 0}, "# comment-ish first line\n"),
        ({"header": None, "names": ["id", "fare", "zone"]}, ""),
        ({"header": None}, ""),
        ({"comment": "#"}, "# a comment before the header\n\n"),
        ({"sep": ";", "usecols": ["fare", "id"]}, ""),
    ],
)
def test_csv_blocks_respect_header_and_skiprows(tmp_path, options, preamble):
    sep = options.get("sep", ",")
    rows = "".join(f"{i}{sep}{i * 1.5}{sep}zone {i % 7}\n" for i in range(200))
    header = "" if options.get("header", 0) is None else f"id{sep}fare{sep}zone\n"
    path = tmp_path / "meter.csv"
    path.write_text(preamble + header + rows)
    expected = pandas_read_csv(path, **options)
    for blocksize in (64, 400):
        parts = read_csv(path, blocksize=blocksize, **options).partitions()
        assert len(parts) > 3
        pd.testing.assert_frame_equal(concat(p.load() for p in parts), expected)


def test_csv_skipfooter_applies_to_the_last_block_only(tmp_path):
    path = tmp_path / "report.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(100)) + "total,9900\n")
    options = {"skipfooter": 1, "engine": "python"}
    parts = read_csv(path, blocksize=100, **options).partitions()
    pd.testing.assert_frame_equal(concat(p.load() for p in parts), pandas_read_csv(path, **options))


def test_csv_compressed_files_are_not_split(tmp_path):
    path = tmp_path / "trips.csv.gz"
    trips_frame(300, seed=4).to_csv(path, index=False)
    parts = read_csv(path, blocksize=100).partitions()
    assert len(parts) == 1
    pd.testing.assert_frame_equal(parts[0].load(), pandas_read_csv(path))


# --------------------------------------------------------------------------- identity and pickling


def test_identity_is_the_file_and_range_never_the_index(csv_files):
    alone = read_csv(csv_files[2], blocksize=500).partitions()
    together = read_csv(csv_files, blocksize=500).partitions()
    stat = csv_files[2].stat()
    first = alone[0].identity()
    assert first[:5] == (str(csv_files[2]), stat.st_size, stat.st_mtime_ns, 0, alone[0].length)
    # The same blocks of the same file, at other indexes, keep their identities.
    assert [p.identity() for p in alone] == [p.identity() for p in together if p.path == str(csv_files[2])]
    assert together[-1].index != alone[-1].index
    # Reading the file differently is different data.
    other = read_csv(csv_files[2], blocksize=500, usecols=["fare"]).partitions()
    assert other[0].identity() != first


def test_identity_changes_when_the_file_changes(csv_files):
    before = read_csv(csv_files[0]).partitions()[0].identity()
    with open(csv_files[0], "a") as file:
        file.write("999,2024-01-02 00:00:00,Astoria,1,5.0,card\n")
    assert read_csv(csv_files[0]).partitions()[0].identity() != before


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)])
def test_partitions_round_trip_through_pickle(csv_files, parquet_files, dumps, loads):
    parts = read_csv(csv_files, blocksize=700, parse_dates=["pickup_at"]).partitions()
    parts += read_parquet(parquet_files, split_row_groups=True, columns=["fare"]).partitions()
    for part in parts:
        copy = loads(dumps(part))
        assert copy == part and copy.identity() == part.identity() and copy.index == part.index
        pd.testing.assert_frame_equal(copy.load(), part.load())
    assert max(len(pickle.dumps(part)) for part in parts) < 2000  # sent inside every task


def test_a_source_pickles_and_plans_the_same_after(csv_files):
    source = read_csv(csv_files, blocksize=700)
    source.name = "trips"
    copy = pickle.loads(pickle.dumps(source))
    assert copy.name == "trips" and copy.partitions() == source.partitions()


def test_fsspec_urls_are_read_like_local_paths(tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/flowyml-test-{tmp_path.name}"
    try:
        for month in (1, 2):
            with memory.open(f"{root}/trips_{month}.csv", "w") as file:
                trips_frame(40, seed=month).to_csv(file, index=False)
            with memory.open(f"{root}/pq/trips_{month}.parquet", "wb") as file:
                trips_frame(40, seed=month).to_parquet(file, row_group_size=15)
        csv = read_csv(f"memory://{root}/trips_*.csv", blocksize=500)
        expected = concat(pandas_read_csv(f"memory://{root}/trips_{month}.csv") for month in (1, 2))
        assert len(csv.partitions()) > 2
        pd.testing.assert_frame_equal(load_all(csv), expected)
        parquet = read_parquet(f"memory://{root}/pq", split_row_groups=True)
        assert len(parquet.partitions()) == 6
        pd.testing.assert_frame_equal(load_all(parquet), concat(trips_frame(40, seed=m) for m in (1, 2)))
    finally:
        memory.rm(root, recursive=True)


def test_on_an_object_store_csv_columns_are_checked_as_each_partition_loads(tmp_path):
    # Planning reads the first file's header only (each header is a round trip on
    # an object store); every other file is held to it when it loads.
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"/flowyml-columns-{tmp_path.name}"
    frame = trips_frame(20, seed=3)
    try:
        memory.pipe_file(f"{root}/trips_1.csv", frame.to_csv(index=False).encode())
        memory.pipe_file(f"{root}/trips_2.csv", frame.iloc[:, ::-1].to_csv(index=False).encode())
        source = read_csv(f"memory://{root}/trips_*.csv", blocksize=300)
        first = pandas_read_csv(f"memory://{root}/trips_1.csv")
        assert [list(part.load().columns) for part in source.partitions()][-1] == list(first.columns)
        pd.testing.assert_frame_equal(load_all(source), concat([first, first]))  # reordered as it loads
        memory.pipe_file(f"{root}/trips_2.csv", frame.drop(columns=["fare"]).to_csv(index=False).encode())
        partitions = read_csv(f"memory://{root}/trips_*.csv").partitions()  # planning reads one header
        partitions[0].load()
        with pytest.raises(DataError, match=r"source .*: the files do not have the same columns: "
                                            r".*trips_1.csv has .*trips_2.csv has .*only in the first: \['fare'\]"):
            partitions[1].load()
    finally:
        memory.rm(root, recursive=True)


# --------------------------------------------------------------------------- Parquet


def test_parquet_one_partition_per_file_from_a_directory(parquet_files):
    source = read_parquet(parquet_files[0].parent)
    parts = source.partitions()
    assert [Path(part.path) for part in parts] == parquet_files
    for part, path in zip(parts, parquet_files):
        pd.testing.assert_frame_equal(part.load(), pd.read_parquet(path))


def test_parquet_one_partition_per_row_group(parquet_files, monkeypatch):
    monkeypatch.chdir(parquet_files[0].parent)
    parts = read_parquet(str(parquet_files[0].parent / "*.parquet"), split_row_groups=True).partitions()
    groups = [pq.ParquetFile(path).metadata.num_row_groups for path in parquet_files]
    assert groups == [3, 2, 0]
    assert len(parts) == 3 + 2 + 1  # a file without row groups stays one (empty, typed) partition
    for part in parts[:5]:
        expected = pq.ParquetFile(part.path).read_row_group(part.row_group).to_pandas()
        pd.testing.assert_frame_equal(part.load(), expected, check_index_type=False)
    assert parts[1].describe() == "trips_2024-01.parquet (row group 1)"
    whole = concat(pd.read_parquet(path) for path in parquet_files)
    pd.testing.assert_frame_equal(load_all(read_parquet(parquet_files, split_row_groups=True)), whole)


@pytest.mark.parametrize("split", [False, True])
def test_parquet_columns_and_filters_pass_through(parquet_files, split):
    options = {"columns": ["fare", "zone"], "filters": [("passengers", ">", 2)]}
    got = load_all(read_parquet(parquet_files, split_row_groups=split, **options))
    expected = concat(pd.read_parquet(path, **options) for path in parquet_files)
    assert list(got.columns) == ["fare", "zone"]
    pd.testing.assert_frame_equal(got, expected)


def test_parquet_missing_selected_column_names_the_file(parquet_files):
    with pytest.raises(DataError, match=r"trips_2024-01\.parquet.*'tips'"):
        read_parquet(parquet_files, columns=["fare", "tips"]).partitions()


# --------------------------------------------------------------------------- errors


def test_glob_matching_nothing_names_the_glob(tmp_path):
    pattern = str(tmp_path / "trips_*.csv")
    source = read_csv(pattern)
    source.name = "trips"
    with pytest.raises(DataError, match=r"'trips'.*glob .*trips_\*\.csv.* matched no file"):
        source.partitions()


def test_missing_path_and_empty_directory_are_named(tmp_path):
    with pytest.raises(DataError, match=r"missing\.parquet"):
        read_parquet(tmp_path / "missing.parquet").partitions()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_parquet(tmp_path / "empty").partitions()


def test_malformed_csv_names_the_file_and_partition(csv_files):
    with open(csv_files[1], "a") as file:
        file.write("1,2,3,4,5,6,7,8,9\n")  # too many fields
    source = read_csv(csv_files)
    source.name = "trips"
    part = source.partitions()[1]
    with pytest.raises(DataError, match=r"'trips'.*partition 1.*trips_2024-02\.csv") as caught:
        part.load()
    assert isinstance(caught.value.__cause__, pd.errors.ParserError)


def test_csv_value_that_breaks_a_dtype_names_the_block(csv_files):
    with open(csv_files[0], "a") as file:
        file.write("oops,2024-01-02 00:00:00,Astoria,1,5.0,card\n")
    parts = read_csv(csv_files[0], blocksize=400, dtype={"trip_id": "int64"}).partitions()
    with pytest.raises(DataError, match=rf"partition {len(parts) - 1}.*trips_2024-01\.csv \(bytes \d+-\d+\)"):
        parts[-1].load()
    parts[0].load()  # the other blocks are fine


def test_unreadable_parquet_is_found_while_planning(parquet_files):
    parquet_files[1].write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"trips_2024-02\.parquet.*not a readable Parquet file"):
        read_parquet(parquet_files).partitions()


def test_empty_csv_is_found_while_planning(csv_files):
    csv_files[1].write_bytes(b"")
    with pytest.raises(DataError, match=r"header of .*trips_2024-02\.csv"):
        read_csv(csv_files).partitions()


def test_file_changed_after_planning_is_not_read(csv_files):
    part = read_csv(csv_files[0]).partitions()[0]
    with open(csv_files[0], "a") as file:
        file.write("999,2024-01-02 00:00:00,Astoria,1,5.0,card\n")
    with pytest.raises(DataError, match="changed"):
        part.load()


def test_differing_csv_columns_name_both_files_and_the_columns(csv_files):
    frame = pd.read_csv(csv_files[2]).rename(columns={"fare": "fare_amount"})
    frame.to_csv(csv_files[2], index=False)
    with pytest.raises(DataError, match=r"trips_2024-01\.csv.*trips_2024-03\.csv.*\['fare'\].*\['fare_amount'\]"):
        read_csv(csv_files).partitions()


def test_differing_parquet_columns_name_both_files(parquet_files):
    pd.read_parquet(parquet_files[1]).drop(columns="zone").to_parquet(parquet_files[1])
    with pytest.raises(DataError, match=r"trips_2024-01\.parquet.*trips_2024-02\.parquet.*\['zone'\]"):
        read_parquet(parquet_files).partitions()


def test_same_columns_in_another_order_read_in_the_first_files_order(csv_files):
    frame = pd.read_csv(csv_files[1])
    frame[list(reversed(frame.columns))].to_csv(csv_files[1], index=False)
    alone = read_csv(csv_files[1]).partitions()[0]
    parts = [part.load() for part in read_csv(csv_files).partitions()]
    assert [list(part.columns) for part in parts] == [list(frame.columns)] * 3
    assert read_csv(csv_files).partitions()[1].identity() != alone.identity()  # reordered is other data
    pd.testing.assert_frame_equal(concat(parts), concat(pandas_read_csv(path) for path in csv_files))


# --------------------------------------------------------------------------- sinks


def frames(count: int, seed: int = 0) -> list[pd.DataFrame]:
    return [trips_frame(10 + i, seed=seed + i) for i in range(count)]


def staged(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(".*flowyml-staging-*"))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_written_partitions_appear_only_at_commit(tmp_path, fmt):
    out = tmp_path / "out"
    parts = frames(3)
    written = [write_partition(df, out, "run1", i, fmt) for i, df in enumerate(parts)]
    assert written == [str(out / f"part-{i:05d}.{fmt}") for i in range(3)]
    assert not out.exists()  # nothing visible before the commit
    assert commit_output(out, "run1", list(reversed(written))) == written
    assert sorted(os.listdir(out)) == [f"part-{i:05d}.{fmt}" for i in range(3)]
    assert staged(tmp_path) == []
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    for path, df in zip(written, parts):
        expected = df if fmt == "parquet" else pd.read_csv(pd.io.common.StringIO(df.to_csv(index=False)))
        pd.testing.assert_frame_equal(read(path), expected)


def test_each_file_is_moved_into_place_with_os_replace(tmp_path, monkeypatch):
    moves = []
    real_replace = os.replace

    def spy(source, destination):
        assert os.path.getsize(source) > 0  # complete before it is moved
        moves.append((source, destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    write_partition(frames(1)[0], tmp_path / "out", "run1", 7, "parquet")
    [(source, destination)] = moves
    assert os.path.dirname(source) == os.path.dirname(destination)
    assert os.path.basename(source).startswith(".") and destination.endswith("part-00007.parquet")


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_written(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_partition(frames(1)[0], tmp_path / "out", "run1", 0, "parquet")
    [staging] = staged(tmp_path)
    assert os.listdir(staging) == []


def commit_first_run(out: Path) -> list[str]:
    written = [write_partition(df, out, "old", i, "parquet") for i, df in enumerate(frames(2, seed=50))]
    return commit_output(out, "old", written)


def test_commit_replaces_the_previous_output_whole(tmp_path):
    out = tmp_path / "out"
    commit_first_run(out)
    (out / "part-00001.parquet").touch()  # only the new files may remain
    written = [write_partition(df, out, "new", i, "parquet") for i, df in enumerate(frames(1, seed=7))]
    commit_output(out, "new", written)
    assert os.listdir(out) == ["part-00000.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "part-00000.parquet"), frames(1, seed=7)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.flowyml-lock", "out"]


def test_a_run_that_fails_before_commit_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    before = {path: Path(path).read_bytes() for path in commit_first_run(out)}
    new = frames(3, seed=9)
    written = [write_partition(new[i], out, "new", i, "parquet") for i in (0, 2)]  # partition 1 failed
    with pytest.raises(DataError, match=r"part-00001\.parquet"):
        commit_output(out, "new", [*written, str(out / "part-00001.parquet")])
    assert {str(p): p.read_bytes() for p in out.iterdir()} == before
    abort_output(out, "new")
    assert staged(tmp_path) == []
    assert {str(p): p.read_bytes() for p in out.iterdir()} == before


def blocked_parquet_writes(monkeypatch):
    """Make ``to_parquet`` stop half-way until released: (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    real_to_parquet = pd.DataFrame.to_parquet

    def to_parquet(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        entered.set()
        assert release.wait(30), "the test never released the write"
        real_to_parquet(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    return entered, release


def test_abort_waits_for_a_write_in_flight_and_no_write_starts_after(tmp_path, monkeypatch):
    # The thread backend cannot stop a thread writing a partition when the run
    # is interrupted: aborting must not let that write recreate the staging dir.
    out = tmp_path / "out"
    entered, release = blocked_parquet_writes(monkeypatch)
    writer = threading.Thread(target=write_partition, args=(frames(1)[0], out, "run1", 0, "parquet"))
    writer.start()
    assert entered.wait(30)
    aborter = threading.Thread(target=abort_output, args=(out, "run1"))
    aborter.start()
    aborter.join(0.2)
    assert aborter.is_alive(), "abort_output returned while a partition was half-written"
    release.set()
    aborter.join(30)
    writer.join(30)
    assert staged(tmp_path) == [] and not out.exists()
    with pytest.raises(DataError, match="run was stopped"):
        write_partition(frames(1)[0], out, "run1", 1, "parquet")
    assert staged(tmp_path) == []


def test_a_write_outlasting_the_abort_removes_the_staging_dir_itself(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sinks, "ABORT_WAIT_S", 0.0)
    entered, release = blocked_parquet_writes(monkeypatch)
    writer = threading.Thread(target=write_partition, args=(frames(1)[0], out, "run1", 0, "parquet"))
    writer.start()
    assert entered.wait(30)
    abort_output(out, "run1")  # gives up waiting at once
    assert len(staged(tmp_path)) == 1
    release.set()
    writer.join(30)
    assert staged(tmp_path) == [] and not out.exists()


def test_a_failing_swap_restores_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = {path: Path(path).read_bytes() for path in commit_first_run(out)}
    written = [write_partition(frames(1)[0], out, "new", 0, "parquet")]
    real_rename = os.rename

    def rename(source, destination):
        if "staging" in os.fspath(source):
            raise OSError("simulated failure")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        commit_output(out, "new", written)
    assert {str(p): p.read_bytes() for p in out.iterdir()} == before


def test_commit_drops_temporary_files_of_killed_attempts(tmp_path):
    out = tmp_path / "out"
    written = [write_partition(frames(1)[0], out, "run1", 0, "csv")]
    [staging] = staged(tmp_path)
    (staging / ".part-00000.csv.dead.tmp").write_text("half")
    commit_output(out, "run1", written)
    assert os.listdir(out) == ["part-00000.csv"]


def test_commit_of_zero_partitions_is_an_empty_directory(tmp_path):
    assert commit_output(tmp_path / "out", "run1", []) == []
    assert os.listdir(tmp_path / "out") == []


def test_concurrent_commits_leave_one_runs_output_whole(tmp_path):
    out = tmp_path / "out"
    runs = {"a": frames(4, seed=1), "b": frames(2, seed=20)}
    written = {
        run: [write_partition(df, out, run, i, "parquet") for i, df in enumerate(dfs)] for run, dfs in runs.items()
    }
    barrier = threading.Barrier(2)
    errors = []

    def commit(run):
        barrier.wait()
        try:
            commit_output(out, run, written[run])
        except Exception as exc:  # any error: reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = sorted(os.listdir(out))
    winner = "a" if len(names) == 4 else "b"
    assert names == [f"part-{i:05d}.parquet" for i in range(len(runs[winner]))]
    for i, df in enumerate(runs[winner]):
        pd.testing.assert_frame_equal(pd.read_parquet(out / names[i]), df)
    assert staged(tmp_path) == []


def test_the_swap_happens_under_a_lock_other_runs_wait_for(tmp_path, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    real_swap = sinks._swap_into_place
    seen = []

    def swap(*args):
        # While one run swaps, another run's lock attempt must block.
        with open(tmp_path / ".out.flowyml-lock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        real_swap(*args)

    monkeypatch.setattr(sinks, "_swap_into_place", swap)
    commit_output(out, "r", [write_partition(frames(1)[0], out, "r", 0, "csv")])
    assert seen == ["held"]


def test_stale_staging_of_killed_runs_is_removed_at_commit(tmp_path):
    out = tmp_path / "out"
    write_partition(frames(1)[0], out, "killed", 0, "parquet")
    write_partition(frames(1)[0], out, "running", 0, "parquet")
    killed = tmp_path / ".out.flowyml-staging-killed"
    old = os.path.getmtime(killed) - sinks.STALE_AFTER_S - 60
    os.utime(killed, (old, old))
    commit_output(out, "mine", [write_partition(frames(1)[0], out, "mine", 0, "parquet")])
    assert [p.name for p in staged(tmp_path)] == [".out.flowyml-staging-running"]


def test_a_series_becomes_a_one_column_frame(tmp_path):
    out = tmp_path / "out"
    path = write_partition(pd.Series([1.5, 2.5], name="fare"), out, "r", 0, "parquet")
    commit_output(out, "r", [path])
    pd.testing.assert_frame_equal(pd.read_parquet(path), pd.DataFrame({"fare": [1.5, 2.5]}))


def test_writing_something_else_names_the_step(tmp_path):
    with pytest.raises(OptionError, match="write_parquet writes pandas DataFrames"):
        write_partition([1, 2], tmp_path / "out", "r", 0, "parquet")
    with (
        running(TaskContext(step="save_clean", partition=3, attempt=1, run_id="r")),
        pytest.raises(OptionError, match=r"step 'save_clean', partition 3: .*got dict"),
    ):
        write_partition({"a": 1}, tmp_path / "out", "r", 3, "csv")
    with pytest.raises(OptionError, match="unknown output format 'json'"):
        write_partition(frames(1)[0], tmp_path / "out", "r", 0, "json")


# --------------------------------------------------------------------------- bundled and benchmark data


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bundled_data_is_what_its_script_generates(tmp_path, monkeypatch):
    make_data = load_module(REPO / "data" / "make_data.py", "flowyml_test_make_data")
    monkeypatch.setattr(make_data, "HERE", tmp_path)
    make_data.main()
    for committed in [REPO / "data" / "zones.csv", *sorted((REPO / "data" / "trips").glob("*.csv"))]:
        generated = tmp_path / committed.relative_to(REPO / "data")
        assert generated.read_bytes() == committed.read_bytes(), committed
    csv = load_all(read_csv(REPO / "data" / "trips", parse_dates=["pickup_at", "dropoff_at"]))
    parquet = load_all(read_parquet(REPO / "data" / "trips_parquet"))
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False, atol=0.006)
    assert csv["fare"].isna().any() and (csv["fare"] < 0).any() and (csv["passengers"] == 0).any()
    total = sum(p.stat().st_size for p in (REPO / "data").rglob("*") if p.is_file())
    assert total < 6_000_000


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_benchmark_generator_hits_the_size_and_the_bundled_shape(tmp_path, fmt):
    datagen = load_module(REPO / "bench" / "datagen.py", "flowyml_test_datagen")
    make = datagen.make_csv_dataset if fmt == "csv" else datagen.make_parquet_dataset
    paths = make(tmp_path / fmt, "2MB", files=2, seed=3)
    assert len(paths) == 2
    total = sum(os.path.getsize(path) for path in paths)
    assert 1_500_000 < total < 2_500_000
    source = read_csv(paths) if fmt == "csv" else read_parquet(paths)
    got = load_all(source)
    bundled = pd.read_csv(REPO / "data" / "trips" / "trips_2024-01.csv")
    assert list(got.columns) == list(bundled.columns)
    assert got["trip_id"].is_unique
    assert make(tmp_path / "again", "2MB", files=2, seed=3) and all(
        Path(a).read_bytes() == (tmp_path / "again" / Path(a).name).read_bytes() for a in paths
    )

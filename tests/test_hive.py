"""Hive-partitioned Parquet: key folders read as typed columns, pruned by filters, written by
``partition_on`` and rewritten one partition at a time, on every backend, locally and on S3."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from flowyml import OptionError, Pipeline, StepFailed, read_parquet, step, write_parquet

DAYS = ["2024-06-01", "2024-06-02", "2024-06-03"]


def sales(days=DAYS, factor: float = 1.0) -> pd.DataFrame:
    """Four sales a day, in two shops; ``factor`` changes the amounts (a corrected rerun)."""
    rows = [{"day": day, "shop": shop, "item": item, "amount": factor * (10 * DAYS.index(day) + item)}
            for day in days for shop in ("north", "south") for item in (1, 2)]
    return pd.DataFrame(rows)


@step(per_partition=True, inputs=["raw"])
def clean(raw: pd.DataFrame) -> pd.DataFrame:
    return raw[raw["amount"] > 0]


@step(per_partition=True, inputs=["raw"])
def fail_on_june_2(raw: pd.DataFrame) -> pd.DataFrame:
    if (raw["day"] == "2024-06-02").any():
        raise RuntimeError("the June 2 feed is broken")
    return raw


@step(inputs=["clean"])
def everything(clean: pd.DataFrame) -> pd.DataFrame:
    return clean


def flat_input(folder: Path, frame: pd.DataFrame, files: int = 2) -> str:
    """``frame`` as ``files`` flat Parquet files, rows dealt in turn (each file holds several days)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(files):
        frame.iloc[number::files].reset_index(drop=True).to_parquet(folder / f"part-{number}.parquet")
    return str(folder)


def hive_layout(folder: Path) -> str:
    """A layout as pandas writes it: ``year=2024/month=06/...`` (``month`` a zero-padded string), four files."""
    frame = sales()
    frame["year"] = 2024
    frame["month"] = frame["day"].map({day: f"{6 + number:02d}" for number, day in enumerate(DAYS)})
    more = frame.assign(year=2023, month="12")
    pd.concat([frame, more], ignore_index=True).to_parquet(folder, partition_cols=["year", "month"])
    return str(folder)


def files_of(folder: str | Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder``: its bytes and modification time."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = (handle.read(), os.stat(path).st_mtime_ns)
    return found


def write_job(source: str, out: str, **options) -> Pipeline:
    return (Pipeline("daily").add_source("raw", read_parquet(source)).add_step(clean)
            .add_step(write_parquet(out, input="clean", partition_on=["day"], **options)))


# -- reading ---------------------------------------------------------------------------


def test_key_folders_become_typed_columns_as_pandas_reads_them(executor, tmp_path):
    folder = hive_layout(tmp_path / "sales")
    result = Pipeline("read").add_source("raw", read_parquet(folder)).add_step(clean).add_step(everything)
    got = result.run(executor=executor, progress=False)["everything"]
    expected = pd.read_parquet(folder)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    assert got["year"].dtype == expected["year"].dtype  # categoricals of int32, as pyarrow infers them
    assert list(got["year"].cat.categories) == [2023, 2024]


def test_every_partition_has_the_same_key_dtypes(tmp_path):
    folder = hive_layout(tmp_path / "sales")
    parts = read_parquet(folder).partitions()
    assert len(parts) == 4  # one per file
    dtypes = {tuple(part.load().dtypes.astype(str)) for part in parts}
    categories = {tuple(part.load()["month"].cat.categories) for part in parts}
    assert len(dtypes) == 1 and categories == {tuple(pd.read_parquet(folder)["month"].cat.categories)}


def test_explicit_partitioning_gives_plain_typed_columns(tmp_path):
    folder = hive_layout(tmp_path / "sales")
    frame = pd.concat(part.load() for part in read_parquet(folder, partitioning={"year": "int16"}).partitions())
    assert frame["year"].dtype == "int16" and "month" not in frame
    assert "year" not in pd.concat(p.load() for p in read_parquet(folder, partitioning=None).partitions())


def test_options_a_hive_partition_cannot_honour_are_refused(tmp_path):
    folder = hive_layout(tmp_path / "sales")
    with pytest.raises(OptionError, match=r"key=value folders.*cannot pass \['engine'\]"):
        read_parquet(folder, engine="fastparquet").partitions()
    with pytest.raises(OptionError, match="operator 'like'"):
        read_parquet(folder, filters=[("year", "like", 2024)]).partitions()


def test_filters_on_keys_prune_folders_at_planning(executor, tmp_path):
    folder = hive_layout(tmp_path / "sales")
    expected = pd.read_parquet(folder, filters=[("year", "=", 2024), ("amount", ">", 11)])
    # A file no filter can match is never opened: not at planning, not by a task.
    broken = Path(folder) / "year=2023" / "month=12" / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    source = read_parquet(folder, filters=[("year", "=", 2024), ("amount", ">", 11)])
    assert len(source.partitions()) == 3  # the three files of year=2024; year=2023 pruned
    got = (Pipeline("read").add_source("raw", source).add_step(clean).add_step(everything)
           .run(executor=executor, progress=False)["everything"])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    assert (got["amount"] > 11).all() and len(got) < 12  # the condition on a column applies to rows


def test_or_groups_keep_a_folder_any_group_can_match(tmp_path):
    folder = hive_layout(tmp_path / "sales")
    filters = [[("year", "=", 2023)], [("month", "=", 6), ("item", "=", 2)]]
    parts = read_parquet(folder, filters=filters).partitions()
    assert len(parts) == 2  # year=2023/month=12 and year=2024/month=06
    got = pd.concat(part.load() for part in parts).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, pd.read_parquet(folder, filters=filters).reset_index(drop=True))


# -- writing ---------------------------------------------------------------------------


def test_partition_on_writes_the_hive_layout_pandas_reads_back(executor, tmp_path):
    source = flat_input(tmp_path / "raw", sales())
    result = write_job(source, str(tmp_path / "out")).run(executor=executor, progress=False)
    out = tmp_path / "out"
    # Two input partitions, each holding every day: one file per day and partition.
    assert sorted(result["write_parquet"]) == sorted(
        str(out / f"day={day}" / f"part-{index:05d}.parquet") for day in DAYS for index in range(2))
    assert "day" not in pd.read_parquet(out / f"day={DAYS[0]}" / "part-00000.parquet").columns
    back = pd.read_parquet(out).assign(day=lambda frame: frame["day"].astype(str))
    expected = sales()[["item", "amount", "shop", "day"]]
    columns = ["day", "shop", "item"]
    pd.testing.assert_frame_equal(back.sort_values(columns, ignore_index=True)[list(expected)],
                                  expected.sort_values(columns, ignore_index=True))


def test_a_daily_job_rewrites_one_day_and_leaves_the_others_byte_identical(executor, tmp_path):
    out = str(tmp_path / "out")
    write_job(flat_input(tmp_path / "all", sales()), out).run(executor=executor, progress=False)
    before = files_of(out)
    june_2 = flat_input(tmp_path / "june_2", sales(["2024-06-02"], factor=2.0), files=1)
    result = write_job(june_2, out, mode="overwrite_partitions").run(executor=executor, progress=False)
    assert result["write_parquet"] == [os.path.join(out, "day=2024-06-02", "part-00000.parquet")]
    after = files_of(out)
    for name, content in before.items():
        if not name.startswith("day=2024-06-02"):
            assert after[name] == content  # same bytes, same modification time
    assert sorted(name for name in after if name.startswith("day=2024-06-02")) == [
        os.path.join("day=2024-06-02", "part-00000.parquet")]
    back = pd.read_parquet(out)
    assert back[back["day"] == "2024-06-02"]["amount"].tolist() == [22.0, 24.0, 22.0, 24.0]
    assert len(back) == 12
    assert sorted(os.listdir(tmp_path)) == [".out.flowyml-lock", "all", "june_2", "out"]


def test_overwrite_replaces_the_whole_output(executor, tmp_path):
    out = str(tmp_path / "out")
    write_job(flat_input(tmp_path / "all", sales()), out).run(executor=executor, progress=False)
    june_2 = flat_input(tmp_path / "june_2", sales(["2024-06-02"]), files=1)
    write_job(june_2, out).run(executor=executor, progress=False)
    assert os.listdir(out) == ["day=2024-06-02"]


def test_a_failure_mid_write_leaves_the_old_output_intact(executor, tmp_path):
    out = str(tmp_path / "out")
    write_job(flat_input(tmp_path / "all", sales()), out).run(executor=executor, progress=False)
    before = files_of(out)
    # Partition 0 holds June 1 and 3 and is written; partition 1 holds June 2 and fails.
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    sales(["2024-06-01", "2024-06-03"], factor=3.0).to_parquet(rerun / "part-0.parquet")
    sales(["2024-06-02"], factor=3.0).to_parquet(rerun / "part-1.parquet")
    pipeline = (Pipeline("daily").add_source("raw", read_parquet(str(rerun))).add_step(fail_on_june_2, name="clean")
                .add_step(write_parquet(out, input="clean", partition_on=["day"], mode="overwrite_partitions")))
    with pytest.raises(StepFailed, match="June 2"):
        pipeline.run(executor=executor, progress=False)
    assert files_of(out) == before
    assert not [name for name in os.listdir(tmp_path) if "staging" in name]
    # Letting the rest finish: partition 0 is staged, yet nothing is committed and the staging goes.
    result = pipeline.run(executor=executor, progress=False, on_failure="continue")
    assert not result.success and result.steps["write_parquet"].status == "skipped"
    assert files_of(out) == before
    assert not [name for name in os.listdir(tmp_path) if "staging" in name]


def test_sink_options_are_checked_when_declared():
    with pytest.raises(OptionError, match=r"write_parquet.*unknown mode='append'.*'overwrite', 'overwrite_partitions'"):
        write_parquet("out", input="clean", partition_on=["day"], mode="append")
    with pytest.raises(OptionError, match=r"needs partition_on=\[...\]"):
        write_parquet("out", input="clean", mode="overwrite_partitions")
    with pytest.raises(OptionError, match="partition_on takes a list of distinct column names"):
        write_parquet("out", input="clean", partition_on=["day", "day"])


# -- on S3 -----------------------------------------------------------------------------


def test_hive_write_rewrite_and_pruned_read_on_s3(executor, bucket, tmp_path):
    out = f"{bucket}/daily"
    write_job(flat_input(tmp_path / "all", sales()), out).run(executor=executor, progress=False)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    kept = {path: fs.info(path)["ETag"] for path in fs.find(out) if "day=2024-06-02" not in path
            and "/_flowyml/" not in path}
    june_2 = flat_input(tmp_path / "june_2", sales(["2024-06-02"], factor=2.0), files=1)
    write_job(june_2, out, mode="overwrite_partitions").run(executor=executor, progress=False)
    fs.invalidate_cache()
    assert {path: fs.info(path)["ETag"] for path in kept} == kept  # the other days were not touched
    assert [path for path in fs.find(out) if "day=2024-06-02" in path] == [
        f"{out[5:]}/day=2024-06-02/part-00000.parquet"]
    manifest = fs.cat_file(f"{out}/_flowyml/manifest.json").decode()
    assert all(path.split("/daily/", 1)[1] in manifest for path in kept)
    source = read_parquet(out, filters=[("day", "=", "2024-06-02")])
    assert len(source.partitions()) == 1
    got = (Pipeline("back").add_source("raw", source).add_step(clean).add_step(everything)
           .run(executor=executor, progress=False)["everything"])
    assert got["amount"].tolist() == [22.0, 24.0, 22.0, 24.0]
    pd.testing.assert_frame_equal(got.reset_index(drop=True),
                                  pd.read_parquet(out, filters=[("day", "=", "2024-06-02")]).reset_index(drop=True))

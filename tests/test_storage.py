"""Sources, sinks and the cache on object storage: a real S3 API server (moto's) on 127.0.0.1.

Every backend reads CSV from S3, writes Parquet to S3 and keeps its cache
there; what it wrote is read back with pandas, pyarrow and dask.dataframe.
Credentials come from the environment (as for pandas), or from
``storage_options`` pointing at a second server the environment knows
nothing of, so that a touch that forgot them fails; and those credentials
never show anywhere.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.dataset as pads
import pytest

from flowyml import (
    DataError,
    ParallelExecutor,
    Pipeline,
    read_csv,
    read_parquet,
    step,
    write_csv,
    write_parquet,
)
from flowyml.exceptions import StorageError

from . import storage_jobs
from .services import ROOT, S3Server, free_port
from .test_cli import expected_clean

KEY_ID = "AKIAFLOWYMLLEAKCHECK"
SECRET = "flowyml/leak+check/0123456789abcdefSECRET"


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory):
    """A second S3 server reached only through ``storage_options`` (the environment names the first)."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("private-s3") / "moto.log").start()
    yield {"endpoint_url": server.endpoint, "key": KEY_ID, "secret": SECRET}
    server.stop()


@pytest.fixture(scope="module")
def locked_s3(tmp_path_factory):
    """An S3 server with moto's authentication on: credentials it does not know are refused."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("locked-s3") / "moto.log",
                      env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    yield {"endpoint_url": server.endpoint, "key": "AKIANOBODYKNOWS", "secret": "not-a-known-secret"}
    server.stop()


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("trip_id", ignore_index=True)


def read_every_way(url: str, storage_options: dict | None = None) -> list[pd.DataFrame]:
    """The output folder as pandas, pyarrow and dask.dataframe read it."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    with dask.config.set(scheduler="sync"):
        return [
            pd.read_parquet(url, storage_options=storage_options),
            pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pandas(),
            dd.read_parquet(url, storage_options=storage_options).compute(),
        ]


def test_every_backend_reads_writes_and_caches_on_s3(executor, bucket):
    storage_jobs.upload_months(f"{bucket}/trips")
    expected = sorted_frame(storage_jobs.expected_clean())
    pipeline = storage_jobs.etl(f"{bucket}/trips", f"{bucket}/clean", cache_dir=f"{bucket}/cache")
    first = pipeline.run(executor=executor, progress=False)
    assert first["write_parquet"] == [f"{bucket}/clean/part-{i:05d}.parquet" for i in range(4)]
    for frame in read_every_way(f"{bucket}/clean"):
        pd.testing.assert_frame_equal(sorted_frame(frame), expected, check_dtype=False)

    again = pipeline.run(executor=executor, progress=False)
    assert {name: s.status for name, s in again.steps.items()} == dict.fromkeys(again.steps, "cached")
    assert again["write_parquet"] == first["write_parquet"]
    pd.testing.assert_frame_equal(sorted_frame(pd.read_parquet(f"{bucket}/clean")), expected, check_dtype=False)


def test_write_csv_and_read_parquet_on_s3(executor, bucket):
    storage_jobs.upload_months(f"{bucket}/trips")
    csv_out = (Pipeline("to_csv").add_source("trips", read_csv(f"{bucket}/trips/*.csv"))
               .add_step(storage_jobs.clean).add_step(write_csv(f"{bucket}/clean_csv", input="clean")))
    written = csv_out.run(executor=executor, progress=False)["write_csv"]
    back = pd.concat([pd.read_csv(url) for url in written], ignore_index=True)
    pd.testing.assert_frame_equal(sorted_frame(back), sorted_frame(storage_jobs.expected_clean()), check_dtype=False)

    parquet = storage_jobs.etl(f"{bucket}/trips", f"{bucket}/clean").run(executor=executor, progress=False)
    assert parquet.success

    @step(inputs=["clean"])
    def rows(clean):
        return len(clean)

    by_file = Pipeline("back").add_source("clean", read_parquet(f"{bucket}/clean")).add_step(rows)
    by_group = Pipeline("back").add_source("clean", read_parquet(f"{bucket}/clean", split_row_groups=True))
    assert by_file.run(executor=executor, progress=False)["rows"] == len(storage_jobs.expected_clean())
    assert by_group.add_step(rows).run(executor=executor, progress=False)["rows"] == len(storage_jobs.expected_clean())


@step(inputs=["clean"], outputs=["checked"], per_partition=True)
def fail_on_march(clean):
    if str(clean["trip_id"].iloc[0]).startswith("2024-03"):
        raise ValueError("March does not add up")
    return clean


def test_storage_options_reach_every_touch_and_no_secret_ever_shows(executor, private_s3, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="flowyml")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **private_s3)
    bucket = f"private-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for month in storage_jobs.MONTHS:
        fs.pipe_file(f"{bucket}/trips/trips_{month}.csv",
                     storage_jobs.month_frame(month).to_csv(index=False).encode())
    # The environment points at the other server, which has no such bucket: a touch
    # that ignored storage_options would fail there.
    pipeline = (
        Pipeline("private", cache_dir=f"s3://{bucket}/cache", cache_storage_options=private_s3)
        .add_source("trips", read_csv(f"s3://{bucket}/trips/*.csv", storage_options=private_s3))
        .add_step(storage_jobs.clean)
        .add_step(fail_on_march)
        .add_step(write_parquet(f"s3://{bucket}/clean", input="clean", storage_options=private_s3))
    )
    first = pipeline.run(executor=executor, progress=False, on_failure="continue")
    second = pipeline.run(executor=executor, progress=False, on_failure="continue")
    assert not first.success and first.steps["fail_on_march"].status == "failed"
    assert first.steps["write_parquet"].status == "succeeded" and second.steps["write_parquet"].status == "cached"
    pd.testing.assert_frame_equal(sorted_frame(pd.read_parquet(f"s3://{bucket}/clean", storage_options=private_s3)),
                                  sorted_frame(storage_jobs.expected_clean()), check_dtype=False)

    shown = [
        repr(pipeline), *map(repr, pipeline.sources.values()), *map(repr, pipeline.steps.values()),
        *(repr(p) for p in pipeline.sources["trips"].partitions()),
        repr(first), first.summary(), json.dumps(first.to_dict(), default=str), first._repr_html_(),
        pipeline.to_dot(), pipeline.to_mermaid(), caplog.text,
        *(str(t) for t in first.tasks), first.steps["fail_on_march"].traceback,
    ]
    first.save_report(tmp_path / "run.html")
    shown.append((tmp_path / "run.html").read_text())
    stored = {path: fs.cat_file(path) for path in fs.find(bucket) if not path.startswith(f"{bucket}/trips/")}
    assert any("/cache/" in path for path in stored) and any(path.endswith(".parquet") for path in stored)
    for secret in (KEY_ID, SECRET):
        assert not [text for text in shown if secret in text], f"{secret} shows"
        assert not [path for path, data in stored.items() if secret.encode() in data or secret in path]


def test_worker_logs_forwarded_at_debug_carry_no_credentials(private_s3, caplog):
    # At DEBUG, what a step's libraries log on the workers reaches the driver: botocore
    # then logs every request's headers, the access key among them.
    caplog.set_level(logging.DEBUG, logger="flowyml")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **private_s3)
    bucket = f"private-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/trips/trips_2024-01.csv", storage_jobs.month_frame("2024-01").to_csv(index=False).encode())
    pipeline = Pipeline("debug").add_source(
        "trips", read_csv(f"s3://{bucket}/trips/*.csv", storage_options=private_s3)).add_step(storage_jobs.clean)
    with ParallelExecutor(max_workers=1, backend="process") as executor:  # opened at DEBUG: forwards DEBUG
        pipeline.run(executor=executor, progress=False)
    forwarded = [r.getMessage() for r in caplog.records if r.name.startswith("flowyml.steps.trips")]
    assert any("Credential=***/" in message for message in forwarded), "botocore's request headers were not seen"
    assert not [message for message in forwarded if KEY_ID in message or SECRET in message]


def test_a_source_object_changed_after_planning_is_not_read(bucket):
    storage_jobs.upload_months(f"{bucket}/trips", storage_jobs.MONTHS[:1])
    partition = read_csv(f"{bucket}/trips/*.csv").partitions()[0]
    storage_jobs.upload_months(f"{bucket}/trips", storage_jobs.MONTHS[:1])  # rewritten: a new ETag
    fsspec.filesystem("s3").pipe_file(f"{bucket[5:]}/trips/trips_{storage_jobs.MONTHS[0]}.csv", b"trip_id,fare\nx,1\n")
    with pytest.raises(DataError, match="changed while the run was planned or running"):
        partition.load()


# -- errors, before any task runs --------------------------------------------------------


calls: list[str] = []


@step(inputs=["trips"], per_partition=True)
def record_call(trips):
    calls.append("ran")
    return trips


def sync_run(pipeline: Pipeline):
    calls.clear()
    try:
        return pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    finally:
        assert calls == [], "a task ran before the error"


def test_an_unknown_scheme_names_the_source_or_sink(bucket):
    with pytest.raises(StorageError, match=r"source 'trips': nope://bucket/x\.csv: unknown URL scheme 'nope'"):
        sync_run(Pipeline("p").add_source("trips", read_csv("nope://bucket/x.csv")).add_step(record_call))
    with pytest.raises(StorageError, match=r"sink 'write_parquet': nope://bucket/out: unknown URL scheme"):
        write_parquet("nope://bucket/out", input="clean")


@pytest.mark.parametrize(("url", "package", "extra"), [("gs://bucket/x.csv", "gcsfs", "gcs"),
                                                      ("abfs://container/x.csv", "adlfs", "azure"),
                                                      ("s3://bucket/x.csv", "s3fs", "s3")])
def test_a_missing_filesystem_package_says_what_to_install(url, package, extra):
    script = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from flowyml import Pipeline, ParallelExecutor, read_csv, write_parquet\n"
        "from flowyml.exceptions import StorageError\n"
        "try:\n"
        f"    Pipeline('p').add_source('trips', read_csv({url!r})).add_step(len, name='n', inputs=['trips'])"
        ".run(executor=ParallelExecutor(backend='sync'), progress=False)\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
        "try:\n"
        f"    write_parquet({url.rsplit('/', 1)[0] + '/out'!r}, input='x')\n"
        "except StorageError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    assert lines[0].startswith(f"source 'trips': {url} needs a package")
    assert lines[1].startswith("sink 'write_parquet':")
    assert all(f'pip install "flowyml[{extra}]"' in line and package in line for line in lines)


def test_a_missing_bucket_is_named_before_any_task(bucket, s3_server):
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"
    shown = rf"source 'trips': cannot read {missing}/trips/\*\.csv: the bucket .* does not exist"
    with pytest.raises(StorageError, match=shown):
        sync_run(Pipeline("p").add_source("trips", read_csv(f"{missing}/trips/*.csv")).add_step(record_call))
    storage_jobs.upload_months(f"{bucket}/trips", storage_jobs.MONTHS[:1])
    sink = (Pipeline("p").add_source("trips", read_csv(f"{bucket}/trips/*.csv")).add_step(record_call)
            .add_step(write_parquet(f"{missing}/out", input="record_call")))
    with pytest.raises(StorageError, match=rf"sink 'write_parquet': cannot use {missing}/out: it does not exist"):
        sync_run(sink)
    cached = Pipeline("p", cache_dir=f"{missing}/cache").add_source("trips", read_csv(f"{bucket}/trips/*.csv"))
    with pytest.raises(StorageError, match=rf"the cache: cannot use {missing}/cache: it does not exist"):
        sync_run(cached.add_step(record_call))


def test_denied_access_is_named_before_any_task(locked_s3):
    with pytest.raises(StorageError, match=r"source 'trips': cannot use s3://locked/x/\*\.csv: access denied"):
        sync_run(Pipeline("p").add_source("trips", read_csv("s3://locked/x/*.csv", storage_options=locked_s3))
                 .add_step(record_call))
    with pytest.raises(StorageError, match=r"the cache: cannot use s3://locked/cache: access denied"):
        Pipeline("p", cache_dir="s3://locked/cache", cache_storage_options=locked_s3).add_source(
            "trips", [1]).add_step(len, name="n", inputs=["trips"]).run(
            executor=ParallelExecutor(backend="sync"), progress=False)


# -- the command line ------------------------------------------------------------------


def test_the_cli_reads_writes_and_caches_on_s3_with_credentials_from_the_environment(bucket, tmp_path):
    import os

    fs = fsspec.filesystem("s3")
    for local in sorted((ROOT / "data" / "trips").glob("*.csv")):
        fs.put_file(str(local), f"{bucket[5:]}/trips/{local.name}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWYML_", "PYTEST_")) or k == "FLOWYML_HOME"}
    env |= {"TRIPS_OUTPUT": f"{bucket}/trips_clean", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flowyml", "run", "examples/trips.py", "--backend", "thread",
               "--input", f"trips={bucket}/trips/*.csv", "--no-progress"]
    first = subprocess.run([*command, "--cache-dir", f"{bucket}/cache", "--report", str(tmp_path / "first.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    written = pd.read_parquet(f"{bucket}/trips_clean")
    local = [str(path) for path in sorted((ROOT / "data" / "trips").glob("*.csv"))]
    assert len(written) == len(expected_clean(local, min_fare=0.0))
    assert json.loads((tmp_path / "first.json").read_text())["steps"]["clean"]["partitions"] == len(local)
    second = subprocess.run([*command, "--report", str(tmp_path / "second.json")], cwd=ROOT,
                            env=env | {"FLOWYML_CACHE_DIR": f"{bucket}/cache"}, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    report = json.loads((tmp_path / "second.json").read_text())
    assert {step["status"] for step in report["steps"].values()} == {"cached"}
    pd.testing.assert_frame_equal(pd.read_parquet(f"{bucket}/trips_clean"), written)

"""The object-store commit protocol, on moto's S3 server and on ``memory://``.

What a reader of the output folder sees is checked with the readers users
have: pandas, pyarrow and dask.dataframe.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flowyml import write_parquet
from flowyml.exceptions import CommitConflictError, DataError, StorageError
from flowyml.io import objectstore
from flowyml.io.objectstore import Owner, abort, commit, stage_path, staging_prefix, write_owner


@pytest.fixture(params=["s3", "memory"])
def target(request, tmp_path):
    """An output prefix on the S3 server or in memory: ``(fs, path)``."""
    if request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        fs, root = fsspec.core.url_to_fs(bucket)
    else:
        fs, root = fsspec.core.url_to_fs(f"memory://{tmp_path.name}")
    return fs, f"{root}/out"


def stage(fs, target, run_id, frames: dict[str, pd.DataFrame]) -> list[str]:
    for name, frame in frames.items():
        buffer = io.BytesIO()
        frame.to_parquet(buffer)
        fs.pipe_file(stage_path(target, run_id, name), buffer.getvalue())
    return list(frames)


def frames_of(run: str, count: int) -> dict[str, pd.DataFrame]:
    return {f"part-{i:05d}.parquet": pd.DataFrame({"run": [run] * 2, "i": [i, i]}) for i in range(count)}


def read_every_way(fs, target) -> list[pd.DataFrame]:
    """The folder as pandas, pyarrow and dask.dataframe read it."""
    url = fs.unstrip_protocol(target)
    storage = {} if fs.protocol[0] == "memory" or "memory" in fs.protocol else None
    with dask.config.set(scheduler="sync"):
        return [
            pd.read_parquet(url),
            pq.read_table(target, filesystem=fs).to_pandas(),
            dd.read_parquet(url, storage_options=storage).compute(),
        ]


def sorted_rows(frame: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, frame[["run", "i"]].astype({"run": str}).itertuples(index=False)))


def test_a_commit_publishes_exactly_the_staged_data_for_every_reader(target):
    fs, path = target
    names = stage(fs, path, "r1", frames_of("r1", 3))
    committed = commit(fs, path, "r1", names)
    assert committed == [f"{path}/{name}" for name in sorted(names)]
    for frame in read_every_way(fs, path):
        assert sorted_rows(frame) == [("r1", i) for i in range(3) for _ in range(2)]
    assert not fs.exists(staging_prefix(path, "r1"))
    assert not fs.exists(f"{path}/_flowyml/commit.json")
    manifest = json.loads(fs.cat_file(f"{path}/_flowyml/manifest.json"))
    assert manifest["run_id"] == "r1" and manifest["files"] == sorted(names)


def test_a_new_commit_replaces_the_old_output_whole(target):
    fs, path = target
    commit(fs, path, "r1", stage(fs, path, "r1", frames_of("r1", 4)))
    commit(fs, path, "r2", stage(fs, path, "r2", frames_of("r2", 2)))
    for frame in read_every_way(fs, path):
        assert sorted_rows(frame) == [("r2", i) for i in range(2) for _ in range(2)]
    data = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path) if "/_flowyml/" not in p)
    assert data == ["part-00000.parquet", "part-00001.parquet"]


def test_a_missing_partition_commits_nothing(target):
    fs, path = target
    commit(fs, path, "r1", stage(fs, path, "r1", frames_of("r1", 2)))
    names = [*stage(fs, path, "r2", frames_of("r2", 2)), "part-00002.parquet"]
    with pytest.raises(DataError, match=r"1 partition file\(s\) were not written \(part-00002.parquet\)"):
        commit(fs, path, "r2", names)
    assert {r for frame in read_every_way(fs, path) for r, _ in sorted_rows(frame)} == {"r1"}


def test_a_commit_under_way_makes_a_second_one_fail_and_never_mix(target, monkeypatch):
    fs, path = target
    commit(fs, path, "r0", stage(fs, path, "r0", frames_of("r0", 3)))
    first_names = stage(fs, path, "r1", frames_of("r1", 3))
    second_names = stage(fs, path, "r2", frames_of("r2", 3))
    publishing, release = threading.Event(), threading.Event()
    publish = objectstore._publish

    def held_publish(fs_, target_, record):
        publishing.set()
        assert release.wait(30)
        publish(fs_, target_, record)

    monkeypatch.setattr(objectstore, "_publish", held_publish)
    errors = []
    first = threading.Thread(target=lambda: commit(fs, path, "r1", first_names))
    first.start()
    try:
        assert publishing.wait(30)
        monkeypatch.setattr(objectstore, "_publish", publish)
        with pytest.raises(CommitConflictError, match=r"run 'r1' \(process \d+ on .*\) is committing to it") as info:
            commit(fs, path, "r2", second_names)
        errors.append(info.value)
    finally:
        release.set()
        first.join()
    for frame in read_every_way(fs, path):
        assert sorted_rows(frame) == [("r1", i) for i in range(3) for _ in range(2)]
    assert fs.exists(staging_prefix(path, "r2"))  # the loser's run removes it (abort)
    abort(fs, path, "r2")
    assert not fs.exists(staging_prefix(path, "r2"))


def dead_owner() -> dict:
    """The owner record of a process that has exited (on this host)."""
    child = subprocess.run(
        [sys.executable, "-c", "import json, os, psutil, socket, time; "
         "print(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), "
         "'pid_started': psutil.Process().create_time(), 'started_at': time.time()}))"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(child.stdout)


def test_a_commit_whose_writer_died_is_finished_by_the_next_one(target):
    fs, path = target
    commit(fs, path, "r0", stage(fs, path, "r0", frames_of("r0", 3)))
    # r1 died while publishing: its record is there, one file copied, the old third file not yet removed.
    names = stage(fs, path, "r1", frames_of("r1", 2))
    record = {"run_id": "r1", "owner": dead_owner(), "staging": staging_prefix(path, "r1"),
              "files": names, "remove": ["part-00002.parquet"]}
    fs.pipe_file(f"{path}/_flowyml/commit.json", json.dumps(record).encode())
    fs.copy(stage_path(path, "r1", names[0]), f"{path}/{names[0]}")
    objectstore.remove_stale(fs, path)
    for frame in read_every_way(fs, path):
        assert sorted_rows(frame) == [("r1", i) for i in range(2) for _ in range(2)]
    assert not fs.exists(f"{path}/_flowyml/commit.json")


def test_the_next_commit_removes_dead_runs_staging_and_keeps_live_ones(target):
    fs, path = target
    old_other_host = {"host": "elsewhere", "pid": 1, "pid_started": 0.0,
                      "started_at": time.time() - objectstore.STALE_AFTER_S - 60}
    recent_other_host = {**old_other_host, "started_at": time.time() - 60}
    for run, owner in (("dead", dead_owner()), ("old", old_other_host), ("recent", recent_other_host)):
        stage(fs, path, run, frames_of(run, 1))
        fs.pipe_file(f"{staging_prefix(path, run)}/owner.json", json.dumps(owner).encode())
    stage(fs, path, "live", frames_of("live", 1))
    write_owner(fs, path, "live")  # this process: alive
    commit(fs, path, "r1", stage(fs, path, "r1", frames_of("r1", 1)))
    runs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/_flowyml/staging", detail=False))
    assert runs == ["live", "recent"]


def test_owner_liveness():
    me = Owner.me()
    assert not me.is_dead(lease=0)
    assert Owner.from_record(dead_owner()).is_dead(lease=1e9)
    assert Owner("elsewhere", 1, 0.0, time.time() - 100).is_dead(lease=10)
    assert not Owner("elsewhere", 1, 0.0, time.time() - 100).is_dead(lease=1000)


def test_an_s3fs_whose_exclusive_writes_overwrite_is_refused(monkeypatch, s3_server):
    # Before s3fs 2025.7.0 "xb" was a plain PUT: two commits would both claim the output.
    monkeypatch.setattr(objectstore, "_installed_version", lambda package: (2025, 2, 0))
    with pytest.raises(StorageError, match=r"sink 'write_parquet': .*s3fs makes from 2025\.7\.0 on; this is s3fs "
                                           r"2025\.2\.0\. pip install \"s3fs>=2025\.7\.0\""):
        write_parquet("s3://bucket/out", input="clean")
    write_parquet("memory://out", input="clean")  # other filesystems are not concerned

"""Cached runs: what a rerun computes, on every backend, with real files.

The job (``pipelines.monthly_job``) reads one CSV per month, parses, cleans,
summarizes and writes Parquet. Its steps log one line per partition they
compute (``pipelines.record``), so a test sees exactly what ran, whichever
process ran it. Results are compared with plain pandas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest

from flowyml import StepFailed
from flowyml.cache import Cache
from flowyml.exceptions import CacheWarning

from . import pipelines

REPO_ROOT = Path(__file__).resolve().parents[1]


class Job:
    """Folders of one test: input months, call logs, output, cache."""

    def __init__(self, root: Path, months=range(3)) -> None:
        self.root = root
        self.data = root / "months"
        self.logs = root / "logs"
        self.out = root / "out"
        self.cache = root / "cache"
        self.logs.mkdir()
        pipelines.write_parts(self.data, months)

    def pipeline(self, clean_step=pipelines.clean_v1, broken_flag=""):
        return pipelines.monthly_job(str(self.data), str(self.logs), str(self.out), str(self.cache),
                                     clean_step, broken_flag)

    def calls(self) -> dict[str, int]:
        """Log name -> calls since the last ``calls()``: what the last run computed."""
        counts = {}
        for path in sorted(self.logs.iterdir()):
            lines = len(path.read_text().splitlines())
            seen = getattr(self, "_seen", {}).get(path.name, 0)
            if lines > seen:
                counts[path.name] = lines - seen
        self._seen = {path.name: len(path.read_text().splitlines()) for path in self.logs.iterdir()}
        return counts

    def check_output(self, result, keep: int = 0) -> None:
        pd.testing.assert_series_equal(result["summary"], pipelines.pandas_monthly(str(self.data), keep))
        written = sorted(self.out.iterdir())
        assert [p.name for p in written] == [f"part-{i:05d}.parquet" for i in range(len(written))]
        back = pd.concat(pd.read_parquet(p) for p in written)
        whole = pd.concat(pipelines.pandas_read_csv(p) for p in sorted(self.data.glob("*.csv")))
        whole = whole.assign(amount=whole["value"] / 10)
        pd.testing.assert_frame_equal(back.reset_index(drop=True),
                                      whole[whole["value"] % 2 == keep].reset_index(drop=True))


def statuses(result) -> dict[str, str]:
    return {name: step.status for name, step in result.steps.items()}


@pytest.fixture
def job(tmp_path) -> Job:
    return Job(tmp_path)


def test_unchanged_rerun_computes_nothing(executor, job):
    first = job.pipeline().run(executor=executor, progress=False)
    job.check_output(first)
    assert job.calls() == {"parse-0": 1, "parse-1": 1, "parse-2": 1,
                           "clean-0": 1, "clean-1": 1, "clean-2": 1, "summary": 1}
    output_before = {p.name: p.stat().st_mtime_ns for p in job.out.iterdir()}

    again = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {}
    assert set(statuses(again).values()) == {"cached"}, statuses(again)
    assert again.steps["parse"].cached_partitions == again.steps["parse"].partitions == 3
    assert again.steps["write_parquet"].cached_partitions == 3
    pd.testing.assert_series_equal(again["summary"], first["summary"])
    assert again["write_parquet"] == first["write_parquet"]
    # The sink did nothing: the committed files are the same files.
    assert {p.name: p.stat().st_mtime_ns for p in job.out.iterdir()} == output_before


def test_one_new_file_computes_only_its_partitions(executor, job):
    job.pipeline().run(executor=executor, progress=False)
    job.calls()
    pipelines.write_parts(job.data, [3])  # next month arrives
    result = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {"parse-3": 1, "clean-3": 1, "summary": 1}
    job.check_output(result)
    assert result.steps["parse"].cached_partitions == 3 and result.steps["parse"].partitions == 4
    assert result.steps["parse"].status == "succeeded"
    assert result.steps["write_parquet"].cached_partitions == 3  # three files linked, one written


def test_a_rerun_adds_entries_and_rewrites_none(executor, job):
    """Entries of kept results stand as they are: rewriting one costs two fsyncs and says nothing new."""
    def entries() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in job.cache.rglob("*") if p.is_file()}

    job.pipeline().run(executor=executor, progress=False)
    before = entries()
    pipelines.write_parts(job.data, [3])
    job.pipeline().run(executor=executor, progress=False)
    after = entries()
    assert [p.name for p in before if after.get(p) != before[p]] == []
    assert len(after) > len(before)  # the new month's entries
    again = job.pipeline().run(executor=executor, progress=False)
    assert set(statuses(again).values()) == {"cached"}


def test_code_or_param_change_recomputes_that_step_and_downstream(executor, job):
    job.pipeline().run(executor=executor, progress=False)
    job.calls()
    changed = job.pipeline(clean_step=pipelines.clean_v2).run(executor=executor, progress=False)
    assert job.calls() == {"clean-0": 1, "clean-1": 1, "clean-2": 1, "summary": 1}  # parse was loaded
    assert statuses(changed)["parse"] == "cached"
    job.check_output(changed, keep=1)

    scaled = job.pipeline(clean_step=pipelines.clean_v2).set_params("summarize", scale=3)
    result = scaled.run(executor=executor, progress=False)
    assert job.calls() == {"summary": 1}
    assert statuses(result)["clean"] == "cached" and statuses(result)["summarize"] == "succeeded"
    pd.testing.assert_series_equal(result["summary"], pipelines.pandas_monthly(str(job.data), 1) * 3)


@pytest.mark.parametrize("on_failure", ["raise", "continue"])
def test_resume_after_failure_recomputes_only_the_failed_step_and_downstream(executor, job, on_failure):
    flag = job.root / "bug"
    flag.touch()
    if on_failure == "raise":
        with pytest.raises(StepFailed, match="the bug is still there"):
            job.pipeline(broken_flag=str(flag)).run(executor=executor, progress=False)
    else:
        failed = job.pipeline(broken_flag=str(flag)).run(executor=executor, on_failure="continue", progress=False)
        assert statuses(failed)["clean"] == "failed" and statuses(failed)["summarize"] == "skipped"
    before = job.calls()
    assert not job.out.exists()
    flag.unlink()  # the fix
    result = job.pipeline(broken_flag=str(flag)).run(executor=executor, progress=False)
    after = job.calls()
    job.check_output(result)
    # What finished before the failure is not computed again...
    assert all(before.get(f"parse-{p}", 0) + after.get(f"parse-{p}", 0) == 1 for p in range(3))
    # ...while the failed step and what depends on it are.
    assert {name: n for name, n in after.items() if not name.startswith("parse")} == {
        "clean-0": 1, "clean-1": 1, "clean-2": 1, "summary": 1}
    if on_failure == "continue":  # every independent task had finished: only those run
        assert after == {"clean-0": 1, "clean-1": 1, "clean-2": 1, "summary": 1}
        assert statuses(result)["parse"] == "cached"


def test_corrupt_entries_are_recomputed_with_a_warning(executor, job):
    first = job.pipeline().run(executor=executor, progress=False)
    job.calls()
    entries = sorted(job.cache.glob("*/*.entry"))
    summary_entry = _entry_of(job.cache, first["summary"])
    # A truncated entry fails the cheap check on the driver.
    data = summary_entry.read_bytes()
    summary_entry.write_bytes(data[: len(data) // 2])
    with pytest.warns(CacheWarning, match="truncated"):
        result = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {"summary": 1}
    pd.testing.assert_series_equal(result["summary"], first["summary"])
    # A flipped byte in the payload (same size) is only found when loaded: the
    # run discards it and goes again, recomputing that one task.
    summary_entry = _entry_of(job.cache, first["summary"])
    data = bytearray(summary_entry.read_bytes())
    data[-1] ^= 0xFF
    summary_entry.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match="checksum"):
        result = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {"summary": 1}
    pd.testing.assert_series_equal(result["summary"], first["summary"])
    assert len(sorted(job.cache.glob("*/*.entry"))) == len(entries)


def test_a_corrupt_partition_a_whole_step_reads_is_recomputed_with_the_new_file(executor, job, monkeypatch):
    # The cached partitions of ``clean`` reach ``summarize`` together (on the
    # process backend, the summarize task reads them itself, as it does large
    # ones: here, all): one that fails its checksum only when loaded is
    # recomputed, alone, and the run still succeeds.
    monkeypatch.setattr("flowyml.fuse.INLINE_LOAD_BYTES", 0)
    first = job.pipeline().run(executor=executor, progress=False)
    job.calls()
    entry = next(path for path in job.cache.glob("*/*.entry") if _is_clean_partition(job.cache, path, 0))
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    pipelines.write_parts(job.data, [3])
    with pytest.warns(CacheWarning, match="checksum"):
        result = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {"parse-3": 1, "clean-0": 1, "clean-3": 1, "summary": 1}
    job.check_output(result)
    assert result.steps["clean"].status == "succeeded" and result.steps["clean"].partitions == 4
    # 1 and 2 were read from the cache (3 too, when the first round stored it
    # before it was aborted: the next round finds it cached).
    assert result.steps["clean"].cached_partitions >= 2
    assert first.steps["clean"].partitions == 3


def _is_clean_partition(directory: Path, path: Path, part: int) -> bool:
    try:
        loaded = Cache(directory).load(path.name.split(".")[0])
    except Exception:
        return False
    return (isinstance(loaded, pd.DataFrame) and "amount" in loaded and len(loaded) > 0
            and (loaded["part"] == part).all() and (loaded["value"] % 2 == 0).all())


def _entry_of(directory: Path, value) -> Path:
    """The cache file holding ``value`` (found by loading every entry)."""
    cache = Cache(directory)
    for path in directory.glob("*/*.entry"):
        try:
            loaded = cache.load(path.name.split(".")[0])
        except Exception:
            continue
        if isinstance(loaded, type(value)) and isinstance(value, pd.Series) and loaded.equals(value):
            return path
    raise AssertionError("no entry holds the value")


def test_deleted_output_is_written_again(executor, job):
    job.pipeline().run(executor=executor, progress=False)
    job.calls()
    for path in job.out.iterdir():
        path.unlink()
    job.out.rmdir()
    result = job.pipeline().run(executor=executor, progress=False)
    assert job.calls() == {}  # clean partitions were loaded, not computed
    assert statuses(result)["write_parquet"] == "succeeded"
    job.check_output(result)


def test_cache_dir_from_the_environment(job, monkeypatch):
    from flowyml import ParallelExecutor

    monkeypatch.setenv("FLOWYML_CACHE_DIR", str(job.root / "env_cache"))
    pipeline = job.pipeline()
    pipeline.cache_dir = None
    executor = ParallelExecutor(backend="sync")
    pipeline.run(executor=executor, progress=False)
    assert list((job.root / "env_cache").glob("*/*.entry"))
    assert set(statuses(pipeline.run(executor=executor, progress=False)).values()) == {"cached"}


JOB_FILE = """
    import sys
    sys.path.insert(0, {repo!r})
    from tests import pipelines

    pipeline = pipelines.monthly_job({data!r}, {logs!r}, {out!r}, cache_dir=None)
"""


def test_cli_cache_dir_and_concurrent_runs_sharing_it(job, tmp_path):
    script = tmp_path / "monthly.py"
    script.write_text(textwrap.dedent(JOB_FILE.format(
        repo=str(REPO_ROOT), data=str(job.data), logs=str(job.logs), out=str(job.out))))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("FLOWYML_CACHE_DIR", None)

    def flowyml_run(report: str, backend: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "flowyml", "run", str(script), "--cache-dir", str(job.cache),
             "--backend", backend, "--workers", "2", "--no-progress", "-q", "--report", str(tmp_path / report)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    # Two runs at once share one cache directory (and one output directory).
    runs = [flowyml_run("a.json", "thread"), flowyml_run("b.json", "thread")]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    cache = Cache(job.cache)
    for path in job.cache.glob("*/*.entry"):
        cache.load(path.name.split(".")[0])  # every entry is whole and verified
    assert not list(job.cache.glob("*/*.tmp"))
    job.calls()
    third = flowyml_run("c.json", "sync")
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert job.calls() == {}
    report = json.loads((tmp_path / "c.json").read_text())
    assert {step["status"] for step in report["steps"].values()} == {"cached"}
    written = sorted(job.out.iterdir())
    assert len(written) == 3


def test_uncacheable_param_runs_uncached(job, caplog):
    from flowyml import ParallelExecutor

    pipeline = job.pipeline().set_params("summarize", log_dir=_LockedPath(job.logs))
    executor = ParallelExecutor(backend="thread", max_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        pipeline.run(executor=executor, progress=False)
        job.calls()
        result = pipeline.run(executor=executor, progress=False)
    assert job.calls() == {"summary": 1}  # summarize runs each time; the rest is cached
    assert statuses(result)["clean"] == "cached" and statuses(result)["summarize"] == "succeeded"
    assert "summarize" in caplog.text and "uncached" in caplog.text


class _LockedPath(os.PathLike):
    """A path that also holds a lock: it has no stable description, so no cache key."""

    def __init__(self, path) -> None:
        import threading

        self.path = str(path)
        self.lock = threading.Lock()

    def __fspath__(self) -> str:
        return self.path

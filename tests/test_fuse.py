"""Straight per-partition chains run as one task per partition on the process backend."""

from __future__ import annotations

from pathlib import Path

from flowyml import ParallelExecutor, read_csv
from flowyml.compile import compile_plan
from flowyml.fuse import FusedTask, fuse_partition_chains
from flowyml.tasks import RAISE

from . import pipelines

DATA = Path(__file__).resolve().parent.parent / "data"


def _graph(tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")), tmp_path / "out")
    plan = pipeline.plan()
    return compile_plan(plan, run_id="test", mode=RAISE)


def test_read_clean_write_chain_fuses_per_partition(tmp_path):
    graph = _graph(tmp_path)
    fused = fuse_partition_chains(graph.dsk, graph.output_keys)
    # clean feeds both the sink and fare_by_zone (whole): it must stay a task of its own,
    # while each source partition is absorbed into its clean task.
    chains = {key: task[0] for key, task in fused.items() if isinstance(task[0], FusedTask)}
    assert set(chains) == {("clean", i) for i in range(6)}
    assert all(chain.keys == (("trips", i), ("clean", i)) for (_, i), chain in chains.items())
    assert not any(key[0] == "trips" for key in fused if isinstance(key, tuple))
    assert "fare_by_zone" in fused and "write_parquet" in fused  # whole steps untouched


def test_private_chain_fuses_end_to_end(tmp_path):
    pipeline = (
        pipelines.Pipeline("chain")
        .add_source("trips", read_csv(str(DATA / "trips" / "trips_*.csv")))
        .add_step(pipelines.clean)
        .add_step(pipelines.count_rows)
    )
    graph = compile_plan(pipeline.plan(), run_id="t", mode=RAISE)
    fused = fuse_partition_chains(graph.dsk, graph.output_keys)
    assert set(fused) == {("count_rows", i) for i in range(6)}  # outputs are kept, everything else absorbed
    assert fused[("count_rows", 0)][0].keys == (("trips", 0), ("clean", 0), ("count_rows", 0))


def test_fused_run_reports_every_task(tmp_path):
    pipeline = pipelines.trips_pipeline(read_csv(str(DATA / "trips" / "trips_*.csv")), tmp_path / "out")
    with ParallelExecutor(max_workers=2, backend="process") as executor:
        result = pipeline.run(executor=executor, progress=False)
    reference = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    assert sorted(t.key for t in result.tasks) == sorted(t.key for t in reference.tasks)
    assert {n: (s.status, s.partitions) for n, s in result.steps.items()} == {
        n: (s.status, s.partitions) for n, s in reference.steps.items()
    }
    assert result["fare_by_zone"].equals(reference["fare_by_zone"])

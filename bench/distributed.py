"""Per-task overhead of flowyml on the distributed backend, against Dask by hand.

The same graph both ways, on one ``LocalCluster`` of 2 single-threaded
workers, in one process, alternating so that drift on a shared machine hits
both sides alike:

- by hand: ``client.get`` on a plain dict graph: ``N`` independent no-op
  tasks ``("noop", i)`` and one fan-in task that takes them all;
- flowyml: a pipeline of ``N`` steps (``noop_0`` ... ``noop_{N-1}``, the
  "parallel processing" shape of the docs) and one fan-in step over all of
  them (``def fan_in(*parts)``), run with ``pipeline.run``; building the
  pipeline is not timed, everything ``run`` does is (planning, compiling,
  submitting, events, the result).

Only the fan-in's value comes back to the client on either side.

Usage::

    python bench/distributed.py                 # N = 1,000 and 10,000, 5 repeats
    python bench/distributed.py --sizes 1000 --repeats 3

Prints one row per N: the median wall time of each side, the ratio
flowyml / by hand (the target is at most 1.15), and the per-task overhead.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where its own
# name would shadow the ``distributed`` package: put the repository there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from distributed import Client, LocalCluster  # noqa: E402

from flowyml import ParallelExecutor, Pipeline, step  # noqa: E402


def noop(i):
    return i


def fan_in(*parts):
    return len(parts)


def fan_in_list(parts):
    return len(parts)


@step
def noop_step(i):
    return i


def hand_graph(n: int) -> dict:
    """N independent no-op tasks and one fan-in, as a plain Dask graph."""
    dsk = {("noop", i): (noop, i) for i in range(n)}
    dsk["fan_in"] = (fan_in_list, [("noop", i) for i in range(n)])
    return dsk


def flowyml_pipeline(n: int) -> Pipeline:
    pipeline = Pipeline(f"bench_{n}")
    for i in range(n):
        pipeline.add_step(noop_step, name=f"noop_{i}", params={"i": i})
    pipeline.add_step(step(fan_in, name="fan_in", inputs=[f"noop_{i}" for i in range(n)]))
    return pipeline


def time_by_hand(client: Client, n: int) -> float:
    start = time.perf_counter()
    value = client.get(hand_graph(n), "fan_in")
    elapsed = time.perf_counter() - start
    assert value == n, value
    return elapsed


def time_flowyml(executor: ParallelExecutor, pipeline: Pipeline, n: int) -> float:
    start = time.perf_counter()
    result = pipeline.run(executor=executor, progress=False)
    elapsed = time.perf_counter() - start
    assert result["fan_in"] == n, result.outputs
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    rows = []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
    ) as cluster, Client(cluster, set_as_default=False) as client:
        with ParallelExecutor(client=client) as executor:
            for n in args.sizes:
                pipeline = flowyml_pipeline(n)
                time_by_hand(client, n)  # warm both paths (imports, worker caches)
                time_flowyml(executor, pipeline, n)
                hand, ours = [], []
                for _ in range(args.repeats):
                    hand.append(time_by_hand(client, n))
                    ours.append(time_flowyml(executor, pipeline, n))
                rows.append((n, statistics.median(hand), statistics.median(ours), hand, ours))

    print(f"{'tasks':>8} {'by hand (s)':>12} {'flowyml (s)':>12} {'ratio':>7} {'overhead/task':>14}")
    for n, hand, ours, _, _ in rows:
        per_task = (ours - hand) / (n + 1) * 1e6
        print(f"{n + 1:>8,} {hand:>12.3f} {ours:>12.3f} {ours / hand:>7.2f} {per_task:>11.1f} µs")
    print("(median of", args.repeats, "repeats each; ratio = flowyml / by hand, target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

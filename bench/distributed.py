"""Per-task overhead of flowyml on the distributed backend, against Dask by hand.

The same graph both ways, on one ``LocalCluster`` of 2 single-threaded
workers, in one process, alternating repeats so that drift on a shared
machine hits both sides alike:

- by hand: ``client.get`` on a plain dict graph of ``N`` independent no-op
  tasks and one fan-in task that takes them all, keyed as flowyml keys the
  shape below (``("noop", i)``, or ``("noop_step", "noop_i")`` for separate
  steps, copies of one function; ``--hand-keys names`` keys those
  ``"noop_i"``, one Dask task prefix per step, as flowyml did before);
- flowyml, two shapes of that graph, each timed around ``pipeline.run``
  (planning, compiling, submitting, task events, building the result;
  building the pipeline is not timed):

  ``partitions``
      a source of ``N`` partitions (each a no-op load) and one fan-in step
      over the partitioned asset: the shape of a per-file job;
  ``steps``
      ``N`` steps ``noop_0`` ... (the docs' "parallel processing" shape) and
      one fan-in step ``def fan_in(*parts)`` over all of them.

Only the fan-in's value comes back to the client on either side.

Usage::

    python bench/distributed.py                        # N = 1,000 and 10,000, 5 repeats
    python bench/distributed.py --sizes 1000 --repeats 3 --shapes partitions

Prints one row per shape and N: the median wall time of each side, the ratio
flowyml / by hand (the target is at most 1.15), and the overhead per task;
then, per N, separate steps against partitions on each side (the target is
at most 1.5).

The flowyml page's scheduler plugin (``flowyml.dashboard``), with it and
without it in one run::

    python bench/distributed.py --plugin-cost               # N = 2,000, 7 repeats
    python bench/distributed.py --plugin-cost --sizes 5000 --repeats 5

starts a ``dask scheduler --preload flowyml.dashboard`` and 2 single-threaded
``dask worker`` processes, runs the same flowyml pipelines against it by
address, alternating with the plugin's hooks on and off, and measures the CPU
time of the scheduler process (user + system) over each run. It prints the
scheduler's time per task both ways and their ratio (the target is at most
1.05: the plugin costs under 5% of the scheduler's time per task). Off, the
plugin is taken out of ``scheduler.plugins`` (no transition or event hook);
the run's announcement, two calls per run, is made both ways.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where its own
# name would shadow the ``distributed`` package: put the repository there instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
# The runs' history goes to a folder of its own, not the user's ~/.flowyml.
os.environ.setdefault("FLOWYML_HOME", tempfile.mkdtemp(prefix="flowyml-bench-home-"))

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


class NoopPart:
    def __init__(self, index: int) -> None:
        self.index = index

    def load(self) -> int:
        return self.index


class NoopSource:
    """``N`` partitions whose load is a no-op (no files: the cost measured is flowyml's)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def partitions(self) -> list[NoopPart]:
        return [NoopPart(i) for i in range(self.count)]


def hand_graph(n: int, shape: str, names: bool = False) -> dict:
    """N independent no-op tasks and one fan-in, as a plain Dask graph, keyed as flowyml keys them.

    ``partitions``: ``("noop", i)``; ``steps``: ``("noop_step", "noop_i")``,
    one task prefix either way. With ``names``, steps are keyed ``"noop_i"``:
    one prefix per step, on which Dask's scheduler is quadratic (see
    docs/distributed.md, "Large graphs").
    """
    if shape == "partitions":
        keys: list = [("noop", i) for i in range(n)]
    else:
        keys = [f"noop_{i}" for i in range(n)] if names else [("noop_step", f"noop_{i}") for i in range(n)]
    dsk = {key: (noop, i) for i, key in enumerate(keys)}
    dsk["fan_in"] = (fan_in_list, keys)
    return dsk


def flowyml_pipeline(n: int, shape: str) -> Pipeline:
    pipeline = Pipeline(f"bench_{shape}_{n}")
    if shape == "partitions":
        pipeline.add_source("numbers", NoopSource(n))
        return pipeline.add_step(step(fan_in_list, name="fan_in", inputs=["numbers"]))
    for i in range(n):
        pipeline.add_step(noop_step, name=f"noop_{i}", params={"i": i})
    return pipeline.add_step(step(fan_in, name="fan_in", inputs=[f"noop_{i}" for i in range(n)]))


def time_by_hand(client: Client, n: int, shape: str, names: bool = False) -> float:
    start = time.perf_counter()
    value = client.get(hand_graph(n, shape, names), "fan_in")
    elapsed = time.perf_counter() - start
    assert value == n, value
    return elapsed


def time_flowyml(executor: ParallelExecutor, pipeline: Pipeline, n: int) -> float:
    start = time.perf_counter()
    result = pipeline.run(executor=executor, progress=False)
    elapsed = time.perf_counter() - start
    assert result["fan_in"] == n, result.outputs
    assert len(result.tasks) == n + 1, len(result.tasks)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="default 1000 10000 (--plugin-cost: 2000)")
    parser.add_argument("--repeats", type=int, help="default 5 (--plugin-cost: 7)")
    parser.add_argument("--shapes", nargs="+", default=["partitions", "steps"], choices=["partitions", "steps"])
    parser.add_argument("--hand-keys", choices=["flowyml", "names"], default="flowyml",
                        help="key separate steps by hand as flowyml does, or by their names (the old shape)")
    parser.add_argument("--plugin-cost", action="store_true",
                        help="the flowyml page's scheduler plugin: the scheduler's CPU time with it and without")
    args = parser.parse_args(argv)
    if args.plugin_cost:
        return plugin_cost(args.sizes or [2000], args.repeats or 7, args.shapes)
    args.sizes, args.repeats = args.sizes or [1000, 10000], args.repeats or 5
    names = args.hand_keys == "names"
    logging.getLogger("distributed").setLevel(logging.ERROR)

    rows = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
        ParallelExecutor(client=client) as executor,
    ):
        for n in args.sizes:
            for shape in args.shapes:
                pipeline = flowyml_pipeline(n, shape)
                time_by_hand(client, n, shape, names)  # warm both paths (imports, worker caches)
                time_flowyml(executor, pipeline, n)
                hand, ours = [], []
                for _ in range(args.repeats):
                    hand.append(time_by_hand(client, n, shape, names))
                    ours.append(time_flowyml(executor, pipeline, n))
                rows.append((shape, n, statistics.median(hand), statistics.median(ours)))
                print(f"  {shape} N={n}: by hand {_fmt(hand)}; flowyml {_fmt(ours)}", flush=True)

    print()
    print(f"{'shape':<11} {'tasks':>7} {'by hand (s)':>12} {'flowyml (s)':>12} {'ratio':>6} {'overhead/task':>14}")
    for shape, n, hand, ours in rows:
        per_task = (ours - hand) / (n + 1) * 1e6
        print(f"{shape:<11} {n + 1:>7,} {hand:>12.3f} {ours:>12.3f} {ours / hand:>6.2f} {per_task:>11.0f} µs")
    print(f"(median of {args.repeats} alternating repeats; ratio = flowyml / by hand, target <= 1.15)")
    medians = {(shape, n): (hand, ours) for shape, n, hand, ours in rows}
    for n in args.sizes:
        if ("steps", n) in medians and ("partitions", n) in medians:
            (hand_steps, ours_steps), (hand_parts, ours_parts) = medians["steps", n], medians["partitions", n]
            print(f"N={n:,}: steps / partitions: by hand {hand_steps / hand_parts:.2f}, "
                  f"flowyml {ours_steps / ours_parts:.2f} (target <= 1.5)")
    return 0


def plugin_cost(sizes: list[int], repeats: int, shapes: list[str]) -> int:
    """The scheduler's CPU time per task with the flowyml page's plugin and without, alternating."""
    import json
    import os
    import subprocess
    import tempfile

    import psutil

    dask = str(Path(sys.executable).with_name("dask"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([sys.path[0], os.environ.get("PYTHONPATH", "")]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scheduler_file = Path(tmp, "scheduler.json")
        processes = [subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--preload", "flowyml.dashboard", "--scheduler-file", str(scheduler_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            while not scheduler_file.exists() or not scheduler_file.read_text().strip().endswith("}"):
                time.sleep(0.1)
            address = json.loads(scheduler_file.read_text())["address"]
            for i in range(2):
                processes.append(subprocess.Popen(
                    [dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                     "--name", f"w{i}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            scheduler = psutil.Process(processes[0].pid)
            with (Client(address, set_as_default=False) as client, ParallelExecutor(client=client) as executor):
                client.wait_for_workers(2)
                assert executor.flowyml_page_link, "the scheduler serves no flowyml page"
                for n in sizes:
                    for shape in shapes:
                        pipeline = flowyml_pipeline(n, shape)
                        time_flowyml(executor, pipeline, n)  # warm up
                        cpu: dict[bool, list[float]] = {True: [], False: []}
                        for _ in range(repeats):
                            for on in (True, False):
                                client.run_on_scheduler(_plugin_hooks, on=on)
                                before = sum(scheduler.cpu_times()[:2])
                                time_flowyml(executor, pipeline, n)
                                cpu[on].append(sum(scheduler.cpu_times()[:2]) - before)
                        client.run_on_scheduler(_plugin_hooks, on=True)
                        # The hooks' own time, measured inside the scheduler (an upper bound:
                        # the clock reads add to it), over runs not counted above.
                        hooks = []
                        for _ in range(repeats):
                            client.run_on_scheduler(_time_hooks, on=True)
                            time_flowyml(executor, pipeline, n)
                            hooks.append(client.run_on_scheduler(_time_hooks, on=False))
                        with_, without = statistics.median(cpu[True]), statistics.median(cpu[False])
                        rows.append((shape, n, with_, without, statistics.median(hooks)))
                        print(f"  {shape} N={n}: scheduler CPU with the plugin {_fmt(cpu[True])}; "
                              f"without {_fmt(cpu[False])}; in its hooks {_fmt(hooks)}", flush=True)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
    print()
    print(f"{'shape':<11} {'tasks':>7} {'with (µs/task)':>15} {'without (µs/task)':>18} {'ratio':>6} "
          f"{'hooks (µs/task)':>16} {'hooks / without':>16}")
    for shape, n, with_, without, hooks in rows:
        print(f"{shape:<11} {n + 1:>7,} {with_ / (n + 1) * 1e6:>15.0f} {without / (n + 1) * 1e6:>18.0f} "
              f"{with_ / without:>6.3f} {hooks / (n + 1) * 1e6:>16.1f} {hooks / without:>16.2%}")
    print(f"(scheduler process CPU, median of {repeats} alternating repeats; ratio = with / without, "
          f"target <= 1.05; hooks: the time spent in the plugin's hooks, inside the scheduler, "
          f"as a share of the scheduler's CPU time without the plugin, target < 5%)")
    return 0


def _plugin_hooks(dask_scheduler, on: bool) -> None:
    """On the scheduler: put the flowyml page's plugin in ``scheduler.plugins``, or take it out.

    Its announcement handler stays either way (and holds the plugin).
    """
    plugin = dask_scheduler.handlers["flowyml_dashboard"].__self__
    if on:
        dask_scheduler.plugins["flowyml-dashboard"] = plugin
    else:
        dask_scheduler.plugins.pop("flowyml-dashboard", None)


def _time_hooks(dask_scheduler, on: bool) -> float:
    """On the scheduler: time the plugin's hooks from now (``on``), or stop and return their seconds."""
    import time

    plugin = dask_scheduler.handlers["flowyml_dashboard"].__self__
    if not on:
        for name in ("transition", "log_event"):
            vars(plugin).pop(name, None)
        print(f"  the plugin's hooks: {plugin.bench_calls} calls, {plugin.bench_seconds:.4f} s", flush=True)
        return plugin.bench_seconds
    plugin.bench_seconds, plugin.bench_calls = 0.0, 0
    clock = time.perf_counter

    def timed(hook):
        def call(*args, **kwargs):
            start = clock()
            hook(*args, **kwargs)
            plugin.bench_seconds += clock() - start
            plugin.bench_calls += 1
        return call

    plugin.transition = timed(plugin.transition)
    plugin.log_event = timed(plugin.log_event)
    return 0.0


def _fmt(times: list[float]) -> str:
    return " ".join(f"{t:.3f}" for t in times)


if __name__ == "__main__":
    sys.exit(main())

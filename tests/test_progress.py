"""The progress display: a bar in a real terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flowyml.progress import Progress, auto_enabled

from .terminal import run_with_stderr_on_a_pty

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    from flowyml.progress import Progress
    with Progress(5, tasks_per_step={"load": 1, "clean": 4}, description="trips") as progress:
        print("enabled", progress.enabled, flush=True)
        progress.start("load"); progress.finish("load")
        for _ in range(4):
            progress.start("clean")
        progress.finish("clean"); progress.finish("clean")
        progress.refresh()              # the postfix shows what is running now
        progress.finish("clean"); progress.finish("clean", "failed")
    """
)


def _run_child(stderr_is_tty: bool, size: tuple[int, int] | None = None) -> tuple[str, str]:
    """Run CHILD with stderr on a pseudo-terminal (or a pipe); return (stdout, stderr).

    ``size`` is the terminal's (rows, columns); None leaves the pty reporting 0x0,
    as some container and CI terminals do.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT)
    if not stderr_is_tty:
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                              timeout=60, check=True)
        return done.stdout, done.stderr
    status, stdout, terminal = run_with_stderr_on_a_pty([sys.executable, "-c", CHILD], env=env, size=size,
                                                        timeout=60)
    assert status == 0, terminal
    return stdout, terminal


@pytest.mark.parametrize("size", [(30, 100), None], ids=["sized-terminal", "terminal-without-size"])
def test_bar_shows_in_a_real_terminal(size):
    stdout, terminal = _run_child(stderr_is_tty=True, size=size)
    assert "enabled True" in stdout  # auto mode: stderr is a terminal
    assert "5/5" in terminal, terminal
    assert "trips" in terminal
    assert "running clean×2" in terminal  # two clean tasks were running at the refresh
    assert "LOG" not in stdout  # the bar replaces per-step log lines


def test_without_a_terminal_it_logs_one_line_per_step_and_prints_nothing():
    stdout, stderr = _run_child(stderr_is_tty=False)
    assert "enabled False" in stdout
    assert stderr == ""
    lines = [line for line in stdout.splitlines() if line.startswith("LOG ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("LOG step 'load' succeeded: 1 task in ")
    assert lines[1].startswith("LOG step 'clean' failed: 4 tasks (1 failed) in ")


def test_auto_mode_is_off_for_a_non_terminal_stream(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert auto_enabled() is False
    assert Progress(3).enabled is False


def test_auto_mode_is_on_in_a_jupyter_kernel(monkeypatch):
    class FakeShell:
        kernel = object()

    class FakeIPython:
        @staticmethod
        def get_ipython():
            return FakeShell()

    monkeypatch.setitem(sys.modules, "IPython", FakeIPython)
    assert auto_enabled(io.StringIO()) is True
    FakeShell.kernel = None  # a terminal IPython is not a notebook
    assert auto_enabled(io.StringIO()) is False


def test_disabled_logs_each_step_once_when_its_last_task_finishes(caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    progress = Progress(4, tasks_per_step={"a": 2, "b": 2}, enabled=False)
    progress.start("a")
    progress.finish("a", "cached")
    assert caplog.messages == []
    progress.finish("a", "cached")
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("step 'a' cached: 2 tasks in ")
    progress.finish("b")
    progress.close()  # 'b' never got its second task: logged at close as stopped
    assert caplog.messages[1].startswith("step 'b' stopped: 1 of 2 tasks finished in ")
    progress.close()
    assert len(caplog.messages) == 2


def test_steps_without_a_known_count_are_logged_at_close(caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    with Progress(3, enabled=False) as progress:
        for _ in range(3):
            progress.finish("x")
        assert caplog.messages == []
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith("step 'x' succeeded: 3 tasks")


def test_enabled_bar_counts_tasks_from_many_threads():
    stream = io.StringIO()
    threads, per_thread = 8, 5000
    total = threads * per_thread
    progress = Progress(total, tasks_per_step={"s": total}, enabled=True, file=stream)

    def work():
        for _ in range(per_thread):
            progress.start("s")
            progress.finish("s")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert progress.done == total and progress.running_steps() == {}
    progress.close()
    assert f"{total}/{total}" in stream.getvalue()


def test_disabled_progress_is_thread_safe_and_logs_exactly_once(caplog):
    caplog.set_level(logging.INFO, logger="flowyml")
    threads, per_thread = 8, 2000
    progress = Progress(threads * per_thread, tasks_per_step={"s": threads * per_thread}, enabled=False)
    barrier = threading.Barrier(threads)

    def work():
        barrier.wait()
        for _ in range(per_thread):
            progress.start("s")
            progress.finish("s")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    progress.close()
    assert progress.done == threads * per_thread
    assert caplog.messages == [m for m in caplog.messages if m.startswith("step 's' succeeded: 16000 tasks")]
    assert len(caplog.messages) == 1


def _bare_counter_events(n: int) -> float:
    """Seconds for n tasks' start and finish on the least a thread-safe tally does: a baseline."""
    lock, running, done = threading.Lock(), {}, {}
    begin = time.perf_counter()
    for _ in range(n):
        with lock:
            time.perf_counter()
            running["s"] = running.get("s", 0) + 1
        with lock:
            time.perf_counter()
            running["s"] -= 1
            done["s"] = done.get("s", 0) + 1
    return time.perf_counter() - begin


def _progress_events(n: int, enabled: bool) -> tuple[float, int, float]:
    """(seconds for n tasks' start and finish, redraws, seconds the bar was open)."""
    stream = io.StringIO()
    opened = time.perf_counter()
    progress = Progress(n, tasks_per_step={"s": n}, enabled=enabled, file=stream)
    begin = time.perf_counter()
    for _ in range(n):
        progress.start("s")
        progress.finish("s")
    elapsed = time.perf_counter() - begin
    progress.close()
    return elapsed, stream.getvalue().count("\r"), time.perf_counter() - opened


@pytest.mark.parametrize("enabled", [False, True])
def test_a_task_event_costs_about_what_a_bare_counter_does(enabled):
    # 10,000s of tasks a second must cost the run little. Measured against a bare
    # locked counter in the same test (best of rounds, alternating), so a loaded
    # machine slows both alike; a redraw per task would cost some 50 times more.
    import flowyml.progress

    n, bare, costs = 20_000, [], []
    for _ in range(5):
        bare.append(_bare_counter_events(n))
        elapsed, redraws, open_for = _progress_events(n, enabled)
        costs.append(elapsed)
        if enabled:  # redraws are rate-limited by time, however many tasks finish
            # At most one per interval, plus four at the edges: the empty bar, the first
            # event, close's final count and tqdm's own close.
            limit = open_for / flowyml.progress.REDRAW_INTERVAL + 4
            assert 0 < redraws <= limit, (redraws, open_for)
        else:
            assert redraws == 0
    assert min(costs) < 10 * min(bare), (
        f"{min(costs) / n * 1e6:.2f} us per task against {min(bare) / n * 1e6:.2f} us for a bare counter"
    )


def test_a_redraw_reads_the_running_steps_not_every_step_seen(monkeypatch):
    # A run of 100,000 one-task steps redraws ten times a second; the postfix used
    # to scan every step's tally each time. Count what a redraw reads instead of timing it.
    stream = io.StringIO()
    n = 20_000
    progress = Progress(n, tasks_per_step={f"s{i}": 1 for i in range(n)}, enabled=True, file=stream)
    for i in range(n):
        progress.start(f"s{i}")
        progress.finish(f"s{i}")
    progress.start("s5")  # one task of an early step runs again, then a later one
    progress.start("s7")
    reads = 0

    class CountingTallies(dict):
        def __getitem__(self, key):
            nonlocal reads
            reads += 1
            return super().__getitem__(key)

        def items(self):
            raise AssertionError("a redraw scanned every step")

        def values(self):
            raise AssertionError("a redraw scanned every step")

    monkeypatch.setattr(progress, "_steps", CountingTallies(progress._steps))
    progress.refresh()
    assert progress.running_steps() == {"s5": 1, "s7": 1}  # in the order the steps first appeared
    assert reads <= 4
    progress.finish("s5")
    progress.finish("s7")
    monkeypatch.undo()
    progress.close()

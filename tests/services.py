"""Real services the tests start: Dask clusters (one whose workers share no disk) and an S3 API.

- :class:`Processes` starts subprocesses for a fixture and stops them at its end.
- :func:`start_cluster` starts a ``dask scheduler`` and ``dask worker`` processes
  on 127.0.0.1. With ``isolated=True`` each worker runs under
  ``unshare --mount`` with empty tmpfs mounted over the folders given (the
  driver's temporary and working folders): a worker then sees none of the
  driver's files, as on Kubernetes or a cloud cluster, and anything that
  passes through local disk by mistake fails.
- :class:`S3Server` is moto's S3 API server (``moto.server``) in its own process
  on 127.0.0.1: real HTTP, real multipart uploads, conditional writes.
- :class:`PostgresServer` is Debian's PostgreSQL, a server of its own on 127.0.0.1.

Nothing here binds anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).with_name("dask"))
START_TIMEOUT = 60


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, what: str, *, timeout: float = START_TIMEOUT, failed=lambda: None):
    """Poll ``condition()`` until it returns something truthy; raise after ``timeout`` seconds.

    ``failed()`` returning a message stops the wait at once (a process that died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        problem = failed()
        if problem:
            raise RuntimeError(f"{what}: {problem}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


class Processes:
    """Subprocesses started for a fixture, stopped (then killed) at its end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
        process = subprocess.Popen(args, cwd=ROOT, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def dead(self) -> str | None:
        for process in self.started:
            if process.poll() is not None:
                return f"{shlex.join(process.args)} exited with {process.returncode}"
        return None

    def stop(self) -> None:
        for process in reversed(self.started):
            process.terminate()
        for process in reversed(self.started):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None


def isolated(command: list[str], hide: list[str]) -> list[str]:
    """``command`` in a mount namespace of its own, with an empty tmpfs over each of ``hide``."""
    mounts = " && ".join(f"mount -t tmpfs flowyml-test-tmpfs {shlex.quote(path)}" for path in hide)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f"{mounts} && exec {shlex.join(command)}"]


def start_cluster(
    tmp: Path,
    processes: Processes,
    *,
    workers: list[list[str]],
    tls: list[str] = (),
    hide: list[str] = (),
    scheduler: list[str] = (),
) -> str:
    """Start a scheduler and one worker per entry of ``workers`` (its extra options); the address.

    ``scheduler``: extra options of ``dask scheduler`` (``--preload flowyml.dashboard``).

    ``hide``: folders each worker must not see (tmpfs mounted over them in its
    own mount namespace; Linux and root only). The scheduler and its file stay
    in ``tmp``, which the driver sees.
    """
    scheduler_file = tmp / "scheduler.json"
    log = tmp / "scheduler.log"
    env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="inf")
    processes.start(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
         "--scheduler-file", str(scheduler_file), *(["--protocol", "tls", *tls] if tls else []), *scheduler],
        log=log, env=env,
    )
    info = wait_until(lambda: _read_json(scheduler_file), f"the Dask scheduler (log {log})", failed=processes.dead)
    address = info["address"]
    for i, extra in enumerate(workers):
        command = [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--name", f"w{i}",
                   "--no-dashboard", *tls, *extra]
        processes.start(isolated(command, list(hide)) if hide else command, log=tmp / f"worker-{i}.log", env=env)
    return address


class S3Server:
    """moto's S3 API server in its own process on 127.0.0.1:``port``.

    ``env`` adds variables for the server (``INITIAL_NO_AUTH_ACTION_COUNT`` turns
    on moto's authentication, so unknown credentials are refused).
    """

    def __init__(self, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log
        self._env = env or {}
        self._processes = Processes()

    def start(self) -> S3Server:
        env = dict(os.environ, **self._env)
        self._processes.start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                              log=self.log, env=env)
        wait_until(self._ready, f"moto's S3 server (log {self.log})", failed=self._processes.dead)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        self._processes.stop()


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL programs (initdb, pg_ctl), newest version; None when not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


class PostgresServer:
    """A PostgreSQL server of its own on 127.0.0.1:``port``, its data in a fresh folder, trusting local users.

    As root (as CI runs), the server runs as the ``postgres`` user Debian's
    package makes, so its folder lies outside pytest's root-only temporary
    folder. ``url(database)`` is the SQLAlchemy URL of one database;
    :meth:`create_database` makes a fresh one.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.bin = postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="flowyml-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"

    def _as_owner(self, command: list[str]) -> None:
        if os.geteuid() == 0:
            command = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT)

    def start(self) -> PostgresServer:
        assert self.bin is not None, "no PostgreSQL programs under /usr/lib/postgresql"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._as_owner([str(self.bin / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data)])
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off"
        self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                        "-w", "-t", str(START_TIMEOUT), "start"])
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

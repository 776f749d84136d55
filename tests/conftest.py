"""Shared fixtures: one open executor per backend for the whole session.

Every behaviour test takes ``executor`` and so runs on all four backends; the
pools and the LocalCluster are started once, as a notebook user's would be
inside ``with ParallelExecutor(...)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from flowyml import ParallelExecutor

from .services import PostgresServer, S3Server, free_port, postgres_bin

# Every run records itself in the run history: the tests' go to a folder of
# their own, never to the user's ~/.flowyml, whatever the environment says.
FLOWYML_HOME = tempfile.mkdtemp(prefix="flowyml-test-home-")
os.environ["FLOWYML_HOME"] = FLOWYML_HOME
for _variable in ("FLOWYML_HISTORY", "FLOWYML_HISTORY_RETENTION"):
    os.environ.pop(_variable, None)

# The S3 API server's address and credentials are in the environment from the
# start, as on a machine configured for AWS: every pool and cluster the tests
# start inherits them, and code that passes no storage_options finds them as
# pandas and s3fs would. The server itself starts with the first test that needs it.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(
    AWS_ENDPOINT_URL=S3_ENDPOINT,
    AWS_ACCESS_KEY_ID="flowyml-test-key",
    AWS_SECRET_ACCESS_KEY="flowyml-test-secret",
    AWS_DEFAULT_REGION="us-east-1",
)
for _variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(_variable, None)

BACKENDS = ["sync", "thread", "process", "distributed"]


@pytest.fixture(scope="session", autouse=True)
def _flowyml_home():
    yield FLOWYML_HOME
    shutil.rmtree(FLOWYML_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _interpreter_helpers():
    """Python's own helper processes, started before any test.

    multiprocessing's resource tracker and the forkserver the process backend's
    workers fork from (:mod:`flowyml.executors.processes`) stay until Python
    exits, by design, once any pool started them: tests that count the child
    processes flowyml leaves behind must not count these.
    """
    from multiprocessing import forkserver, resource_tracker

    from flowyml.executors.processes import process_context

    resource_tracker.ensure_running()
    if process_context().get_start_method() == "forkserver":
        forkserver.ensure_running()


@pytest.fixture(scope="session")
def _executors():
    opened = {}
    yield opened
    for executor in opened.values():
        executor.close()


def _open(name: str, opened: dict) -> ParallelExecutor:
    if name not in opened:
        executor = ParallelExecutor(max_workers=2, backend=name)
        executor.__enter__()
        opened[name] = executor
    return opened[name]


@pytest.fixture(params=BACKENDS)
def executor(request, _executors) -> ParallelExecutor:
    return _open(request.param, _executors)


@pytest.fixture(params=["thread", "process"])
def pooled_executor(request, _executors) -> ParallelExecutor:
    """Backends where several tasks run at once and the driver waits for them."""
    return _open(request.param, _executors)


@pytest.fixture(params=["sync", "thread"])
def in_process_executor(request, _executors) -> ParallelExecutor:
    """Backends whose steps run in the driver's own process: nothing is pickled."""
    return _open(request.param, _executors)


@pytest.fixture(params=["process", "distributed"])
def worker_executor(request, _executors) -> ParallelExecutor:
    """Backends whose steps run in worker processes that can die on their own."""
    return _open(request.param, _executors)


@pytest.fixture
def process_executor(_executors) -> ParallelExecutor:
    """The process backend: its pool, not Dask, recovers from a dead worker."""
    return _open("process", _executors)


@pytest.fixture
def backend(executor) -> str:
    return executor.backend


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 API server on 127.0.0.1, for the whole session (see ``S3_ENDPOINT``)."""
    server = S3Server(int(S3_ENDPOINT.rsplit(":", 1)[1]), tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the S3 server; its URL, ``s3://<name>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL, a server of its own on 127.0.0.1 for the whole session.

    Installed here when it is missing and this is root on Debian (as ``.ci/run`` does).
    """
    if postgres_bin() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql",
                       shell=True, capture_output=True, timeout=900)
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed and could not be (apt-get install postgresql; .ci/run does)")
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A new, empty database on the PostgreSQL server; its SQLAlchemy URL."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")

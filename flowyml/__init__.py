"""flowyml: batch pipelines of pandas work on Dask.

Decorate plain functions with :func:`step`, wire them into a :class:`Pipeline`,
and run the same pipeline on Dask's synchronous, threaded, multiprocessing or
distributed scheduler with one setting::

    from flowyml import Pipeline, ParallelExecutor, step

    @step
    def process_chunk(chunk_id):
        return f"processed_{chunk_id}"

    pipeline = Pipeline("parallel_processing")
    for i in range(5):
        pipeline.add_step(process_chunk, name=f"chunk_{i}", params={"chunk_id": i})
    result = pipeline.run(executor=ParallelExecutor(max_workers=4))
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

# Cheap (the standard library only), so imported now. ``step`` must be: the
# function shares its name with the module ``flowyml.step``, which importing
# the module later would set on this package in its place.
from .exceptions import (
    BackendError,
    CommitConflictError,
    ContractError,
    CycleError,
    DataError,
    DuplicateNameError,
    FlowymlError,
    MissingInputError,
    NotPicklableError,
    OptionError,
    OutputNotFoundError,
    ParameterError,
    PipelineError,
    StepFailed,
    StepTimeoutError,
    StorageError,
    WorkerDiedError,
)
from .step import Step, step

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ below
    from .context import TaskContext, current_task
    from .executors import ParallelExecutor
    from .io import read_csv, read_delta, read_parquet, write_csv, write_delta, write_parquet
    from .pipeline import Pipeline
    from .result import PipelineResult, StepResult, TaskRecord

__version__ = "0.1.0"

# A library stays silent until the application configures logging.
logging.getLogger("flowyml").addHandler(logging.NullHandler())

# The other public names -> the module that defines each, imported on first
# use (PEP 562): ``import flowyml`` (the command's --help, say) costs no pandas
# or Dask until a name that needs them is used.
_MODULE_OF: dict[str, str] = {
    **dict.fromkeys(("TaskContext", "current_task"), ".context"),
    "ParallelExecutor": ".executors",
    **dict.fromkeys(("read_csv", "read_delta", "read_parquet", "write_csv", "write_delta", "write_parquet"), ".io"),
    "Pipeline": ".pipeline",
    **dict.fromkeys(("PipelineResult", "StepResult", "TaskRecord"), ".result"),
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'flowyml' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BackendError",
    "CommitConflictError",
    "ContractError",
    "CycleError",
    "DataError",
    "DuplicateNameError",
    "FlowymlError",
    "MissingInputError",
    "NotPicklableError",
    "OptionError",
    "OutputNotFoundError",
    "ParallelExecutor",
    "ParameterError",
    "Pipeline",
    "PipelineError",
    "PipelineResult",
    "Step",
    "StepFailed",
    "StepResult",
    "StepTimeoutError",
    "StorageError",
    "TaskContext",
    "TaskRecord",
    "WorkerDiedError",
    "__version__",
    "current_task",
    "read_csv",
    "read_delta",
    "read_parquet",
    "step",
    "write_csv",
    "write_delta",
    "write_parquet",
]

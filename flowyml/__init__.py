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

from .context import TaskContext, current_task
from .exceptions import (
    BackendError,
    CommitConflictError,
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
from .executors import ParallelExecutor
from .io import read_csv, read_delta, read_parquet, write_csv, write_delta, write_parquet
from .pipeline import Pipeline
from .result import PipelineResult, StepResult, TaskRecord
from .step import Step, step

__version__ = "0.1.0"

# A library stays silent until the application configures logging.
logging.getLogger("flowyml").addHandler(logging.NullHandler())

__all__ = [
    "BackendError",
    "CommitConflictError",
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

"""The sink steps users add to a pipeline: :func:`write_parquet` and :func:`write_csv`.

They build a per-partition :class:`~flowyml.step.Step` around the machinery
of :mod:`flowyml.io.sinks` (staged partitions, one commit) or, with
``partition_on=``, of :mod:`flowyml.io.hive_sink`. Kept apart from both so
that neither has to import the other back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from flowyml.exceptions import OptionError
from flowyml.io.filesystem import redact_url
from flowyml.io.hive_sink import HiveOutput, check_sink_options
from flowyml.io.sinks import Output, _Committer, _PartitionWriter

__all__ = ["write_csv", "write_parquet"]


def _sink(fmt: str, path: str | os.PathLike[str], input: str, name: str | None,
          storage_options: dict[str, Any] | None, partition_on: Any = None, mode: str = "overwrite") -> Any:
    from flowyml.step import Step

    step_name = name or f"write_{fmt}"
    declared = f"write_{fmt}({redact_url(os.fspath(path))!r})"
    if not isinstance(input, str) or not input:
        raise OptionError(f"{declared} needs input='<asset name>' to say what to write, got {input!r}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise OptionError(f"{declared}: storage_options must be a dict (as for pandas), "
                          f"got {type(storage_options).__name__}")
    keys = check_sink_options(f"sink {step_name!r} ({declared})", partition_on, mode)
    # Resolved here, on the driver: workers may run elsewhere.
    if keys is None:
        output = Output(path, storage_options, who=f"sink {step_name!r}")
    else:
        output = HiveOutput(path, storage_options, who=f"sink {step_name!r}", partition_on=keys, mode=mode)
    return Step(
        func=_PartitionWriter(output, fmt),
        name=step_name,
        inputs=(input,),
        per_partition=True,
        finalize=_Committer(output),
        abort=output.abort,
        begin=output.begin,
    )


def write_parquet(path: str | os.PathLike[str], *, input: str, name: str | None = None,
                  storage_options: dict[str, Any] | None = None, partition_on: Sequence[str] | None = None,
                  mode: str = "overwrite") -> Any:
    """A step that writes ``input`` as Parquet files ``path/part-00000.parquet``, ...

    ``path`` is a local folder or an fsspec URL (``s3://bucket/clean``), with
    ``storage_options`` for its filesystem as in pandas (credentials from the
    environment work without). Each partition is written by the worker that
    computed it, into a staging area of the run, so every file appears whole
    or not at all. Once all are written they replace the previous output:
    locally in one rename of the staging folder; on an object store through
    the commit of :mod:`flowyml.io.objectstore`. A failed run leaves the
    previous output untouched. The step's asset (named after the step,
    ``write_parquet`` unless ``name=`` says otherwise) is the list of written
    paths (URLs on an object store).

    ``partition_on=["year", "month"]`` writes the Hive layout instead,
    ``path/year=2024/month=01/part-00000.parquet``: each worker splits its
    partition by those columns, which the files then do not hold (they are in
    the folder names). ``mode="overwrite"`` (the default) replaces the whole
    output; ``mode="overwrite_partitions"`` (with ``partition_on``) replaces
    only the key folders this run wrote. See :mod:`flowyml.io.hive_sink`.

    Examples
    --------
    >>> sink = write_parquet("out/clean", input="clean")
    >>> sink.name, sink.inputs, sink.per_partition
    ('write_parquet', ('clean',), True)
    """
    return _sink("parquet", path, input, name, storage_options, partition_on, mode)


def write_csv(path: str | os.PathLike[str], *, input: str, name: str | None = None,
              storage_options: dict[str, Any] | None = None) -> Any:
    """Like :func:`write_parquet`, as CSV files with a header and no index."""
    return _sink("csv", path, input, name, storage_options)

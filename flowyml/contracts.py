"""Data contracts on a step's output: ``@step(output_schema=<pandera schema>)``.

The check runs on the worker, in the task, right after the step returns: for
a per-partition step once per partition, so a bad month fails on its own and
early, not in the step that later trips over it. A contract is a pandera
schema (``DataFrameSchema``, ``SeriesSchema`` or a ``DataFrameModel`` class),
or a dict of them by output name for a step with several outputs; pandera is
an optional dependency (``pip install "flowyml[pandera]"``). A failing check
raises :class:`~flowyml.exceptions.ContractError` naming the step, the
partition, every failed check with how many rows failed it, and the first
failing rows. The task then fails like any other: ``StepFailed`` under
``on_failure="raise"``; under ``"continue"`` the other partitions go on and
``PipelineResult.contract_failures`` lists the failed ones with their files.
A contract is checked once per task, not retried: ``retries`` are for
failures that may pass on a second attempt, and a contract's verdict on the
same data does not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import ContractError

__all__ = ["ContractFailure", "check_contract", "contract_failures"]

#: Failing rows shown in a ContractError's message.
SHOWN_ROWS = 5


def check_contract(step: str, partition: int | None, schema: Any, outputs: Sequence[str] | None, value: Any) -> None:
    """Validate ``value`` (a task's result) against ``schema``; raise ContractError if it fails."""
    if isinstance(schema, Mapping):
        names = list(outputs or ())
        several = len(names) > 1
        pairs = [(name, schema[name], value[names.index(name)] if several else value) for name in schema]
    else:
        pairs = [(None, schema, value)]
    for output, contract, data in pairs:
        message = None
        try:
            contract.validate(data, lazy=True)
        except Exception as exc:  # pandera's SchemaError(s), or a check that itself raised
            message = _message(step, partition, output, data, exc)
        if message is not None:
            # Raised outside the except block: pandera's errors hold the data and
            # do not pickle whole, and a __context__ would travel with this one.
            raise ContractError(message)


def _message(step: str, partition: int | None, output: str | None, data: Any, exc: Exception) -> str:
    where = f"step {step!r}" + (f" partition {partition}" if partition is not None else "")
    what = f"output {output!r}" if output is not None else "its output"
    cases = getattr(exc, "failure_cases", None)
    if cases is None or not hasattr(cases, "groupby") or cases.empty:
        return f"{where}: {what} breaks its output_schema: {type(exc).__name__}: {exc}"
    lines = []
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        subject = f"column {column!r}" if isinstance(column, str) else "the frame"
        lines.append(f"  {subject} failed {check} ({len(group)} value{'s' if len(group) != 1 else ''}: "
                     f"{_sample(group['failure_case'])})")
    text = f"{where}: {what} breaks its output_schema:\n" + "\n".join(lines)
    rows = _failing_rows(data, cases)
    if rows:
        text += f"\nfirst failing rows:\n{rows}"
    return text


def _sample(values: Any) -> str:
    # numpy scalars as Python values: -7, not np.int64(-7)
    shown = [repr(v.item() if hasattr(v, "item") else v) for v in list(values)[:SHOWN_ROWS]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f", ... {more} more" if more > 0 else "")


def _failing_rows(data: Any, cases: Any) -> str:
    index = [i for i in cases["index"].tolist() if i is not None and i == i]  # i == i: not NaN
    if not index or not hasattr(data, "index"):
        return ""
    try:
        rows = data[data.index.isin(index)].head(SHOWN_ROWS)
    except Exception:  # an exotic index: the checks above say enough
        return ""
    return rows.to_string() if len(rows) else ""


@dataclass(frozen=True)
class ContractFailure:
    """A task whose output broke its step's contract, in ``PipelineResult.contract_failures``.

    ``files`` are the source files its partition was read from (empty for a
    whole step or an in-memory input); ``error`` the one-line reason.
    """

    step: str
    partition: int | None
    files: tuple[str, ...]
    error: str


def contract_failures(
    records: Any, origins: Mapping[str, str], sources: Mapping[str, list[Any]]
) -> list[ContractFailure]:
    """The run's failed tasks whose cause is a ContractError, with their partition's files."""
    found = []
    for record in records:
        error = getattr(record, "error", None)
        cause = getattr(error, "__cause__", None)
        if not isinstance(cause, ContractError):
            continue
        files: tuple[str, ...] = ()
        source = origins.get(record.step)
        if source is not None and record.partition is not None:
            part = sources[source][record.partition]
            describe = getattr(part, "describe", None)
            files = (describe(),) if describe is not None else ()
        found.append(ContractFailure(record.step, record.partition, files, str(cause).splitlines()[0]))
    found.sort(key=lambda f: (f.step, -1 if f.partition is None else f.partition))
    return found

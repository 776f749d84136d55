"""The words a run reports: how a step or task ended, and what a run does when a step fails.

Both are ``StrEnum``\\ s: a member compares equal to its plain string
(``result.steps["clean"].status == "failed"``), formats as it, and is written
to JSON as it, so code and reports written against the strings keep working.

>>> Status.FAILED == "failed", f"{Status.CACHED}", OnFailure("continue")
(True, 'cached', <OnFailure.CONTINUE: 'continue'>)
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["OnFailure", "Status"]


class Status(StrEnum):
    """How a step (``StepResult.status``) or a task (``TaskRecord.status``) ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: An input failed or was skipped: it did not run.
    SKIPPED = "skipped"
    #: None of its tasks had to run: their results came from the cache.
    CACHED = "cached"
    #: The run raised before this step finished (a step's status in ``StepFailed.result`` only).
    STOPPED = "stopped"

    @classmethod
    def of(cls, value: str) -> Status:
        """The member for ``value`` (a plain string or a member), by a dict lookup.

        Tasks report their status as plain strings (see :mod:`flowyml.tasks`);
        the report turns one per task into a member, where ``Status(value)``
        would cost more than the rest of that task's record.
        """
        return _BY_VALUE[value]


_BY_VALUE: dict[str, Status] = {member.value: member for member in Status}


class OnFailure(StrEnum):
    """What a run does when a step fails: ``Pipeline.run(on_failure=...)``."""

    #: The first failed step raises :class:`~flowyml.exceptions.StepFailed`.
    RAISE = "raise"
    #: Independent branches finish; steps downstream of a failure are skipped.
    CONTINUE = "continue"

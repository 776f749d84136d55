"""Plan: a validated, ordered view of a pipeline for one run (pure data).

Planning is pure: it checks that every input has a producer, orders the steps
the requested outputs need, and finds cycles, without importing an executor
or reading any data. :mod:`flowyml.compile` turns a :class:`Plan` into a Dask
graph and :mod:`flowyml.run` runs it.

A pipeline is often planned again and again unchanged (a notebook, a
scheduled service), so a :class:`Planner` remembers the *shape* of its recent
plans: everything that depends on the pipeline and on the names of the run
inputs and outputs, but not on the inputs' values. The pipeline empties that
memo on every change.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .bulk import no_gc_passes
from .exceptions import CycleError, MissingInputError
from .step import Binding, Step

__all__ = ["MAX_PLANS", "Plan", "Planner"]


@dataclass(frozen=True)
class Plan:
    """A validated, ordered view of a pipeline for one run.

    ``steps`` are in dependency order and include only those the requested
    ``outputs`` need; ``producer`` maps each asset to the step (or input)
    that makes it; ``bindings`` say how each step's inputs reach its function.
    ``pipeline``, ``cache_dir`` and ``cache_storage_options`` are the
    pipeline's name and cache as they were when it was planned: all a run
    needs of the pipeline.
    """

    pipeline: str
    steps: tuple[Step, ...]
    bindings: Mapping[str, Binding]
    producer: Mapping[str, str]
    inputs: Mapping[str, Any]  # asset name -> value or source, for run inputs and sources
    outputs: tuple[str, ...]
    cache_dir: str | os.PathLike[str] | None = None
    cache_storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials: never shown
    # Compiled layouts of this plan's graph, shared by the plans the pipeline
    # remembers until it changes (see flowyml.compile); not part of the plan's value.
    layouts: dict = field(default_factory=dict, compare=False, repr=False)


#: Plans a pipeline remembers at once (distinct run-input names and outputs).
MAX_PLANS = 16


@dataclass(frozen=True)
class _Shape:
    """A plan without its input values: what depends on the pipeline and on names only."""

    steps: tuple[Step, ...]
    bindings: Mapping[str, Binding]
    producer: Mapping[str, str]
    needed: tuple[str, ...]  # the given assets (sources, run inputs) the steps read
    outputs: tuple[str, ...]
    layouts: dict = field(default_factory=dict, compare=False, repr=False)


class Planner:
    """Plans the runs of one pipeline and remembers the shapes of recent plans.

    It reads the pipeline's own ``steps``, ``bindings`` and ``producers``
    dicts (not copies: the pipeline keeps them up to date as steps are added),
    and the pipeline calls :meth:`forget` whenever it changes.
    """

    def __init__(
        self, steps: Mapping[str, Step], bindings: Mapping[str, Binding], producers: Mapping[str, str]
    ) -> None:
        self._steps = steps
        self._bindings = bindings
        self._producers = producers
        # By run-input names and outputs (a notebook or a scheduler runs the
        # same pipeline again and again).
        self._shapes: dict[tuple, _Shape] = {}

    def forget(self) -> None:
        """The pipeline changed: no remembered plan holds any more."""
        self._shapes.clear()

    def plan(
        self,
        name: str,
        sources: Mapping[str, Any],
        inputs: Mapping[str, Any] | None = None,
        outputs: Iterable[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_storage_options: dict[str, Any] | None = None,
    ) -> Plan:
        """The plan of pipeline ``name`` for these run ``inputs`` and ``outputs``.

        ``sources`` are the pipeline's; run ``inputs`` override them. Raises
        what :meth:`flowyml.Pipeline.plan` documents.
        """
        given = {**sources, **dict(inputs or {})}
        if outputs is not None:
            outputs = tuple([outputs] if isinstance(outputs, str) else outputs)
        memo: tuple[frozenset[str], tuple[str, ...] | None] | None
        memo = (frozenset(inputs or ()), outputs)
        try:
            shape = self._shapes.get(memo)
        except TypeError:  # an unhashable output name: _shape says what is wrong with it
            shape = memo = None
        if shape is None:
            with no_gc_passes():
                shape = self._shape(name, given, outputs)
            if memo is not None:
                if len(self._shapes) >= MAX_PLANS:
                    self._shapes.clear()
                self._shapes[memo] = shape
        return Plan(
            pipeline=name,
            steps=shape.steps,
            bindings=shape.bindings,
            producer=shape.producer,
            inputs={a: given[a] for a in shape.needed},
            outputs=shape.outputs,
            cache_dir=cache_dir,
            cache_storage_options=cache_storage_options,
            layouts=shape.layouts,
        )

    def _shape(self, name: str, given: Mapping[str, Any], outputs: tuple[str, ...] | None) -> _Shape:
        """What :meth:`plan` finds, but the input values: it depends on input names only."""
        steps = self._steps
        producer = {asset: step for asset, step in self._producers.items() if asset not in given}
        producer |= {asset: asset for asset in given}
        consumed = {asset for s in steps.values() for asset in s.inputs}
        for s in steps.values():
            for asset in s.inputs:
                if asset not in producer:
                    known = sorted(producer) or ["(none)"]
                    raise MissingInputError(
                        f"step {s.name!r} needs input {asset!r}, which no step, source or "
                        f"run input provides; known assets: {', '.join(known)}. Add a step "
                        f"with outputs=[{asset!r}], add_source({asset!r}, ...), or pass "
                        f"run(inputs={{{asset!r}: ...}})"
                    )
        if outputs is None:
            wanted = tuple(a for s in steps.values() for a in s.asset_names if a not in consumed)
        else:
            wanted = outputs
            for asset in wanted:
                if asset not in producer:
                    raise MissingInputError(
                        f"pipeline {name!r} has no asset {asset!r} to return; "
                        f"known assets: {', '.join(sorted(producer))}"
                    )
        order = _order(name, steps, producer, wanted, given)
        if len(order) < len(steps):
            # Steps the outputs do not need may still loop among themselves (and a
            # loop of steps that all consume each other has no leaf output at all):
            # a cycle anywhere is an error, whatever the outputs.
            _order(name, steps, producer, [a for s in steps.values() for a in s.asset_names if a not in given], given)
        needed = {a: None for s in order for a in s.inputs if a in given}
        needed |= {a: None for a in wanted if a in given}
        return _Shape(
            steps=tuple(order),
            bindings=MappingProxyType({s.name: self._bindings[s.name] for s in order}),
            producer=MappingProxyType(producer),
            needed=tuple(needed),
            outputs=wanted,
        )


def _order(
    name: str,
    steps: Mapping[str, Step],
    producer: Mapping[str, str],
    wanted: Iterable[str],
    given: Mapping[str, Any],
) -> list[Step]:
    """Depth-first topological order of the steps ``wanted`` needs; finds cycles.

    A given asset (a source or run input) is not computed, even when a step
    that would produce it has the asset's name.
    """
    order: list[Step] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(step: str) -> None:
        if state.get(step) == 2 or step not in steps:
            return
        if state.get(step) == 1:
            loop = [*path[path.index(step):], step]
            raise CycleError(
                f"pipeline {name!r} has a cycle: {' -> '.join(loop)}; "
                f"a step cannot depend on its own outputs",
                loop,
            )
        state[step] = 1
        path.append(step)
        for asset in steps[step].inputs:
            if asset not in given:
                visit(producer[asset])
        path.pop()
        state[step] = 2
        order.append(steps[step])

    for asset in wanted:
        if asset not in given:
            visit(producer[asset])
    return order

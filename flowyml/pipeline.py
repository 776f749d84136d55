"""Pipeline: named steps and sources wired by asset names.

Building is pure: adding steps checks names, params and signatures, and
:meth:`Pipeline.plan` orders the steps and checks inputs and cycles. Nothing
here imports an executor or starts anything; :mod:`flowyml.compile` turns a
plan into a Dask graph and :mod:`flowyml.run` runs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .bulk import no_gc_passes
from .exceptions import CycleError, DuplicateNameError, MissingInputError, PipelineError
from .step import Binding, Step, step as make_step

if TYPE_CHECKING:
    from .executors import ParallelExecutor
    from .result import PipelineResult

__all__ = ["Pipeline", "Plan"]


@dataclass(frozen=True)
class Plan:
    """A validated, ordered view of a pipeline for one run.

    ``steps`` are in dependency order and include only those the requested
    ``outputs`` need; ``producer`` maps each asset to the step (or input)
    that makes it; ``bindings`` say how each step's inputs reach its function.
    """

    steps: tuple[Step, ...]
    bindings: Mapping[str, Binding]
    producer: Mapping[str, str]
    inputs: Mapping[str, Any]  # asset name -> value or source, for run inputs and sources
    outputs: tuple[str, ...]
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


class Pipeline:
    """Steps wired by asset names, run as one Dask graph.

    Parameters
    ----------
    name : str
        Shown in logs, reports and the dashboard.
    cache_dir : path, optional
        Where task results are cached between runs (default: ``FLOWYML_CACHE_DIR``).

    Examples
    --------
    >>> from flowyml import Pipeline, ParallelExecutor, step
    >>> @step
    ... def process_chunk(chunk_id):
    ...     return f"processed_{chunk_id}"
    >>> pipeline = Pipeline("parallel_processing")
    >>> for i in range(3):
    ...     _ = pipeline.add_step(process_chunk, name=f"chunk_{i}", params={"chunk_id": i})
    >>> result = pipeline.run(executor=ParallelExecutor(backend="sync"), progress=False)
    >>> result["chunk_2"]
    'processed_2'
    """

    def __init__(self, name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineError(f"a pipeline name must be a non-empty string, got {name!r}")
        self.name = name
        self.cache_dir = cache_dir
        self._steps: dict[str, Step] = {}
        self._sources: dict[str, Any] = {}
        self._bindings: dict[str, Binding] = {}
        # asset -> producing step, kept up to date by add_step: rebuilding it for
        # every added step made building N steps O(N^2) (17 s for 10,000).
        self._producers: dict[str, str] = {}
        # Plans of the pipeline as it is now, by run-input names and outputs (a
        # notebook or a scheduler runs the same pipeline again and again);
        # every change empties it.
        self._plans: dict[tuple, _Shape] = {}

    @property
    def steps(self) -> Mapping[str, Step]:
        """Step name -> :class:`~flowyml.step.Step`, in the order added (read-only: use ``add_step``)."""
        return MappingProxyType(self._steps)

    @property
    def sources(self) -> Mapping[str, Any]:
        """Source name -> source or value, in the order added (read-only: use ``add_source``)."""
        return MappingProxyType(self._sources)

    def _changed(self) -> None:
        self._plans.clear()

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self.steps)} steps, {len(self.sources)} sources>"

    # -- building -----------------------------------------------------------------

    def add_step(
        self,
        step_or_function: Step | Callable[..., Any],
        *,
        name: str | None = None,
        params: Mapping[str, Any] | None = None,
        inputs: str | Iterable[str] | None = None,
        outputs: str | Iterable[str] | None = None,
        **step_options: Any,
    ) -> Pipeline:
        """Add a step (or a plain function); returns the pipeline, so calls chain.

        Keyword arguments override the decorator's options. The same function may
        be added many times under different names.
        """
        base = step_or_function if isinstance(step_or_function, Step) else make_step(step_or_function)
        overrides = {key: value for key, value in step_options.items()}
        for key, value in (("name", name), ("params", params), ("inputs", inputs), ("outputs", outputs)):
            if value is not None:
                overrides[key] = dict(value) if key == "params" else value
        added = base.with_options(**overrides) if overrides else base
        self._check_names(added)
        binding = added.bind()
        self._steps[added.name] = added
        self._bindings[added.name] = binding
        for asset in added.asset_names:
            self._producers[asset] = added.name
        self._changed()
        return self

    def add_source(self, name: str, source: Any) -> Pipeline:
        """Add a named input (``read_csv(...)``, ``read_parquet(...)`` or a value)."""
        if not isinstance(name, str) or not name:
            raise PipelineError(f"a source name must be a non-empty string, got {name!r}")
        if name in self._sources or name in self._steps or name in self._assets():
            raise DuplicateNameError(
                f"pipeline {self.name!r}: source {name!r} clashes with an existing step, "
                f"source or output of that name; choose another name"
            )
        if hasattr(source, "name") and getattr(source, "name", None) is None:
            source.name = name
        self._sources[name] = source
        self._changed()
        return self

    def set_params(self, step_name: str, **params: Any) -> Pipeline:
        """Change some params of an added step (the CLI's ``--param STEP.KEY=VALUE``)."""
        if step_name not in self._steps:
            raise PipelineError(
                f"pipeline {self.name!r} has no step {step_name!r}; its steps are "
                f"{', '.join(self.steps) or '(none)'}"
            )
        changed = self._steps[step_name].with_options(params={**self._steps[step_name].params, **params})
        self._bindings[step_name] = changed.bind()
        self._steps[step_name] = changed
        self._changed()
        return self

    def _assets(self) -> dict[str, str]:
        """Asset -> the step that produces it (read-only)."""
        return self._producers

    def _check_names(self, new: Step) -> None:
        if new.name in self._steps:
            raise DuplicateNameError(
                f"pipeline {self.name!r} already has a step named {new.name!r}; "
                f"pass name=... to add_step to add it again under another name"
            )
        if new.name in self._sources:
            raise DuplicateNameError(
                f"pipeline {self.name!r}: step {new.name!r} has the name of a source; rename one"
            )
        assets = self._assets()
        for asset in new.asset_names:
            if asset in assets:
                raise DuplicateNameError(
                    f"pipeline {self.name!r}: output {asset!r} of step {new.name!r} is already "
                    f"produced by step {assets[asset]!r}; give it another name with outputs=[...]"
                )
            if asset in self._sources:
                raise DuplicateNameError(
                    f"pipeline {self.name!r}: output {asset!r} of step {new.name!r} has the "
                    f"name of a source; rename one"
                )

    # -- planning -----------------------------------------------------------------

    def plan(
        self, inputs: Mapping[str, Any] | None = None, outputs: Iterable[str] | None = None
    ) -> Plan:
        """Check and order the steps that ``outputs`` need, given run ``inputs``.

        Raises
        ------
        MissingInputError
            A step needs an asset no step, source or run input provides.
        CycleError
            Steps depend on each other in a loop (the message shows the loop).
        """
        given = {**self._sources, **dict(inputs or {})}
        if outputs is not None:
            outputs = tuple([outputs] if isinstance(outputs, str) else outputs)
        memo = (frozenset(inputs or ()), outputs)
        try:
            shape = self._plans.get(memo)
        except TypeError:  # an unhashable output name: _shape says what is wrong with it
            shape = memo = None
        if shape is None:
            with no_gc_passes():
                shape = self._shape(given, outputs)
            if memo is not None:
                if len(self._plans) >= MAX_PLANS:
                    self._plans.clear()
                self._plans[memo] = shape
        return Plan(
            steps=shape.steps,
            bindings=shape.bindings,
            producer=shape.producer,
            inputs={a: given[a] for a in shape.needed},
            outputs=shape.outputs,
            layouts=shape.layouts,
        )

    def _shape(self, given: Mapping[str, Any], outputs: tuple[str, ...] | None) -> _Shape:
        """What :meth:`plan` finds, but the input values: it depends on input names only."""
        producer = {asset: name for asset, name in self._assets().items() if asset not in given}
        producer |= {asset: asset for asset in given}
        consumed = {asset for s in self._steps.values() for asset in s.inputs}
        for s in self._steps.values():
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
            wanted = tuple(a for s in self._steps.values() for a in s.asset_names if a not in consumed)
        else:
            wanted = outputs
            for asset in wanted:
                if asset not in producer:
                    raise MissingInputError(
                        f"pipeline {self.name!r} has no asset {asset!r} to return; "
                        f"known assets: {', '.join(sorted(producer))}"
                    )
        order = self._order(producer, wanted, given)
        if len(order) < len(self._steps):
            # Steps the outputs do not need may still loop among themselves (and a
            # loop of steps that all consume each other has no leaf output at all):
            # a cycle anywhere is an error, whatever the outputs.
            self._order(producer, [a for s in self._steps.values() for a in s.asset_names if a not in given], given)
        needed = {a: None for s in order for a in s.inputs if a in given}
        needed |= {a: None for a in wanted if a in given}
        return _Shape(
            steps=tuple(order),
            bindings=MappingProxyType({s.name: self._bindings[s.name] for s in order}),
            producer=MappingProxyType(producer),
            needed=tuple(needed),
            outputs=wanted,
        )

    def _order(self, producer: Mapping[str, str], wanted: Iterable[str], given: Mapping[str, Any]) -> list[Step]:
        """Depth-first topological order of the steps ``wanted`` needs; finds cycles.

        A given asset (a source or run input) is not computed, even when a step
        that would produce it has the asset's name.
        """
        order: list[Step] = []
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(name: str) -> None:
            if state.get(name) == 2 or name not in self._steps:
                return
            if state.get(name) == 1:
                loop = path[path.index(name) :] + [name]
                raise CycleError(
                    f"pipeline {self.name!r} has a cycle: {' -> '.join(loop)}; "
                    f"a step cannot depend on its own outputs",
                    loop,
                )
            state[name] = 1
            path.append(name)
            for asset in self._steps[name].inputs:
                if asset not in given:
                    visit(producer[asset])
            path.pop()
            state[name] = 2
            order.append(self._steps[name])

        for asset in wanted:
            if asset not in given:
                visit(producer[asset])
        return order

    # -- running --------------------------------------------------------------------

    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        executor: ParallelExecutor | None = None,
        outputs: Iterable[str] | None = None,
        on_failure: str = "raise",
        progress: bool | None = None,
    ) -> PipelineResult:
        """Run the pipeline and return a :class:`~flowyml.result.PipelineResult`.

        Parameters
        ----------
        inputs : dict, optional
            Asset name -> value or source; overrides ``add_source`` for this run.
        executor : ParallelExecutor, optional
            Where to run; default ``ParallelExecutor()`` (``FLOWYML_BACKEND`` or ``process``).
        outputs : list of str, optional
            Assets to return; only the steps they need run. Default: every leaf asset.
        on_failure : {"raise", "continue"}
            ``raise``: a failing step raises :class:`~flowyml.exceptions.StepFailed`.
            ``continue``: independent branches finish, dependents are skipped, and
            the result lists the failures.
        progress : bool, optional
            Show a progress bar; default: on in a terminal or notebook.
        """
        from .run import run_pipeline

        return run_pipeline(
            self, inputs, executor=executor, outputs=outputs, on_failure=on_failure, progress=progress
        )

    def to_delayed(
        self, inputs: Mapping[str, Any] | None = None, *, outputs: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """The compiled graph as ``dask.delayed`` objects, one per asset.

        Use it to mix flowyml with other Dask code::

            dask.compute(*pipeline.to_delayed().values())

        Failures raise the user's exception; retries and timeouts still apply.
        """
        from .compile import compile_plan, to_delayed
        from .tasks import PLAIN

        plan = self.plan(inputs, outputs)
        return to_delayed(compile_plan(plan, run_id="delayed", mode=PLAIN), plan)

    # -- pictures -------------------------------------------------------------------

    def to_mermaid(self) -> str:
        """The step graph as a Mermaid ``flowchart`` (renders on GitHub and in many docs tools)."""
        from .visualize import to_mermaid

        return to_mermaid(*self.graph_description())

    def to_dot(self) -> str:
        """The step graph in Graphviz DOT."""
        from .visualize import to_dot

        return to_dot(*self.graph_description(), name=self.name)

    def visualize(self, path: str | os.PathLike[str] | None = None) -> str:
        """The step graph as SVG, drawn by Graphviz's ``dot``; written to ``path`` if given.

        Without Graphviz installed this raises a :class:`FlowymlError` that says how
        to install it; :meth:`to_mermaid` needs nothing.
        """
        from .visualize import render_svg

        svg = render_svg(self.to_dot())
        if path is not None:
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(svg)
        return svg

    def _repr_html_(self) -> str:
        """Jupyter shows the graph (SVG where Graphviz is installed, else the Mermaid text)."""
        import html

        from .exceptions import FlowymlError

        try:
            svg = self.visualize()
            # Inline SVG in HTML takes no XML prolog or DOCTYPE: keep from <svg on.
            picture = svg[svg.find("<svg"):]
        except FlowymlError:
            picture = f"<pre>{html.escape(self.to_mermaid())}</pre>"
        counts = [f"{n} {word}{'s' if n != 1 else ''}"
                  for n, word in ((len(self.steps), "step"), (len(self.sources), "source")) if n]
        return (
            f"<div><div><strong>Pipeline {html.escape(self.name)}</strong>: "
            f"{', '.join(counts) or 'no steps'}</div>{picture}</div>"
        )

    def graph_description(self) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
        """Nodes and edges of the step graph (for :mod:`flowyml.visualize`)."""
        nodes = [
            {"name": name, "kind": "source", "per_partition": True, "partitions": None, "status": None}
            for name in self.sources
        ]
        producer = {**self._assets(), **{name: name for name in self._sources}}
        edges = []
        for s in self.steps.values():
            nodes.append(
                {
                    "name": s.name,
                    "kind": "sink" if s.finalize is not None else "step",
                    "per_partition": s.per_partition,
                    "partitions": None,
                    "status": None,
                }
            )
            for asset in s.inputs:
                if asset in producer:
                    edges.append((producer[asset], s.name, asset))
        return nodes, edges

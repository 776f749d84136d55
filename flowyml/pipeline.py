"""Pipeline: named steps and sources wired by asset names.

Building is pure, running is separate: adding steps checks names, params and
signatures, and :meth:`Pipeline.plan` (:mod:`flowyml.plan`) orders the steps
and checks inputs and cycles. Nothing here imports an executor or starts
anything at import time; :meth:`Pipeline.run` and :meth:`Pipeline.to_delayed`
are shortcuts into :mod:`flowyml.run` and :mod:`flowyml.compile`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .exceptions import DuplicateNameError, PipelineError
from .plan import Plan, Planner
from .step import Binding, Step
from .step import step as make_step

if TYPE_CHECKING:
    from .executors import ParallelExecutor
    from .result import PipelineResult
    from .status import OnFailure

__all__ = ["Pipeline"]


class Pipeline:
    """Steps wired by asset names, run as one Dask graph.

    Parameters
    ----------
    name : str
        Shown in logs, reports and the dashboard.
    cache_dir : path or URL, optional
        Where task results are cached between runs (default: ``FLOWYML_CACHE_DIR``):
        a local folder, or an fsspec URL (``s3://bucket/cache``) that every worker
        reaches, for clusters whose workers share no disk.
    cache_storage_options : dict, optional
        ``storage_options`` for a ``cache_dir`` URL's filesystem (credentials,
        endpoint), as in pandas; the environment's credentials work without.

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

    def __init__(self, name: str, *, cache_dir: str | os.PathLike[str] | None = None,
                 cache_storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineError(f"a pipeline name must be a non-empty string, got {name!r}")
        self.name = name
        self.cache_dir = cache_dir
        self.cache_storage_options = cache_storage_options
        self._steps: dict[str, Step] = {}
        self._sources: dict[str, Any] = {}
        self._bindings: dict[str, Binding] = {}
        # asset -> producing step, kept up to date by add_step: rebuilding it for
        # every added step made building a pipeline quadratic in its steps.
        self._producers: dict[str, str] = {}
        # Remembers the shapes of recent plans; every change makes it forget them.
        self._planner = Planner(self._steps, self._bindings, self._producers)

    @property
    def steps(self) -> Mapping[str, Step]:
        """Step name -> :class:`~flowyml.step.Step`, in the order added (read-only: use ``add_step``)."""
        return MappingProxyType(self._steps)

    @property
    def sources(self) -> Mapping[str, Any]:
        """Source name -> source or value, in the order added (read-only: use ``add_source``)."""
        return MappingProxyType(self._sources)

    def _changed(self) -> None:
        self._planner.forget()

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
        overrides = dict(step_options)
        for key, value in (("name", name), ("inputs", inputs), ("outputs", outputs)):
            if value is not None:
                overrides[key] = value
        if params is not None:
            overrides["params"] = dict(params)
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
        return self._planner.plan(self.name, self._sources, inputs, outputs, cache_dir=self.cache_dir,
                                  cache_storage_options=self.cache_storage_options)

    # -- running --------------------------------------------------------------------

    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        executor: ParallelExecutor | None = None,
        outputs: Iterable[str] | None = None,
        on_failure: OnFailure | str = "raise",
        progress: bool | None = None,
        history: bool | str | None = None,
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
        on_failure : {"raise", "continue"} or OnFailure
            ``raise``: a failing step raises :class:`~flowyml.exceptions.StepFailed`.
            ``continue``: independent branches finish, dependents are skipped, and
            the result lists the failures.
        progress : bool, optional
            Show a progress bar; default: on in a terminal or notebook.
        history : bool or str, optional
            Record the run in the run history (:mod:`flowyml.history`): default
            as ``FLOWYML_HISTORY`` says (on, in ``$FLOWYML_HOME/history.db``);
            False records nothing; a database URL records it there.
        """
        from .run import run_plan, run_settings

        # Checked before planning, as a run always has: a typo costs nothing.
        mode, executor = run_settings(on_failure, executor)
        return run_plan(self.plan(inputs, outputs), executor=executor, on_failure=mode, progress=progress,
                        history=history)

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
        nodes: list[dict[str, Any]] = [
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
                    "split_every": s.split_every,
                    "partitions": None,
                    "status": None,
                }
            )
            for asset in s.inputs:
                if asset in producer:
                    edges.append((producer[asset], s.name, asset))
        return nodes, edges

"""Plan -> Dask task graph. Pure: it imports no executor and starts nothing.

The graph is a plain dict (Dask's own format), built in one pass at a small
fraction of what ``dask.delayed`` would cost a task:

- a whole step is one task keyed by its name: ``"chunk_0"``;
- partition *i* of a per-partition step or of a source is ``("clean", i)``;
- with ``group_copies`` (the distributed backend), a whole step whose
  function the pipeline adds under several names is keyed by the function,
  then the step: ``("process_chunk", "chunk_0")``. Dask's scheduler names a
  task's prefix and group after the key's first part, and its cost per
  finished task grows with the number of prefixes it has tasks of in flight:
  10,000 copies keyed ``"chunk_<i>"`` are 10,000 prefixes and a run quadratic
  in them (see ``docs/distributed.md``), keyed by the function they are one.
  The step name stays in the key, so the dashboard's task stream and errors
  show it; :func:`partition_of` reads the partition back from any key;
- a sink's commit task is keyed by its name once its partitions are done;
- a ``split_every`` step's tree tasks are ``("total", j)``, numbered level by
  level, and its last task is ``"total"``, as for a whole step;
- every task is ``(callable, *dependency_keys)``: the callable
  (:mod:`flowyml.tasks`) carries the step and its params, so Dask never mistakes
  a param for a key, and the arguments are keys or lists of keys only.

A ``key_suffix`` (the distributed backend's run token) keeps two concurrent
runs of one pipeline on one cluster apart; Dask's dashboard strips it, so task
prefixes stay the step names (the function's, for grouped copies).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .bulk import no_gc_passes
from .plan import Plan
from .step import Binding, Step
from .tasks import FinalizeTask, SourceTask, StepSpec, StepTask, ValueTask, _argument

__all__ = ["AssetRef", "CompiledGraph", "compile_plan", "is_source", "partition_of", "to_delayed"]

Key = Hashable


@dataclass(slots=True, unsafe_hash=True)
class AssetRef:
    """Where an asset's value lives in the graph (read-only by convention).

    ``keys`` holds one key for a whole asset, or one per partition; ``selector``
    picks one output of a multi-output step. Not ``frozen``: a frozen
    dataclass costs several times more to build, and compiling builds one per asset per run.
    """

    step: str
    keys: tuple[Key, ...]
    partitioned: bool
    selector: int | None = None

    def collect(self, results: Mapping[Key, Any]) -> Any:
        """The asset's value from computed task results (partitions combined in order)."""
        if self.partitioned:
            return _argument([results[key] for key in self.keys], (self.selector, True))
        return _argument(results[self.keys[0]], (self.selector, False))


@dataclass
class CompiledGraph:
    """A plan as a Dask graph plus what a run needs to read it back."""

    dsk: dict[Key, Any]
    assets: dict[str, AssetRef]
    outputs: tuple[str, ...]
    run_id: str
    step_keys: dict[str, list[Key]] = field(default_factory=dict)
    partitions: dict[str, int | None] = field(default_factory=dict)
    per_partition: dict[str, bool] = field(default_factory=dict)
    # What the graphs of one layout share and compute once (see _Layout.shared).
    shared: dict[str, Any] = field(default_factory=dict, repr=False)
    # Partitioned step (or source) -> the source whose partitions it runs over,
    # and this run's resolved source partitions: a partition's files, for reports.
    origins: dict[str, str] = field(default_factory=dict, repr=False)
    sources: Mapping[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def output_keys(self) -> list[Key]:
        """The keys to ask the scheduler for: those of the requested outputs."""
        seen: dict[Key, None] = {}
        for asset in self.outputs:
            for key in self.assets[asset].keys:
                seen.setdefault(key, None)
        return list(seen)

    def task_step(self) -> dict[Key, str]:
        """Task key -> step (or source) name (read-only)."""
        found = self.shared.get("task_step")
        if found is None:
            found = self.shared["task_step"] = {key: name for name, keys in self.step_keys.items() for key in keys}
        return found

    def tasks_per_step(self) -> dict[str, int]:
        """Step (or source) name -> its number of tasks (read-only)."""
        found = self.shared.get("tasks_per_step")
        if found is None:
            found = self.shared["tasks_per_step"] = {name: len(keys) for name, keys in self.step_keys.items()}
        return found


def partition_of(key: Key) -> int | None:
    """The partition a task key stands for: ``("clean", 3)`` -> 3; ``"chunk_0"`` or ``("f", "chunk_0")`` -> None."""
    if type(key) is tuple and type(key[1]) is int:
        return key[1]
    return None


def is_source(value: Any) -> bool:
    """A partitioned source (``read_csv``...), as opposed to an in-memory value."""
    return callable(getattr(value, "partitions", None)) and not isinstance(value, type)


def compile_plan(
    plan: Plan,
    *,
    run_id: str,
    mode: int,
    key_suffix: str = "",
    source_partitions: Mapping[str, list[Any]] | None = None,
    group_copies: bool = False,
) -> CompiledGraph:
    """Build the task graph for ``plan``.

    The graph's shape (keys, wiring, each step's :class:`~flowyml.tasks.StepSpec`)
    depends on the plan, the key suffix and the sources' partition counts only:
    it is laid out once and kept with the pipeline's plan, so running the same
    pipeline again only creates this run's task objects.

    Parameters
    ----------
    plan : Plan
        From :meth:`Pipeline.plan`.
    run_id : str
        Unique per run; tasks see it in :func:`flowyml.context.current_task`.
    mode : int
        ``tasks.PLAIN``, ``RAISE`` or ``CONTINUE``.
    key_suffix : str
        Appended to every key's name part (``"clean-1a2b3c4d"``).
    source_partitions : dict, optional
        Already-resolved partitions per source; resolved here when absent.
    group_copies : bool
        Key the whole-step tasks of a function added under several names
        ``(function, step)``, so that Dask counts them as one task prefix.
    """
    resolved = dict(source_partitions or {})
    counts: list[int | None] = []
    for name, value in plan.inputs.items():
        if is_source(value):
            if name not in resolved:
                resolved[name] = value.partitions()
            counts.append(len(resolved[name]))
        else:
            counts.append(None)
    shape = (key_suffix, tuple(counts), group_copies)
    layout = plan.layouts.get(shape) if not key_suffix else None  # a run token: laid out once anyway
    if layout is None:
        with no_gc_passes():
            layout = _Layout(plan, key_suffix, resolved, group_copies)
        if not key_suffix:
            if len(plan.layouts) >= MAX_LAYOUTS:
                plan.layouts.clear()
            plan.layouts[shape] = layout
    # One task object per task, and no cycle among them: the collector's passes
    # over a heap this grows by 100,000 objects cost more than creating them.
    with no_gc_passes():
        return layout.graph(run_id, mode, plan.inputs, resolved)


#: Layouts kept per plan (distinct source partition counts).
MAX_LAYOUTS = 8
_STEP, _SOURCE, _VALUE, _FINALIZE = range(4)


class _Layout:
    """A plan's graph without its run: keys, wiring and step specs, reused across runs.

    ``entries`` hold, per task in dependency order, ``(key, kind, what,
    partition, arguments)``; :meth:`graph` turns them into this run's tasks.
    Everything here is shared by the runs' graphs and read-only.
    """

    __slots__ = ("entries", "assets", "outputs", "step_keys", "partitions", "per_partition", "shared", "origins")

    def __init__(self, plan: Plan, key_suffix: str, resolved: Mapping[str, list[Any]], group_copies: bool) -> None:
        self.entries: list[tuple[Key, int, Any, int | None, tuple]] = []
        self.assets: dict[str, AssetRef] = {}
        self.outputs = plan.outputs
        self.step_keys: dict[str, list[Key]] = {}
        self.partitions: dict[str, int | None] = {}
        self.per_partition: dict[str, bool] = {}
        self.shared: dict[str, Any] = {}  # lookups the graphs derive once (CompiledGraph.task_step)
        self.origins: dict[str, str] = {}  # partitioned step or source -> its source (CompiledGraph.origins)
        for name, value in plan.inputs.items():
            if is_source(value):
                keys: list[Key] = [(name + key_suffix, i) for i in range(len(resolved[name]))]
                self.entries.extend([(key, _SOURCE, name, i, ()) for i, key in enumerate(keys)])
                self.origins[name] = name
                self._record(name, keys, len(keys), True)
                self.assets[name] = AssetRef(name, tuple(keys), partitioned=True)
            else:
                key = name + key_suffix
                self.entries.append((key, _VALUE, name, None, ()))
                self._record(name, [key], None, False)
                self.assets[name] = AssetRef(name, (key,), partitioned=False)
        groups = _copy_groups(plan) if group_copies else {}
        for s in plan.steps:
            self._add_step(s, plan, key_suffix, groups.get(s.name))

    def graph(self, run_id: str, mode: int, inputs: Mapping[str, Any], resolved: Mapping[str, list[Any]]):
        """This run's graph: one task object per entry (the hot loop of compiling)."""
        dsk: dict[Key, Any] = {}
        for key, kind, what, partition, arguments in self.entries:
            if kind == _STEP:
                dsk[key] = (StepTask(what, partition, run_id, mode), *arguments)
            elif kind == _SOURCE:  # a source's entries always carry their partition's index
                dsk[key] = (SourceTask(what, resolved[what][partition], partition, run_id, mode),)  # type: ignore[index, arg-type]
            elif kind == _VALUE:
                dsk[key] = (ValueTask(what, inputs[what], run_id, mode),)
            else:
                dsk[key] = (FinalizeTask(what.name, what.finalize, run_id, mode), *arguments)
        return CompiledGraph(dsk, self.assets, self.outputs, run_id, self.step_keys, self.partitions,
                             self.per_partition, self.shared, self.origins, resolved)

    def _record(self, name: str, keys: list[Key], partitions: int | None, per_partition: bool) -> None:
        self.step_keys[name] = keys
        self.partitions[name] = partitions
        self.per_partition[name] = per_partition

    def _add_step(self, s: Step, plan: Plan, suffix: str, group: str | None) -> None:
        assets = self.assets
        name = s.name + suffix
        resources = dict(s.resources) if s.resources is not None else None
        if not s.inputs:  # a first step: nothing to wire (a comprehension costs, even an empty one)
            refs: list[AssetRef] = []
            driver = None
            spec = StepSpec(s.name, s.func, dict(s.params), (), (), (), (), s.outputs, s.retries,
                            s.retry_delay, s.timeout, resources, s.output_schema)
        else:
            refs = [assets[asset] for asset in s.inputs]
            driver = None
            if s.per_partition:
                driver = next((i for i, ref in enumerate(refs) if ref.partitioned), None)
            wiring = tuple([(ref.selector, ref.partitioned and i != driver) for i, ref in enumerate(refs)])
            spec = StepSpec(s.name, s.func, dict(s.params), *_positions(s, plan.bindings[s.name]), wiring,
                            s.outputs, s.retries, s.retry_delay, s.timeout, resources, s.output_schema)

        if s.split_every is not None and driver is None:
            tree = next((i for i, ref in enumerate(refs) if ref.partitioned), None)
            if tree is not None and len(refs[tree].keys) > s.split_every:
                self._add_tree(s, name, spec, refs, tree)
                return
        if driver is None and s.finalize is None:  # one task for the whole step (the usual case)
            arguments = tuple([list(ref.keys) if ref.partitioned else ref.keys[0] for ref in refs]) if refs else ()
            key: Key = name if group is None else (group + suffix, s.name)
            self.entries.append((key, _STEP, spec, None, arguments))
            self._record(s.name, [key], None, False)
            _add_assets(assets, s, (key,), False)
            return

        def arguments_of(index: int) -> tuple:
            out: list[Any] = []
            for i, ref in enumerate(refs):
                if i == driver:
                    out.append(ref.keys[index])
                elif ref.partitioned:
                    out.append(list(ref.keys))
                else:
                    out.append(ref.keys[0])
            return tuple(out)

        # Partitions (``driver``), or a sink fed by a whole asset, written as one partition.
        count = len(refs[driver].keys) if driver is not None else 1
        if driver is not None and refs[driver].step in self.origins:
            self.origins[s.name] = self.origins[refs[driver].step]
        keys: list[Key] = [(name, i) for i in range(count)]
        self.entries.extend([(key, _STEP, spec, i, arguments_of(i)) for i, key in enumerate(keys)])
        if s.finalize is not None:
            self.entries.append((name, _FINALIZE, s, None, (list(keys),)))
            self._record(s.name, [*keys, name], count, True)
            _add_assets(assets, s, (name,), False)
        else:
            self._record(s.name, keys, count, True)
            _add_assets(assets, s, tuple(keys), True)

    def _add_tree(self, s: Step, name: str, spec: StepSpec, refs: list[AssetRef], tree: int) -> None:
        """A ``split_every`` step: a tree over its partitioned input ``refs[tree]``.

        The first level runs ``spec`` over groups of at most ``k`` partitions;
        every later level runs the step over groups of at most ``k`` of its own
        results (the same spec but for that input, which is now whole values of
        this step: no selector). Tree tasks are keyed ``(name, j)``, numbered
        level by level, and the last one is ``name``, as a whole step is. Other
        inputs reach every task as they reach a whole step.
        """
        k = s.split_every
        assert k is not None
        upper = StepSpec(spec.name, spec.func, spec.params, spec.positional, spec.keyword, spec.varargs,
                         tuple([(None, True) if i == tree else arg for i, arg in enumerate(spec.args)]),
                         spec.outputs, spec.retries, spec.retry_delay, spec.timeout, spec.resources,
                         spec.output_schema)
        others = [list(ref.keys) if ref.partitioned else ref.keys[0] for ref in refs]
        level: list[Key] = list(refs[tree].keys)
        keys: list[Key] = []
        level_spec = spec
        while True:
            groups = [level[i:i + k] for i in range(0, len(level), k)]
            if len(groups) == 1:
                others[tree] = groups[0]
                self.entries.append((name, _STEP, level_spec, None, tuple(others)))
                break
            level = []
            for group in groups:
                key = (name, len(keys))
                others[tree] = group
                self.entries.append((key, _STEP, level_spec, len(keys), tuple(others)))
                keys.append(key)
                level.append(key)
            level_spec = upper
        self._record(s.name, [*keys, name], None, False)
        _add_assets(self.assets, s, (name,), False)


def _copy_groups(plan: Plan) -> dict[str, str]:
    """Step name -> the name its function's copies share, for functions added under several names.

    Only whole steps count: a per-partition step's tasks already share its
    name. The shared name is the function's; where that is also the name of a
    source or of a step with partition keys, ``_copies`` is added, so that a
    group's keys never share a first part with partition keys.
    """
    by_function: dict[int, list[Step]] = {}
    for s in plan.steps:
        if not s.per_partition and s.finalize is None and s.split_every is None:
            by_function.setdefault(id(s.func), []).append(s)
    # First key parts already used with partition (or tree task) numbers.
    keyed = [s.name for s in plan.steps if s.per_partition or s.finalize is not None or s.split_every is not None]
    taken = set(keyed) | set(plan.inputs)
    groups: dict[str, str] = {}
    for copies in by_function.values():
        if len(copies) < 2:
            continue
        group = getattr(copies[0].func, "__name__", None)
        if not isinstance(group, str) or not group.isidentifier():
            group = "step"
        while group in taken:
            group += "_copies"
        for s in copies:
            groups[s.name] = group
    return groups


def _positions(s: Step, binding: Binding) -> tuple[tuple[int, ...], tuple[tuple[str, int], ...], tuple[int, ...]]:
    """The binding as indexes into ``s.inputs``: (positional, keyword, varargs)."""
    if not binding.keyword and binding.positional == s.inputs[: len(binding.positional)]:
        # Every input positional, in order (the usual case): no lookups. The rest
        # of the inputs are then exactly the *args, in order.
        count = len(binding.positional)
        return tuple(range(count)), (), tuple(range(count, len(s.inputs)))
    position = {asset: i for i, asset in enumerate(s.inputs)}
    return (
        tuple([position[a] for a in binding.positional]),
        tuple([(p, position[a]) for p, a in binding.keyword]),
        tuple([position[a] for a in binding.varargs]),
    )


def _add_assets(assets: dict[str, AssetRef], s: Step, keys: tuple[Key, ...], partitioned: bool) -> None:
    produced = s.asset_names
    if len(produced) == 1:
        assets[produced[0]] = AssetRef(s.name, keys, partitioned, None)
        return
    for index, asset in enumerate(produced):  # consumers pick their output by index
        assets[asset] = AssetRef(s.name, keys, partitioned, index if s.finalize is None else None)


def to_delayed(graph: CompiledGraph, plan: Plan) -> dict[str, Any]:
    """One ``dask.delayed.Delayed`` per requested asset, sharing one graph.

    ``graph`` must be compiled in ``PLAIN`` mode, so tasks return bare values.
    """
    from dask.delayed import Delayed

    dsk = dict(graph.dsk)
    out = {}
    for asset in plan.outputs:
        ref = graph.assets[asset]
        if not ref.partitioned and ref.selector is None:
            out[asset] = Delayed(ref.keys[0], dsk)
            continue
        key = f"{ref.step}.{asset}"
        argument = list(ref.keys) if ref.partitioned else ref.keys[0]
        dsk[key] = (_Collect(ref.selector, ref.partitioned), argument)
        out[asset] = Delayed(key, dsk)
    return out


class _Collect:
    """Pick one output of a multi-output step, or combine partitions, as a task."""

    def __init__(self, selector: int | None, concat: bool) -> None:
        self.spec = (selector, concat)

    def __call__(self, raw: Any) -> Any:
        return _argument(raw, self.spec)
